"""`subspec run-benchmark`: speed figures (DESIGN.md section 5) over benchmark prompts.

mt-bench, human-eval and gsm8k ship with the package (subspec_tui/data, see its README for
attribution); the other benchmarks come from dataset repositories on the Hugging Face hub through
`huggingface_hub` (its cache, so they work offline once fetched). Each run writes, under a new
timestamped folder that never overwrites an older one:
  samples.jsonl  one record per prompt (text, stats, and per-iteration records with --detailed-analysis)
  summary.json   per-benchmark means, plus the speed-up over the newest vanilla run of the same
                 model found next to it (same --out)
"""

from __future__ import annotations

import csv
import dataclasses
import json
import random
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from huggingface_hub import snapshot_download
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
from tqdm import tqdm

from engine import EngineError, SamplingConfig
from subspec_tui.settings import Settings

if TYPE_CHECKING:
    from engine import Engine, IterationStats

DATA_DIR = Path(__file__).resolve().parent / "data"
WARMUP_PROMPT = "Write an essay about large language models."
SUMMARY_FILE = "summary.json"
SAMPLES_FILE = "samples.jsonl"
GIB = 1024**3


class BenchmarkError(Exception):
    """A benchmark that cannot be loaded or run: one line for the user."""


Record = dict[str, Any]


@dataclass(frozen=True)
class ShippedSource:
    """A file under subspec_tui/data."""

    file: str
    prompt: Callable[[Record], str]


@dataclass(frozen=True)
class HubSource:
    """A dataset repository on the hub: the files matching `patterns` hold the records."""

    repo_id: str
    patterns: tuple[str, ...]
    prompt: Callable[[Record], str]


def _alpaca_prompt(r: Record) -> str:
    return f"{r['instruction']}\n\n{r['input']}" if r.get("input") else r["instruction"]


BENCHMARKS: dict[str, ShippedSource | HubSource] = {
    "mt-bench": ShippedSource("mt_bench_questions.jsonl", lambda r: r["turns"][0]),
    "human-eval": ShippedSource("humaneval_problems.jsonl", lambda r: r["prompt"]),
    "gsm8k": ShippedSource("gsm8k_test.jsonl", lambda r: r["question"]),
    "alpaca": HubSource("tatsu-lab/alpaca", ("data/train-*.parquet",), _alpaca_prompt),
    "cnn-dm": HubSource(
        "abisee/cnn_dailymail",
        ("3.0.0/test-*.parquet",),
        lambda r: f"Summarize the following article.\n\n{r['article']}",
    ),
    "aime": HubSource("HuggingFaceH4/aime_2024", ("data/train-*.parquet",), lambda r: r["problem"]),
    "gpqa": HubSource("Idavidrein/gpqa", ("gpqa_diamond.csv",), lambda r: r["Question"]),
    "math-500": HubSource("HuggingFaceH4/MATH-500", ("test.jsonl",), lambda r: r["problem"]),
    "livecodebench": HubSource(
        "livecodebench/code_generation_lite", ("test.jsonl",), lambda r: r["question_content"]
    ),
}


@dataclass(frozen=True)
class Sample:
    benchmark: str
    index: int  # position in the benchmark's file(s)
    prompt: str


