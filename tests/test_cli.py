"""The `subspec` CLI with a stand-in engine: contract output, settings wiring, clear errors, nsys."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from headless_fakes import REPLY, FakeEngine, use_fake_profiles

from engine import EngineConfig, EngineError
from subspec_tui import cli

CONTRACT_STATS = {"new_tokens", "tok_per_s", "tau", "iterations", "draft_ms", "verify_ms", "transfer_ms",
                  "stream_bound_ms", "peak_gpu_bytes", "lossy"}


@pytest.fixture
def engines(monkeypatch, tmp_path):
    """Every engine the CLI loads, in order (the config it was loaded with is `engine.config`)."""
    use_fake_profiles(monkeypatch, tmp_path)
    loaded: list[FakeEngine] = []

    def fake_load(config: EngineConfig, progress=None):
        progress("loading the fake engine")
        loaded.append(FakeEngine(config))
        return loaded[-1]

    monkeypatch.setattr(cli, "load_engine", fake_load)
    return loaded


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_run_test_json_prints_exactly_the_contract_object(engines, capsys):
    code, out, err = run(capsys, "--method", "vanilla", "run-test", "--prompt", "Capital of France?", "--json")
    assert code == 0
    result = json.loads(out)  # the whole of stdout is one JSON document
    assert set(result) == {"method", "model", "text", "token_ids", "stats", "plan", "timings"}
    assert result["plan"]["source"] == "profile" and set(result["timings"]) == {"plan_s", "load_s", "generate_s"}
    assert (result["method"], result["model"], result["text"]) == ("vanilla", FakeEngine.model_name, REPLY)
    assert result["token_ids"] == [ord(c) for c in REPLY]
    assert CONTRACT_STATS <= set(result["stats"])
    assert result["stats"]["new_tokens"] == len(REPLY)
    assert result["stats"]["tau"] == pytest.approx(len(REPLY) / 16)  # 16 iterations of <= 3 characters
    assert result["stats"]["transfer_ms"] is None
    assert engines[0].prompts == ["<user>Capital of France?<assistant>"]
    assert engines[0].closed
    assert "loading the fake engine" in err  # progress goes to stderr, never stdout


def test_run_test_streams_text_and_reports_stats_on_stderr(engines, capsys):
    code, out, err = run(capsys, "--verify-method", "lossy", "run-test", "--max-new-tokens", "9")
    assert code == 0
    assert out == REPLY[:9] + "\n"
    assert "subspec_sd (lossy): 9 tokens" in err
    assert "transfer -" in err
    assert engines[0].samplings[0].max_new_tokens == 9


def test_global_options_reach_the_engine_config(engines, capsys, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("method: classic_sd\ntopk_len: 4\nseed: 3\n")
    code, _, _ = run(
        capsys, "--config", str(config), "--max-depth", "5", "--vram-limit-gb", "8", "--nvtx-profiling",
        "--tree-policy", "best_first", "--node-budget", "40", "--min-draft-prob", "0.001", "--do-sample", "--temperature", "0.7",
        "--llm-path", "some/model", "--draft-model-path", "some/draft", "--device", "cpu", "--keep-first-n-layers-on-gpu", "3",
        "--dtype", "bfloat16", "--row-invariant", "run-test", "--json",
    )
    assert code == 0
    cfg = engines[0].config
    assert (cfg.method, cfg.max_depth, cfg.topk_len, cfg.vram_limit_gb) == ("classic_sd", 5, 4, 8.0)
    assert (cfg.tree_policy, cfg.node_budget, cfg.nvtx_profiling, cfg.row_invariant) == ("best_first", 40, True, True)
    assert cfg.min_draft_prob == 0.001
    assert (cfg.llm_path, cfg.device, cfg.keep_first_n_layers_on_gpu, cfg.dtype) == ("some/model", "cpu", 3, "bfloat16")
    sampling = engines[0].samplings[0]
    assert (sampling.do_sample, sampling.temperature, sampling.seed) == (True, 0.7, 3)


def test_the_row_invariant_target_is_left_to_the_engine_unless_asked(engines, capsys, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("row_invariant: false\n")
    for args, asked in (((), None), (("--no-row-invariant",), False), (("--config", str(config)), False),
                        (("--config", str(config), "--row-invariant"), True)):
        code, _, _ = run(capsys, *args, "run-test", "--json")
        assert code == 0 and engines[-1].config.row_invariant is asked, args


def test_warmup_iterations_run_before_the_measured_generation(engines, capsys):
    code, _, _ = run(capsys, "--warmup-iter", "2", "run-test", "--prompt", "hi", "--json")
    assert code == 0
    assert len(engines[0].prompts) == 3
    assert engines[0].prompts[-1] == "<user>hi<assistant>"


def test_engine_error_is_one_line_and_exit_1(monkeypatch, capsys, tmp_path):
    use_fake_profiles(monkeypatch, tmp_path)

    def failing_load(config, progress=None):
        raise EngineError("model path /nope does not exist")

    monkeypatch.setattr(cli, "load_engine", failing_load)
    code, out, err = run(capsys, "--llm-path", "/nope", "run-test", "--json")
    assert (code, out) == (1, "")
    assert err.splitlines()[-1] == "subspec: error: model path /nope does not exist"
    assert "Traceback" not in err


def test_bad_yaml_is_one_line_and_exit_1(engines, capsys, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("max_depht: 3\n")
    code, out, err = run(capsys, "--config", str(config), "run-test")
    assert (code, out, engines) == (1, "", [])
    assert err.count("\n") == 1
    assert f"{config}: unknown key 'max_depht'" in err


@pytest.mark.parametrize(
    "argv",
    [
        ["--max-depth", "0", "run-test"],
        ["--method", "magic", "run-test"],
        ["--temperature", "warm", "run-test"],
        ["run-test", "--max-new-tokens", "-5"],
        ["fly"],
        [],
        ["run-benchmark"],  # --benchmarks is required
        ["run-api", "--port", "99999"],  # refused while parsing, before a model loads
        ["run-gradio", "--port", "0"],
    ],
)
def test_usage_errors_exit_2(engines, capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    _, err = capsys.readouterr()
    assert "error:" in err and "Traceback" not in err
    assert engines == []


def test_run_api_binds_loopback_by_default():
    args = cli.build_parser().parse_args(["run-api"])
    assert (args.host, args.port) == ("127.0.0.1", 8000)


def test_a_port_in_use_is_found_before_the_model_loads(engines, capsys):
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        code, out, err = run(capsys, "run-api", "--port", str(taken.getsockname()[1]))
    finally:
        taken.close()
    assert (code, out, engines) == (1, "", [])
    assert err.startswith("subspec: error: cannot listen on 127.0.0.1:") and err.count("\n") == 1


def test_nsys_output_without_nsys_is_a_clear_error(engines, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no nsys
    monkeypatch.delenv(cli.NSYS_CHILD_ENV, raising=False)
    code, out, err = run(capsys, "--nsys-output", "trace", "run-test")
    assert (code, out, engines) == (1, "", [])
    assert err == "subspec: error: --nsys-output needs NVIDIA Nsight Systems, but `nsys` is not on PATH\n"


def test_nsys_output_reruns_the_command_under_nsys(engines, capsys, monkeypatch, tmp_path):
    record = tmp_path / "nsys-args.json"
    fake_nsys = tmp_path / "nsys"
    fake_nsys.write_text(
        "#!/usr/bin/env python3\nimport json, os, sys\n"
        f"json.dump({{'argv': sys.argv[1:], 'child': os.environ.get('{cli.NSYS_CHILD_ENV}')}}, open({str(record)!r}, 'w'))\n"
        "sys.exit(7)\n"
    )
    fake_nsys.chmod(fake_nsys.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv(cli.NSYS_CHILD_ENV, raising=False)
    code, _, _ = run(capsys, "--nsys-output", "out/trace", "--max-depth", "4", "run-test", "--json")
    assert code == 7  # the profiled child's status
    seen = json.loads(record.read_text())
    assert seen["child"] == "1"
    argv = seen["argv"]
    assert argv[:1] == ["profile"] and argv[argv.index("-o") + 1] == "out/trace"
    python_at = argv.index(sys.executable)
    assert argv[python_at:] == [sys.executable, "-m", "subspec_tui.cli", "--nvtx-profiling",
                                "--nsys-output", "out/trace", "--max-depth", "4", "run-test", "--json"]
    assert engines == []  # nothing loaded in the parent


def test_inside_nsys_the_command_runs_normally(engines, capsys, monkeypatch):
    monkeypatch.setenv(cli.NSYS_CHILD_ENV, "1")
    code, out, _ = run(capsys, "--nvtx-profiling", "--nsys-output", "trace", "run-test", "--json")
    assert code == 0 and json.loads(out)["text"] == REPLY
    assert engines[0].config.nvtx_profiling is True


def test_console_script_reports_bad_config_without_traceback(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("max_depth: [3\n")
    result = subprocess.run(
        [sys.executable, "-m", "subspec_tui.cli", "--config", str(config), "run-test"],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=120,
    )
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        f"subspec: error: {config}: not valid YAML at line 2, column 1: expected ',' or ']', but got '<stream end>'"
    ]


def test_models_commands_report_missing_models_in_one_line(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    code, out, err = run(capsys, "models", "rm", "nobody/nothing")
    assert (code, out) == (1, "")
    assert err.startswith("subspec: error: model 'nobody/nothing' is not in the hub cache") and err.count("\n") == 1
    code, out, err = run(capsys, "models", "show", "nobody/nothing", "--json")
    assert (code, out) == (1, "")
    assert "model 'nobody/nothing' is not on this machine" in err


def test_models_list_json_is_a_list_of_models(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    from subspec_tui import models

    code, out, _ = run(capsys, "models", "list", "--json")
    assert code == 0
    listed = json.loads(out)
    assert [m["repo_id"] for m in listed] == [m.repo_id for m in models.list_models()]


class StoredProfile:
    messages = ["no CUDA GPU: --vram-limit-gb does not apply, profiling the CPU"]

    def as_dict(self) -> dict:
        return {"model": "bundled", "plan": {"method": "vanilla"}}


def test_profile_command_passes_model_cap_method_and_force(capsys, monkeypatch):
    import profiles

    calls = []

    def fake_run_profile(model, vram_limit_gb, method, progress, force, max_context, draft_model_path):
        calls.append((model, vram_limit_gb, method, force, max_context))
        return StoredProfile()

    monkeypatch.setattr(profiles, "run_profile", fake_run_profile)
    monkeypatch.setattr(cli, "_has_gpu", lambda: True)
    monkeypatch.setattr(profiles, "format_profile", lambda p: f"Model: {p.as_dict()['model']}")
    code, out, _ = run(capsys, "--method", "vanilla", "--llm-path", "org/model", "profile", "--vram-limit-gb", "8",
                       "--force", "--json")
    assert (code, json.loads(out)) == (0, StoredProfile().as_dict())
    code, out, err = run(capsys, "--max-length", "1024", "profile", "--model", "other/model")
    assert (code, out) == (0, "Model: bundled\n")
    # No --method / --max-length: the profile chooses (None), as every front end lets it.
    assert calls == [("org/model", 8.0, "vanilla", True, None), ("other/model", None, None, False, 1024)]


def test_profile_for_a_card_on_a_cpu_only_machine_is_the_config_only_estimate(capsys, monkeypatch, tmp_path):
    import profiles

    monkeypatch.setattr(profiles, "run_profile", lambda *a, **k: pytest.fail("nothing is measured or downloaded"))
    monkeypatch.setattr(cli, "_has_gpu", lambda: False)
    folder = tmp_path / "qwen-7b-shape"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
        "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064, "tie_word_embeddings": False}))
    code, out, err = run(capsys, "profile", "--model", str(folder), "--vram-limit-gb", "8", "--json")
    result = json.loads(out)
    assert code == 0 and result["source"] == "estimate" and "no CUDA GPU here" in result["note"]
    assert result["plan"]["fits"] and result["plan"]["layers_total"] == 28 and result["plan"]["vram_bytes"] == 8 * 2**30
    code, out, err = run(capsys, "profile", "--model", str(folder), "--vram-limit-gb", "8")
    assert code == 0 and "of 28 layers on GPU" in out and "no CUDA GPU here" in err


def test_profile_errors_are_one_line(capsys, monkeypatch):
    import profiles

    def failing(*args, **kwargs):
        raise profiles.ProfileError("model 'x/y' is not on this machine")

    monkeypatch.setattr(profiles, "run_profile", failing)
    code, out, err = run(capsys, "profile", "--model", "x/y")
    assert (code, out, err) == (1, "", "subspec: error: model 'x/y' is not on this machine\n")
