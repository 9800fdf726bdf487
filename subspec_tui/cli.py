"""`subspec`: the headless CLI, command-compatible with the reference's `python -m run.main`.

Global options come before the subcommand; settings resolve as method preset < `--config` YAML <
command line (subspec_tui.settings). Expected failures print one line on stderr and exit 1
(usage errors exit 2, from argparse); they never show a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine import METHODS, EngineError
from engine.config import SUBSTITUTE_KERNELS
from subspec_tui.benchmark import (
    BENCHMARKS,
    BenchmarkError,
    format_columns,
    format_table,
    parse_benchmark_names,
    run_benchmarks,
    select_samples,
    warm_up,
)
from subspec_tui.settings import ConfigError, Settings, check_range, resolve_settings

if TYPE_CHECKING:
    from engine import Engine, EngineConfig
    from profiles.choose import Planned

PROG = "subspec"
DEFAULT_PROMPT = "What is the capital of France? Answer in one sentence."
# Set in the child process that `--nsys-output` starts, so it does not start nsys again.
NSYS_CHILD_ENV = "SUBSPEC_UNDER_NSYS"


class CliError(Exception):
    """An expected failure of a command: one line for the user."""


EXPECTED_ERRORS = (EngineError, ConfigError, BenchmarkError, CliError)


# ---------------------------------------------------------------- argument parsing


def _checked(key: str, convert: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse type: convert, then apply the settings' range check for `key`."""

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {convert.__name__} value: {text!r}") from None
        if (problem := check_range(key, value)) is not None:
            raise argparse.ArgumentTypeError(f"{problem}, got {text}")
        return value

    parse.__name__ = convert.__name__  # argparse names the type in its own messages
    return parse


def _add_global_options(parser: argparse.ArgumentParser, default: Any = None) -> None:
    """The settings options. They go before the command (the reference's order) and after it:
    each engine command repeats them with `default=SUPPRESS`, so a value given before the command
    is not reset by the command's own parser, and one given after it wins."""
    g = parser.add_argument_group("settings (method preset < the plan < --config YAML < these options)")

    def add(*flags: str, **kwargs: Any) -> None:
        g.add_argument(*flags, default=default, **kwargs)

    add("--config", type=Path, help="YAML file of settings (keys as in configs/methods/*.yaml)")
    add("--method", choices=METHODS, help="decoding method (default: the YAML's, else the one this machine's profile measured fastest)")
    add("--llm-path", help="target model: folder, hub id or .gguf (default: bundled SmolLM2-135M-Instruct)")
    add("--draft-model-path", help="draft model for classic_sd")
    add("--device", help="auto, cpu, cuda or cuda:N")
    add("--dtype", choices=("auto", "bfloat16", "float16", "float32"),
        help="compute dtype (auto: bfloat16 on a GPU, float32 on a CPU; docs: greedy output and bf16)")
    add("--vram-limit-gb", type=_checked("vram_limit_gb", float), help="emulate a smaller GPU")
    add("--keep-first-n-layers-on-gpu", type=_checked("keep_first_n_layers_on_gpu", int),
        help="resident layers (default: this machine's profile)")
    add("--no-profile", action="store_true",
        help="plan with the memory model's instant estimate instead of the measured profile")
    add("--max-length", type=_checked("max_length", int),
        help="context in tokens, prompt + output (default: the profile's, 8192 where it costs no stream buffer)")
    add("--max-new-tokens", type=_checked("max_new_tokens", int), help="tokens to generate per reply")
    add("--temperature", type=_checked("temperature", float))
    add("--do-sample", action=argparse.BooleanOptionalAction)
    add("--seed", type=int)
    add("--warmup-iter", type=_checked("warmup_iter", int), help="untimed generations before measuring")
    add("--compile-mode", help="draft steps: auto (CUDA graphs + compiled element-wise math on a GPU), cuda-graphs, or none (eager)")
    add("--substitute-kernel", choices=SUBSTITUTE_KERNELS,
        help="subspec_sd's 4-bit matmul: auto (triton on a GPU, dense on a CPU), triton, tinygemm, gemlite, hqq, dense")
    add("--max-depth", type=_checked("max_depth", int), help="draft tree depth")
    add("--topk-len", type=_checked("topk_len", int), help="draft tree width per depth")
    add("--tree-policy", choices=("reference", "best_first"))
    add("--node-budget", type=_checked("node_budget", int), help="best_first: draft nodes per tree")
    add("--draft-batch", type=_checked("draft_batch", int),
        help="best_first: nodes drafted per draft forward (default 16)")
    add("--min-draft-prob", type=_checked("min_draft_prob", float),
        help="best_first: nodes the draft gives a lower cumulative probability are not drafted; the tree ends "
             "when none is left (default: 1e-6 on a CPU, 0 = off on a GPU, where its wait per draft forward costs more)")
    add("--verify-method", choices=("exact", "lossy"))
    add("--row-invariant", action=argparse.BooleanOptionalAction,
        help="the target computes each token as plain decoding would: greedy output identical in 16-bit dtypes too "
             "(default: on in bfloat16/float16, off in float32)")
    add("--compressed-streaming", action=argparse.BooleanOptionalAction,
        help="offloaded layers cross PCIe with Huffman-coded exponents (~68%% of the bytes, the same bits "
             "after decoding; bfloat16, GPU decoding not measured yet)")
    add("--threshold-method", choices=("entropy", "prob"))
    add("--threshold", type=_checked("threshold", float), help="lossy verification threshold")
    add("--window-size", type=_checked("window_size", int), help="lossy: exact matches needed after")
    add("--nvtx-profiling", action=argparse.BooleanOptionalAction,
        help="wrap draft, verify, transfer and sampling in NVTX ranges")
    add("--nsys-output", help="re-run this command under `nsys profile -o NSYS_OUTPUT`")
    add("--detailed-analysis", action=argparse.BooleanOptionalAction,
        help="write per-iteration diagnostics into the benchmark JSONL")


