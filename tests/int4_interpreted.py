"""Checks of the Triton int4 kernel under Triton's CPU interpreter (run by test_int4_kernel.py in a
process with TRITON_INTERPRET=1, which Triton reads when the kernel module is imported)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

from engine import EngineConfig, SamplingConfig, load_engine
from engine.int4_kernel import TritonInt4Linear
from engine.substitute import _quantized_rows

# (outputs N, inputs K, group, bias, rows M, tiles): K not a multiple of the 128-input block (padded),
# N not a multiple of the column tile, K split over programs (a second kernel adds the partial sums),
# 17 rows (a 32-row tile), 40 rows (two calls), one row.
SHAPES = [
    (48, 576, 64, True, 6, None),
    (32, 256, 32, False, 1, (64, 2, 4, 3)),
    (40, 384, 128, True, 17, (64, 3, 4, 3)),
    (200, 1024, 64, False, 16, (64, 8, 4, 3)),
    (64, 256, 64, True, 40, (64, 2, 4, 3)),
]


def kernel_equals_hqq() -> None:
    torch.manual_seed(0)
    for n, k, group, bias, m, tiles in SHAPES:
        hqq = HQQLinear(torch.nn.Linear(k, n, bias=bias), BaseQuantizeConfig(nbits=4, group_size=group, axis=1),
                        compute_dtype=torch.float32, device="cpu")
        q, scale, zero = _quantized_rows(hqq)
        kernel = TritonInt4Linear(q, scale, zero, group, hqq.bias, torch.float32, tiles)
        x = torch.randn(m, k)
        first, second = kernel(x), kernel(x)
        torch.testing.assert_close(first, hqq(x), rtol=1e-5, atol=1e-5)
        assert torch.equal(first, second), "a second call differs: the partial sums are not added in a fixed order"
        print(f"kernel = hqq for N {n}, K {k}, group {group}, bias {bias}, {m} rows, split {kernel.split}")


def subspec_equals_vanilla(folder: str) -> None:
    vanilla = load_engine(EngineConfig(llm_path=folder))
    subspec = load_engine(EngineConfig(method="subspec_sd", llm_path=folder, substitute_kernel="triton",
                                       max_depth=3, topk_len=2))
    assert subspec.describe()["substitute_kernel"] == "triton"
    accepted = 0
    for prompt in ([5, 9, 13, 200, 7],):  # the interpreter runs every linear in Python: one short reply
        expected = vanilla.generate(prompt, SamplingConfig(max_new_tokens=8)).token_ids
        gen = subspec.generate(prompt, SamplingConfig(max_new_tokens=8))
        assert gen.token_ids == expected, (prompt, gen.token_ids, expected)
        accepted += sum(it.accepted_depth for it in gen.stats.iterations)
    assert accepted > 0
    print(f"subspec_sd with the triton kernel = vanilla on {Path(folder).name}")


if __name__ == "__main__":
    kernel_equals_hqq()
    for folder in sys.argv[1:]:
        subspec_equals_vanilla(folder)
