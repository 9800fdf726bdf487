"""On a GPU, the product's target (row-invariant in 128-row chunks, its Triton attention, streamed
layers) keeps every promise the CPU tests check with the CPU's functions: chunking changes no bit,
a conversation's reused cache replies as a fresh prefill, and drafting replies as plain decoding.
Skipped without CUDA (the CPU suite covers the same promises); run on the device machine."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine import EngineConfig, SamplingConfig
from engine.build import engine_from_model
from engine.loading import LoadedModel
from engine.row_attention_kernel import row_invariant_attention
from tests.random_models import config_for

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the GPU's target runs there")

STREAMED = dict(keep_first_n_layers_on_gpu=1, offload_slots=2)


class NoText:
    eos_token_id = None
    chat_template = None

    def decode(self, ids, skip_special_tokens=True) -> str:
        return ""


def engine(method: str = "vanilla", **overrides):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config_for("llama", num_hidden_layers=4), dtype=torch.bfloat16)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.15)
    config = EngineConfig(method=method, device="cuda", max_depth=6, topk_len=3, **overrides)
    return engine_from_model(config, LoadedModel(model.eval(), NoText(), "random", None))


def ids(length: int, seed: int) -> list[int]:
    return torch.randint(3, 512, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_chunking_changes_no_bit_on_the_gpu():
    plain = engine()
    ops = plain.target.ops
    assert ops.rows == 128 and ops.attend is row_invariant_attention
    transformer, stack = plain.target.transformer, plain.target.stack
    prompt = torch.tensor(ids(300, seed=1), device="cuda")
    results = []
    for chunk in (512, 5, 128):
        cache = transformer.new_cache(512)
        results.append((transformer.prefill(stack, cache, prompt, chunk, ops=ops), cache.kv.clone()))
    assert all(torch.equal(logits, results[0][0]) and torch.equal(kv, results[0][1]) for logits, kv in results)


@pytest.mark.parametrize("method", ["vanilla", "subspec_sd"])
def test_a_conversation_replies_as_without_reuse_on_the_gpu(method):
    reusing, fresh = engine(method, **STREAMED), engine(method, **STREAMED)
    prompt = ids(150, seed=2)
    for turn in range(3):
        fresh.forget()
        expected = fresh.generate(prompt, SamplingConfig(max_new_tokens=24))
        got = reusing.generate(prompt, SamplingConfig(max_new_tokens=24))
        assert got.token_ids == expected.token_ids, turn
        assert (got.stats.reused_tokens > 0) == (turn > 0)
        prompt = prompt + got.token_ids + ids(20, seed=10 + turn)


def test_drafting_replies_as_plain_decoding_on_the_gpu():
    plain, drafting = engine(), engine("subspec_sd", **STREAMED)
    accepted = 0
    for k in range(8):
        prompt = ids(20 + 37 * k, seed=100 + k)
        expected = plain.generate(prompt, SamplingConfig(max_new_tokens=32)).token_ids
        got = drafting.generate(prompt, SamplingConfig(max_new_tokens=32))
        assert got.token_ids == expected, k
        accepted += sum(it.accepted_depth for it in got.stats.iterations)
    assert accepted > 0