# Destinations of the options above (and of --max-new-tokens) that are settings keys.
SETTING_KEYS = (
    "method", "llm_path", "draft_model_path", "device", "dtype", "vram_limit_gb", "keep_first_n_layers_on_gpu",
    "max_length", "temperature", "do_sample", "seed", "warmup_iter", "compile_mode", "max_depth",
    "topk_len", "tree_policy", "node_budget", "draft_batch", "min_draft_prob", "verify_method", "row_invariant", "threshold_method", "threshold",
    "window_size", "substitute_kernel", "compressed_streaming", "nvtx_profiling", "nsys_output", "detailed_analysis", "max_new_tokens",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="SubSpec Chat without the TUI: generate, benchmark, serve an OpenAI-compatible API.",
        allow_abbrev=False,
    )
    _add_global_options(parser)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def engine_command(name: str, help_text: str) -> argparse.ArgumentParser:
        command = commands.add_parser(name, help=help_text, allow_abbrev=False)
        _add_global_options(command, default=argparse.SUPPRESS)
        return command

    test = engine_command("run-test", "one chat-templated generation")
    test.add_argument("--prompt", default=DEFAULT_PROMPT)
    test.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    test.set_defaults(handler=cmd_run_test)

    bench = engine_command("run-benchmark", "speed figures over benchmark prompts")
    bench.add_argument("--benchmarks", required=True, help="comma-separated: " + ",".join(BENCHMARKS))
    bench.add_argument("--max-samples", type=_checked("max_samples", int), help="prompts per benchmark (seeded)")
    bench.add_argument("--out", type=Path, default=Path("results"), help="results folder (default ./results)")
    bench.set_defaults(handler=cmd_run_benchmark)

    api = engine_command("run-api", "OpenAI-compatible HTTP server")
    api.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    api.add_argument("--port", type=_port, default=8000)
    api.set_defaults(handler=cmd_run_api)

    gradio = engine_command("run-gradio", "browser chat (Gradio; extra 'ui')")
    gradio.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    gradio.add_argument("--port", type=_port, default=7860)
    gradio.set_defaults(handler=cmd_run_gradio)

    profile = engine_command("profile", "measure this GPU and plan what fits in VRAM")
    profile.add_argument("--model", help="model to plan for (default: --llm-path, else the bundled model)")
    profile.add_argument("--force", action="store_true", help="measure again even if a profile is stored")
    profile.add_argument("--json", action="store_true")
    profile.set_defaults(handler=cmd_profile)

    models = commands.add_parser("models", help="list, pull, remove or inspect local models")
    actions = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="models on this machine")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(handler=cmd_models_list)
    pull = actions.add_parser("pull", help="download a model from the Hugging Face hub")
    pull.add_argument("repo_id")
    pull.add_argument("--revision")
    pull.add_argument("--dry-run", action="store_true", help="list files and sizes, download nothing")
    pull.add_argument("--json", action="store_true")
    pull.set_defaults(handler=cmd_models_pull)
    remove = actions.add_parser("rm", help="delete a downloaded model")
    remove.add_argument("repo_id")
    remove.add_argument("--json", action="store_true")
    remove.set_defaults(handler=cmd_models_rm)
    show = actions.add_parser("show", help="details of one local model")
    show.add_argument("repo_id")
    show.add_argument("--json", action="store_true")
    show.set_defaults(handler=cmd_models_show)
    return parser


