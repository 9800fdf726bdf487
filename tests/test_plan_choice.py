"""profiles.choose_plan: the one decision every front end loads with (flags, profile, estimate),
the profile's method unless the user chose one, notes for the user; trial prompts made of ids."""

from __future__ import annotations

import dataclasses

import pytest
from tui_fake_engine import FAKE_CPU, FAKE_GPU, FakeProfiler, cpu_plan, gpu_plan

import profiles.runner
from engine import EngineConfig
from profiles import ProfileError
from profiles.choose import choose_plan
from profiles.fit import reply_prompt, trial_ids
from profiles.store import ModelPlan

REAL_LOAD_METER = profiles.runner.LoadMeter  # tests/conftest.py stands a quiet one in for it


def test_explicit_resident_layers_are_the_plan_and_nothing_is_measured():
    profiler = FakeProfiler()
    planned = choose_plan(EngineConfig(keep_first_n_layers_on_gpu=3), {"keep_first_n_layers_on_gpu"},
                          profiler=profiler, gpu=True)
    assert (planned.source, planned.overrides, profiler.calls) == ("flags", {}, [])
    # the CPU asked for on a machine with a GPU: the user's choice, not a GPU plan
    planned = choose_plan(EngineConfig(device="cpu"), {"device"}, profiler=profiler, gpu=True)
    assert (planned.source, profiler.calls) == ("flags", [])


def test_the_profile_chooses_the_method_unless_the_user_did():
    vanilla_fastest = FakeProfiler(cpu_plan("vanilla"), steps=("measuring",))
    planned = choose_plan(EngineConfig(method="subspec_sd"), set(), profiler=vanilla_fastest, gpu=False)
    assert planned.source == "profile" and planned.overrides["method"] == "vanilla"
    assert vanilla_fastest.calls == [(None, None, False)]  # None: the profile chooses
    assert planned.notes == ["using vanilla: the fastest method measured on this machine (--method chooses another)"]

    planned = choose_plan(EngineConfig(method="subspec_sd"), {"method"}, profiler=vanilla_fastest, gpu=False)
    assert vanilla_fastest.calls[-1] == (None, "subspec_sd", False)
    assert "method" not in planned.overrides and planned.overrides == {"max_length": 8192}


def test_the_profile_plans_the_context_unless_the_user_chose_one():
    profiler = FakeProfiler(cpu_plan("vanilla", max_context=8192))
    planned = choose_plan(EngineConfig(), set(), profiler=profiler, gpu=True)
    assert profiler.contexts == [None] and planned.overrides["max_length"] == 8192
    shorter = FakeProfiler(cpu_plan("vanilla", max_context=4096))
    planned = choose_plan(EngineConfig(max_length=4096), {"max_length"}, profiler=shorter, gpu=True)
    assert shorter.contexts == [4096] and "max_length" not in planned.overrides  # the user's own value stands


def test_a_reused_profile_says_nothing_a_new_one_says_why():
    reused = FakeProfiler(cpu_plan("vanilla"))  # no steps: read back from the store
    assert choose_plan(EngineConfig(), set(), profiler=reused, gpu=False).notes == []


def test_the_user_s_own_settings_win_over_the_profile():
    profiler = FakeProfiler(gpu_plan(layers_on_gpu=10), device=FAKE_GPU)
    planned = choose_plan(EngineConfig(method="subspec_sd", max_depth=4), {"method", "max_depth"},
                          profiler=profiler, gpu=True)
    assert planned.overrides["keep_first_n_layers_on_gpu"] == 10 and planned.overrides["offload_slots"] == 3
    assert "max_depth" not in planned.overrides and "method" not in planned.overrides


def test_methods_without_their_draft_are_refused_before_anything_is_measured():
    profiler = FakeProfiler()
    with pytest.raises(ProfileError, match="eagle_sd needs an EAGLE head"):
        choose_plan(EngineConfig(method="eagle_sd"), {"method"}, profiler=profiler, gpu=False)
    with pytest.raises(ProfileError, match="needs a draft model"):
        choose_plan(EngineConfig(method="classic_sd"), {"method"}, profiler=profiler, gpu=False)
    assert profiler.calls == []


def test_no_profile_on_a_cpu_is_an_estimate_without_measuring():
    profiler = FakeProfiler()
    planned = choose_plan(EngineConfig(), set(), use_profile=False, profiler=profiler, gpu=False)
    assert (planned.source, planned.overrides, profiler.calls) == ("estimate", {}, [])


def test_describe_reports_which_plan_ran():
    planned = choose_plan(EngineConfig(), set(), profiler=FakeProfiler(cpu_plan("subspec_sd", 6, 2)), gpu=False)
    config = dataclasses.replace(EngineConfig(method="subspec_sd", max_depth=6, topk_len=2), node_budget=None)
    described = planned.describe(config, {"device": "cpu", "layers_total": 30, "layers_on_gpu": 30, "max_length": 2048})
    assert described == {"source": "profile", "method": "subspec_sd", "device": "cpu", "layers_on_gpu": None,
                         "layers_total": 30, "stream_buffers": 0, "compressed_streaming": False, "tree_policy": "best_first", "node_budget": 12, "max_depth": 6,
                         "draft_batch": 16, "min_draft_prob": 1e-6, "max_length": 2048, "profile_path": None}


