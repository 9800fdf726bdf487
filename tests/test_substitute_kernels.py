"""The substitute's kernels multiply with HQQ's quantized weights, fused or not, and stay lossless.

On a CPU the tinygemm kernel runs through torch's CPU int4 op: the same HQQ-to-tinygemm scale and
offset conversion as on a GPU (only the op's packed layout differs), so a wrong conversion fails
here. The GPU op itself is checked against the same reference by benchmarks/offload_gpu.py.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine import EngineConfig, EngineError, SamplingConfig, load_engine
from engine.offload import linear_tensors
from engine.substitute import FUSED, build_substitute, resolve_kernel
from tests.random_models import config_for, save_random_model
from tests.test_lossless import assert_drafts_lossless, greedy, mt_bench_prompts, random_prompts

CPU = torch.device("cpu")


def random_layers(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config_for(arch, hidden_size=128, intermediate_size=256))
    return [linear_tensors(layer) for layer in model.model.layers]


def unfused(layer: dict, name: str, x: torch.Tensor) -> torch.Tensor:
    """What the separate HQQ modules (hqq's own backend) compute for `name`, fused or not."""
    return torch.cat([layer[n](x) for n in FUSED.get(name, (name,))], dim=-1)


def apply(layer: dict, name: str, x: torch.Tensor) -> torch.Tensor:
    w = layer[name]
    if isinstance(w, torch.Tensor):
        return torch.nn.functional.linear(x, w, layer.get(f"{name}.bias"))
    return w(x)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: q/k/v biases
@pytest.mark.parametrize("kernel", ["tinygemm", "dense"])
def test_fused_kernels_compute_what_hqq_computes(arch, kernel):
    layers = random_layers(arch)
    reference = build_substitute(layers, CPU, torch.float32, kernel="hqq")
    fused = build_substitute(layers, CPU, torch.float32, kernel=kernel)
    assert set(fused.layers[0]) - {"qkv_proj.bias"} == {"qkv_proj", "gate_up_proj", "o_proj", "down_proj"}
    x = torch.randn(6, 128)
    for i in range(len(layers)):
        for name in ("qkv_proj", "gate_up_proj", "o_proj"):
            expected = unfused(reference.layers[i], name, x)
            got = apply(fused.layers[i], name, x)
            assert got.shape == expected.shape
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        down_in = torch.randn(6, 256)
        torch.testing.assert_close(apply(fused.layers[i], "down_proj", down_in),
                                   reference.layers[i]["down_proj"](down_in), rtol=1e-5, atol=1e-5)


def test_tinygemm_keeps_hqqs_float_zero_points():
    # HQQ's zero points are floats, not integers: rounding them (as hqq's own tinygemm patch does)
    # would move the weights. A planted rounding must be visible at this tolerance.
    layers = random_layers("llama")
    module = build_substitute(layers, CPU, torch.float32, kernel="hqq").layers[0]["o_proj"]
    zero = module.meta["zero"]
    assert (zero - zero.round()).abs().max() > 1e-2  # the zero points really are fractional
    x = torch.randn(4, 128)
    expected = module(x)
    module.meta["zero"] = zero.round()
    assert (module(x) - expected).abs().max() > 1e-3  # what rounding would change


def test_auto_is_dense_on_a_cpu_and_bad_kernels_are_clear_errors():
    layer = random_layers("llama")[0]
    assert resolve_kernel("auto", CPU, torch.float32, 4, 64, layer) == "dense"
    with pytest.raises(EngineError, match="unknown substitute kernel 'fast'"):
        resolve_kernel("fast", CPU, torch.float32, 4, 64, layer)
    with pytest.raises(EngineError, match="4-bit weights, not 3-bit"):
        resolve_kernel("tinygemm", CPU, torch.float32, 3, 64, layer)
    with pytest.raises(EngineError, match="group sizes are 32, 64, 128, 256, not 48"):
        resolve_kernel("tinygemm", CPU, torch.float32, 4, 48, layer)
    with pytest.raises(EngineError, match="needs a CUDA GPU"):
        resolve_kernel("gemlite", CPU, torch.float32, 4, 64, layer)
    odd = dict(layer, o_proj=torch.zeros(128, 100))
    with pytest.raises(EngineError, match="o_proj is 128 x 100"):
        resolve_kernel("tinygemm", CPU, torch.float32, 4, 64, odd)


def test_the_engine_reports_its_kernel_and_refuses_an_unknown_one(random_folder):
    engine = load_engine(EngineConfig(method="subspec_sd", llm_path=str(random_folder), substitute_kernel="tinygemm"))
    assert engine.describe()["substitute_kernel"] == "tinygemm"
    with pytest.raises(EngineError, match="unknown substitute kernel"):
        load_engine(EngineConfig(method="subspec_sd", llm_path=str(random_folder), substitute_kernel="fast"))


@pytest.mark.parametrize("kernel", ["tinygemm", "hqq"])
def test_random_subspec_equals_vanilla_with_each_kernel(random_folder, kernel):
    vanilla = load_engine(EngineConfig(llm_path=str(random_folder)))
    subspec = load_engine(EngineConfig(method="subspec_sd", llm_path=str(random_folder), substitute_kernel=kernel,
                                       max_depth=8, topk_len=3))
    assert_drafts_lossless(subspec, vanilla, random_prompts(10, 512, seed=11), 20)


@pytest.mark.slow
def test_bundled_subspec_with_tinygemm_equals_vanilla(bundled_engine):
    vanilla = bundled_engine("vanilla")
    subspec = bundled_engine("subspec_sd", substitute_kernel="tinygemm", max_depth=8, topk_len=3)
    taus = []
    for question in mt_bench_prompts(1):  # torch's CPU int4 kernel is slow at a few rows: 1 prompt
        prompt = vanilla.chat_ids([{"role": "user", "content": question}])
        gen = subspec.generate(prompt, SamplingConfig(max_new_tokens=20))
        assert gen.token_ids == greedy(vanilla, prompt, 20), question
        taus.append(gen.stats.tau)
    assert sum(taus) / len(taus) > 1.5  # the int4 substitute drafts tokens the target accepts
    # (random models cover tinygemm on more prompts: test_random_subspec_equals_vanilla_with_each_kernel)


def test_close_frees_the_drafter_with_its_substitute(tmp_path, bundled_folder):
    """The drafter and its draft-step graphs refer to each other; closing must free them at once,
    not at some later garbage collection (a second model loaded meanwhile would not fit the GPU)."""
    folder = save_random_model(tmp_path / "llama", "llama", bundled_folder)
    # Fixed-shape draft steps (what CUDA graphs replay) run on a CPU too, through the same DraftGraphs.
    engine = load_engine(EngineConfig(method="subspec_sd", llm_path=str(folder), max_depth=2, topk_len=2,
                                      compile_mode="cuda-graphs"))
    engine.generate([5, 9, 13], SamplingConfig(max_new_tokens=4))
    assert engine.drafter.graphs is not None
    drafter = weakref.ref(engine.drafter)
    gc.disable()  # only what close() itself collects counts
    try:
        engine.close()
        assert drafter() is None
    finally:
        gc.enable()
