"""The element-wise math: eager = transformers' modules exactly; compiled = eager; drafts that use
the compiled functions stay lossless.

On a GPU the draft compiles with inductor; here the "aot_eager" backend runs the same dynamo
tracing (fullgraph: any graph break fails) without generating kernels, which needs no compiler.
"""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

from engine import EngineConfig, load_engine
from engine.pointwise import EAGER, compiled_pointwise, rms_norm
from tests.test_lossless import assert_drafts_lossless, random_prompts


@pytest.mark.parametrize("norm_class", [LlamaRMSNorm, Qwen3RMSNorm])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_is_the_transformers_module_bit_for_bit(norm_class, dtype):
    torch.manual_seed(0)
    module = norm_class(64, eps=1e-5).to(dtype)
    module.weight.data.normal_(1.0, 0.3)
    x = torch.randn(7, 64, dtype=dtype) * 3
    assert torch.equal(rms_norm(x, module.weight, module.variance_epsilon), module(x))


def test_compiled_functions_equal_the_eager_ones():
    torch.manual_seed(0)
    ops = compiled_pointwise("aot_eager")
    x, delta, weight = torch.randn(6, 64), torch.randn(6, 64), torch.randn(64)
    for got, expected in zip(ops.add_rms_norm(x, delta, weight, 1e-6), EAGER.add_rms_norm(x, delta, weight, 1e-6)):
        assert torch.equal(got, expected)
    q, k, v = torch.randn(6, 4, 16), torch.randn(6, 2, 16), torch.randn(6, 2, 16)
    cos, sin = torch.randn(6, 16), torch.randn(6, 16)
    for norms in (None, (torch.randn(16), 1e-6)):
        got = ops.attention_inputs(q, k, v, cos, sin, norms, norms)
        expected = EAGER.attention_inputs(q, k, v, cos, sin, norms, norms)
        assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert torch.equal(ops.gated(torch.nn.SiLU(), x, delta), EAGER.gated(torch.nn.SiLU(), x, delta))


def test_a_function_that_fails_to_compile_runs_eagerly_with_a_warning():
    def no_compiler(graph, inputs):
        raise RuntimeError("no triton here")

    ops = compiled_pointwise(no_compiler)
    x, delta, weight = torch.randn(6, 64), torch.randn(6, 64), torch.randn(64)
    with pytest.warns(UserWarning, match="add_rms_norm runs eagerly"):
        got = ops.add_rms_norm(x, delta, weight, 1e-6)
    assert all(torch.equal(a, b) for a, b in zip(got, EAGER.add_rms_norm(x, delta, weight, 1e-6)))


def test_drafts_with_compiled_pointwise_equal_vanilla(random_folder):
    vanilla = load_engine(EngineConfig(llm_path=str(random_folder)))
    subspec = load_engine(EngineConfig(method="subspec_sd", llm_path=str(random_folder), max_depth=6, topk_len=3))
    subspec.drafter.pointwise = compiled_pointwise("aot_eager")
    assert_drafts_lossless(subspec, vanilla, random_prompts(6, 512, seed=12), 16)
