"""`subspec models pull|list|show|rm` end to end against the local fake hub (tests/models_fake_hub.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from models_fake_hub import FakeHub, FakeRepo
from safetensors.numpy import save as save_safetensors

from subspec_tui import cli

REPO = "acme/cli-tiny"
FILES = {
    "config.json": b'{"model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_hidden_layers": 1}',
    "model.safetensors": save_safetensors({"lm_head.weight": np.ones((100, 16), dtype=np.float32)}),
    "tokenizer.json": b'{"version": "1.0"}',
}


@pytest.fixture
def hub(tmp_path, monkeypatch):
    fake = FakeHub({REPO: FakeRepo(dict(FILES))}).start()
    monkeypatch.setenv("HF_ENDPOINT", fake.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("SUBSPEC_CACHE_DIR", str(tmp_path / "cache"))
    yield fake
    fake.stop()


def run_json(capsys, *argv: str):
    code = cli.main(["models", *argv, "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def test_pull_list_show_rm_round_trip(hub, capsys):
    total = sum(len(data) for data in FILES.values())
    code = cli.main(["models", "pull", REPO, "--dry-run"])
    out, _ = capsys.readouterr()
    assert code == 0
    assert "model.safetensors" in out and out.strip().splitlines()[-1].startswith("total ")

    pulled = run_json(capsys, "pull", REPO)
    assert pulled["repo_id"] == REPO and pulled["download_bytes"] == total and pulled["path"]
    assert REPO in [m["repo_id"] for m in run_json(capsys, "list")]
    shown = run_json(capsys, "show", REPO)
    assert sorted(f["filename"] for f in shown["files"]) == sorted(FILES)
    assert shown["config"]["model_type"] == "llama"

    code = cli.main(["models", "list"])
    out, _ = capsys.readouterr()
    assert code == 0 and any(line.startswith(REPO) for line in out.splitlines())

    assert run_json(capsys, "rm", REPO) == {"repo_id": REPO, "freed_bytes": total}
    assert REPO not in [m["repo_id"] for m in run_json(capsys, "list")]


def test_pull_of_an_unknown_repo_is_one_line(hub, capsys):
    code = cli.main(["models", "pull", "acme/absent"])
    out, err = capsys.readouterr()
    assert (code, out) == (1, "")
    assert err.startswith("subspec: error: ") and err.count("\n") == 1 and "acme/absent" in err
