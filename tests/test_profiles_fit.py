"""Fitting a plan: the retry loop and tree choice against a rule-driven fake, and the CPU path end to
end with the bundled model."""

from __future__ import annotations

import dataclasses
import tomllib

import pytest
import torch

from engine import EngineConfig, EngineError
from engine.config import MIN_DRAFT_PROB
from profiles import GIB, Profile, ProfileError, ProfileStore, estimate_plan, format_profile, run_profile
from profiles import fit, runner
from profiles_fake_engine import FakeGpu
from test_profiles_memory import LLAMA31_8B, QWEN25_7B, QWEN25_14B
from test_profiles_store import GPU_DEVICE, gpu_plan

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


def test_shrink_gives_up_resident_layers_before_stream_buffers():
    assert fit.shrink(4, 3, 1) == (3, 3)
    assert fit.shrink(1, 3, 2) == (0, 2)  # the one layer, then one buffer
    assert fit.shrink(0, 2, 5) == (0, 1)  # never below one buffer: the caller gives up there


def seven_b_estimate(gib: float = 8):
    return estimate_plan(QWEN25_7B, int(gib * GIB), "subspec_sd", tree_nodes=193, max_context=2048)


def fit_7b(gpu: FakeGpu, gib: float = 8):
    return fit.fit_gpu(None, "subspec_sd", QWEN25_7B, int(gib * GIB), float(gib), 2048, "fp", lambda _m: None, gpu.load)


def bf16_loads(gpu: FakeGpu) -> list[EngineConfig]:
    """The loads that fit the plan streaming bf16 (the compressed form's trial follows them)."""
    return [c for c in gpu.loads if not c.compressed_streaming]


def loaded(gpu: FakeGpu) -> list[tuple[int, int]]:
    return [(c.keep_first_n_layers_on_gpu, c.offload_slots) for c in bf16_loads(gpu)]


def test_over_budget_peak_lowers_the_resident_layers_first():
    estimate = seven_b_estimate(10)
    allowed = fit.allocation_budget(estimate)
    layer = estimate.layer_bytes
    # The memory model's start at 10 GiB: 8.01 GiB fixed with 3 buffers, (10 - 8.01) / 0.434 = 4.6
    # -> 4 layers resident (test_profiles_memory has the terms).
    assert (estimate.layers_on_gpu, estimate.stream_buffers) == (4, 3)
    # Measured: 4 layers + 3 buffers come out half a layer over budget; one layer fewer fits.
    gpu = FakeGpu(
        peak_bytes=lambda layers, slots, depth: allowed - layer // 2 + (layers + slots - 6) * layer,
        forward_s=lambda tokens: FREE_FORWARD_S if tokens <= 193 else SLOW_FORWARD_S,
    )
    plan = fit_7b(gpu, 10)
    assert loaded(gpu) == [(4, 3), (3, 3)]  # the layer goes, the buffers stay
    assert (plan.layers_on_gpu, plan.layers_total, plan.stream_buffers) == (3, 28, 3)
    assert plan.measured_peak_bytes == allowed - layer // 2 <= allowed
    assert plan.estimated_peak_bytes == estimate.estimated_peak_bytes
    # The largest tree whose forward is free: 193 nodes = depth 32 x top-6, the trial's own tree.
    assert (plan.node_budget, plan.max_depth, plan.topk_len) == (192, 32, 6)
    assert sorted(plan.verify_ms_by_nodes) == list(fit.NODE_CANDIDATES)
    assert plan.verify_ms_by_nodes[385] > plan.verify_ms_by_nodes[1] * 1.5
    assert all(config.vram_limit_gb == 10.0 and config.max_length == 2048 for config in gpu.loads)


