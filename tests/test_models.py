"""subspec_tui.models against a local fake of the hub's file API (tests/models_fake_hub.py)."""

from __future__ import annotations

import errno
import threading

import numpy as np
import pytest
from huggingface_hub import constants, file_download
from safetensors.numpy import save as save_safetensors

from engine import EngineError
from models_fake_hub import FakeHub, FakeRepo
from subspec_tui import models

REPO = "acme/tiny-llama"
WEIGHTS = {
    "model.embed_tokens.weight": np.zeros((1000, 64), dtype=np.float32),
    "model.layers.0.mlp.up_proj.weight": np.ones((128, 64), dtype=np.float32),
    "lm_head.weight": np.full((1000, 64), 0.5, dtype=np.float32),
}
PARAMS = sum(a.size for a in WEIGHTS.values())
CONFIG = b'{"model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_hidden_layers": 1, "hidden_size": 64}'


def repo_files() -> dict[str, bytes]:
    return {
        "config.json": CONFIG,
        "model.safetensors": save_safetensors(WEIGHTS),
        "tokenizer.json": b'{"version": "1.0"}' * 50,
        "pytorch_model.bin": b"pickled weights are not fetched by default" * 100,
        "README.md": b"# tiny",
    }


SELECTED = ("config.json", "model.safetensors", "tokenizer.json")


@pytest.fixture(scope="session")
def gguf_summary_cache(tmp_path_factory):
    """One GGUF summary cache for the session: parsing the bundled file costs seconds."""
    return tmp_path_factory.mktemp("subspec-cache")


@pytest.fixture
def hub(tmp_path, monkeypatch, gguf_summary_cache):
    fake = FakeHub({REPO: FakeRepo(repo_files())}).start()
    monkeypatch.setenv("HF_ENDPOINT", fake.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("SUBSPEC_CACHE_DIR", str(gguf_summary_cache))
    yield fake
    fake.stop()


def snapshot_bytes(name: str) -> bytes:
    model = models.find_model(REPO)
    assert model is not None
    return (model.path / name).read_bytes()


def test_dry_run_reports_sizes_of_selected_files_without_downloading(hub, tmp_path):
    result = models.pull_model(REPO, dry_run=True)
    files = hub.repos[REPO].files
    assert sorted(f.filename for f in result.files) == sorted(SELECTED)
    assert result.total_bytes == sum(len(files[name]) for name in SELECTED)
    assert result.download_bytes == result.total_bytes
    assert result.path is None and result.dry_run
    assert not list((tmp_path / "hub").rglob("*.safetensors"))


def test_pull_lists_shows_and_removes_a_model(hub):
    reports: list[models.PullProgress] = []
    result = models.pull_model(REPO, progress_cb=reports.append)

    files = hub.repos[REPO].files
    assert not result.cancelled and result.path is not None
    assert sorted(p.name for p in result.path.iterdir()) == sorted(SELECTED)
    final = reports[-1]
    assert (final.files_done, final.files_total) == (3, 3)
    assert final.bytes_done == final.bytes_total == sum(len(files[name]) for name in SELECTED)
    assert final.speed_bps > 0

    listed = models.list_models()
    assert listed[0].bundled
    model = models.find_model(REPO)
    assert model is not None
    assert (model.family, model.architecture, model.params) == ("llama", "LlamaForCausalLM", PARAMS)
    assert model.size_bytes == sum(len(files[name]) for name in SELECTED)
    assert snapshot_bytes("model.safetensors") == files["model.safetensors"]

    shown = models.show_model(REPO)
    assert shown["config"]["num_hidden_layers"] == 1
    assert sorted(f["filename"] for f in shown["files"]) == sorted(SELECTED)

    # pulling again downloads nothing: everything is cached
    assert models.pull_model(REPO, dry_run=True).download_bytes == 0

    # What the engine made from the snapshot goes with it; another model's stays.
    from engine.loading import cache_dir

    made = [cache_dir() / kind / f"{result.path.name}-0123456789abcdef.safetensors" for kind in ("substitutes", "compressed")]
    other = cache_dir() / "substitutes" / "another-snapshot-0123456789abcdef.safetensors"
    for path in (*made, other):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * 100)
    freed = models.remove_model(REPO)
    assert freed == model.size_bytes + 200
    assert models.find_model(REPO) is None
    assert not any(path.exists() for path in made) and other.exists()
    other.unlink()