def test_a_profile_measured_on_a_busy_machine_is_measured_again_once_it_is_quiet(tmp_path, monkeypatch):
    monkeypatch.setenv("SUBSPEC_CONFIG_DIR", str(tmp_path))
    measured: list[str] = []

    def fake_choose_cpu(model, candidates, *args, **kwargs) -> ModelPlan:
        measured.append("cpu")
        return cpu_plan("vanilla")

    monkeypatch.setattr(profiles.runner.fit, "choose_cpu", fake_choose_cpu)
    monkeypatch.setattr(profiles.runner, "detect", lambda: FAKE_CPU)
    monkeypatch.setattr(profiles.runner, "config_fingerprint", lambda model: "fake")
    class Meter:
        load = 1.5  # other programs busy while measuring

        def per_core(self) -> float:
            return Meter.load

    monkeypatch.setattr(profiles.runner, "LoadMeter", Meter)
    monkeypatch.setattr(profiles.runner, "machine_load", lambda: Meter.load)
    busy = profiles.runner.run_profile(None, None)
    assert busy.plan.machine_load == 1.5 and any("busy while measuring" in m for m in busy.messages)
    assert "Load:     other programs used 1.50 per core while measuring (busy" in profiles.runner.format_profile(busy)
    assert profiles.runner.run_profile(None, None).reused  # still busy: no better figures to be had
    Meter.load = 0.1  # quiet now
    again = profiles.runner.run_profile(None, None)
    assert not again.reused and len(measured) == 2 and any("measuring again" in m for m in again.messages)
    assert profiles.runner.run_profile(None, None).reused  # a quiet measurement is kept


class WordLevelTokenizer:
    """A checkpoint's small word-level tokenizer: English text becomes nothing it knows."""

    all_special_ids = [0, 1, 2]

    def __len__(self) -> int:
        return 50


def test_trial_prompts_are_ids_any_vocabulary_has():
    ids = trial_ids(WordLevelTokenizer(), 300)
    assert len(ids) == 300 and ids == trial_ids(WordLevelTokenizer(), 300)  # deterministic
    assert set(ids) <= set(range(3, 50)) and len(set(ids)) > 20  # ordinary tokens, spread out


def test_a_reply_prompt_falls_back_to_ids_when_the_template_gives_nothing():
    class Engine:
        tokenizer = WordLevelTokenizer()

        def chat_ids(self, messages):
            return [0, 0, 0]  # unknown words only

    assert reply_prompt(Engine(), "Explain the sky.") == trial_ids(WordLevelTokenizer(), 48)


def test_the_load_meter_counts_other_programs_not_this_one(monkeypatch):
    readings = iter([(10.0, 5.0, 100.0), (13.0, 6.5, 101.0)])  # (system busy s, own CPU s, wall s)
    monkeypatch.setattr(profiles.runner, "_cpu_seconds", lambda: next(readings))
    monkeypatch.setattr(profiles.runner.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(profiles.runner, "LoadMeter", REAL_LOAD_METER)
    # 3 s busy in 1 s on 2 cores, 1.5 s of it this process's own: others used 0.75 per core
    assert REAL_LOAD_METER().per_core() == pytest.approx(0.75)


def test_the_load_is_read_from_this_machine_where_it_can_be():
    reading = profiles.runner._cpu_seconds()
    if reading is None:
        pytest.skip("no /proc/stat on this machine: the load is not measured")
    busy, own, wall = reading
    assert busy > 0 and own > 0 and wall > 0


def test_the_profiles_streaming_form_is_used_unless_the_user_asks_for_the_other(monkeypatch):
    # The profile measured both forms; asking for the one it did not keep takes the memory model's
    # plan for that form (compressed: its staging buffers cost resident layers), with a note.
    import dataclasses

    import profiles.choose

    monkeypatch.setattr(profiles.choose, "vram_budget", lambda index, cap: 950 * 2**20)  # the bundled model streams
    bf16 = gpu_plan(layers_on_gpu=20)
    compressed = dataclasses.replace(bf16, layers_on_gpu=18, compressed_streaming=True)
    assert choose_plan(EngineConfig(), set(), profiler=FakeProfiler(bf16), gpu=True).overrides["compressed_streaming"] is False
    kept = choose_plan(EngineConfig(), set(), profiler=FakeProfiler(compressed), gpu=True)
    assert kept.source == "profile" and kept.overrides["compressed_streaming"] is True
    assert kept.overrides["keep_first_n_layers_on_gpu"] == 18
    same = choose_plan(EngineConfig(compressed_streaming=True), {"compressed_streaming"}, profiler=FakeProfiler(compressed), gpu=True)
    assert same.source == "profile" and same.overrides["keep_first_n_layers_on_gpu"] == 18

    plain = choose_plan(EngineConfig(), set(), use_profile=False, gpu=True)
    asked = choose_plan(EngineConfig(compressed_streaming=True), {"compressed_streaming"}, profiler=FakeProfiler(bf16), gpu=True)
    assert asked.source == "estimate"
    assert asked.notes[0].startswith("--compressed-streaming (this GPU's profile measured bf16 streaming faster): "
                                     "the memory model's estimate")
    assert asked.overrides["keep_first_n_layers_on_gpu"] < plain.overrides["keep_first_n_layers_on_gpu"]
    declined = choose_plan(EngineConfig(compressed_streaming=False), {"compressed_streaming"},
                           profiler=FakeProfiler(compressed), gpu=True)
    assert declined.source == "estimate"
    assert declined.overrides["keep_first_n_layers_on_gpu"] == plain.overrides["keep_first_n_layers_on_gpu"]
    assert declined.notes[0].startswith("--no-compressed-streaming (this GPU's profile measured compressed streaming faster)")
