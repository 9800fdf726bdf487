"""SubSpec engine: offloaded LLM decoding with lossless substitute speculative decoding.

Public API (front ends use only this):

    from engine import EngineConfig, SamplingConfig, load_engine, EngineError
    eng = load_engine(EngineConfig(method="subspec_sd"), progress=print)
    ids = eng.chat_ids([{"role": "user", "content": "Hi"}])
    gen = eng.generate(ids, SamplingConfig(max_new_tokens=64), on_text=print)
    gen.text, gen.token_ids, gen.finish_reason, gen.stats.as_dict()

Names are imported on first use (PEP 562): the configs and the error type come without torch, so
a front end parses its arguments and answers `--help` before torch loads (seconds on a CPU).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# name -> the module that defines it
_EXPORTS = {
    "METHODS": "engine.config",
    "EngineConfig": "engine.config",
    "SamplingConfig": "engine.config",
    "EngineError": "engine.errors",
    "Engine": "engine.engine",
    "Generation": "engine.engine",
    "load_engine": "engine.engine",
    "GenerationStats": "engine.stats",
    "IterationStats": "engine.stats",
}

__all__ = [
    "METHODS", "Engine", "EngineConfig", "EngineError", "Generation", "GenerationStats", "IterationStats",
    "SamplingConfig", "load_engine",
]

if TYPE_CHECKING:
    from engine.config import METHODS, EngineConfig, SamplingConfig
    from engine.engine import Engine, Generation, load_engine
    from engine.errors import EngineError
    from engine.stats import GenerationStats, IterationStats


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
