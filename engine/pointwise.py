"""The element-wise math of a decoder layer: RMSNorm (with the residual add before it), rotary
embeddings (with Qwen3's per-head norms) and the gated activation.

Eager, each of these is a handful of small kernels; at the draft's 6 tokens they cost more than
their bytes (profiled on an H200: ~40 element-wise kernels per layer, 1204 kernels per 7B draft
step). `compiled_pointwise` hands the same functions to torch.compile, which fuses each into one
kernel; drafts use it on a GPU. The target always runs the eager functions: they are exactly the
transformers modules' math, so plain decoding and verification compute the same numbers as
`generate` does.
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
    """The functions a forward pass calls for its element-wise math."""

    add_rms_norm: Callable = add_rms_norm
    attention_inputs: Callable = attention_inputs
    gated: Callable = gated


EAGER = Pointwise()


def compiled_pointwise(backend: str | Callable = "inductor") -> Pointwise:
    """torch.compile'd versions. Shapes start static and turn dynamic once a second shape shows up
    (torch.compile's default): draft widths, bucketed lengths and other models in the same process
    then share a few compilations instead of exhausting dynamo's recompile limit (8 per function,
    reached by the third model of one benchmark run). A function that fails to compile warns once
    and runs eagerly from then on."""
    return Pointwise(*(_compiled(fn, backend) for fn in (add_rms_norm, attention_inputs, gated)))


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
