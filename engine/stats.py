"""The metrics of DESIGN.md section 5, gathered per iteration and summarised per generation."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch


@dataclass
class IterationStats:
    """One draft -> verify -> accept round (vanilla: one decode step)."""

    emitted: int  # tokens this verification emitted, bonus included (tau of this iteration)
    draft_ms: float | None  # None for vanilla
    verify_ms: float
    transfer_ms: float | None  # None where nothing streams (CPU, all layers resident)
    tree_nodes: int = 1
    accepted_depth: int = 0  # draft tokens accepted (emitted - 1)
    draft_forwards: int = 0  # forwards of the drafter that grew this tree (0 for vanilla)
    iteration_ms: float | None = None  # wall time of the whole round; minus draft and verify: host work


@dataclass
class GenerationStats:
    method: str
    lossy: bool = False
    prompt_tokens: int = 0
    reused_tokens: int = 0  # of the prompt: KV kept from the last generation, not prefilled again
    new_tokens: int = 0
    prefill_ms: float = 0.0
    decode_s: float = 0.0
    stream_bound_ms: float | None = None
    peak_gpu_bytes: int | None = None
    iterations: list[IterationStats] = field(default_factory=list)

    def add(self, it: IterationStats) -> None:
        self.iterations.append(it)

    @property
    def tau(self) -> float:
        """Tokens emitted per target verification forward, bonus token included."""
        if not self.iterations:
            return 0.0
        return sum(it.emitted for it in self.iterations) / len(self.iterations)

    @property
    def tok_per_s(self) -> float:
        """Tokens the decode phase produced per second: the first new token comes from the prefill
        (timed in prefill_ms), so counting it here would flatter short generations."""
        decoded = max(self.new_tokens - 1, 0)
        return decoded / self.decode_s if self.decode_s > 0 else 0.0

    def _mean(self, name: str) -> float | None:
        values = [getattr(it, name) for it in self.iterations if getattr(it, name) is not None]
        return sum(values) / len(values) if values else None

    def as_dict(self) -> dict:
        """The `stats` object of the CLI contract (DESIGN.md section 7), plus a few extras."""
        return {
            "new_tokens": self.new_tokens,
            "tok_per_s": self.tok_per_s,
            "tau": self.tau,
            "iterations": len(self.iterations),
            "draft_ms": self._mean("draft_ms"),
            "verify_ms": self._mean("verify_ms"),
            "transfer_ms": self._mean("transfer_ms"),
            "stream_bound_ms": self.stream_bound_ms,
            "peak_gpu_bytes": self.peak_gpu_bytes,
            "lossy": self.lossy,
            "prompt_tokens": self.prompt_tokens,
            "reused_tokens": self.reused_tokens,
            "prefill_ms": self.prefill_ms,
        }


@contextmanager
def nvtx_range(name: str, enabled: bool) -> Iterator[None]:
    """An NVTX range for Nsight Systems (--nvtx-profiling); nothing when off or without CUDA."""
    if not (enabled and torch.cuda.is_available()):
        yield
        return
    torch.cuda.nvtx.range_push(name)
    try:
        yield
    finally:
        torch.cuda.nvtx.range_pop()


class Timer:
    """Named spans timed with CUDA events on a GPU (no sync until `collect`), perf_counter on CPU;
    each span is also an NVTX range when `nvtx`."""

    def __init__(self, device: torch.device, nvtx: bool = False) -> None:
        self._cuda = device.type == "cuda"
        self._nvtx = nvtx
        self._spans: dict[str, tuple] = {}

    @contextmanager
    def span(self, name: str) -> Iterator[None]:
        with nvtx_range(name, self._nvtx):
            yield from self._timed(name)

    def _timed(self, name: str) -> Iterator[None]:
        if self._cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._spans[name] = (start, end)
        else:
            started = time.perf_counter()
            yield
            self._spans[name] = (started, time.perf_counter())

    def collect(self) -> dict[str, float]:
        """Milliseconds per span since the last collect (waits for the GPU to reach them)."""
        if self._cuda:
            times = {}
            for name, (start, end) in self._spans.items():
                end.synchronize()
                times[name] = start.elapsed_time(end)
        else:
            times = {name: (end - start) * 1e3 for name, (start, end) in self._spans.items()}
        self._spans.clear()
        return times
