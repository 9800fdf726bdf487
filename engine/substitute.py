"""The substitute: the target's own decoder layers with every linear quantized by HQQ.

Only the linears of each layer are new; embeddings, norms, rotary tables, lm_head and the KV cache
are the target's (see engine.model.Transformer), so the substitute drafts over the target's exact
prefix with no prefill and no second copy of anything shared.

HQQ quantizes (w = (q - zero) * scale, per group of `group_size` inputs); a kernel then multiplies
with those very numbers. Kernels (`substitute_kernel`):
- "triton": engine.int4_kernel, written for the draft's 1-32 rows: one pass over the 4-bit weights
  for all rows, dequantized in registers with HQQ's numbers. q/k/v and gate/up fused as for tinygemm.
- "tinygemm": torch's own int4 kernel (`aten._weight_int4pack_mm`, gpt-fast's int4 path). HQQ's
  float zero points carry over exactly: tinygemm computes (q - 8) * scale + offset, so
  offset = (8 - zero) * scale. q/k/v and gate/up are fused into one matrix each (their rows are
  quantized independently, so stacking them changes nothing): 4 kernels per layer instead of 7.
- "gemlite": gemlite's fused low-bit kernels through hqq (one per linear).
- "hqq": hqq's torch backend (unpacks and dequantizes every weight on every call).
- "dense": the dequantized weights, computed once, fused like tinygemm's (the CPU's choice: hqq's
  torch backend would dequantize tens of ms per linear on every call).
"auto" = triton on a GPU where it applies (bf16, 4-bit, group 32-128), else tinygemm (bf16, group
32-256), else gemlite, else hqq; dense on a CPU. Measured on an H200 (one 7B layer's linears at 6
tokens in a CUDA graph): triton 0.105 ms, tinygemm 0.165, gemlite 0.237, against 0.027 ms for its
4-bit bytes at HBM speed; at 16 tokens tinygemm doubles, triton barely moves (README, "GPU
performance").
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from engine.config import SUBSTITUTE_KERNELS
from engine.errors import EngineError
from engine.offload import LINEAR_NAMES, LayerWeights

# Linears that read the same input, stacked into one matrix by the fusing kernels.
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
TINYGEMM_GROUPS = (32, 64, 128, 256)
TRITON_GROUPS = (32, 64, 128)  # engine.int4_kernel: a 128-input block holds whole groups of 16-input slices


class SubstituteStack:
    """A LayerStack-like view over the quantized layers: all resident, nothing streams."""

    def __init__(self, layers: list[dict], kernel: str) -> None:
        self.layers = layers
        self.num_layers = len(layers)
        self.kernel = kernel  # what multiplies: tinygemm, gemlite, hqq or dense

    def weights(self, i: int) -> dict:
        return self.layers[i]

    def done(self, i: int) -> None:
        pass

    @property
    def nbytes(self) -> int:
        return sum(_nbytes(w) for layer in self.layers for w in layer.values())


def build_substitute(
    layers: list[LayerWeights],
    device: torch.device,
    compute_dtype: torch.dtype,
    bits: int = 4,
    group_size: int = 64,
    cache_file: Path | None = None,
    kernel: str = "auto",
) -> SubstituteStack:
    """Quantize every layer's linears (host or device tensors) onto `device`, for `kernel`.

    HQQ's data-free optimisation takes seconds per layer on a CPU, so the quantized state (packed
    weights, scales, zeros) is kept in `cache_file` and reused on the next start."""
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    kernel = resolve_kernel(kernel, device, compute_dtype, bits, group_size, layers[0])
    config = BaseQuantizeConfig(nbits=bits, group_size=group_size, axis=1)
    cached = load_file(cache_file) if cache_file is not None and cache_file.is_file() else {}
    to_save: dict[str, torch.Tensor] = {}
    quantized = []
    for i, weights in enumerate(layers):
        modules = {}
        for name in LINEAR_NAMES:
            key = f"{i}.{name}."
            state = {k[len(key):]: v for k, v in cached.items() if k.startswith(key)}
            if state:
                module = HQQLinear(None, config, compute_dtype=compute_dtype, device=str(device), initialize=False)
                module.load_state_dict(state)
            else:
                linear = _as_linear(weights[name], weights.get(f"{name}.bias"), device)
                module = HQQLinear(linear, config, compute_dtype=compute_dtype, device=str(device), del_orig=True)
                to_save |= {key + k: v.cpu() for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)}
            modules[name] = module
        # Converted layer by layer: one layer's HQQ modules at a time besides the converted ones.
        if kernel == "dense":
            quantized.append(_fused(modules, _dense, compute_dtype))
        elif kernel == "tinygemm":
            quantized.append(_fused(modules, _int4(Int4Linear), compute_dtype))
        elif kernel == "triton":
            from engine.int4_kernel import TritonInt4Linear  # imports triton: only when chosen

            quantized.append(_fused(modules, _int4(TritonInt4Linear), compute_dtype))
        else:
            quantized.append(modules)
    if to_save and cache_file is not None:
        _save_atomic(to_save, cache_file)
    if kernel == "gemlite":
        _use_gemlite(quantized)
    return SubstituteStack(quantized, kernel)


def resolve_kernel(
    kernel: str, device: torch.device, dtype: torch.dtype, bits: int, group_size: int, layer: LayerWeights
) -> str:
    """The kernel `kernel` stands for on this device, or one clear error why it cannot run."""
    if kernel not in SUBSTITUTE_KERNELS:
        raise EngineError(f"unknown substitute kernel {kernel!r}: use one of {', '.join(SUBSTITUTE_KERNELS)}")
    why_not_tinygemm = _tinygemm_unsupported(device, dtype, bits, group_size, layer)
    why_not_triton = _triton_unsupported(device, dtype, bits, group_size)
    if kernel == "auto":
        if device.type == "cpu":
            return "dense"
        if why_not_triton is None:
            return "triton"
        if why_not_tinygemm is None:
            return "tinygemm"
        return "gemlite" if _gemlite_importable() else "hqq"
    if kernel == "tinygemm" and why_not_tinygemm is not None:
        raise EngineError(f"substitute kernel tinygemm cannot run here: {why_not_tinygemm}")
    if kernel == "triton" and why_not_triton is not None:
        raise EngineError(f"substitute kernel triton cannot run here: {why_not_triton}")
    if kernel == "gemlite" and (device.type != "cuda" or not _gemlite_importable()):
        raise EngineError("substitute kernel gemlite needs a CUDA GPU and the gpu extra (pip install -e '.[gpu]')")
    return kernel


def _tinygemm_unsupported(
    device: torch.device, dtype: torch.dtype, bits: int, group_size: int, layer: LayerWeights
) -> str | None:
    if bits != 4:
        return f"it multiplies 4-bit weights, not {bits}-bit"
    if group_size not in TINYGEMM_GROUPS:
        return f"its group sizes are {', '.join(map(str, TINYGEMM_GROUPS))}, not {group_size}"
    if device.type == "cuda" and dtype != torch.bfloat16:
        return f"on a GPU it computes in bfloat16, not {str(dtype).removeprefix('torch.')}"
    for name in LINEAR_NAMES:
        rows, inputs = layer[name].shape
        if rows % 8 or inputs % 32:
            return f"{name} is {rows} x {inputs}; it needs outputs divisible by 8 and inputs by 32"
    return None


def _triton_unsupported(device: torch.device, dtype: torch.dtype, bits: int, group_size: int) -> str | None:
    if bits != 4:
        return f"it multiplies 4-bit weights, not {bits}-bit"
    if group_size not in TRITON_GROUPS:
        return f"its group sizes are {', '.join(map(str, TRITON_GROUPS))}, not {group_size}"
    # Triton compiles for CUDA; its interpreter (TRITON_INTERPRET=1, for the tests) runs on a CPU.
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return "it needs a CUDA GPU"
    if device.type == "cuda" and dtype != torch.bfloat16:
        return f"on a GPU it computes in bfloat16, not {str(dtype).removeprefix('torch.')}"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed (CUDA builds of torch bring it)"
    return None


def _gemlite_importable() -> bool:
    try:
        import gemlite  # noqa: F401
    except Exception:  # noqa: BLE001 - gemlite fails to import on CPU-only torch
        return False
    return True


def _fused(modules: dict, convert, dtype: torch.dtype) -> dict:
    """The layer's linears as `convert` makes them, q/k/v and gate/up each as one stacked matrix."""
    layer: dict = {}
    for fused_name, names in FUSED.items():
        layer |= convert(fused_name, [modules[n] for n in names], dtype)
    for name in LINEAR_NAMES:
        if not any(name in names for names in FUSED.values()):
            layer |= convert(name, [modules[name]], dtype)
    return layer


