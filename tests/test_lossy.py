"""Lossy verification (opt-in): labelled lossy in every stats object, identical to exact greedy
decoding when its gate admits nothing, and accepting more per verification when the gate is open.

A tiny random Llama with a 4-bit substitute keeps it fast and makes the draft disagree with the
target often enough for the gate to matter."""

from __future__ import annotations

import pytest
import torch

from engine import EngineConfig, SamplingConfig, load_engine
from tests.random_models import save_random_model

TREE = {"method": "subspec_sd", "substitute_bits": 4, "max_depth": 3, "topk_len": 2}
NEW_TOKENS = 12
# Normalised entropy lies in [0, 1] and the gate is `entropy < threshold`: above 1 every node is
# lenient; 0 admits none. The prob gate is `p > threshold`: 1 admits none.
OPEN_GATE = {"threshold_method": "entropy", "threshold": 1.5}


@pytest.fixture(scope="module")
def generations(tmp_path_factory, bundled_folder):
    """generations(**overrides) -> greedy generations of a few fixed prompts by an engine on one
    random model with these config overrides, computed once per setting."""
    folder = save_random_model(tmp_path_factory.mktemp("lossy"), "llama", bundled_folder)
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(3, 512, (length,), generator=g).tolist() for length in (7, 19, 33)]
    done = {}

    def get(**overrides):
        key = tuple(sorted(overrides.items()))
        if key not in done:
            engine = load_engine(EngineConfig(llm_path=str(folder), **TREE, **overrides))
            done[key] = [engine.generate(prompt, SamplingConfig(max_new_tokens=NEW_TOKENS)) for prompt in prompts]
        return done[key]

    return get


def mean_tau(generations) -> float:
    iterations = [it for gen in generations for it in gen.stats.iterations]
    return sum(it.emitted for it in iterations) / len(iterations)


def test_every_lossy_generation_is_labelled_lossy(generations):
    for gen in generations(verify_method="lossy", window_size=0, **OPEN_GATE):
        assert gen.stats.lossy is True and gen.stats.as_dict()["lossy"] is True
    for gen in generations():
        assert gen.stats.lossy is False and gen.stats.as_dict()["lossy"] is False


@pytest.mark.parametrize(
    "closed",
    [
        {"threshold_method": "entropy", "threshold": 0.0},  # no gate: nothing is lenient
        {"threshold_method": "prob", "threshold": 1.0},
        {**OPEN_GATE, "window_size": TREE["max_depth"]},  # no node has that many matches below it
    ],
    ids=["entropy-0", "prob-1", "window-deeper-than-the-tree"],
)
def test_lossy_mode_that_admits_nothing_equals_exact_greedy(generations, closed):
    exact = generations()
    lossy = generations(verify_method="lossy", **{"window_size": 0, **closed})
    for want, got in zip(exact, lossy):
        assert got.token_ids == want.token_ids
        assert [it.accepted_depth for it in got.stats.iterations] == [it.accepted_depth for it in want.stats.iterations]
        assert got.stats.lossy and not want.stats.lossy
    assert sum(it.accepted_depth for gen in exact for it in gen.stats.iterations) > 0  # drafts were accepted


def test_an_open_gate_accepts_more_per_verification(generations):
    exact = generations()
    lossy = generations(verify_method="lossy", window_size=0, **OPEN_GATE)
    for want, got in zip(exact, lossy):
        assert len(got.token_ids) == NEW_TOKENS
        # Every drafted child is lenient and needs no matches after it: each verification walks
        # down to a leaf, so at least one draft token is taken whenever there is a tree.
        assert all(it.accepted_depth >= 1 for it in got.stats.iterations if it.tree_nodes > 1)
        # The first tree is the same in both modes, and a lossy walk extends the exact one.
        assert got.stats.iterations[0].accepted_depth >= want.stats.iterations[0].accepted_depth
    assert mean_tau(lossy) > mean_tau(exact)
