"""Fitting a plan: the retry loop and tree choice against a rule-driven fake, and the CPU path end to
end with the bundled model."""

from __future__ import annotations

import tomllib

import pytest
import torch

from engine import EngineError
from profiles import GIB, ProfileError, ProfileStore, estimate_plan, format_profile, run_profile
from profiles import fit
from profiles_fake_engine import FakeGpu
from test_profiles_memory import QWEN25_7B, QWEN25_14B

SLOW_FORWARD_S = 0.15
FREE_FORWARD_S = 0.05


@pytest.fixture(autouse=True)
def wide_tolerance(monkeypatch):
    # The fake sleeps 50 ms for a "free" forward and 150 ms for a costly one; a 50% tolerance keeps
    # scheduler jitter on a loaded machine from deciding the test.
    monkeypatch.setattr(fit, "FREE_TOLERANCE", 0.5)


def test_choose_node_budget_takes_the_largest_free_tree():
    costs = {1: 200.0, 25: 201.0, 49: 203.0, 97: 205.0, 193: 209.0, 289: 230.0, 385: 260.0}
    assert fit.choose_node_budget(costs, 0.05) == 193  # 209 <= 210, 230 > 210
    assert fit.choose_node_budget(costs, 0.20) == 289
    # A compute-bound GPU: nothing is free, the smallest tree still drafts.
    assert fit.choose_node_budget({1: 10.0, 25: 20.0, 49: 40.0}, 0.05) == 25


def seven_b_estimate():
    return estimate_plan(QWEN25_7B, 8 * GIB, "subspec_sd", tree_nodes=193)


def fit_7b(gpu: FakeGpu):
    return fit.fit_gpu(None, "subspec_sd", QWEN25_7B, 8 * GIB, 8.0, 2048, "fp", lambda _m: None, gpu.load)


def test_over_budget_peak_lowers_the_resident_layers():
    estimate = seven_b_estimate()
    allowed = fit.allocation_budget(estimate)
    layer = estimate.layer_bytes
    assert estimate.layers_on_gpu == 1  # the memory model's start (test_profiles_memory)
    # Measured: half a layer more than the model predicted, so 1 layer is over budget, 0 fits.
    gpu = FakeGpu(
        peak_bytes=lambda layers, depth: allowed - layer // 2 + layers * layer,
        forward_s=lambda tokens: FREE_FORWARD_S if tokens <= 193 else SLOW_FORWARD_S,
    )
    plan = fit_7b(gpu)
    assert [c.keep_first_n_layers_on_gpu for c in gpu.loads] == [1, 0]
    assert plan.layers_on_gpu == 0 and plan.layers_total == 28
    assert plan.measured_peak_bytes == allowed - layer // 2 <= allowed
    assert plan.estimated_peak_bytes == estimate.estimated_peak_bytes
    # The largest tree whose forward is free: 193 nodes = depth 32 x top-6, the trial's own tree.
    assert (plan.node_budget, plan.max_depth, plan.topk_len) == (192, 32, 6)
    assert sorted(plan.verify_ms_by_nodes) == list(fit.NODE_CANDIDATES)
    assert plan.verify_ms_by_nodes[385] > plan.verify_ms_by_nodes[1] * 1.5
    assert all(config.vram_limit_gb == 8.0 and config.max_length == 2048 for config in gpu.loads)


def test_out_of_memory_load_retries_and_a_bigger_free_tree_is_confirmed():
    gpu = FakeGpu(
        peak_bytes=lambda layers, depth: 4 * GIB,
        forward_s=lambda tokens: FREE_FORWARD_S if tokens <= 289 else SLOW_FORWARD_S,
        oom_above_layers=0,
    )
    plan = fit_7b(gpu)
    # 1 layer: out of memory while loading; 0 layers fits; the free 289-node tree (depth 48) is
    # larger than the trial's depth 32, so it is loaded and run once more before it is handed out.
    assert [(c.keep_first_n_layers_on_gpu, c.max_depth) for c in gpu.loads] == [(1, 32), (0, 32), (0, 48)]
    assert (plan.layers_on_gpu, plan.max_depth, plan.node_budget) == (0, 48, 288)


def test_a_bigger_tree_that_does_not_fit_falls_back_to_the_trial_tree():
    allowed = fit.allocation_budget(seven_b_estimate())
    gpu = FakeGpu(
        peak_bytes=lambda layers, depth: allowed - 1 if depth <= 32 else allowed + 1,
        forward_s=lambda tokens: FREE_FORWARD_S,
    )
    plan = fit_7b(gpu)
    assert [c.max_depth for c in gpu.loads] == [32, 64]
    assert (plan.max_depth, plan.node_budget, plan.measured_peak_bytes) == (32, 192, allowed - 1)


