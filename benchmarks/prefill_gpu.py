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


def prefill_ms(engine: Engine, tokens: int, repeats: int) -> tuple[float, float]:
    """The first prefill (it compiles the shapes it meets) and the median of `repeats` after it."""
    first, *rest = [prefill_once(engine, tokens) for _ in range(repeats + 1)]
    return first, statistics.median(rest)


class TimedStack:
    """A LayerStack that also records, per layer, when the host issued it (perf_counter seconds)
    and when the GPU started it (after its copy and the layer before) and finished it (events)."""

    def __init__(self, stack) -> None:
        self.stack = stack
        self.num_layers = stack.num_layers
        self.layers: list[dict] = []

    def weights(self, i: int):
        weights = self.stack.weights(i)  # the compute stream now waits for the layer's copy
        start = torch.cuda.Event(enable_timing=True)
        start.record()
        self.layers.append({"host_start": time.perf_counter(), "start": start})
        return weights

    def done(self, i: int) -> None:
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        self.layers[-1].update(host_end=time.perf_counter(), end=end)
        self.stack.done(i)


def timeline(engine: Engine, tokens: int) -> dict:
    """One prefill's layers against its copies: where the GPU waited for a copy, where it waited
    for the host to issue work, and how busy the copy stream was (GPU only)."""
    target = engine.target
    stack = TimedStack(target.stack)
    copies_before = len(target.stack._timings)
    prompt = torch.randint(10, min(1000, target.transformer.vocab_size), (tokens,), device="cuda")
    torch.cuda.synchronize()
    origin = torch.cuda.Event(enable_timing=True)
    origin.record()
    host_origin = time.perf_counter()
    target.transformer.prefill(stack, target.cache, prompt, engine.config.prefill_chunk, 0, target.ops)
    torch.cuda.synchronize()
    wall = (time.perf_counter() - host_origin) * 1e3
    copies = [(origin.elapsed_time(a), origin.elapsed_time(b)) for a, b in target.stack._timings[copies_before:]]
    target.transfer_ms()
    rows = [{"host_issue": (layer["host_start"] - host_origin) * 1e3, "host_done": (layer["host_end"] - host_origin) * 1e3,
             "gpu_start": origin.elapsed_time(layer["start"]), "gpu_end": origin.elapsed_time(layer["end"])}
            for layer in stack.layers]
    # A layer's GPU span that ends long after the host finished issuing it was GPU-bound; a start
    # later than the layer before ended waited for its copy.
    copy_wait = sum(max(0.0, r["gpu_start"] - prev["gpu_end"]) for prev, r in zip(rows, rows[1:]))
    return {"tokens": tokens, "wall_ms": wall, "host_issue_ms": rows[-1]["host_done"] - rows[0]["host_issue"],
            "gpu_span_ms": sum(r["gpu_end"] - r["gpu_start"] for r in rows), "gpu_waited_for_copies_ms": copy_wait,
            "copy_busy_ms": sum(b - a for a, b in copies), "copies": copies, "layers": rows}


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
    parser.add_argument("--layers", type=int, help="layers on the GPU (default: the memory model's vanilla plan)")
    parser.add_argument("--method", default="vanilla", help="vanilla or subspec_sd (its substitute takes VRAM)")
    parser.add_argument("--prefill-chunk", type=int, default=EngineConfig.prefill_chunk)
    parser.add_argument("--row-invariant", default="on,off", help="on, off or both (on,off)")
    parser.add_argument("--timeline", action="store_true",
                        help="per offloaded case, one prefill of the longest prompt layer by layer against its copies")
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
    layers_on_gpu = args.layers if args.layers is not None else layers_on_gpu
    report: dict = {"shape": args.shape, "vram_limit_gb": args.vram_limit_gb,
                    "device": torch.cuda.get_device_name() if gpu else "cpu",
                    "layers_on_gpu": layers_on_gpu, "stream_buffers": buffers, "cases": []}
    for row_invariant in [flag == "on" for flag in args.row_invariant.split(",")]:
        for placement in args.placements.split(","):
            offloaded = placement != "resident"
            if gpu:
                torch.cuda.set_per_process_memory_fraction(1.0)  # an earlier case's cap is not this one's
            engine = engine_from_model(
                EngineConfig(method=args.method, device=str(device), max_length=args.max_length, row_invariant=row_invariant,
                             vram_limit_gb=args.vram_limit_gb if placement == "offloaded" and gpu else None,
                             keep_first_n_layers_on_gpu=layers_on_gpu if offloaded else None,
                             emulate_offload=offloaded and not gpu, offload_slots=buffers,
                             prefill_chunk=args.prefill_chunk),
                LoadedModel(model, _NoText(), args.shape, None))
            bound = engine.describe().get("stream_bound_ms") if offloaded else None
            for tokens in lengths:
                retries = alloc_retries()
                first_ms, ms = prefill_ms(engine, tokens, args.repeats)
                case = {"row_invariant": row_invariant, "placement": placement, "tokens": tokens, "prefill_ms": ms,
                        "first_prefill_ms": first_ms,
                        "stream_bound_ms": bound, "peak_gb": torch.cuda.max_memory_allocated() / 1e9 if gpu else 0.0,
                        "alloc_retries": alloc_retries() - retries}
                if not offloaded and tokens == max(lengths):
                    case["kernels"] = kernel_breakdown(lambda: prefill_once(engine, tokens), steps=1)
                report["cases"].append(case)
                against = f", {ms / bound:.2f}x one stream ({bound:.1f} ms)" if bound else " (no stream bound)"
                print(f"{'row-invariant' if row_invariant else 'plain':13s} {placement:9s} {tokens:5d} tokens: "
                      f"prefill {ms:7.1f} ms{against} (first {first_ms:.0f} ms), peak {case['peak_gb']:.2f} GB, "
                      f"{case['alloc_retries']} allocator retries", flush=True)
                if args.timeline and gpu and offloaded and tokens == max(lengths):
                    case["timeline"] = line = timeline(engine, tokens)
                    print(f"    timeline: wall {line['wall_ms']:.1f} ms, host issued {line['host_issue_ms']:.1f}, "
                          f"GPU layer spans {line['gpu_span_ms']:.1f} (waited {line['gpu_waited_for_copies_ms']:.1f} for "
                          f"copies), copies {line['copy_busy_ms']:.1f} ms busy")
                    for n, r in enumerate(line["layers"]):
                        print(f"      layer {n:2d}: host {r['host_issue']:7.1f}-{r['host_done']:7.1f}  "
                              f"GPU {r['gpu_start']:7.1f}-{r['gpu_end']:7.1f}")
                    print("      copies: " + " ".join(f"{a:.0f}-{b:.0f}" for a, b in line["copies"]))
                for name, ms_total, count in case.get("kernels", {}).get("top", [])[:10]:
                    print(f"    {ms_total:8.2f} ms  x{count:<5d} {name}")
            close(engine)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
