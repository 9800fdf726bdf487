"""Offloaded decoding on a real GPU with random-weight models of real shapes under VRAM caps.

For each case (Qwen2.5-7B at 8 GB, Llama-3.1-8B at 8 GB, Qwen2.5-14B at 12 GB, Qwen2.5-32B at
24 GB by default) ONE run measures, each figure next to its physical bound from the same run:
- pinned host-to-device bandwidth, and stream_bound_ms = offloaded bytes / that bandwidth;
- vanilla offloaded decode: ms per token, tok/s, efficiency = bound / measured;
- SubSpec: verification forwards over 1..289-node trees; one draft depth (all substitute layers,
  6 tokens) eager and replayed from a CUDA graph, against the HBM floor of the bytes it reads;
  the iteration split of real generations (draft, verify, transfer, KV compaction, host work) for
  the reference tree (depth 48 x top-6) and for the tree the profile rule picks from the verify
  timings, with where the host waited for the GPU in those iterations (torch's sync debug mode:
  one wait, the tree's transfer to the host, is the design); that tree's draft alone (GPU time,
  host issue time, its kernels); peak GPU memory against the cap;
- tok/s of SubSpec = tau / iteration time, for stated taus (random weights say nothing about tau);
  a tau measured for one tree (`name=value@tree`, tree = reference, profile, wide16, wide32, floor16) is
  applied to that tree only.
The first case also compares the substitute's 4-bit kernels per layer (triton and tinygemm with fused q/k/v
and gate/up, gemlite, dense dequantized weights) and bf16, eager and inside a CUDA graph, and
profiles the GPU kernels of one draft step.

    python benchmarks/offload_gpu.py [--cases qwen2.5-7b:8,qwen2.5-32b:24] [--json out.json]
        [--tau bundled-x16=11.95@wide16 --tau reference-paper=28.35]
On a CPU it runs a tiny shape end to end (no figure means anything), so CI keeps it working.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shutil
import statistics
import tempfile
import threading
import time
import traceback
import warnings
from pathlib import Path
from typing import Callable, Iterator

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from engine import EngineConfig, SamplingConfig
from engine.config import MIN_DRAFT_PROB
from engine.build import engine_from_model
from engine.engine import Engine
from engine.loading import LoadedModel
from engine.offload import linear_tensors
from engine.substitute import FUSED, build_substitute
from engine.stats import Timer
from engine.tree import Tree, TreeShape
from profiles import estimate_plan
from profiles.fit import choose_node_budget

QWEN = dict(vocab_size=152064, tie_word_embeddings=False, max_position_embeddings=32768)
SHAPES = {
    "qwen2.5-7b": lambda: Qwen2Config(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                       num_attention_heads=28, num_key_value_heads=4, **QWEN),
    "qwen2.5-14b": lambda: Qwen2Config(hidden_size=5120, intermediate_size=13824, num_hidden_layers=48,
                                        num_attention_heads=40, num_key_value_heads=8, **QWEN),
    "qwen2.5-32b": lambda: Qwen2Config(hidden_size=5120, intermediate_size=27648, num_hidden_layers=64,
                                        num_attention_heads=40, num_key_value_heads=8, **QWEN),
    "llama-3.1-8b": lambda: LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                         tie_word_embeddings=False, max_position_embeddings=131072),
    "tiny": lambda: Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                                num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False),
}
DEFAULT_CASES = "qwen2.5-7b:8,llama-3.1-8b:8,qwen2.5-14b:12,qwen2.5-32b:24"
HBM_GBPS = 4800.0  # H200 datasheet: the floor of anything that reads its bytes once from HBM
VERIFY_NODES = (1, 97, 193, 289)
REFERENCE_TREE = (48, 6)  # depth x top-k: 289 nodes with the root
WIDTH = 6
FLOOR_TREE = "floor16"  # best-first, 16 per draft forward, the CPU's default floor (MIN_DRAFT_PROB)


class _NoText:
    """Timing runs need token ids only; random weights make no text worth decoding."""

    eos_token_id = None
    chat_template = None

    def decode(self, ids, skip_special_tokens=True) -> str:
        return ""


def random_model(config, dtype: torch.dtype, device: torch.device, shared_layers: bool = True) -> torch.nn.Module:
    """Random weights, filled on the device (seconds, not minutes). With `shared_layers` every
    decoder layer is the same module: host memory holds one layer, while the engine still packs and
    streams (or quantizes) one copy per layer, so every byte moves as it would for a real model."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    layers = model.model.layers
    for i in range(1, len(layers) if shared_layers else 0):
        layers[i] = layers[0]
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            if tensor.is_floating_point():
                tensor.copy_(torch.empty(tensor.shape, dtype=tensor.dtype, device=device).normal_(0, 0.02))
        model.model.rotary_emb.__init__(config)  # buffers recomputed, not random
    return model.eval()


