"""The GPU benchmark runs end to end on a CPU with a tiny shape, so it cannot rot unnoticed.

No timing is asserted (speed is reported by benchmarks, not tested); the structure of the JSON
and the subspec-vs-vanilla greedy agreement it records are."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_offload_benchmark_runs_on_cpu(tmp_path):
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "offload_gpu.py"), "--json", str(out),
                          "--tau", "every-tree=3", "--tau", "one-tree=5@wide16", "--floor-forwards", "2",
                          "--methods", "vanilla,subspec_sd,eagle_sd"],
                         cwd=ROOT, check=True, timeout=600, capture_output=True, text=True)
    # tok/s at a tau: for every tree (reference, profile, wide16, wide32, floor16), or only the tree it was measured for
    assert run.stdout.count("(every-tree)") == 5 and run.stdout.count("(one-tree)") == 1
    assert "with 2.0 draft forwards per verification (a real model's)" in run.stdout
    case = json.loads(out.read_text())["cases"][0]
    assert case["shape"] == "tiny" and "error" not in case
    assert case["vanilla"]["row_invariant"] is False  # float32: the engine's default
    subspec = case["subspec"]
    assert set(subspec["verify_ms"]) == {"1", "97", "193", "289"}
    assert subspec["greedy_match"] == "8/8"  # float32 on a CPU: subspec's tokens are vanilla's
    for tree in ("iteration_reference", "iteration_profile"):
        split = subspec[tree]
        assert split["draft_ms"] > 0 and split["verify_ms"] > 0
        assert split["iteration_ms"] >= split["draft_ms"] + split["verify_ms"] - 1e-6
    assert subspec["iteration_floor"]["min_draft_prob"] > 0 and subspec["iteration_floor"]["draft_batch"] == 16
    assert subspec["iteration_profile"]["min_draft_prob"] == 0  # comparable with runs before the floor
    for batch in ("16", "32"):  # best-first with wider draft forwards, same budget
        assert subspec["wide"][batch]["iteration"]["draft_batch"] == int(batch)
    assert set(subspec["draft_alone"]) == {"6", "16", "32"}  # the profile tree drafted alone, per width
    assert all(alone["draft_ms"] > 0 and alone["host_issue_ms"] > 0 for alone in subspec["draft_alone"].values())
    assert run.stdout.count("draft alone") == 3
    eagle = case["eagle"]  # a random head of the shape, resident; its tokens are vanilla's too
    assert eagle["greedy_match"] == "8/8"
    assert eagle["iteration_preset"]["nodes"] == 81 and eagle["iteration_best_first"]["draft_batch"] == 16
    assert all(eagle[tree]["draft_ms"] > 0 for tree in ("iteration_preset", "iteration_best_first"))


def _benchmark(name: str):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_a_tau_for_a_tree_the_run_does_not_have_is_refused(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["offload_gpu.py", "--tau", "x=3@wide61"])
    with pytest.raises(SystemExit) as exit_info:
        _benchmark("offload_gpu").main()
    assert exit_info.value.code == 2 and "no tree 'wide61' in this run" in capsys.readouterr().err


def test_int4_tile_sweep_says_it_needs_a_gpu_and_sweeps_divisors_of_k(monkeypatch):
    int4_tiles = _benchmark("int4_tiles")
    monkeypatch.setattr(sys, "argv", ["int4_tiles.py"])
    monkeypatch.setattr(int4_tiles.torch.cuda, "is_available", lambda: False)  # also on a GPU machine
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        int4_tiles.main()
    tiles = int4_tiles._sweep(4608, 28, 132)  # 7B q/k/v: 28 blocks of 128 inputs
    assert {split for _, split, _, _ in tiles} <= {1, 2, 4, 7, 14, 28}
    assert {block_n for block_n, _, _, _ in tiles} == {64, 128, 256}


def test_reference_weights_round_once_where_torch_would_round_twice():
    # The kernel's weights are compared bit for bit with these. 3 x 87 x 2^-10 lies halfway between
    # two bf16 numbers and the tiny offset breaks the tie upwards; float64 -> bf16 in torch goes
    # through float32, which drops the offset, and then rounds the tie to even: one step lower.
    int4_tiles = _benchmark("int4_tiles")
    q = torch.full((1, int4_tiles.GROUP), 3, dtype=torch.uint8)
    scale = torch.full((1, 1), 87 * 2.0**-10)
    zero = torch.full((1, 1), -(2.0**-40) / (87 * 2.0**-10))  # offset = -zero * scale: about 2^-40
    weights = int4_tiles._bf16_weights(q, scale, zero)
    assert weights.shape == (int4_tiles.GROUP, 1) and weights.dtype == torch.bfloat16
    assert torch.all(weights.double() == 262 * 2.0**-10)
    exact = 3 * 87 * 2.0**-10 + (-zero * scale).to(torch.bfloat16).double()
    assert exact.to(torch.bfloat16).double().item() == 260 * 2.0**-10  # torch's own cast: twice


def test_host_waits_counts_torchs_sync_warnings_by_engine_line():
    offload_gpu = _benchmark("offload_gpu")
    in_engine = compile("import warnings\nwarnings.warn('called a synchronizing CUDA operation')",
                        str(ROOT / "engine" / "tree.py"), "exec")  # as if tree.py line 2 synchronized
    with offload_gpu._host_waits() as sites:
        exec(in_engine)
        exec(in_engine)
        warnings.warn("called a synchronizing CUDA operation")  # from here: outside the engine
        warnings.warn("something else entirely")  # not a sync: not counted
    assert sites == {"tree.py:2": 2, "outside the engine": 1}


def test_tau_benchmark_runs_on_cpu_and_counts_identical_replies(tmp_path):
    # One MT-Bench prompt, the chain policy, bfloat16 with the row-invariant target: the reply must
    # be vanilla's (README "Greedy output and bfloat16").
    out = tmp_path / "tau.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "tau_bundled.py"), "--prompts", "1", "--new-tokens", "8",
                    "--policies", "chain", "--dtype", "bfloat16", "--row-invariant", "--json", str(out)],
                   cwd=ROOT, check=True, timeout=600, capture_output=True, text=True)
    result = json.loads(out.read_text())
    assert (result["prompts"], result["row_invariant"], result["dtype"]) == (1, True, "bfloat16")
    (row,) = result["policies"].values()
    assert row["identical_to_vanilla"] == 1 and row["tau"] > 1
    assert row["nodes_per_verification"] >= 1


def test_int4_limits_says_it_needs_a_gpu_and_its_edits_still_fit_the_kernel(monkeypatch, tmp_path):
    # Its ablations are copies of the engine's kernel with lines replaced: a kernel that no longer
    # has those lines must fail here, not on the next GPU run.
    int4_limits = _benchmark("int4_limits")
    monkeypatch.setattr(sys, "argv", ["int4_limits.py"])
    monkeypatch.setattr(int4_limits.torch.cuda, "is_available", lambda: False)  # also on a GPU machine
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        int4_limits.main()
    from engine.int4_kernel import _int4_matmul

    for parts in int4_limits.LEFT_OUT.values():
        source = int4_limits.ablated_source(parts)
        for part in parts:
            line, replacement = int4_limits.EDITS[part]
            assert line not in source and replacement in source
    kernel = int4_limits.ablated_kernel(int4_limits.LEFT_OUT["weight stream only"], tmp_path)
    assert kernel.arg_names == _int4_matmul.arg_names  # launched in its place with the same arguments
    monkeypatch.setitem(int4_limits.EDITS, "scales", ("no such line\n", ""))
    with pytest.raises(RuntimeError, match="re-fit the 'scales' edit"):
        int4_limits.ablated_source(("scales",))


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the script measures an 8B shape: minutes")
def test_the_product_walk_runs_on_cpu_through_every_entry_point(tmp_path):
    """benchmarks/product_gpu.py on the tiny shape: a checkpoint on disk, profile, run-test (new
    processes), run-api with the openai client, subspec-chat, the same plan in memory."""
    out = tmp_path / "product.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "product_gpu.py"), "--out", str(tmp_path / "work"),
                    "--new-tokens", "8", "--long-prompt-tokens", "200", "--json", str(out)],
                   cwd=ROOT, check=True, timeout=900, capture_output=True, text=True)
    report = json.loads(out.read_text())
    assert report["shape"] == "tiny" and not report["profile"]["reused"]
    runs = report["run_test"]
    assert set(runs) == {"vanilla/short", "vanilla/long", "subspec_sd/short", "subspec_sd/long"}
    for name, run in runs.items():
        assert run["plan"]["source"] == "profile" and run["plan"]["profile_path"], name
        assert run["plan"]["method"] == name.split("/")[0]
    assert runs["vanilla/long"]["prompt_tokens"] >= 200 > runs["vanilla/short"]["prompt_tokens"]
    assert report["api"]["plan"]["source"] == "profile" and report["api"]["first"]["chunks"] > 0
    turns = report["conversation"]["turns"]
    assert len(turns) == 4 and turns[0]["reused_tokens"] == 0
    assert all(later["reused_tokens"] >= earlier["prompt_tokens"] for earlier, later in zip(turns, turns[1:]))
    assert report["app"]["reply"] and report["app"]["plan_source"] == "profile" and report["app"]["profile_reused"]
    assert set(report["in_memory"]) == {"vanilla", "subspec_sd"}


def test_prefill_benchmark_runs_on_cpu(tmp_path):
    out = tmp_path / "prefill.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "prefill_gpu.py"), "--json", str(out), "--repeats", "1",
                    "--tokens", "40,70", "--placements", "offloaded,resident"],
                   cwd=ROOT, check=True, timeout=600, capture_output=True, text=True)
    report = json.loads(out.read_text())
    assert report["shape"] == "tiny" and (report["layers_on_gpu"], report["stream_buffers"]) == (2, 2)
    cases = {(c["row_invariant"], c["placement"], c["tokens"]) for c in report["cases"]}
    assert cases == {(r, p, t) for r in (True, False) for p in ("offloaded", "resident") for t in (40, 70)}
    assert all(c["prefill_ms"] > 0 and c["first_prefill_ms"] > 0 for c in report["cases"])
    assert all("kernels" in c for c in report["cases"] if c["placement"] == "resident" and c["tokens"] == 70)


def test_accelerate_benchmark_runs_on_cpu(tmp_path):
    # The tiny shape without offloading (accelerate's CPU offload needs a GPU to move modules to):
    # both sides decode the same random weights greedily, so in float32 their tokens agree.
    out = tmp_path / "accelerate.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "accelerate_gpu.py"), "--json", str(out)],
                   cwd=ROOT, check=True, timeout=600, capture_output=True, text=True)
    report = json.loads(out.read_text())
    assert report["shape"] == "tiny" and report["accelerate"]["modules_on_cpu"] == []
    assert report["engine_vanilla"]["ms_per_token"] > 0 and report["accelerate"]["ms_per_token"] > 0
    assert report["same_first_tokens"] == len(report["engine_vanilla"]["greedy_tokens"]) == 2


def test_compress_benchmark_runs_on_cpu(tmp_path):
    # A small layer through the encoder and the reference decoder (bit-exactness is asserted inside).
    out = tmp_path / "compress.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compress_gpu.py"), "--json", str(out)],
                   cwd=ROOT, check=True, timeout=600, capture_output=True, text=True)
    report = json.loads(out.read_text())
    assert [c["weights"] for c in report["cases"]] == ["gaussian", "student-t"]
    assert all(0.6 < c["ratio"] < 0.75 and c["max_code_bits"] <= 12 for c in report["cases"])


@pytest.mark.slow
def test_an_eagle_head_trained_by_the_script_drafts_losslessly(tmp_path, bundled_engine):
    # Two replies, one epoch: the script end to end, and its head in the authors' format loads.
    from engine import EngineConfig, SamplingConfig, load_engine

    head = tmp_path / "head"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_eagle.py"), "--prompts", "2", "--new-tokens", "8",
                    "--epochs", "1", "--out", str(head)], cwd=ROOT, check=True, timeout=600, capture_output=True, text=True)
    eagle = load_engine(EngineConfig(method="eagle_sd", draft_model_path=str(head), max_depth=4, topk_len=2))
    vanilla = bundled_engine("vanilla")
    prompt = vanilla.chat_ids([{"role": "user", "content": "Name three colours."}])
    sampling = SamplingConfig(max_new_tokens=16)
    assert eagle.generate(prompt, sampling).token_ids == vanilla.generate(prompt, sampling).token_ids
