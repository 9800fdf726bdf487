"""Greedy output and bfloat16 (README): a verification computes many rows at once and plain decoding
one, so in bfloat16 their kernels round differently and near-ties between the top two tokens flip.
The row-invariant target (EngineConfig.row_invariant) computes every row the way a one-token
forward does; with it, drafting methods give plain decoding's tokens in bfloat16 too."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine import EngineConfig, SamplingConfig, load_engine
from engine.pointwise import EAGER, attention_bias, chunked_linear, row_attention, row_mean, sdpa_attention, visible_keys
from tests.random_models import save_random_model
from tests.test_lossless import random_prompts

BF16 = torch.bfloat16


def gate_projection_rows() -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """SmolLM2's gate projection and a 289-node tree's rows, and the rows that this machine's
    kernels round differently alone than among the 288 others (a property of the CPU's kernels)."""
    torch.manual_seed(0)
    weight, x = torch.randn(1536, 576, dtype=BF16), torch.randn(289, 576, dtype=BF16)
    plain = F.linear(x, weight)
    return weight, x, [r for r in range(289) if not torch.equal(F.linear(x[r : r + 1], weight)[0], plain[r])]


def test_plain_kernels_round_a_row_differently_among_others():
    # The control of the next test: why the chunks are needed. Its premise is this CPU's kernels'.
    _, _, differing = gate_projection_rows()
    if not differing:
        pytest.skip("this machine's bfloat16 matmul rounds a row alike alone and among 288 others: nothing to control")
    assert differing


def test_a_row_on_fixed_chunks_is_the_same_alone_or_among_others():
    # Holds on every machine: whatever the kernels round, a row's chunk has the same shapes alone.
    weight, x, differing = gate_projection_rows()
    bias = torch.randn(1536, dtype=BF16)
    plain = F.linear(x, weight)
    linear = chunked_linear(32)
    together, biased = linear(x, weight), linear(x, weight, bias)
    assert together.shape == biased.shape == (289, 1536)
    for r in (*differing, 0, 31, 32, 288):  # and the first and last of a full chunk and of the padded one
        assert torch.equal(linear(x[r : r + 1], weight)[0], together[r]), r
        assert torch.equal(linear(x[r : r + 1], weight, bias)[0], biased[r]), r
    assert torch.equal(linear(x[32:64], weight), together[32:64])  # a whole chunk at once
    torch.testing.assert_close(together, plain, rtol=0.02, atol=0.1)
    torch.testing.assert_close(biased, F.linear(x, weight, bias), rtol=0.02, atol=0.1)


def test_a_whole_chunk_is_computed_as_f_linear_computes_it():
    # mm / addmm into the output are F.linear's own calls: a 32-row chunk, 32 rows of F.linear.
    weight, x, _ = gate_projection_rows()
    bias = torch.randn(1536, dtype=BF16)
    assert torch.equal(chunked_linear(32)(x[:32], weight), F.linear(x[:32], weight))
    assert torch.equal(chunked_linear(32)(x[:32], weight, bias), F.linear(x[:32], weight, bias))


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_a_row_mean_on_fixed_chunks_is_the_same_alone_or_among_others(dtype):
    # The norms' one reduction: chunked as the matmuls are, the rest of a norm is element-wise.
    torch.manual_seed(0)
    x = torch.randn(289, 3, 576, dtype=dtype)  # [tokens, heads, dim]: Qwen3's per-head norms too
    together = row_mean(x, 32)
    assert together.shape == (289, 3, 1)
    for r in (0, 31, 32, 100, 288):
        assert torch.equal(row_mean(x[r : r + 1], 32)[0], together[r]), r
    assert torch.equal(row_mean(x[:32], 32), x[:32].mean(-1, keepdim=True))  # a whole chunk: the plain mean
    torch.testing.assert_close(together, x.mean(-1, keepdim=True))


PARENTS = [-1, 0, 0, 1, 1, 2, 3]  # a 7-node tree


def tree_mask(parents: list[int], prefix: int) -> torch.Tensor:
    """[nodes, prefix + nodes]: node r sees the prefix, its ancestors and itself."""
    mask = torch.zeros(len(parents), prefix + len(parents), dtype=torch.bool)
    mask[:, :prefix] = True
    for node, parent in enumerate(parents):
        mask[node, prefix + node] = True
        if parent >= 0:
            mask[node] |= mask[parent]
    return mask


def test_row_attention_gives_a_tree_node_the_row_of_its_own_one_token_forward():
    """A 7-node tree after 20 prefix slots: node r sees the prefix, its ancestors and itself. Its row
    equals attention over exactly those keys laid out contiguously, as plain decoding has them."""
    torch.manual_seed(0)
    heads, kv_heads, dim, prefix = 4, 2, 16, 20
    parents = PARENTS
    mask = tree_mask(parents, prefix)
    q = torch.randn(len(parents), heads, dim, dtype=BF16).transpose(0, 1)
    keys, values = torch.randn(2, kv_heads, prefix + len(parents), dim, dtype=BF16).unbind(0)
    got = row_attention(q, keys, values, visible_keys(mask, BF16))
    for node in range(len(parents)):
        seen = mask[node].nonzero().squeeze(1)
        alone = row_attention(q[:, node : node + 1], keys[:, seen].contiguous(), values[:, seen].contiguous(), None)
        assert torch.equal(got[node], alone[0]), node
    torch.testing.assert_close(got, sdpa_attention(q, keys, values, attention_bias(mask, BF16)), rtol=0.02, atol=0.02)


def test_the_row_invariant_target_is_the_default_in_16_bit_dtypes(tmp_path, bundled_folder):
    folder = str(save_random_model(tmp_path / "llama", "llama", bundled_folder))
    for dtype, asked, used in (("bfloat16", None, True), ("float16", None, True), ("float32", None, False),
                               ("bfloat16", False, False), ("float32", True, True)):
        engine = load_engine(EngineConfig(llm_path=folder, dtype=dtype, row_invariant=asked))
        assert engine.describe()["row_invariant"] is used, (dtype, asked)
        assert (engine.target.ops.attention_mask is visible_keys) is used  # the CPU's: 32-row chunks, row_attention
        assert (engine.target.ops.attend is row_attention) is used


def test_a_row_invariant_forward_pads_its_rows_without_storing_or_returning_them(tmp_path, bundled_folder):
    """The forward pads 5 tokens to a 32-row chunk: the logits are the 5 rows' (as the eager
    forward's, to rounding), the cache holds only their 5 slots."""
    engine = load_engine(EngineConfig(llm_path=str(save_random_model(tmp_path / "llama", "llama", bundled_folder)),
                                      row_invariant=True))
    transformer, stack = engine.target.transformer, engine.target.stack
    assert engine.target.ops.rows == 32
    tokens, slots = torch.tensor([5, 9, 13, 200, 7]), torch.tensor([3, 4, 5, 6, 7])
    logits = []
    for ops in (engine.target.ops, EAGER):
        cache = transformer.new_cache(64)
        logits.append(transformer.forward(stack, cache, tokens, slots, slots, None, 8, ops=ops))
        written = cache.kv.abs().sum(dim=(0, 1, 2, 4)) != 0
        assert written.nonzero()[:, 0].tolist() == slots.tolist()
    assert logits[0].shape == (5, transformer.vocab_size)
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-4, atol=1e-4)


