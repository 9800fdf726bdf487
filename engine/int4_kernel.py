"""A 4-bit matmul for a handful of rows: the substitute's draft step multiplies 1-16 tokens.

At 6 rows a linear reads 4-bit weights and does next to no arithmetic, so its floor is the weight
bytes over HBM bandwidth. Measured on an H200 (7B layer, 6 tokens, in a CUDA graph), torch's
tinygemm kernel reaches ~20% of that floor and gemlite's split-K GEMM less. This kernel reads HQQ's
quantization as it is, two 4-bit values per byte along K, with a scale and a float zero point
per group, and dequantizes in registers: w = (q - zero) * scale, exactly HQQ's formula.

Each program owns BLOCK_N outputs for every row and walks all of K, so nothing is reduced across
programs (no atomics, no second kernel). Rows are padded to 16 for the tensor-core dot; the
padding is masked, never read or written. Even and odd K positions sit in the low and high
nibbles of one byte, so a tile is two dots: x[:, even] with the low nibbles, x[:, odd] with the
high ones.

Triton runs on CUDA GPUs; with TRITON_INTERPRET=1 it runs on a CPU too (how the tests check it).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# A few shapes of tile, tried once per (N, K) at first use: 8 configurations keep that under seconds.
_CONFIGS = [
    triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
    for n, k, w, s in ((16, 256, 4, 4), (32, 256, 4, 4), (64, 256, 4, 3), (32, 128, 4, 3),
                       (16, 128, 2, 4), (64, 128, 4, 4), (128, 128, 4, 3), (32, 256, 8, 4))
] if not _INTERPRETED else [triton.Config({"BLOCK_N": 16, "BLOCK_K": 128})]  # the interpreter: no tuning
GROUPS = (32, 64, 128)  # group sizes the kernel takes: a K tile (128 or 256) holds whole groups


@triton.autotune(configs=_CONFIGS, key=["N", "K", "BLOCK_M"])
@triton.jit
def _int4_matmul(
    x_ptr, packed_ptr, scale_ptr, zero_ptr, bias_ptr, out_ptr,
    M, N, K,
    GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    HALF: tl.constexpr = BLOCK_K // 2
    TILE_GROUPS: tl.constexpr = BLOCK_K // GROUP
    rows = tl.arange(0, BLOCK_M)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    pairs = tl.arange(0, HALF)
    row_ok = rows[:, None] < M
    col_ok = cols[:, None] < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        even = k0 + 2 * pairs  # K positions in the low nibbles; +1 in the high ones
        k_ok = even[None, :] < K
        x_even = tl.load(x_ptr + rows[:, None] * K + even[None, :], mask=row_ok & k_ok, other=0.0)
        x_odd = tl.load(x_ptr + rows[:, None] * K + even[None, :] + 1, mask=row_ok & k_ok, other=0.0)
        byte = tl.load(packed_ptr + cols[:, None] * (K // 2) + (k0 // 2 + pairs)[None, :], mask=col_ok & k_ok, other=0)
        group = k0 // GROUP + tl.arange(0, TILE_GROUPS)
        at = cols[:, None] * (K // GROUP) + group[None, :]
        group_ok = col_ok & (group[None, :] < K // GROUP)
        scale = tl.load(scale_ptr + at, mask=group_ok, other=0.0).to(tl.float32)[:, :, None]
        zero = tl.load(zero_ptr + at, mask=group_ok, other=0.0).to(tl.float32)[:, :, None]
        by_group = tl.reshape(byte, (BLOCK_N, TILE_GROUPS, GROUP // 2))
        low = tl.reshape(((by_group & 0xF).to(tl.float32) - zero) * scale, (BLOCK_N, HALF))
        high = tl.reshape(((by_group >> 4).to(tl.float32) - zero) * scale, (BLOCK_N, HALF))
        acc += tl.dot(x_even, tl.trans(low.to(x_even.dtype)))
        acc += tl.dot(x_odd, tl.trans(high.to(x_odd.dtype)))
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * N + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=row_ok & (cols[None, :] < N))


def pack_pairs(q: torch.Tensor) -> torch.Tensor:
    """[N, K] values 0..15 -> [N, K / 2] bytes: column 2j in the low nibble, 2j + 1 in the high."""
    q = q.to(torch.uint8)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


class TritonInt4Linear(torch.nn.Module):
    """y = x W^T + b with W = (q - zero) * scale (HQQ's 4-bit quantization, group along K)."""

    MAX_ROWS = 16  # rows of one kernel call; more rows are split into chunks (drafts use <= 16)

    def __init__(
        self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
        bias: torch.Tensor | None, dtype: torch.dtype,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.group_size = group_size
        self.packed = pack_pairs(q)
        self.scale = scale.to(dtype).contiguous()  # [N, K / group]
        self.zero = zero.to(dtype).contiguous()
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        out = torch.empty(rows.shape[0], self.out_features, dtype=x.dtype, device=x.device)
        for start in range(0, rows.shape[0], self.MAX_ROWS):
            chunk = rows[start : start + self.MAX_ROWS].contiguous()
            self._matmul(chunk, out[start : start + self.MAX_ROWS])
        return out.view(*x.shape[:-1], self.out_features)

    def _matmul(self, x: torch.Tensor, out: torch.Tensor) -> None:
        M = x.shape[0]
        bias = self.bias if self.bias is not None else self.scale  # any pointer; not read
        _int4_matmul[lambda meta: (triton.cdiv(self.out_features, meta["BLOCK_N"]),)](
            x, self.packed, self.scale, self.zero, bias, out, M, self.out_features, self.in_features,
            GROUP=self.group_size, HAS_BIAS=self.bias is not None, BLOCK_M=16,
        )

    @property
    def nbytes(self) -> int:
        bias = self.bias.nbytes if self.bias is not None else 0
        return self.packed.nbytes + self.scale.nbytes + self.zero.nbytes + bias