def _port(text: str) -> int:
    """An argparse type: a TCP port, checked before any model loads."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port: {text!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is between 1 and 65535, got {port}")
    return port


def settings_from_args(args: argparse.Namespace, plan: Planned | None = None) -> Settings:
    overrides = {key: getattr(args, key) for key in SETTING_KEYS if getattr(args, key, None) is not None}
    if plan is None:
        return resolve_settings(getattr(args, "config", None), overrides)
    return resolve_settings(getattr(args, "config", None), overrides, plan.overrides, plan.origin)


# ---------------------------------------------------------------- helpers


def _progress(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def _print_json(data: Any) -> None:
    print(json.dumps(data, default=str))


def load_engine(config: EngineConfig, progress: Callable[[str], None]) -> Engine:
    """engine.load_engine, imported here: torch loads after the arguments are parsed."""
    from engine import load_engine as load

    return load(config, progress)


def planned(args: argparse.Namespace, settings: Settings) -> tuple[Settings, Planned]:
    """The settings to load with: the user's own, over the plan profiles.choose_plan decides
    (stored profile, measured now on a first run, or the estimate with --no-profile)."""
    from profiles.choose import choose_plan

    plan = choose_plan(settings.engine, settings.explicit, use_profile=not getattr(args, "no_profile", False),
                       progress=_progress)
    for note in plan.notes:
        _progress(note)
    final = settings_from_args(args, plan)
    _progress(plan_line(plan, final.engine))
    return final, plan


def plan_line(plan: Planned, config: EngineConfig) -> str:
    """One line: which plan this run uses and where it came from."""
    layers = config.keep_first_n_layers_on_gpu
    placement = "every layer resident" if layers is None else f"{layers} layers on the GPU"
    tree = "" if config.method == "vanilla" else f", {config.tree_policy} tree of {config.draft_nodes() + 1} nodes"
    return f"plan from {plan.origin}: {config.method}, {placement}{tree}, context {config.max_length}"


def _load(settings: Settings) -> Engine:
    return load_engine(settings.engine, _progress)


def format_stats(method_label: str, stats: dict[str, Any]) -> str:
    """One line of the section 5 figures, `-` where a figure does not apply."""

    def ms(key: str) -> str:
        return "-" if stats.get(key) is None else f"{stats[key]:.1f} ms"

    peak = stats.get("peak_gpu_bytes")
    return (
        f"{method_label}: {stats['new_tokens']} tokens, {stats['tok_per_s']:.2f} tok/s, tau {stats['tau']:.2f}, "
        f"draft {ms('draft_ms')}, verify {ms('verify_ms')}, transfer {ms('transfer_ms')}, "
        f"stream bound {ms('stream_bound_ms')}, peak GPU {'-' if peak is None else f'{peak / 1024**3:.2f} GiB'}"
    )


def method_label(settings: Settings) -> str:
    return settings.engine.method + (" (lossy)" if settings.engine.verify_method == "lossy" else "")


def rerun_under_nsys(output: str, argv: Sequence[str]) -> int:
    """Run this same command again inside `nsys profile`, with NVTX ranges on."""
    nsys = shutil.which("nsys")
    if nsys is None:
        raise CliError("--nsys-output needs NVIDIA Nsight Systems, but `nsys` is not on PATH")
    command = [
        nsys, "profile", "--trace=cuda,nvtx,osrt", "--force-overwrite=true", "-o", output,
        sys.executable, "-m", "subspec_tui.cli", "--nvtx-profiling", *argv,
    ]
    _progress("profiling under Nsight Systems: " + " ".join(command))
    return subprocess.run(command, env={**os.environ, NSYS_CHILD_ENV: "1"}, check=False).returncode


# ---------------------------------------------------------------- commands


def cmd_run_test(args: argparse.Namespace, settings: Settings) -> int:
    started = time.perf_counter()
    settings, plan = planned(args, settings)
    planned_at = time.perf_counter()
    engine = _load(settings)
    loaded_at = time.perf_counter()
    try:
        warm_up(engine, settings)
        prompt_ids = engine.chat_ids([{"role": "user", "content": args.prompt}])
        stream = None if args.json else lambda piece: print(piece, end="", flush=True)
        generation_started = time.perf_counter()
        gen = engine.generate(prompt_ids, settings.sampling, on_text=stream)
        timings = {"plan_s": planned_at - started, "load_s": loaded_at - planned_at,
                   "generate_s": time.perf_counter() - generation_started}
        plan_info = plan.describe(settings.engine, engine.describe())
    finally:
        engine.close()
    stats = gen.stats.as_dict()
    if args.json:
        _print_json({
            "method": settings.engine.method,
            "model": engine.model_name,
            "text": gen.text,
            "token_ids": gen.token_ids,
            "stats": stats,
            "plan": plan_info,
            "timings": timings,  # wall seconds: planning (a first run measures), loading, this generation
        })
    else:
        print()
        print(format_stats(method_label(settings), stats), file=sys.stderr)
    return 0


def cmd_run_benchmark(args: argparse.Namespace, settings: Settings) -> int:
    names = parse_benchmark_names(args.benchmarks)
    samples = select_samples(names, args.max_samples, settings.sampling.seed or 0)
    settings, plan = planned(args, settings)
    engine = _load(settings)
    try:
        plan_info = plan.describe(settings.engine, engine.describe())
        run_dir, summary = run_benchmarks(engine, settings, samples, args.max_samples, args.out, plan_info)
    finally:
        engine.close()
    print(format_table(summary))
    print(f"results: {run_dir}")
    return 0


def cmd_run_api(args: argparse.Namespace, settings: Settings) -> int:
    try:
        from subspec_tui.server import serve
    except ImportError as err:
        raise CliError(f"run-api needs the server extra ({err.name} is missing): pip install 'subspec-chat[server]'") from None
    with bound_socket(args.host, args.port) as sock:  # a taken port is found before minutes of loading
        return _serve_until_stopped(lambda engine, sampling, plan: serve(engine, sampling, sock, plan), args, settings)


def cmd_run_gradio(args: argparse.Namespace, settings: Settings) -> int:
    try:
        import gradio  # noqa: F401 - only to give one clear message before loading a model
    except ImportError:
        raise CliError("run-gradio needs the ui extra (gradio is missing): pip install 'subspec-chat[ui]'") from None
    from subspec_tui.gradio_ui import serve

    with bound_socket(args.host, args.port):  # checked, then released for Gradio to bind
        pass
    return _serve_until_stopped(lambda engine, sampling, _plan: serve(engine, sampling, args.host, args.port),
                                args, settings)


@contextlib.contextmanager
def bound_socket(host: str, port: int) -> Iterator[socket.socket]:
    """A listening-ready socket bound to host:port, or one line saying why it cannot be."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise CliError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    try:
        yield sock
    finally:
        sock.close()


