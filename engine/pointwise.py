"""The element-wise math of a decoder layer: RMSNorm (with the residual add before it), rotary
embeddings (with Qwen3's per-head norms) and the gated activation.

Eager, each of these is a handful of small kernels; at the draft's 6 tokens they cost more than
their bytes (profiled on an H200: ~40 element-wise kernels per layer, 1204 kernels per 7B draft
step). `compiled_pointwise` hands the same functions to torch.compile, which fuses each into one
kernel; drafts use it on a GPU. Given the compute dtype, its rotary and gated-activation kernels
also take the q/k/v and gate/up projections as split-K partial sums
(engine.int4_kernel.TritonInt4Linear.partial_sums) and add them as they read them, where the linear
would otherwise launch a kernel of its own to add them. The target always runs the eager
functions: they are exactly the transformers modules' math, so plain decoding and verification
compute the same numbers as `generate` does.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' Llama/Qwen2/Qwen3 RMSNorm, operation for operation."""
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual stream after adding `delta`, and its norm (what the next block reads)."""
    x = x + delta
    return x, rms_norm(x, weight, eps)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def attention_inputs(
    heads: torch.Tensor,  # [T, H + 2 KVH, D]: the fused q/k/v projection, per head
    cos: torch.Tensor,  # [T, D]
    sin: torch.Tensor,
    num_q_heads: int,
    q_norm: tuple[torch.Tensor, float] | None,  # Qwen3: (weight, eps) of the per-head norms
    k_norm: tuple[torch.Tensor, float] | None,
) -> torch.Tensor:
    """The same [T, H + 2 KVH, D] heads with q and k normalised per head (where the model does)
    and rotated, v as it was: one output, so a compiled draft writes it in one kernel, attention
    reads q as a view and the cache takes k and v in one copy."""
    num_kv_heads = (heads.shape[1] - num_q_heads) // 2
    q, k, v = heads.split((num_q_heads, num_kv_heads, num_kv_heads), dim=1)
    if q_norm is not None and k_norm is not None:
        q, k = rms_norm(q, *q_norm), rms_norm(k, *k_norm)
    cos, sin = cos[:, None], sin[:, None]  # the same angle for every head of a token
    return torch.cat((rotate(q, cos, sin), rotate(k, cos, sin), v), dim=1)


def gated(act: Callable[[torch.Tensor], torch.Tensor], gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return act(gate) * up


@dataclass(frozen=True)
class Pointwise:
    """The functions a forward pass calls for its element-wise math. With `partial_sums`, the
    forward hands attention_inputs and gated [S, ...] partial sums of their projections (S = 1
    for a linear that does not split; engine.model._linear)."""

    add_rms_norm: Callable = add_rms_norm
    attention_inputs: Callable = attention_inputs
    gated: Callable = gated
    partial_sums: bool = False


EAGER = Pointwise()


def compiled_pointwise(backend: str | Callable = "inductor", dtype: torch.dtype | None = None) -> Pointwise:
    """torch.compile'd versions. Shapes start static and turn dynamic once a second shape shows up
    (torch.compile's default): draft widths, bucketed lengths and other models in the same process
    then share a few compilations instead of exhausting dynamo's recompile limit (8 per function,
    reached by the third model of one benchmark run). A function that fails to compile warns once
    and runs eagerly from then on. With `dtype` (the compute dtype), attention_inputs and gated
    take partial sums and round their totals to it, as the linear would have."""
    if dtype is None:
        return Pointwise(*(_compiled(fn, backend) for fn in (add_rms_norm, attention_inputs, gated)))
    return Pointwise(_compiled(add_rms_norm, backend), _compiled(_attention_inputs_of_sums(dtype), backend),
                     _compiled(_gated_of_sums(dtype), backend), partial_sums=True)


def _attention_inputs_of_sums(dtype: torch.dtype) -> Callable:
    def attention_inputs_of_sums(partial_heads: torch.Tensor, *args) -> torch.Tensor:
        return attention_inputs(partial_heads.sum(0).to(dtype), *args)

    return attention_inputs_of_sums


def _gated_of_sums(dtype: torch.dtype) -> Callable:
    def gated_of_sums(act: Callable, partial_gate: torch.Tensor, partial_up: torch.Tensor) -> torch.Tensor:
        return gated(act, partial_gate.sum(0).to(dtype), partial_up.sum(0).to(dtype))

    return gated_of_sums


def _compiled(fn: Callable, backend: str | Callable) -> Callable:
    compiled = torch.compile(fn, backend=backend, fullgraph=True)
    use = [compiled]

    def call(*args):
        try:
            return use[0](*args)
        except Exception as err:  # noqa: BLE001 - no compiler (triton) or a tracing gap: stay correct
            if use[0] is fn:
                raise
            warnings.warn(f"{fn.__name__} runs eagerly: torch.compile failed ({str(err)[:200]})", stacklevel=2)
            use[0] = fn
            return fn(*args)

    call.__name__ = fn.__name__
    return call
