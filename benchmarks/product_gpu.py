"""The product end to end, only through its entry points, as a user would (issue: every front end
runs the measured plan). On a GPU:

1. writes a random-weights checkpoint of a real shape to disk in the hub layout (sharded
   safetensors, config.json, generation_config.json) with a real tokenizer (the bundled
   SmolLM2's, the vocabulary sized to it: 49152);
2. `subspec profile` (first run: measured and stored; timed);
3. `subspec run-test` with no layer flags for vanilla and subspec_sd, a short and a ~1500-token
   prompt, each a new process: the stored profile is reused (vanilla's is measured on its first use);
4. `subspec run-api` driven by the official `openai` client, streaming; /health shows the plan;
   then a conversation through it: a ~1500-token first turn and three short ones, each turn's time
   to first token against one stream of the offloaded layers (later turns reuse the cache);
5. `subspec-chat` for one reply (benchmarks/app_reply.py: the real app, its engine, its panel);
6. the same shape and plan in memory, in this process, as benchmarks/offload_gpu.py builds it
   (random layers, engine_from_model): vanilla ms/token and the subspec iteration, warm. The
   product path's figures are reported against these (target: within 5%).

    python benchmarks/product_gpu.py --shape llama-3.1-8b --vram-limit-gb 8 --out /tmp/product [--json r.json]

On a CPU (CI) it runs the tiny shape with no cap through the same steps: no figure means
anything there, it keeps the script and the entry points working.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig, Qwen2Config

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine import EngineConfig, SamplingConfig  # noqa: E402
from engine.build import engine_from_model  # noqa: E402
from engine.loading import LoadedModel, resolve_source  # noqa: E402

SHAPES = {
    "llama-3.1-8b": lambda vocab: LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                               num_attention_heads=32, num_key_value_heads=8, vocab_size=vocab,
                                               tie_word_embeddings=False, max_position_embeddings=131072,
                                               rope_theta=500000.0),
    "qwen2.5-7b": lambda vocab: Qwen2Config(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                             num_attention_heads=28, num_key_value_heads=4, vocab_size=vocab,
                                             tie_word_embeddings=False, max_position_embeddings=32768),
    "tiny": lambda vocab: LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                                      tie_word_embeddings=False, max_position_embeddings=4096),
}
SHORT_PROMPT = "Hello there! What can you do?"
SHARD_BYTES = 4 * 1000**3


def write_checkpoint(shape: str, folder: Path, tokenizer_folder: Path, device: torch.device) -> Path:
    """A random checkpoint as the hub ships one. Tensors are filled on the device (seconds for 8B)."""
    from huggingface_hub import save_torch_state_dict
    from transformers import AutoTokenizer

    if (folder / "config.json").is_file():
        return folder
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    config = SHAPES[shape](len(tokenizer))
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    state = {}
    for name, meta in skeleton.state_dict().items():
        if name.endswith("norm.weight"):
            state[name] = torch.ones(meta.shape, dtype=meta.dtype)
        else:
            state[name] = torch.empty(meta.shape, dtype=meta.dtype, device=device).normal_(0, 0.02).cpu()
    folder.mkdir(parents=True)
    save_torch_state_dict(state, folder, max_shard_size=SHARD_BYTES)
    config.save_pretrained(folder)
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def long_prompt(tokenizer_folder: Path, tokens: int) -> str:
    """MT-Bench questions run together to about `tokens` tokens."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    questions = [json.loads(line)["turns"][0]
                 for line in (ROOT / "subspec_tui/data/mt_bench_questions.jsonl").read_text().splitlines()]
    text, k = "", 0
    while len(tokenizer.encode(text)) < tokens:
        text += questions[k % len(questions)] + "\n\n"
        k += 1
    return text


