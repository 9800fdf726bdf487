"""Settings resolution: shipped presets, precedence preset < YAML < command line, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from subspec_tui.settings import CONFIGS_DIR, ConfigError, resolve_settings

SHIPPED = sorted(CONFIGS_DIR.glob("*/*.yaml"))


def write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_every_shipped_config_resolves():
    assert len(SHIPPED) >= 10
    for path in SHIPPED:
        settings = resolve_settings(path)
        assert settings.engine.method in {"vanilla", "classic_sd", "subspec_sd", "eagle_sd"}, path


@pytest.mark.parametrize(
    ("name", "model", "vram_gb"),
    [
        ("qwen2.5-7b_8gb", "Qwen/Qwen2.5-7B-Instruct", 8.0),
        ("qwen2.5-14b_12gb", "Qwen/Qwen2.5-14B-Instruct", 12.0),
        ("qwen2.5-32b_24gb", "Qwen/Qwen2.5-32B-Instruct", 24.0),
        ("llama-3.1-8b_8gb", "meta-llama/Llama-3.1-8B-Instruct", 8.0),
    ],
)
def test_offloading_experiments(name, model, vram_gb):
    engine = resolve_settings(CONFIGS_DIR / "exp_offloading" / f"{name}.yaml").engine
    assert (engine.method, engine.llm_path, engine.vram_limit_gb) == ("subspec_sd", model, vram_gb)
    assert (engine.max_depth, engine.topk_len) == (48, 6)


def test_lossy_presets_extend_their_exact_preset():
    lossy = resolve_settings(CONFIGS_DIR / "methods" / "subspec_sd_lossy.yaml").engine
    exact = resolve_settings(CONFIGS_DIR / "methods" / "subspec_sd.yaml").engine
    assert (lossy.verify_method, exact.verify_method) == ("lossy", "exact")
    assert (lossy.max_depth, lossy.topk_len, lossy.method) == (exact.max_depth, exact.topk_len, "subspec_sd")
    classic = resolve_settings(CONFIGS_DIR / "methods" / "classic_sd_lossy.yaml").engine
    assert (classic.method, classic.verify_method, classic.topk_len) == ("classic_sd", "lossy", 16)


def test_precedence_preset_then_yaml_then_command_line(tmp_path):
    path = write(tmp_path, "max_depth: 10\ntopk_len: 3\nmax_new_tokens: 99\n")
    settings = resolve_settings(path, {"max_depth": 7, "method": "subspec_sd"})
    assert settings.engine.max_depth == 7  # command line beats YAML
    assert settings.engine.topk_len == 3  # YAML beats preset (6)
    assert settings.engine.draft_temperature == 0.2  # preset
    assert settings.sampling.max_new_tokens == 99


def test_yaml_method_picks_its_preset_and_command_line_method_wins(tmp_path):
    path = write(tmp_path, "method: classic_sd\n")
    assert resolve_settings(path).engine.topk_len == 16  # classic_sd preset
    overridden = resolve_settings(path, {"method": "subspec_sd"}).engine
    assert (overridden.method, overridden.topk_len) == ("subspec_sd", 6)


def test_defaults_without_config_are_the_subspec_preset():
    settings = resolve_settings()
    assert settings.engine.method == "subspec_sd"
    assert (settings.engine.max_depth, settings.engine.topk_len) == (32, 6)
    # best_first measured the higher tau at this budget (README, "Tree policies")
    assert (settings.engine.tree_policy, settings.engine.node_budget, settings.engine.draft_batch) == (
        "best_first", 192, 16)


def test_values_are_typed_and_converted(tmp_path):
    path = write(tmp_path, "vram_limit_gb: 8\ncompile_mode: none\nstop: ['###']\nllm_path: null\n")
    settings = resolve_settings(path)
    assert settings.engine.vram_limit_gb == 8.0 and isinstance(settings.engine.vram_limit_gb, float)
    assert settings.engine.compile_mode is None
    assert settings.sampling.stop == ["###"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("max_dept: 3\n", "unknown key 'max_dept' (did you mean 'max_depth'?)"),
        ("recipe: {class_path: x}\n", "unknown key 'recipe'"),
        ("max_depth: '3'\n", "key 'max_depth' must be an integer, got '3'"),
        ("max_depth: true\n", "key 'max_depth' must be an integer, got True"),
        ("do_sample: 1\n", "key 'do_sample' must be true/false, got 1"),
        ("verify_method: fuzzy\n", "key 'verify_method' must be one of 'exact', 'lossy', got 'fuzzy'"),
        ("max_depth: 0\n", "key 'max_depth' must be at least 1, got 0"),
        ("top_p: 1.5\n", "key 'top_p' must be at most 1, got 1.5"),
        ("min_draft_prob: 1\n", "key 'min_draft_prob' must be below 1, got 1"),
        ("min_draft_prob: -0.1\n", "key 'min_draft_prob' must be at least 0, got -0.1"),
        ("stop: [1, 2]\n", "key 'stop' must be a list of strings, got [1, 2]"),
        ("- max_depth\n", "the top level must be a mapping of keys, got list"),
        ("max_depth: [3\n", "not valid YAML at line 2, column 1"),
        ("extends: run.yaml\n", "'extends' loops back to itself"),
    ],
)
def test_bad_yaml_names_the_key_and_the_file(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        resolve_settings(path)
    message = str(err.value)
    assert expected in message
    assert str(path) in message
    assert "\n" not in message


def test_missing_file_and_bad_command_line_value(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        resolve_settings(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="command line: key 'topk_len' must be at least 1"):
        resolve_settings(None, {"topk_len": 0})


def test_extends_is_relative_to_the_file_and_checks_the_parent(tmp_path):
    (tmp_path / "sub").mkdir()
    write(tmp_path, "max_depth: 12\nwindow_size: 2\n", "base.yaml")
    child = write(tmp_path / "sub", "extends: ../base.yaml\nwindow_size: 5\n")
    engine = resolve_settings(child).engine
    assert (engine.max_depth, engine.window_size) == (12, 5)
    bad_parent = write(tmp_path, "tree_depth: 1\n", "bad.yaml")
    child = write(tmp_path, "extends: bad.yaml\n", "child.yaml")
    with pytest.raises(ConfigError, match=f"{bad_parent}: unknown key 'tree_depth'"):
        resolve_settings(child)


def test_no_setting_name_belongs_to_two_sections():
    """Flat YAML keys need every field name of EngineConfig, SamplingConfig and RunOptions to be unique."""
    import dataclasses

    from engine import EngineConfig, SamplingConfig
    from subspec_tui.settings import SCHEMA, RunOptions

    names = [f.name for cls in (EngineConfig, SamplingConfig, RunOptions) for f in dataclasses.fields(cls)]
    assert len(names) == len(set(names)) == len(SCHEMA)
