"""Lossless compression of streamed bfloat16 layers (DFloat11's observation, arXiv 2504.11651):
a weight's 8 exponent bits carry ~3 bits of information, so they are Huffman-coded, while its
sign and 7 mantissa bits stay one raw byte. A layer crosses PCIe at ~68% of its bf16 bytes and is
decoded on the device, bit for bit, into the bf16 buffer the layer computes from.

Layout, chosen for a parallel decoder: a layer's N weights are dealt to L = ceil(N / W) lanes,
lane j holding weights j, j + L, j + 2L, ... (W of them, the padding zeros). Each lane's codes are
consecutive in one MSB-first bitstream of 32-bit words and its first bit's offset is stored, so
every lane decodes on its own, W table lookups in a row; at step k the lanes write weights
k*L .. k*L + L - 1, side by side. Codes are at most MAX_CODE_BITS long (length-limited Huffman,
package-merge), so one 2**MAX_CODE_BITS-entry table decodes any code in one lookup.
"""

from __future__ import annotations

import heapq
from collections import Counter
from dataclasses import dataclass

import torch

MAX_CODE_BITS = 12
LANE_WEIGHTS = 256  # W: 32 offset bits per 256 weights cost 0.125 bits a weight
_ENCODE_LANES = 1 << 14  # lanes packed at once: bounds the encoder's int64 temporaries (~170 MB)
SLAB_WEIGHTS = 1 << 25  # weights read at once from host memory (64 MB of bf16)


@dataclass(frozen=True)
class Codebook:
    """A prefix code for the 256 exponent values, shared by every layer of a model."""

    lengths: torch.Tensor  # [256] int64, 0 for an exponent that never occurs
    codes: torch.Tensor  # [256] int64 canonical codes
    table: torch.Tensor  # [2**MAX_CODE_BITS] int32: exponent | code length << 8, indexed by the next bits


@dataclass(frozen=True)
class CompressedLayer:
    numel: int  # weights before padding
    lanes: int  # L; the decoder writes L * lane_weights weights
    lane_weights: int  # W
    sign_mantissa: torch.Tensor  # [L * W] uint8: sign << 7 | mantissa, in weight order
    words: torch.Tensor  # [n + 1] int32: the bitstream, MSB first (one spare word for the last window)
    offsets: torch.Tensor  # [L] int64: bit offset of each lane's first code

    @property
    def nbytes(self) -> int:
        return self.sign_mantissa.nbytes + self.words.nbytes + self.offsets.nbytes


def exponents(flat: torch.Tensor) -> torch.Tensor:
    """The exponent field (0..255) of every weight of a bf16 tensor, as uint8."""
    return ((flat.contiguous().view(torch.int16) >> 7) & 0xFF).to(torch.uint8)


def exponent_histogram(flat: torch.Tensor, padded: int | None = None, device: torch.device | None = None) -> torch.Tensor:
    """[256] counts of `flat`'s exponents, with the padding zeros up to `padded` weights, counted
    on `device` (default: flat's) a slab at a time."""
    device = device or flat.device
    counts = torch.zeros(256, dtype=torch.int64, device=device)
    for start in range(0, flat.numel(), SLAB_WEIGHTS):
        counts += torch.bincount(exponents(flat[start : start + SLAB_WEIGHTS].to(device)), minlength=256)
    if padded is not None:
        counts[0] += padded - flat.numel()
    return counts.cpu()


def codebook(histogram: torch.Tensor, max_bits: int = MAX_CODE_BITS) -> Codebook:
    lengths = torch.zeros(256, dtype=torch.int64)
    for symbol, length in _limited_lengths(histogram.tolist(), max_bits).items():
        lengths[symbol] = length
    return codebook_of_lengths(lengths, max_bits)


def codebook_of_lengths(lengths: torch.Tensor, max_bits: int = MAX_CODE_BITS) -> Codebook:
    """The canonical code of these [256] code lengths (0: no code), as stored with encoded layers."""
    lengths = lengths.to(torch.int64)
    codes = torch.zeros(256, dtype=torch.int64)
    table = torch.zeros(1 << max_bits, dtype=torch.int32)
    code, previous = 0, 0
    for symbol in sorted(range(256), key=lambda s: (lengths[s].item(), s)):  # canonical order
        length = int(lengths[symbol])
        if length == 0:
            continue
        code <<= length - previous
        codes[symbol], previous = code, length
        span = 1 << (max_bits - length)
        table[code * span : (code + 1) * span] = symbol | length << 8
        code += 1
    return Codebook(lengths=lengths, codes=codes, table=table)


def _limited_lengths(counts: list[int], max_bits: int) -> dict[int, int]:
    """Optimal code lengths no longer than `max_bits` (package-merge) for the symbols that occur."""
    leaves = sorted((count, (symbol,)) for symbol, count in enumerate(counts) if count > 0)
    if len(leaves) == 1:  # one symbol still needs one bit per weight for the decoder to advance
        return {leaves[0][1][0]: 1}
    if len(leaves) > 1 << max_bits:
        raise ValueError(f"{len(leaves)} symbols do not fit {max_bits}-bit codes")
    packages = leaves
    for _ in range(max_bits - 1):
        pairs = [(a[0] + b[0], a[1] + b[1]) for a, b in zip(packages[0::2], packages[1::2])]
        packages = list(heapq.merge(leaves, pairs, key=lambda item: item[0]))
    return dict(Counter(symbol for _, symbols in packages[: 2 * len(leaves) - 2] for symbol in symbols))