def test_a_plan_that_never_fits_is_refused():
    allowed = fit.allocation_budget(seven_b_estimate())
    gpu = FakeGpu(peak_bytes=lambda layers, depth: allowed + 1, forward_s=lambda tokens: 0.0)
    with pytest.raises(ProfileError, match="even with every layer streamed"):
        fit_7b(gpu)
    assert [c.keep_first_n_layers_on_gpu for c in gpu.loads] == [1, 0]
    # The memory model alone rules out Qwen2.5-14B with a 4-bit substitute on 12 GiB: no load at all.
    gpu = FakeGpu(peak_bytes=lambda layers, depth: 0, forward_s=lambda tokens: 0.0)
    with pytest.raises(ProfileError, match=r"does not fit this GPU with subspec_sd: needs 12\.44 GiB"):
        fit.fit_gpu(None, "subspec_sd", QWEN25_14B, 12 * GIB, 12.0, 2048, "fp", lambda _m: None, gpu.load)
    assert gpu.loads == []


def test_other_engine_errors_are_not_mistaken_for_out_of_memory():
    def missing_model(config, progress):
        raise EngineError("model path not found: nowhere")

    with pytest.raises(EngineError, match="model path not found"):
        fit.fit_gpu("nowhere", "subspec_sd", QWEN25_7B, 8 * GIB, None, 2048, "fp", lambda _m: None, missing_model)


CPU_CANDIDATES = (
    fit.CpuCandidate("vanilla", "vanilla"),
    fit.CpuCandidate("subspec_sd depth 4 top-2", "subspec_sd", 4, 2),
)


def refuse_to_load(config, progress):
    raise AssertionError("the stored profile should have been reused")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path: this machine would profile its GPU")
def test_run_profile_reuses_stores_and_falls_back_to_memory(tmp_path, monkeypatch):
    monkeypatch.setenv("SUBSPEC_CONFIG_DIR", str(tmp_path))
    gpu = FakeGpu(peak_bytes=lambda layers, depth: 0, forward_s=lambda tokens: 0.0)
    messages: list[str] = []
    profile = run_profile(None, 8.0, "subspec_sd", progress=messages.append, loader=gpu.load,
                          cpu_candidates=CPU_CANDIDATES, cpu_new_tokens=4)
    assert not profile.reused and profile.path == tmp_path / "profiles" / "cpu.toml"
    assert profile.plan.method == "subspec_sd"  # the fake's deeper tree decodes faster
    assert "no CUDA GPU: --vram-limit-gb does not apply, profiling the CPU" in profile.messages
    assert any(m.startswith("measuring vanilla") for m in messages)
    # Same model, method and context: read back, nothing measured.
    again = run_profile(None, None, "subspec_sd", loader=refuse_to_load)
    assert again.reused and again.plan == profile.plan
    # --force measures again; a read-only store keeps the new profile in memory with a note.
    monkeypatch.setattr(ProfileStore, "save_plan", _refuse_save)
    forced = run_profile(None, None, "subspec_sd", force=True, loader=gpu.load, cpu_candidates=CPU_CANDIDATES,
                         cpu_new_tokens=4)
    assert not forced.reused and forced.path is None
    assert forced.messages == ["cannot save the profile to x: Read-only file system: the profile is kept for this session only"]
    with pytest.raises(ProfileError, match="must be positive"):
        run_profile(None, 0, "subspec_sd", loader=refuse_to_load)


def _refuse_save(self, *args):
    raise ProfileError("cannot save the profile to x: Read-only file system")


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path: this machine would profile its GPU")
def test_cpu_profile_end_to_end_with_the_bundled_model(tmp_path, monkeypatch):
    monkeypatch.setenv("SUBSPEC_CONFIG_DIR", str(tmp_path))
    profile = run_profile(None, None, "subspec_sd", cpu_candidates=CPU_CANDIDATES, cpu_new_tokens=8)
    plan = profile.plan
    assert (plan.device, plan.layers_total, plan.layers_on_gpu) == ("cpu", 30, 0)
    assert set(plan.tok_per_s_by_candidate) == {"vanilla", "subspec_sd depth 4 top-2"}
    assert all(tps > 0 for tps in plan.tok_per_s_by_candidate.values())
    fastest = max(plan.tok_per_s_by_candidate, key=plan.tok_per_s_by_candidate.get)
    assert plan.method == fastest.split()[0]
    if plan.method == "subspec_sd":
        assert (plan.max_depth, plan.topk_len, plan.node_budget) == (4, 2, 8)
    stored = tomllib.loads(profile.path.read_text())
    assert stored["models"]["bundled:SmolLM2-135M-Instruct"]["subspec_sd"]["method"] == plan.method
    text = format_profile(profile)
    assert "Model:    bundled:SmolLM2-135M-Instruct" in text and "tok/s" in text
    assert profile.as_dict()["engine_overrides"]["method"] == plan.method
    assert run_profile(None, None, "subspec_sd", loader=refuse_to_load).reused
