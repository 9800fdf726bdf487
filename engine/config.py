"""What the user can choose: the engine (model, method, offload, tree) and one generation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Method = Literal["vanilla", "classic_sd", "subspec_sd", "eagle_sd"]
METHODS: tuple[str, ...] = ("vanilla", "classic_sd", "subspec_sd", "eagle_sd")
COMPILE_MODES: tuple[str | None, ...] = ("auto", "cuda-graphs", None)
SUBSTITUTE_KERNELS: tuple[str, ...] = ("auto", "triton", "tinygemm", "gemlite", "hqq", "dense")


# The floor of best-first trees on a CPU. Bundled SmolLM2, 20 MT-Bench prompts, float32, 192 nodes,
# 16 per draft forward (benchmarks/tau_bundled.py): tau 10.34 without a floor (12.8 draft forwards
# per verification), 10.85 at 1e-8 (13.4), 11.10 at 1e-6 (14.1, 4% faster), 11.52 at 1e-4 (15.1);
# the reference tree 10.70 in 32 forwards. On a GPU its host read per forward costs more than it
# gains (H100, 7B, 288 nodes: 0.89x; docs/engine.md, "Tree policies"): off there by default.
MIN_DRAFT_PROB = 1e-6


@dataclass
class EngineConfig:
    method: Method = "vanilla"
    llm_path: str | None = None  # folder, hub id, .gguf file; None = bundled SmolLM2-135M-Instruct
    draft_model_path: str | None = None  # classic_sd only
    device: str = "auto"  # "auto" (cuda if available), "cpu", "cuda", "cuda:1"
    dtype: str = "auto"  # "auto" = bfloat16 on CUDA, float32 on CPU
    vram_limit_gb: float | None = None  # emulate a smaller card
    keep_first_n_layers_on_gpu: int | None = None  # None = all layers resident (or the profile's plan)
    max_length: int = 8192  # KV cache slots: prompt + generated tokens (+ tree scratch)
    prefill_chunk: int = 512
    # Keep the KV of the last generation's tokens and prefill only what a new prompt adds to them
    # (a conversation's next turn). Output is unchanged: the cache holds what a prefill would write.
    reuse_prefix: bool = True
    # Stream offloaded layers through CPU buffers on a machine without a GPU (a fake device that
    # exercises the offloader's slot logic; tests and development only).
    emulate_offload: bool = False
    # Offloaded layers cross PCIe with their exponents Huffman-coded (engine.compress: ~68% of the
    # bytes, decoded bit for bit on the device). bfloat16 only. A GPU profile times both forms and
    # stores the faster (profiles.fit).
    compressed_streaming: bool = False
    # Device buffers streamed layers rotate through. Measured on the H200 (7B shape, 8 GB cap):
    # 2 slots ran at 0.82 of the streaming bound, 3 slots at 1.00.
    offload_slots: int = 3
    # drafting (subspec_sd / classic_sd)
    # best_first measured a higher tau than the reference tree at the same 192-node budget and draft
    # steps (bundled SmolLM2, 20 MT-Bench prompts: 11.24 vs 10.70; benchmarks/tau_bundled.py).
    tree_policy: Literal["reference", "best_first"] = "best_first"
    max_depth: int = 32
    topk_len: int = 6
    node_budget: int | None = None  # best_first: nodes besides the root; None = max_depth * topk_len
    # best_first: nodes drafted per draft forward (None = topk_len; at most, with the floor below).
    # 16 reaches a 288-node budget in 19 forwards instead of 48 at the same tau (bundled SmolLM2:
    # 11.95 vs 11.78); a 16-token forward costs 1.8x a 6-token one on an H200 (7B shape), so
    # drafting takes 188 ms, not 288.
    draft_batch: int | None = 16
    # best_first: a node whose cumulative draft probability (at draft_temperature) is below this is
    # not drafted, and the tree ends when no candidate reaches it, so the budget the draft all but
    # rules out goes to depth where it is sure (engine.tree.grow_best_first). 0 = off: every draft
    # forward drafts draft_batch nodes and the host never waits for the draft. None = MIN_DRAFT_PROB
    # on a CPU, off on a GPU (min_draft_prob_by_default).
    min_draft_prob: float | None = None
    draft_temperature: float = 0.2
    substitute_bits: int = 4
    substitute_group_size: int = 64
    # What multiplies with the quantized weights: auto, triton, tinygemm, gemlite, hqq, dense (engine.substitute).
    substitute_kernel: str = "auto"
    # verification
    verify_method: Literal["exact", "lossy"] = "exact"
    # The target computes every token's row as a one-token forward would (engine.pointwise's
    # row_invariant): greedy output token-identical to plain decoding in 16-bit dtypes too, where a
    # verification's many-row kernels otherwise round differently and flip near-ties (README:
    # "Greedy output and bfloat16"). None = on in bfloat16/float16 (the GPU's default), off in
    # float32, where the CPU's row-by-row attention would cost more than the ties it settles.
    row_invariant: bool | None = None
    threshold_method: Literal["entropy", "prob"] = "entropy"
    threshold: float = 0.3
    window_size: int = 4
    # Draft steps: "auto" = CUDA graphs and torch.compile'd element-wise math on a GPU, eager on a
    # CPU; "cuda-graphs" = fixed-shape steps everywhere (captured on a GPU, run eagerly on a CPU),
    # element-wise math eager; None ("none") = eager.
    compile_mode: str | None = "auto"
    nvtx_profiling: bool = False

    def draft_nodes(self) -> int:
        """Draft nodes per tree besides the root (0 for vanilla: a verification is a decode step)."""
        if self.method == "vanilla":
            return 0
        if self.tree_policy == "best_first" and self.node_budget:
            return self.node_budget
        return self.max_depth * self.topk_len


@dataclass
class SamplingConfig:
    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # stop strings (not part of the returned text)

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature <= 0.0


def method_unavailable(method: str, draft_model_path: str | None) -> str | None:
    """Why `method` cannot run with this draft (one line for the user), or None when it can: the
    engine refuses it at load, and profiles and front ends before measuring anything."""
    if method == "eagle_sd" and not draft_model_path:
        return "eagle_sd needs an EAGLE head: pass --draft-model-path (a folder with config.json and weights)"
    if method == "classic_sd" and not draft_model_path:
        return "classic_sd needs a draft model: pass --draft-model-path"
    return None


def min_draft_prob_by_default(config: EngineConfig, device_type: str) -> float:
    """EngineConfig.min_draft_prob, resolved for a device when left unset."""
    if config.min_draft_prob is not None:
        return config.min_draft_prob
    return MIN_DRAFT_PROB if device_type == "cpu" else 0.0


def row_invariant_by_default(dtype_bytes: int) -> bool:
    """EngineConfig.row_invariant when left unset: on in the 16-bit dtypes, off in float32."""
    return dtype_bytes == 2