def lanes_for(numel: int, lane_weights: int = LANE_WEIGHTS) -> int:
    return -(-numel // lane_weights)


def compress(flat: torch.Tensor, book: Codebook, lane_weights: int = LANE_WEIGHTS,
             device: torch.device | None = None) -> CompressedLayer:
    """Encode a flat bf16 tensor on `device` (default: flat's; a GPU encodes a 7B layer in well
    under a second); the result is on the CPU. `flat` may stay in host memory: it is read a slab
    at a time, and fields are 8- and 16-bit until the packing, which runs on _ENCODE_LANES lanes at a
    time, so a 7B layer's encoding holds under 2 bytes a weight on the device (its exponents and
    the bitstream), not the layer and its 16-bit fields: it runs beside a loaded model under a cap."""
    if flat.dtype != torch.bfloat16:
        raise ValueError(f"compressed streaming is for bfloat16 weights, got {flat.dtype}")
    numel, device = flat.numel(), device or flat.device
    lanes = lanes_for(numel, lane_weights)
    bits = flat.contiguous().view(torch.int16)
    sign_mantissa = torch.zeros(lanes * lane_weights, dtype=torch.uint8)
    step_exponents = torch.zeros(lane_weights, lanes, dtype=torch.uint8, device=device)  # row k: step k's weights
    steps = max(1, SLAB_WEIGHTS // lanes)
    for k in range(0, lane_weights, steps):
        start, end = k * lanes, min((k + steps) * lanes, numel)
        if start >= numel:
            break  # padding: exponent 0, sign and mantissa 0
        slab = bits[start:end].to(device)
        sign_mantissa[start:end] = (((slab >> 8) & 0x80) | (slab & 0x7F)).to(torch.uint8).cpu()
        step_exponents.view(-1)[start:end] = ((slab >> 7) & 0xFF).to(torch.uint8)
    by_lane = step_exponents.t()  # [L, W]: lane j's exponents in step order
    lane_bits = torch.empty(lanes, dtype=torch.int64, device=device)
    for start in range(0, lanes, _ENCODE_LANES):
        part = by_lane[start : start + _ENCODE_LANES].long()
        length = book.lengths.to(device)[part]
        if (length == 0).any():
            raise ValueError("an exponent without a code: the codebook was built from other weights")
        lane_bits[start : start + _ENCODE_LANES] = length.sum(1)
    offsets = torch.cumsum(lane_bits, 0) - lane_bits
    words = torch.zeros(int(lane_bits.sum()) // 32 + 2, dtype=torch.int64, device=device)
    codes, code_lengths = book.codes.to(device), book.lengths.to(device)
    for start in range(0, lanes, _ENCODE_LANES):
        part = by_lane[start : start + _ENCODE_LANES].long()
        length = code_lengths[part]
        position = offsets[start : start + _ENCODE_LANES, None] + torch.cumsum(length, 1) - length
        # Each code left-aligned in a 64-bit window starting at its word: codes never overlap, so
        # adding them into the words is OR-ing them.
        shifted = codes[part] << (64 - (position & 31) - length)
        word = (position >> 5).flatten()
        words.index_add_(0, word, ((shifted >> 32) & 0xFFFFFFFF).flatten())
        words.index_add_(0, word + 1, (shifted & 0xFFFFFFFF).flatten())
    return CompressedLayer(numel=numel, lanes=lanes, lane_weights=lane_weights, sign_mantissa=sign_mantissa,
                           words=_as_int32(words).cpu(), offsets=offsets.cpu())


def _as_int32(words: torch.Tensor) -> torch.Tensor:
    """uint32 values held in int64 -> the same 32 bits as int32."""
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def decode_reference(layer: CompressedLayer, table: torch.Tensor, out: torch.Tensor,
                     max_bits: int = MAX_CODE_BITS) -> torch.Tensor:
    """The decoder in torch (the CPU path and the tests' oracle): writes the layer's bf16 weights
    into `out` ([lanes * lane_weights] bf16, padding included) and returns it."""
    words = layer.words.to(torch.int64) & 0xFFFFFFFF
    position = layer.offsets.clone()
    sign_mantissa = layer.sign_mantissa.to(torch.int32)
    values = out.view(torch.int16)
    mask = (1 << max_bits) - 1
    for k in range(layer.lane_weights):
        word = position >> 5
        window = (words[word] << 32) | words[word + 1]
        entry = table[((window >> (64 - max_bits - (position & 31))) & mask)]
        position += entry >> 8
        sm = sign_mantissa[k * layer.lanes : (k + 1) * layer.lanes]
        values[k * layer.lanes : (k + 1) * layer.lanes] = (((sm & 0x80) << 8) | ((entry & 0xFF) << 7) | (sm & 0x7F)).to(torch.int16)
    return out
