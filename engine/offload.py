"""Decoder-layer weights for a forward pass: resident on the device or streamed from pinned memory.

The first `keep_on_gpu` layers' linears live on the device. The others live in pinned host memory,
one flat buffer per layer (one large copy per layer runs at full PCIe speed), and stream through
`num_slots` reusable device buffers on a dedicated copy stream. Streaming is cyclic: as soon as a
slot's layer has been computed, the copy of the layer that will next use that slot is queued, so
the first offloaded layers of the NEXT forward load while this one finishes (and while the drafter
works). Waits are per event; nothing synchronizes the whole device.

With `compressed`, a streamed layer is kept and copied in engine.compress's form (exponents
Huffman-coded, ~68% of its bf16 bytes) into one staging buffer shared by the slots, and decoded on
a decode stream into its slot's bf16 buffer, bit for bit the weights it was given. The layer is
encoded in PIECES independent pieces, each with a region of the staging buffer: the next layer's
piece p crosses as soon as this layer's piece p is decoded, so copies never wait for a whole
decode, and one staging buffer (not one per slot) keeps the copy engine busy.

A "fake device" (device = CPU with streaming forced on) runs the same bookkeeping with synchronous
copies (and the torch reference decoder), so the slot logic is tested on machines without a GPU.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine import compress
from engine.errors import EngineError
from engine.stats import nvtx_range

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

LayerWeights = dict[str, torch.Tensor]
# Bytes past a checked blob's end: a lane reads at most 256 codes of 12 bits past its offset.
_DECODE_MARGIN = 512
# Pieces a compressed layer is encoded in: the next layer's copy waits for the decode of one piece
# (~0.2 ms of a 7B layer's ~0.9 ms), and more pieces only add launches.
PIECES = 4
_ALIGN = 16  # bytes: every piece's blob (and staging region) starts aligned for its int64 offsets


def linear_tensors(hf_layer: torch.nn.Module) -> LayerWeights:
    """The weights (and biases) of a transformers decoder layer's seven linears, by short name."""
    modules = {**dict(hf_layer.self_attn.named_children()), **dict(hf_layer.mlp.named_children())}
    tensors: LayerWeights = {}
    for name in LINEAR_NAMES:
        linear = modules[name]
        tensors[name] = linear.weight.data
        if linear.bias is not None:
            tensors[f"{name}.bias"] = linear.bias.data
    return tensors


@dataclass
class _Piece:
    """One piece of a streamed layer in engine.compress's form: weights [start, start + its
    padded length) of the layer, its three parts as views into `blob` (pinned)."""

    start: int
    layer: compress.CompressedLayer
    blob: torch.Tensor  # uint8


@dataclass
class _Slot:
    flat: torch.Tensor  # device buffer holding one layer
    views: LayerWeights  # named views into `flat`
    copied: torch.cuda.Event | None = None  # the layer is in `flat` (copied, or decoded)
    freed: torch.cuda.Event | None = None  # the layer's compute no longer reads it


