"""Tile shapes of the substitute's Triton int4 kernel against torch's tinygemm, per linear (GPU only).

For each linear shape (default: Qwen2.5-7B's fused q/k/v, o, fused gate/up and down), random HQQ-style
4-bit weights (group 64) are converted by both kernels; each (BLOCK_N, SPLIT, warps, stages) of a
small sweep is timed at 6 and 16 rows inside a CUDA graph over several copies of the weights (so L2
holds none), next to tinygemm and the floor (the 4-bit bytes over the device-to-device copy rate,
reads plus writes, measured in the same run), with its deviation from the dequantized weights, whether
two calls agree bit for bit, and whether the weights it multiplies with are bit for bit HQQ's bf16
weights (q * scale + offset rounded once). engine.int4_kernel.choose_tiles is the rule fitted to this sweep.

    python benchmarks/int4_tiles.py [--shapes qkv=4608x3584,down=3584x18944] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

SHAPES_7B = "qkv=4608x3584,o=3584x3584,gate_up=37888x3584,down=3584x18944"
GROUP = 64
COPIES = 6
ROWS = (6, 16)


def start(description: str, script: str) -> tuple[argparse.Namespace, torch.device, float]:
    """A kernel benchmark's start (this one's and int4_limits.py's): --shapes and --json parsed, a
    CUDA GPU or a clear exit, and the device-to-device copy rate its floors divide by."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=SHAPES_7B, help="name=NxK,... (outputs x inputs)")
    parser.add_argument("--json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit(f"{script} times GPU kernels: it needs a CUDA GPU")
    device = torch.device("cuda")
    copy_gbps = _copy_gbps(device)
    print(f"device-to-device copy {copy_gbps:.0f} GB/s (read + write)")
    return args, device, copy_gbps


def main() -> None:
    args, device, copy_gbps = start(__doc__, "int4_tiles.py")
    import triton

    from engine.int4_kernel import BLOCK_K, TritonInt4Linear, choose_tiles
    from engine.substitute import Int4Linear

    multiprocessors = torch.cuda.get_device_properties(device).multi_processor_count
    results: dict = {"copy_gbps": copy_gbps, "shapes": {}}
    for name, shape in (item.split("=") for item in args.shapes.split(",")):
        n, k = (int(v) for v in shape.split("x"))
        weights = [_quantized(n, k, device) for _ in range(COPIES)]
        tinygemm = [Int4Linear(*w, GROUP, None, torch.bfloat16) for w in weights]
        triton_linears = [TritonInt4Linear(*w, GROUP, None, torch.bfloat16) for w in weights]
        dense = _dequantized(*weights[0])
        rounded = _bf16_weights(*weights[0])
        xs = {m: [torch.randn(m, k, dtype=torch.bfloat16, device=device) for _ in range(COPIES)] for m in ROWS}
        first = triton_linears[0]
        floor_us = (first.words.nbytes + first.scale.nbytes + first.offset.nbytes) / (copy_gbps * 1e3)
        row = {"floor_us": floor_us, "tinygemm_us": {m: _graph_us(tinygemm, xs[m]) for m in ROWS}, "tiles": {}}
        print(f"{name} {n} x {k}: floor {floor_us:.1f} us; tinygemm " +
              ", ".join(f"{m} rows {us:.1f} us" for m, us in row["tinygemm_us"].items()))
        blocks = triton.cdiv(k, BLOCK_K)
        default = choose_tiles(n, k, multiprocessors)
        for tiles in sorted(_sweep(n, blocks, multiprocessors) | {default}):
            for linear in triton_linears:
                _retile(linear, tiles)
            times = {m: _graph_us(triton_linears, xs[m]) for m in ROWS}
            deviation, repeatable = _check(first, dense)
            exact = torch.equal(_weights_seen(first), rounded)
            row["tiles"][str(tiles)] = {"us": times, "max_relative_deviation": deviation, "repeatable": repeatable,
                                        "weights_bit_for_bit": exact}
            mark = " (choose_tiles)" if tiles == default else ""
            print(f"  BLOCK_N {tiles[0]:3d} SPLIT {tiles[1]:3d} warps {tiles[2]} stages {tiles[3]}: " +
                  ", ".join(f"{m} rows {us:6.1f} us" for m, us in times.items()) +
                  f" ({floor_us / times[ROWS[0]]:.2f} of the floor), deviation {deviation:.4f}, "
                  f"repeatable {repeatable}, weights bit for bit {exact}{mark}")
        results["shapes"][name] = row
        del tinygemm, triton_linears, weights
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


def _quantized(n: int, k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, device=device)
    scale = torch.rand(n, k // GROUP, device=device) * 0.01 + 0.001
    zero = torch.rand(n, k // GROUP, device=device) * 15
    return q, scale, zero


def _dequantized(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    n, k = q.shape
    return ((q.float().view(n, -1, GROUP) - zero[..., None]) * scale[..., None]).view(n, k)


def _bf16_weights(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """[K, N] weights q * scale + offset as the kernel must compute them: scale and offset = -zero *
    scale in bf16 (as the linear stores them), the sum exact in float64 and rounded once to bf16
    (8 significant bits, ties to even; torch's float64 -> bf16 cast would round twice)."""
    n, k = q.shape
    scale_b = scale.to(torch.bfloat16).double()
    offset_b = (-zero * scale).to(torch.bfloat16).double()
    exact = (q.double().view(n, -1, GROUP) * scale_b[..., None] + offset_b[..., None]).view(n, k)
    mantissa, exponent = torch.frexp(exact)
    return torch.ldexp(torch.round(mantissa * 256) / 256, exponent).to(torch.bfloat16).t()


def _weights_seen(linear) -> torch.Tensor:
    """The weights the kernel multiplies with, [K, N]: x = rows of the identity picks them out one
    input at a time (a single product per output, so the fp32 sums add nothing but zeros)."""
    eye = torch.eye(linear.in_features, dtype=torch.bfloat16, device=linear.words.device)
    return torch.cat([linear(eye[start : start + 32]) for start in range(0, linear.in_features, 32)])


def _sweep(n: int, blocks: int, multiprocessors: int) -> set[tuple[int, int, int, int]]:
    """BLOCK_N 64/128/256, up to three SPLITs (divisors of K's blocks) giving 0.5-8 programs per
    multiprocessor, 4 warps (8 lost everywhere in the first sweeps), 2, 3 or 4 stages."""
    out = set()
    divisors = [s for s in range(1, blocks + 1) if blocks % s == 0]
    for block_n in (64, 128, 256):
        tiles = -(-n // block_n)
        splits = [s for s in divisors if multiprocessors // 2 <= tiles * s <= 8 * multiprocessors][:3]
        out |= {(block_n, s, 4, stages) for s in splits or divisors[:1] for stages in (2, 3, 4)}
    return out


def _retile(linear, tiles: tuple[int, int, int, int]) -> None:
    from engine.int4_kernel import MAX_ROWS

    linear.block_n, linear.split, linear.warps, linear.stages = tiles
    linear.partial = torch.empty(max(1, linear.split * MAX_ROWS * linear.out_features),
                                 dtype=torch.float32, device=linear.words.device)


def _check(linear, dense: torch.Tensor) -> tuple[float, bool]:
    x = torch.randn(ROWS[0], dense.shape[1], dtype=torch.bfloat16, device=dense.device)
    want = x.float() @ dense.t()
    first, second = linear(x), linear(x)
    return ((first.float() - want).abs().max() / want.abs().max()).item(), torch.equal(first, second)


def _graph_us(linears: list, xs: list[torch.Tensor], replays: int = 40) -> float:
    """Median microseconds per call of the linears over their inputs, replayed from one CUDA graph."""
    from offload_gpu import graph_ms  # the GPU benchmark's graph timing (this folder is on the path)

    def calls() -> None:
        for linear, x in zip(linears, xs):
            linear(x)

    return graph_ms(calls, replays) * 1e3 / len(linears)


def _copy_gbps(device: torch.device) -> float:
    source = torch.empty(2 << 30, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        target.copy_(source)
    end.record()
    end.synchronize()
    return 2 * source.numel() * 10 / (start.elapsed_time(end) / 1e3) / 1e9


if __name__ == "__main__":
    main()
