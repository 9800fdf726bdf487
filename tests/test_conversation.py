"""A conversation's next turn reuses the KV cache of the turns before it (engine.Engine keeps the
token ids its cache holds and prefills only what a new prompt adds): the output is the output
without reuse, for every method, on random models and the bundled model."""

from __future__ import annotations

import pytest

from engine import EngineConfig, SamplingConfig, load_engine
from tests.random_models import save_random_model

TURNS = ["Tell me about the sea.", "And about mountains?", "Which do you prefer, in one line?"]


def conversation(engine, reference, turns: list[str], new_tokens: int) -> list[int]:
    """Run the turns on `engine` (reusing its cache) and on `reference` (never reusing); assert
    each reply is the same; return how many prompt tokens each turn reused."""
    messages: list[dict[str, str]] = []
    reused = []
    for turn in turns:
        messages.append({"role": "user", "content": turn})
        prompt = engine.chat_ids(messages)
        reference.forget()
        expected = reference.generate(prompt, SamplingConfig(max_new_tokens=new_tokens))
        got = engine.generate(prompt, SamplingConfig(max_new_tokens=new_tokens))
        assert got.token_ids == expected.token_ids, turn
        assert expected.stats.reused_tokens == 0
        reused.append(got.stats.reused_tokens)
        messages.append({"role": "assistant", "content": got.text})
    return reused


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def folder(request, tmp_path_factory, bundled_folder):
    # The bundled tokenizer's whole vocabulary: chat turns are text, tokenized as a user's are.
    return str(save_random_model(tmp_path_factory.mktemp(request.param), request.param, bundled_folder,
                                 vocab_size=49152))


@pytest.mark.parametrize("method", ["vanilla", "subspec_sd", "classic_sd"])
def test_later_turns_reuse_the_cache_and_reply_as_without_it(folder, method):
    # The row-invariant target (on by default in 16-bit dtypes, asked for here in float32)
    # computes every row as a one-token forward: what a turn reuses is what a prefill would write.
    common = dict(llm_path=folder, method=method, max_depth=6, topk_len=2, row_invariant=True,
                  draft_model_path=folder if method == "classic_sd" else None)
    engine, reference = load_engine(EngineConfig(**common)), load_engine(EngineConfig(**common))
    reused = conversation(engine, reference, TURNS, new_tokens=12)
    assert reused[0] == 0 and all(r > 0 for r in reused[1:])


@pytest.mark.parametrize("method", ["vanilla", "subspec_sd"])
def test_float32_turns_reply_as_without_reuse(tmp_path, bundled_folder, method):
    # The CPU's default (no row-invariant target): reused KV was computed in other batches than a
    # prefill would use, which in float32 moves logits by rounding only; these turns are identical.
    folder = str(save_random_model(tmp_path / "llama", "llama", bundled_folder, vocab_size=49152))
    common = dict(llm_path=folder, method=method, max_depth=6, topk_len=2)
    engine, reference = load_engine(EngineConfig(**common)), load_engine(EngineConfig(**common))
    assert not engine.describe()["row_invariant"]
    assert all(r > 0 for r in conversation(engine, reference, TURNS, new_tokens=12)[1:])


def test_bfloat16_turns_are_identical_with_the_row_invariant_target(folder):
    # In 16-bit dtypes the row-invariant target (the default there) computes every row, prefill
    # included, as a one-token forward: the reused KV is bit for bit what a prefill writes.
    common = dict(llm_path=folder, method="subspec_sd", max_depth=6, topk_len=2, dtype="bfloat16")
    engine, reference = load_engine(EngineConfig(**common)), load_engine(EngineConfig(**common))
    assert engine.describe()["row_invariant"]
    assert all(r > 0 for r in conversation(engine, reference, TURNS, new_tokens=16)[1:])


@pytest.mark.slow
def test_bundled_model_conversations_reuse_every_earlier_turn():
    config = EngineConfig(method="subspec_sd", max_depth=6, topk_len=2)
    engine, reference = load_engine(config), load_engine(config)
    messages: list[dict[str, str]] = []
    previous_prompt_len = 0
    for turn in TURNS:
        messages.append({"role": "user", "content": turn})
        prompt = engine.chat_ids(messages)
        reference.forget()
        expected = reference.generate(prompt, SamplingConfig(max_new_tokens=24))
        got = engine.generate(prompt, SamplingConfig(max_new_tokens=24))
        assert got.token_ids == expected.token_ids
        # The chat template renders earlier turns as it did: at least the last prompt is reused.
        assert got.stats.reused_tokens >= previous_prompt_len
        previous_prompt_len = len(prompt)
        messages.append({"role": "assistant", "content": got.text})


def test_nothing_is_reused_when_the_cache_was_written_since(folder):
    engine = load_engine(EngineConfig(llm_path=folder))
    prompt = engine.chat_ids([{"role": "user", "content": TURNS[0]}])
    engine.generate(prompt, SamplingConfig(max_new_tokens=8))
    assert engine.generate(prompt, SamplingConfig(max_new_tokens=8)).stats.reused_tokens == len(prompt) - 1
    engine.target.cache.truncate(3)  # someone else wrote the cache (a benchmark timing a forward)
    assert engine.generate(prompt, SamplingConfig(max_new_tokens=8)).stats.reused_tokens == 0
    engine.forget()
    assert engine.generate(prompt, SamplingConfig(max_new_tokens=8)).stats.reused_tokens == 0
    off = load_engine(EngineConfig(llm_path=folder, reuse_prefix=False))
    off.generate(prompt, SamplingConfig(max_new_tokens=8))
    assert off.generate(prompt, SamplingConfig(max_new_tokens=8)).stats.reused_tokens == 0
