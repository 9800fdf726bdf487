"""`subspec run-benchmark`: shipped and hub prompts, seeded selection, result files, speed-ups."""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub.constants
import pytest
from headless_fakes import REPLY, FakeEngine, use_fake_profiles

from engine import EngineConfig
from subspec_tui import benchmark, cli
from subspec_tui.benchmark import BenchmarkError, load_samples

DATA = Path(benchmark.__file__).parent / "data"


def first_records(name: str) -> list[dict]:
    with (DATA / name).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture
def engines(monkeypatch, tmp_path):
    use_fake_profiles(monkeypatch, tmp_path)
    loaded: list[FakeEngine] = []

    def fake_load(config: EngineConfig, progress=None):
        loaded.append(FakeEngine(config, max_length=4000))
        return loaded[-1]

    monkeypatch.setattr(cli, "load_engine", fake_load)
    return loaded


def test_shipped_benchmarks_use_the_documented_field():
    mt_bench = first_records("mt_bench_questions.jsonl")
    humaneval = first_records("humaneval_problems.jsonl")
    gsm8k = first_records("gsm8k_test.jsonl")
    assert (len(mt_bench), len(humaneval), len(gsm8k)) == (80, 164, 1319)
    for sample in load_samples("mt-bench", 5, seed=0):
        assert sample.prompt == mt_bench[sample.index]["turns"][0]
    for sample in load_samples("human-eval", 5, seed=0):
        assert sample.prompt == humaneval[sample.index]["prompt"]
    for sample in load_samples("gsm8k", 5, seed=0):
        assert sample.prompt == gsm8k[sample.index]["question"]


def test_selection_is_seeded():
    first = [s.index for s in load_samples("gsm8k", 10, seed=1)]
    assert first == [s.index for s in load_samples("gsm8k", 10, seed=1)]
    assert first != [s.index for s in load_samples("gsm8k", 10, seed=2)]
    assert len(set(first)) == 10
    assert sorted(s.index for s in load_samples("mt-bench", None, seed=0)) == list(range(80))


def test_the_shipped_data_carries_its_attribution():
    readme = (DATA / "README.md").read_text()
    for source in ("lm-sys/FastChat", "openai/human-eval", "openai/grade-school-math", "Apache-2.0", "MIT"):
        assert source in readme