def _serve_until_stopped(serve: Callable, args: argparse.Namespace, settings: Settings) -> int:
    """Load the engine with the plan, serve it (run-api, run-gradio), free it on the way out."""
    settings, plan = planned(args, settings)
    engine = _load(settings)
    try:
        serve(engine, settings.sampling, plan.describe(settings.engine, engine.describe()))
    finally:
        engine.close()
    return 0


def cmd_profile(args: argparse.Namespace, settings: Settings) -> int:
    import profiles
    from profiles.choose import check_method

    check_method(settings.engine)
    model = args.model or settings.engine.llm_path
    method = settings.engine.method if "method" in settings.explicit else None
    if settings.engine.vram_limit_gb is not None and not _has_gpu():
        return _print_estimate(args, dataclasses.replace(settings.engine, llm_path=model),
                               plan_context="max_length" not in settings.explicit)
    # --max-length is the plan's context (its KV cache and workspace are part of what must fit);
    # without it the profile plans one.
    context = settings.engine.max_length if "max_length" in settings.explicit else None
    profile = profiles.run_profile(model, settings.engine.vram_limit_gb, method, _progress, args.force,
                                   max_context=context,
                                   draft_model_path=settings.engine.draft_model_path)
    if args.json:
        _print_json(profile.as_dict())
    else:
        for message in profile.messages:
            _progress(message)
        print(profiles.format_profile(profile))
    return 0


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _print_estimate(args: argparse.Namespace, config: EngineConfig, plan_context: bool) -> int:
    """A CPU-only machine asked to plan for a card: the memory model's plan from config.json alone
    (nothing to measure here, and no weights downloaded for it)."""
    from profiles import GIB
    from profiles.choose import memory_estimate

    plan = memory_estimate(config, int(config.vram_limit_gb * GIB), download=True, plan_context=plan_context)
    note = (f"no CUDA GPU here: the memory model's estimate for a {config.vram_limit_gb:g} GiB card, from config.json "
            "alone; on that GPU, `subspec profile` measures it")
    if args.json:
        _print_json({"source": "estimate", "model": config.llm_path, "note": note, "plan": plan.as_dict()})
    else:
        _progress(note)
        print(plan.summary())
    return 0


