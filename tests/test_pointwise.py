"""The element-wise math: eager = transformers' modules exactly; compiled = eager; drafts that use
the compiled functions stay lossless.

On a GPU the draft compiles with inductor; here the "aot_eager" backend runs the same dynamo
tracing (fullgraph: any graph break fails) without generating kernels, which needs no compiler.
"""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

from engine import EngineConfig, load_engine
from engine.attention_kernel import draft_attention
from engine.build import draft_pointwise, target_pointwise
from engine.pointwise import EAGER, attention_inputs, compiled_pointwise, rms_norm, row_attention, sdpa_attention, visible_keys
from engine.rotary_kernel import store_attention_inputs
from engine.row_attention_kernel import row_invariant_attention
from tests.test_lossless import assert_drafts_lossless, random_prompts


@pytest.mark.parametrize("norm_class", [LlamaRMSNorm, Qwen3RMSNorm])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_is_the_transformers_module_bit_for_bit(norm_class, dtype):
    torch.manual_seed(0)
    module = norm_class(64, eps=1e-5).to(dtype)
    module.weight.data.normal_(1.0, 0.3)
    x = torch.randn(7, 64, dtype=dtype) * 3
    assert torch.equal(rms_norm(x, module.weight, module.variance_epsilon), module(x))


@pytest.mark.parametrize("qk_norm", [False, True])
def test_attention_inputs_are_the_transformers_rotary_bit_for_bit(qk_norm):
    """q and k as transformers' attention computes them (Qwen3's per-head norms, then the rotary
    embedding), v untouched, all in the one [T, heads, D] output."""
    torch.manual_seed(0)
    T, H, KVH, D = 5, 4, 2, 16
    heads = torch.randn(T, H + 2 * KVH, D, dtype=torch.bfloat16)
    angles = torch.randn(T, D // 2)
    cos, sin = (torch.cat((f(angles), f(angles)), -1).to(torch.bfloat16) for f in (torch.cos, torch.sin))
    q_norm, k_norm = Qwen3RMSNorm(D, eps=1e-6).to(torch.bfloat16), Qwen3RMSNorm(D, eps=1e-6).to(torch.bfloat16)
    q_norm.weight.data.normal_(1.0, 0.3)
    k_norm.weight.data.normal_(1.0, 0.3)
    q, k, v = heads.split((H, KVH, KVH), dim=1)
    if qk_norm:
        q, k = q_norm(q), k_norm(k)
    want_q, want_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos[None], sin[None])
    norms = ((q_norm.weight, 1e-6), (k_norm.weight, 1e-6)) if qk_norm else (None, None)
    got = attention_inputs(heads, cos, sin, H, *norms)
    assert torch.equal(got[:, :H].transpose(0, 1), want_q[0])
    assert torch.equal(got[:, H : H + KVH].transpose(0, 1), want_k[0])
    assert torch.equal(got[:, H + KVH :], v)


def test_storing_attention_inputs_writes_k_and_v_at_the_slots_and_returns_q():
    torch.manual_seed(0)
    heads = torch.randn(3, 4 + 2 * 2, 16)  # 3 tokens, 4 query heads, 2 key/value heads
    cos, sin = torch.randn(3, 16), torch.randn(3, 16)
    kv = torch.zeros(2, 2, 10, 16)
    q = EAGER.store_attention_inputs(heads, cos, sin, 4, None, None, kv, torch.tensor([7, 2, 5]))
    want = attention_inputs(heads, cos, sin, 4, None, None)
    assert torch.equal(q, want[:, :4])
    assert torch.equal(kv[0][:, [7, 2, 5]], want[:, 4:6].transpose(0, 1))  # keys, rotated
    assert torch.equal(kv[1][:, [7, 2, 5]], heads[:, 6:].transpose(0, 1))  # values as they were
    assert kv[:, :, [0, 1, 3, 4, 6, 8, 9]].eq(0).all()


def _stored_twice(ops, eager, qkv, *args):
    """q and the cache from ops and from eager, each given its own empty cache."""
    slots = torch.tensor([4, 0, 2, 6, 1, 3])[: args[0].shape[0]]
    kv_ops, kv_eager = torch.zeros(2, 2, 8, 16, dtype=args[0].dtype), torch.zeros(2, 2, 8, 16, dtype=args[0].dtype)
    return (ops.store_attention_inputs(qkv[0], *args, kv_ops, slots), kv_ops), (
        eager.store_attention_inputs(qkv[1], *args, kv_eager, slots), kv_eager)


def test_compiled_functions_equal_the_eager_ones():
    torch.manual_seed(0)
    ops = compiled_pointwise("aot_eager")
    x, delta, weight = torch.randn(6, 64), torch.randn(6, 64), torch.randn(64)
    for got, expected in zip(ops.add_rms_norm(x, delta, weight, 1e-6), EAGER.add_rms_norm(x, delta, weight, 1e-6)):
        assert torch.equal(got, expected)
    heads = torch.randn(6, 4 + 2 * 2, 16)  # 4 query heads, 2 key/value heads
    cos, sin = torch.randn(6, 16), torch.randn(6, 16)
    for norms in (None, (torch.randn(16), 1e-6)):
        (q, kv), (want_q, want_kv) = _stored_twice(ops, EAGER, (heads, heads), cos, sin, 4, norms, norms)
        assert torch.equal(q, want_q) and torch.equal(kv, want_kv)
    assert torch.equal(ops.gated(torch.nn.SiLU(), x, delta), EAGER.gated(torch.nn.SiLU(), x, delta))