def parse_benchmark_names(text: str) -> list[str]:
    """`mt-bench,gsm8k` -> names, each checked against BENCHMARKS."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise BenchmarkError("no benchmark named (e.g. --benchmarks mt-bench,gsm8k)")
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise BenchmarkError(f"unknown benchmark '{unknown[0]}' (choose from {', '.join(BENCHMARKS)})")
    return names


def _read_records(path: Path) -> list[Record]:
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    if path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, list) else [data]
    if path.suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f))
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise BenchmarkError(
                f"{path.name} is a parquet file: install pyarrow (pip install 'subspec-chat[bench]')"
            ) from None
        return pq.read_table(path).to_pylist()
    raise BenchmarkError(f"cannot read benchmark file {path} (expected .jsonl, .json, .csv or .parquet)")


def _hub_records(name: str, source: HubSource) -> list[Record]:
    try:
        folder = Path(snapshot_download(source.repo_id, repo_type="dataset", allow_patterns=list(source.patterns)))
    except LocalEntryNotFoundError:
        raise BenchmarkError(
            f"benchmark '{name}' needs the dataset {source.repo_id} from the Hugging Face hub, which cannot "
            f"be reached and is not in the local cache; shipped offline: "
            + ", ".join(n for n, s in BENCHMARKS.items() if isinstance(s, ShippedSource))
        ) from None
    except (HfHubHTTPError, OSError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BenchmarkError(f"benchmark '{name}': cannot fetch {source.repo_id} from the hub: {first_line}") from None
    files = sorted(p for pattern in source.patterns for p in folder.glob(pattern) if p.is_file())
    if not files:
        raise BenchmarkError(
            f"benchmark '{name}': {source.repo_id} has no file matching {', '.join(source.patterns)}"
        )
    return [record for path in files for record in _read_records(path)]


def load_samples(name: str, max_samples: int | None, seed: int) -> list[Sample]:
    """A seeded random selection of `max_samples` prompts (all of them when None)."""
    source = BENCHMARKS[name]
    records = _read_records(DATA_DIR / source.file) if isinstance(source, ShippedSource) else _hub_records(name, source)
    try:
        prompts = [source.prompt(r) for r in records]
    except (KeyError, TypeError, IndexError) as err:
        raise BenchmarkError(f"benchmark '{name}': unexpected record layout (missing {err})") from None
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    chosen = order if max_samples is None else order[:max_samples]
    return [Sample(name, i, prompts[i]) for i in chosen]


def _mean(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def acceptance_by_depth(records: list[Record]) -> list[float]:
    """Item d: the share of verifications that accepted at least d + 1 draft tokens (from
    --detailed-analysis records; each iteration emits its accepted tokens plus the bonus one)."""
    accepted = [it["emitted"] - 1 for r in records for it in r.get("iterations", [])]
    if not accepted:
        return []
    return [sum(a >= depth for a in accepted) / len(accepted) for depth in range(1, max(accepted) + 1)]


def summarize(records: list[Record]) -> dict[str, Any]:
    """Means of the section 5 metrics over the samples that generated."""
    done = [r["stats"] for r in records if "stats" in r]
    peaks = [s["peak_gpu_bytes"] for s in done if s.get("peak_gpu_bytes") is not None]
    return {
        "acceptance_by_depth": acceptance_by_depth(records),
        "samples": len(done),
        "skipped": len(records) - len(done),
        "new_tokens": sum(s["new_tokens"] for s in done),
        "tok_per_s": _mean(s["tok_per_s"] for s in done),
        "tau": _mean(s["tau"] for s in done),
        "draft_ms": _mean(s["draft_ms"] for s in done),
        "verify_ms": _mean(s["verify_ms"] for s in done),
        "transfer_ms": _mean(s["transfer_ms"] for s in done),
        "stream_bound_ms": _mean(s["stream_bound_ms"] for s in done),
        "peak_gpu_bytes": max(peaks) if peaks else None,
    }


def new_run_dir(out_root: Path, method: str) -> Path:
    """out_root/<timestamp>_<method>[-n]: a fresh folder, never an existing one."""
    out_root.mkdir(parents=True, exist_ok=True)
    stem = f"{datetime.now():%Y%m%d-%H%M%S}_{method}"
    for attempt in range(1000):
        path = out_root / (stem if attempt == 0 else f"{stem}-{attempt}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise BenchmarkError(f"cannot create a new result folder under {out_root}")


def _vanilla_baseline(out_root: Path, model: str, exclude: Path) -> dict[str, Any] | None:
    """The newest vanilla run of `model` under out_root (its summary), if any."""
    found: list[tuple[str, dict[str, Any]]] = []
    for path in out_root.glob(f"*/{SUMMARY_FILE}"):
        if path.parent == exclude:
            continue
        try:
            summary = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue  # a foreign or half-written file is not a baseline
        if isinstance(summary, dict) and summary.get("method") == "vanilla" and summary.get("model") == model:
            found.append((str(summary.get("created", "")), summary))
    return max(found, key=lambda item: item[0])[1] if found else None


def _add_speedups(summary: dict[str, Any], baseline: dict[str, Any] | None) -> None:
    for name, figures in summary["benchmarks"].items():
        base = (baseline or {}).get("benchmarks", {}).get(name, {}).get("tok_per_s")
        ours = figures["tok_per_s"]
        figures["speedup_vs_vanilla"] = ours / base if base and ours is not None else None
    summary["vanilla_baseline"] = baseline.get("run_dir") if baseline else None


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(summary: dict[str, Any]) -> str:
    label = summary["method"] + (" (lossy)" if summary["lossy"] else "")
    header = ("benchmark", "method", "n", "tok/s", "tau", "draft ms", "verify ms", "transfer ms", "peak GiB", "vs vanilla")
    rows = [header]
    for name, f in summary["benchmarks"].items():
        peak = f["peak_gpu_bytes"] / GIB if f["peak_gpu_bytes"] is not None else None
        speedup = _fmt(f["speedup_vs_vanilla"], ".2f") + ("x" if f["speedup_vs_vanilla"] is not None else "")
        rows.append((
            name, label, str(f["samples"]), _fmt(f["tok_per_s"], ".2f"), _fmt(f["tau"], ".2f"),
            _fmt(f["draft_ms"], ".1f"), _fmt(f["verify_ms"], ".1f"), _fmt(f["transfer_ms"], ".1f"),
            _fmt(peak, ".2f"), speedup,
        ))
    return format_columns(rows, rule=True)


def format_columns(rows: list[tuple[str, ...]], rule: bool = False) -> str:
    """Left-aligned text columns; `rule` underlines the first row (the header)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    if rule:
        lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _generate_record(engine: Engine, sample: Sample, sampling: SamplingConfig, detailed: bool) -> Record:
    record: Record = {"benchmark": sample.benchmark, "index": sample.index, "prompt": sample.prompt}
    prompt_ids = engine.chat_ids([{"role": "user", "content": sample.prompt}])
    if len(prompt_ids) >= engine.max_length:
        record["skipped"] = f"prompt of {len(prompt_ids)} tokens does not fit max_length {engine.max_length}"
        return record
    iterations: list[IterationStats] = []
    try:
        gen = engine.generate(prompt_ids, sampling, on_iteration=iterations.append if detailed else None)
    except EngineError as err:
        record["skipped"] = str(err)
        return record
    record.update(text=gen.text, finish_reason=gen.finish_reason, token_ids=gen.token_ids, stats=gen.stats.as_dict())
    if detailed:
        record["iterations"] = [dataclasses.asdict(it) for it in iterations]
    return record


