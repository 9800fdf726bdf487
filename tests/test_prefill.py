"""A prefill runs layer by layer over all its chunks: an offloaded layer crosses PCIe once per
prompt however many chunks it has, and the chunking changes no number (the row-invariant target)
and no token."""

from __future__ import annotations

import pytest
import torch

from engine import EngineConfig, SamplingConfig, load_engine
from tests.random_models import save_random_model

STREAMED = dict(emulate_offload=True, keep_first_n_layers_on_gpu=1, offload_slots=2)


def prompt_ids(length: int, seed: int, vocab: int = 512) -> list[int]:
    return torch.randint(3, vocab, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_a_long_prompt_streams_every_offloaded_layer_once(tmp_path, bundled_folder):
    folder = str(save_random_model(tmp_path / "llama", "llama", bundled_folder))
    engine = load_engine(EngineConfig(llm_path=folder, prefill_chunk=8, **STREAMED))
    stack = engine.target.stack
    offloaded = stack.num_layers - stack.keep_on_gpu
    assert offloaded == 2
    # 61 tokens in 8 chunks, one new token (chosen from the prefill's logits: no decoding forward).
    engine.generate(prompt_ids(61, seed=5), SamplingConfig(max_new_tokens=1))
    assert stack.layers_streamed == offloaded


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_chunked_prefill_writes_the_cache_and_logits_of_one_chunk(tmp_path, bundled_folder, arch):
    # bfloat16 with the row-invariant target (its default there): every row is computed as a
    # one-token forward would, so chunks of 5 and one chunk of 512 are the same bits.
    folder = str(save_random_model(tmp_path / arch, arch, bundled_folder))
    engine = load_engine(EngineConfig(llm_path=folder, dtype="bfloat16"))
    assert engine.describe()["row_invariant"]
    transformer, stack, ops = engine.target.transformer, engine.target.stack, engine.target.ops
    prompt = torch.tensor(prompt_ids(47, seed=7))
    results = []
    for chunk, kept in ((512, 0), (5, 0), (5, 11)):
        cache = transformer.new_cache(64)
        if kept:  # the first `kept` slots as an earlier turn left them
            transformer.prefill(stack, cache, prompt[:kept], 512, ops=ops)
        results.append((transformer.prefill(stack, cache, prompt, chunk, kept, ops), cache.kv.clone()))
    for logits, kv in results[1:]:
        assert torch.equal(logits, results[0][0]) and torch.equal(kv, results[0][1])


@pytest.mark.parametrize("method", ["vanilla", "subspec_sd", "classic_sd"])
def test_chunked_prefill_replies_as_one_chunk(random_folder, method):
    prompts = [prompt_ids(20 + 5 * k, seed=k) for k in range(6)]
    common = dict(llm_path=str(random_folder), method=method, max_depth=6, topk_len=2, dtype="bfloat16",
                  draft_model_path=str(random_folder) if method == "classic_sd" else None)
    whole = load_engine(EngineConfig(**common))
    chunked = load_engine(EngineConfig(prefill_chunk=7, **common, **STREAMED))
    for prompt in prompts:
        expected = whole.generate(prompt, SamplingConfig(max_new_tokens=16)).token_ids
        assert chunked.generate(prompt, SamplingConfig(max_new_tokens=16)).token_ids == expected