def test_with_no_layer_resident_an_over_budget_peak_drops_a_stream_buffer():
    estimate = seven_b_estimate(8.25)  # 3 buffers need 8.01 GiB (test_profiles_memory), no layer fits beside them
    allowed = fit.allocation_budget(estimate)
    layer = estimate.layer_bytes
    assert (estimate.layers_on_gpu, estimate.stream_buffers) == (0, 3)
    # Measured: every layer streamed through 3 buffers is half a layer over budget; 2 buffers fit.
    gpu = FakeGpu(
        peak_bytes=lambda layers, slots, depth: allowed - layer // 2 + (layers + slots - 2) * layer,
        forward_s=lambda tokens: FREE_FORWARD_S if tokens <= 193 else SLOW_FORWARD_S,
    )
    plan = fit_7b(gpu, 8.25)
    assert loaded(gpu) == [(0, 3), (0, 2)]
    assert (plan.layers_on_gpu, plan.stream_buffers, plan.measured_peak_bytes) == (0, 2, allowed - layer // 2)
    # The engine is asked for the buffers that were measured, not its own default of 3.
    overrides = plan.engine_overrides()
    assert (overrides["keep_first_n_layers_on_gpu"], overrides["offload_slots"]) == (0, 2)
    assert EngineConfig(**overrides).offload_slots == 2


def test_out_of_memory_load_retries_and_a_bigger_free_tree_is_confirmed():
    gpu = FakeGpu(
        peak_bytes=lambda layers, slots, depth: 4 * GIB,
        forward_s=lambda tokens: FREE_FORWARD_S if tokens <= 289 else SLOW_FORWARD_S,
        out_of_memory=lambda layers, slots: slots > 2,
    )
    plan = fit_7b(gpu, 8.25)
    # 3 buffers: out of memory while loading; 2 fit; the free 289-node tree (depth 48) is larger
    # than the trial's depth 32, so it is loaded (with the same 2 buffers) and run once more before
    # it is handed out.
    assert [(c.keep_first_n_layers_on_gpu, c.offload_slots, c.max_depth) for c in bf16_loads(gpu)] == [
        (0, 3, 32), (0, 2, 32), (0, 2, 48)
    ]
    assert (plan.layers_on_gpu, plan.stream_buffers, plan.max_depth, plan.node_budget) == (0, 2, 48, 288)
    assert (plan.tree_policy, plan.draft_batch) == ("best_first", 16)


def test_a_bigger_tree_that_does_not_fit_falls_back_to_the_trial_tree():
    allowed = fit.allocation_budget(seven_b_estimate())
    gpu = FakeGpu(
        peak_bytes=lambda layers, slots, depth: allowed - 1 if depth <= 32 else allowed + 1,
        forward_s=lambda tokens: FREE_FORWARD_S,
    )
    plan = fit_7b(gpu)
    assert [c.max_depth for c in bf16_loads(gpu)] == [32, 64, 32]  # the trial's tree is loaded again
    assert (plan.max_depth, plan.node_budget, plan.measured_peak_bytes) == (32, 192, allowed - 1)
    assert all(engine.closed for engine in gpu.engines)


def test_the_tree_is_the_free_budget_that_generates_fastest():
    """Drafting is not free: a model whose drafts are accepted shallowly generates fastest with a
    smaller tree than the free bound (here the fake's speed peaks at 192 nodes of 288)."""
    gpu = FakeGpu(
        peak_bytes=lambda layers, slots, depth: 4 * GIB,
        forward_s=lambda tokens: FREE_FORWARD_S if tokens <= 289 else SLOW_FORWARD_S,
        decode_s=lambda config: 0.1 + abs((config.node_budget or 0) - 192) / 1000,
    )
    messages = []
    plan = fit.fit_gpu(None, "subspec_sd", QWEN25_7B, 8 * GIB, 8.0, 2048, "fp", messages.append, gpu.load)
    assert (plan.node_budget, plan.max_depth, plan.tree_policy, plan.draft_batch) == (192, 32, "best_first", 16)
    assert list(plan.tok_per_s_by_candidate) == [
        "best-first 289 nodes, 16 per draft forward", "best-first 289 nodes, 32 per draft forward",
        "best-first 289 nodes, 6 per draft forward", "best-first 289 nodes, 16 per draft forward, floor 1e-06",
        "best-first 193 nodes, 16 per draft forward", "best-first 97 nodes, 16 per draft forward",
        "best-first 193 nodes, 16 per draft forward, compressed streaming",  # the chosen tree, the other form
    ]
    best = max(plan.tok_per_s_by_candidate, key=plan.tok_per_s_by_candidate.get)
    assert best == "best-first 193 nodes, 16 per draft forward"
    assert any(m.startswith("best-first 289 nodes, 32 per draft forward:") for m in messages)
    assert all(engine.closed for engine in gpu.engines)
    profile = Profile(GPU_DEVICE, "fake", "subspec_sd", plan, None, False)
    assert "Measured: best-first 289 nodes, 16 per draft forward" in format_profile(profile)


def test_a_faster_draft_width_that_does_not_fit_is_not_chosen():
    """32 nodes per draft forward generate faster here, but their reply peaks over the budget (more
    draft graphs): the plan keeps 16, and its stored peak is the one that fitted."""
    allowed = fit.allocation_budget(seven_b_estimate())
    gpu = FakeGpu(
        peak_bytes=lambda layers, slots, depth: 4 * GIB,
        forward_s=lambda tokens: FREE_FORWARD_S if tokens <= 289 else SLOW_FORWARD_S,
        decode_s=lambda config: 0.05 if config.draft_batch == 32 else 0.1,
        generation_extra_bytes=lambda config: allowed if config.draft_batch == 32 else 0,
    )
    messages = []
    plan = fit.fit_gpu(None, "subspec_sd", QWEN25_7B, 8 * GIB, 8.0, 2048, "fp", messages.append, gpu.load)
    assert (plan.node_budget, plan.draft_batch, plan.measured_peak_bytes) == (288, 16, 4 * GIB)
    assert any("32 per draft forward: peak" in m and "over the budget" in m for m in messages)


def test_a_draft_width_that_runs_out_of_memory_is_skipped():
    gpu = FakeGpu(
        peak_bytes=lambda layers, slots, depth: 4 * GIB,
        forward_s=lambda tokens: FREE_FORWARD_S if tokens <= 289 else SLOW_FORWARD_S,
        decode_s=lambda config: 0.05 if config.draft_batch == 32 else 0.1,
        generation_out_of_memory=lambda config: config.draft_batch == 32,
    )
    messages = []
    plan = fit.fit_gpu(None, "subspec_sd", QWEN25_7B, 8 * GIB, 8.0, 2048, "fp", messages.append, gpu.load)
    assert (plan.node_budget, plan.draft_batch) == (288, 16)
    assert "best-first 289 nodes, 32 per draft forward: out of memory" in messages
    assert "best-first 289 nodes, 32 per draft forward" not in plan.tok_per_s_by_candidate


@pytest.mark.parametrize("fastest", [32, 6])
def test_the_fastest_draft_width_that_fits_wins(fastest):
    """32 per forward (few forwards) or 6 (a model accepted deep needs the deep tree): whichever
    generates fastest is the plan's."""
    gpu = FakeGpu(
        peak_bytes=lambda layers, slots, depth: 4 * GIB,
        forward_s=lambda tokens: FREE_FORWARD_S if tokens <= 289 else SLOW_FORWARD_S,
        decode_s=lambda config: 0.05 if config.draft_batch == fastest else 0.1,
    )
    plan = fit.fit_gpu(None, "subspec_sd", QWEN25_7B, 8 * GIB, 8.0, 2048, "fp", print, gpu.load)
    assert (plan.node_budget, plan.max_depth, plan.draft_batch) == (288, 48, fastest)


@pytest.mark.parametrize("floor_faster", [True, False])
def test_the_floor_is_kept_only_where_it_generates_faster(floor_faster):
    """The best-first floor (a host read per draft forward) against none, same tree: the faster is
    stored, explicitly either way."""
    gpu = FakeGpu(
        peak_bytes=lambda layers, slots, depth: 4 * GIB,
        forward_s=lambda tokens: FREE_FORWARD_S if tokens <= 289 else SLOW_FORWARD_S,
        decode_s=lambda config: 0.05 if bool(config.min_draft_prob) == floor_faster else 0.1,
    )
    plan = fit.fit_gpu(None, "subspec_sd", QWEN25_7B, 8 * GIB, 8.0, 2048, "fp", print, gpu.load)
    want = MIN_DRAFT_PROB if floor_faster else 0.0
    assert (plan.node_budget, plan.draft_batch, plan.min_draft_prob) == (288, 16, want)
    assert plan.engine_overrides()["min_draft_prob"] == want
    assert "best-first 289 nodes, 16 per draft forward, floor 1e-06" in plan.tok_per_s_by_candidate
    shown = format_profile(Profile(GPU_DEVICE, "fake", "subspec_sd", plan, None, False))
    assert ("(289 nodes, 16 per draft forward, floor 1e-06)" in shown) == floor_faster


def compressed_faster_gpu(speedup: float) -> FakeGpu:
    """Compressed streaming decodes `speedup` x as fast; peaks grow with resident layers and buffers."""
    return FakeGpu(
        peak_bytes=lambda layers, slots, depth: 4 * GIB + (layers + slots) * 2**20,
        forward_s=lambda tokens: FREE_FORWARD_S if tokens <= 193 else SLOW_FORWARD_S,
        decode_s=lambda config: 0.1 / (speedup if config.compressed_streaming else 1.0),
    )


@pytest.mark.parametrize("method", ["subspec_sd", "vanilla"])
def test_compressed_streaming_is_kept_where_it_measures_faster_with_its_own_placement(method):
    gpu = compressed_faster_gpu(1.3)
    messages = []
    plan = fit.fit_gpu(None, method, QWEN25_7B, 9 * GIB, 9.0, 2048, "fp", messages.append, gpu.load)
    bf16 = estimate_plan(QWEN25_7B, 9 * GIB, method, tree_nodes=193, max_context=2048)
    compressed = estimate_plan(QWEN25_7B, 9 * GIB, method, tree_nodes=193, max_context=2048, compressed_streaming=True)
    assert compressed.layers_on_gpu < bf16.layers_on_gpu  # the staging buffer costs a resident layer here
    last = gpu.loads[-1]
    assert last.compressed_streaming and last.keep_first_n_layers_on_gpu == compressed.layers_on_gpu
    assert (plan.compressed_streaming, plan.layers_on_gpu, plan.stream_buffers) == (
        True, compressed.layers_on_gpu, compressed.stream_buffers)
    assert plan.estimated_peak_bytes == compressed.estimated_peak_bytes
    assert plan.measured_peak_bytes == 4 * GIB + (compressed.layers_on_gpu + compressed.stream_buffers) * 2**20
    assert plan.engine_overrides()["compressed_streaming"] is True
    if method == "vanilla":
        speeds = plan.tok_per_s_by_candidate
        assert list(speeds) == ["vanilla", "vanilla, compressed streaming"]
        assert speeds["vanilla, compressed streaming"] == pytest.approx(1.3 * speeds["vanilla"])
    else:  # the tree chosen streaming bf16 is the one timed compressed
        assert plan.tok_per_s_by_candidate[f"best-first {plan.node_budget + 1} nodes, 16 per draft forward, compressed streaming"] > max(
            v for k, v in plan.tok_per_s_by_candidate.items() if "compressed" not in k)
    assert any(m.startswith("compressed streaming") and m.endswith("streaming bf16: kept") for m in messages)
    assert all(engine.closed for engine in gpu.engines)
    text = format_profile(Profile(GPU_DEVICE, "m", method, plan, None, False))
    assert "device buffers, compressed (Huffman-coded exponents)" in text


def test_bf16_streaming_is_kept_where_compressed_is_slower():
    gpu = compressed_faster_gpu(0.8)
    messages = []
    plan = fit.fit_gpu(None, "subspec_sd", QWEN25_7B, 10 * GIB, 10.0, 2048, "fp", messages.append, gpu.load)
    assert gpu.loads[-1].compressed_streaming  # measured, then not used
    assert not plan.compressed_streaming and plan.layers_on_gpu == loaded(gpu)[-1][0]
    assert plan.engine_overrides()["compressed_streaming"] is False
    assert any(m.endswith("streaming bf16: not used") for m in messages)


def test_a_model_that_cannot_stream_compressed_keeps_bf16_with_a_line():
    gpu = compressed_faster_gpu(2.0)

    def load(config, progress):
        if config.compressed_streaming:
            raise EngineError("--compressed-streaming codes bfloat16 weights, and this model runs in torch.float32")
        return gpu.load(config, progress)

    messages = []
    plan = fit.fit_gpu(None, "subspec_sd", QWEN25_7B, 10 * GIB, 10.0, 2048, "fp", messages.append, load)
    assert not plan.compressed_streaming
    assert "compressed streaming not used: --compressed-streaming codes bfloat16 weights, and this model runs in torch.float32" in messages


def test_nothing_streamed_nothing_compressed():
    gpu = compressed_faster_gpu(2.0)
    plan = fit.fit_gpu(None, "subspec_sd", QWEN25_7B, 40 * GIB, 40.0, 2048, "fp", lambda _m: None, gpu.load)
    assert plan.layers_on_gpu == plan.layers_total and not plan.compressed_streaming
    assert not any(c.compressed_streaming for c in gpu.loads)
    assert "compressed_streaming" not in plan.engine_overrides()


@pytest.mark.slow
def test_choose_tree_reconfigures_a_real_engine(monkeypatch):
    """The tree trial on the real bundled model: every budget really generates (with its own draft
    widths) and is reported, and the fastest is the one returned."""
    from engine import load_engine

    monkeypatch.setattr(fit, "TREE_TRIAL_TOKENS", 8)
    monkeypatch.setattr(fit, "TREE_FRACTIONS", (1.0, 1 / 3))
    engine = load_engine(EngineConfig(method="subspec_sd", max_depth=2, topk_len=2))
    messages = []
    chosen, speeds, peak = fit.choose_tree(engine, 65, None, messages.append)
    assert list(speeds) == [f"best-first {n} nodes, {b} per draft forward{floor}" for n, b, floor in
                            ((65, 16, ""), (65, 32, ""), (65, 6, ""), (65, 16, ", floor 1e-06"), (22, 16, ""))]
    assert all(tps > 0 for tps in speeds.values()) and len(messages) == 5
    assert speeds[chosen.label()] == max(speeds.values())
    assert (engine.config.tree_policy, engine.config.topk_len) == ("best_first", 6)
    assert peak == 0  # a CPU reports no GPU peak
    engine.close()


def test_a_plan_that_never_fits_is_refused():
    allowed = fit.allocation_budget(seven_b_estimate(8.25))
    gpu = FakeGpu(peak_bytes=lambda layers, slots, depth: allowed + 1, forward_s=lambda tokens: 0.0)
    with pytest.raises(ProfileError, match="even with every layer streamed through one buffer"):
        fit_7b(gpu, 8.25)
    assert loaded(gpu) == [(0, 3), (0, 2), (0, 1)]  # 1 buffer and no layer resident: the last resort
    # The memory model alone rules out Qwen2.5-14B with a 4-bit substitute on 11 GiB (11.98 GiB even
    # through one buffer, test_profiles_memory): no load at all.
    gpu = FakeGpu(peak_bytes=lambda layers, slots, depth: 0, forward_s=lambda tokens: 0.0)
    with pytest.raises(ProfileError, match=r"does not fit this GPU with subspec_sd: needs 11\.98 GiB") as refused:
        fit.fit_gpu(None, "subspec_sd", QWEN25_14B, 11 * GIB, 11.0, 2048, "fp", lambda _m: None, gpu.load)
    assert "--max-length" not in str(refused.value)  # not even 256 tokens of context make it fit
    # On 12 GiB it needs 12.02 GiB at 2048 tokens; half the context (KV cache, workspace) fits.
    with pytest.raises(ProfileError, match=r"needs 12\.02 GiB.*; it fits with --max-length 1024$"):
        fit.fit_gpu(None, "subspec_sd", QWEN25_14B, 12 * GIB, 12.0, 2048, "fp", lambda _m: None, gpu.load)
    assert gpu.loads == []


def test_other_engine_errors_are_not_mistaken_for_out_of_memory():
    def missing_model(config, progress):
        raise EngineError("model path not found: nowhere")

    with pytest.raises(EngineError, match="model path not found"):
        fit.fit_gpu("nowhere", "subspec_sd", QWEN25_7B, 8 * GIB, None, 2048, "fp", lambda _m: None, missing_model)


@pytest.mark.parametrize(
    "layers, buffers, expected",
    [
        (0, 3, "Layers:   0 of 28 on the GPU, 28 streamed from pinned memory through 3 device buffers, bf16"),
        (0, 1, "Layers:   0 of 28 on the GPU, 28 streamed from pinned memory through 1 device buffer, bf16"),
        (28, 0, "Layers:   28 of 28 on the GPU, none streamed (no stream buffers)"),
    ],
)
def test_format_profile_shows_the_stream_buffers(layers, buffers, expected):
    profile = Profile(GPU_DEVICE, "m", "subspec_sd", gpu_plan(layers, buffers), None, False)
    assert expected in format_profile(profile).splitlines()
    assert profile.as_dict()["plan"]["stream_buffers"] == buffers  # --json


CPU_CANDIDATES = (
    fit.CpuCandidate("vanilla", "vanilla"),
    fit.CpuCandidate("subspec_sd depth 4 top-2", "subspec_sd", 4, 2),
)


def refuse_to_load(config, progress):
    raise AssertionError("the stored profile should have been reused")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path: this machine would profile its GPU")
def test_run_profile_reuses_stores_and_falls_back_to_memory(tmp_path, monkeypatch):
    monkeypatch.setenv("SUBSPEC_CONFIG_DIR", str(tmp_path))
    gpu = FakeGpu(peak_bytes=lambda layers, slots, depth: 0, forward_s=lambda tokens: 0.0)
    messages: list[str] = []
    profile = run_profile(None, 8.0, None, progress=messages.append, loader=gpu.load,
                          cpu_candidates=CPU_CANDIDATES, cpu_new_tokens=4)
    assert not profile.reused and profile.path == tmp_path / "profiles" / "cpu.toml"
    assert profile.plan.method == "subspec_sd"  # the fake's deeper tree decodes faster
    assert "no CUDA GPU: --vram-limit-gb does not apply, profiling the CPU" in profile.messages
    assert any(m.startswith("measuring vanilla") for m in messages)
    # Same model, method and context: read back, nothing measured.
    again = run_profile(None, None, None, loader=refuse_to_load)
    assert again.reused and again.plan == profile.plan
    # --force measures again; a read-only store keeps the new profile in memory with a note.
    monkeypatch.setattr(ProfileStore, "save_plan", _refuse_save)
    forced = run_profile(None, None, None, force=True, loader=gpu.load, cpu_candidates=CPU_CANDIDATES,
                         cpu_new_tokens=4)
    assert not forced.reused and forced.path is None
    assert forced.messages == ["cannot save the profile to x: Read-only file system: the profile is kept for this session only"]
    with pytest.raises(ProfileError, match="must be positive"):
        run_profile(None, 0, None, loader=refuse_to_load)


def _refuse_save(self, *args):
    raise ProfileError("cannot save the profile to x: Read-only file system")


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path: this machine would profile its GPU")
def test_cpu_profile_end_to_end_with_the_bundled_model(tmp_path, monkeypatch):
    monkeypatch.setenv("SUBSPEC_CONFIG_DIR", str(tmp_path))
    profile = run_profile(None, None, None, cpu_candidates=CPU_CANDIDATES, cpu_new_tokens=8)
    plan = profile.plan
    assert (plan.device, plan.layers_total, plan.layers_on_gpu, plan.stream_buffers) == ("cpu", 30, 0, 0)
    assert set(plan.tok_per_s_by_candidate) == {"vanilla", "subspec_sd depth 4 top-2"}
    assert all(tps > 0 for tps in plan.tok_per_s_by_candidate.values())
    fastest = max(plan.tok_per_s_by_candidate, key=plan.tok_per_s_by_candidate.get)
    assert plan.method == fastest.split()[0]
    if plan.method == "subspec_sd":
        assert (plan.max_depth, plan.topk_len, plan.node_budget) == (4, 2, 8)
    stored = tomllib.loads(profile.path.read_text())
    assert stored["models"]["bundled:SmolLM2-135M-Instruct"]["auto"]["method"] == plan.method  # the CPU chose
    text = format_profile(profile)
    assert "Model:    bundled:SmolLM2-135M-Instruct" in text and "tok/s" in text
    assert profile.as_dict()["engine_overrides"]["method"] == plan.method
    assert run_profile(None, None, None, loader=refuse_to_load).reused


@pytest.mark.parametrize("config, context", [(QWEN25_7B, 8192), (LLAMA31_8B, 2048)])
def test_a_gpu_profile_plans_the_longest_context_that_costs_no_stream_buffer(tmp_path, monkeypatch, config, context):
    # An 8 GiB cap: Qwen2.5-7B streams through 2 buffers at 8192 tokens as at 2048; Llama-3.1-8B
    # would drop to 1 buffer at 4096 (test_profiles_memory): it gets 2048, and the user is told.
    measured = []

    def fake_fit_gpu(model, method, model_config, vram_bytes, cap, max_context, *args, **kwargs):
        measured.append(max_context)
        return dataclasses.replace(gpu_plan(0, 2), max_context=max_context, vram_limit_gb=cap, config_fingerprint="fp")

    monkeypatch.setattr(fit, "fit_gpu", fake_fit_gpu)
    monkeypatch.setattr(runner, "detect", lambda: GPU_DEVICE)
    monkeypatch.setattr(runner, "model_config", lambda model: config)
    monkeypatch.setattr(runner, "config_fingerprint", lambda model: "fp")
    monkeypatch.setattr(runner, "measure_h2d_gbps", lambda device: 50.0)
    monkeypatch.setattr(runner, "vram_budget", lambda index, cap: int(cap * GIB))
    store = ProfileStore(tmp_path)
    profile = run_profile("m", 8.0, None, store=store)
    assert measured == [context] and profile.plan.max_context == context
    shortened = [m for m in profile.messages if "would cost a stream buffer" in m]
    assert shortened == ([] if context == 8192 else ["context 2048 tokens: 8192 would cost a stream buffer on this "
                                                      "GPU (--max-length 8192 asks for it anyway)"])
    again = run_profile("m", 8.0, None, store=store)
    assert again.reused and measured == [context]  # the planned context finds the stored profile
    asked = run_profile("m", 8.0, None, store=store, max_context=8192)  # --max-length 8192: the user's
    assert asked.reused == (context == 8192) and measured[-1] == asked.plan.max_context == 8192


def test_eagle_sd_is_profiled_with_its_preset_tree_under_its_own_head():
    from profiles.fit import EAGLE_CPU_CANDIDATE, cpu_candidates_for
    from profiles.runner import plan_key

    assert cpu_candidates_for("eagle_sd", "/heads/a") == (EAGLE_CPU_CANDIDATE,)
    assert (EAGLE_CPU_CANDIDATE.max_depth, EAGLE_CPU_CANDIDATE.topk_len) == (8, 10)  # configs/methods/eagle_sd.yaml
    assert plan_key("eagle_sd", "/heads/a", gpu=True) != plan_key("eagle_sd", "/heads/b", gpu=True)
