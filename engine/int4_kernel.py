"""A 4-bit matmul for the draft's few rows, reading each weight byte once.

A draft step multiplies 1-32 tokens with every quantized linear, so its floor is the 4-bit weight
bytes over HBM bandwidth. torch's tinygemm kernel puts the tokens on the 8-wide side of its
tensor-core tile and walks the weights once per 8 tokens (16 tokens cost twice 6). Here the tokens
are the 16- or 32-row side of one tile, so up to 32 tokens share one pass over the weights.

Layout (`pack_int4`): the integers of 128 consecutive inputs sit in 16 int32 words per output. A
program loads [16, BLOCK_N] words in one coalesced read and peels them into 8 slices of [16, BLOCK_N]
weights (`_weights`), slice j covering inputs 16 j .. 16 j + 15. The two rows of a tensor-core pair
(inputs 16 j + 2 t and + 1) share a word, in its low and high 16 bits (word 2 t + j // 4, bits
4 (j % 4) .. + 3 of each half), so a mask (and one shift per word for nibbles 2 and 3) gives both as
a pair of bf16 numbers, and one fused multiply-add dequantizes them in registers with HQQ's own
numbers: w = (q - zero) * scale = q * scale + offset, rounded once to bf16. They meet 16 columns of x
in one fp32 accumulator.

Small outputs (q/k/v, o, down) give too few column tiles to keep the GPU's memory busy, so K is split
over SPLIT programs; each writes its partial sums (the bias goes into the first's) and a second,
small kernel (`_sum_partials`) adds them in a fixed order: deterministic, and nothing to reset
between calls, so CUDA graphs replay it. On the H200 the second launch costs less than the last
program of a tile adding the others' sums alone (down_proj at 6 rows: 21.7 us split 37 ways with
it, 27.1 split 4 ways without). A caller that reads the output element-wise can take the partial
sums themselves (`partial_sums`) and add them as it reads them: one kernel fewer.

Triton runs on CUDA GPUs; with TRITON_INTERPRET=1 it runs on a CPU too (how the tests check it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_K = 128  # inputs per step: 16 words of 8 nibbles
SLICE = 16  # inputs per nibble slice (one tensor-core K step)
MAX_ROWS = 32  # rows of one call (a draft step's tokens, 16 or 32 to a tile); more are split into calls
# The same numbers as the kernel reads them (a jitted function sees only constexpr globals).
_BLOCK_K = tl.constexpr(BLOCK_K)
_SLICE = tl.constexpr(SLICE)


def _dequantize_asm(j: int) -> str:
    """PTX for slice j of a word pair ($1, $2) with its scale and offset pairs ($3, $4): two weights.
    The caller passes words shifted by 8 for nibbles 2 and 3, and scale / 16 for nibbles 1 and 3:
    those stay in bits 4-7 of each half, where a bf16 read as an integer is still linear (bits 0-6
    a subnormal's fraction, bit 7 the first normal exponent), 16 x nibble x 2^-133. A mask is all
    that is left per pair."""
    word, mask = ("$1" if j < 4 else "$2"), ("0x000F000F" if j % 2 == 0 else "0x00F000F0")
    return f"{{ .reg .b32 t; and.b32 t, {word}, {mask}; fma.rn.bf16x2 $0, t, $3, $4; }}"


_DEQUANTIZE = tl.constexpr(tuple(_dequantize_asm(j) for j in range(8)))


@triton.jit
def _weights(packed, j: tl.constexpr, scale, offset, FAST: tl.constexpr):
    """Slice j of a block's weights, [16, BLOCK_N], from its [16, BLOCK_N] words: row r = 2t + u
    is nibble 4 (j % 4) of half u of word 2t + j // 4 (`pack_int4`); w = nibble x scale + offset
    (offset = -zero x scale), rounded once.

    FAST (bf16 on a GPU): a word pair's two halves are one bf16 pair already, so a mask and one
    fused multiply-add give two weights, no integer-to-float conversion (16 per cycle per
    multiprocessor, too slow to keep up with memory): the four bits are a bf16 subnormal,
    nibble x 2^-133, and the scales carry 2^p (`exact_scaling`); `packed` and `scale` are what
    `_dequantize_asm` expects for slice j."""
    if FAST:
        return tl.inline_asm_elementwise(_DEQUANTIZE[j], "=r,r,r,r,r", [packed, scale, offset],
                                         dtype=tl.bfloat16, is_pure=True, pack=2)
    pairs = tl.permute(tl.reshape(packed, (_SLICE // 2, 2, packed.shape[1])), (0, 2, 1))  # [t, n, word of pair]
    low, high = tl.split(pairs)
    words = low if j < 4 else high
    halves = tl.join((words >> (4 * (j % 4))) & 0xF, (words >> (16 + 4 * (j % 4))) & 0xF)  # [t, n, u]
    nibbles = tl.reshape(tl.permute(halves, (0, 2, 1)), (_SLICE, packed.shape[1])).to(scale.dtype)
    return nibbles * scale + offset


@triton.jit
def _int4_matmul(
    x_ptr, words_ptr, scale_ptr, offset_ptr, bias_ptr, out_ptr, partial_ptr,
    M, N, K, unscale,
    BLOCKS_PER_SPLIT: tl.constexpr, GROUP: tl.constexpr, SPLIT: tl.constexpr,
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FAST: tl.constexpr,
):
    """out[M, N] = x[M, K] W^T (+ bias) for M <= BLOCK_M; program (pid_n, pid_k) owns BLOCK_N outputs
    and the pid_k-th of SPLIT equal runs of 128-input blocks. Split, it writes its partial sums
    instead (`_sum_partials` finishes)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    words = tl.arange(0, _SLICE)
    inputs = tl.arange(0, _SLICE)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in range(BLOCKS_PER_SPLIT):  # SPLIT divides the blocks: no program has a ragged end
        block = pid_k * BLOCKS_PER_SPLIT + i
        at_words = (block * _SLICE + words)[:, None] * N + cols[None, :]
        packed = tl.load(words_ptr + at_words, mask=col_ok[None, :], other=0)
        shifted = packed >> 8  # nibbles 2 and 3 of each half in bits 0-7: one shift per word, not per slice
        for g in tl.static_range(_BLOCK_K // GROUP):
            group = block * (_BLOCK_K // GROUP) + g
            scale = tl.load(scale_ptr + group * N + cols, mask=col_ok, other=0.0)
            offset = tl.load(offset_ptr + group * N + cols, mask=col_ok, other=0.0)
            scale16 = scale * 0.0625  # exact: a power of two
            for s in tl.static_range(g * (GROUP // _SLICE), (g + 1) * (GROUP // _SLICE)):
                k = block * _BLOCK_K + s * _SLICE + inputs
                x_ok = row_ok[:, None] if EVEN_K else row_ok[:, None] & (k[None, :] < K)
                x = tl.load(x_ptr + rows[:, None] * K + k[None, :], mask=x_ok, other=0.0)
                if FAST:
                    words_s, scale_s = packed if s % 4 < 2 else shifted, scale if s % 2 == 0 else scale16
                else:
                    words_s, scale_s = packed, scale
                w = _weights(words_s, s, tl.broadcast_to(scale_s[None, :], (_SLICE, BLOCK_N)),
                             tl.broadcast_to(offset[None, :], (_SLICE, BLOCK_N)), FAST)
                acc = tl.dot(x, w, acc)
    acc *= unscale  # a power of two: exact
    at = rows[:, None] * N + cols[None, :]
    ok = row_ok[:, None] & col_ok[None, :]
    if HAS_BIAS:
        if pid_k == 0:  # once: into the first run's partial sums when K is split
            acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if SPLIT > 1:
        tl.store(partial_ptr + pid_k * BLOCK_M * N + at, acc, mask=ok)
    else:
        tl.store(out_ptr + at, acc.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _sum_partials(partial_ptr, out_ptr, M, N, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[M, N] = the SPLIT partial sums [SPLIT, BLOCK_M, N] added in a fixed order."""
    rows = tl.arange(0, BLOCK_M)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    at = rows[:, None] * N + cols[None, :]
    ok = (rows < M)[:, None] & (cols < N)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for split in tl.static_range(SPLIT):  # unrolled: every partial's load in flight at once
        acc += tl.load(partial_ptr + split * BLOCK_M * N + at, mask=ok, other=0.0)
    tl.store(out_ptr + at, acc.to(out_ptr.dtype.element_ty), mask=ok)


def pack_int4(q: torch.Tensor, rows_at_once: int = 4096) -> torch.Tensor:
    """[N, K] integers 0..15 -> [ceil(K / 128) * 16, N] int32 words (module docstring's layout);
    K is padded with zeros to whole 128-input blocks (their x is masked to 0 in the kernel).
    Packed `rows_at_once` outputs at a time: the temporaries stay small next to the weights."""
    n, k = q.shape
    blocks = triton.cdiv(k, BLOCK_K)
    words = torch.empty(blocks * SLICE, n, dtype=torch.int32, device=q.device)
    for start in range(0, n, rows_at_once):
        part = torch.nn.functional.pad(q[start : start + rows_at_once], (0, blocks * BLOCK_K - k))
        # [n, block, half h, nibble jj, pair t, u]: input 16 (4 h + jj) + 2 t + u
        nibbles = part.view(part.shape[0], blocks, 2, 4, SLICE // 2, 2).to(torch.int32)
        packed = torch.zeros(part.shape[0], blocks, SLICE // 2, 2, dtype=torch.int32, device=q.device)
        for jj in range(4):
            for u in range(2):  # the top nibble wraps into the sign bit
                packed |= nibbles[:, :, :, jj, :, u].transpose(2, 3) << (16 * u + 4 * jj)
        words[:, start : start + part.shape[0]] = packed.view(part.shape[0], -1).t()
    return words


# Fewer 128-input blocks per program: its start and its partial sums cost more than its blocks gain.
MIN_BLOCKS_PER_PROGRAM = 4
SUM_COLUMNS = 128  # outputs per program of _sum_partials
# The most partial sums handed to a reader (`partial_sums`): a reader adds a row's sums in one program,
# where _sum_partials spreads them over many.
MAX_SPLIT_READ = 8


def choose_tiles(n: int, k: int, multiprocessors: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, SPLIT, warps, stages), the rule fitted to H200 sweeps of the 7B linears (6 and 16
    rows; README "GPU performance"): 4 warps and 3 stages won everywhere (8 warps lost by up to
    2x; 2, 4 or 6 stages were slower or within noise). 256 columns per program, else 64, with K
    split by the smallest divisor of its 128-input blocks that gives 2.5 programs per multiprocessor
    (fewer starve the memory system) and leaves each program MIN_BLOCKS_PER_PROGRAM blocks; where
    neither width can, 64 columns and the largest split that keeps those blocks."""
    tiles_of = {block_n: triton.cdiv(n, block_n) for block_n in (256, 64)}
    blocks = triton.cdiv(k, BLOCK_K)
    splits = [s for s in range(1, blocks + 1) if blocks % s == 0 and blocks // s >= min(MIN_BLOCKS_PER_PROGRAM, blocks)]
    for block_n, tiles in tiles_of.items():
        split = next((s for s in splits if tiles * s >= 2.5 * multiprocessors), None)
        if split is not None:
            return block_n, split, 4, 3
    return 64, splits[-1], 4, 3


def _workspace(device: torch.device, numel: int) -> torch.Tensor:
    """A buffer for split programs' partial sums, shared by the linears built after it: a draft step
    runs them one after another on one stream. A linear keeps the buffer it was built with (its CUDA
    graphs write there), so a bigger one made for a later linear never frees it."""
    buffer = _WORKSPACES.get(device)
    if buffer is None or buffer.numel() < numel:
        buffer = _WORKSPACES[device] = torch.empty(numel, dtype=torch.float32, device=device)
    return buffer


_WORKSPACES: dict[torch.device, torch.Tensor] = {}


class TritonInt4Linear(torch.nn.Module):
    """y = x W^T + b with W = (q - zero) * scale (HQQ's 4-bit quantization, groups along K)."""

    def __init__(
        self,
        q: torch.Tensor,  # [N, K] integers 0..15
        scale: torch.Tensor,  # [N, K / group_size]
        zero: torch.Tensor,  # [N, K / group_size], HQQ's float zero points
        group_size: int,
        bias: torch.Tensor | None,
        dtype: torch.dtype,
        tiles: tuple[int, int, int, int] | None = None,  # (BLOCK_N, SPLIT, warps, stages): choose_tiles
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.group_size = group_size
        self.words = pack_int4(q)
        groups = self.words.shape[0] * 8 // group_size
        # [groups, N], zero past K: padded inputs add nothing.
        self.scale = _by_group(scale, groups, dtype)
        self.offset = _by_group(-zero * scale, groups, dtype)
        self.fast = q.is_cuda and dtype == torch.bfloat16
        self.unscale = 1.0
        if self.fast:
            self.scale, self.offset, self.unscale = exact_scaling(self.scale, self.offset)
        self.bias = bias
        multiprocessors = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 4
        tiles = tiles or choose_tiles(self.out_features, self.in_features, multiprocessors)
        self.block_n, self.split, self.warps, self.stages = tiles
        self.blocks = triton.cdiv(self.in_features, BLOCK_K)
        if self.blocks % self.split:
            raise ValueError(f"SPLIT {self.split} does not divide {self.blocks} blocks of {BLOCK_K} inputs")
        self.partial = _workspace(q.device, self.split * MAX_ROWS * self.out_features if self.split > 1 else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).contiguous()
        out = torch.empty(rows.shape[0], self.out_features, dtype=x.dtype, device=x.device)
        for start in range(0, rows.shape[0], MAX_ROWS):
            chunk, chunk_out = rows[start : start + MAX_ROWS], out[start : start + MAX_ROWS]
            self._launch(chunk, chunk_out)
            if self.split > 1:
                _sum_partials[(triton.cdiv(self.out_features, SUM_COLUMNS),)](
                    self.partial, chunk_out, chunk.shape[0], self.out_features,
                    SPLIT=self.split, BLOCK_M=_block_m(chunk), BLOCK_N=SUM_COLUMNS,
                )
        return out.view(*x.shape[:-1], self.out_features)

    def partial_sums(self, x: torch.Tensor) -> torch.Tensor:
        """[S, *x.shape[:-1], N]: S float32 partial sums whose total is x W^T + b (the bias is in the
        first), added in the reader's own kernel instead of a separate one. S = 1, the output
        itself, where K is not split, or split more than MAX_SPLIT_READ ways, or x has more rows
        than one call takes. They live in the workspace the linears share: read them before the
        next linear runs."""
        rows = x.reshape(-1, self.in_features).contiguous()
        if not 1 < self.split <= MAX_SPLIT_READ or rows.shape[0] > MAX_ROWS:
            return self(x)[None]
        self._launch(rows, self.partial)  # the output pointer is not written when K is split
        sums = self.partial[: self.split * _block_m(rows) * self.out_features]
        return sums.view(self.split, -1, self.out_features)[:, : rows.shape[0]].unflatten(1, x.shape[:-1])

    def _launch(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """The matmul kernel for x's <= MAX_ROWS rows: out, or the partial sums when K is split."""
        grid = (triton.cdiv(self.out_features, self.block_n), self.split)
        bias = self.bias if self.bias is not None else self.scale  # any pointer: not read
        _int4_matmul[grid](
            x, self.words, self.scale, self.offset, bias, out, self.partial,
            x.shape[0], self.out_features, self.in_features, self.unscale, BLOCKS_PER_SPLIT=self.blocks // self.split,
            GROUP=self.group_size, SPLIT=self.split, HAS_BIAS=self.bias is not None,
            EVEN_K=self.in_features % BLOCK_K == 0, BLOCK_M=_block_m(x), BLOCK_N=self.block_n, FAST=self.fast,
            num_warps=self.warps, num_stages=self.stages,
        )

    @property
    def nbytes(self) -> int:
        """Its own bytes (the partial-sum buffer is shared: a few MB for a whole model)."""
        bias = self.bias.nbytes if self.bias is not None else 0
        return self.words.nbytes + self.scale.nbytes + self.offset.nbytes + bias


def _block_m(x: torch.Tensor) -> int:
    """Rows of the kernel's tile for x: 16, or 32 (MAX_ROWS)."""
    return 16 if x.shape[0] <= 16 else 32


def exact_scaling(scale: torch.Tensor, offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """bf16 scales and offsets for the FAST path's subnormal nibbles: scale x 2^p and offset x
    2^(p-133), so nibble x 2^-133 x scale' + offset' = (nibble x scale + offset) x 2^(p-133), rounded
    once like HQQ's bf16 weight: the same bits, shifted by a power of two that the kernel takes off
    its sums (`unscale`). p is as large as the largest scale allows (below 2^127), so a weight turns
    subnormal only under 2^(7-p), and a scale / 16 (the kernel's, for nibbles left in bits 4-7) only
    2^-248 below the largest: far below any real one. In float64: 2^p alone overflows float32."""
    largest = scale.abs().max().double().clamp_min(2.0**-100)
    p = 126 - int(torch.floor(torch.log2(largest)).item())
    scaled = (scale.double() * 2.0**p).to(scale.dtype), (offset.double() * 2.0 ** (p - 133)).to(offset.dtype)
    return *scaled, 2.0 ** (133 - p)


def _by_group(values: torch.Tensor, groups: int, dtype: torch.dtype) -> torch.Tensor:
    out = torch.zeros(groups, values.shape[0], dtype=dtype, device=values.device)
    out[: values.shape[1]] = values.t()
    return out.contiguous()