def test_extra_patterns_opt_in_to_pickled_weights(hub):
    result = models.pull_model(REPO, dry_run=True, extra_patterns=["*.bin"])
    assert "pytorch_model.bin" in {f.filename for f in result.files}


def test_unknown_repo_is_one_clear_error(hub):
    with pytest.raises(EngineError, match="'acme/missing' not found on the hub"):
        models.pull_model("acme/missing")


def test_bad_repo_id_is_rejected_before_any_request(hub):
    with pytest.raises(EngineError, match="not a valid hub model id"):
        models.pull_model("acme//bad..id")


def test_offline_hub_is_one_clear_error(hub, monkeypatch):
    hub.stop()
    with pytest.raises(EngineError, match="cannot reach the hub"):
        models.pull_model(REPO)


def test_connection_dropped_mid_file_is_resumed_with_a_range_request(hub, monkeypatch):
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 16_384)
    hub.cut_next_get["model.safetensors"] = 40_000  # two whole chunks reach the disk before the cut
    models.pull_model(REPO)
    assert hub.range_requests == [("model.safetensors", "bytes=32768-")]
    assert snapshot_bytes("model.safetensors") == hub.repos[REPO].files["model.safetensors"]


def test_cancelled_pull_keeps_finished_files_and_fetches_only_the_rest(hub, monkeypatch):
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 16_384)
    monkeypatch.setattr(models._ProgressTracker, "MIN_INTERVAL_S", 0.0)  # report every chunk
    hub.slow_files.add("model.safetensors")  # still streaming when the two small files are done
    cancel = threading.Event()

    def cancel_after_two_files(progress: models.PullProgress) -> None:
        if progress.files_done >= 2:
            cancel.set()

    first = models.pull_model(REPO, progress_cb=cancel_after_two_files, cancel=cancel)
    assert first.cancelled and first.path is None

    remaining = models.pull_model(REPO, dry_run=True)
    weights = hub.repos[REPO].files["model.safetensors"]
    assert remaining.download_bytes == len(weights)
    assert not list(models.hub_cache_dir().rglob("*.incomplete"))

    second = models.pull_model(REPO)
    assert not second.cancelled
    assert snapshot_bytes("model.safetensors") == weights


class _FullDisk:
    """A file object whose writes fail with ENOSPC once `room` bytes are written."""

    def __init__(self, inner, room: int) -> None:
        self.inner, self.room = inner, room

    def write(self, data: bytes) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.inner.write(data)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_full_disk_is_one_clear_error_and_the_pull_resumes_later(hub, monkeypatch):
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 16_384)
    real_http_get = file_download.http_get

    def http_get_on_full_disk(url, temp_file, **kwargs):
        return real_http_get(url, _FullDisk(temp_file, room=50_000), **kwargs)

    monkeypatch.setattr(file_download, "http_get", http_get_on_full_disk)
    with pytest.raises(EngineError, match="disk full"):
        models.pull_model(REPO)

    monkeypatch.setattr(file_download, "http_get", real_http_get)
    models.pull_model(REPO)
    assert snapshot_bytes("model.safetensors") == hub.repos[REPO].files["model.safetensors"]


def test_not_enough_free_space_is_refused_before_downloading(hub, monkeypatch, tmp_path):
    monkeypatch.setattr(models.shutil, "disk_usage", lambda _path: type("Usage", (), {"free": 1000})())
    with pytest.raises(EngineError, match="not enough disk space"):
        models.pull_model(REPO)
    assert not list((tmp_path / "hub").rglob("*.safetensors"))


def test_remove_and_show_refuse_unknown_or_bundled_models(hub):
    with pytest.raises(EngineError, match="not in the hub cache"):
        models.remove_model("acme/never-pulled")
    with pytest.raises(EngineError, match="uninstall"):
        models.remove_model(models.BUNDLED_ID)
    with pytest.raises(EngineError, match="subspec models pull acme/never-pulled"):
        models.show_model("acme/never-pulled")


def test_bundled_model_is_listed_first_with_figures_from_its_gguf(hub):
    bundled = models.list_models()[0]
    assert bundled.repo_id == models.BUNDLED_ID and bundled.llm_path is None
    assert bundled.family == "llama"
    assert bundled.config["num_hidden_layers"] == 30
    assert 130e6 < bundled.params < 140e6  # SmolLM2-135M
