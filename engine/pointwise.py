"""The element-wise math of a decoder layer: RMSNorm (with the residual add before it), rotary
embeddings (with Qwen3's per-head norms, and the cache write after them) and the gated activation.

Eager, each of these is a handful of small kernels; at the draft's 6 tokens they cost more than
their bytes (profiled on an H200: ~40 element-wise kernels per layer, 1204 kernels per 7B draft
step). `compiled_pointwise` hands the same functions to torch.compile, which fuses each into one
kernel; drafts use it on a GPU. Given the compute dtype, they also take the projections before them
as split-K partial sums (engine.int4_kernel.TritonInt4Linear.partial_sums) and add them as they
read them, where the linear would otherwise launch a kernel of its own to add them; the rotary
embedding then comes from engine.rotary_kernel, which also writes the cache (inductor gave it a
summing kernel of its own). The target runs the eager functions: they are exactly the
transformers modules' math, so plain decoding and verification compute the same numbers as
`generate` does, up to the rounding of kernels that see more rows; `row_invariant` (the default in
16-bit dtypes) removes that too (README: "Greedy output and bfloat16").
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import partial
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, rows: int | None = None) -> torch.Tensor:
    """transformers' Llama/Qwen2/Qwen3 RMSNorm, operation for operation; with `rows`, its one
    reduction runs on fixed chunks of rows (row_mean)."""
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(row_mean(h.pow(2), rows) + eps)
    return weight * h.to(dtype)


def row_mean(x: torch.Tensor, rows: int | None) -> torch.Tensor:
    """x.mean(-1, keepdim=True), with `rows`: on fixed chunks of `rows` rows (dim 0, the last
    zero-padded), each written in place. A reduction's kernel sums in an order chosen by the shape
    it sees; every other operation of a layer between its matmuls is element-wise and gives an
    element the same bits in any shape, so only the reductions and the matmuls are chunked."""
    if rows is None:
        return x.mean(-1, keepdim=True)
    count, x = x.shape[0], pad_rows(x, rows)
    out = x.new_empty((*x.shape[:-1], 1))
    for start in range(0, x.shape[0], rows):
        torch.mean(x[start : start + rows], -1, keepdim=True, out=out[start : start + rows])
    return out[:count]


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float,
                 rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual stream after adding `delta`, and its norm (what the next block reads)."""
    x = x + delta
    return x, rms_norm(x, weight, eps, rows)


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
    rows: int | None = None,  # the norms' reductions on chunks of rows (row_mean)
) -> torch.Tensor:
    """The same [T, H + 2 KVH, D] heads with q and k normalised per head (where the model does)
    and rotated, v as it was: one output, so a compiled draft writes it in one kernel, attention
    reads q as a view and the cache takes k and v in one copy."""
    num_kv_heads = (heads.shape[1] - num_q_heads) // 2
    q, k, v = heads.split((num_q_heads, num_kv_heads, num_kv_heads), dim=1)
    if q_norm is not None and k_norm is not None:
        q, k = rms_norm(q, *q_norm, rows), rms_norm(k, *k_norm, rows)
    cos, sin = cos[:, None], sin[:, None]  # the same angle for every head of a token
    return torch.cat((rotate(q, cos, sin), rotate(k, cos, sin), v), dim=1)


