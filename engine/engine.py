"""The facade front ends use: load a model for a method, then generate (streaming, cancellable)."""

from __future__ import annotations

import gc
import os
import threading
import time
from dataclasses import dataclass
from typing import Callable, Literal

import torch

from engine.config import EngineConfig, SamplingConfig
from engine.drafters import Drafter
from engine.emit import Emitter
from engine.errors import EngineError
from engine.generate import Target, run
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

    def __init__(
        self,
        config: EngineConfig,
        model_name: str,
        tokenizer,
        target: Target,
        drafter: Drafter,
        eos_ids: set[int],
        stream_bound_ms: float | None,
        details: dict,
    ) -> None:
        self.config = config
        self.model_name = model_name
        self.tokenizer = tokenizer
        self.max_length = target.cache.max_length
        self.target = target
        self.drafter = drafter
        self._eos_ids = eos_ids
        self._stream_bound_ms = stream_bound_ms
        self._details = details
        # The token ids the target's cache holds from the last generation, and the cache's version
        # then: the next prompt reuses their common prefix (a conversation's earlier turns).
        self._held: list[int] = []
        self._held_version = -1

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a chat (role/content dicts) with the generation prompt appended."""
        if not getattr(self.tokenizer, "chat_template", None):
            text = "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"
            return self.tokenizer.encode(text)
        try:
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except Exception as err:  # noqa: BLE001 - jinja raises its own types (a template's raise_exception)
            raise EngineError(f"this model's chat template cannot render these messages: {err}") from None
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)

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
        if not prompt_ids:
            raise EngineError("the prompt is empty")
        if len(prompt_ids) >= self.max_length:
            raise EngineError(
                f"the prompt has {len(prompt_ids)} tokens but the context holds {self.max_length}: "
                "shorten it or raise --max-length"
            )
        if sampling.do_sample and not (0.0 < sampling.top_p <= 1.0):
            raise EngineError(f"top_p must be in (0, 1], got {sampling.top_p}")
        device = self.target.transformer.device
        stats = GenerationStats(
            method=self.config.method,
            lossy=self.config.verify_method == "lossy",
            prompt_tokens=len(prompt_ids),
            stream_bound_ms=self._stream_bound_ms,
        )
        emitter = Emitter(self.tokenizer, self._eos_ids, sampling.max_new_tokens, sampling.stop, on_text)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        kept = self._reusable(prompt_ids)
        stats.reused_tokens = kept
        self.forget()  # until this generation has finished, the cache holds nothing known
        try:
            held = run(self.target, self.drafter, self.config, prompt_ids, sampling, emitter, stats, on_iteration,
                       cancel, kept)
        except torch.cuda.OutOfMemoryError:
            raise EngineError(
                "out of GPU memory while generating: lower --max-length, the tree size, "
                "or --keep-first-n-layers-on-gpu"
            ) from None
        self._held, self._held_version = held, self.target.cache.version
        if device.type == "cuda":
            stats.peak_gpu_bytes = torch.cuda.max_memory_allocated(device)
        stats.new_tokens = len(emitter.token_ids)
        return Generation(emitter.token_ids, emitter.text, emitter.finish_reason or "length", stats)

    def _reusable(self, prompt_ids: list[int]) -> int:
        """How many leading tokens of `prompt_ids` the cache holds from the last generation (at
        least one token is always computed: its logits choose the first new token)."""
        if not self.config.reuse_prefix or self._held_version != self.target.cache.version:
            return 0
        limit = min(len(self._held), len(prompt_ids) - 1)
        kept = 0
        while kept < limit and self._held[kept] == prompt_ids[kept]:
            kept += 1
        return kept

    def forget(self) -> None:
        """Reuse nothing of the cache in the next generation (timings that must prefill it all)."""
        self._held, self._held_version = [], -1

    def warm_up(self, progress: Callable[[str], None] | None = None) -> float:
        """Run one throw-away generation that compiles and captures what a first reply would (the
        draft steps' compiled math and CUDA graphs at every draft width the tree uses, the Triton
        kernels of draft and target, prefill chunks included), so the user's first reply runs at
        speed. Leaves nothing behind: the next generation reuses none of it. Returns its seconds."""
        started = time.perf_counter()
        if progress is not None:
            progress("warming up: compiling kernels and capturing CUDA graphs (kernels are cached on disk)")
        depth = self.config.max_depth if self.config.method != "vanilla" else 2
        vocab = max(2, min(len(self.tokenizer), self.target.transformer.vocab_size))
        # A prompt that fills the context but for the tree: its prefill compiles the kernels of
        # whole prefill passes (the row-invariant attention compiles once per cache, whatever the
        # context length), which a long first turn would otherwise wait for.
        length = max(1, self.max_length - (1 + self.config.draft_nodes()) - depth - 2)
        prompt = [(7 + 31 * k) % vocab for k in range(length)]  # ordinary ids: any tokenizer, no template
        self.generate(prompt, SamplingConfig(max_new_tokens=depth + 2))
        self.forget()
        return time.perf_counter() - started

    def describe(self) -> dict:
        """Device, dtype, layers on GPU / offloaded, method, substitute bits: for status panels."""
        return dict(self._details)

    def close(self) -> None:
        """Free GPU memory and pinned buffers."""
        self.target = self.drafter = None  # type: ignore[assignment]
        # The drafter and its CUDA graphs hold each other (the graphs call the drafter's step): only
        # the cycle collector frees them, and the cache can only hand back what is already freed.
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def load_engine(config: EngineConfig, progress: Callable[[str], None] | None = None, warm_up: bool = True) -> Engine:
    """Load the model(s) named by `config`, warmed up on a GPU (Engine.warm_up) unless `warm_up`
    is False. Raises EngineError with one clear line on bad input."""
    from engine.build import build_engine

    persistent_kernel_caches()
    engine = build_engine(config, progress)
    if warm_up and engine.target.transformer.device.type == "cuda":
        engine._details["warm_up_s"] = engine.warm_up(progress)
    return engine


def persistent_kernel_caches() -> None:
    """Compiled Triton kernels and torch.compile's graphs go under our platformdirs cache (unless
    the user set their own): the next process finds them there instead of compiling again."""
    from engine.loading import cache_dir

    os.environ.setdefault("TRITON_CACHE_DIR", str(cache_dir() / "triton"))
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "inductor"))
