"""SubSpec engine: offloaded LLM decoding with lossless substitute speculative decoding.

Public API (front ends use only this):

    from engine import EngineConfig, SamplingConfig, load_engine, EngineError
    eng = load_engine(EngineConfig(method="subspec_sd"), progress=print)
    ids = eng.chat_ids([{"role": "user", "content": "Hi"}])
    gen = eng.generate(ids, SamplingConfig(max_new_tokens=64), on_text=print)
    gen.text, gen.token_ids, gen.finish_reason, gen.stats.as_dict()
"""

from engine.config import METHODS, EngineConfig, SamplingConfig
from engine.engine import Engine, Generation, load_engine
from engine.errors import EngineError
from engine.stats import GenerationStats, IterationStats

__all__ = [
    "METHODS",
    "Engine",
    "EngineConfig",
    "EngineError",
    "Generation",
    "GenerationStats",
    "IterationStats",
    "SamplingConfig",
    "load_engine",
]
