"""A stand-in for `engine.load_engine` in profile-fitting tests: its memory and speed follow rules
the test sets, so the fitting loop (lower N, then the stream buffers, on over-budget or OOM; pick
the free tree) is checked without a GPU."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from engine import EngineConfig, EngineError, Generation, GenerationStats, SamplingConfig


class WordTokenizer:
    all_special_ids = [0]

    def encode(self, text: str) -> list[int]:
        return list(range(len(text.split())))

    def __len__(self) -> int:
        return 1000


@dataclass
class FakeGpu:
    """What the fake "GPU" does: peak bytes for N resident layers, B stream buffers and a tree
    depth, when loading runs out of memory, and the wall time of a forward over T tokens."""

    peak_bytes: Callable[[int, int, int], int]  # (layers_on_gpu, offload_slots, max_depth) -> peak bytes
    forward_s: Callable[[int], float]  # tokens -> seconds (the fake sleeps that long)
    out_of_memory: Callable[[int, int], bool] = lambda layers, slots: False
    # Decode seconds of a generation; by default deeper trees "decode" faster.
    decode_s: Callable[[EngineConfig], float] = lambda config: 0.1 / (
        1 + config.max_depth if config.method != "vanilla" else 1
    )
    # Extra peak bytes of a generation with this config (wider draft forwards capture more graphs).
    generation_extra_bytes: Callable[[EngineConfig], int] = lambda config: 0
    generation_out_of_memory: Callable[[EngineConfig], bool] = lambda config: False
    loads: list[EngineConfig] = field(default_factory=list)
    engines: list[FakeEngine] = field(default_factory=list)

    def load(self, config: EngineConfig, progress) -> FakeEngine:
        self.loads.append(replace(config))  # as loaded: the engine's own copy may be reconfigured
        if self.out_of_memory(config.keep_first_n_layers_on_gpu or 0, config.offload_slots):
            _raise_out_of_memory("fake does not fit the GPU memory with this plan")
        self.engines.append(FakeEngine(config, self))
        return self.engines[-1]


class FakeEngine:
    def __init__(self, config: EngineConfig, gpu: FakeGpu) -> None:
        self.config = config
        self.gpu = gpu
        self.tokenizer = WordTokenizer()
        self.closed = False

    def generate(self, prompt_ids: list[int], sampling: SamplingConfig, **_ignored) -> Generation:
        assert not self.closed
        if sampling.max_new_tokens == 1:
            time.sleep(self.gpu.forward_s(len(prompt_ids)))
        elif self.gpu.generation_out_of_memory(self.config):
            _raise_out_of_memory("out of GPU memory while generating")
        decode_s = self.gpu.decode_s(self.config)
        stats = GenerationStats(method=self.config.method, new_tokens=sampling.max_new_tokens, decode_s=decode_s)
        stats.peak_gpu_bytes = self.gpu.peak_bytes(
            self.config.keep_first_n_layers_on_gpu or 0, self.config.offload_slots, self.config.max_depth
        ) + self.gpu.generation_extra_bytes(self.config)
        return Generation([0] * sampling.max_new_tokens, "", "length", stats)

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        return self.tokenizer.encode(" ".join(m["content"] for m in messages))

    def describe(self) -> dict:
        return {"layers_total": 28}

    def forget(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def _raise_out_of_memory(message: str) -> None:
    """As the engine does: torch's OOM becomes one EngineError line, the original kept as context."""
    try:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")
    except torch.cuda.OutOfMemoryError:
        raise EngineError(message) from None
