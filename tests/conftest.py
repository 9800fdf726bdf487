"""Shared fixtures: an isolated model cache for the whole run, bundled engines built once, and tiny
random-weight models of each supported architecture saved as real model folders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from engine import EngineConfig, load_engine
from engine.loading import BUNDLED_NAME, resolve_source

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Converted models and substitutes go to a per-run folder, never the user's cache (unless
    SUBSPEC_TEST_CACHE names a folder to reuse between runs, for development)."""
    folder = Path(os.environ.get("SUBSPEC_TEST_CACHE") or tmp_path_factory.mktemp("subspec-cache"))
    os.environ["SUBSPEC_CACHE_DIR"] = str(folder)
    return folder


@pytest.fixture(autouse=True)
def quiet_machine(monkeypatch):
    """Profiles record how busy the machine was and distrust busy measurements; the test machine's
    own load is not a test input (tests of that rule set the load they need)."""
    import profiles.runner

    class QuietMeter:
        def per_core(self) -> float:
            return 0.0

    monkeypatch.setattr(profiles.runner, "LoadMeter", QuietMeter)
    monkeypatch.setattr(profiles.runner, "machine_load", lambda: 0.0)


_engines: dict = {}


@pytest.fixture(scope="session")
def bundled_engine():
    """bundled_engine(method="vanilla", **config) -> a cached Engine on the bundled model."""

    def get(method: str = "vanilla", **overrides):
        key = (method, tuple(sorted(overrides.items())))
        if key not in _engines:
            _engines[key] = load_engine(EngineConfig(method=method, **overrides))
        return _engines[key]

    return get


@pytest.fixture(scope="session")
def bundled_folder() -> Path:
    folder, name = resolve_source(None, lambda _msg: None)
    assert name == BUNDLED_NAME
    return folder


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def random_folder(request, tmp_path_factory, bundled_folder) -> Path:
    """A tiny random model folder of each architecture (module scope: one save per test file)."""
    from tests.random_models import save_random_model

    return save_random_model(tmp_path_factory.mktemp(request.param), request.param, bundled_folder)