def median_ms(fn: Callable[[], None], timer: Timer, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        with timer.span("x"):
            fn()
        times.append(timer.collect()["x"])
    return statistics.median(times)


def fitting_plan(config, vram_gb: float, method: str, max_length: int, nodes: int, compressed: bool = False,
                 draft_config: dict | None = None):
    """The memory model's plan with the most stream buffers (3, else 2, else 1) that fits."""
    for buffers in (3, 2, 1):
        plan = estimate_plan(config, int(vram_gb * 2**30), method, max_context=max_length, tree_nodes=nodes,
                             stream_buffers=buffers, compressed_streaming=compressed, draft_config=draft_config)
        if plan.fits:
            return plan, buffers
    raise RuntimeError(f"{method} does not fit {vram_gb} GB: {plan.reason}")


def build(model, config, args, device, method: str, vram_gb: float, draft_config: dict | None = None,
          **extra) -> tuple[Engine, object]:
    release_cached_memory()  # what earlier steps cached must not count against this cap
    if device.type == "cuda":
        plan, buffers = fitting_plan(config, vram_gb, method, args.max_length, 1 + 48 * 6 if method != "vanilla" else 1,
                                     args.compressed_streaming, draft_config)
        keep, estimated = plan.layers_on_gpu, plan.estimated_peak_bytes
        estimated_resident = plan.estimated_peak_bytes - plan.workspace_bytes
    else:
        keep, buffers, estimated, estimated_resident = 2, 2, None, None
    engine = engine_from_model(
        EngineConfig(method=method, device=str(device), vram_limit_gb=vram_gb if device.type == "cuda" else None,
                     keep_first_n_layers_on_gpu=keep, offload_slots=buffers, max_length=args.max_length,
                     emulate_offload=device.type == "cpu", row_invariant=args.row_invariant,
                     compressed_streaming=args.compressed_streaming, **extra),
        LoadedModel(model, _NoText(), args.shape, None),
    )
    # Where the memory model is off: what stays allocated (weights, caches, buffers) against its
    # estimate without the workspace, and the loading peak (quantization transients).
    memory = {"resident_gb": torch.cuda.memory_allocated(device) / 1e9, "build_peak_gb": torch.cuda.max_memory_allocated(device) / 1e9,
              "estimated_resident_gb": estimated_resident / 1e9} if device.type == "cuda" else {}
    return engine, {"stream_buffers": buffers, "estimated_peak_gb": estimated / 1e9 if estimated else None, **memory}


def _peak_line(result: dict, case: dict) -> str:
    """Peak against the estimate and the cap; on a GPU also what stays allocated after loading."""
    cap = case["vram_limit_gb"]
    line = (f"peak {result['peak_gpu_gb'] or 0:.2f} GB (estimate {result['estimated_peak_gb'] or 0:.2f}, "
            f"cap {cap * 2**30 / 1e9:.2f} = {cap} GiB)")
    if "resident_gb" in result:
        line += (f"; resident after loading {result['resident_gb']:.2f} GB (estimate without workspace "
                 f"{result['estimated_resident_gb']:.2f}), loading peak {result['build_peak_gb']:.2f} GB")
    return line


def bench_vanilla(model, config, args, device, vram_gb: float, prompt: list[int]) -> dict:
    engine, plan = build(model, config, args, device, "vanilla", vram_gb)
    engine.generate(prompt, SamplingConfig(max_new_tokens=4))  # warm-up
    gen = engine.generate(prompt, SamplingConfig(max_new_tokens=args.tokens))
    stats, info = gen.stats.as_dict(), engine.describe()
    close(engine)
    ms_per_token = stats["verify_ms"]  # one forward per token
    bound = stats["stream_bound_ms"]
    return {
        **plan, "layers_on_gpu": info["layers_on_gpu"], "layers_total": info["layers_total"],
        "row_invariant": info["row_invariant"], "offloaded_gb": info["offloaded_bytes"] / 1e9, "h2d_gbps": info["h2d_gbps"],
        "ms_per_token": ms_per_token, "tok_per_s": stats["tok_per_s"], "verify_ms": stats["verify_ms"],
        "transfer_ms": stats["transfer_ms"], "stream_bound_ms": bound,
        # The same layers' bf16 bytes over the same link: compressed streaming's bar to beat.
        "bf16_bound_ms": info["offloaded_weight_bytes"] / (info["h2d_gbps"] * 1e9) * 1e3 if info["h2d_gbps"] else None,
        "efficiency": bound / ms_per_token if bound else None,
        "peak_gpu_gb": (stats["peak_gpu_bytes"] or 0) / 1e9, "greedy_tokens": gen.token_ids,
    }


def bench_subspec(model, config, args, device, vram_gb: float, prompt: list[int], vanilla_tokens: list[int]) -> dict:
    depth, topk = args.depth, REFERENCE_TREE[1]
    engine, plan = build(model, config, args, device, "subspec_sd", vram_gb, max_depth=depth, topk_len=topk,
                         tree_policy="reference", substitute_kernel=args.substitute_kernel)
    target, drafter, info = engine.target, engine.drafter, engine.describe()
    bound = info["stream_bound_ms"]
    out: dict = {**plan, "layers_on_gpu": info["layers_on_gpu"], "substitute_gb": info["substitute_bytes"] / 1e9,
                 "stream_bound_ms": bound,
                 "bf16_bound_ms": info["offloaded_weight_bytes"] / (info["h2d_gbps"] * 1e9) * 1e3 if info["h2d_gbps"] else None, "draft_graphs": info["draft_graphs"],
                 "substitute_kernel": info["substitute_kernel"]}
    # Greedy tokens against vanilla's (bf16: a near-tie can flip between batch shapes; reported, not asserted).
    gen = engine.generate(prompt, SamplingConfig(max_new_tokens=args.tokens))
    out["greedy_match"] = _matching_prefix(gen.token_ids, vanilla_tokens)

    timer = Timer(device)
    ids = torch.tensor(prompt, device=device)
    target.transformer.prefill(target.stack, target.cache, ids, 512)
    verify = {}
    for nodes in VERIFY_NODES:
        tree = _reference_tree(nodes, config.vocab_size, target.cache.length, device)
        verify[nodes] = median_ms(lambda: _verify(target, tree), timer, args.repeats)
        target.stack.take_transfer_ms()
    out["verify_ms"] = verify
    out["profile_nodes"] = choose_node_budget(verify)

    tree = _reference_tree(1 + WIDTH * 8, config.vocab_size, target.cache.length, device)
    frontier = torch.arange(tree.size - WIDTH, tree.size, device=device)
    graphs, drafter.graphs = drafter.graphs, None
    out["draft_depth_eager_ms"] = median_ms(lambda: drafter.draft_step(tree, frontier), timer, args.repeats)
    drafter.graphs = graphs
    if graphs is not None:
        drafter.draft_step(tree, frontier)  # capture
        out["draft_depth_graph_ms"] = median_ms(lambda: drafter.draft_step(tree, frontier), timer, 20)
    if device.type == "cuda":
        out["draft_step_kernels"] = kernel_breakdown(lambda: drafter.draft_step(tree, frontier))
    if graphs is not None:  # the same step deep into the context: attention reads every cached slot
        out["long_context"] = args.max_length - tree.size - 8
        deep = _reference_tree(tree.size, config.vocab_size, out["long_context"], device)
        drafter.draft_step(deep, frontier)  # capture
        out["draft_depth_long_ms"] = median_ms(lambda: drafter.draft_step(deep, frontier), timer, 20)
    out["wide"] = {batch: {} for batch in args.draft_batches if batch != WIDTH}
    for batch, wide_out in out["wide"].items():  # wider draft forwards: what does each cost?
        if graphs is None:
            break
        wide = torch.arange(tree.size - batch, tree.size, device=device)
        drafter.draft_step(tree, wide)  # capture
        wide_out["draft_depth_graph_ms"] = median_ms(lambda: drafter.draft_step(tree, wide), timer, 20)
        wide_out["draft_step_kernels"] = kernel_breakdown(lambda: drafter.draft_step(tree, wide))
    head_gb = (model.lm_head.weight.nbytes + model.model.embed_tokens.weight[:WIDTH].nbytes) / 1e9
    out["draft_hbm_floor_ms"] = (out["substitute_gb"] + head_gb) / HBM_GBPS * 1e3

    path = [target.cache.length + 6 * i for i in range(8)]  # an 8-node path out of a 289-node tree
    out["compaction_ms"] = median_ms(lambda: _commit_and_forget(target.cache, path), timer, args.repeats)

    out["iteration_reference"] = _iterations(engine, prompt, "reference", depth, depth * topk, args)
    profile_depth = max(1, (out["profile_nodes"] - 1) // topk)
    out["profile_depth"] = profile_depth  # the profile's plan: best-first over the free node budget
    out["iteration_profile"] = _iterations(engine, prompt, "best_first", profile_depth, out["profile_nodes"] - 1, args)
    for batch, wide_out in out["wide"].items():  # the same budget, `batch` nodes per draft forward
        wide_out["iteration"] = _iterations(engine, prompt, "best_first", profile_depth,
                                            out["profile_nodes"] - 1, args, batch)
    # The floor's host read per draft forward (the CPU's default floor), at the engine's default
    # width (its iteration: a random draft's tree; what the read costs shows in ms per forward).
    out["iteration_floor"] = _iterations(engine, prompt, "best_first", profile_depth, out["profile_nodes"] - 1, args,
                                         EngineConfig.draft_batch, MIN_DRAFT_PROB)
    target.transformer.prefill(target.stack, target.cache, ids, 512)
    out["draft_alone"] = {batch: _draft_alone(engine, prompt[-1], profile_depth, out["profile_nodes"] - 1, batch, args)
                          for batch in (WIDTH, *out["wide"])}
    out["peak_gpu_gb"] = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
    close(engine)
    return out


def bench_eagle(model, config, args, device, vram_gb: float, prompt: list[int], vanilla_tokens: list[int],
                tree_nodes: int) -> dict:
    """eagle_sd with a random head of this shape (one bf16 decoder layer + fc, resident): its
    offloaded iteration with the preset's tree (depth 8 x top-10) and a best-first tree of
    `tree_nodes` (the subspec case's free budget). Random weights say nothing of tau."""
    from safetensors.torch import save_file
    from train_eagle import Head

    folder = Path(tempfile.mkdtemp(prefix="eagle-head-"))
    head = Head(config, torch.nn.Embedding(1, 1), torch.empty(0), torch.empty(0)).to(torch.bfloat16)
    head_config = {**head.config.to_dict(), "architectures": ["EagleHead"]}
    save_file(head.eagle_state(), folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(head_config))
    del head
    engine, plan = build(model, config, args, device, "eagle_sd", vram_gb, draft_config=head_config,
                         draft_model_path=str(folder), tree_policy="reference", max_depth=8, topk_len=10)
    info = engine.describe()
    out: dict = {**plan, "layers_on_gpu": info["layers_on_gpu"], "stream_bound_ms": info["stream_bound_ms"]}
    gen = engine.generate(prompt, SamplingConfig(max_new_tokens=args.tokens))
    out["greedy_match"] = _matching_prefix(gen.token_ids, vanilla_tokens)
    out["iteration_preset"] = _iterations(engine, prompt, "reference", 8, 80, args)
    engine.config.topk_len = 6
    out["iteration_best_first"] = _iterations(engine, prompt, "best_first", max(1, (tree_nodes - 1) // 6),
                                              tree_nodes - 1, args, 16)
    out["peak_gpu_gb"] = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
    close(engine)
    shutil.rmtree(folder, ignore_errors=True)
    return out


def report_eagle(case: dict) -> None:
    e = case["eagle"]
    bound = e["stream_bound_ms"] or float("nan")
    print(f"eagle_sd (random head): {e['layers_on_gpu']} bf16 layers resident, {e['stream_buffers']} buffers, "
          f"bound {bound:.1f} ms; greedy tokens equal to vanilla: {e['greedy_match']}")
    for name, it in (("preset tree", e["iteration_preset"]), ("best-first tree", e["iteration_best_first"])):
        print(f"  {name} ({it['policy']}, {it['draft_batch']} per draft forward), depth {it['depth']} ({it['nodes']:.0f} "
              f"nodes): iteration {it['iteration_ms']:.1f} ms = {it['iteration_ms'] / bound:.2f}x bound [draft "
              f"{it['draft_ms']:.1f} ({it['draft_forwards']:.0f} forwards, {it['draft_ms_per_forward']:.2f} ms each), "
              f"verify {it['verify_ms']:.1f}, host {it['host_ms']:.1f}]")
    print("  " + _peak_line(e, case))


def _draft_alone(engine: Engine, root: int, depth: int, budget: int, batch: int, args) -> dict:
    """The profile's best-first draft with no verification around it: its GPU time, how long the
    host took to issue it, and its kernels (the graph replays plus the tree's bookkeeping)."""
    engine.config.tree_policy, engine.config.draft_batch, engine.config.min_draft_prob = "best_first", batch, 0.0
    tree, shape = Tree(budget + 1, engine.target.transformer.device), TreeShape(depth, budget)

    def draft() -> None:
        tree.reset(root, engine.target.cache.length)
        engine.drafter.draft(tree, shape)

    draft()  # graphs of new widths are captured here
    timer, gpu_ms, issue_ms = Timer(engine.target.transformer.device), [], []
    for _ in range(args.repeats):
        with timer.span("draft"):
            started = time.perf_counter()
            draft()
            issue_ms.append((time.perf_counter() - started) * 1e3)
        gpu_ms.append(timer.collect()["draft"])
    out = {"draft_ms": statistics.median(gpu_ms), "host_issue_ms": statistics.median(issue_ms)}
    if engine.target.transformer.device.type == "cuda":
        out["kernels"] = kernel_breakdown(draft, steps=1)
    return out


def kernel_breakdown(step: Callable[[], None], steps: int = 3) -> dict:
    """GPU kernels of a draft step (torch.profiler): how many, how long the GPU is busy, and the
    costliest by name. Busy time below the step's wall time = gaps between kernels."""
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                step()
            torch.cuda.synchronize()
    except Exception as err:  # noqa: BLE001 - a profiler-less machine still gets the other figures
        return {"error": repr(err)[:200]}
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        by_name.setdefault(e.name[:90], []).append(e.time_range.elapsed_us() / 1e3)
    top = sorted(by_name.items(), key=lambda item: -sum(item[1]))[:15]
    return {"kernels_per_step": len(kernels) / steps,
            "busy_ms_per_step": sum(sum(v) for v in by_name.values()) / steps,
            "top": [[name, round(sum(v) / steps, 4), len(v) // steps] for name, v in top]}


def _iterations(engine: Engine, prompt: list[int], policy: str, depth: int, budget: int, args,
                batch: int | None = None, min_draft_prob: float = 0.0) -> dict:
    """Median split of real iterations (the first two capture graphs and are left out). Best-first
    without a floor by default: random weights' draft probabilities would shape a floored tree
    unlike a real model's (the floor's own row times its forwards, whatever their number)."""
    # The drafter reads the same config object.
    engine.config.tree_policy, engine.config.max_depth, engine.config.node_budget = policy, depth, budget
    engine.config.draft_batch, engine.config.min_draft_prob = batch, min_draft_prob
    cancel, seen = threading.Event(), []
    watch = engine.target.transformer.device.type == "cuda"

    def record(it) -> None:
        seen.append(it)
        if len(seen) == 2 and watch:  # the steady iterations run under torch's sync debug mode
            torch.cuda.set_sync_debug_mode("warn")
        if len(seen) >= 2 + args.iterations:
            cancel.set()

    retries = _alloc_retries()
    with _host_waits() as waits:
        engine.generate(prompt, SamplingConfig(max_new_tokens=4096), on_iteration=record, cancel=cancel)
    retries = _alloc_retries() - retries
    steady = seen[2:]
    forwards_per_iteration = statistics.mean(it.draft_forwards for it in steady)

    def med(name: str) -> float:
        return statistics.median(getattr(it, name) or 0.0 for it in steady)

    draft, verify, total = med("draft_ms"), med("verify_ms"), med("iteration_ms")
    return {"policy": policy, "draft_batch": batch or engine.config.topk_len, "depth": depth,
            "min_draft_prob": min_draft_prob,
            "nodes": statistics.median(it.tree_nodes for it in steady), "draft_ms": draft,
            "draft_forwards": forwards_per_iteration, "draft_ms_per_forward": draft / forwards_per_iteration,
            "verify_ms": verify, "transfer_ms": med("transfer_ms"),
            "iteration_ms": total, "host_ms": total - draft - verify,
            "tau_random_weights": statistics.mean(it.emitted for it in steady),
            "host_ms_each": [round((it.iteration_ms or 0) - (it.draft_ms or 0) - (it.verify_ms or 0), 1) for it in seen],
            "draft_ms_each": [round(it.draft_ms or 0, 1) for it in seen],
            "allocator_retries": retries,
            "host_waits_per_iteration": {site: n / len(steady) for site, n in waits.items()} if watch else None}


@contextlib.contextmanager
def _host_waits() -> Iterator[dict[str, int]]:
    """Where the host waits for the GPU: the engine line of every synchronizing call that torch's
    sync debug mode reports while it is on (record() turns it on). The steady state should show one
    per iteration, the tree's transfer to the host (Tree.host_view); a Python number assigned into a
    device tensor also waits (it is copied from pageable memory), which no explicit sync shows."""
    sites: dict[str, int] = {}

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if "synchronizing CUDA operation" not in str(message):
            return
        frames = [f for f in traceback.extract_stack()[:-1] if f"{os.sep}engine{os.sep}" in f.filename]
        site = f"{os.path.basename(frames[-1].filename)}:{frames[-1].lineno}" if frames else "outside the engine"
        sites[site] = sites.get(site, 0) + 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show  # catch_warnings puts the original back
        try:
            yield sites
        finally:
            if torch.cuda.is_available():
                torch.cuda.set_sync_debug_mode(0)


def _alloc_retries() -> int:
    """Times the caching allocator hit the memory cap, freed its cache and retried (slow, syncs)."""
    return torch.cuda.memory_stats().get("num_alloc_retries", 0) if torch.cuda.is_available() else 0


def _verify(target, tree: Tree) -> None:
    idx = torch.arange(tree.size, device=tree.tokens.device)
    target.transformer.forward(target.stack, target.cache, tree.tokens[: tree.size], tree.positions(idx),
                               tree.slots(idx), tree.mask(idx), target.cache.length + tree.size)


def _commit_and_forget(cache, path: list[int]) -> None:
    length = cache.length
    cache.commit(path)
    cache.truncate(length)


def _matching_prefix(a: list[int], b: list[int]) -> str:
    same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"{same}/{len(b)}"


def _reference_tree(nodes: int, vocab: int, prefix_len: int, device: torch.device) -> Tree:
    """Reference-shaped: a root then levels of 6 nodes hanging off the previous level."""
    tree = Tree(nodes, device)
    tree.reset(1, prefix_len)
    frontier = torch.zeros(1, dtype=torch.long, device=device)
    while tree.size < nodes:
        width = min(WIDTH, nodes - tree.size)
        parents = frontier[torch.randint(0, frontier.numel(), (width,), device=device)]
        frontier = tree.add(parents, torch.randint(0, vocab, (width,), device=device), torch.zeros(width, device=device))
    return tree


def kernels_per_layer(model, device: torch.device, repeats: int) -> dict:
    """One layer's linears at 6 tokens, eager and inside a CUDA graph, for each substitute kernel
    (engine.substitute: the engine's own conversion of the same HQQ weights) and for plain bf16.
    Each 4-bit kernel's outputs are compared with the dequantized weights' ("dense")."""
    if device.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(1.0)  # the last case's cap is not this one's
    layer = linear_tensors(model.model.layers[0])
    on_device = [{name: t.to(device) for name, t in layer.items()}]
    variants = {"bf16 (7 linears)": on_device[0]}
    out: dict = {}
    for kernel in ("dense", "triton", "tinygemm", "gemlite"):
        try:
            variants[f"{kernel} 4-bit"] = build_substitute(on_device, device, torch.bfloat16, kernel=kernel).layers[0]
        except Exception as err:  # noqa: BLE001 - report, keep measuring the others
            out[f"{kernel}_error"] = repr(err)[:200]
    inputs = {width: torch.randn(WIDTH, width, dtype=torch.bfloat16, device=device)
              for width in {t.shape[1] for name, t in layer.items() if not name.endswith(".bias")}}
    linears = {name: list(weights) for name, weights in variants.items()}

    def outputs(weights: dict) -> dict[str, torch.Tensor]:
        return {name: _apply(weights, name, inputs) for name in weights if not name.endswith(".bias")}

    def as_fused(got: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: got[name] if name in got else torch.cat([got[part] for part in FUSED[name]], -1)
                for name in ("qkv_proj", "gate_up_proj", "o_proj", "down_proj")}

    dense = outputs(variants["dense 4-bit"]) if "dense 4-bit" in variants else None
    for name, weights in variants.items():
        def step(weights=weights) -> None:
            outputs(weights)

        try:
            if dense is not None and "4-bit" in name:
                got, want = as_fused(outputs(weights)), as_fused(dense)
                out[f"{name} max relative deviation from dense"] = max(
                    float((got[k].float() - want[k].float()).abs().max() / want[k].float().abs().max()) for k in want)
            out[f"{name} linears"] = len(linears[name]) - sum(n.endswith(".bias") for n in linears[name])
            out[f"{name} eager ms"] = _bench_eager(step, repeats)
            out[f"{name} graph ms"] = graph_ms(step, repeats * 4)
        except Exception as err:  # noqa: BLE001
            out[f"{name} error"] = repr(err)[:200]
    params = sum(t.numel() for n, t in layer.items() if not n.endswith(".bias"))
    out["layer_4bit_hbm_floor_ms"] = params * (0.5 + 4 / 64) / (HBM_GBPS * 1e9) * 1e3  # + bf16 scale, offset per 64
    return out


def _apply(weights: dict, name: str, inputs: dict[int, torch.Tensor]) -> torch.Tensor:
    w = weights[name]
    width = w.shape[1] if isinstance(w, torch.Tensor) else w.in_features
    x = inputs[width]
    return torch.nn.functional.linear(x, w, weights.get(f"{name}.bias")) if isinstance(w, torch.Tensor) else w(x)


def _bench_eager(step: Callable[[], None], repeats: int) -> float:
    timer = Timer(torch.device("cuda"))
    step()
    return median_ms(step, timer, repeats * 4)


def graph_ms(step: Callable[[], None], replays: int) -> float:
    """Median ms of `step` captured in one CUDA graph (after a warm-up on a side stream) and replayed."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    timer = Timer(torch.device("cuda"))
    return median_ms(graph.replay, timer, replays)


def close(engine: Engine) -> None:
    engine.close()
    release_cached_memory()


def release_cached_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def report_vanilla(case: dict) -> None:
    v = case["vanilla"]
    print(f"\n== {case['shape']} at {case['vram_limit_gb']} GB ==")
    if v["stream_bound_ms"]:
        print(f"pinned H2D {v['h2d_gbps']:.1f} GB/s")
        print(f"vanilla: {v['layers_on_gpu']}/{v['layers_total']} layers on GPU, {v['stream_buffers']} buffers, "
              f"{v['offloaded_gb']:.2f} GB streamed per token, bound {v['stream_bound_ms']:.1f} ms"
              + (f" (the same layers as bf16: {v['bf16_bound_ms']:.1f} ms)" if v["bf16_bound_ms"] != v["stream_bound_ms"] else "")
              + f", row-invariant target {'on' if v['row_invariant'] else 'off'}")
        print(f"  {v['ms_per_token']:.1f} ms/token = {v['tok_per_s']:.2f} tok/s, efficiency {v['efficiency']:.3f} "
              "(bound/measured); " + _peak_line(v, case))


def _tau(value: str) -> tuple[float, str | None]:
    """'11.95@wide16' -> (11.95, 'wide16'); '28.35' -> (28.35, None): every tree."""
    tau, _, tree = value.partition("@")
    return float(tau), tree or None


def report_subspec(case: dict, taus: dict[str, tuple[float, str | None]], floor_forwards: float | None = None) -> None:
    v, s = case["vanilla"], case["subspec"]
    bound = s["stream_bound_ms"] or float("nan")
    print(f"subspec: {s['layers_on_gpu']} bf16 layers resident, {s['stream_buffers']} buffers, "
          f"substitute {s['substitute_gb']:.2f} GB ({s['substitute_kernel']}), bound {bound:.1f} ms"
          + (f" (as bf16 {s['bf16_bound_ms']:.1f})" if s["bf16_bound_ms"] != s["stream_bound_ms"] else "") + ", "
          f"draft steps: {s['draft_graphs']}")
    print("  verify: " + ", ".join(f"{n} nodes {ms:.1f} ms ({ms / bound:.3f}x)" for n, ms in s["verify_ms"].items()))
    graph = s.get("draft_depth_graph_ms")
    long = (f", {s['draft_depth_long_ms']:.2f} ms {s['long_context']} slots into the context"
            if "draft_depth_long_ms" in s else "")
    print(f"  one draft depth (6 tokens): eager {s['draft_depth_eager_ms']:.2f} ms"
          + (f", CUDA graph {graph:.2f} ms" if graph else "") + long + f"; HBM floor {s['draft_hbm_floor_ms']:.2f} ms")
    _print_kernels("draft step on the GPU", s.get("draft_step_kernels"))
    print(f"  KV compaction (8-node path): {s['compaction_ms']:.3f} ms; greedy tokens equal to vanilla: {s['greedy_match']}")
    for batch, wide in s["wide"].items():
        if "draft_depth_graph_ms" in wide:
            print(f"  one draft forward of {batch} tokens (CUDA graph): {wide['draft_depth_graph_ms']:.2f} ms")
            _print_kernels(f"{batch}-token draft step on the GPU", wide.get("draft_step_kernels"))
    iterations = [("reference", s["iteration_reference"]), ("profile", s["iteration_profile"])]
    iterations += [(f"wide{batch}", wide["iteration"]) for batch, wide in s["wide"].items()]
    iterations += [(FLOOR_TREE, s["iteration_floor"])] if "iteration_floor" in s else []
    for tree_name, it in iterations:
        print(f"  {tree_name} tree ({it['policy']}, {it['draft_batch']} per draft forward), depth {it['depth']} ({it['nodes']:.0f} nodes): iteration {it['iteration_ms']:.1f} ms "
              f"= {it['iteration_ms'] / bound:.2f}x bound [draft {it['draft_ms']:.1f} ({it['draft_forwards']:.0f} forwards, {it['draft_ms_per_forward']:.2f} ms each), "
              f"verify {it['verify_ms']:.1f}, transfer {it['transfer_ms']:.1f}, host {it['host_ms']:.1f}]; "
              f"allocator retries {it['allocator_retries']}")
        if it["host_waits_per_iteration"] is not None:
            print("    host waits per iteration: " + (", ".join(
                f"{site} x{n:.1f}" for site, n in it["host_waits_per_iteration"].items()) or "none"))
        iteration_ms = it["iteration_ms"]
        if tree_name == FLOOR_TREE and floor_forwards:
            # A real model's floored tree: the profile's verification, the forwards it drafts.
            iteration_ms = s["iteration_profile"]["verify_ms"] + floor_forwards * it["draft_ms_per_forward"] + it["host_ms"]
            print(f"    with {floor_forwards} draft forwards per verification (a real model's): iteration "
                  f"{iteration_ms:.1f} ms = {iteration_ms / bound:.2f}x bound")
        for tau_name, (tau, tree) in taus.items():
            if tree not in (None, tree_name):  # a tau measured for another tree says nothing here
                continue
            print(f"    with tau {tau} ({tau_name}): {tau / iteration_ms * 1e3:.2f} tok/s "
                  f"vs vanilla {v['tok_per_s']:.2f} tok/s measured in this run")
    for batch, alone in s["draft_alone"].items():
        kernels = alone.get("kernels") or {}
        busy = (f" (GPU busy {kernels['busy_ms_per_step']:.1f} ms, {kernels['kernels_per_step']:.0f} kernels)"
                if "busy_ms_per_step" in kernels else "")
        print(f"  the profile tree's draft alone, {batch} per forward: {alone['draft_ms']:.1f} ms{busy}, "
              f"issued by the host in {alone['host_issue_ms']:.1f} ms")
    print("  " + _peak_line(s, case))


def _print_kernels(what: str, kernels: dict | None) -> None:
    if kernels and "error" not in kernels:
        print(f"  {what}: {kernels['kernels_per_step']:.0f} kernels, busy {kernels['busy_ms_per_step']:.2f} ms; "
              "costliest: " + "; ".join(f"{name[:50]} {ms:.3f} ms x{n}" for name, ms, n in kernels["top"][:8]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=DEFAULT_CASES, help="shape:GB,... (shapes: %s)" % ", ".join(SHAPES))
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=4, help="steady iterations timed per tree")
    parser.add_argument("--tau", action="append", default=[],
                        help="name=value[@tree]: report tok/s at this tau (for that tree only: reference, profile, "
                             "wide16, wide32, floor16)")
    parser.add_argument("--floor-forwards", type=float,
                        help=f"draft forwards per verification of the {FLOOR_TREE} tree on a real model "
                             "(benchmarks/tau_bundled.py): its iteration is projected from them")
    parser.add_argument("--depth", type=int, default=REFERENCE_TREE[0], help="reference tree depth (top-6)")
    parser.add_argument("--draft-batch", default="16,32", help="best-first nodes per draft forward, also timed (a list)")
    parser.add_argument("--skip-kernels", action="store_true")
    parser.add_argument("--kernels-only", action="store_true", help="only the per-layer kernel comparison")
    parser.add_argument("--substitute-kernel", default="auto", help="auto, triton, tinygemm, gemlite, hqq, dense")
    parser.add_argument("--row-invariant", action=argparse.BooleanOptionalAction, default=None,
                        help="EngineConfig.row_invariant for every engine (default: the engine's, on in 16-bit dtypes)")
    parser.add_argument("--compressed-streaming", action="store_true",
                        help="stream offloaded layers compressed (engine.compress; the memory model's plan "
                             "counts the staging buffer)")
    parser.add_argument("--methods", default="vanilla,subspec_sd",
                        help="vanilla (always: the baseline), subspec_sd, eagle_sd (a random head of the shape)")
    parser.add_argument("--json")
    args = parser.parse_args()
    args.methods = set(args.methods.split(","))
    args.draft_batches = [int(b) for b in args.draft_batch.split(",")]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    taus = {name: _tau(value) for name, value in (t.split("=", 1) for t in args.tau)}
    trees = {"reference", "profile", FLOOR_TREE} | {f"wide{batch}" for batch in args.draft_batches if batch != WIDTH}
    for name, (_, tree) in taus.items():
        if tree is not None and tree not in trees:
            parser.error(f"--tau {name}: no tree {tree!r} in this run (trees: {', '.join(sorted(trees))})")
    cases = [(c.split(":")[0], float(c.split(":")[1])) for c in args.cases.split(",")]
    if device.type == "cpu":
        cases, args.repeats, args.iterations, args.skip_kernels = [("tiny", 0.0)], 1, 1, True
        args.depth, args.tokens = 4, 8
    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "row_invariant": args.row_invariant, "cases": []}
    for shape, vram_gb in cases:
        args.shape = shape
        config = SHAPES[shape]()
        started = time.perf_counter()
        model = random_model(config, torch.bfloat16 if device.type == "cuda" else torch.float32, device)
        print(f"built random {shape} in {time.perf_counter() - started:.1f} s", flush=True)
        prompt = torch.randint(0, config.vocab_size, (64,)).tolist()
        case = {"shape": shape, "vram_limit_gb": vram_gb}
        if args.kernels_only:
            results["kernels_per_layer"] = kernels_per_layer(model, device, args.repeats)
            print("one layer's linears at 6 tokens:", json.dumps(results["kernels_per_layer"], indent=1), flush=True)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(results, f, indent=2)
            break
        try:
            case["vanilla"] = bench_vanilla(model, config, args, device, vram_gb, prompt)
            report_vanilla(case)
            if "subspec_sd" in args.methods:
                case["subspec"] = bench_subspec(model, config, args, device, vram_gb, prompt,
                                                case["vanilla"]["greedy_tokens"])
                report_subspec(case, taus, args.floor_forwards)
            if "eagle_sd" in args.methods:
                nodes = case["subspec"]["profile_nodes"] if "subspec" in case else 1 + 48 * 6
                case["eagle"] = bench_eagle(model, config, args, device, vram_gb, prompt,
                                            case["vanilla"]["greedy_tokens"], nodes)
                report_eagle(case)
        except Exception as err:  # noqa: BLE001 - one case failing must not lose the others
            case["error"] = repr(err)[:500]
            if device.type == "cuda":  # where the memory was when it failed
                case["error_memory_gb"] = {"peak": torch.cuda.max_memory_allocated(device) / 1e9,
                                           "allocated": torch.cuda.memory_allocated(device) / 1e9,
                                           "reserved": torch.cuda.memory_reserved(device) / 1e9}
            print(f"{shape} failed: {case['error']} {case.get('error_memory_gb', '')}", flush=True)
        results["cases"].append(case)
        if not args.skip_kernels and len(results["cases"]) == 1:
            # After the case: a gemlite import and extra graphs must not touch the case's figures.
            results["kernels_per_layer"] = kernels_per_layer(model, device, args.repeats)
            print("one layer's linears at 6 tokens:", json.dumps(results["kernels_per_layer"], indent=1), flush=True)
        del model
        gc.collect()
        if args.json:  # after every case: a run cut short keeps what it measured
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
