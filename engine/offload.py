"""Decoder-layer weights for a forward pass: resident on the device or streamed from pinned memory.

The first `keep_on_gpu` layers' linears live on the device. The others live in pinned host memory,
one flat buffer per layer (one large copy per layer runs at full PCIe speed), and stream through
`num_slots` reusable device buffers on a dedicated copy stream. Streaming is cyclic: as soon as a
slot's layer has been computed, the copy of the layer that will next use that slot is queued, so
the first offloaded layers of the NEXT forward load while this one finishes (and while the drafter
works). Waits are per event; nothing synchronizes the whole device.

With `compressed`, a streamed layer is kept and copied in engine.compress's form (exponents
Huffman-coded, ~68% of its bf16 bytes) into a staging buffer beside its slot, and decoded on a
decode stream into the slot's bf16 buffer, bit for bit the weights it was given, while the next
layer's copy runs.

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
_DECODE_MARGIN = 512  # "q_proj" -> weight, "q_proj.bias" -> bias, ...


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
class _Compressed:
    """One streamed layer in engine.compress's form: `blob` (pinned) holds its three parts."""

    layer: compress.CompressedLayer  # the parts: views into `blob`
    blob: torch.Tensor  # uint8


@dataclass
class _Slot:
    flat: torch.Tensor  # device buffer holding one layer
    views: LayerWeights  # named views into `flat`
    staging: torch.Tensor | None = None  # compressed: where the layer's blob lands before decoding
    copied: torch.cuda.Event | None = None  # the layer's copy has landed
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
        self._compressed: list[_Compressed] = []
        self._table: torch.Tensor | None = None
        if compressed and self._host:
            self._compress(layers, encoded_cache)
        self.num_slots = min(num_slots, len(self._host))
        self._slots = [self._new_slot() for _ in range(self.num_slots)]
        self._copy_stream = torch.cuda.Stream(device) if self._cuda and self._host else None
        # Decoding runs beside the copies: the next layer's blob crosses PCIe while this one decodes.
        self._decode_stream = torch.cuda.Stream(device) if self._cuda and self._compressed else None
        self._timings: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._cpu_transfer_s = 0.0
        self._computed = 0  # offloaded layers computed so far, over all forwards
        for n in range(self.num_slots):
            self._copy(n)

    @property
    def offloaded_bytes(self) -> int:
        """Bytes one forward streams: the physical floor's numerator."""
        return sum(c.blob.nbytes for c in self._compressed) or sum(h.nbytes for h in self._host)

    @property
    def layers_streamed(self) -> int:
        """Offloaded layers computed so far, over all forwards (each crossed PCIe once)."""
        return self._computed

    @property
    def resident_bytes(self) -> int:
        return sum(t.nbytes for w in self.resident for t in w.values()) + sum(
            s.flat.nbytes + (s.staging.nbytes if s.staging is not None else 0) for s in self._slots
        )

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
                compress.decode_reference(self._compressed[n % len(self._host)].layer, self._table, slot.flat)
            else:
                slot.flat.copy_(host)
            self._cpu_transfer_s += time.perf_counter() - started
            return
        with torch.cuda.stream(self._copy_stream), nvtx_range(f"transfer layer {n % len(self._host)}", self._nvtx):
            if slot.freed is not None:
                self._copy_stream.wait_event(slot.freed)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(self._copy_stream)
            if self._compressed:
                blob = self._compressed[n % len(self._host)].blob
                slot.staging[: blob.numel()].copy_(blob, non_blocking=True)
            else:
                slot.flat.copy_(host, non_blocking=True)
            end.record(self._copy_stream)
            slot.copied = end
            self._timings.append((start, end))
        if self._compressed:
            slot.copied = self._decode(self._compressed[n % len(self._host)], slot)

    def _decode(self, host: _Compressed, slot: _Slot) -> torch.cuda.Event:
        """Decode the slot's staged blob into its bf16 buffer once the blob has landed; returns the
        event the layer's compute waits for. The staging buffer is next written by the copy that
        waits for this slot's `freed`, recorded after that compute: never while decoding."""
        from engine import decompress_kernel  # Triton: imported only where a GPU runs it

        with torch.cuda.stream(self._decode_stream):
            self._decode_stream.wait_event(slot.copied)
            staged = _split(slot.staging[: host.blob.numel()], host.layer.numel, host.layer.lanes)
            decompress_kernel.decode(staged, self._table, slot.flat)
            decoded = torch.cuda.Event()
            decoded.record(self._decode_stream)
        return decoded

    def _compress(self, layers: list[LayerWeights], cache_file: Path | None) -> None:
        """Every streamed layer into engine.compress's form, the bf16 copies dropped (the pinned
        memory is the compressed bytes). One codebook for the whole model, from every layer's
        exponents (resident ones too), so the layers encoded for one placement serve any other:
        they are kept in `cache_file` between starts (a GPU encodes a 7B layer in under a second,
        a 2-core CPU in ~17 s)."""
        lanes = compress.lanes_for(self._host[0].numel())
        padded = lanes * compress.LANE_WEIGHTS
        # On a GPU the encoder's whole-tensor integer math runs there, a slab of host memory at a time.
        on = self.device if self._cuda else torch.device("cpu")
        cached = _CachedBlobs(cache_file)
        if cached.lengths is not None:
            book = compress.codebook_of_lengths(cached.lengths)
        else:
            book = compress.codebook(sum(_exponent_counts(w, padded, on) for w in layers))
        self._table = book.table.to(self.device)
        decoded = torch.empty(padded, dtype=torch.bfloat16, device=on)  # no more than the slots allocated next
        first = self.num_layers - len(self._host)
        for index, host in enumerate(self._host, start=first):
            blob = cached.blob(index)
            # A cached layer is decoded and compared before use: a stale or damaged file must never
            # reach the compute (lossless is the promise); one that differs is encoded again.
            if blob is None or not self._decodes_to(blob, host, decoded):
                layer = compress.compress(host, book, device=on)
                blob = cached.add(index, torch.cat([t.view(torch.uint8) for t in _in_blob_order(layer)]))
                if not self._decodes_to(blob, host, decoded):
                    raise EngineError(f"compressed streaming: layer {index} does not decode to its weights "
                                      "(an encoder fault): run without --compressed-streaming")
            blob = blob.pin_memory() if self._cuda else blob
            self._compressed.append(_Compressed(layer=_split(blob, host.numel(), lanes), blob=blob))
        cached.save(book.lengths)
        del decoded
        if self._cuda:  # the encoder's blocks go back: slots and caches must not find them fragmented
            torch.cuda.empty_cache()
        # What the slots are sized from: a padded bf16 layer (the decoder writes the padding too).
        self._host = [torch.empty(padded, dtype=torch.bfloat16, device="meta") for _ in self._host]

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
        largest = max((c.blob.numel() for c in self._compressed), default=0)
        staging = torch.empty(largest, dtype=torch.uint8, device=self.device) if self._compressed and self._cuda else None
        return _Slot(flat=flat, views=views, staging=staging)


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
    per layer index, each read when asked for). A file that does not read is encoded again."""

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

    def blob(self, index: int) -> torch.Tensor | None:
        if str(index) not in self._keys:
            return None
        with safe_open(self.path, "pt") as stored:
            return stored.get_tensor(str(index))

    def add(self, index: int, blob: torch.Tensor) -> torch.Tensor:
        self._added[str(index)] = blob
        return blob

    def save(self, lengths: torch.Tensor) -> None:
        """Write the layers encoded now beside those stored (a new file, renamed over the old)."""
        if self.path is None or not self._added:
            return
        staging = self.path.with_suffix(f".tmp{os.getpid()}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            stored = {key: self.blob(int(key)) for key in self._keys if key not in self._added}
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