def _quantized_rows(module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """HQQ's integer weights [N, K] (uint8) and per-group scale and zero [N, K / group] (float32)."""
    rows, inputs = module.meta["shape"]
    groups = inputs // module.meta["group_size"]
    q = module.unpack(reshape=True, dtype=torch.uint8).view(rows, inputs)
    scale = module.meta["scale"].float().view(rows, groups)
    zero = module.meta["zero"].float().view(rows, groups)
    return q, scale, zero


def _stacked_bias(modules: list, dtype: torch.dtype) -> torch.Tensor | None:
    if all(m.bias is None for m in modules):
        return None
    return torch.cat([
        m.bias.to(dtype) if m.bias is not None else torch.zeros(m.meta["shape"][0], dtype=dtype, device=m.W_q.device)
        for m in modules
    ])


def _dense(name: str, modules: list, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    weights = {name: torch.cat([m.dequantize().to(dtype) for m in modules])}
    bias = _stacked_bias(modules, dtype)
    return weights | ({f"{name}.bias": bias} if bias is not None else {})


def _int4(module_class: type) -> Callable:
    """A converter to `module_class` (Int4Linear, TritonInt4Linear): HQQ's integers, scales and
    zeros of the stacked linears, as they are."""

    def convert(name: str, modules: list, dtype: torch.dtype) -> dict[str, torch.nn.Module]:
        q, scale, zero = (torch.cat(parts) for parts in zip(*(_quantized_rows(m) for m in modules)))
        group_size = modules[0].meta["group_size"]
        return {name: module_class(q, scale, zero, group_size, _stacked_bias(modules, dtype), dtype)}

    return convert


class Int4Linear(torch.nn.Module):
    """y = x W^T + b with W = (q - zero) * scale held in torch's int4 ("tinygemm") layout."""

    def __init__(
        self,
        q: torch.Tensor,  # [N, K] uint8 values 0..15
        scale: torch.Tensor,  # [N, K / group_size]
        zero: torch.Tensor,  # [N, K / group_size], HQQ's float zero points
        group_size: int,
        bias: torch.Tensor | None,
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.group_size = group_size
        inner_k_tiles = next(t for t in (8, 4, 2) if self.in_features % (16 * t) == 0)
        if q.is_cuda:
            # The CUDA op takes two 4-bit values per byte, the even column in the high nibble.
            pairs = (q[:, ::2] << 4 | q[:, 1::2]).contiguous()
            self.packed = torch.ops.aten._convert_weight_to_int4pack(pairs, inner_k_tiles)
            self._mm = torch.ops.aten._weight_int4pack_mm
        else:
            self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), inner_k_tiles)
            self._mm = torch.ops.aten._weight_int4pack_mm_for_cpu
        # tinygemm dequantizes (q - 8) * scale + offset; HQQ's (q - zero) * scale is that with
        # offset = (8 - zero) * scale. [K / group_size, N, 2] is the op's layout.
        offset = (8 - zero) * scale
        self.scale_and_offset = torch.stack([scale, offset], dim=-1).transpose(0, 1).contiguous().to(dtype)
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._mm(x.reshape(-1, self.in_features), self.packed, self.group_size, self.scale_and_offset)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)

    @property
    def nbytes(self) -> int:
        bias = self.bias.nbytes if self.bias is not None else 0
        return self.packed.nbytes + self.scale_and_offset.nbytes + bias


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(f".tmp{os.getpid()}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, staging)
    os.replace(staging, path)


def _as_linear(weight: torch.Tensor, bias: torch.Tensor | None, device: torch.device) -> torch.nn.Linear:
    # A throw-away module around a device copy: HQQLinear deletes its input, never the target's.
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight = torch.nn.Parameter(weight.to(device, copy=True), requires_grad=False)
    if bias is not None:
        linear.bias = torch.nn.Parameter(bias.to(device, copy=True), requires_grad=False)
    return linear


def _use_gemlite(layers: list[dict]) -> None:
    """Swap HQQLinear modules for gemlite kernels when gemlite imports (it needs a CUDA torch)."""
    try:
        from hqq.backends.gemlite import patch_hqq_to_gemlite

        converted = [{name: patch_hqq_to_gemlite(layer[name], None) for name in LINEAR_NAMES} for layer in layers]
    except Exception:  # noqa: BLE001 - gemlite missing or failing to import: keep hqq's backend
        return
    for layer, modules in zip(layers, converted):
        layer.update(modules)


def _nbytes(w: object) -> int:
    if isinstance(getattr(w, "nbytes", None), int):  # tensors and the int4 modules
        return w.nbytes
    if isinstance(w, torch.nn.Module):
        return sum(t.nbytes for t in list(w.parameters()) + list(w.buffers())) + sum(
            t.nbytes for t in vars(w).values() if isinstance(t, torch.Tensor)
        )
    return 0
