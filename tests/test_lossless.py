"""Lossless is the product's promise: every method's greedy tokens equal plain decoding.

Plain decoding is checked against transformers' own `generate`; then every method and offload
setting is checked against plain decoding, on the real bundled model and on random models of each
architecture, including trees deeper than what is left to generate, EOS inside a tree and a prompt
near the context limit.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine import EngineConfig, SamplingConfig, load_engine
from tests.random_models import save_random_model

DATA = Path(__file__).resolve().parents[1] / "subspec_tui" / "data" / "mt_bench_questions.jsonl"


def mt_bench_prompts(n: int) -> list[str]:
    lines = DATA.read_text().splitlines()
    return [json.loads(line)["turns"][0] for line in lines[:n]]


def random_prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (int(torch.randint(3, 40, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def hf_greedy(model, prompt: list[int], new_tokens: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False,
                         attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()


def greedy(engine, prompt: list[int], new_tokens: int) -> list[int]:
    return engine.generate(prompt, SamplingConfig(max_new_tokens=new_tokens)).token_ids


def assert_drafts_lossless(engine, vanilla, prompts: list[list[int]], new_tokens: int) -> None:
    """`engine`'s greedy tokens equal `vanilla`'s on every prompt, and some drafts were accepted
    (a drafter that proposed nothing useful would pass the equality trivially)."""
    accepted = 0
    for prompt in prompts:
        gen = engine.generate(prompt, SamplingConfig(max_new_tokens=new_tokens))
        assert gen.token_ids == greedy(vanilla, prompt, new_tokens), prompt
        accepted += sum(it.accepted_depth for it in gen.stats.iterations)
    assert accepted > 0


# --- plain decoding (and the offloader) against transformers ------------------------------------

OFFLOAD_SETTINGS = [
    {},  # every layer resident
    {"emulate_offload": True, "keep_first_n_layers_on_gpu": 0, "offload_slots": 1},
    {"emulate_offload": True, "keep_first_n_layers_on_gpu": 1, "offload_slots": 2},
    {"emulate_offload": True, "keep_first_n_layers_on_gpu": 2, "offload_slots": 3},  # slots > streamed
]


@pytest.mark.parametrize("offload", OFFLOAD_SETTINGS, ids=["resident", "n0s1", "n1s2", "n2s3"])
def test_random_models_vanilla_equals_transformers_generate(random_folder, offload):
    engine = load_engine(EngineConfig(llm_path=str(random_folder), **offload))
    reference = AutoModelForCausalLM.from_pretrained(random_folder, dtype=torch.float32).eval()
    for prompt in random_prompts(10, 512):
        assert greedy(engine, prompt, 16) == hf_greedy(reference, prompt, 16)


def test_emulated_offload_streams_every_offloaded_layer(random_folder):
    engine = load_engine(EngineConfig(llm_path=str(random_folder), emulate_offload=True,
                                      keep_first_n_layers_on_gpu=1, offload_slots=1))
    info = engine.describe()
    assert info["layers_on_gpu"] == 1 and info["offloaded_bytes"] > 0
    gen = engine.generate([5, 6, 7], SamplingConfig(max_new_tokens=4))
    assert gen.stats.as_dict()["transfer_ms"] > 0  # copies really ran through the slot buffers


def test_cudnn_attention_only_in_fixed_shape_draft_steps(random_folder, monkeypatch):
    """cuDNN attention plans each new key length (a 20-50 ms host stall per decoding step on an
    H200): forwards of growing lengths (prefill, verification, eager catch-up) run without it; the
    fixed-shape draft steps that CUDA graphs replay (padded to a 256-slot bucket here) may use it."""
    import engine.pointwise

    seen: list[tuple[int, bool]] = []  # (attended key length, cuDNN allowed)
    sdpa = engine.pointwise.F.scaled_dot_product_attention

    def recording(query, key, *args, **kwargs):
        seen.append((key.shape[-2], torch.backends.cuda.cudnn_sdp_enabled()))
        return sdpa(query, key, *args, **kwargs)

    monkeypatch.setattr(engine.pointwise.F, "scaled_dot_product_attention", recording)
    subspec = load_engine(EngineConfig(llm_path=str(random_folder), method="subspec_sd", max_depth=3,
                                       compile_mode="cuda-graphs"))  # fixed-shape steps, eager on a CPU
    subspec.generate([5, 6, 7], SamplingConfig(max_new_tokens=6))
    assert {length for length, cudnn in seen if cudnn} == {256}
    assert 256 not in {length for length, cudnn in seen if not cudnn} and any(not cudnn for _, cudnn in seen)
    assert torch.backends.cuda.cudnn_sdp_enabled()  # the process-wide setting is left as it was


@pytest.mark.slow
def test_bundled_vanilla_equals_transformers_generate(bundled_engine, bundled_folder):
    reference = AutoModelForCausalLM.from_pretrained(bundled_folder, dtype=torch.float32).eval()
    offloaded = bundled_engine("vanilla", emulate_offload=True, keep_first_n_layers_on_gpu=20)
    resident = bundled_engine("vanilla")
    for question in mt_bench_prompts(10):
        prompt = resident.chat_ids([{"role": "user", "content": question}])
        expected = hf_greedy(reference, prompt, 24)
        assert greedy(resident, prompt, 24) == expected
        assert greedy(offloaded, prompt, 24) == expected


@pytest.mark.slow
def test_bundled_model_knows_the_capital_of_france(bundled_engine):
    engine = bundled_engine("vanilla")
    ids = engine.chat_ids([{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in engine.generate(ids, SamplingConfig(max_new_tokens=32)).text


# --- speculative methods against plain decoding --------------------------------------------------

SMALL_TREES = [
    {"tree_policy": "reference", "max_depth": 6, "topk_len": 3},
    # Best-first with the engine's default floor, with a high one (trees end early, forwards take
    # any width) and with none (fixed widths, placeholders).
    {"tree_policy": "best_first", "max_depth": 8, "topk_len": 3, "node_budget": 16},
    {"tree_policy": "best_first", "max_depth": 12, "topk_len": 3, "node_budget": 16, "min_draft_prob": 0.05},
    {"tree_policy": "best_first", "max_depth": 8, "topk_len": 3, "node_budget": 16, "min_draft_prob": 0.0},
]
TREE_IDS = ["reference", "best_first", "best_first-floor", "best_first-no-floor"]


@pytest.mark.slow
def test_bundled_subspec_equals_vanilla_on_20_mt_bench_prompts(bundled_engine):
    vanilla = bundled_engine("vanilla")
    subspec = bundled_engine("subspec_sd", max_depth=8, topk_len=3)
    taus = []
    for question in mt_bench_prompts(20):  # 32 tokens: ~8 verifications each, the suite stays < 10 min
        prompt = vanilla.chat_ids([{"role": "user", "content": question}])
        gen = subspec.generate(prompt, SamplingConfig(max_new_tokens=32))
        assert gen.token_ids == greedy(vanilla, prompt, 32), question
        taus.append(gen.stats.tau)
    assert sum(taus) / len(taus) > 1.5  # the substitute really drafted accepted tokens


@pytest.mark.slow
def test_bundled_classic_equals_vanilla(bundled_engine, tmp_path, bundled_folder):
    vanilla = bundled_engine("vanilla")
    # A random draft with the bundled tokenizer: same vocabulary, mostly wrong guesses.
    draft = save_random_model(tmp_path / "draft", "llama", bundled_folder, vocab_size=49152)
    classic = load_engine(EngineConfig(method="classic_sd", draft_model_path=str(draft), max_depth=4, topk_len=2))
    for question in mt_bench_prompts(5):
        prompt = vanilla.chat_ids([{"role": "user", "content": question}])
        assert classic.generate(prompt, SamplingConfig(max_new_tokens=24)).token_ids == greedy(vanilla, prompt, 24)


@pytest.mark.parametrize("tree", SMALL_TREES, ids=TREE_IDS)
@pytest.mark.parametrize("bits", [4, 8])
def test_random_subspec_equals_vanilla(random_folder, tree, bits):
    vanilla = load_engine(EngineConfig(llm_path=str(random_folder)))
    subspec = load_engine(EngineConfig(method="subspec_sd", llm_path=str(random_folder), substitute_bits=bits, **tree))
    assert_drafts_lossless(subspec, vanilla, random_prompts(12, 512, seed=1), 24)


@pytest.mark.parametrize("tree", SMALL_TREES, ids=TREE_IDS)
def test_random_classic_equals_vanilla(random_folder, tmp_path, bundled_folder, tree):
    arch = json.loads((random_folder / "config.json").read_text())["model_type"]
    draft = save_random_model(tmp_path / "draft", arch, bundled_folder, seed=7, num_hidden_layers=1)
    vanilla = load_engine(EngineConfig(llm_path=str(random_folder)))
    classic = load_engine(EngineConfig(method="classic_sd", llm_path=str(random_folder),
                                       draft_model_path=str(draft), **tree))
    for prompt in random_prompts(10, 512, seed=2):
        assert classic.generate(prompt, SamplingConfig(max_new_tokens=20)).token_ids == greedy(vanilla, prompt, 20)


def test_classic_with_the_target_as_its_own_draft_accepts_whole_chains(random_folder):
    # A chain (k = 1) drafted by the target itself is the greedy continuation: every node is
    # accepted, which also checks that the draft's own cache stays in step with the target's.
    classic = load_engine(EngineConfig(method="classic_sd", llm_path=str(random_folder),
                                       draft_model_path=str(random_folder), max_depth=5, topk_len=1))
    vanilla = load_engine(EngineConfig(llm_path=str(random_folder)))
    for prompt in random_prompts(5, 512, seed=3):
        gen = classic.generate(prompt, SamplingConfig(max_new_tokens=30))
        assert gen.token_ids == greedy(vanilla, prompt, 30)
        for it in gen.stats.iterations[:-1]:
            assert it.accepted_depth == it.tree_nodes - 1


@pytest.mark.parametrize("tree", SMALL_TREES, ids=TREE_IDS)
def test_fixed_shape_draft_steps_equal_vanilla(random_folder, tree):
    # compile_mode cuda-graphs on a CPU runs the steps a GPU captures: static inputs, attention
    # padded to a bucket and masked. Padding must change nothing; a tiny context caps the bucket.
    for max_length in (2048, 60):
        vanilla = load_engine(EngineConfig(llm_path=str(random_folder), max_length=max_length))
        subspec = load_engine(EngineConfig(method="subspec_sd", llm_path=str(random_folder), substitute_bits=8,
                                           compile_mode="cuda-graphs", max_length=max_length, **tree))
        assert subspec.describe()["draft_graphs"] == "fixed-shape, eager"
        accepted = 0
        for prompt in random_prompts(6, 512, seed=8):
            gen = subspec.generate(prompt, SamplingConfig(max_new_tokens=20))
            assert gen.token_ids == greedy(vanilla, prompt, 20)
            accepted += sum(it.accepted_depth for it in gen.stats.iterations)
        assert accepted > 0


def test_best_first_with_fewer_tokens_than_its_batch(tmp_path, bundled_folder):
    # A 5-token vocabulary cannot fill a batch of 6 children: best_first adds unreachable
    # placeholder nodes instead of asking the host how many real candidates there are.
    folder = save_random_model(tmp_path / "tiny", "llama", bundled_folder, vocab_size=5, seed=3)
    vanilla = load_engine(EngineConfig(llm_path=str(folder)))
    subspec = load_engine(EngineConfig(method="subspec_sd", llm_path=str(folder), substitute_bits=8,
                                       tree_policy="best_first", max_depth=4, topk_len=6, node_budget=40))
    for prompt in random_prompts(6, 5, seed=9):
        prompt = [t % 5 for t in prompt]
        assert subspec.generate(prompt, SamplingConfig(max_new_tokens=16)).token_ids == greedy(vanilla, prompt, 16)


def test_best_first_with_a_wide_draft_batch_equals_vanilla(random_folder):
    # 8 nodes per draft forward (3 children per node): the same 24-node budget in fewer forwards.
    vanilla = load_engine(EngineConfig(llm_path=str(random_folder)))
    forwards = {}
    for batch in (3, 8):
        subspec = load_engine(EngineConfig(method="subspec_sd", llm_path=str(random_folder), substitute_bits=8,
                                           tree_policy="best_first", max_depth=10, topk_len=3, node_budget=24,
                                           draft_batch=batch))
        step, calls = subspec.drafter.draft_step, []
        subspec.drafter.draft_step = lambda tree, nodes, step=step, calls=calls: calls.append(nodes.numel()) or step(tree, nodes)
        reported = 0
        for prompt in random_prompts(6, 512, seed=13):
            gen = subspec.generate(prompt, SamplingConfig(max_new_tokens=16))
            assert gen.token_ids == greedy(vanilla, prompt, 16)
            reported += sum(it.draft_forwards for it in gen.stats.iterations)
        assert reported == len(calls)  # the stats count every draft forward
        iterations = 0 if not calls else sum(1 for width in calls if width == 1)  # one root step per tree
        forwards[batch] = len(calls) / iterations
        assert max(calls) == batch
    assert forwards[8] < forwards[3]


@pytest.mark.parametrize("compile_mode", [None, "cuda-graphs"])
def test_best_first_with_a_floor_equals_vanilla_at_any_forward_width(random_folder, compile_mode):
    # The floor leaves out unlikely picks: forwards of every width up to the batch (padded to a
    # power of two in fixed-shape steps), trees that end before the budget, deeper than
    # budget / batch forwards.
    vanilla = load_engine(EngineConfig(llm_path=str(random_folder)))
    subspec = load_engine(EngineConfig(method="subspec_sd", llm_path=str(random_folder), substitute_bits=8,
                                       tree_policy="best_first", max_depth=16, topk_len=3, node_budget=24,
                                       draft_batch=8, min_draft_prob=0.02, compile_mode=compile_mode))
    step, widths = subspec.drafter.draft_step, []
    subspec.drafter.draft_step = lambda tree, nodes: widths.append(nodes.numel()) or step(tree, nodes)
    nodes, forwards = [], []
    for prompt in random_prompts(6, 512, seed=14):
        gen = subspec.generate(prompt, SamplingConfig(max_new_tokens=16))
        assert gen.token_ids == greedy(vanilla, prompt, 16)
        nodes += [it.tree_nodes for it in gen.stats.iterations]
        forwards += [it.draft_forwards for it in gen.stats.iterations]
    assert set(widths) - {1, 8}, "the floor never changed a forward's width"
    assert min(nodes) < 25, "every tree filled its budget: the floor never ended one"
    assert max(forwards) > 24 // 8 + 1, "no tree drafted more forwards than a fixed batch takes"


def test_trees_deeper_than_the_tokens_left(random_folder):
    vanilla = load_engine(EngineConfig(llm_path=str(random_folder)))
    subspec = load_engine(EngineConfig(method="subspec_sd", llm_path=str(random_folder), substitute_bits=8,
                                       max_depth=40, topk_len=2))
    for new_tokens in (1, 2, 3, 7):
        for prompt in random_prompts(4, 512, seed=4):
            gen = subspec.generate(prompt, SamplingConfig(max_new_tokens=new_tokens))
            assert gen.token_ids == greedy(vanilla, prompt, new_tokens)
            assert len(gen.token_ids) == new_tokens and gen.finish_reason == "length"


def test_eos_inside_a_tree_ends_generation_there(random_folder, tmp_path, bundled_folder):
    arch = json.loads((random_folder / "config.json").read_text())["model_type"]
    plain = load_engine(EngineConfig(llm_path=str(random_folder)))
    prompt = random_prompts(1, 512, seed=5)[0]
    free_run = greedy(plain, prompt, 40)
    eos = next(t for t in free_run[4:] if t not in free_run[:4])  # first appears mid-output
    folder = save_random_model(tmp_path / "eos", arch, bundled_folder, eos_token_id=eos)
    vanilla = load_engine(EngineConfig(llm_path=str(folder)))
    subspec = load_engine(EngineConfig(method="subspec_sd", llm_path=str(folder), substitute_bits=8,
                                       max_depth=12, topk_len=3))
    expected = vanilla.generate(prompt, SamplingConfig(max_new_tokens=40))
    gen = subspec.generate(prompt, SamplingConfig(max_new_tokens=40))
    assert expected.finish_reason == gen.finish_reason == "eos"
    assert gen.token_ids == expected.token_ids and gen.token_ids[-1] == eos
    assert free_run[: len(gen.token_ids)] == gen.token_ids
    # tau counts what was emitted: nothing past EOS (the first token comes from the prefill)
    assert sum(it.emitted for it in gen.stats.iterations) == len(gen.token_ids) - 1


def test_tau_counts_no_token_past_the_length_limit(random_folder):
    # 8-bit drafts agree with the target almost always: a deep tree runs far past 5 tokens.
    subspec = load_engine(EngineConfig(method="subspec_sd", llm_path=str(random_folder), substitute_bits=8,
                                       max_depth=12, topk_len=2))
    gen = subspec.generate(random_prompts(1, 512, seed=6)[0], SamplingConfig(max_new_tokens=5))
    assert gen.finish_reason == "length" and len(gen.token_ids) == 5
    assert sum(it.emitted for it in gen.stats.iterations) == 4
    assert gen.stats.tau == 4 / len(gen.stats.iterations)


def test_a_stop_request_is_honoured_between_draft_forwards(random_folder):
    """A deep tree takes seconds to draft on a CPU: stop must not wait for the whole tree."""
    subspec = load_engine(EngineConfig(method="subspec_sd", llm_path=str(random_folder), max_depth=12, topk_len=2,
                                       tree_policy="reference"))
    cancel = threading.Event()
    forwards = []
    step = subspec.drafter.draft_step

    def counting_step(tree, nodes):
        forwards.append(len(nodes))
        if len(forwards) == 3:
            cancel.set()  # the user presses esc during the third draft forward
        return step(tree, nodes)

    subspec.drafter.draft_step = counting_step
    gen = subspec.generate(random_prompts(1, 512, seed=7)[0], SamplingConfig(max_new_tokens=40), cancel=cancel)
    assert gen.finish_reason == "cancelled"
    assert len(forwards) == 3 and not gen.stats.iterations  # the first tree was abandoned, nothing emitted
    assert len(gen.token_ids) == 1  # the prefill's token


def test_prompt_near_the_context_limit_stops_cleanly(random_folder):
    vanilla = load_engine(EngineConfig(llm_path=str(random_folder), max_length=48))
    subspec = load_engine(EngineConfig(method="subspec_sd", llm_path=str(random_folder), max_length=48,
                                       substitute_bits=8, max_depth=10, topk_len=3))
    prompt = random_prompts(1, 512, seed=6)[0]
    prompt = (prompt * 10)[:43]  # 5 slots left
    expected = vanilla.generate(prompt, SamplingConfig(max_new_tokens=30))
    gen = subspec.generate(prompt, SamplingConfig(max_new_tokens=30))
    assert gen.token_ids == expected.token_ids
    assert gen.finish_reason == expected.finish_reason == "context"
    assert len(prompt) + len(gen.token_ids) == 48 + 1  # the last token needs no KV slot


def test_a_warmed_up_engine_generates_what_a_fresh_one_does(random_folder):
    """Warm-up (run at load on a GPU) is a throw-away generation: nothing of it reaches the next reply."""
    config = EngineConfig(method="subspec_sd", llm_path=str(random_folder), max_depth=6, topk_len=2,
                          compile_mode="cuda-graphs")
    prompt = random_prompts(1, 512, seed=8)[0]
    fresh = load_engine(config).generate(prompt, SamplingConfig(max_new_tokens=24))
    warmed = load_engine(config)
    assert warmed.warm_up() > 0
    assert warmed.generate(prompt, SamplingConfig(max_new_tokens=24)).token_ids == fresh.token_ids
