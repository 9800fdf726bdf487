"""The substitute: the target's own decoder layers with every linear quantized by HQQ.

Only the seven linears of each layer are new; embeddings, norms, rotary tables, lm_head and the KV
cache are the target's (see engine.model.Transformer), so the substitute drafts over the target's
exact prefix with no prefill and no second copy of anything shared.

On CUDA each linear is an HQQLinear, switched to gemlite's fused low-bit kernels when gemlite is
installed (hqq's torch backend otherwise). On the CPU, hqq's torch backend would unpack and
dequantize every weight on every call (tens of ms per linear); the substitute keeps the dequantized
weights instead: the same numbers the backend would multiply with, computed once.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from engine.offload import LINEAR_NAMES, LayerWeights


class SubstituteStack:
    """A LayerStack-like view over the quantized layers: all resident, nothing streams."""

    def __init__(self, layers: list[dict]) -> None:
        self.layers = layers
        self.num_layers = len(layers)

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
) -> SubstituteStack:
    """Quantize every layer's linears (host or device tensors) onto `device`.

    HQQ's data-free optimisation takes seconds per layer on a CPU, so the quantized state (packed
    weights, scales, zeros) is kept in `cache_file` and reused on the next start."""
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    config = BaseQuantizeConfig(nbits=bits, group_size=group_size, axis=1)
    cached = load_file(cache_file) if cache_file is not None and cache_file.is_file() else {}
    to_save: dict[str, torch.Tensor] = {}
    quantized = []
    for i, weights in enumerate(layers):
        layer: dict = {}
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
            if device.type == "cpu":
                layer[name] = module.dequantize().to(compute_dtype)
                if module.bias is not None:
                    layer[f"{name}.bias"] = module.bias.to(compute_dtype)
            else:
                layer[name] = module
        quantized.append(layer)
    if to_save and cache_file is not None:
        _save_atomic(to_save, cache_file)
    if device.type == "cuda":
        _use_gemlite(quantized)
    return SubstituteStack(quantized)


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
    if isinstance(w, torch.Tensor):
        return w.nbytes
    if isinstance(w, torch.nn.Module):
        return sum(t.nbytes for t in list(w.parameters()) + list(w.buffers())) + sum(
            t.nbytes for t in vars(w).values() if isinstance(t, torch.Tensor)
        )
    return 0