def cmd_models_list(args: argparse.Namespace) -> int:
    from subspec_tui import models

    found = models.list_models()
    if args.json:
        _print_json([m.as_dict() for m in found])
        return 0
    rows = [("model", "family", "params", "size", "path")]
    rows += [
        (m.repo_id, m.family or "?", models.format_params(m.params), models.format_bytes(m.size_bytes), str(m.path))
        for m in found
    ]
    print(format_columns(rows))
    return 0


def cmd_models_pull(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from subspec_tui import models

    bars: list[tqdm] = []  # drawn from the first progress report: none for a dry run or a failed look-up
    lock = threading.Lock()

    def on_progress(p: models.PullProgress) -> None:  # called from download threads
        with lock:
            if not bars:
                bars.append(tqdm(total=p.bytes_total, unit="B", unit_scale=True, desc=args.repo_id, file=sys.stderr))
            bars[0].update(p.bytes_done - bars[0].n)

    try:
        result = models.pull_model(args.repo_id, revision=args.revision, progress_cb=on_progress, dry_run=args.dry_run)
    finally:
        for bar in bars:
            bar.close()
    if args.json:
        _print_json(result.as_dict())
    elif args.dry_run:
        for f in result.files:
            print(f"{f.filename}  {models.format_bytes(f.size_bytes)}{'  (cached)' if f.cached else ''}")
        print(f"total {models.format_bytes(result.total_bytes)}, to download {models.format_bytes(result.download_bytes)}")
    else:
        print(f"{result.repo_id} ({result.revision[:10]}) -> {result.path}")
    return 0


def cmd_models_rm(args: argparse.Namespace) -> int:
    from subspec_tui import models

    freed = models.remove_model(args.repo_id)
    if args.json:
        _print_json({"repo_id": args.repo_id, "freed_bytes": freed})
    else:
        print(f"removed {args.repo_id}, freed {models.format_bytes(freed)}")
    return 0


def cmd_models_show(args: argparse.Namespace) -> int:
    from subspec_tui import models

    info = models.show_model(args.repo_id)
    if args.json:
        _print_json(info)
    else:
        for key, value in info.items():
            if key == "files":
                print("files:")
                for f in value:
                    print(f"  {f['filename']}  {models.format_bytes(f['size_bytes'])}")
            elif key == "config":
                print("config:")
                for name, figure in value.items():
                    print(f"  {name}: {figure}")
            else:
                print(f"{key}: {value}")
    return 0


# Commands that load an engine and therefore need the resolved settings.
ENGINE_COMMANDS = {cmd_run_test, cmd_run_benchmark, cmd_run_api, cmd_run_gradio, cmd_profile}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        if args.handler not in ENGINE_COMMANDS:
            return args.handler(args)
        settings = settings_from_args(args)
        if settings.run.nsys_output and not os.environ.get(NSYS_CHILD_ENV):
            return rerun_under_nsys(settings.run.nsys_output, argv)
        return args.handler(args, settings)
    except EXPECTED_ERRORS as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
