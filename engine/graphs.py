"""CUDA graphs for draft steps.

A draft step runs every substitute layer for a handful of tokens: a few hundred small kernels whose
launch overhead, not their memory traffic, sets the speed. Captured once into a CUDA graph, a step
replays with one launch. A graph fixes tensor shapes and addresses, so each (frontier width,
attention length) pair gets its own graph, captured on first use, fed through static input
buffers. The attention length is the tree's `kv_end` rounded up to a bucket (`attention_bucket`);
the mask hides the padding, so a padded step computes what the eager step computes. The width is
rounded up to a power of two (`padded_width`) by repeating the last row, which writes the same
keys and values to the same slot; the extra rows' outputs are dropped. Graphs share one memory
pool (their scratch memory is reused) and, per width, one output buffer.

On a CPU there is nothing to capture: the same padded fixed-shape step runs eagerly (tests use this
to check that padding changes no output).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import torch

# (tokens, positions, slots, mask [T, kv_end], kv_end) -> draft log-probabilities [T, V]
StepFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]

MIN_BUCKET = 256
BUCKETS_PER_OCTAVE = 8  # padding stays under 1/8 of the attention length past the first bucket


def padded_width(width: int) -> int:
    """Rows of the graph that runs a `width`-row frontier: a tree whose forwards take any width
    (best-first with a probability floor) captures a handful of widths, not one per width."""
    return 1 << (width - 1).bit_length()


def attention_bucket(kv_end: int, max_length: int) -> int:
    """The padded attention length for `kv_end`: few distinct lengths, little padding."""
    step = max(MIN_BUCKET, (1 << max(kv_end - 1, 1).bit_length()) // BUCKETS_PER_OCTAVE)
    return min(-(-kv_end // step) * step, max_length)


@dataclass
class _Captured:
    tokens: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor
    mask: torch.Tensor
    graph: torch.cuda.CUDAGraph | None = None
    output: torch.Tensor | None = None

    def load(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, mask: torch.Tensor) -> None:
        """The frontier's rows, then copies of its last row up to the graph's width."""
        width, kv_end = mask.shape
        for static, given in ((self.tokens, tokens), (self.positions, positions), (self.slots, slots)):
            static[:width].copy_(given)
            static[width:].copy_(given[-1:].expand(static.shape[0] - width))
        self.mask[:width, :kv_end].copy_(mask)
        self.mask[width:, :kv_end].copy_(mask[-1:].expand(self.mask.shape[0] - width, kv_end))
        self.mask[:, kv_end:].zero_()


class DraftGraphs:
    """Calls `step` with padded attention, replaying a CUDA graph per shape when `capture`."""

    def __init__(self, step: StepFn, max_length: int, device: torch.device, capture: bool) -> None:
        self.step = step
        self.max_length = max_length
        self.device = device
        self.capture = capture
        self._shapes: dict[tuple[int, int], _Captured] = {}
        self._pool = torch.cuda.graph_pool_handle() if capture else None
        # Warm-ups run on a side stream. One for all captures: the allocator caches blocks per
        # stream, so a new stream per capture kept every warm-up's memory apart (seen on an H200:
        # +180 MB over a 7B model's first generation).
        self._side = torch.cuda.Stream(device) if capture else None
        self._outputs: dict[int, torch.Tensor] = {}  # per frontier width: where every graph writes

    def __call__(
        self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, mask: torch.Tensor, kv_end: int
    ) -> torch.Tensor:
        padded = attention_bucket(kv_end, self.max_length)
        width = tokens.numel()
        key = (padded_width(width), padded)
        shape = self._shapes.get(key)
        if shape is None:
            shape = self._shapes[key] = self._static_inputs(*key)
        shape.load(tokens, positions, slots, mask)
        if self.capture and shape.graph is None:
            self._capture(shape, padded)
        if shape.graph is None:
            return self.step(shape.tokens, shape.positions, shape.slots, shape.mask, padded)[:width]
        shape.graph.replay()
        return shape.output[:width]

    def _static_inputs(self, width: int, padded: int) -> _Captured:
        def ids() -> torch.Tensor:
            return torch.zeros(width, dtype=torch.long, device=self.device)

        mask = torch.zeros(width, padded, dtype=torch.bool, device=self.device)
        return _Captured(tokens=ids(), positions=ids(), slots=ids(), mask=mask)

    def _capture(self, shape: _Captured, padded: int) -> None:
        """Warm up on a side stream (kernel autotuning, workspaces), then capture. The static inputs
        already hold this step's real inputs, so the warm-up writes the very KV the step writes."""
        args = (shape.tokens, shape.positions, shape.slots, shape.mask, padded)
        side = self._side
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self.step(*args)
        torch.cuda.current_stream(self.device).wait_stream(side)
        out = self._outputs.get(shape.tokens.numel())
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self._pool):
                result = self.step(*args)
                if out is None:  # the first graph of this width owns the width's output buffer
                    out = result
                else:  # later ones copy into it: one [F, V] buffer per width, not one per bucket
                    out.copy_(result)
        except RuntimeError as err:  # a kernel that cannot be captured: keep drafting, eagerly
            warnings.warn(f"draft steps run without CUDA graphs: capture failed ({err})", stacklevel=2)
            self.capture = False
            return
        self._outputs[shape.tokens.numel()] = shape.output = out
        shape.graph = graph
