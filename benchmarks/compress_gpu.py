"""Compressed streaming's parts on one layer (issue 20): the size engine.compress reaches on a
layer's weights, the encoder's time, the GPU decoder's time and bandwidth, and the pinned copy of
the raw against the compressed bytes, every decode checked bit for bit.

    python benchmarks/compress_gpu.py [--shape qwen2.5-7b] [--lanes-per-program 64,128,256] [--json r.json]
                                      [--engine-vram-gb 8 [--engine-shape qwen2.5-32b]]

--engine-vram-gb also decodes with the engine's plain offloaded decoding of the whole random model
(--engine-shape, default the 7B) under that cap, streamed as bf16 and compressed, each against its
own bound (the bytes it streams over the pinned link) in the same run.

The weights: Gaussian (std 0.02, as the other benchmarks' random models) and row-scaled Student-t
(heavier tails, closer to trained weights). On a CPU it runs a small layer with the reference
decoder only.
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

from engine.compress import codebook, compress, decode_reference, exponent_histogram, lanes_for  # noqa: E402

LAYER_WEIGHTS = {"qwen2.5-7b": 3584 * (3584 + 2 * 512 + 3584) + 3 * 3584 * 18944, "tiny": 64 * 1000 + 7}


def weights(kind: str, numel: int, device: torch.device) -> torch.Tensor:
    generator = torch.Generator(device).manual_seed(0)
    if kind == "gaussian":
        return (torch.randn(numel, generator=generator, device=device) * 0.02).to(torch.bfloat16)
    rows = numel // 4096 + 1
    t = torch.distributions.StudentT(torch.tensor(4.0, device=device)).sample((rows, 4096)).flatten()[:numel]
    scale = torch.rand(rows, 1, generator=generator, device=device).expand(rows, 4096).flatten()[:numel]
    return (t * (0.005 + 0.03 * scale)).to(torch.bfloat16)


def timed_ms(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=LAYER_WEIGHTS, default="qwen2.5-7b")
    parser.add_argument("--lanes-per-program", default="64,128,256")
    parser.add_argument("--engine-vram-gb", type=float)
    parser.add_argument("--engine-shape", default="qwen2.5-7b", help="a shape of benchmarks/offload_gpu.py")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    numel = LAYER_WEIGHTS[args.shape if gpu else "tiny"]
    report: dict = {"device": torch.cuda.get_device_name() if gpu else "cpu", "weights": numel, "cases": []}
    for kind in ("gaussian", "student-t"):
        report["cases"].append(layer_case(kind, numel, device, args))
    if gpu:  # what the layer cases held must not count against the engine's cap
        torch.cuda.empty_cache()
    if args.engine_vram_gb and gpu:
        report["engine"] = engine_cases(args.engine_shape, args.engine_vram_gb, device)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


def layer_case(kind: str, numel: int, device: torch.device, args) -> dict:
    """One layer of `kind` weights: encoded from host memory (as the engine does), decoded, copied."""
    gpu = device.type == "cuda"
    flat = weights(kind, numel, device)
    lanes = lanes_for(numel)
    host = flat.cpu()
    started = time.perf_counter()
    book = codebook(exponent_histogram(host, lanes * 256, device))
    layer = compress(host, book, device=device)
    encode_s = time.perf_counter() - started
    case = {"weights": kind, "ratio": layer.nbytes / flat.nbytes, "encode_s": encode_s,
            "max_code_bits": int(book.lengths.max())}
    out = torch.empty(lanes * 256, dtype=torch.bfloat16, device=device)
    if gpu:
        from engine import decompress_kernel

        on_device = type(layer)(layer.numel, layer.lanes, layer.lane_weights,
                                *(t.to(device) for t in (layer.sign_mantissa, layer.words, layer.offsets)))
        table = book.table.to(device)
        case["decode_ms"] = {}
        for per_program in (int(n) for n in args.lanes_per_program.split(",")):
            decompress_kernel.LANES_PER_PROGRAM = per_program
            out.zero_()
            decompress_kernel.decode(on_device, table, out)
            assert torch.equal(out[:numel].view(torch.int16), flat.view(torch.int16)), "decode is not bit-exact"
            case["decode_ms"][per_program] = timed_ms(lambda: decompress_kernel.decode(on_device, table, out))
        raw = host.pin_memory()
        packed = torch.cat([t.view(torch.uint8) for t in (layer.sign_mantissa, layer.words, layer.offsets)]).pin_memory()
        raw_dev, packed_dev = torch.empty_like(raw, device=device), torch.empty_like(packed, device=device)
        case["copy_raw_ms"] = timed_ms(lambda: raw_dev.copy_(raw, non_blocking=True))
        case["copy_compressed_ms"] = timed_ms(lambda: packed_dev.copy_(packed, non_blocking=True))
    else:
        decode_reference(layer, book.table, out)
        assert torch.equal(out[:numel].view(torch.int16), flat.view(torch.int16)), "decode is not bit-exact"
    line = (f"{kind}: {numel / 1e6:.1f}M weights, compressed to {case['ratio']:.4f} of bf16 "
            f"(codes up to {case['max_code_bits']} bits), encoded in {encode_s:.2f} s")
    if gpu:
        best = min(case["decode_ms"].values())
        line += (f"; decode {', '.join(f'{n} lanes/program {ms:.3f} ms' for n, ms in case['decode_ms'].items())} "
                 f"(best {flat.nbytes / best / 1e6:.0f} GB/s of output); pinned copy raw {case['copy_raw_ms']:.2f} ms, "
                 f"compressed {case['copy_compressed_ms']:.2f} ms")
    print(line, flush=True)
    return case


def engine_cases(shape: str, vram_gb: float, device: torch.device) -> dict:
    """The engine's vanilla decoding under the cap, bf16 then compressed streaming, each with the
    memory model's plan for it (compressed streaming's staging buffer can cost a resident layer)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from offload_gpu import SHAPES, bench_vanilla, random_model, release_cached_memory

    config = SHAPES[shape]()
    model = random_model(config, torch.bfloat16, device)
    prompt = torch.randint(0, config.vocab_size, (64,), generator=torch.Generator().manual_seed(0)).tolist()
    cases = {}
    for compressed in (False, True):
        args = argparse.Namespace(shape=shape, max_length=2048, row_invariant=None, tokens=16,
                                  compressed_streaming=compressed)
        started = time.perf_counter()
        case = bench_vanilla(model, config, args, device, vram_gb, prompt)
        case["build_and_run_s"] = time.perf_counter() - started
        release_cached_memory()
        cases["compressed" if compressed else "bf16"] = case
        print(f"engine vanilla, {'compressed' if compressed else 'bf16'} streaming: {case['layers_on_gpu']}/"
              f"{case['layers_total']} layers on the GPU, {case['stream_buffers']} buffers, {case['offloaded_gb']:.2f} GB "
              f"streamed per token, {case['ms_per_token']:.1f} ms/token (bound {case['stream_bound_ms']:.1f}, as bf16 "
              f"{case['bf16_bound_ms']:.1f}), peak "
              f"{case['peak_gpu_gb']:.2f} GB, built and run in {case['build_and_run_s']:.0f} s", flush=True)
    same = cases["bf16"]["greedy_tokens"] == cases["compressed"]["greedy_tokens"]
    print(f"greedy tokens identical: {same}", flush=True)
    return {**cases, "identical": same}


if __name__ == "__main__":
    raise SystemExit(main())