def gated(act: Callable[[torch.Tensor], torch.Tensor], gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return act(gate) * up


def stored(heads_of: Callable) -> Callable:
    """`heads_of` (attention_inputs or a compiled copy), then the cache write: the function returns
    q [T, H, D] for attention after storing k and v at `slots` of the layer's cache kv [2, KVH, slots, D]."""

    def store_attention_inputs(qkv, cos, sin, num_q_heads, q_norm, k_norm, kv, slots) -> torch.Tensor:
        heads = heads_of(qkv, cos, sin, num_q_heads, q_norm, k_norm)
        # Views, no copies: the cache's [2, KVH, T, D] out of the [T, heads, D] rows (the first
        # len(slots) of them: a row-invariant forward's padding rows store nothing).
        kv.index_copy_(2, slots, heads[: slots.shape[0], num_q_heads:].unflatten(1, (2, -1)).permute(1, 2, 0, 3))
        return heads[:, :num_q_heads]

    return store_attention_inputs


def sdpa_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """q [H, T, D] attending keys and values [KVH, slots, D] (grouped-query) with an additive bias
    [1, 1, T, slots]: torch's attention, with the backends the caller put in force, as [T, H, D]."""
    out = F.scaled_dot_product_attention(q[None], keys[None], values[None], attn_mask=bias, enable_gqa=True)
    # The GPU's attention kernels write q's layout, tokens outermost: this transpose is a view there.
    return out[0].transpose(0, 1)


def attention_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The [T, kv_end] boolean mask as the additive 0 / -inf bias attention adds, [1, 1, T, kv_end],
    made once per forward: given the boolean mask, attention converts it in every layer (and pads
    its rows to an aligned stride, a copy more). Rows here are padded to 16 elements up front."""
    rows, end = mask.shape
    bias = torch.full((rows, -(-end // 16) * 16), float("-inf"), dtype=dtype, device=mask.device)
    bias[:, :end].masked_fill_(mask, 0.0)
    return bias[None, None, :, :end]


class VisibleKeys(NamedTuple):
    """Per row of a forward, the cache slots it attends: `order` [T, kv_end] lists them first, in
    slot order (the others after), `counts` [T] says how many there are."""

    order: torch.Tensor
    counts: torch.Tensor


def visible_keys(mask: torch.Tensor, dtype: torch.dtype) -> VisibleKeys:
    """The [T, kv_end] boolean mask as each row's visible slots (the row-invariant target's form of
    it, made once per forward; `dtype` is unused, as every attention_mask function takes it)."""
    hidden = (~mask).to(torch.uint8)  # a stable sort puts a row's visible slots first, in order
    return VisibleKeys(torch.argsort(hidden, dim=1, stable=True).to(torch.int32), mask.sum(1, dtype=torch.int32))


def causal_bias(slots: torch.Tensor, kv_end: int, dtype: torch.dtype) -> torch.Tensor:
    """attention_bias of a causal chunk: row r (slot slots[r]) sees the slots up to its own."""
    return attention_bias(torch.arange(kv_end, device=slots.device)[None] <= slots[:, None], dtype)


def causal_visible_keys(slots: torch.Tensor, kv_end: int, dtype: torch.dtype) -> VisibleKeys:
    """visible_keys of a causal chunk without its sort: every row sees the slots 0 .. its own in
    order, so all rows share one list (broadcast, no memory per row; a prefill makes one per layer
    and chunk)."""
    order = torch.arange(kv_end, dtype=torch.int32, device=slots.device).expand(slots.numel(), kv_end)
    return VisibleKeys(order, (slots + 1).to(torch.int32))


def row_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: VisibleKeys | None) -> torch.Tensor:
    """sdpa_attention computed row by row, each token over only the keys it sees, gathered in slot
    order: a tree node's prefix and ancestors are exactly the keys its token sees in plain decoding,
    in the same order, so its row is the one a one-token forward computes (same shapes, same
    kernel). Waits on the device for every row's key count: meant for the CPU (a GPU runs
    engine.row_attention_kernel)."""
    rows = []
    for r in range(q.shape[1]):
        # A gathered copy either way: plain decoding's rows read the same contiguous layout.
        seen = torch.arange(keys.shape[1], device=keys.device) if visible is None else visible.order[r, : int(visible.counts[r])]
        rows.append(sdpa_attention(q[:, r : r + 1], keys[:, seen], values[:, seen], None)[0])
    return torch.stack(rows)


def pad_rows(x: torch.Tensor, rows: int | None) -> torch.Tensor:
    """x [T, ...] with zero rows added up to a multiple of `rows` (None: x as it is)."""
    if not rows or x.shape[0] % rows == 0:
        return x
    return F.pad(x, (0, 0) * (x.dim() - 1) + (0, -x.shape[0] % rows))


def chunked_linear(rows: int) -> Callable:
    """F.linear on fixed chunks of `rows` rows, the last zero-padded, each chunk's product written
    in place: every call runs the same shapes, so a row's result does not depend on the number of
    rows around it (a matmul kernel sums in another order for another shape). A forward whose rows
    are padded already (Pointwise.rows) pads nothing here."""

    def linear_on_chunks(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        count, x = x.shape[0], pad_rows(x, rows)
        out = x.new_empty((x.shape[0], weight.shape[0]))
        for start in range(0, x.shape[0], rows):
            chunk = slice(start, start + rows)
            # F.linear's own calls (addmm with a bias, else mm), straight into the output.
            if bias is None:
                torch.mm(x[chunk], weight.t(), out=out[chunk])
            else:
                torch.addmm(bias, x[chunk], weight.t(), out=out[chunk])
        return out[:count]

    linear_on_chunks.rows = rows
    return linear_on_chunks


@dataclass(frozen=True)
class Pointwise:
    """The functions a forward pass calls between its matmuls: the element-wise math and attention.
    With `partial_sums`, the forward hands the element-wise ones [S, ...] partial sums of the
    projection before them (S = 1 for a linear that does not split; engine.model._linear)."""

    add_rms_norm: Callable = add_rms_norm
    store_attention_inputs: Callable = stored(attention_inputs)
    gated: Callable = gated
    attend: Callable = sdpa_attention
    attention_mask: Callable = attention_bias  # what `attend` takes for the [T, kv_end] boolean mask
    causal_mask: Callable = causal_bias  # the same for a causal chunk: (slots, kv_end, dtype)
    partial_sums: bool = False
    rms_norm: Callable = rms_norm
    linear: Callable = F.linear  # the dense matmuls (the target's, lm_head)
    # The row-invariant target's chunk: the forward pads its rows to a multiple of it once, so the
    # functions above find whole chunks (one padding copy per layer, attention's output, not 14).
    rows: int | None = None


EAGER = Pointwise()
# The row-invariant target's chunk (engine.build.target_pointwise): 128 rows on a GPU, where a chunk
# costs what one row does; 32 on a CPU, whose matmuls cost by the row.
GPU_ROWS = 128
CPU_ROWS = 32


def row_invariant(rows: int, attend: Callable = row_attention) -> Pointwise:
    """The target computing every token's row as plain decoding would, whatever the rows verified
    with it (EngineConfig.row_invariant): greedy output token-identical to plain decoding in
    bfloat16 too. Matmuls and the norms' reductions run on chunks of `rows` rows (a GPU reads the
    weights once per chunk; on an H200 a 289-row 7B down projection took 0.07 ms whole, 0.16 in
    128-row chunks and 0.43 in 32-row ones, one row 0.04 plain and 0.06 in any), the element-wise
    math on all rows at once (a 1500-token prefill launched 18,080 kernels with every function on
    chunks, the host issuing them was the prefill's bound); `attend` takes VisibleKeys."""
    return Pointwise(
        add_rms_norm=partial(add_rms_norm, rows=rows),
        store_attention_inputs=stored(partial(attention_inputs, rows=rows)),  # Qwen3's per-head norms
        attend=attend,
        attention_mask=visible_keys,
        causal_mask=causal_visible_keys,
        rms_norm=partial(rms_norm, rows=rows),
        linear=chunked_linear(rows),
        rows=rows,
    )


def compiled_pointwise(backend: str | Callable = "inductor", dtype: torch.dtype | None = None) -> Pointwise:
    """torch.compile'd versions. Shapes start static and turn dynamic once a second shape shows up
    (torch.compile's default): draft widths, bucketed lengths and other models in the same process
    then share a few compilations per function (up to RECOMPILE_LIMIT). A function that fails to
    compile warns once and runs eagerly from then on. With `dtype` (the compute dtype), the functions take partial
    sums and round their totals to it, as the linear would have. Attention stays torch's (engine.build
    swaps in the Triton kernels where they run)."""
    if dtype is None:
        return Pointwise(_compiled(add_rms_norm, backend), stored(_compiled(attention_inputs, backend)),
                         _compiled(gated, backend))
    return Pointwise(
        _compiled(_add_rms_norm_of_sums(dtype), backend),
        stored(_compiled(_attention_inputs_of_sums(dtype), backend)),
        _compiled(_gated_of_sums(dtype), backend),
        partial_sums=True,
    )


# Partial sums [S, ...] in, their totals rounded to dtype used: what the linear would have returned.
# One function each (not one generic wrapper): dynamo caches compilations per code object, and
# three functions sharing one would share its recompile limit.
def _add_rms_norm_of_sums(dtype: torch.dtype) -> Callable:
    def add_rms_norm_of_sums(x, partial_delta, weight, eps):
        return add_rms_norm(x, partial_delta.sum(0).to(dtype), weight, eps)

    return add_rms_norm_of_sums


def _attention_inputs_of_sums(dtype: torch.dtype) -> Callable:
    def attention_inputs_of_sums(partial_heads, *args):
        return attention_inputs(partial_heads.sum(0).to(dtype), *args)

    return attention_inputs_of_sums


def _gated_of_sums(dtype: torch.dtype) -> Callable:
    def gated_of_sums(act, partial_gate, partial_up):
        return gated(act, partial_gate.sum(0).to(dtype), partial_up.sum(0).to(dtype))

    return gated_of_sums


# Compilations one function may keep (dynamo's default: 8, then a fullgraph function fails). Each
# model in a process adds some: norms take float32 partial sums from one projection and a bfloat16
# total from another, epsilons differ between models. An H200 run (Llama-3.1-8B, then Qwen2.5-32B)
# ran out of 8 on the second model and drafted with eager norms, 12.7 ms a step instead of 9.6.
RECOMPILE_LIMIT = 64


def _compiled(fn: Callable, backend: str | Callable) -> Callable:
    compiled = torch.compile(fn, backend=backend, fullgraph=True)
    use = [compiled]

    def call(*args):
        try:
            with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
                return use[0](*args)
        except Exception as err:  # noqa: BLE001 - no compiler (triton) or a tracing gap: stay correct
            if use[0] is fn:
                raise
            warnings.warn(f"{fn.__name__} runs eagerly: torch.compile failed ({str(err)[:200]})", stacklevel=2)
            use[0] = fn
            return fn(*args)

    call.__name__ = fn.__name__
    return call
