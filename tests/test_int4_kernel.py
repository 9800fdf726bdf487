"""The substitute's Triton int4 kernel, run by Triton's CPU interpreter: it computes what HQQ's own
layer computes (K split over programs, padded K, many rows, bias), deterministically, and drafts
with it stay lossless. The interpreter runs the kernel's portable unpacking; the GPU's inline-PTX
unpacking is checked against the dequantized weights by benchmarks/offload_gpu.py on the device."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine import EngineError
from engine.int4_kernel import MAX_SPLIT, choose_tiles, pack_int4
from engine.substitute import resolve_kernel
from tests.random_models import save_random_model

ROOT = Path(__file__).resolve().parents[1]
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_triton_kernel_under_the_interpreter(tmp_path, bundled_folder):
    # One architecture: q/k/v biases (Qwen2) are the kernel's bias path, covered by its shapes.
    folders = [save_random_model(tmp_path / "llama", "llama", bundled_folder)]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "int4_interpreted.py"), *map(str, folders)],
                         env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("kernel = hqq") == 5
    assert run.stdout.count("= vanilla on") == 1


def test_packing_puts_input_16j_plus_r_in_nibble_j_of_word_r():
    q = torch.randint(0, 16, (3, 256), dtype=torch.uint8)
    words = pack_int4(q)
    assert words.shape == (32, 3) and words.dtype == torch.int32
    for block in range(2):
        for r in range(16):
            for j in range(8):
                nibble = (words[block * 16 + r] >> (4 * j)) & 0xF
                assert torch.equal(nibble, q[:, block * 128 + 16 * j + r].to(torch.int32))


def test_tiles_split_k_by_a_divisor_of_its_blocks():
    for n, k in ((4608, 3584), (37888, 3584), (3584, 18944), (576, 1536), (960, 576)):
        block_n, split, _, _ = choose_tiles(n, k, 132)
        blocks = -(-k // 128)
        assert blocks % split == 0 and split <= MAX_SPLIT
        smaller = [s for s in range(1, split) if blocks % s == 0]
        assert all(-(-n // block_n) * s < 3 * 132 for s in smaller)  # the smallest split that fills the GPU
    # The 7B linears as swept on the H200 (q/k/v, o, gate/up, down): the fastest tiles there.
    assert [choose_tiles(n, k, 132)[:2] for n, k in ((4608, 3584), (3584, 3584), (37888, 3584), (3584, 18944))] == [
        (64, 7), (64, 7), (256, 4), (64, 4)]


def test_triton_kernel_needs_a_gpu_outside_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    layer = {name: torch.zeros(64, 64) for name in LINEARS}
    with pytest.raises(EngineError, match="triton cannot run here: it needs a CUDA GPU"):
        resolve_kernel("triton", torch.device("cpu"), torch.float32, 4, 64, layer)
    with pytest.raises(EngineError, match="group sizes are 32, 64, 128, not 256"):
        resolve_kernel("triton", torch.device("cpu"), torch.float32, 4, 256, layer)
    assert resolve_kernel("auto", torch.device("cpu"), torch.float32, 4, 64, layer) == "dense"
