"""The substitute's Triton int4 kernel, run by Triton's CPU interpreter: it computes what HQQ's own
layer computes, and drafts with it stay lossless. (On a GPU, benchmarks/offload_gpu.py compares the
compiled kernel with the dequantized weights.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine import EngineError
from engine.substitute import resolve_kernel
from tests.random_models import save_random_model

ROOT = Path(__file__).resolve().parents[1]


def test_triton_kernel_under_the_interpreter(tmp_path, bundled_folder):
    folders = [save_random_model(tmp_path / arch, arch, bundled_folder) for arch in ("llama", "qwen2")]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "int4_interpreted.py"), *map(str, folders)],
                         env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("kernel = hqq") == 4
    assert run.stdout.count("= vanilla on") == 2


def test_triton_kernel_needs_a_gpu_outside_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    layer = {name: torch.zeros(64, 64) for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")}
    with pytest.raises(EngineError, match="triton cannot run here: it needs a CUDA GPU"):
        resolve_kernel("triton", torch.device("cpu"), torch.float32, 4, 64, layer)
    with pytest.raises(EngineError, match="group sizes are 32, 64, 128, not 256"):
        resolve_kernel("triton", torch.device("cpu"), torch.float32, 4, 256, layer)
