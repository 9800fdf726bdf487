"""Sampling is lossless: SubSpec's first generated tokens follow the target's exact distribution.

On a tiny-vocabulary random model the exact probability of every two-token continuation is
computed from the target's logits; vanilla, subspec_sd and eagle_sd samples must all fit it
(chi-square goodness of fit at a fixed level), and a deliberately wrong acceptance rule (take the
draft's first child whenever there is one) must be rejected by the very same test.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

import engine.generate as generate_module
from engine import EngineConfig, SamplingConfig, load_engine
from engine.verify import Walk, processed_probs
from tests.eagle_heads import save_random_head
from tests.random_models import save_random_model

VOCAB = 8
SAMPLES = 1500
PROMPT = [3, 5, 7, 4]
EOS = 2  # the bundled tokenizer's end of turn, inside the tiny vocabulary: sampled EOS is covered
# Three new tokens: the first comes from the prefill, so the second is the first one a tree can
# propose (a depth cap of tokens left - 1 keeps trees away from the last one).
SAMPLING = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=3)
ALPHA_Z = 3.09  # one-sided normal quantile for a significance level of 0.001


def chi2_critical(df: int) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile at 1 - 0.001."""
    return df * (1 - 2 / (9 * df) + ALPHA_Z * math.sqrt(2 / (9 * df))) ** 3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, bundled_folder):
    return save_random_model(tmp_path_factory.mktemp("tiny"), "llama", bundled_folder, vocab_size=VOCAB, seed=11)


def exact_pair_probs(folder) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    sampling = SamplingConfig(**SAMPLING)
    with torch.no_grad():
        first = processed_probs(model(torch.tensor([PROMPT])).logits[0, -1], sampling)
        table = torch.zeros(VOCAB, VOCAB)
        for t in range(VOCAB):
            if t == EOS:  # generation ends after EOS: the pair is (EOS, nothing), kept in column 0
                table[t, 0] = first[t]
                continue
            second = processed_probs(model(torch.tensor([PROMPT + [t]])).logits[0, -1], sampling)
            table[t] = first[t] * second
    return table.flatten()


def fits(engine, expected: torch.Tensor) -> bool:
    counts = torch.zeros(VOCAB * VOCAB)
    for seed in range(SAMPLES):
        ids = engine.generate(PROMPT, SamplingConfig(seed=seed, **SAMPLING)).token_ids
        counts[ids[0] * VOCAB + (ids[1] if len(ids) > 1 else 0)] += 1
    expected_counts = expected * SAMPLES
    big = expected_counts >= 5  # pool the rare cells so the chi-square approximation holds
    observed = torch.cat((counts[big], counts[~big].sum()[None]))
    wanted = torch.cat((expected_counts[big], expected_counts[~big].sum()[None]))
    keep = wanted > 0
    stat = float(((observed[keep] - wanted[keep]) ** 2 / wanted[keep]).sum())
    return stat < chi2_critical(int(keep.sum()) - 1)


@pytest.mark.slow
def test_sampled_tokens_follow_the_target_distribution(tiny, monkeypatch):
    expected = exact_pair_probs(tiny)
    assert fits(load_engine(EngineConfig(llm_path=str(tiny))), expected)
    # Best-first with a floor that leaves nodes out (subspec) and without one (eagle).
    subspec = load_engine(EngineConfig(method="subspec_sd", llm_path=str(tiny), substitute_bits=4,
                                       max_depth=3, topk_len=2, min_draft_prob=0.05))
    assert fits(subspec, expected)
    head = save_random_head(tiny.parent / "eagle-head", tiny, std=0.3)
    eagle = load_engine(EngineConfig(method="eagle_sd", llm_path=str(tiny), draft_model_path=str(head),
                                     max_depth=3, topk_len=2, min_draft_prob=0.0))
    assert fits(eagle, expected)

    # Control: a rule that trusts the draft must be caught by the same test.
    def trust_the_draft(tokens, parents, chosen):
        node, path = 0, []
        while (child := next((i for i in range(1, len(parents)) if parents[i] == node), None)) is not None:
            path.append(child)
            node = child
        return Walk(path=path, bonus=chosen[node])

    monkeypatch.setattr(generate_module, "walk", trust_the_draft)
    assert not fits(subspec, expected)


def test_a_verification_s_logits_are_gone_before_the_next_one(bundled_engine):
    """The [nodes, vocab] logits of one verification are freed before the next forward allocates
    its own: two iterations' logits never share the GPU (the plan's workspace counts one)."""
    import gc
    import weakref

    engine = bundled_engine("subspec_sd")
    transformer = engine.target.transformer
    forward, held = transformer.forward, []

    def tracked(*args, **kwargs):
        gc.collect()  # reference cycles aside: only a live reference keeps a tensor
        assert all(ref() is None for ref in held), "an earlier verification's logits are still alive"
        logits = forward(*args, **kwargs)
        if logits.shape[0] > 1:  # a tree's logits (a prefill keeps its last row, 1 x vocab)
            held.append(weakref.ref(logits))
        return logits

    transformer.forward = tracked
    try:
        gen = engine.generate([1, 2, 3], SamplingConfig(max_new_tokens=12))
    finally:
        del transformer.forward
    assert len(held) >= 2 and len(gen.stats.iterations) >= 2
