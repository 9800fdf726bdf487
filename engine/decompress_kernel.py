"""The GPU decoder of engine.compress: one program per LANES_PER_PROGRAM lanes, each lane walking its
own codes (W table lookups in a row) while, at every step, the program's lanes write neighbouring
weights. Triton runs it on CUDA GPUs; with TRITON_INTERPRET=1 on a CPU (how the tests check it
against engine.compress.decode_reference)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.compress import MAX_CODE_BITS, CompressedLayer

LANES_PER_PROGRAM = 128


@triton.jit
def _decode(words, offsets, sign_mantissa, table, out, lanes, LANE_WEIGHTS: tl.constexpr,
            MAX_BITS: tl.constexpr, BLOCK: tl.constexpr):
    lane = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = lane < lanes
    position = tl.load(offsets + lane, mask=live, other=0)
    for k in range(LANE_WEIGHTS):
        word = position >> 5
        high = tl.load(words + word, mask=live, other=0).to(tl.uint32).to(tl.uint64)
        low = tl.load(words + word + 1, mask=live, other=0).to(tl.uint32).to(tl.uint64)
        window = (high << 32) | low
        index = (window >> (64 - MAX_BITS - (position & 31)).to(tl.uint64)) & ((1 << MAX_BITS) - 1)
        entry = tl.load(table + index.to(tl.int32), mask=live, other=0)
        position += (entry >> 8).to(tl.int64)
        at = k * lanes + lane
        sm = tl.load(sign_mantissa + at, mask=live, other=0).to(tl.int32)
        value = ((sm & 0x80) << 8) | ((entry & 0xFF) << 7) | (sm & 0x7F)
        tl.store(out + at, value.to(tl.uint16).to(tl.int16, bitcast=True), mask=live)


def decode(layer: CompressedLayer, table: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Layer's bf16 weights into `out` ([lanes * lane_weights] bf16 on the device, padding
    included); every tensor of `layer` and `table` already on that device."""
    grid = (triton.cdiv(layer.lanes, LANES_PER_PROGRAM),)
    _decode[grid](layer.words, layer.offsets, layer.sign_mantissa, table, out.view(torch.int16), layer.lanes,
                  LANE_WEIGHTS=layer.lane_weights, MAX_BITS=MAX_CODE_BITS, BLOCK=LANES_PER_PROGRAM)
    return out
