"""The facade front ends use: load a model for a method, then generate (streaming, cancellable)."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, Literal

from engine.config import EngineConfig, SamplingConfig
from engine.stats import GenerationStats, IterationStats

FinishReason = Literal["eos", "stop", "length", "context", "cancelled"]


@dataclass
class Generation:
    token_ids: list[int]  # new tokens only (stop strings already cut from `text`, not from ids)
    text: str
    finish_reason: FinishReason  # context = hit max_length; cancelled = cancel event set
    stats: GenerationStats


class Engine:
    """A loaded target (+ drafter) ready to generate. Not thread-safe: one generation at a time."""

    config: EngineConfig
    model_name: str
    max_length: int

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a chat (role/content dicts) with the generation prompt appended."""
        raise NotImplementedError

    def generate(
        self,
        prompt_ids: list[int],
        sampling: SamplingConfig,
        on_text: Callable[[str], None] | None = None,
        on_iteration: Callable[[IterationStats], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> Generation:
        """Generate after `prompt_ids`. `on_text` gets each new piece of decoded text (never a
        piece of a stop string); `on_iteration` gets each iteration's stats (for live panels).
        Raises EngineError if the prompt does not fit `max_length`."""
        raise NotImplementedError

    def describe(self) -> dict:
        """Device, dtype, layers on GPU / offloaded, method, substitute bits: for status panels."""
        raise NotImplementedError

    def close(self) -> None:
        """Free GPU memory and pinned buffers."""


def load_engine(config: EngineConfig, progress: Callable[[str], None] | None = None) -> Engine:
    """Load the model(s) named by `config`. Raises EngineError with one clear line on bad input."""
    raise NotImplementedError
