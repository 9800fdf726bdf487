"""The metrics of DESIGN.md section 5, gathered per iteration and summarised per generation."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class IterationStats:
    """One draft -> verify -> accept round (vanilla: one decode step)."""

    emitted: int  # tokens this verification emitted, bonus included (tau of this iteration)
    draft_ms: float | None  # None for vanilla
    verify_ms: float
    transfer_ms: float | None  # None where nothing streams (CPU, all layers resident)
    tree_nodes: int = 1
    accepted_per_depth: list[int] = field(default_factory=list)  # detailed analysis


@dataclass
class GenerationStats:
    method: str
    lossy: bool = False
    prompt_tokens: int = 0
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
        return self.new_tokens / self.decode_s if self.decode_s > 0 else 0.0

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
            "prefill_ms": self.prefill_ms,
        }
