"""A stand-in engine with the public surface of `engine.Engine`, for CLI, benchmark and API tests.

Tokens are characters (id = code point), the chat template is `<role>content` per message plus
`<assistant>`, and every generation streams the same reply three characters per iteration, so tests
can predict text, token counts and stats exactly. It records what it was asked and fails loudly if
two generations ever overlap (the engine is not thread-safe).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from engine import EngineConfig, EngineError, Generation, GenerationStats, IterationStats, SamplingConfig

REPLY = "The capital of France is Paris. Anything else?"
CHARS_PER_ITERATION = 3


class CharTokenizer:
    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i) for i in ids)


class FakeEngine:
    model_name = "fake/char-model"

    def __init__(self, config: EngineConfig | None = None, max_length: int = 512, reply: str = REPLY,
                 seconds_per_iteration: float = 0.0) -> None:
        self.config = config or EngineConfig()
        self.max_length = max_length
        self.reply = reply
        self.seconds_per_iteration = seconds_per_iteration
        self.tokenizer = CharTokenizer()
        self.prompts: list[str] = []  # decoded prompt of every generate call
        self.samplings: list[SamplingConfig] = []
        self.finish_reasons: list[str] = []
        self.closed = False
        self._busy = threading.Lock()
        self.overlapped = False  # set if a generation started while another was running

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        text = "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"
        return self.tokenizer.encode(text)

    def generate(self, prompt_ids: list[int], sampling: SamplingConfig,
                 on_text: Callable[[str], None] | None = None,
                 on_iteration: Callable[[IterationStats], None] | None = None,
                 cancel: threading.Event | None = None) -> Generation:
        if not self._busy.acquire(blocking=False):
            self.overlapped = True
            raise AssertionError("two generations at once")
        try:
            return self._generate(prompt_ids, sampling, on_text, on_iteration, cancel)
        finally:
            self._busy.release()

    def _generate(self, prompt_ids, sampling, on_text, on_iteration, cancel) -> Generation:
        if len(prompt_ids) >= self.max_length:
            raise EngineError(f"the prompt ({len(prompt_ids)} tokens) does not fit max_length {self.max_length}")
        self.prompts.append(self.tokenizer.decode(prompt_ids))
        self.samplings.append(sampling)
        stats = GenerationStats(method=self.config.method, lossy=self.config.verify_method == "lossy",
                                prompt_tokens=len(prompt_ids))
        budget = min(sampling.max_new_tokens, self.max_length - len(prompt_ids))
        text, finish = self.reply[:budget], "eos" if budget >= len(self.reply) else "length"
        for stop in sampling.stop:
            if stop in text:
                text, finish = text[: text.index(stop)], "stop"
        emitted = ""
        start = time.perf_counter()
        while len(emitted) < len(text):
            if cancel is not None and cancel.is_set():
                finish = "cancelled"
                break
            time.sleep(self.seconds_per_iteration)
            piece = text[len(emitted): len(emitted) + CHARS_PER_ITERATION]
            emitted += piece
            it = IterationStats(emitted=len(piece), draft_ms=1.5, verify_ms=4.0, transfer_ms=None, tree_nodes=7)
            stats.add(it)
            if on_iteration is not None:
                on_iteration(it)
            if on_text is not None:
                on_text(piece)
        stats.new_tokens = len(emitted)
        stats.decode_s = max(time.perf_counter() - start, 1e-6)
        self.finish_reasons.append(finish)
        return Generation(token_ids=self.tokenizer.encode(emitted), text=emitted, finish_reason=finish, stats=stats)

    def describe(self) -> dict:
        return {"device": "cpu", "dtype": "float32", "method": self.config.method, "layers_on_gpu": 0,
                "layers_total": 2}

    def forget(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def use_fake_profiles(monkeypatch, tmp_path) -> list[tuple]:
    """Headless commands plan with a stand-in profile (a CPU plan of the method asked for, or
    subspec_sd when the profile chooses) instead of measuring the real engine; returns its calls."""
    import profiles.runner
    from tui_fake_engine import FakeProfiler

    monkeypatch.setenv("SUBSPEC_CONFIG_DIR", str(tmp_path / "config"))
    profiler = FakeProfiler()
    monkeypatch.setattr(profiles.runner, "run_profile", profiler)
    return profiler.calls
