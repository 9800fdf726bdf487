"""A draft layer's q/k/v projection turned into attention's inputs in one kernel.

Between the q/k/v matmul and attention a draft step used to launch three kernels per layer: one
adding the matmul's split-K partial sums, the compiled rotary embedding, and the cache write. At 6
tokens each costs its launch, not its bytes. `store_attention_inputs` does all three in one: a
program per (token, head) adds the head's partial sums in a fixed order, rounds them as the linear
would, applies Qwen3's per-head norm where the model has one and the rotary embedding (q and k),
and writes q to its own buffer and k and v straight into their cache slots.

The arithmetic is the eager functions' (engine.pointwise), rounding to the compute dtype after every
operation as torch does, so on a model without per-head norms the kernel's q, k and v equal the eager
path's bit for bit; a per-head norm adds its squares in another order (the last bit can differ).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rounded(x, dtype: tl.constexpr):
    """x (float32) rounded to the compute dtype and back: one eager operation's result."""
    return x.to(dtype).to(tl.float32)


@triton.jit
def _store_attention_inputs(
    parts_ptr, q_ptr, kv_ptr, slots_ptr, cos_ptr, sin_ptr, q_norm_ptr, k_norm_ptr,
    part_stride, token_stride, kv_which_stride, kv_head_stride, kv_slot_stride, q_eps, k_eps,
    SPLIT: tl.constexpr, HEADS: tl.constexpr, KV_HEADS: tl.constexpr, D: tl.constexpr, QK_NORM: tl.constexpr,
):
    """Program (t, head): head < HEADS is a query head, then KV_HEADS key heads, then KV_HEADS value
    heads. Halves of a head are loaded apart: the rotary embedding pairs element i with i + D / 2."""
    t = tl.program_id(0)
    head = tl.program_id(1)
    dtype: tl.constexpr = q_ptr.dtype.element_ty
    half = tl.arange(0, D // 2)
    at = parts_ptr + t * token_stride + head * D + half
    first = tl.zeros((D // 2,), dtype=tl.float32)
    second = tl.zeros((D // 2,), dtype=tl.float32)
    for s in tl.static_range(SPLIT):  # a fixed order: the same sums as the linear's own kernel adds
        first += tl.load(at + s * part_stride).to(tl.float32)
        second += tl.load(at + s * part_stride + D // 2).to(tl.float32)
    first, second = _rounded(first, dtype), _rounded(second, dtype)  # the linear's output
    if head < HEADS + KV_HEADS:  # q or k
        if QK_NORM:  # engine.pointwise.rms_norm per head
            is_q = head < HEADS
            norm_ptr = q_norm_ptr if is_q else k_norm_ptr
            eps = q_eps if is_q else k_eps
            inverse = 1.0 / tl.sqrt((tl.sum(first * first) + tl.sum(second * second)) / D + eps)
            first = _rounded(tl.load(norm_ptr + half).to(tl.float32) * _rounded(first * inverse, dtype), dtype)
            second = _rounded(tl.load(norm_ptr + half + D // 2).to(tl.float32) * _rounded(second * inverse, dtype), dtype)
        cos_first = tl.load(cos_ptr + t * D + half).to(tl.float32)
        cos_second = tl.load(cos_ptr + t * D + D // 2 + half).to(tl.float32)
        sin_first = tl.load(sin_ptr + t * D + half).to(tl.float32)
        sin_second = tl.load(sin_ptr + t * D + D // 2 + half).to(tl.float32)
        # x cos + (-x2, x1) sin (engine.pointwise.rotate), each product and the sum rounded
        rotated_first = _rounded(_rounded(first * cos_first, dtype) + _rounded(-second * sin_first, dtype), dtype)
        second = _rounded(_rounded(second * cos_second, dtype) + _rounded(first * sin_second, dtype), dtype)
        first = rotated_first
    if head < HEADS:
        out = q_ptr + (t * HEADS + head) * D + half
    else:
        which = (head - HEADS) // KV_HEADS  # 0 keys, 1 values
        slot = tl.load(slots_ptr + t)
        out = kv_ptr + which * kv_which_stride + ((head - HEADS) % KV_HEADS) * kv_head_stride + slot * kv_slot_stride + half
    tl.store(out, first.to(dtype))
    tl.store(out + D // 2, second.to(dtype))


def store_attention_inputs(
    parts: torch.Tensor,  # [S, T, H + 2 KVH, D]: partial sums of the fused q/k/v projection (S = 1: the output)
    cos: torch.Tensor,  # [T, D]
    sin: torch.Tensor,
    num_q_heads: int,
    q_norm: tuple[torch.Tensor, float] | None,  # Qwen3: (weight, eps) of the per-head norms
    k_norm: tuple[torch.Tensor, float] | None,
    kv: torch.Tensor,  # [2, KVH, slots, D]: this layer's cache
    slots: torch.Tensor,  # [T] where the tokens' keys and values go
) -> torch.Tensor:
    """q [T, H, D] for attention, after writing k and v at `slots` of kv: engine.pointwise's
    attention_inputs and the cache write, from the partial sums, in one kernel."""
    split, tokens, heads, head_dim = parts.shape
    if parts.stride(-1) != 1 or parts.stride(-2) != head_dim or kv.stride(-1) != 1:
        raise ValueError("store_attention_inputs reads heads whole: the last two dimensions must be contiguous")
    q = torch.empty(tokens, num_q_heads, head_dim, dtype=kv.dtype, device=kv.device)
    no_norm = (cos, 0.0)  # any pointer: not read
    (q_weight, q_eps), (k_weight, k_eps) = q_norm or no_norm, k_norm or no_norm
    _store_attention_inputs[(tokens, heads)](
        parts, q, kv, slots, cos.contiguous(), sin.contiguous(), q_weight, k_weight,
        parts.stride(0), parts.stride(1), kv.stride(0), kv.stride(1), kv.stride(2), q_eps, k_eps,
        SPLIT=split, HEADS=num_q_heads, KV_HEADS=(heads - num_q_heads) // 2, D=head_dim,
        QK_NORM=q_norm is not None,
        num_warps=1,  # a head's 128 numbers: one warp's work
        enable_fp_fusion=False,  # a fused multiply-add would skip the rounding of the product that torch does
    )
    return q


def supported(head_dim: int) -> bool:
    """A head's halves are one power-of-two block each (triton's aranges)."""
    return head_dim >= 4 and head_dim & (head_dim - 1) == 0