class LayerStack:
    """Weights of every decoder layer for one forward: `weights(i)` then `done(i)`, in order."""

    def __init__(
        self,
        layers: list[LayerWeights],
        device: torch.device,
        keep_on_gpu: int,
        num_slots: int = 2,
        stream: bool | None = None,
        nvtx: bool = False,
        compressed: bool = False,
        encoded_cache: Path | None = None,
    ) -> None:
        self.device = device
        self._nvtx = nvtx
        self.num_layers = len(layers)
        self.keep_on_gpu = max(0, min(keep_on_gpu, self.num_layers))
        self.resident = [{k: t.to(device) for k, t in w.items()} for w in layers[: self.keep_on_gpu]]
        offloaded = layers[self.keep_on_gpu :]
        self._cuda = device.type == "cuda"
        streaming = bool(offloaded) and (self._cuda if stream is None else stream)
        if not streaming:  # nothing to stream: every layer resident (the CPU path)
            self.resident += [{k: t.to(device) for k, t in w.items()} for w in offloaded]
            self.keep_on_gpu, offloaded = self.num_layers, []
        self._layout = _layout(offloaded[0]) if offloaded else {}
        self._host = [self._pack(w, pinned=self._cuda and not compressed) for w in offloaded]
        self.weight_bytes = sum(h.nbytes for h in self._host)  # bf16 bytes of the streamed layers
        self._compressed: list[list[_Piece]] = []  # per streamed layer, its pieces
        self._table: torch.Tensor | None = None
        if compressed and self._host:
            self._compress(layers, encoded_cache)
        self.num_slots = min(num_slots, len(self._host))
        self._slots = [self._new_slot() for _ in range(self.num_slots)]
        self._regions = self._staging_regions()
        # The decode of the piece last staged in each region (the next copy there waits for it).
        self._region_read: list[torch.cuda.Event | None] = [None] * len(self._regions)
        self._copy_stream = torch.cuda.Stream(device) if self._cuda and self._host else None
        # Decoding runs beside the copies: the next piece crosses PCIe while this one decodes.
        self._decode_stream = torch.cuda.Stream(device) if self._cuda and self._compressed else None
        self._timings: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._cpu_transfer_s = 0.0
        self._computed = 0  # offloaded layers computed so far, over all forwards
        for n in range(self.num_slots):
            self._copy(n)

    @property
    def offloaded_bytes(self) -> int:
        """Bytes one forward streams: the physical floor's numerator."""
        return sum(p.blob.nbytes for pieces in self._compressed for p in pieces) or sum(h.nbytes for h in self._host)

    @property
    def layers_streamed(self) -> int:
        """Offloaded layers computed so far, over all forwards (each crossed PCIe once)."""
        return self._computed

    @property
    def resident_bytes(self) -> int:
        return (sum(t.nbytes for w in self.resident for t in w.values()) + sum(s.flat.nbytes for s in self._slots)
                + sum(r.nbytes for r in self._regions))

    def weights(self, i: int) -> LayerWeights:
        """Layer i's weights on the device; for a streamed layer, after its copy has landed."""
        if i < self.keep_on_gpu:
            return self.resident[i]
        slot = self._slots[self._computed % self.num_slots]
        if slot.copied is not None:
            torch.cuda.current_stream(self.device).wait_event(slot.copied)
        return slot.views

    def done(self, i: int) -> None:
        """Layer i's compute has been issued: its slot can take the next layer in cyclic order."""
        if i < self.keep_on_gpu:
            return
        n = self._computed
        self._computed += 1
        if len(self._host) <= self.num_slots:  # every offloaded layer has a slot of its own
            return
        slot = self._slots[n % self.num_slots]
        if self._cuda:
            slot.freed = torch.cuda.Event()
            slot.freed.record(torch.cuda.current_stream(self.device))
        self._copy(n + self.num_slots)

    def take_transfer_ms(self) -> float | None:
        """Copy-stream time of the copies finished since the last call (None: nothing streams)."""
        if not self._host:
            return None
        if not self._cuda:
            ms, self._cpu_transfer_s = self._cpu_transfer_s * 1e3, 0.0
            return ms
        done = [t for t in self._timings if t[1].query()]
        self._timings = [t for t in self._timings if not t[1].query()]
        return sum(start.elapsed_time(end) for start, end in done)

    def _copy(self, n: int) -> None:
        """Queue the copy of the n-th offloaded layer (cyclic order) into its slot."""
        host = self._host[n % len(self._host)]
        slot = self._slots[n % self.num_slots]
        if not self._cuda:
            started = time.perf_counter()
            if self._compressed:
                for piece in self._compressed[n % len(self._host)]:
                    compress.decode_reference(piece.layer, self._table, slot.flat[piece.start :])
            else:
                slot.flat.copy_(host)
            self._cpu_transfer_s += time.perf_counter() - started
            return
        if self._compressed:
            self._copy_pieces(self._compressed[n % len(self._host)], slot)
            return
        with torch.cuda.stream(self._copy_stream), nvtx_range(f"transfer layer {n % len(self._host)}", self._nvtx):
            if slot.freed is not None:
                self._copy_stream.wait_event(slot.freed)
            slot.copied = self._timed_copy(slot.flat, host)

    def _copy_pieces(self, pieces: list[_Piece], slot: _Slot) -> None:
        """Each piece crosses into its staging region once that region's last piece is decoded,
        and is decoded into the slot once it has landed and the slot's last layer is computed;
        the layer's compute waits for the last decode."""
        from engine import decompress_kernel  # Triton: imported only where a GPU runs it

        for index, (piece, region) in enumerate(zip(pieces, self._regions)):
            with torch.cuda.stream(self._copy_stream), nvtx_range(f"transfer piece {index}", self._nvtx):
                if self._region_read[index] is not None:
                    self._copy_stream.wait_event(self._region_read[index])
                staged = region[: piece.blob.numel()]
                landed = self._timed_copy(staged, piece.blob)
            with torch.cuda.stream(self._decode_stream):
                self._decode_stream.wait_event(landed)
                if index == 0 and slot.freed is not None:
                    self._decode_stream.wait_event(slot.freed)
                decompress_kernel.decode(_split(staged, piece.layer.numel, piece.layer.lanes), self._table,
                                         slot.flat[piece.start :])
                decoded = torch.cuda.Event()
                decoded.record(self._decode_stream)
            self._region_read[index] = decoded
        slot.copied = decoded

    def _timed_copy(self, dst: torch.Tensor, src: torch.Tensor) -> torch.cuda.Event:
        """Copy on the copy stream, timed for take_transfer_ms; returns the event of its landing."""
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(self._copy_stream)
        dst.copy_(src, non_blocking=True)
        end.record(self._copy_stream)
        self._timings.append((start, end))
        return end

    def _compress(self, layers: list[LayerWeights], cache_file: Path | None) -> None:
        """Every streamed layer into engine.compress's form, in PIECES pieces, the bf16 copies
        dropped (the pinned memory is the compressed bytes). One codebook for the whole model, from
        every layer's exponents (resident ones too), so the layers encoded for one placement serve
        any other: they are kept in `cache_file` between starts (a GPU encodes a 7B layer in under a
        second, a 2-core CPU in ~17 s)."""
        ranges = _piece_ranges(self._host[0].numel())
        padded = ranges[-1][0] + ranges[-1][1]
        # On a GPU the encoder's whole-tensor integer math runs there, a slab of host memory at a time.
        on = self.device if self._cuda else torch.device("cpu")
        cached = _CachedBlobs(cache_file)
        if cached.lengths is not None:
            book = compress.codebook_of_lengths(cached.lengths)
        else:
            book = compress.codebook(sum(_exponent_counts(w, padded, on) for w in layers))
        self._table = book.table.to(self.device)
        decoded = torch.empty(ranges[0][1], dtype=torch.bfloat16, device=on)  # less than the slots allocated next
        first = self.num_layers - len(self._host)
        for index, host in enumerate(self._host, start=first):
            blobs = []
            for number, (start, length) in enumerate(ranges):
                weights, key = host[start : start + length], f"{index}.{number}"
                blob = cached.blob(key)
                # A cached piece is decoded and compared before use: a stale or damaged file must
                # never reach the compute (lossless is the promise); one that differs is encoded again.
                if blob is None or not self._decodes_to(blob, weights, decoded):
                    piece = compress.compress(weights, book, device=on)
                    blob = cached.add(key, torch.cat([t.view(torch.uint8) for t in _in_blob_order(piece)]))
                    if not self._decodes_to(blob, weights, decoded):
                        raise EngineError(f"compressed streaming: layer {index} does not decode to its weights "
                                          "(an encoder fault): run without --compressed-streaming")
                blobs.append(blob)
            starts = [(start, host[start : start + length].numel()) for start, length in ranges]
            self._compressed.append(self._pinned_pieces(blobs, starts))
        cached.save(book.lengths)
        del decoded
        if self._cuda:  # the encoder's blocks go back: slots and caches must not find them fragmented
            torch.cuda.empty_cache()
        # What the slots are sized from: a padded bf16 layer (the decoder writes the padding too).
        self._host = [torch.empty(padded, dtype=torch.bfloat16, device="meta") for _ in self._host]

    def _pinned_pieces(self, blobs: list[torch.Tensor], starts: list[tuple[int, int]]) -> list[_Piece]:
        """A layer's piece blobs in one host buffer (pinned on a GPU machine), each aligned;
        `starts`: each piece's first weight and number of weights."""
        sizes = [-(-b.numel() // _ALIGN) * _ALIGN for b in blobs]
        packed = torch.empty(sum(sizes), dtype=torch.uint8, pin_memory=self._cuda)
        pieces, at = [], 0
        for blob, size, (start, numel) in zip(blobs, sizes, starts):
            view = packed[at : at + blob.numel()]
            view.copy_(blob)
            pieces.append(_Piece(start=start, layer=_split(view, numel, compress.lanes_for(numel)), blob=view))
            at += size
        return pieces

    def _decodes_to(self, blob: torch.Tensor, host: torch.Tensor, out: torch.Tensor) -> bool:
        """Whether `blob` decodes (with this stack's table, into `out`) to `host`'s bits exactly.
        A blob read from disk may be anything: its lane offsets are checked to stay inside its
        bitstream, and it is decoded from a copy with room past its end (the last lane's reads)."""
        lanes = compress.lanes_for(host.numel())
        words_bytes = blob.numel() - lanes * (8 + compress.LANE_WEIGHTS)
        if words_bytes < 8 or words_bytes % 4:
            return False
        offsets = blob[: lanes * 8].view(torch.int64)
        if offsets[0] != 0 or bool((offsets.diff() < 0).any()) or offsets[-1] > words_bytes * 8:
            return False
        padded = torch.zeros(blob.numel() + _DECODE_MARGIN, dtype=torch.uint8, device=out.device)
        padded[: blob.numel()].copy_(blob)
        layer = _split(padded[: blob.numel()], host.numel(), lanes)
        if self._cuda:
            from engine import decompress_kernel  # Triton: imported only where a GPU runs it

            decompress_kernel.decode(layer, self._table, out)
        else:
            try:
                compress.decode_reference(layer, self._table, out)
            except IndexError:  # torch checks a CPU index: a code ran past the bitstream
                return False
        expected = host.view(torch.int16)
        got = out[: host.numel()].view(torch.int16)
        step = compress.SLAB_WEIGHTS
        return all(torch.equal(got[i : i + step], expected[i : i + step].to(out.device))
                   for i in range(0, host.numel(), step))

    def _pack(self, weights: LayerWeights, pinned: bool) -> torch.Tensor:
        dtype = next(iter(weights.values())).dtype
        # zeros, not empty: the gaps between tensors are compressed too (their bits must have codes).
        flat = torch.zeros(_numel(self._layout), dtype=dtype, pin_memory=pinned)
        for name, (offset, shape) in self._layout.items():
            flat[offset : offset + shape.numel()].view(shape).copy_(weights[name])
        return flat

    def _new_slot(self) -> _Slot:
        flat = torch.empty_like(self._host[0], device=self.device)
        views = {n: flat[o : o + s.numel()].view(s) for n, (o, s) in self._layout.items()}
        return _Slot(flat=flat, views=views)

    def _staging_regions(self) -> list[torch.Tensor]:
        """Compressed streaming on a GPU: one staging buffer, a region per piece as large as that
        piece's largest blob over the streamed layers."""
        if not (self._compressed and self._cuda):
            return []
        sizes = [-(-max(p[i].blob.numel() for p in self._compressed) // _ALIGN) * _ALIGN
                 for i in range(len(self._compressed[0]))]
        staging = torch.empty(sum(sizes), dtype=torch.uint8, device=self.device)
        return list(staging.split(sizes))


def _piece_ranges(numel: int, pieces: int = PIECES) -> list[tuple[int, int]]:
    """(start, padded length) of each piece of a flat layer of `numel` weights: whole lanes, so
    only the last piece is padded, and every piece starts 512-byte aligned."""
    step = compress.lanes_for(-(-numel // pieces)) * compress.LANE_WEIGHTS
    starts = range(0, numel, step)
    return [(start, compress.lanes_for(min(step, numel - start)) * compress.LANE_WEIGHTS) for start in starts]


def _split(blob: torch.Tensor, numel: int, lanes: int) -> compress.CompressedLayer:
    """A layer's three parts as views into its `blob`, laid end to end in _in_blob_order."""
    weights = lanes * compress.LANE_WEIGHTS
    offsets = blob[: lanes * 8].view(torch.int64)
    words = blob[lanes * 8 : blob.numel() - weights].view(torch.int32)
    sign_mantissa = blob[blob.numel() - weights :]
    return compress.CompressedLayer(numel, lanes, compress.LANE_WEIGHTS, sign_mantissa, words, offsets)


def _exponent_counts(weights: LayerWeights, padded: int, device: torch.device) -> torch.Tensor:
    """engine.compress.exponent_histogram of the layer as packed: its tensors, zeros elsewhere."""
    counts = sum(compress.exponent_histogram(t.flatten(), device=device) for t in weights.values())
    counts[0] += padded - sum(t.numel() for t in weights.values())
    return counts


class _CachedBlobs:
    """Encoded layers kept on disk between starts (safetensors: the code lengths and one uint8 blob
    per piece, keyed "layer.piece", each read when asked for). A file that does not read is encoded
    again."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.lengths: torch.Tensor | None = None
        self._keys: set[str] = set()
        self._added: dict[str, torch.Tensor] = {}
        try:
            if path is not None and path.is_file():
                with safe_open(path, "pt") as stored:
                    self._keys = set(stored.keys()) - {"lengths"}
                    self.lengths = stored.get_tensor("lengths")
        except Exception:  # noqa: BLE001 - a damaged or foreign file: encode again, write it anew
            self._keys, self.lengths = set(), None

    def blob(self, key: str) -> torch.Tensor | None:
        if key not in self._keys:
            return None
        with safe_open(self.path, "pt") as stored:
            return stored.get_tensor(key)

    def add(self, key: str, blob: torch.Tensor) -> torch.Tensor:
        self._added[key] = blob
        return blob

    def save(self, lengths: torch.Tensor) -> None:
        """Write the layers encoded now beside those stored (a new file, renamed over the old)."""
        if self.path is None or not self._added:
            return
        staging = self.path.with_suffix(f".tmp{os.getpid()}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Keys are "layer.piece"; a key of an older form (a whole layer) is left out.
            stored = {key: self.blob(key) for key in self._keys if key not in self._added and "." in key}
            save_file({**stored, **self._added, "lengths": lengths.contiguous()}, staging)
            os.replace(staging, self.path)
        except OSError:  # a full or read-only disk: the next start encodes again
            staging.unlink(missing_ok=True)


def _in_blob_order(layer: compress.CompressedLayer) -> tuple[torch.Tensor, ...]:
    """Widest first: every part starts at a multiple of its element size."""
    return layer.offsets, layer.words, layer.sign_mantissa


def _layout(weights: LayerWeights) -> dict[str, tuple[int, torch.Size]]:
    # Offsets rounded to 64 elements keep every view 128-byte aligned for the matmul kernels.
    layout, offset = {}, 0
    for name, tensor in weights.items():
        layout[name] = (offset, tensor.shape)
        offset += -(-tensor.numel() // 64) * 64
    return layout


def _numel(layout: dict[str, tuple[int, torch.Size]]) -> int:
    offset, shape = max(layout.values(), key=lambda item: item[0])
    return offset + -(-shape.numel() // 64) * 64


def measure_h2d_gbps(device: torch.device, nbytes: int = 256 << 20, repeats: int = 8) -> float | None:
    """Pinned host-to-device bandwidth in GB/s (1e9 bytes/s); None on a device without PCIe.
    The best of `repeats` timed copies: the bound is what the link can do, and an average let one
    disturbed copy move it by 2% between runs (54.4-55.4 GB/s on the same H200)."""
    if device.type != "cuda":
        return None
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dev.copy_(host, non_blocking=True)  # warm-up
    best_ms = float("inf")
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dev.copy_(host, non_blocking=True)
        end.record()
        end.synchronize()
        best_ms = min(best_ms, start.elapsed_time(end))
    return nbytes / (best_ms * 1e-3) / 1e9
