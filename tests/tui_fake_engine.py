"""A fake engine and a fake profiler with the real ones' surfaces, for fast and deterministic TUI tests."""

from __future__ import annotations

import threading
from datetime import datetime, timezone

from engine import EngineConfig, EngineError, Generation, GenerationStats, IterationStats
from profiles import GIB, ModelPlan, Profile
from profiles.hardware import CpuInfo, DeviceInfo, GpuInfo

FAKE_CPU = DeviceInfo(cpu=CpuInfo(name="Fake CPU", cores=2), gpu=None)
FAKE_GPU = DeviceInfo(cpu=FAKE_CPU.cpu, gpu=GpuInfo(index=0, name="Fake GPU", uuid="fake-uuid",
                                                    total_vram_bytes=8 * GIB, compute_capability="8.9",
                                                    h2d_gbps=25.0))
MEASURED_AT = datetime(2025, 1, 2, 3, 4, tzinfo=timezone.utc)


class FakeEngine:
    """Streams `reply` in pieces of `piece_words` words, one IterationStats per piece.

    `gate`, when given, must be set by the test before each piece is emitted: it lets a test act
    (stop, check the partial reply) while a reply is streaming.
    """

    model_name = "fake-model"

    def __init__(self, config: EngineConfig | None = None, reply: str = "Hello **world**, how are you?",
                 piece_words: int = 2, finish_reason: str = "eos", device: str = "cpu",
                 generate_error: str | None = None, gate: threading.Event | None = None,
                 max_length: int = 512, decode_s: float = 0.5) -> None:
        self.config = config or EngineConfig()
        self.reply = reply
        self.piece_words = piece_words
        self.finish_reason = finish_reason
        self.device = device
        self.generate_error = generate_error
        self.gate = gate
        self.max_length = max_length
        self.decode_s = decode_s
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
        stats.decode_s = self.decode_s
        return Generation(token_ids=list(range(stats.new_tokens)), text=text, finish_reason=finish, stats=stats)

    def describe(self) -> dict:
        layers = 30
        return {"method": self.config.method, "model": self.model_name, "device": self.device,
                "dtype": "float32", "layers_total": layers,
                "layers_on_gpu": layers if self.device == "cpu" else 12, "offloaded_bytes": 0,
                "max_length": self.max_length, "h2d_gbps": None, "stream_bound_ms": None}

    def forget(self) -> None:
        pass

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


def cpu_plan(method: str = "subspec_sd", max_depth: int = 6, topk_len: int = 2, max_context: int = 8192) -> ModelPlan:
    """A plan as profiles.fit.choose_cpu writes it."""
    drafts = method != "vanilla"
    return ModelPlan(
        method=method, device="cpu", layers_on_gpu=0, layers_total=30, max_context=max_context, stream_buffers=0,
        config_fingerprint="fake", measured_at=MEASURED_AT,
        tree_policy="reference" if drafts else None,
        max_depth=max_depth if drafts else None,
        topk_len=topk_len if drafts else None,
        node_budget=max_depth * topk_len if drafts else None,
        tok_per_s_by_candidate={"vanilla": 20.0, f"{method} depth {max_depth} top-{topk_len}": 30.0},
    )


def gpu_plan(layers_on_gpu: int = 30, max_depth: int = 16) -> ModelPlan:
    """A subspec_sd plan as profiles.fit.fit_gpu writes it for the bundled model on FAKE_GPU."""
    return ModelPlan(
        method="subspec_sd", device="cuda", layers_on_gpu=layers_on_gpu, layers_total=30, max_context=2048,
        stream_buffers=0 if layers_on_gpu == 30 else 3, config_fingerprint="fake", measured_at=MEASURED_AT,
        vram_budget_bytes=8 * GIB, substitute_bits=4, substitute_group=64, tree_policy="reference",
        max_depth=max_depth, topk_len=6, node_budget=max_depth * 6, estimated_peak_bytes=GIB // 2,
        measured_peak_bytes=GIB // 3, verify_ms_by_nodes={1: 4.0, 97: 4.1, 193: 5.0},
    )


class FakeProfiler:
    """Stands in for profiles.run_profile: records each call, reports `steps` as progress (a
    measurement; no steps = a stored profile read back), then raises `error` or returns `plan`
    (default: a CPU plan for the method asked for, subspec_sd when the profile chooses). With `gate`, it waits for the test after the
    first step."""

    def __init__(self, plan: ModelPlan | None = None, steps: tuple[str, ...] = (),
                 error: Exception | None = None, gate: threading.Event | None = None,
                 messages: tuple[str, ...] = (), device: DeviceInfo = FAKE_CPU) -> None:
        self.plan = plan
        self.device = device
        self.steps = steps
        self.error = error
        self.gate = gate
        self.messages = messages
        self.calls: list[tuple[str | None, str, bool]] = []
        self.contexts: list[int | None] = []  # max_context of each call (None: the profile plans it)

    def __call__(self, model, vram_limit_gb, method, progress, force, *, max_context=None, **_options) -> Profile:
        self.calls.append((model, method, force))
        self.contexts.append(max_context)
        for index, step in enumerate(self.steps):
            progress(step)
            if index == 0 and self.gate is not None:
                self.gate.wait(timeout=10)
        if self.error is not None:
            raise self.error
        plan = self.plan or cpu_plan(method or "subspec_sd")
        return Profile(self.device, model or "bundled:SmolLM2-135M-Instruct", method, plan, None,
                       reused=not self.steps, messages=list(self.messages))