def test_compiled_functions_add_partial_sums_as_they_read_them():
    # Split-K partial sums (float32) of the projections: the total, rounded to the compute dtype,
    # is what the linear would have returned; the same function of it is what must come out.
    torch.manual_seed(0)
    bf16 = torch.bfloat16
    ops = compiled_pointwise("aot_eager", bf16)
    assert ops.partial_sums and not EAGER.partial_sums
    partial_heads = torch.randn(3, 6, 4 + 2 * 2, 16)  # 3 partial sums, 6 tokens, 4 query + 2 x 2 key/value heads
    cos, sin = torch.randn(6, 16, dtype=bf16), torch.randn(6, 16, dtype=bf16)
    for norms in (None, (torch.randn(16, dtype=bf16), 1e-6)):
        (q, kv), (want_q, want_kv) = _stored_twice(ops, EAGER, (partial_heads, partial_heads.sum(0).to(bf16)),
                                                   cos, sin, 4, norms, norms)
        assert q.dtype == bf16 and torch.equal(q, want_q) and torch.equal(kv, want_kv)
    gate, up = torch.randn(2, 5, 6, 32).unbind(0)  # 5 partial sums each
    want = EAGER.gated(torch.nn.SiLU(), gate.sum(0).to(bf16), up.sum(0).to(bf16))
    assert torch.equal(ops.gated(torch.nn.SiLU(), gate, up), want)
    x, partial_delta, weight = torch.randn(6, 32, dtype=bf16), torch.randn(7, 6, 32), torch.randn(32, dtype=bf16)
    want = EAGER.add_rms_norm(x, partial_delta.sum(0).to(bf16), weight, 1e-6)
    assert all(torch.equal(a, b) for a, b in zip(ops.add_rms_norm(x, partial_delta, weight, 1e-6), want))


def test_a_function_that_fails_to_compile_runs_eagerly_with_a_warning():
    def no_compiler(graph, inputs):
        raise RuntimeError("no triton here")

    ops = compiled_pointwise(no_compiler)
    x, delta, weight = torch.randn(6, 64), torch.randn(6, 64), torch.randn(64)
    with pytest.warns(UserWarning, match="add_rms_norm runs eagerly"):
        got = ops.add_rms_norm(x, delta, weight, 1e-6)
    assert all(torch.equal(a, b) for a, b in zip(got, EAGER.add_rms_norm(x, delta, weight, 1e-6)))


@pytest.mark.parametrize("partial_sums", [False, True])
def test_drafts_with_compiled_pointwise_equal_vanilla(random_folder, partial_sums):
    # With partial sums the CPU's dense linears hand their outputs over as the only partial sum.
    vanilla = load_engine(EngineConfig(llm_path=str(random_folder)))
    subspec = load_engine(EngineConfig(method="subspec_sd", llm_path=str(random_folder), max_depth=6, topk_len=3))
    subspec.drafter.pointwise = compiled_pointwise("aot_eager", torch.float32 if partial_sums else None)
    assert_drafts_lossless(subspec, vanilla, random_prompts(6, 512, seed=12), 16)


def test_gpu_drafts_take_the_triton_kernels_where_the_head_size_suits_them():
    ops = draft_pointwise(torch.bfloat16, 128, "aot_eager")
    assert ops.partial_sums and ops.attend is draft_attention and ops.store_attention_inputs is store_attention_inputs
    odd = draft_pointwise(torch.bfloat16, 96, "aot_eager")  # not a power of two: torch's attention, compiled rotary
    assert odd.partial_sums and odd.attend is sdpa_attention and odd.store_attention_inputs is not store_attention_inputs


def test_a_gpu_row_invariant_target_takes_its_attention_kernel_and_128_row_chunks():
    gpu = target_pointwise(torch.device("cuda"), 128)
    assert gpu.attend is row_invariant_attention and gpu.attention_mask is visible_keys
    assert gpu.linear.__name__ == "linear_on_chunks" and gpu.linear.rows == 128
    odd = target_pointwise(torch.device("cuda"), 96)  # the CPU's row-by-row attention, the GPU's chunks
    assert odd.attend is row_attention and odd.linear.rows == 128
    cpu = target_pointwise(torch.device("cpu"), 128)
    assert cpu.attend is row_attention and cpu.linear.rows == 32


def test_the_row_invariant_kernel_compiles_once_for_every_length_of_a_cache():
    # Its compile-time piece count comes from the cache behind the view, not the view's length: a
    # first turn of a new length must not wait for the compiler (the warm-up compiled the count).
    from engine.cache import KVCache
    from engine.attention_kernel import piece_loop_count

    cache = KVCache(2, 2, 16, 8192, torch.float32, torch.device("cpu"))
    counts = {piece_loop_count(cache.view(1, end)[0]) for end in (1, 300, 1500, 8000, 8192)}
    assert counts == {32}  # 8192 slots = 32 pieces of 256
    assert piece_loop_count(torch.zeros(2, 300, 16)) == 2  # a tensor of its own: its own slots
