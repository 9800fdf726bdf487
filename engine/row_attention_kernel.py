"""Attention for the row-invariant target: every token's row computed as plain decoding computes it.

A tree node sees the prompt, its ancestors and itself: in slot order, exactly the keys its token
sees when plain decoding reaches it, at the same logical positions 0, 1, 2, ... So each row walks
its own list of visible slots (engine.pointwise.VisibleKeys) in CHUNK-long logical pieces; a piece's
maximum, sum of exponentials and output start from nothing, and the pieces merge in order, each into
the running result. Nothing in a row's arithmetic depends on the other rows or on the slots it does
not see: a row merges the pieces its own keys fill, as many as plain decoding has for its token.

One program per (token, key/value head) holds the token's query heads of that group as one tile.
A many-row verification gives every program all the pieces of its row; plain decoding's single row
spreads its pieces over programs and a second kernel merges them, in the same order with the same
function, so both compute the same bits (the kernels share their code and launch shape).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.attention_kernel import CHUNK, piece_loop_count, softmax_step
from engine.pointwise import VisibleKeys

# Pieces of CHUNK (256) logical key positions, as the draft's attention: one piece_loop_count.
BLOCK_KEYS = 64  # keys per step of a piece
NUM_WARPS = 4  # the same in both kernels: reductions across a tile follow the warps' layout
# Both kernels launch without fused multiply-adds, so the merge rounds the same way in either.


@triton.jit
def _piece(q, k_ptr, v_ptr, order_ptr, count, piece, kv_head_stride, kv_slot_stride, scale,
           BLOCK_G: tl.constexpr, D: tl.constexpr, GATHER: tl.constexpr, STEPS: tl.constexpr,
           BLOCK: tl.constexpr):
    """One piece of a row: its running maximum, sum of exponentials and unnormalised output, from
    nothing. k_ptr / v_ptr point at the row's key/value head, order_ptr at its visible-slot list."""
    dims = tl.arange(0, D)
    best = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    total = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, D), tl.float32)
    for step in range(STEPS):
        at = (piece * STEPS + step) * BLOCK + tl.arange(0, BLOCK)  # logical positions
        ok = at < count
        if GATHER:
            slots = tl.load(order_ptr + at, mask=ok, other=0)
        else:
            slots = at
        offsets = slots[:, None] * kv_slot_stride + dims[None, :]
        keys = tl.load(k_ptr + offsets, mask=ok[:, None], other=0.0)
        values = tl.load(v_ptr + offsets, mask=ok[:, None], other=0.0)
        scores = tl.where(ok[None, :], tl.dot(q, tl.trans(keys)) * scale, float("-inf"))
        best, total, acc = softmax_step(scores, values, best, total, acc)
    return best, total, acc


@triton.jit
def _merge(best, total, acc, piece_best, piece_total, piece_acc):
    """A piece merged into the running result (the next piece in order)."""
    new_best = tl.maximum(best, piece_best)
    shift = tl.where(new_best == float("-inf"), 0.0, new_best)
    old = tl.exp(best - shift)
    new = tl.exp(piece_best - shift)
    return new_best, total * old + piece_total * new, acc * old[:, None] + piece_acc * new[:, None]


