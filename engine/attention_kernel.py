"""Attention for draft steps: a few tree tokens against the whole KV cache, split along the cache.

A draft step attends 1-32 tokens to every cached slot. The library kernels give each head one
program that walks the slots in order, so their time grows with the context while most of the GPU
idles: on an H200 (7B shapes, 6 tokens) cuDNN's took 10.6 us per layer at 256 slots and 46 us at
2048, 1.3 ms of a draft step over 28 layers. Here the slots are cut into CHUNK-long pieces, one
program per (query head, piece), each keeping flash attention's running maximum and sum, and a
second small kernel merges the pieces in a fixed order (deterministic, and nothing to reset, so CUDA
graphs replay it). With one piece the first kernel writes the output itself.

The loops run to compile-time counts (the interpreter that runs the tests on a CPU cannot loop to
a runtime bound): the merge loops over every piece the whole cache could hold (`piece_loop_count`)
and skips those past the slots, so one compilation serves every context length; the number of slots
itself is a runtime argument.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.pointwise import sdpa_attention

MAX_TOKENS = 32  # rows of one program's tile; more go to torch's attention
CHUNK = 256  # cache slots per program
BLOCK_SLOTS = 128  # slots per step of a program's loop


@triton.jit
def softmax_step(scores, values, best, total, acc):
    """Flash attention's step: a block of scores [rows, block] and values [block, D] into each row's
    running maximum, sum of exponentials and unnormalised output."""
    new_best = tl.maximum(best, tl.max(scores, 1))
    shift = tl.where(new_best == float("-inf"), 0.0, new_best)  # a row that may attend nothing yet
    weights = tl.exp(scores - shift[:, None])
    rescale = tl.exp(best - shift)
    total = total * rescale + tl.sum(weights, 1)
    acc = acc * rescale[:, None] + tl.dot(weights.to(values.dtype), values)
    return new_best, total, acc


@triton.jit
def _attend_piece(
    q_ptr, k_ptr, v_ptr, bias_ptr, out_ptr, partial_ptr, stats_ptr,
    T, SLOTS, q_head_stride, q_token_stride, kv_head_stride, kv_slot_stride, bias_row_stride, scale,
    GROUP: tl.constexpr, D: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr,
    STEPS: tl.constexpr, BLOCK: tl.constexpr, SINGLE: tl.constexpr,
):
    """Program (head, piece): softmax(q K^T * scale + bias) V over slots [piece * STEPS * BLOCK, +
    STEPS * BLOCK), q head `head` reading key/value head head // GROUP (grouped-query attention).
    One piece (SINGLE): the output [T, H, D]. Several: the unnormalised sums [pieces, H, BLOCK_T, D]
    and, per row, the running maximum and sum of exponentials [pieces, H, BLOCK_T, 2] (`_merge_pieces`)."""
    head = tl.program_id(0)
    piece = tl.program_id(1)
    heads = tl.num_programs(0)
    rows = tl.arange(0, BLOCK_T)
    dims = tl.arange(0, D)
    row_ok = rows < T
    q = tl.load(q_ptr + head * q_head_stride + rows[:, None] * q_token_stride + dims[None, :], mask=row_ok[:, None], other=0.0)
    best = tl.full((BLOCK_T,), float("-inf"), tl.float32)
    total = tl.zeros((BLOCK_T,), tl.float32)
    acc = tl.zeros((BLOCK_T, D), tl.float32)
    for step in range(STEPS):
        slots = (piece * STEPS + step) * BLOCK + tl.arange(0, BLOCK)
        slot_ok = slots < SLOTS
        at = (head // GROUP) * kv_head_stride + slots[:, None] * kv_slot_stride + dims[None, :]
        keys = tl.load(k_ptr + at, mask=slot_ok[:, None], other=0.0)
        values = tl.load(v_ptr + at, mask=slot_ok[:, None], other=0.0)
        scores = tl.where(slot_ok[None, :], tl.dot(q, tl.trans(keys)) * scale, float("-inf"))
        if HAS_BIAS:
            scores += tl.load(bias_ptr + rows[:, None] * bias_row_stride + slots[None, :],
                              mask=row_ok[:, None] & slot_ok[None, :], other=0.0).to(tl.float32)
        best, total, acc = softmax_step(scores, values, best, total, acc)
    if SINGLE:
        out = acc / tl.where(total == 0.0, 1.0, total)[:, None]
        at = (rows[:, None] * heads + head) * D + dims[None, :]
        tl.store(out_ptr + at, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    else:
        at = (piece * heads + head) * BLOCK_T + rows
        tl.store(partial_ptr + at[:, None] * D + dims[None, :], acc)
        tl.store(stats_ptr + at * 2, best)
        tl.store(stats_ptr + at * 2 + 1, total)


@triton.jit
def _merge_pieces(
    partial_ptr, stats_ptr, out_ptr, T, pieces,
    D: tl.constexpr, BLOCK_T: tl.constexpr, PIECES: tl.constexpr,
):
    """Program head: the `pieces` pieces' sums rescaled to their common maximum, added in order,
    normalised (the loops run to PIECES and skip the rest)."""
    head = tl.program_id(0)
    heads = tl.num_programs(0)
    rows = tl.arange(0, BLOCK_T)
    dims = tl.arange(0, D)
    best = tl.full((BLOCK_T,), float("-inf"), tl.float32)
    for piece in range(PIECES):
        if piece < pieces:
            best = tl.maximum(best, tl.load(stats_ptr + ((piece * heads + head) * BLOCK_T + rows) * 2))
    shift = tl.where(best == float("-inf"), 0.0, best)
    total = tl.zeros((BLOCK_T,), tl.float32)
    acc = tl.zeros((BLOCK_T, D), tl.float32)
    for piece in range(PIECES):
        if piece < pieces:
            at = (piece * heads + head) * BLOCK_T + rows
            rescale = tl.exp(tl.load(stats_ptr + at * 2) - shift)
            total += rescale * tl.load(stats_ptr + at * 2 + 1)
            acc += rescale[:, None] * tl.load(partial_ptr + at[:, None] * D + dims[None, :])
    out = acc / tl.where(total == 0.0, 1.0, total)[:, None]
    tl.store(out_ptr + (rows[:, None] * heads + head) * D + dims[None, :], out.to(out_ptr.dtype.element_ty),
             mask=(rows < T)[:, None])


def draft_attention(
    q: torch.Tensor,  # [H, T, D], rows of D contiguous
    keys: torch.Tensor,  # [KVH, slots, D]
    values: torch.Tensor,
    bias: torch.Tensor | None,  # [1, 1, T, slots] additive (engine.pointwise.attention_bias); None = attend all
) -> torch.Tensor:
    """softmax(q K^T / sqrt(D) + bias) V as [T, H, D] (what scaled_dot_product_attention computes
    with enable_gqa, tokens outermost)."""
    heads, tokens, dim = q.shape
    kv_heads, slots, _ = keys.shape
    if tokens > MAX_TOKENS:  # not a draft step's frontier
        return sdpa_attention(q, keys, values, bias)
    if q.stride(-1) != 1 or keys.stride() != values.stride() or keys.stride(-1) != 1:
        raise ValueError("draft_attention reads rows of D contiguous, keys and values alike")
    pieces = triton.cdiv(slots, CHUNK)
    steps = triton.cdiv(min(slots, CHUNK), BLOCK_SLOTS)
    block_t = 16 if tokens <= 16 else MAX_TOKENS
    out = torch.empty(tokens, heads, dim, dtype=q.dtype, device=q.device)
    partial = torch.empty(pieces, heads, block_t, dim, dtype=torch.float32, device=q.device) if pieces > 1 else out
    stats = torch.empty(pieces, heads, block_t, 2, dtype=torch.float32, device=q.device) if pieces > 1 else out
    bias_rows = bias[0, 0] if bias is not None else q  # any pointer: not read
    _attend_piece[(heads, pieces)](
        q, keys, values, bias_rows, out, partial, stats,
        tokens, slots, q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), bias_rows.stride(0), dim**-0.5,
        GROUP=heads // kv_heads, D=dim, HAS_BIAS=bias is not None, BLOCK_T=block_t, STEPS=steps,
        BLOCK=BLOCK_SLOTS, SINGLE=pieces == 1, num_warps=4, num_stages=2,
    )
    if pieces > 1:
        _merge_pieces[(heads,)](partial, stats, out, tokens, pieces, D=dim, BLOCK_T=block_t,
                                PIECES=piece_loop_count(keys), num_warps=4)
    return out


def piece_loop_count(keys: torch.Tensor) -> int:
    """The kernels' compile-time piece count for `keys` [KVH, slots, D], a view of a cache's first
    slots: every CHUNK-slot piece the whole cache could hold, rounded up to a power of two. Loops run
    to it and skip the pieces past the keys, so one compilation serves every context length of a
    cache: a count from the view's own length compiled anew as a conversation grew, and its first
    turn at a length the load's warm-up had not reached waited for the compiler."""
    capacity = max(keys.shape[1], keys.stride(0) // keys.stride(1))  # the head stride spans the cache
    return triton.next_power_of_2(triton.cdiv(capacity, CHUNK))


def supported(head_dim: int) -> bool:
    """Heads are one power-of-two block, at least 16 wide (tensor-core dot products)."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0