def subspec(args: list[str], env: dict[str, str], timeout: float = 900) -> tuple[dict, float]:
    """Run the `subspec` CLI in a new process; (its JSON, wall seconds)."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "subspec_tui.cli", *args], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"subspec {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    sys.stderr.write("".join(f"    {line}\n" for line in done.stderr.splitlines()
                             if "plan from" in line or "warming up" in line or "using" in line))
    return json.loads(done.stdout), wall


def run_tests(model: Path, cap: list[str], env: dict, prompts: dict[str, str], new_tokens: int) -> dict:
    results = {}
    for method in ("vanilla", "subspec_sd"):
        for label, prompt in prompts.items():
            out, wall = subspec([*cap, "--llm-path", str(model), "--method", method, "run-test", "--prompt", prompt,
                                 "--max-new-tokens", str(new_tokens), "--json"], env)
            stats = out["stats"]
            per_token = 1000 / stats["tok_per_s"] if stats["tok_per_s"] else None
            results[f"{method}/{label}"] = {
                "wall_s": wall, **out["timings"], "plan": out["plan"], "prompt_tokens": stats["prompt_tokens"],
                "ttft_ms": stats["prefill_ms"], "ms_per_token": per_token, "tau": stats["tau"],
                "iteration_ms": per_token * stats["tau"] if per_token else None,
                "draft_ms": stats["draft_ms"], "verify_ms": stats["verify_ms"], "transfer_ms": stats["transfer_ms"],
                "stream_bound_ms": stats["stream_bound_ms"], "peak_gpu_gb": (stats["peak_gpu_bytes"] or 0) / 1e9,
            }
            r = results[f"{method}/{label}"]
            print(f"run-test {method:10s} {label:5s}: plan {r['plan']['source']} "
                  f"({r['plan']['layers_on_gpu']} of {r['plan']['layers_total']} layers, {r['plan']['stream_buffers']} "
                  f"buffers, {r['plan']['tree_policy']} {r['plan']['node_budget']}), wall {wall:.1f} s "
                  f"(plan {r['plan_s']:.1f}, load {r['load_s']:.1f}), prompt {r['prompt_tokens']} tokens, "
                  f"TTFT {r['ttft_ms']:.0f} ms, {r['ms_per_token'] or 0:.1f} ms/token, tau {r['tau']:.2f}, "
                  f"iteration {r['iteration_ms'] or 0:.1f} ms (draft {r['draft_ms'] or 0:.1f}, verify "
                  f"{r['verify_ms'] or 0:.1f}, transfer {r['transfer_ms'] or 0:.1f}, bound "
                  f"{r['stream_bound_ms'] or 0:.1f}), peak {r['peak_gpu_gb']:.2f} GB", flush=True)
    return results


@contextlib.contextmanager
def served(model: Path, cap: list[str], env: dict) -> Iterator[tuple[str, dict, float]]:
    """`subspec run-api` in its own process until the block ends: (its URL, its /health, seconds to ready)."""
    import httpx

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.perf_counter()
    server = subprocess.Popen([sys.executable, "-m", "subspec_tui.cli", *cap, "--llm-path", str(model), "run-api",
                               "--port", str(port)], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            if server.poll() is not None:
                raise SystemExit(f"run-api exited: {server.stderr.read()[-3000:]}")
            try:
                health = httpx.get(f"{url}/health", timeout=1).json()
                break
            except httpx.HTTPError:
                time.sleep(0.5)
        yield url, health, time.perf_counter() - started
    finally:
        server.terminate()
        server.wait(timeout=60)


def api(model: Path, cap: list[str], env: dict, new_tokens: int) -> dict:
    """`subspec run-api` and the official openai client, streaming."""
    import openai

    with served(model, cap, env) as (url, health, ready_s):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
        replies = []
        for _ in range(2):  # the first request of the process, then a warm one
            sent = time.perf_counter()
            first, pieces = None, []
            for chunk in client.chat.completions.create(model=health["model"], stream=True, max_tokens=new_tokens,
                                                        messages=[{"role": "user", "content": SHORT_PROMPT}]):
                if chunk.choices and chunk.choices[0].delta.content:
                    first = first or time.perf_counter()
                    pieces.append(chunk.choices[0].delta.content)
            replies.append({"ttft_ms": ((first or time.perf_counter()) - sent) * 1000,
                            "total_s": time.perf_counter() - sent, "chunks": len(pieces)})
    result = {"ready_s": ready_s, "plan": health["plan"], "first": replies[0], "second": replies[1]}
    print(f"run-api: ready in {ready_s:.1f} s, plan {health['plan']['source']} "
          f"({health['plan']['method']}, {health['plan']['layers_on_gpu']} layers on the GPU); streamed reply: "
          f"first request TTFT {replies[0]['ttft_ms']:.0f} ms, total {replies[0]['total_s']:.2f} s; second TTFT "
          f"{replies[1]['ttft_ms']:.0f} ms, total {replies[1]['total_s']:.2f} s", flush=True)
    return result


def conversation(model: Path, cap: list[str], env: dict, first_turn: str, new_tokens: int, turns: int = 4) -> dict:
    """A conversation through `subspec run-api`: a long first turn, then short ones; each turn's
    time to the first token (the server's prefill_ms) and how much of its prompt was reused."""
    import httpx

    follow_ups = ["Summarise that in two sentences.", "Now give one example.", "And a counter-example?"]
    messages, rows = [], []
    with served(model, cap, env) as (url, health, _ready_s):
        for turn in range(turns):
            messages.append({"role": "user", "content": first_turn if turn == 0 else follow_ups[(turn - 1) % 3]})
            reply = httpx.post(f"{url}/v1/chat/completions", timeout=600, json={
                "model": health["model"], "messages": messages, "max_tokens": new_tokens}).json()
            stats = reply["subspec_stats"]
            rows.append({"prompt_tokens": stats["prompt_tokens"], "reused_tokens": stats["reused_tokens"],
                         "ttft_ms": stats["prefill_ms"], "stream_bound_ms": stats["stream_bound_ms"]})
            messages.append({"role": "assistant", "content": reply["choices"][0]["message"]["content"]})
            r = rows[-1]
            print(f"conversation turn {turn + 1}: prompt {r['prompt_tokens']} tokens, {r['reused_tokens']} reused; "
                  f"TTFT {r['ttft_ms']:.0f} ms (one stream of the offloaded layers: {r['stream_bound_ms'] or 0:.0f} ms)",
                  flush=True)
    return {"plan": health["plan"], "turns": rows}


def app(model: Path, cap_gb: float | None, env: dict, new_tokens: int) -> dict:
    command = [sys.executable, str(ROOT / "benchmarks/app_reply.py"), "--model", str(model),
               "--max-new-tokens", str(new_tokens), "--prompt", SHORT_PROMPT]
    if cap_gb:
        command += ["--vram-limit-gb", str(cap_gb)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"app_reply failed:\n{done.stdout[-1500:]}\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout)
    print(f"subspec-chat: {result['method']} (plan from {result['plan_source']}, reused {result['profile_reused']}), "
          f"ready in {result['ready_s']:.1f} s, first text {result['first_text_s'] * 1000:.0f} ms, reply "
          f"{result['reply_s']:.2f} s; panel: tau {result['panel']['tau']}, tok/s {result['panel']['tok_per_s']}, "
          f"transfer {result['panel']['transfer']}", flush=True)
    return result


def in_memory(shape: str, model: Path, plans: dict[str, dict], cap_gb: float | None, prompt_ids: list[int],
              new_tokens: int, device: torch.device) -> dict:
    """The same shape and plan as offload_gpu.py builds it: random layers in memory, warm."""
    from benchmarks.offload_gpu import random_model

    config = json.loads((model / "config.json").read_text())
    hf_config = SHAPES[shape](config["vocab_size"])
    weights = random_model(hf_config, torch.bfloat16 if device.type == "cuda" else torch.float32, device)
    results = {}
    for method, plan in plans.items():
        engine = engine_from_model(
            EngineConfig(method=method, device=str(device), vram_limit_gb=cap_gb,
                         keep_first_n_layers_on_gpu=plan["layers_on_gpu"] if device.type == "cuda" else None,
                         offload_slots=max(1, plan["stream_buffers"]), tree_policy=plan["tree_policy"] or "best_first",
                         node_budget=plan["node_budget"], draft_batch=plan["draft_batch"],
                         max_depth=plan["max_depth"] or 1, max_length=plan["max_length"]),
            LoadedModel(weights, _Ids(), shape, None),
        )
        engine.warm_up()
        stats = engine.generate(prompt_ids, SamplingConfig(max_new_tokens=new_tokens)).stats.as_dict()
        per_token = 1000 / stats["tok_per_s"] if stats["tok_per_s"] else None
        results[method] = {"ms_per_token": per_token, "tau": stats["tau"],
                           "iteration_ms": per_token * stats["tau"] if per_token else None,
                           "draft_ms": stats["draft_ms"], "verify_ms": stats["verify_ms"],
                           "stream_bound_ms": stats["stream_bound_ms"]}
        engine.close()
        print(f"in memory  {method:10s}: {results[method]['ms_per_token'] or 0:.1f} ms/token, iteration "
              f"{results[method]['iteration_ms'] or 0:.1f} ms (draft {stats['draft_ms'] or 0:.1f}, verify "
              f"{stats['verify_ms'] or 0:.1f}, bound {stats['stream_bound_ms'] or 0:.1f})", flush=True)
    return results


class _Ids:
    """The in-memory engine needs no text."""

    eos_token_id = None
    chat_template = None

    def __len__(self) -> int:
        return 1000

    def decode(self, ids, skip_special_tokens=True) -> str:
        return ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=SHAPES, default="llama-3.1-8b" if torch.cuda.is_available() else "tiny")
    parser.add_argument("--vram-limit-gb", type=float, default=8.0)
    parser.add_argument("--out", type=Path, required=True, help="checkpoint, profiles and chats go here")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--long-prompt-tokens", type=int, default=1500)
    parser.add_argument("--steps", default="profile,run-test,api,conversation,app,in-memory")
    parser.add_argument("--layers", type=int, help="--keep-first-n-layers-on-gpu for every command (skips profiling)")
    parser.add_argument("--plans-from", type=Path, help="a report of an earlier run: its run-test plans for in-memory")
    parser.add_argument("--tokenizer", type=Path, help="a tokenizer folder (default: the bundled model's)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    cap_gb = args.vram_limit_gb if gpu else None
    cap = ["--vram-limit-gb", str(cap_gb)] if cap_gb else []
    if args.layers is not None:
        cap += ["--keep-first-n-layers-on-gpu", str(args.layers)]
    steps = set(args.steps.split(","))
    tokenizer_folder = args.tokenizer or resolve_source(None, lambda _msg: None)[0]  # the bundled model's
    env = {**os.environ, "SUBSPEC_CONFIG_DIR": str(args.out / "config"), "SUBSPEC_DATA_DIR": str(args.out / "data"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    report: dict = {"shape": args.shape, "vram_limit_gb": cap_gb, "device": torch.cuda.get_device_name() if gpu else "cpu"}

    started = time.perf_counter()
    model = write_checkpoint(args.shape, args.out / f"{args.shape}-random", tokenizer_folder, device)
    report["write_s"] = time.perf_counter() - started
    on_disk = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    print(f"checkpoint {model}: {on_disk / 1e9:.2f} GB in {len(list(model.glob('*.safetensors')))} shards, "
          f"written in {report['write_s']:.1f} s", flush=True)
    if "profile" in steps:
        profile, wall = subspec([*cap, "--llm-path", str(model), "profile", "--json"], env)
        plan = profile["plan"]
        report["profile"] = {"wall_s": wall, "reused": profile["reused"], "plan": plan}
        print(f"profile (first run, {'reused' if profile['reused'] else 'measured'}): {wall:.1f} s; {plan['method']}, "
              f"{plan['layers_on_gpu']} of {plan['layers_total']} layers, {plan['stream_buffers']} buffers, "
              f"{plan['tree_policy']} {plan['node_budget']} nodes, {plan['draft_batch']} per draft forward, streaming "
              f"{'compressed' if plan.get('compressed_streaming') else 'bf16'}; measured: "
              + "; ".join(f"{k} {v:.2f} tok/s" for k, v in (plan.get("tok_per_s_by_candidate") or {}).items()), flush=True)
    prompts = {"short": SHORT_PROMPT, "long": long_prompt(tokenizer_folder, args.long_prompt_tokens)}
    if "run-test" in steps:
        report["run_test"] = run_tests(model, cap, env, prompts, args.new_tokens)
    if "api" in steps:
        report["api"] = api(model, cap, env, args.new_tokens)
    if "conversation" in steps:
        report["conversation"] = conversation(model, cap, env, prompts["long"], args.new_tokens)
    if "app" in steps:
        report["app"] = app(model, cap_gb, env, args.new_tokens)
    earlier = json.loads(args.plans_from.read_text()) if args.plans_from else report
    if "in-memory" in steps and "run_test" in earlier:
        plans = {m: earlier["run_test"][f"{m}/short"]["plan"] for m in ("vanilla", "subspec_sd")}
        ids = [(7 + 31 * k) % 1000 for k in range(32)]
        report["in_memory"] = in_memory(args.shape, model, plans, cap_gb, ids, args.new_tokens, device)
        for method, key in (("vanilla", "ms_per_token"), ("subspec_sd", "iteration_ms")):
            product, bench = earlier["run_test"][f"{method}/short"][key], report["in_memory"][method][key]
            if product and bench:
                print(f"{method}: product path {product:.1f} ms vs in memory {bench:.1f} ms "
                      f"({key.replace('_', ' ')}): {product / bench:.3f}x", flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