STREAMED = {"emulate_offload": True, "keep_first_n_layers_on_gpu": 1, "offload_slots": 2}


@pytest.mark.parametrize(("arch", "offload"), [("llama", {}), ("qwen3", {}), ("llama", STREAMED)],
                         ids=["llama", "qwen3", "llama-streamed"])
def test_bfloat16_greedy_drafts_equal_plain_decoding_with_the_row_invariant_target(tmp_path, bundled_folder, arch, offload):
    # Plain decoding keeps every layer resident; the drafting engine may stream them (other buffers, same shapes).
    folder = str(save_random_model(tmp_path / arch, arch, bundled_folder))
    prompts = random_prompts(8, 512, seed=3)

    def replies(row_invariant: bool) -> tuple[list[list[int]], list[list[int]], int]:
        common = dict(llm_path=folder, dtype="bfloat16", row_invariant=row_invariant)
        vanilla = load_engine(EngineConfig(**common))
        subspec = load_engine(EngineConfig(method="subspec_sd", max_depth=6, topk_len=3, **common, **offload))
        plain = [vanilla.generate(p, SamplingConfig(max_new_tokens=24)).token_ids for p in prompts]
        drafted = [subspec.generate(p, SamplingConfig(max_new_tokens=24)) for p in prompts]
        accepted = sum(it.accepted_depth for gen in drafted for it in gen.stats.iterations)
        return plain, [gen.token_ids for gen in drafted], accepted

    plain, drafted, accepted = replies(row_invariant=True)
    assert drafted == plain and accepted > 0
    # The control: without it, these prompts hit near-ties that the verification resolves otherwise;
    # whether they do is a property of this machine's kernels (test above), so it is checked only here.
    _, _, differing = gate_projection_rows()
    if differing:
        plain, drafted, _ = replies(row_invariant=False)
        assert drafted != plain
