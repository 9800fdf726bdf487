"""The memory model against real model configs, real transformers modules and real HQQ tensors.

Cards are counted in GiB (an "8 GB" card has 8 * 1024**3 bytes); DESIGN.md quotes layer sizes in
decimal GB, so `GB` below is 1e9.
"""

from __future__ import annotations

import json

import pytest
import torch

from engine.config import EngineConfig
from engine.drafters import EagleDrafter
from engine.offload import linear_tensors
from engine.tree import Tree, TreeShape
from profiles.memory import (
    CONTEXT_CHOICES,
    CUDA_CONTEXT_BYTES,
    GB,
    GIB,
    ModelShape,
    ModelShapeError,
    eagle_feature_bytes,
    estimate_plan,
    hqq_linear_bytes,
    longest_context,
)

QWEN25_7B = {
    "model_type": "qwen2",
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "vocab_size": 152064,
    "tie_word_embeddings": False,
}
QWEN25_14B = {
    "model_type": "qwen2",
    "hidden_size": 5120,
    "intermediate_size": 13824,
    "num_hidden_layers": 48,
    "num_attention_heads": 40,
    "num_key_value_heads": 8,
    "vocab_size": 152064,
    "tie_word_embeddings": False,
}
QWEN25_32B = {
    "model_type": "qwen2",
    "hidden_size": 5120,
    "intermediate_size": 27648,
    "num_hidden_layers": 64,
    "num_attention_heads": 40,
    "num_key_value_heads": 8,
    "vocab_size": 152064,
    "tie_word_embeddings": False,
}
LLAMA31_8B = {
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "tie_word_embeddings": False,
}
QWEN3_8B = {
    "model_type": "qwen3",
    "hidden_size": 4096,
    "intermediate_size": 12288,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 151936,
    "tie_word_embeddings": False,
}


def test_7b_layer_sizes_match_design_figures():
    shape = ModelShape.from_config(QWEN25_7B)
    # q,o: 3584x3584; k,v: 512x3584 (4 KV heads x 128); gate,up,down: 18944x3584; q/k/v biases;
    # two norms: 233.06 M parameters -> 0.466 GB in bf16, DESIGN.md section 6's figure.
    assert shape.layer_bytes() / GB == pytest.approx(0.466, abs=0.0005)
    # 4-bit g64: half a byte per parameter + 4 bytes (bf16 scale + zero) per 64 -> 0.131 GB.
    assert shape.substitute_layer_bytes(4, 64) / GB == pytest.approx(0.131, abs=0.0005)
    # KV per token: 2 (K and V) x 28 layers x 4 heads x 128 x 2 bytes.
    assert shape.kv_bytes_per_token() == 57344


