"""What holds the substitute's int4 kernel above its HBM floor, measured by leaving its work out (GPU only).

For each linear shape (default: Qwen2.5-7B's fused q/k/v, o, fused gate/up and down) at 6 and 16 rows,
inside a CUDA graph as `int4_tiles.py` times them (6 copies of the weights, so L2 holds none; with
`choose_tiles`' tiles, partial sums included), next to the floor (4-bit bytes / the device-to-device
copy rate measured in the same run):
- the engine's kernel with its weights cold, and hot (one copy replayed, so L2 holds it);
- the engine's kernel with parts of its work left out, each a copy of its source with a line
  replaced (`EDITS`; the run stops if the kernel no longer has that line): no scale and offset
  loads (constants instead), no activation loads (a constant tile), no unpacking (the words'
  bit pairs go to the tensor cores as they are; the scales are then unused, so not loaded either),
  and all three left out: the bare stream of the weight words through shared memory and the
  tensor cores. The outputs of these are meaningless; only their time is.
Then what a kernel boundary costs in a CUDA graph: chains of 112 and 338 trivial kernels (a 7B draft
step's int4 matmuls and all its kernels), of one program and of one per multiprocessor, and a torch element-wise op.

    python benchmarks/int4_limits.py [--shapes qkv=4608x3584,down=3584x18944] [--json out.json]
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from int4_tiles import COPIES, GROUP, ROWS, _graph_us, _quantized, start

# (the kernel's line, what replaces it): what leaving each part of its work out means.
EDITS = {
    "scales": (
        "            scale = tl.load(scale_ptr + group * N + cols, mask=col_ok, other=0.0)\n"
        "            offset = tl.load(offset_ptr + group * N + cols, mask=col_ok, other=0.0)\n",
        "            scale = (tl.full((BLOCK_N,), 1.0, scale_ptr.dtype.element_ty)\n"
        "                     + (cols * 0).to(scale_ptr.dtype.element_ty))\n"
        "            offset = (tl.full((BLOCK_N,), 0.5, scale_ptr.dtype.element_ty)\n"
        "                      + (cols * 0).to(scale_ptr.dtype.element_ty))\n",
    ),
    "activations": (
        "                x = tl.load(x_ptr + rows[:, None] * K + k[None, :], mask=x_ok, other=0.0)\n",
        "                x = (rows[:, None] + k[None, :] * 0).to(x_ptr.dtype.element_ty)\n",
    ),
    "unpacking": (
        "                w = _weights(words_s, s, tl.broadcast_to(scale_s[None, :], (_SLICE, BLOCK_N)),\n"
        "                             tl.broadcast_to(offset[None, :], (_SLICE, BLOCK_N)), FAST)\n",
        '                w = tl.inline_asm_elementwise("xor.b32 $0, $1, $2;", "=r,r,r", [words_s], dtype=tl.bfloat16,\n'
        "                                              is_pure=True, pack=2)\n",
    ),
}
LEFT_OUT = {
    "no scale loads": ("scales",),
    "no activation loads": ("activations",),
    "neither": ("scales", "activations"),
    "no unpacking (nor scales)": ("unpacking",),
    "weight stream only": ("scales", "activations", "unpacking"),
}
CHAINS = (112, 338)  # a 7B draft step's int4 matmuls; all its kernels


def ablated_source(left_out: tuple[str, ...]) -> str:
    """The engine's int4 kernel's source with the `EDITS` named in `left_out` made."""
    from engine import int4_kernel

    source = inspect.getsource(int4_kernel._int4_matmul.fn)  # with its @triton.jit
    for part in left_out:
        line, replacement = EDITS[part]
        if source.count(line) != 1:
            raise RuntimeError(f"engine.int4_kernel._int4_matmul changed: re-fit the {part!r} edit of int4_limits.py")
        source = source.replace(line, replacement)
    return source


def ablated_kernel(left_out: tuple[str, ...], folder: Path):
    """The edited kernel, jitted from a file of its own (Triton reads a kernel's source from its file)."""
    path = folder / f"int4_without_{'_'.join(left_out)}.py"
    path.write_text("import triton\nimport triton.language as tl\n\n"
                    "from engine.int4_kernel import _BLOCK_K, _SLICE, _weights\n\n\n" + ablated_source(left_out))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module._int4_matmul


@contextmanager
def kernel_swapped(kernel):
    """TritonInt4Linear launching `kernel` (the module's global, looked up at each launch)."""
    from engine import int4_kernel

    engine_kernel = int4_kernel._int4_matmul
    int4_kernel._int4_matmul = kernel
    try:
        yield
    finally:
        int4_kernel._int4_matmul = engine_kernel


def main() -> None:
    args, device, copy_gbps = start(__doc__, "int4_limits.py")
    from engine.int4_kernel import TritonInt4Linear

    results: dict = {"copy_gbps": copy_gbps, "shapes": {}}
    folder = Path(tempfile.mkdtemp(prefix="int4_limits_"))
    kernels = {name: ablated_kernel(parts, folder) for name, parts in LEFT_OUT.items()}
    for name, shape in (item.split("=") for item in args.shapes.split(",")):
        n, k = (int(v) for v in shape.split("x"))
        linears = [TritonInt4Linear(*_quantized(n, k, device), GROUP, None, torch.bfloat16) for _ in range(COPIES)]
        first = linears[0]
        floor_us = (first.words.nbytes + first.scale.nbytes + first.offset.nbytes) / (copy_gbps * 1e3)
        row: dict = {"floor_us": floor_us, "tiles": [first.block_n, first.split], "us": {}}
        for m in ROWS:
            xs = [torch.randn(m, k, dtype=torch.bfloat16, device=device) for _ in range(COPIES)]
            times = {"engine": _graph_us(linears, xs), "engine, L2 hot": _graph_us([first] * COPIES, xs)}
            for variant, kernel in kernels.items():
                with kernel_swapped(kernel):
                    times[variant] = _graph_us(linears, xs)
            row["us"][m] = times
            print(f"{name} {n} x {k}, {m} rows (floor {floor_us:.1f} us): " +
                  ", ".join(f"{variant} {us:.1f} ({us / floor_us:.1f}x)" for variant, us in times.items()), flush=True)
        results["shapes"][name] = row
        del linears, first
        torch.cuda.empty_cache()
    results["kernel_boundary_us"] = _kernel_boundaries(device)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


def _kernel_boundaries(device: torch.device) -> dict:
    """Microseconds per kernel of chains of trivial kernels replayed from one CUDA graph."""
    from offload_gpu import graph_ms

    from engine.int4_kernel import _sum_partials

    tiny = torch.zeros(6, 3584, dtype=torch.float32, device=device)
    out = torch.empty(6, 3584, dtype=torch.bfloat16, device=device)

    def summing(programs: int) -> None:  # one partial sum of one row: a kernel doing next to nothing
        _sum_partials[(programs,)](tiny, out, 1, 1 if programs == 1 else tiny.shape[1], SPLIT=1, BLOCK_M=16, BLOCK_N=32)

    multiprocessors = torch.cuda.get_device_properties(device).multi_processor_count  # the H200's 132
    results = {}
    for count in CHAINS:
        per_kernel = {
            "1 program": graph_ms(lambda: [summing(1) for _ in range(count)], 30) * 1e3 / count,
            f"{multiprocessors} programs": graph_ms(lambda: [summing(multiprocessors) for _ in range(count)], 30)
            * 1e3 / count,
            "torch element-wise": graph_ms(lambda: [tiny.mul_(1.0) for _ in range(count)], 30) * 1e3 / count,
        }
        results[count] = per_kernel
        print(f"{count} kernels in one CUDA graph: " + ", ".join(
            f"{kind} {us:.2f} us each ({us * count / 1e3:.3f} ms)" for kind, us in per_kernel.items()), flush=True)
    return results


if __name__ == "__main__":
    main()
