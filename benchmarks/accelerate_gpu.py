"""transformers + accelerate offloading as a user gets it, next to this engine's plain offloaded
decoding of the same weights under the same VRAM cap, in one process on one GPU (the README's
headline table).

accelerate's `device_map="auto"` fills the GPU's `max_memory` in module order and leaves the rest
on the CPU; each CPU module is copied to the GPU when it runs (pageable memory, one module at a
time, nothing prefetched). Both sides share one bound: the bytes kept on the CPU over the pinned
link, measured in the same run.

    python benchmarks/accelerate_gpu.py --shape qwen2.5-7b --vram-limit-gb 8 [--tokens 8] [--json r.json]

The model has random weights of the real shape, every layer its own tensors (accelerate moves each
module it offloads). On a CPU it runs the tiny shape without offloading, to keep the script working.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from offload_gpu import SHAPES, bench_vanilla, random_model, release_cached_memory  # noqa: E402

from engine.offload import measure_h2d_gbps  # noqa: E402


def dispatch(model: torch.nn.Module, weights_gib: float) -> dict:
    """accelerate's automatic placement with `weights_gib` for weights on GPU 0, the rest on the CPU."""
    from accelerate import dispatch_model, infer_auto_device_map

    device_map = infer_auto_device_map(model, max_memory={0: f"{weights_gib}GiB", "cpu": "400GiB"},
                                       no_split_module_classes=model._no_split_modules)
    dispatch_model(model, device_map=device_map, main_device=0)
    on_cpu = [name for name, where in device_map.items() if where == "cpu"]
    cpu_bytes = sum(p.numel() * p.element_size() for name, p in model.named_parameters()
                    if any(name == m or name.startswith(m + ".") for m in on_cpu))
    return {"modules_on_cpu": on_cpu, "offloaded_gb": cpu_bytes / 1e9}


def generate_s(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int) -> tuple[float, list[int]]:
    if prompt.is_cuda:
        torch.cuda.synchronize()
    started = time.perf_counter()
    out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=0)
    if prompt.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - started, out[0, prompt.shape[1]:].tolist()


def bench_accelerate(model, prompt: list[int], args, device: torch.device) -> dict:
    """ms per decoded token: generating 1 + tokens against generating 1 (the prefill), median of repeats."""
    if device.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(
            min(1.0, args.vram_limit_gb * 2**30 / torch.cuda.get_device_properties(device).total_memory), device)
        placement = dispatch(model, args.vram_limit_gb - args.reserve_gb)
        torch.cuda.reset_peak_memory_stats()
    else:
        placement = {"modules_on_cpu": [], "offloaded_gb": 0.0}
    ids = torch.tensor([prompt], device=device)
    generate_s(model, ids, 2)  # warm-up
    per_token, tokens = [], []
    for _ in range(args.repeats):
        prefill, _ = generate_s(model, ids, 1)
        total, tokens = generate_s(model, ids, 1 + args.tokens)
        per_token.append((total - prefill) / args.tokens * 1000)
    peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
    return {**placement, "ms_per_token": statistics.median(per_token), "peak_gpu_gb": peak, "greedy_tokens": tokens}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=SHAPES, default="qwen2.5-7b")
    parser.add_argument("--vram-limit-gb", type=float, default=8.0)
    parser.add_argument("--reserve-gb", type=float, default=1.0,
                        help="of the cap, left out of accelerate's max_memory for what it moves and computes")
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cpu":
        args.shape, args.tokens, args.repeats = "tiny", 2, 1
    args.row_invariant, args.compressed_streaming = None, False  # the engine's defaults
    config = SHAPES[args.shape]()
    # Every layer its own tensors: accelerate moves each module it offloads.
    model = random_model(config, torch.bfloat16 if device.type == "cuda" else torch.float32, device,
                         shared_layers=False)
    prompt = torch.randint(0, config.vocab_size, (64,), generator=torch.Generator().manual_seed(0)).tolist()
    h2d = measure_h2d_gbps(device)
    report: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "shape": args.shape,
                    "vram_limit_gb": args.vram_limit_gb, "h2d_gbps": h2d}

    ours = bench_vanilla(model, config, args, device, args.vram_limit_gb, prompt)
    release_cached_memory()
    theirs = bench_accelerate(model, prompt, args, device)
    theirs["stream_bound_ms"] = theirs["offloaded_gb"] / h2d * 1000 if h2d else None
    same = sum(a == b for a, b in zip(ours["greedy_tokens"], theirs["greedy_tokens"]))
    report.update(engine_vanilla=ours, accelerate=theirs, same_first_tokens=same)

    print(f"{report['device']}, {args.shape} under {args.vram_limit_gb} GiB, pinned H2D "
          f"{h2d or 0:.1f} GB/s")
    print(f"  this engine, vanilla: {ours['layers_on_gpu']}/{ours['layers_total']} layers on the GPU, "
          f"{ours['offloaded_gb']:.2f} GB streamed per token, {ours['ms_per_token']:.1f} ms/token "
          f"(bound {ours['stream_bound_ms'] or 0:.1f}), peak {ours['peak_gpu_gb']:.2f} GB")
    print(f"  transformers + accelerate: {len(theirs['modules_on_cpu'])} modules on the CPU "
          f"({', '.join(theirs['modules_on_cpu'][:3])}{', ...' if len(theirs['modules_on_cpu']) > 3 else ''}), "
          f"{theirs['offloaded_gb']:.2f} GB moved per token, {theirs['ms_per_token']:.1f} ms/token "
          f"(bound {theirs['stream_bound_ms'] or 0:.1f}), peak {theirs['peak_gpu_gb'] or 0:.2f} GB")
    if theirs["ms_per_token"]:
        print(f"  accelerate / this engine: {theirs['ms_per_token'] / ours['ms_per_token']:.2f}x per token; "
              f"first {same} of {min(len(ours['greedy_tokens']), len(theirs['greedy_tokens']))} greedy tokens the same")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
