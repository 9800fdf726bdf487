"""The substitute's Triton int4 kernel, run by Triton's CPU interpreter: it computes what HQQ's own
layer computes (K split over programs, padded K, many rows, bias), deterministically, and drafts
with it stay lossless. The interpreter runs the kernel's portable unpacking (the same words, the
same pairs of rows); the GPU's inline-PTX unpacking is checked bit for bit against HQQ's bf16 weights
by benchmarks/int4_tiles.py on the device, and replayed here step by step with torch's integer ops."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine import EngineError
from engine.int4_kernel import MIN_BLOCKS_PER_PROGRAM, _dequantize_asm, choose_tiles, exact_scaling, pack_int4
from engine.substitute import resolve_kernel
from tests.random_models import save_random_model

ROOT = Path(__file__).resolve().parents[1]
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_triton_kernel_under_the_interpreter(tmp_path, bundled_folder):
    # One architecture: q/k/v biases (Qwen2) are the kernel's bias path, covered by its shapes. The
    # wider model has 2-4 blocks of 128 inputs per linear, so its K can split (partial sums).
    small = save_random_model(tmp_path / "llama", "llama", bundled_folder)
    wide = save_random_model(tmp_path / "wide", "qwen2", bundled_folder, hidden_size=256, intermediate_size=512)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "triton_interpreted.py"), str(small), "--partial-sums", str(wide)],
                         env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("kernel = hqq") == 5
    assert run.stdout.count("int4_limits' kernel without activation loads ran") == 1
    assert run.stdout.count("rotary kernel = eager") == 2
    assert run.stdout.count("attention kernel = torch") == 5
    assert run.stdout.count("row-invariant attention:") == 3
    assert run.stdout.count("row-invariant subspec_sd = vanilla") == 1
    assert run.stdout.count("triton kernel = vanilla on") == 1
    assert run.stdout.count("triton kernel and partial sums = vanilla on") == 1


def test_packing_pairs_two_rows_of_a_slice_in_one_word():
    q = torch.randint(0, 16, (3, 256), dtype=torch.uint8)
    words = pack_int4(q)
    assert words.shape == (32, 3) and words.dtype == torch.int32
    for block in range(2):
        for j in range(8):  # slice j: inputs 16 j .. 16 j + 15
            for t in range(8):
                for u in range(2):  # rows 2 t and 2 t + 1 of the slice: the halves of one word
                    word = words[block * 16 + 2 * t + j // 4]
                    nibble = (word >> (16 * u + 4 * (j % 4))) & 0xF
                    assert torch.equal(nibble, q[:, block * 128 + 16 * j + 2 * t + u].to(torch.int32))


def test_exact_scaling_shifts_scales_and_offsets_by_powers_of_two():
    # bf16 numbers as a model's quantizer leaves them; float32 could not even hold the factor 2^p here.
    for largest in (2.0**-9, 0.011, 0.3, 40.0):
        scale = (torch.rand(64, 8) * largest).to(torch.bfloat16)
        scale[0, 0] = largest
        offset = (torch.randn(64, 8) * largest * 8).to(torch.bfloat16)
        scaled, shifted, unscale = exact_scaling(scale, offset)
        p = 133 - round(math.log2(unscale))
        assert 2.0 ** (133 - p) == unscale
        assert scaled.dtype == shifted.dtype == torch.bfloat16
        assert torch.equal(scaled.double(), scale.double() * 2.0**p)  # exact: nothing rounded
        assert torch.equal(shifted.double(), offset.double() * 2.0 ** (p - 133))
        assert 2.0**126 <= scaled.double().abs().max() < 2.0**127  # as large as fits: no overflow


def _bf16_rounded_once(exact: torch.Tensor) -> torch.Tensor:
    """float64 -> bf16 with one rounding (8 significant bits, ties to even), as fma.rn.bf16x2 does."""
    mantissa, exponent = torch.frexp(exact)
    return torch.ldexp(torch.round(mantissa * 256) / 256, exponent).to(torch.bfloat16)


def test_gpu_unpacking_emulated_gives_hqqs_weights_bit_for_bit():
    # The inline PTX cannot run on a CPU, so its steps are replayed with torch's integer ops: the
    # masks read from the PTX itself, words shifted by 8 for nibbles 2 and 3 and scale / 16 for the
    # nibbles left in bits 4-7 (as the kernel passes them), each half read as a bf16 number, one
    # multiply-add rounded once. What comes out, times unscale, must be HQQ's bf16 weights.
    torch.manual_seed(0)
    n, k, group = 24, 256, 64
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    q[0] = torch.arange(k) % 16  # each nibble position holds 0..15 (8-15 in bits 4-7 set a bf16 exponent bit)
    scale = torch.rand(n, k // group) * 0.02 + 1e-4
    zero = torch.rand(n, k // group) * 15
    scale_b, offset_b = scale.t().to(torch.bfloat16), (-zero * scale).t().to(torch.bfloat16)  # [groups, N]
    scaled, shifted, unscale = exact_scaling(scale_b, offset_b)
    words = pack_int4(q)
    expected = _bf16_rounded_once(q.double() * scale_b.double().t().repeat_interleave(group, 1)
                                  + offset_b.double().t().repeat_interleave(group, 1))
    for block in range(k // 128):
        for j in range(8):
            inputs = block * 128 + 16 * j + torch.arange(16)
            word = words[block * 16 + 2 * torch.arange(8) + j // 4]  # [8, N]: one word per pair t
            word = word if j % 4 < 2 else word >> 8
            mask = int(re.search(r"0x[0-9A-Fa-f]{8}", _dequantize_asm(j)).group(), 16)
            bits = word & mask
            halves = torch.stack([bits & 0xFFFF, bits >> 16], dim=1).reshape(16, n)  # row 2 t + u
            nibbles = halves.to(torch.int16).view(torch.bfloat16).double()
            g = (block * 128 + 16 * j) // group
            slice_scale = scaled[g] if j % 2 == 0 else scaled[g] * 0.0625
            weights = _bf16_rounded_once(nibbles * slice_scale.double() + shifted[g].double())
            assert torch.equal(weights.double() * unscale, expected[:, inputs].t().double()), f"slice {j}"


def test_tiles_split_k_by_a_divisor_of_its_blocks():
    for n, k in ((4608, 3584), (37888, 3584), (3584, 18944), (576, 1536), (960, 576), (5120, 27648)):
        block_n, split, _, _ = choose_tiles(n, k, 132)
        blocks = -(-k // 128)
        assert blocks % split == 0 and blocks // split >= min(MIN_BLOCKS_PER_PROGRAM, blocks)
        programs = -(-n // block_n) * split
        smaller = [s for s in range(1, split) if blocks % s == 0]
        if programs >= 2.5 * 132:  # the smallest split that fills the GPU
            assert all(-(-n // block_n) * s < 2.5 * 132 for s in smaller)
    # The 7B linears as swept on the H200 (q/k/v, o, gate/up, down): the fastest tiles there.
    assert [choose_tiles(n, k, 132)[:2] for n, k in ((4608, 3584), (3584, 3584), (37888, 3584), (3584, 18944))] == [
        (64, 7), (64, 7), (256, 4), (256, 37)]
    assert choose_tiles(960, 576, 132)[:2] == (64, 1)  # 5 blocks: too few to split and keep 4 per program


def test_triton_kernel_needs_a_gpu_outside_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    layer = {name: torch.zeros(64, 64) for name in LINEARS}
    with pytest.raises(EngineError, match="triton cannot run here: it needs a CUDA GPU"):
        resolve_kernel("triton", torch.device("cpu"), torch.float32, 4, 64, layer)
    with pytest.raises(EngineError, match="group sizes are 32, 64, 128, not 256"):
        resolve_kernel("triton", torch.device("cpu"), torch.float32, 4, 256, layer)
    assert resolve_kernel("auto", torch.device("cpu"), torch.float32, 4, 64, layer) == "dense"