def warm_up(engine: Engine, settings: Settings, progress: IO[str] = sys.stderr) -> None:
    """`settings.run.warmup_iter` untimed generations (compilation, caches, clocks settle)."""
    ids = engine.chat_ids([{"role": "user", "content": WARMUP_PROMPT}])
    for _ in tqdm(range(settings.run.warmup_iter), desc="warm-up", file=progress, disable=settings.run.warmup_iter == 0):
        engine.generate(ids, settings.sampling)


def select_samples(names: list[str], max_samples: int | None, seed: int) -> dict[str, list[Sample]]:
    """The prompts of every benchmark, loaded before any model so a missing dataset fails fast."""
    return {name: load_samples(name, max_samples, seed) for name in names}


def run_benchmarks(
    engine: Engine,
    settings: Settings,
    samples: dict[str, list[Sample]],
    max_samples: int | None,
    out_root: Path,
    plan: dict[str, Any] | None = None,
    progress: IO[str] = sys.stderr,
) -> tuple[Path, dict[str, Any]]:
    """Run every sample of every benchmark; returns the run folder and its summary. `plan` (which
    plan ran: profiles.choose.Planned.describe) goes into every record and the summary."""
    run_dir = new_run_dir(out_root, settings.engine.method)
    warm_up(engine, settings, progress)
    per_benchmark: dict[str, list[Record]] = {name: [] for name in samples}
    with (run_dir / SAMPLES_FILE).open("w", encoding="utf-8") as out:
        for name, chosen in samples.items():
            for sample in tqdm(chosen, desc=name, file=progress, unit="prompt"):
                record = _generate_record(engine, sample, settings.sampling, settings.run.detailed_analysis)
                record["plan"] = plan
                out.write(json.dumps(record, default=str) + "\n")
                out.flush()  # a crash or Ctrl-C keeps every finished sample
                per_benchmark[name].append(record)
    summary: dict[str, Any] = {
        "created": datetime.now().isoformat(timespec="seconds"),
        "run_dir": str(run_dir),
        "method": settings.engine.method,
        "lossy": settings.engine.verify_method == "lossy",
        "model": engine.model_name,
        "device": engine.describe(),
        "plan": plan,
        "settings": settings.as_dict(),
        "max_samples": max_samples,
        "benchmarks": {name: summarize(records) for name, records in per_benchmark.items()},
    }
    _add_speedups(summary, _vanilla_baseline(out_root, engine.model_name, exclude=run_dir))
    (run_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
    return run_dir, summary