def test_hub_benchmark_offline_is_a_clear_one_line_error(engines, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    code = cli.main(["run-benchmark", "--benchmarks", "mt-bench,alpaca", "--max-samples", "2", "--out", str(tmp_path)])
    out, err = capsys.readouterr()
    assert (code, out) == (1, "")
    assert err == (
        "subspec: error: benchmark 'alpaca' needs the dataset tatsu-lab/alpaca from the Hugging Face hub, "
        "which cannot be reached and is not in the local cache; shipped offline: mt-bench, human-eval, gsm8k\n"
    )
    assert engines == []  # prompts are checked before a model is loaded
    assert list(tmp_path.glob("*_*")) == []


def test_hub_benchmark_reads_the_downloaded_files(monkeypatch, tmp_path):
    """What a reachable hub (or its cache) delivers is read through the benchmark's patterns."""
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    (snapshot / "test.jsonl").write_text("\n".join(json.dumps({"problem": f"Solve {i}"}) for i in range(4)))
    (snapshot / "gpqa_diamond.csv").write_text('Question,Correct Answer\n"What is 2+2, really?",4\n')
    asked: list[tuple] = []

    def fake_snapshot_download(repo_id, repo_type, allow_patterns):
        asked.append((repo_id, repo_type, allow_patterns))
        return str(snapshot)

    monkeypatch.setattr(benchmark, "snapshot_download", fake_snapshot_download)
    assert sorted(s.prompt for s in load_samples("math-500", None, 0)) == [f"Solve {i}" for i in range(4)]
    assert [s.prompt for s in load_samples("gpqa", None, 0)] == ["What is 2+2, really?"]
    assert asked == [("HuggingFaceH4/MATH-500", "dataset", ["test.jsonl"]),
                     ("Idavidrein/gpqa", "dataset", ["gpqa_diamond.csv"])]
    with pytest.raises(BenchmarkError, match="no file matching data/train-\\*.parquet"):
        load_samples("alpaca", 2, 0)


def test_unknown_benchmark_is_a_clear_error(engines, capsys, tmp_path):
    code = cli.main(["run-benchmark", "--benchmarks", "mt-bench,mmlu", "--out", str(tmp_path)])
    _, err = capsys.readouterr()
    assert code == 1
    assert err.startswith("subspec: error: unknown benchmark 'mmlu' (choose from mt-bench, human-eval, gsm8k,")


def run_bench(capsys, tmp_path: Path, *options: str, max_new_tokens: int | None = None) -> tuple[Path, dict, str]:
    limit = [] if max_new_tokens is None else ["--max-new-tokens", str(max_new_tokens)]
    code = cli.main([*options, "run-benchmark", "--benchmarks", "mt-bench,gsm8k", "--max-samples", "3",
                     "--out", str(tmp_path / "results"), *limit])
    out, _ = capsys.readouterr()
    assert code == 0
    run_dir = Path(out.strip().splitlines()[-1].removeprefix("results: "))
    return run_dir, json.loads((run_dir / "summary.json").read_text()), out


def test_benchmark_run_writes_samples_summary_and_table(engines, capsys, tmp_path):
    run_dir, summary, out = run_bench(capsys, tmp_path, "--warmup-iter", "2", max_new_tokens=12)
    assert run_dir.parent == tmp_path / "results" and run_dir.name.endswith("_subspec_sd")
    records = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert [r["benchmark"] for r in records] == ["mt-bench"] * 3 + ["gsm8k"] * 3
    assert [r["index"] for r in records[:3]] == [s.index for s in load_samples("mt-bench", 3, 0)]
    assert all(r["text"] == REPLY[:12] and r["stats"]["new_tokens"] == 12 for r in records)
    assert "iterations" not in records[0]
    assert len(engines[0].prompts) == 2 + 6  # warm-up first
    assert engines[0].prompts[0] == f"<user>{benchmark.WARMUP_PROMPT}<assistant>"
    figures = summary["benchmarks"]["gsm8k"]
    expected_tok_s = sum(r["stats"]["tok_per_s"] for r in records[3:]) / 3
    assert figures["tok_per_s"] == pytest.approx(expected_tok_s)
    assert (figures["samples"], figures["skipped"], figures["new_tokens"]) == (3, 0, 36)
    assert (figures["tau"], figures["draft_ms"], figures["verify_ms"]) == (3.0, 1.5, 4.0)
    assert (figures["transfer_ms"], figures["peak_gpu_bytes"], figures["speedup_vs_vanilla"]) == (None, None, None)
    assert summary["method"] == "subspec_sd" and summary["model"] == FakeEngine.model_name
    table = out.splitlines()
    assert table[0].split() == ["benchmark", "method", "n", "tok/s", "tau", "draft", "ms", "verify", "ms",
                                "transfer", "ms", "peak", "GiB", "vs", "vanilla"]
    assert table[2].split()[:5] == ["mt-bench", "subspec_sd", "3", f"{summary['benchmarks']['mt-bench']['tok_per_s']:.2f}", "3.00"]


def test_runs_never_overwrite_and_speedup_uses_the_vanilla_run(engines, capsys, tmp_path):
    vanilla_dir, vanilla, _ = run_bench(capsys, tmp_path, "--method", "vanilla")
    spec_dir, spec, out = run_bench(capsys, tmp_path, "--verify-method", "lossy")
    again_dir, _, _ = run_bench(capsys, tmp_path, "--verify-method", "lossy")
    assert len({vanilla_dir, spec_dir, again_dir}) == 3
    assert (vanilla_dir / "samples.jsonl").exists() and (spec_dir / "samples.jsonl").exists()
    for name in ("mt-bench", "gsm8k"):
        ratio = spec["benchmarks"][name]["tok_per_s"] / vanilla["benchmarks"][name]["tok_per_s"]
        assert spec["benchmarks"][name]["speedup_vs_vanilla"] == pytest.approx(ratio)
    assert spec["vanilla_baseline"] == str(vanilla_dir)
    assert spec["lossy"] is True and "subspec_sd (lossy)" in out
    assert f"{spec['benchmarks']['gsm8k']['speedup_vs_vanilla']:.2f}x" in out


def test_detailed_analysis_writes_every_iteration(engines, capsys, tmp_path):
    run_dir, summary, _ = run_bench(capsys, tmp_path, "--detailed-analysis", max_new_tokens=7)
    record = json.loads((run_dir / "samples.jsonl").read_text().splitlines()[0])
    assert [it["emitted"] for it in record["iterations"]] == [3, 3, 1]
    assert all(it["draft_ms"] == 1.5 and it["tree_nodes"] == 7 for it in record["iterations"])
    # per sample: two verifications accepted 2 draft tokens, one accepted none
    assert summary["benchmarks"]["gsm8k"]["acceptance_by_depth"] == [pytest.approx(2 / 3)] * 2


def test_acceptance_by_depth_is_empty_without_detailed_analysis(engines, capsys, tmp_path):
    _, summary, _ = run_bench(capsys, tmp_path)
    assert summary["benchmarks"]["mt-bench"]["acceptance_by_depth"] == []


def test_prompts_that_do_not_fit_are_recorded_as_skipped(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(cli, "load_engine", lambda config, progress=None: FakeEngine(config, max_length=60))
    run_dir, summary, _ = run_bench(capsys, tmp_path)
    records = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    skipped = [r for r in records if "skipped" in r]
    assert skipped and all("does not fit max_length 60" in r["skipped"] for r in skipped)
    total = summary["benchmarks"]["mt-bench"]["skipped"] + summary["benchmarks"]["gsm8k"]["skipped"]
    assert total == len(skipped)
