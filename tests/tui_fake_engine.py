"""A fake engine with the real engine's surface, for fast and deterministic TUI tests."""

from __future__ import annotations

import threading

from engine import EngineConfig, EngineError, Generation, GenerationStats, IterationStats


class FakeEngine:
    """Streams `reply` in pieces of `piece_words` words, one IterationStats per piece.

    `gate`, when given, must be set by the test before each piece is emitted: it lets a test act
    (stop, check the partial reply) while a reply is streaming.
    """

    model_name = "fake-model"

    def __init__(self, config: EngineConfig | None = None, reply: str = "Hello **world**, how are you?",
                 piece_words: int = 2, finish_reason: str = "eos", device: str = "cpu",
                 generate_error: str | None = None, gate: threading.Event | None = None,
                 max_length: int = 512) -> None:
        self.config = config or EngineConfig()
        self.reply = reply
        self.piece_words = piece_words
        self.finish_reason = finish_reason
        self.device = device
        self.generate_error = generate_error
        self.gate = gate
        self.max_length = max_length
        self.seen_messages: list[list[dict[str, str]]] = []
        self.seen_sampling = []
        self.closed = False

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        self.seen_messages.append([dict(m) for m in messages])
        return list(range(sum(len(m["content"].split()) for m in messages) + 1))

    def generate(self, prompt_ids, sampling, on_text=None, on_iteration=None, cancel=None) -> Generation:
        self.seen_sampling.append(sampling)
        if self.generate_error:
            raise EngineError(self.generate_error)
        stats = GenerationStats(method=self.config.method, prompt_tokens=len(prompt_ids))
        words = self.reply.split(" ")
        pieces = [" ".join(words[i:i + self.piece_words]) for i in range(0, len(words), self.piece_words)]
        text, finish = "", self.finish_reason
        for index, piece in enumerate(pieces):
            if self.gate is not None:
                self.gate.wait(timeout=10)
                self.gate.clear()
            if cancel is not None and cancel.is_set():
                finish = "cancelled"
                break
            piece = piece if index == 0 else " " + piece
            it = IterationStats(emitted=index % 3 + 1, draft_ms=2.0, verify_ms=8.0,
                                transfer_ms=None if self.device == "cpu" else 5.0, tree_nodes=7)
            stats.add(it)
            if on_iteration:
                on_iteration(it)
            text += piece
            if on_text:
                on_text(piece)
        stats.new_tokens = sum(it.emitted for it in stats.iterations)
        stats.decode_s = 0.5
        return Generation(token_ids=list(range(stats.new_tokens)), text=text, finish_reason=finish, stats=stats)

    def describe(self) -> dict:
        layers = 30
        return {"method": self.config.method, "model": self.model_name, "device": self.device,
                "dtype": "float32", "layers_total": layers,
                "layers_on_gpu": layers if self.device == "cpu" else 12, "offloaded_bytes": 0,
                "max_length": self.max_length, "h2d_gbps": None, "stream_bound_ms": None}

    def close(self) -> None:
        self.closed = True


def fake_loader(engine: FakeEngine | None = None, error: str | None = None, **kwargs):
    """An engine_loader for SubSpecChatApp; records the configs it was asked to load."""
    configs: list[EngineConfig] = []

    def load(config: EngineConfig, progress) -> FakeEngine:
        configs.append(config)
        progress("loading fake weights")
        if error:
            raise EngineError(error)
        if engine is not None:
            engine.config = config
            return engine
        return FakeEngine(config, **kwargs)

    load.configs = configs  # type: ignore[attr-defined]
    return load