@triton.jit
def _attend_rows(
    q_ptr, k_ptr, v_ptr, order_ptr, count_ptr, out_ptr, partial_ptr, stats_ptr,
    SLOTS, q_head_stride, q_token_stride, kv_head_stride, kv_slot_stride, order_row_stride, scale,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, GATHER: tl.constexpr, STEPS: tl.constexpr,
    BLOCK: tl.constexpr, PIECES: tl.constexpr, SPLIT: tl.constexpr,
):
    """Program (token, key/value head, part). SPLIT: part = one piece, stored for `_merge_parts`.
    Else: part 0, every piece merged in order, the normalised output [T, H, D] written."""
    token = tl.program_id(0)
    kv_head = tl.program_id(1)
    part = tl.program_id(2)
    row = token * tl.num_programs(1) + kv_head  # (token, key/value head) rows of GROUP query heads
    group = tl.arange(0, BLOCK_G)
    dims = tl.arange(0, D)
    in_group = group < GROUP
    q_at = (kv_head * GROUP + group)[:, None] * q_head_stride + token * q_token_stride + dims[None, :]
    q = tl.load(q_ptr + q_at, mask=in_group[:, None], other=0.0)
    if GATHER:
        count = tl.load(count_ptr + token)
    else:
        count = SLOTS
    k_ptr += kv_head * kv_head_stride
    v_ptr += kv_head * kv_head_stride
    order_ptr += token * order_row_stride
    if SPLIT:
        best, total, acc = _piece(q, k_ptr, v_ptr, order_ptr, count, part, kv_head_stride, kv_slot_stride, scale,
                                  BLOCK_G, D, GATHER, STEPS, BLOCK)
        at = (part * tl.num_programs(0) * tl.num_programs(1) + row) * BLOCK_G + group
        tl.store(partial_ptr + at[:, None] * D + dims[None, :], acc)
        tl.store(stats_ptr + at * 2, best)
        tl.store(stats_ptr + at * 2 + 1, total)
    else:
        best = tl.full((BLOCK_G,), float("-inf"), tl.float32)
        total = tl.zeros((BLOCK_G,), tl.float32)
        acc = tl.zeros((BLOCK_G, D), tl.float32)
        for piece in range(PIECES):
            if piece * STEPS * BLOCK < count:  # the pieces plain decoding has for this row, no more
                piece_best, piece_total, piece_acc = _piece(q, k_ptr, v_ptr, order_ptr, count, piece, kv_head_stride,
                                                            kv_slot_stride, scale, BLOCK_G, D, GATHER, STEPS, BLOCK)
                best, total, acc = _merge(best, total, acc, piece_best, piece_total, piece_acc)
        out = acc / tl.where(total == 0.0, 1.0, total)[:, None]
        tl.store(out_ptr + (row * GROUP + group)[:, None] * D + dims[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=in_group[:, None])


@triton.jit
def _merge_parts(partial_ptr, stats_ptr, out_ptr, SLOTS,
                 GROUP: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, PIECE_KEYS: tl.constexpr,
                 PIECES: tl.constexpr):
    """Program (token, key/value head): its pieces merged in order, normalised, written [T, H, D]."""
    row = tl.program_id(0)
    rows = tl.num_programs(0)
    group = tl.arange(0, BLOCK_G)
    dims = tl.arange(0, D)
    best = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    total = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, D), tl.float32)
    for piece in range(PIECES):
        if piece * PIECE_KEYS < SLOTS:
            at = (piece * rows + row) * BLOCK_G + group
            best, total, acc = _merge(best, total, acc, tl.load(stats_ptr + at * 2), tl.load(stats_ptr + at * 2 + 1),
                                      tl.load(partial_ptr + at[:, None] * D + dims[None, :]))
    out = acc / tl.where(total == 0.0, 1.0, total)[:, None]
    tl.store(out_ptr + (row * GROUP + group)[:, None] * D + dims[None, :], out.to(out_ptr.dtype.element_ty),
             mask=(group < GROUP)[:, None])


def row_invariant_attention(
    q: torch.Tensor,  # [H, T, D], rows of D contiguous
    keys: torch.Tensor,  # [KVH, slots, D]
    values: torch.Tensor,
    visible: VisibleKeys | None,  # None: every row sees every slot (a one-token forward)
) -> torch.Tensor:
    """softmax(q K^T / sqrt(D)) V over each row's visible keys, as [T, H, D]."""
    heads, tokens, dim = q.shape
    kv_heads, slots, _ = keys.shape
    if q.stride(-1) != 1 or keys.stride() != values.stride() or keys.stride(-1) != 1:
        raise ValueError("row_invariant_attention reads rows of D contiguous, keys and values alike")
    group = heads // kv_heads
    block_g = max(16, triton.next_power_of_2(group))  # a tensor-core tile has at least 16 rows
    pieces = triton.cdiv(slots, CHUNK)
    loop_pieces = piece_loop_count(keys)
    # Plain decoding's one row (it sees every slot): its pieces in parallel. A verification has rows enough.
    split = visible is None and tokens == 1 and pieces > 1
    out = torch.empty(tokens, heads, dim, dtype=q.dtype, device=q.device)
    partial = torch.empty(pieces, tokens * kv_heads, block_g, dim, dtype=torch.float32, device=q.device) if split else out
    stats = torch.empty(pieces, tokens * kv_heads, block_g, 2, dtype=torch.float32, device=q.device) if split else out
    order, counts = visible if visible is not None else (q, q)  # any pointers: not read
    constants = dict(GROUP=group, BLOCK_G=block_g, D=dim)
    _attend_rows[(tokens, kv_heads, pieces if split else 1)](
        q, keys, values, order, counts, out, partial, stats,
        slots, q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), order.stride(0), dim**-0.5,
        GATHER=visible is not None, STEPS=CHUNK // BLOCK_KEYS, BLOCK=BLOCK_KEYS, PIECES=loop_pieces, SPLIT=split,
        num_warps=NUM_WARPS, enable_fp_fusion=False, **constants,
    )
    if split:
        _merge_parts[(tokens * kv_heads,)](partial, stats, out, slots, PIECE_KEYS=CHUNK, PIECES=loop_pieces,
                                           num_warps=NUM_WARPS, enable_fp_fusion=False, **constants)
    return out


def supported(head_dim: int) -> bool:
    """Heads are one power-of-two block, at least 16 wide (tensor-core dot products)."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0
