"""Checks of the Triton kernels (int4 matmul, rotary, attention) under Triton's CPU interpreter (run by
test_int4_kernel.py in a process with TRITON_INTERPRET=1, which Triton reads when a kernel module is
imported)."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

from engine import EngineConfig, SamplingConfig, load_engine
from engine.attention_kernel import draft_attention
from engine.build import draft_pointwise
from engine.int4_kernel import MAX_ROWS, TritonInt4Linear
from engine.pointwise import EAGER, GPU_ROWS, attention_bias, row_invariant, sdpa_attention, visible_keys
from engine.rotary_kernel import store_attention_inputs
from engine.row_attention_kernel import row_invariant_attention
from engine.substitute import _quantized_rows
from tests.test_row_invariant import PARENTS, tree_mask

# (outputs N, inputs K, group, bias, rows M, tiles): K not a multiple of the 128-input block (padded),
# N not a multiple of the column tile, K split over programs (a second kernel adds the partial sums),
# 17 rows (a 32-row tile), 40 rows (two calls), one row.
SHAPES = [
    (48, 576, 64, True, 6, None),
    (32, 256, 32, False, 1, (64, 2, 4, 3)),
    (40, 384, 128, True, 17, (64, 3, 4, 3)),
    (200, 1024, 64, False, 16, (64, 8, 4, 3)),
    (64, 256, 64, True, 40, (64, 2, 4, 3)),
]


def kernel_equals_hqq() -> None:
    torch.manual_seed(0)
    for n, k, group, bias, m, tiles in SHAPES:
        hqq = HQQLinear(torch.nn.Linear(k, n, bias=bias), BaseQuantizeConfig(nbits=4, group_size=group, axis=1),
                        compute_dtype=torch.float32, device="cpu")
        q, scale, zero = _quantized_rows(hqq)
        kernel = TritonInt4Linear(q, scale, zero, group, hqq.bias, torch.float32, tiles)
        x = torch.randn(m, k)
        first, second = kernel(x), kernel(x)
        torch.testing.assert_close(first, hqq(x), rtol=1e-5, atol=1e-5)
        assert torch.equal(first, second), "a second call differs: the partial sums are not added in a fixed order"
        partials = kernel.partial_sums(x)  # what a reader adds itself: split K's sums, the bias in the first
        assert partials.shape == (kernel.split if m <= MAX_ROWS else 1, m, n)
        torch.testing.assert_close(partials.sum(0), first, rtol=1e-6, atol=1e-6)
        print(f"kernel = hqq for N {n}, K {k}, group {group}, bias {bias}, {m} rows, split {kernel.split}")


def ablated_kernel_runs_in_its_place(folder: Path) -> None:
    """benchmarks/int4_limits.py's copies of the kernel are what TritonInt4Linear launches while
    swapped in: without its activation loads, row r multiplies the constant r (every input r), so
    it gives r x the weights' row sums; the engine's kernel is back afterwards."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import int4_limits

    torch.manual_seed(0)
    hqq = HQQLinear(torch.nn.Linear(256, 48, bias=False), BaseQuantizeConfig(nbits=4, group_size=64, axis=1),
                    compute_dtype=torch.float32, device="cpu")
    linear = TritonInt4Linear(*_quantized_rows(hqq), 64, None, torch.float32, (64, 2, 4, 3))
    x = torch.randn(3, 256)
    weight_sums = hqq(torch.ones(1, 256))[0]
    with int4_limits.kernel_swapped(int4_limits.ablated_kernel(("activations",), folder)):
        torch.testing.assert_close(linear(x), torch.arange(3.0)[:, None] * weight_sums, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(linear(x), hqq(x), rtol=1e-5, atol=1e-5)
    print("int4_limits' kernel without activation loads ran in the engine kernel's place")


def rotary_kernel_equals_eager() -> None:
    """The rotary kernel from split partial sums (float32: the interpreter truncates where a GPU
    rounds to bf16) gives the eager path's q and cache from their total: bit for bit without
    per-head norms, to float32's last bits with them (their squares add in another order). Tokens
    go to scattered slots; the other slots stay untouched."""
    torch.manual_seed(0)
    tokens, heads, kv_heads, dim = 5, 4, 2, 16
    parts = torch.randn(3, 16, (heads + 2 * kv_heads) * dim)[:, :tokens].unflatten(-1, (-1, dim))  # [S, T, heads, D]
    total = parts[0] + parts[1] + parts[2]  # the kernel's order
    angles = torch.randn(tokens, dim // 2)
    cos, sin = torch.cat((angles.cos(), angles.cos()), -1), torch.cat((angles.sin(), angles.sin()), -1)
    slots = torch.tensor([7, 1, 3, 9, 10])
    norms = ((torch.randn(dim), 1e-6), (torch.randn(dim), 1e-5))
    for qk_norm in (False, True):
        caches = [torch.zeros(2, kv_heads, 12, dim) for _ in range(2)]
        args = (cos, sin, heads, *(norms if qk_norm else (None, None)))
        got = store_attention_inputs(parts, *args, caches[0], slots)
        want = EAGER.store_attention_inputs(total, *args, caches[1], slots)
        if qk_norm:
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(caches[0], caches[1], rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(got, want) and torch.equal(caches[0], caches[1])
        assert caches[0][:, :, [0, 2, 4, 5, 6, 8, 11]].eq(0).all()
        print(f"rotary kernel = eager, per-head norms {qk_norm}")


def attention_kernel_equals_torch() -> None:
    """The draft attention kernel against torch's: grouped-query heads, a tree-like mask, the cache
    in one piece and in several (merged by the second kernel), one token, a 32-row tile, no mask;
    the same output twice (the pieces merge in a fixed order). 40 tokens go to torch's kernel."""
    torch.manual_seed(0)
    for heads, kv_heads, dim, tokens, slots in ((4, 2, 16, 5, 100), (4, 2, 16, 17, 600), (6, 3, 32, 1, 256),
                                                  (4, 4, 16, 3, 257), (2, 1, 16, 40, 90)):
        cache = torch.randn(2, kv_heads, 1024, dim)
        q = torch.randn(tokens, heads, dim).transpose(0, 1)  # [H, T, D] as the rotary kernel leaves it
        mask = torch.rand(tokens, slots) < 0.6
        mask[:, 0] = True  # every token sees the first slot, as every tree node sees the prompt
        for bias in (attention_bias(mask, torch.float32), None):
            args = (q, cache[0, :, :slots], cache[1, :, :slots], bias)
            got = draft_attention(*args)
            torch.testing.assert_close(got, sdpa_attention(*args), rtol=1e-5, atol=1e-5)
            assert torch.equal(got, draft_attention(*args)), "a second call differs"
        print(f"attention kernel = torch for {heads} heads ({kv_heads} key/value), {tokens} tokens, {slots} slots")


def row_attention_kernel_is_row_invariant() -> None:
    """The row-invariant attention kernel: a tree node's row (all the tree's rows in one call, each
    program merging its row's pieces itself, keys gathered through the row's visible slots) is bit
    for bit the row of a one-token call over exactly those keys laid out contiguously, as plain
    decoding has them (its pieces spread over programs and merged by the second kernel); and both
    are torch's attention to float32's last bits. 300 prompt slots: two 256-key pieces; 530: three
    (the kernels loop to the 1024-slot cache's four pieces and skip those past a row's keys); grouped
    heads of 3 (a 16-row tile), 4 and 1."""
    torch.manual_seed(0)
    for heads, kv_heads, dim, prefix in ((6, 2, 16, 300), (4, 1, 16, 530), (2, 2, 32, 40)):
        parents = PARENTS
        mask = tree_mask(parents, prefix)
        cache = torch.randn(2, kv_heads, 1024, dim)
        q = torch.randn(len(parents), heads, dim).transpose(0, 1)
        keys, values = cache[0, :, : mask.shape[1]], cache[1, :, : mask.shape[1]]
        got = row_invariant_attention(q, keys, values, visible_keys(mask, torch.float32))
        torch.testing.assert_close(got, sdpa_attention(q, keys, values, attention_bias(mask, torch.float32)),
                                   rtol=1e-5, atol=1e-5)
        for node in range(len(parents)):
            seen = mask[node].nonzero()[:, 0]
            plain = torch.zeros_like(cache)
            plain[:, :, : len(seen)] = cache[:, :, seen]
            alone = row_invariant_attention(q[:, node : node + 1], plain[0, :, : len(seen)], plain[1, :, : len(seen)], None)
            assert torch.equal(alone[0], got[node]), (heads, prefix, node)
        print(f"row-invariant attention: {len(parents)} tree rows after {prefix} slots = their one-token rows")


SUBSPEC_SMALL_TREE = dict(method="subspec_sd", max_depth=3, topk_len=2)


def subspec_equals_vanilla(folder: str, partial_sums: bool) -> None:
    """Greedy subspec_sd with the triton kernel gives vanilla's tokens. With `partial_sums`, every
    linear splits K to one block per program and the draft runs the GPU's functions between
    matmuls: norms and gated activation that add the partial sums themselves (compiled, here
    without a compiler), the rotary and attention kernels."""
    vanilla = load_engine(EngineConfig(llm_path=folder))
    subspec = load_engine(EngineConfig(llm_path=folder, substitute_kernel="triton", **SUBSPEC_SMALL_TREE))
    assert subspec.describe()["substitute_kernel"] == "triton"
    if partial_sums:
        for layer in subspec.drafter.stack.layers:
            for linear in layer.values():
                linear.split = linear.blocks
                linear.partial = torch.empty(linear.split * MAX_ROWS * linear.out_features)
        assert min(linear.split for linear in subspec.drafter.stack.layers[0].values()) > 1
        subspec.drafter.pointwise = draft_pointwise(torch.float32, subspec.drafter.transformer.head_dim, "aot_eager")
        assert subspec.drafter.pointwise.attend is draft_attention
    accepted = 0
    for prompt in ([5, 9, 13, 200, 7],):  # the interpreter runs every linear in Python: one short reply
        expected = vanilla.generate(prompt, SamplingConfig(max_new_tokens=8)).token_ids
        gen = subspec.generate(prompt, SamplingConfig(max_new_tokens=8))
        assert gen.token_ids == expected, (prompt, gen.token_ids, expected)
        accepted += sum(it.accepted_depth for it in gen.stats.iterations)
    assert accepted > 0
    print(f"subspec_sd with the triton kernel{' and partial sums' if partial_sums else ''} = vanilla on {Path(folder).name}")


def row_invariant_subspec_equals_vanilla(folder: str) -> None:
    """Greedy subspec_sd and vanilla, both with the GPU's row-invariant target (128-row chunks, the
    attention kernel): the same tokens, with drafts accepted."""
    ops = row_invariant(GPU_ROWS, row_invariant_attention)
    engines = [load_engine(EngineConfig(llm_path=folder, **extra)) for extra in ({}, SUBSPEC_SMALL_TREE)]
    for engine in engines:
        engine.target.ops = ops
    prompt = [5, 9, 13, 200, 7]
    expected, gen = (engine.generate(prompt, SamplingConfig(max_new_tokens=8)) for engine in engines)
    assert gen.token_ids == expected.token_ids, (gen.token_ids, expected.token_ids)
    assert sum(it.accepted_depth for it in gen.stats.iterations) > 0
    print(f"row-invariant subspec_sd = vanilla on {Path(folder).name}")


if __name__ == "__main__":  # triton_interpreted.py FOLDER [--partial-sums FOLDER]
    kernel_equals_hqq()
    ablated_kernel_runs_in_its_place(Path(tempfile.mkdtemp()))
    rotary_kernel_equals_eager()
    attention_kernel_equals_torch()
    row_attention_kernel_is_row_invariant()
    folder, *rest = sys.argv[1:]
    subspec_equals_vanilla(folder, partial_sums=False)
    row_invariant_subspec_equals_vanilla(folder)
    if rest:
        subspec_equals_vanilla(rest[1], partial_sums=True)
