"""A long prompt's prefill against one stream of the offloaded layers (issue 21: time to first token).

The prefill runs layer by layer over all its chunks (engine/model.py), so its weights cross PCIe
once; what it then costs above one stream is compute that the copies do not hide. For each prompt
length: the prefill with the plan's resident layers and stream buffers under the VRAM cap, the
same placement without the cap (what the allocator's retries near the cap cost), the prefill with
every layer resident (compute alone, no cap), and one stream (offloaded bytes / measured pinned
bandwidth, the bound). Row-invariant target (the product's default) and plain,
and the GPU kernels of the resident prefill by name.

    python benchmarks/prefill_gpu.py --shape qwen2.5-7b --vram-limit-gb 8 --tokens 512,1500,4000

On a CPU (CI) the tiny shape runs with emulated offload: no figure means anything there, it keeps
the script working.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.offload_gpu import SHAPES, _NoText, close, fitting_plan, kernel_breakdown, random_model  # noqa: E402
from engine import EngineConfig  # noqa: E402
from engine.build import engine_from_model  # noqa: E402
from engine.engine import Engine  # noqa: E402
from engine.loading import LoadedModel  # noqa: E402


def prefill_once(engine: Engine, tokens: int) -> float:
    """Wall ms of a `tokens`-token prefill from an empty cache (synchronized)."""
    target = engine.target
    device = target.transformer.device
    prompt = torch.randint(10, min(1000, target.transformer.vocab_size), (tokens,), device=device)
    torch.cuda.synchronize(device) if device.type == "cuda" else None
    started = time.perf_counter()
    target.transformer.prefill(target.stack, target.cache, prompt, engine.config.prefill_chunk, 0, target.ops)
    torch.cuda.synchronize(device) if device.type == "cuda" else None
    target.transfer_ms()  # drain the copy timings
    return (time.perf_counter() - started) * 1e3


def prefill_ms(engine: Engine, tokens: int, repeats: int) -> float:
    """Median of `repeats` prefills, after one that compiles the shapes it meets."""
    return statistics.median([prefill_once(engine, tokens) for _ in range(repeats + 1)][1:])


def alloc_retries() -> int:
    """cudaMalloc retries so far (the allocator freeing its cache near the cap; 0 on a CPU)."""
    return torch.cuda.memory_stats().get("num_alloc_retries", 0) if torch.cuda.is_available() else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    gpu = torch.cuda.is_available()
    parser.add_argument("--shape", choices=SHAPES, default="qwen2.5-7b" if gpu else "tiny")
    parser.add_argument("--vram-limit-gb", type=float, default=8.0)
    parser.add_argument("--tokens", default="512,1500,4000" if gpu else "40,300")
    parser.add_argument("--max-length", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--placements", default="offloaded,uncapped,resident")
    parser.add_argument("--prefill-chunk", type=int, default=EngineConfig.prefill_chunk)
    parser.add_argument("--row-invariant", default="on,off", help="on, off or both (on,off)")
    parser.add_argument("--json")
    args = parser.parse_args()
    device = torch.device("cuda" if gpu else "cpu")
    config = SHAPES[args.shape]()
    model = random_model(config, torch.bfloat16, device)
    lengths = [int(t) for t in args.tokens.split(",")]
    if gpu:
        layers_on_gpu, buffers = (lambda plan, buffers: (plan.layers_on_gpu, buffers))(
            *fitting_plan(config, args.vram_limit_gb, "vanilla", args.max_length, 1))
    else:
        layers_on_gpu, buffers = 2, 2
    report: dict = {"shape": args.shape, "vram_limit_gb": args.vram_limit_gb,
                    "device": torch.cuda.get_device_name() if gpu else "cpu",
                    "layers_on_gpu": layers_on_gpu, "stream_buffers": buffers, "cases": []}
    for row_invariant in [flag == "on" for flag in args.row_invariant.split(",")]:
        for placement in args.placements.split(","):
            offloaded = placement != "resident"
            if gpu:
                torch.cuda.set_per_process_memory_fraction(1.0)  # an earlier case's cap is not this one's
            engine = engine_from_model(
                EngineConfig(method="vanilla", device=str(device), max_length=args.max_length, row_invariant=row_invariant,
                             vram_limit_gb=args.vram_limit_gb if placement == "offloaded" and gpu else None,
                             keep_first_n_layers_on_gpu=layers_on_gpu if offloaded else None,
                             emulate_offload=offloaded and not gpu, offload_slots=buffers,
                             prefill_chunk=args.prefill_chunk),
                LoadedModel(model, _NoText(), args.shape, None))
            bound = engine.describe().get("stream_bound_ms") if offloaded else None
            for tokens in lengths:
                retries = alloc_retries()
                ms = prefill_ms(engine, tokens, args.repeats)
                case = {"row_invariant": row_invariant, "placement": placement, "tokens": tokens, "prefill_ms": ms,
                        "stream_bound_ms": bound, "peak_gb": torch.cuda.max_memory_allocated() / 1e9 if gpu else 0.0,
                        "alloc_retries": alloc_retries() - retries}
                if not offloaded and tokens == max(lengths):
                    case["kernels"] = kernel_breakdown(lambda: prefill_once(engine, tokens), steps=1)
                report["cases"].append(case)
                against = f", {ms / bound:.2f}x one stream ({bound:.1f} ms)" if bound else " (no stream bound)"
                print(f"{'row-invariant' if row_invariant else 'plain':13s} {placement:9s} {tokens:5d} tokens: "
                      f"prefill {ms:7.1f} ms{against}, peak {case['peak_gb']:.2f} GB, "
                      f"{case['alloc_retries']} allocator retries", flush=True)
                for name, ms_total, count in case.get("kernels", {}).get("top", [])[:10]:
                    print(f"    {ms_total:8.2f} ms  x{count:<5d} {name}")
            close(engine)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
