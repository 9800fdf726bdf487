"""eagle_sd: an EAGLE head drafting from the target's features (engine.eagle, EagleDrafter). Greedy
output equals plain decoding with random heads on random Llama/Qwen2/Qwen3 models and the bundled
model; a head that knows a (one-layer) target drafts its tokens; the head's cache after a
conversation holds what a fresh head computes from the target's true features; heads that do not
fit are refused with one line. Sampling: tests/test_sampling.py."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine import EngineConfig, EngineError, SamplingConfig, load_engine
from engine.drafters import EagleDrafter
from tests.eagle_heads import exact_head_target, save_exact_head, save_random_head
from tests.random_models import save_random_model
from tests.test_lossless import greedy, mt_bench_prompts, random_prompts

TREE = dict(max_depth=6, topk_len=3)


@pytest.fixture(scope="module")
def head(random_folder, tmp_path_factory):
    return save_random_head(tmp_path_factory.mktemp("head"), random_folder)


@pytest.mark.parametrize("tree", [dict(tree_policy="reference", **TREE), dict(tree_policy="best_first", node_budget=12, **TREE)],
                         ids=["reference", "best_first"])
def test_random_heads_draft_losslessly(random_folder, head, tree):
    vanilla = load_engine(EngineConfig(llm_path=str(random_folder)))
    eagle = load_engine(EngineConfig(method="eagle_sd", llm_path=str(random_folder), draft_model_path=str(head), **tree))
    forwards = 0
    for prompt in random_prompts(10, 512, seed=31):
        gen = eagle.generate(prompt, SamplingConfig(max_new_tokens=24))
        assert gen.token_ids == greedy(vanilla, prompt, 24), prompt
        forwards += sum(it.draft_forwards for it in gen.stats.iterations)
    assert forwards > 0


def test_offloaded_eagle_equals_plain_decoding(random_folder, head):
    vanilla = load_engine(EngineConfig(llm_path=str(random_folder)))
    eagle = load_engine(EngineConfig(method="eagle_sd", llm_path=str(random_folder), draft_model_path=str(head),
                                     emulate_offload=True, keep_first_n_layers_on_gpu=1, **TREE))
    for prompt in random_prompts(4, 512, seed=32):
        assert greedy(eagle, prompt, 20) == greedy(vanilla, prompt, 20)


def test_a_head_that_knows_the_target_drafts_its_tokens(tmp_path, bundled_folder):
    target = exact_head_target(save_random_model(tmp_path / "one-layer", "llama", bundled_folder, num_hidden_layers=1))
    head = save_exact_head(tmp_path / "head", target)
    vanilla = load_engine(EngineConfig(llm_path=str(target)))
    eagle = load_engine(EngineConfig(method="eagle_sd", llm_path=str(target), draft_model_path=str(head),
                                     tree_policy="reference", max_depth=5, topk_len=2))
    iterations = accepted = 0
    for prompt in random_prompts(6, 512, seed=33):
        gen = eagle.generate(prompt, SamplingConfig(max_new_tokens=30))
        assert gen.token_ids == greedy(vanilla, prompt, 30)
        iterations += len(gen.stats.iterations)
        accepted += sum(it.accepted_depth for it in gen.stats.iterations)
    # Every path of 5 drafted tokens is the target's (the last tree of a reply is cut by the length).
    assert accepted / iterations > 4


def test_the_heads_cache_holds_what_a_fresh_head_computes(random_folder, head):
    eagle = load_engine(EngineConfig(method="eagle_sd", llm_path=str(random_folder), draft_model_path=str(head), **TREE))
    drafter = eagle.drafter
    assert isinstance(drafter, EagleDrafter)
    first = random_prompts(1, 512, seed=34)[0]
    held = first + eagle.generate(first, SamplingConfig(max_new_tokens=16)).token_ids
    # A second turn extending the first: the reused cache's head entries must still be right.
    second = held + [5, 6, 7]
    gen = eagle.generate(second, SamplingConfig(max_new_tokens=16))
    assert gen.stats.reused_tokens > 0
    drafter._enter_pending()  # the last accepted path's entries, as the next draft would
    tokens = torch.tensor(second + gen.token_ids[:-1])  # what the target's cache holds
    length = tokens.numel()
    assert eagle.target.cache.length == length and drafter.cache.length == length - 1
    target = eagle.target.transformer
    fresh_target = target.new_cache(length)
    positions = torch.arange(length)
    _, features = target.forward(eagle.target.stack, fresh_target, tokens, positions, positions,
                                 positions[None] <= positions[:, None], length, features=True)
    torch.testing.assert_close(drafter.features[:length], features, rtol=1e-4, atol=1e-4)
    fresh = drafter.head.new_cache(length)
    entries = positions[: length - 1]
    drafter.head.forward(fresh, tokens[1:], features[:-1], entries, entries, entries[None] <= entries[:, None], length - 1)
    torch.testing.assert_close(drafter.cache.kv[:, :, :, : length - 1], fresh.kv[:, :, :, : length - 1], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_bundled_eagle_equals_vanilla(bundled_engine, bundled_folder, tmp_path):
    head = save_random_head(tmp_path / "head", bundled_folder, std=0.02)
    vanilla = bundled_engine("vanilla")
    eagle = load_engine(EngineConfig(method="eagle_sd", draft_model_path=str(head), **TREE))
    for question in mt_bench_prompts(5):
        prompt = vanilla.chat_ids([{"role": "user", "content": question}])
        assert greedy(eagle, prompt, 24) == greedy(vanilla, prompt, 24)


def test_heads_that_do_not_fit_are_refused(random_folder, head, tmp_path):
    def load(path) -> None:
        load_engine(EngineConfig(method="eagle_sd", llm_path=str(random_folder), draft_model_path=str(path), **TREE))

    with pytest.raises(EngineError, match="needs an EAGLE head"):
        load_engine(EngineConfig(method="eagle_sd", llm_path=str(random_folder)))
    with pytest.raises(EngineError, match="no config.json"):
        load(tmp_path / "nothing")
    config = json.loads((head / "config.json").read_text())
    wide = save_random_head(tmp_path / "wide", random_folder)
    (wide / "config.json").write_text(json.dumps({**config, "vocab_size": config["vocab_size"] + 1}))
    with pytest.raises(EngineError, match="vocabulary of"):
        load(wide)

    state = load_file(head / "model.safetensors")
    narrow = tmp_path / "narrow"
    narrow.mkdir()
    (narrow / "config.json").write_text(json.dumps(config))
    save_file({**state, "fc.weight": state["fc.weight"][:, :-2].contiguous()}, narrow / "model.safetensors")
    with pytest.raises(EngineError, match="does not fit this model: its fc is"):
        load(narrow)
    lacking = tmp_path / "lacking"
    lacking.mkdir()
    (lacking / "config.json").write_text(json.dumps(config))
    save_file({k: v for k, v in state.items() if "down_proj" not in k}, lacking / "model.safetensors")
    with pytest.raises(EngineError, match="lacks layers.0.mlp.down_proj.weight"):
        load(lacking)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text(json.dumps(config))
    (corrupt / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(EngineError, match="cannot read the EAGLE head's weights"):
        load(corrupt)