@pytest.mark.parametrize("config", [QWEN25_7B, LLAMA31_8B, QWEN3_8B], ids=["qwen2", "llama", "qwen3"])
def test_layer_and_embedding_bytes_match_transformers_modules(config):
    """Count the parameters transformers actually builds (on the meta device: no memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_config = AutoConfig.for_model(**config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    shape = ModelShape.from_config(hf_config)  # a PretrainedConfig works as well as a dict
    layer_params = sum(p.numel() for p in model.model.layers[0].parameters())
    assert shape.layer_bytes(2) == layer_params * 2
    # A stream buffer holds what the engine packs per offloaded layer: the linears, not the norms.
    streamed_params = sum(t.numel() for t in linear_tensors(model.model.layers[0]).values())
    assert shape.linear_bytes(2) == streamed_params * 2
    outside_layers = sum(p.numel() for p in model.parameters()) - layer_params * shape.layers
    assert shape.embedding_bytes(2) == outside_layers * 2


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
def test_hqq_linear_bytes_match_hqq_storage(bits):
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    linear = torch.nn.Linear(320, 192, bias=False, dtype=torch.bfloat16)
    quantized = HQQLinear(
        linear, BaseQuantizeConfig(nbits=bits, group_size=64, axis=1), compute_dtype=torch.bfloat16, device="cpu"
    )
    tensors = [quantized.W_q] + [v for v in quantized.meta.values() if isinstance(v, torch.Tensor)]
    stored = sum(t.numel() * t.element_size() for t in tensors)
    assert hqq_linear_bytes(192, 320, bits, 64) == stored


def test_qwen25_7b_at_8gb_subspec_streams_every_layer_through_2_buffers():
    plan = estimate_plan(QWEN25_7B, 8 * GIB, "subspec_sd", max_context=2048)
    # Always resident: embeddings + untied lm_head 2 x 152064 x 3584 x 2 B = 2.18 GB, 28 substitute
    # layers x 0.131 GB = 3.67 GB, KV 2048 x 57344 B = 0.12 GB, the workspace of a 193-node
    # verification (fp32 logits and 16 rows' sampling temporaries, 193 x 152064 x 4 B + 16 x 152064
    # x 32 B = 0.20 GB, dominate; the row-invariant target's hidden-sized tensors padded to 256
    # rows, its attention's visible slots 193 x 2048 x 14 B, no scores) = 0.24 GB and of the draft
    # steps' graphs (32 rows x 152064 x 26 B) = 0.13 GB, CUDA context 0.52 GB and a 4% margin 0.34 GB.
    # Three 0.466 GB stream buffers (a layer's bf16 linears) make 8.01 GiB, over the 8 GiB; two
    # make 7.58 GiB, and the 0.42 GiB left is less than one 0.434 GiB bf16 layer: 0 resident, all 28
    # stream (13.1 GB per forward) through 2 buffers.
    assert plan.fits
    assert (plan.layers_on_gpu, plan.layers_total, plan.stream_buffers) == (0, 28, 2)
    assert plan.substitute_bytes == 28 * plan.substitute_layer_bytes
    assert plan.stream_buffer_bytes == 2 * ModelShape.from_config(QWEN25_7B).linear_bytes()
    assert plan.total_bytes / GIB == pytest.approx(7.58, abs=0.01)
    assert plan.vram_bytes - plan.total_bytes < plan.layer_bytes
    three = estimate_plan(QWEN25_7B, 8 * GIB, "subspec_sd", stream_buffers=3, max_context=2048)
    assert not three.fits and three.reason.startswith("needs 8.01 GiB with every layer streamed through 3 buffers")
    # Without the substitute (vanilla): embeddings 2.18 + KV 0.12 + three buffers 1.40 + workspace
    # 0.15 (a 512-token prefill chunk, 2048 tokens' rows between layers) + context and margin 0.87 =
    # 4.71 GB = 4.39 GiB fixed; (8 - 4.39) / 0.434 = 8.3 -> 8 bf16 layers resident.
    vanilla = estimate_plan(QWEN25_7B, 8 * GIB, "vanilla", max_context=2048)
    assert (vanilla.layers_on_gpu, vanilla.stream_buffers) == (8, 3)


def test_qwen25_32b_at_24gb_falls_back_to_2_buffers():
    plan = estimate_plan(QWEN25_32B, 24 * GIB, "subspec_sd", max_context=2048)
    # A 32B layer is 0.975 GB bf16 and 0.274 GB as 4-bit g64: 64 substitute layers are 17.56 GB,
    # embeddings + head 3.11 GB, KV 2048 x 262144 B = 0.54 GB, workspace 0.26 GB (a 193-node tree's)
    # + 0.13 GB of draft graphs, context + 4% margin 1.56 GB. With three 0.975 GB buffers (2.93 GB)
    # that is 26.07 GB = 24.28 GiB > 24 GiB with no layer resident; with two (1.95 GB) 25.10 GB =
    # 23.37 GiB fits. The 0.63 GiB left is less than one 0.908 GiB bf16 layer: 0 resident, 2 buffers.
    assert plan.fits
    assert (plan.layers_on_gpu, plan.layers_total, plan.stream_buffers) == (0, 64, 2)
    assert plan.total_bytes / GIB == pytest.approx(23.37, abs=0.01)
    three = estimate_plan(QWEN25_32B, 24 * GIB, "subspec_sd", stream_buffers=3, max_context=2048)  # no fallback when asked
    assert not three.fits
    assert three.reason.startswith("needs 24.28 GiB with every layer streamed through 3 buffers")
    # Each layer streams: 62.4 GB per verification, ~1.1 s at 55 GB/s pinned.
    assert plan.stream_bound_ms(55.0) == pytest.approx(64 * 0.975210496 / 55.0 * 1000, rel=1e-6)


def test_llama31_8b_at_12gb_keeps_9_layers():
    plan = estimate_plan(LLAMA31_8B, 12 * GIB, "subspec_sd", max_context=2048)
    # Layer 0.436 GB bf16 (no biases), 0.123 GB as 4-bit: 32 substitutes 3.93 GB; embeddings +
    # head 2 x 128256 x 4096 x 2 B = 2.10 GB; KV 2048 x 131072 B = 0.27 GB; three buffers 1.31 GB;
    # workspace 0.20 GB + 0.11 GB of draft graphs (32 x 128256 x 26 B); context + margin 1.04 GB:
    # 8.96 GB = 8.34 GiB fixed. (12 - 8.34) / 0.406 GiB = 9.0 -> 9 bf16 layers resident, 23 stream
    # through 3 buffers.
    assert plan.fits
    assert (plan.layers_on_gpu, plan.stream_buffers) == (9, 3)
    fixed = plan.total_bytes - plan.resident_layers_bytes
    assert fixed / GIB == pytest.approx(8.34, abs=0.01)
    assert (12 * GIB - fixed) // plan.layer_bytes == 9


def test_qwen25_14b_at_12gb_fits_3bit_not_4bit():
    plan = estimate_plan(QWEN25_14B, 12 * GIB, "subspec_sd", max_context=2048)
    # 48 substitute layers x 0.155 GB (4-bit) = 7.43 GB + embeddings/head 3.11 GB + KV 0.40 GB +
    # workspace 0.24 GB + draft graphs 0.13 GB + context/margin 1.04 GB = 12.35 GB before buffers:
    # one 0.55 GB buffer makes 12.90 GB = 12.02 GiB, over 12 GiB with every bf16 layer streamed.
    assert not plan.fits
    assert plan.reason.startswith("needs 12.02 GiB with every layer streamed through 1 buffer (")
    # At 3 bits (ten values per int32 -> 3.2 bits + 4 bytes per group) a substitute layer is
    # 0.127 GB: 1.32 GB less in all, room for all three buffers: 12.68 GB = 11.81 GiB with no
    # layer resident (the 0.19 GiB left is less than a 0.513 GiB bf16 layer).
    three_bit = estimate_plan(QWEN25_14B, 12 * GIB, "subspec_sd", substitute_bits=3, max_context=2048)
    assert three_bit.fits
    assert (three_bit.layers_on_gpu, three_bit.stream_buffers) == (0, 3)
    assert three_bit.total_bytes / GIB == pytest.approx(11.81, abs=0.01)


@pytest.mark.parametrize(
    "vram_gib, buffers, needed_gib",
    [
        # 12.35 GB without buffers + 3 x 0.55 GB; the 4% margin grows by 0.04 GiB per GiB of card.
        (13.25, 3, 13.09),
        (13.0, 2, 12.57),  # 3 buffers would need 13.08 GiB
        (12.5, 1, 12.04),  # 2 would need 12.55 GiB
    ],
)
def test_stream_buffers_fall_back_from_3_to_2_to_1(vram_gib, buffers, needed_gib):
    plan = estimate_plan(QWEN25_14B, int(vram_gib * GIB), "subspec_sd", max_context=2048)
    assert plan.fits and (plan.layers_on_gpu, plan.stream_buffers) == (0, buffers)
    assert plan.total_bytes / GIB == pytest.approx(needed_gib, abs=0.01)


def test_not_even_1_buffer_fits_and_the_reason_says_so():
    # 11 GiB: the 12.31 GB before buffers (a smaller card, a smaller margin) already fill it; one
    # 0.55 GB buffer makes 11.98 GiB.
    plan = estimate_plan(QWEN25_14B, 11 * GIB, "subspec_sd", max_context=2048)
    assert not plan.fits
    assert (plan.layers_on_gpu, plan.stream_buffers) == (0, 1)
    assert plan.reason.startswith("needs 11.98 GiB with every layer streamed through 1 buffer (")
    assert plan.reason.endswith("the card has 11.00 GiB")


def test_everything_resident_needs_no_streaming_buffers():
    plan = estimate_plan(QWEN25_7B, 80 * GIB, "subspec_sd")
    assert plan.layers_on_gpu == plan.layers_total == 28
    assert plan.stream_buffers == plan.stream_buffer_bytes == 0
    assert plan.offloaded_bytes == 0


def test_longer_context_and_bigger_tree_cost_memory():
    base = estimate_plan(LLAMA31_8B, 12 * GIB, "subspec_sd", max_context=2048)
    long = estimate_plan(LLAMA31_8B, 12 * GIB, "subspec_sd", max_context=32768)
    assert long.kv_cache_bytes == 16 * base.kv_cache_bytes
    assert long.layers_on_gpu < base.layers_on_gpu
    small_prefill = dict(prefill_chunk=1)  # so the tree, not the prefill chunk, sizes the workspace
    small_tree = estimate_plan(LLAMA31_8B, 12 * GIB, "subspec_sd", tree_nodes=64, **small_prefill)
    big_tree = estimate_plan(LLAMA31_8B, 12 * GIB, "subspec_sd", tree_nodes=1024, **small_prefill)
    assert big_tree.workspace_bytes > small_tree.workspace_bytes
    # logits in bf16 + an fp32 copy dominate: 1024 nodes x 128256 x 6 B.
    assert big_tree.workspace_bytes > 1024 * 128256 * 6


def test_classic_sd_counts_the_whole_draft_model():
    draft = {**QWEN25_7B, "hidden_size": 1536, "intermediate_size": 8960, "num_attention_heads": 12,
             "num_key_value_heads": 2, "tie_word_embeddings": True}  # Qwen2.5-1.5B
    plan = estimate_plan(QWEN25_7B, 24 * GIB, "classic_sd", draft_config=draft, max_context=2048)
    shape = ModelShape.from_config(draft)
    assert plan.draft_bytes == (
        28 * shape.layer_bytes() + shape.embedding_bytes() + 2048 * shape.kv_bytes_per_token()
    )
    assert plan.substitute_bytes == 0 and plan.substitute_bits is None
    with pytest.raises(ModelShapeError, match="draft model's config"):
        estimate_plan(QWEN25_7B, 24 * GIB, "classic_sd")


def test_eagle_sd_counts_the_heads_own_weights_not_embeddings(tmp_path, random_folder):
    # The head reads the target's embeddings and lm_head: its weights are what load_eagle_head puts
    # on the device (a layer's linears, fc, the norm), up to the layer's bias and norm vectors.
    from engine.eagle import load_eagle_head
    from engine.loading import load_model
    from engine.model import Transformer
    from tests.eagle_heads import save_random_head

    head_folder = save_random_head(tmp_path / "head", random_folder)
    head_config = json.loads((head_folder / "config.json").read_text())
    target_config = json.loads((random_folder / "config.json").read_text())
    plan = estimate_plan(target_config, 8 * GIB, "eagle_sd", draft_config=head_config, max_context=256)
    shape = ModelShape.from_config(head_config)
    head_kv = 256 * shape.kv_bytes_per_token()
    target = Transformer(load_model(str(random_folder), dtype=torch.bfloat16).model, torch.device("cpu"), 256)
    head = load_eagle_head(str(head_folder), target)
    loaded = sum(t.numel() * t.element_size() for t in head.weights.values())
    # The drafter's feature buffers: the context's, and the predicted ones of a full tree.
    drafter = EagleDrafter(head, EngineConfig(method="eagle_sd", max_length=256), max_length=256)
    tree = Tree(plan.tree_nodes, target.device)
    tree.reset(5, prefix_len=8)
    drafter.features[7] = 1.0
    drafter.draft(tree, TreeShape(max_depth=1, max_nodes=1))  # sizes the predicted features for this tree
    features = drafter.features.nbytes + drafter._predicted.nbytes
    assert features == eagle_feature_bytes(target_config["hidden_size"], 256, plan.tree_nodes)
    vectors = shape.layer_bytes() - sum(out * inp for out, inp, _ in shape.linear_shapes()) * 2  # biases, norms
    assert 0 <= (plan.draft_bytes - head_kv - features) - loaded <= vectors  # a head may lack biases the family allows
    classic = estimate_plan(target_config, 8 * GIB, "classic_sd", draft_config=head_config, max_context=256)
    fc_bytes = (2 * shape.hidden * shape.hidden + shape.hidden) * 2
    # A draft model's own embeddings, and no feature buffers.
    assert classic.draft_bytes - plan.draft_bytes == shape.embedding_bytes() - fc_bytes - features


def test_unusable_configs_get_one_line_errors():
    with pytest.raises(ModelShapeError, match="lacks hidden_size"):
        estimate_plan({"model_type": "llama"}, 8 * GIB)
    with pytest.raises(ModelShapeError, match="mixture-of-experts"):
        estimate_plan({**QWEN25_7B, "num_experts": 64}, 8 * GIB)
    with pytest.raises(ModelShapeError, match="no 7-bit packing"):
        estimate_plan(QWEN25_7B, 8 * GIB, substitute_bits=7)
    with pytest.raises(ModelShapeError, match="unknown method"):
        estimate_plan(QWEN25_7B, 8 * GIB, method="magic")
    with pytest.raises(ModelShapeError, match="stream_buffers must be at least 1, got 0"):
        estimate_plan(QWEN25_7B, 8 * GIB, stream_buffers=0)


def test_summary_is_one_line_with_the_breakdown():
    plan = estimate_plan(LLAMA31_8B, 12 * GIB, "subspec_sd", max_context=2048)
    line = plan.summary()
    assert "\n" not in line
    assert "(3 stream buffers and workspace), 9 of 32 layers on GPU" in line and "GiB: fits" in line
    # 23 streamed layers of 0.406 GiB each stay in pinned host memory.
    assert line.endswith(f"fits; {23 * plan.layer_bytes / GIB:.2f} GiB of pinned host RAM for the streamed layers")
    data = plan.as_dict()
    assert data["total_bytes"] == plan.total_bytes
    assert data["cuda_context_bytes"] == CUDA_CONTEXT_BYTES


@pytest.mark.parametrize(
    "config, vram_gib, method, context",
    [
        # 8192 tokens cost 7B vanilla one resident layer (8 -> 7), no buffer: the longest is kept.
        (QWEN25_7B, 8, "vanilla", 8192),
        # 7B subspec_sd streams everything through 2 buffers at 2048 and at 8192 (7.92 GiB).
        (QWEN25_7B, 8, "subspec_sd", 8192),
        # Llama-3.1-8B subspec_sd: 2 buffers at 2048, 1 at 4096 and 8192 does not fit: 2048.
        (LLAMA31_8B, 8, "subspec_sd", 2048),
        # Qwen2.5-32B at 24 GiB: 2 buffers at 2048 and 4096, 8192 does not fit: 4096.
        (QWEN25_32B, 24, "subspec_sd", 4096),
    ],
)
def test_the_planned_context_is_the_longest_that_costs_no_stream_buffer(config, vram_gib, method, context):
    def plan_at(tokens: int):
        return estimate_plan(config, vram_gib * GIB, method, max_context=tokens)

    assert longest_context(plan_at, config) == context
    chosen, shortest = plan_at(context), plan_at(CONTEXT_CHOICES[-1])
    assert chosen.fits and chosen.stream_buffers == shortest.stream_buffers


def test_the_planned_context_stays_within_the_model_and_falls_back_to_the_shortest():
    def plan_at(tokens: int):
        return estimate_plan(LLAMA31_8B, 8 * GIB, "subspec_sd", max_context=tokens)

    assert longest_context(plan_at, {**LLAMA31_8B, "max_position_embeddings": 1024}) == 1024
    assert longest_context(lambda tokens: estimate_plan(QWEN25_14B, 11 * GIB, "subspec_sd", max_context=tokens),
                           QWEN25_14B) == CONTEXT_CHOICES[-1]  # fits at none: the profile says why


def test_compressed_streaming_plans_one_staging_buffer_for_the_stream_buffers():
    # Vanilla 7B at 8 GiB: 8 resident layers and three 0.466 GB buffers in bf16 (test above); the
    # buffers share one 0.72 x 0.466 = 0.336 GB staging buffer: 1 layer fewer.
    linear = ModelShape.from_config(QWEN25_7B).linear_bytes()
    plain = estimate_plan(QWEN25_7B, 8 * GIB, "vanilla", max_context=2048)
    compressed = estimate_plan(QWEN25_7B, 8 * GIB, "vanilla", max_context=2048, compressed_streaming=True)
    assert compressed.stream_buffers == plain.stream_buffers == 3
    assert compressed.stream_buffer_bytes == 3 * linear + int(linear * 0.72)
    assert compressed.layers_on_gpu == plain.layers_on_gpu - 1
    assert compressed.total_bytes <= 8 * GIB
    # Host RAM: 20 streamed bf16 layers against 21 compressed ones at 0.72.
    assert plain.pinned_host_bytes == 20 * plain.layer_bytes
    assert compressed.pinned_host_bytes == int(21 * plain.layer_bytes * 0.72)
    # Nothing streamed, nothing staged.
    resident = estimate_plan(QWEN25_7B, 40 * GIB, "vanilla", max_context=2048, compressed_streaming=True)
    assert resident.stream_buffers == 0 and resident.stream_buffer_bytes == 0
