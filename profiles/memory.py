"""The memory model: how much GPU memory a model + method needs, from its config alone.

No weights are read, so a plan can be shown before a model is downloaded. Every term below is a
separate field of `Plan` so a front end can show the breakdown (weights, KV cache, buffers).
The estimate is then checked by a trial load on the real GPU (`profiles.fit`): this model only
has to be close and on the safe side, the measurement has the last word.

Units: bytes everywhere. A card's "8 GB" is 8 GiB (8 * 1024**3 bytes), the way vendors and
`torch.cuda.get_device_properties().total_memory` count it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Mapping

from engine.config import row_invariant_by_default
from engine.pointwise import GPU_ROWS
from engine.verify import ROWS_AT_ONCE, TEMPORARY_BYTES_PER_LOGIT

GIB = 1024**3
MIB = 1024**2
GB = 1000**3  # DESIGN.md quotes layer sizes in decimal GB (0.466 GB for a 7B layer)

# The driver's CUDA context and cuBLAS/cuDNN workspaces live outside torch's allocator.
CUDA_CONTEXT_BYTES = 500 * MIB
# Fragmentation and what the estimate misses: a fraction of the card, never below a floor.
SAFETY_MARGIN_FRACTION = 0.04
SAFETY_MARGIN_MIN_BYTES = 256 * MIB
# Reusable GPU buffers offloaded layers stream through (the engine's `offload_slots`), most
# preferred first. Measured on an H200 (Qwen2.5-7B shape, 8 GB cap): 2 buffers streamed at 0.82 of
# the PCIe bound, 3 at 1.00, so a third buffer is worth more than the resident layer it displaces
# whenever more than about 5 layers stream ((S - 1) / 0.82 > S for S streamed layers). A plan takes
# 3 when any plan fits with 3; 2, then 1 (no copy overlaps compute) only to fit at all.
STREAM_BUFFER_FALLBACK = (3, 2, 1)
# The reference tree: max_depth 32, top-6 per depth, plus the root.
DEFAULT_TREE_NODES = 1 + 32 * 6
DEFAULT_PREFILL_CHUNK = 512
# The context a chat gets when the user does not choose one: the longest of these that costs the
# plan no stream buffer (longest_context).
CONTEXT_CHOICES = (8192, 4096, 2048)
DEFAULT_MAX_CONTEXT = CONTEXT_CHOICES[0]
FP32_BYTES = 4
# A row-invariant forward's visible slots per token x slot (engine.pointwise.visible_keys): the
# bool mask, its uint8 key, argsort's int64 and the int32 copy.
VISIBLE_KEY_BYTES = 1 + 1 + 8 + 4
# The widest draft forward planned for: the profile tries 6, 16 and 32 tokens per forward.
DRAFT_ROWS = 32


class ModelShapeError(ValueError):
    """A config this model cannot plan for (missing keys, mixture of experts...): one line."""


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a decoder-only transformer that decide its memory."""

    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool
    qkv_bias: bool  # Qwen2 always, Llama/Mistral when attention_bias is set
    o_bias: bool  # Llama's attention_bias also adds a bias to o_proj
    mlp_bias: bool
    qk_norm: bool  # Qwen3: RMSNorm over head_dim on q and k

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        """From a transformers PretrainedConfig or a config.json dict."""
        data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        if isinstance(data.get("text_config"), Mapping):  # multimodal wrappers: plan the language model
            data = {**data["text_config"], "model_type": data["text_config"].get("model_type", data.get("model_type"))}
        if any(data.get(key) for key in ("num_local_experts", "num_experts", "n_routed_experts")):
            raise ModelShapeError("mixture-of-experts models are not supported by the memory model")
        missing = [
            key
            for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
            if not data.get(key)
        ]
        if missing:
            raise ModelShapeError(f"model config lacks {', '.join(missing)}: cannot estimate its memory")
        model_type = str(data.get("model_type") or "unknown")
        heads = int(data["num_attention_heads"])
        attention_bias = bool(data.get("attention_bias", False))
        return cls(
            model_type=model_type,
            hidden=int(data["hidden_size"]),
            intermediate=int(data["intermediate_size"]),
            layers=int(data["num_hidden_layers"]),
            heads=heads,
            kv_heads=int(data.get("num_key_value_heads") or heads),
            head_dim=int(data.get("head_dim") or data["hidden_size"] // heads),
            vocab=int(data["vocab_size"]),
            # transformers' PretrainedConfig default is tied; Qwen2.5-7B+ and Llama-3.1 say false.
            tied_embeddings=bool(data.get("tie_word_embeddings", True)),
            qkv_bias=model_type == "qwen2" or attention_bias,
            o_bias=attention_bias and model_type != "qwen2",
            mlp_bias=bool(data.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
        )

    def linear_shapes(self) -> list[tuple[int, int, bool]]:
        """(out_features, in_features, has_bias) of the seven linears of one decoder layer."""
        q_out = self.heads * self.head_dim
        kv_out = self.kv_heads * self.head_dim
        return [
            (q_out, self.hidden, self.qkv_bias),  # q_proj
            (kv_out, self.hidden, self.qkv_bias),  # k_proj
            (kv_out, self.hidden, self.qkv_bias),  # v_proj
            (self.hidden, q_out, self.o_bias),  # o_proj
            (self.intermediate, self.hidden, self.mlp_bias),  # gate_proj
            (self.intermediate, self.hidden, self.mlp_bias),  # up_proj
            (self.hidden, self.intermediate, self.mlp_bias),  # down_proj
        ]

    def norm_params(self) -> int:
        """input + post-attention RMSNorm, plus Qwen3's q/k norms."""
        return 2 * self.hidden + (2 * self.head_dim if self.qk_norm else 0)

    def linear_bytes(self, dtype_bytes: int = 2) -> int:
        """The seven linears (weights and biases) of one layer: what one stream buffer holds
        (engine/offload.py packs exactly these; the norms stay on the GPU)."""
        return sum(out * inp + (out if bias else 0) for out, inp, bias in self.linear_shapes()) * dtype_bytes

    def layer_bytes(self, dtype_bytes: int = 2) -> int:
        """One decoder layer in the compute dtype: what streams over PCIe per offloaded layer."""
        return self.linear_bytes(dtype_bytes) + self.norm_params() * dtype_bytes

    def substitute_layer_bytes(self, bits: int, group: int, dtype_bytes: int = 2) -> int:
        """One HQQ substitute layer: seven quantized linears, their biases and the layer's norms
        (the norms must be on the GPU for the substitute even when the target layer streams)."""
        linears = sum(
            hqq_linear_bytes(out, inp, bits, group) + (out * dtype_bytes if bias else 0)
            for out, inp, bias in self.linear_shapes()
        )
        return linears + self.norm_params() * dtype_bytes

    def embedding_bytes(self, dtype_bytes: int = 2) -> int:
        """Token embeddings + lm_head (once when tied) + the final norm: always on the GPU."""
        matrices = 1 if self.tied_embeddings else 2
        return (matrices * self.vocab * self.hidden + self.hidden) * dtype_bytes

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes

    def workspace_bytes(self, tokens: int, context: int, logits_tokens: int, dtype_bytes: int = 2,
                        row_chunk: int | None = None, causal: bool = False) -> int:
        """Transient memory of one forward over `tokens` new tokens attending to `context` slots,
        with logits for `logits_tokens` of them (every node of a tree; the last token of a prefill),
        and of the target's choice from those logits.

        The logits dominate a tree verification: nodes * vocab in the compute dtype and again as
        fp32, then, while a token is chosen, the fp32 logits and the temporaries of ROWS_AT_ONCE rows
        (engine.verify: softmax, top-p's sort). Then attention: a row-invariant target (`row_chunk`,
        engine.pointwise.row_invariant) attends with a kernel that holds no scores, from each row's
        sorted visible slots (bool mask, uint8 key, int64 argsort, int32 copy: 14 bytes per
        token x slot; a `causal` chunk's are one shared row, nothing per token); any other target
        with torch's attention, whose math fallback materializes fp32 scores (heads * tokens *
        context) next to the bool mask and its additive bias. The MLP's gate, up and product and a
        few hidden-sized tensors are small. A row-invariant target pads its rows to whole chunks:
        its hidden-sized tensors and its logits in the compute dtype have that many rows.
        """
        def padded(rows: int) -> int:
            return -(-rows // row_chunk) * row_chunk if row_chunk else rows

        forward_logits = self.vocab * (padded(logits_tokens) * dtype_bytes + logits_tokens * FP32_BYTES)
        temporaries = min(logits_tokens, ROWS_AT_ONCE) * self.vocab * TEMPORARY_BYTES_PER_LOGIT
        choosing = logits_tokens * self.vocab * FP32_BYTES + temporaries
        if row_chunk:
            attention = 0 if causal else tokens * context * VISIBLE_KEY_BYTES
        else:
            attention = tokens * context * (self.heads * FP32_BYTES + 1 + dtype_bytes)
        mlp = 3 * padded(tokens) * self.intermediate * dtype_bytes
        qkv = padded(tokens) * (self.heads + 2 * self.kv_heads) * self.head_dim * dtype_bytes
        hidden = 4 * padded(tokens) * self.hidden * dtype_bytes
        return max(forward_logits, choosing) + attention + mlp + qkv + hidden

    def prefill_rows_bytes(self, tokens: int, dtype_bytes: int = 2) -> int:
        """What a prefill keeps of every new token between layers (engine/model.py runs it layer by
        layer over all its chunks): the residual stream and its norm (hidden-sized each) and the
        token's rotary rows (head_dim-sized cos and sin)."""
        return tokens * 2 * (self.hidden + self.head_dim) * dtype_bytes

    def draft_workspace_bytes(self, rows: int = DRAFT_ROWS, dtype_bytes: int = 2) -> int:
        """What draft steps keep while a tree is verified: their CUDA graphs' memory pool holds the
        widest forward's logits (compute dtype, fp32, scaled, log-softmax) and one output per
        frontier width (engine.graphs pads widths to powers of two: 1, 2, 4, ... up to the batch,
        together under 2 * rows rows), under 3 * rows rows of fp32."""
        return self.vocab * rows * (dtype_bytes + 3 * FP32_BYTES + 3 * FP32_BYTES)


def eagle_feature_bytes(hidden: int, max_context: int, tree_nodes: int, dtype_bytes: int = 2) -> int:
    """What engine.drafters.EagleDrafter keeps besides the head: the target's feature at every
    context position, and the predicted feature of every tree node (+ the root's input)."""
    return (max_context + tree_nodes + 1) * hidden * dtype_bytes


def hqq_linear_bytes(out_features: int, in_features: int, bits: int, group: int) -> int:
    """Bytes of an HQQLinear (axis=1) as hqq stores it, bias excluded.

    hqq reshapes W to (numel / group, group), packs along the first dimension
    (hqq/core/bitpack.py: 8, 6 and 5 bits as one uint8 each, 4 bits two per uint8, 2 bits four per
    uint8, 1 bit eight per uint8, 3 bits ten per int32, the rows padded to a multiple of ten) and
    keeps one scale and one zero per group in the compute dtype (fp16/bf16: 2 + 2 bytes).
    Checked against HQQLinear tensors in tests/test_profiles_memory.py.
    """
    numel = out_features * in_features
    if numel % group:
        raise ModelShapeError(f"a {out_features}x{in_features} weight does not split into groups of {group}")
    rows = numel // group
    if bits == 3:
        packed = math.ceil(rows / 10) * group * 4
    elif bits in (8, 6, 5):
        packed = numel
    elif bits in (4, 2, 1):
        packed = numel * bits // 8
    else:
        raise ModelShapeError(f"HQQ has no {bits}-bit packing (use 1, 2, 3, 4, 5, 6 or 8)")
    scale_and_zero = rows * 2 * 2
    return packed + scale_and_zero


@dataclass(frozen=True)
class Plan:
    """Whether and how a model + method fits a card. Byte fields are the breakdown of the total."""

    method: str
    vram_bytes: int  # the card (or the --vram-limit-gb cap) this plan is for
    layers_total: int
    layers_on_gpu: int  # bf16 decoder layers resident; the rest stream from pinned CPU memory
    fits: bool
    reason: str  # one line: why it does not fit ("" when it does)
    max_context: int
    tree_nodes: int  # nodes of one verification (1 for vanilla)
    substitute_bits: int | None  # subspec_sd only
    substitute_group: int | None
    layer_bytes: int  # one bf16 decoder layer
    substitute_layer_bytes: int  # one substitute layer (0 without a substitute)
    resident_layers_bytes: int
    embedding_bytes: int
    substitute_bytes: int
    draft_bytes: int  # classic_sd's draft model or eagle_sd's head: its own weights and KV
    kv_cache_bytes: int
    stream_buffers: int  # device buffers offloaded layers stream through; 0 when every layer is resident
    stream_buffer_bytes: int  # stream_buffers x one layer's bf16 linears (+ compressed streaming's staging buffer)
    workspace_bytes: int
    cuda_context_bytes: int
    safety_margin_bytes: int
    compressed_streaming: bool = False  # streamed layers cross PCIe (and sit in host RAM) compressed

    @property
    def weights_bytes(self) -> int:
        return self.resident_layers_bytes + self.embedding_bytes + self.substitute_bytes + self.draft_bytes

    @property
    def buffers_bytes(self) -> int:
        return self.stream_buffer_bytes + self.workspace_bytes

    @property
    def estimated_peak_bytes(self) -> int:
        """What torch.cuda.max_memory_allocated should read during a verification."""
        return self.weights_bytes + self.kv_cache_bytes + self.buffers_bytes

    @property
    def total_bytes(self) -> int:
        """Everything the card must hold: the allocations plus CUDA context and safety margin."""
        return self.estimated_peak_bytes + self.cuda_context_bytes + self.safety_margin_bytes

    @property
    def offloaded_bytes(self) -> int:
        """Weights streamed over PCIe per target forward."""
        return (self.layers_total - self.layers_on_gpu) * self.layer_bytes

    @property
    def pinned_host_bytes(self) -> int:
        """Host RAM the streamed layers occupy, pinned (it cannot be swapped out)."""
        return int(self.offloaded_bytes * (COMPRESSED_FRACTION if self.compressed_streaming else 1))

    def stream_bound_ms(self, h2d_gbps: float) -> float:
        """Physical floor of one target forward at a measured pinned bandwidth (GB/s, decimal)."""
        return self.offloaded_bytes / (h2d_gbps * GB) * 1000.0

    def summary(self) -> str:
        """One line, like LM Studio's estimate."""
        verdict = "fits" if self.fits else f"does not fit: {self.reason}"
        return (
            f"weights {self.weights_bytes / GIB:.2f} GiB, KV {self.kv_cache_bytes / GIB:.2f} GiB, "
            f"buffers {self.buffers_bytes / GIB:.2f} GiB ({self.stream_buffers} stream buffers and workspace), "
            f"{self.layers_on_gpu} of {self.layers_total} layers on GPU, "
            f"{self.total_bytes / GIB:.2f} of {self.vram_bytes / GIB:.2f} GiB: {verdict}"
            + (f"; {self.pinned_host_bytes / GIB:.2f} GiB of pinned host RAM for the streamed layers"
               if self.fits and self.pinned_host_bytes else "")
        )

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(
            weights_bytes=self.weights_bytes,
            buffers_bytes=self.buffers_bytes,
            estimated_peak_bytes=self.estimated_peak_bytes,
            total_bytes=self.total_bytes,
            offloaded_bytes=self.offloaded_bytes,
            pinned_host_bytes=self.pinned_host_bytes,
        )
        return data


# engine.compress's size of a layer against its bf16 bytes, rounded up from the 0.678 and 0.700
# measured on Gaussian and row-scaled Student-t weights (benchmarks/compress_gpu.py): what the
# staging buffer the stream buffers share holds with compressed streaming.
COMPRESSED_FRACTION = 0.72


def safety_margin_bytes(vram_bytes: int) -> int:
    return max(SAFETY_MARGIN_MIN_BYTES, int(vram_bytes * SAFETY_MARGIN_FRACTION))


def estimate_plan(
    model_config: Any,
    vram_bytes: int,
    method: str = "subspec_sd",
    *,
    max_context: int = DEFAULT_MAX_CONTEXT,
    substitute_bits: int = 4,
    substitute_group: int = 64,
    tree_nodes: int | None = None,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    draft_config: Any = None,
    dtype_bytes: int = 2,
    cuda_context_bytes: int = CUDA_CONTEXT_BYTES,
    stream_buffers: int | None = None,
    compressed_streaming: bool = False,
) -> Plan:
    """Plan `method` for the model of `model_config` on a card of `vram_bytes`.

    Stream buffers: the first count of STREAM_BUFFER_FALLBACK (3, 2, 1) with which any plan fits,
    or exactly `stream_buffers` when given (a benchmark comparing counts). Layers kept on the GPU =
    the largest N whose total fits with that count. subspec_sd keeps all L substitute layers
    resident plus N bf16 layers; classic_sd/eagle_sd keep the whole draft model resident
    (`draft_config` is required for them). Stream buffers are only needed when N < L, and never
    more than the L - N layers that stream (the engine allocates no more). With
    `compressed_streaming` the stream buffers share one staging buffer for the compressed bytes
    (COMPRESSED_FRACTION of a layer).
    Raises ModelShapeError (a ValueError) for a config it cannot plan or a bad argument.
    """
    shape = ModelShape.from_config(model_config)
    if method not in ("vanilla", "subspec_sd", "classic_sd", "eagle_sd"):
        raise ModelShapeError(f"unknown method {method!r}")
    if max_context < 1 or vram_bytes <= 0:
        raise ModelShapeError("max_context and the VRAM size must be positive")
    if stream_buffers is not None and stream_buffers < 1:
        raise ModelShapeError(f"stream_buffers must be at least 1, got {stream_buffers}")
    buffer_counts = STREAM_BUFFER_FALLBACK if stream_buffers is None else (stream_buffers,)
    drafts = method != "vanilla"
    nodes = (tree_nodes or DEFAULT_TREE_NODES) if drafts else 1
    uses_substitute = method == "subspec_sd"

    draft_bytes = 0
    if method in ("classic_sd", "eagle_sd"):
        if draft_config is None:
            raise ModelShapeError(f"{method} needs the draft model's config to estimate its memory")
        draft = ModelShape.from_config(draft_config)
        # An EAGLE head reads the target's embeddings and lm_head (engine/eagle.py): its own
        # weights are its decoder layer and fc, [H, 2H] with a bias, where a draft model has
        # embeddings and a head of its own.
        own_weights = (2 * draft.hidden * draft.hidden + draft.hidden) * dtype_bytes if method == "eagle_sd" \
            else draft.embedding_bytes(dtype_bytes)
        draft_bytes = (
            draft.layers * draft.layer_bytes(dtype_bytes)
            + own_weights
            + draft.kv_bytes_per_token(dtype_bytes) * max_context
            + (eagle_feature_bytes(shape.hidden, max_context, nodes, dtype_bytes) if method == "eagle_sd" else 0)
        )
    layer = shape.layer_bytes(dtype_bytes)
    buffer = shape.linear_bytes(dtype_bytes)
    staging = int(buffer * COMPRESSED_FRACTION) if compressed_streaming else 0
    substitute_layer = shape.substitute_layer_bytes(substitute_bits, substitute_group, dtype_bytes) if uses_substitute else 0
    # The target's default (EngineConfig.row_invariant): row-invariant in the 16-bit dtypes.
    row_chunk = GPU_ROWS if row_invariant_by_default(dtype_bytes) else None
    workspace = max(
        shape.workspace_bytes(nodes, max_context, nodes, dtype_bytes, row_chunk),  # one tree verification
        # one prefill chunk's transients while the whole prompt's rows wait for the next layer
        shape.workspace_bytes(min(prefill_chunk, max_context), max_context, 1, dtype_bytes, row_chunk, causal=True)
        + shape.prefill_rows_bytes(max_context, dtype_bytes),
    ) + (shape.draft_workspace_bytes(dtype_bytes=dtype_bytes) if drafts else 0)
    margin = safety_margin_bytes(vram_bytes)

    def plan_with(resident: int, buffers: int) -> Plan:
        streaming = 0 if resident == shape.layers else min(buffers, shape.layers - resident)
        return Plan(
            method=method,
            vram_bytes=vram_bytes,
            layers_total=shape.layers,
            layers_on_gpu=resident,
            fits=True,
            reason="",
            max_context=max_context,
            tree_nodes=nodes,
            substitute_bits=substitute_bits if uses_substitute else None,
            substitute_group=substitute_group if uses_substitute else None,
            layer_bytes=layer,
            substitute_layer_bytes=substitute_layer,
            resident_layers_bytes=resident * layer,
            embedding_bytes=shape.embedding_bytes(dtype_bytes),
            substitute_bytes=shape.layers * substitute_layer,
            draft_bytes=draft_bytes,
            kv_cache_bytes=shape.kv_bytes_per_token(dtype_bytes) * max_context,
            stream_buffers=streaming,
            stream_buffer_bytes=streaming * buffer + (staging if streaming else 0),
            workspace_bytes=workspace,
            cuda_context_bytes=cuda_context_bytes,
            safety_margin_bytes=margin,
            compressed_streaming=compressed_streaming,
        )

    # Total memory grows with N except at N = L, where the stream buffers disappear: try all.
    for buffers in buffer_counts:
        for resident in range(shape.layers, -1, -1):
            plan = plan_with(resident, buffers)
            if plan.total_bytes <= vram_bytes:
                return plan
    smallest = plan_with(0, buffer_counts[-1])
    plural = "s" if smallest.stream_buffers > 1 else ""
    reason = (
        f"needs {smallest.total_bytes / GIB:.2f} GiB with every layer streamed through "
        f"{smallest.stream_buffers} buffer{plural} "
        f"(weights {smallest.weights_bytes / GIB:.2f}, KV {smallest.kv_cache_bytes / GIB:.2f}, "
        f"buffers {smallest.buffers_bytes / GIB:.2f}, CUDA context and margin "
        f"{(smallest.cuda_context_bytes + smallest.safety_margin_bytes) / GIB:.2f}), "
        f"the card has {vram_bytes / GIB:.2f} GiB"
    )
    return replace(smallest, fits=False, reason=reason)


def longest_context(plan_for: Callable[[int], Plan], model_config: Any = None) -> int:
    """The longest of CONTEXT_CHOICES (within the model's max_position_embeddings) whose plan fits
    with as many stream buffers as the shortest's, or every layer resident: a longer context may
    cost resident layers (one layer of L streams 1/L more bytes per token), never a stream buffer
    (2 buffers streamed a 7B at 0.82 of the PCIe bound, 3 at 1.00). The shortest when none fits
    (the profile then says why). `plan_for(context)` is the method's plan at that context."""
    data = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config or {})
    longest = int(data.get("max_position_embeddings") or CONTEXT_CHOICES[0])
    contexts = sorted({min(context, longest) for context in CONTEXT_CHOICES}, reverse=True)
    plans = [plan_for(context) for context in contexts]

    def buffers(plan: Plan) -> int:
        return plan.stream_buffers if plan.layers_on_gpu < plan.layers_total else max(STREAM_BUFFER_FALLBACK)

    for context, plan in zip(contexts, plans):
        if plan.fits and buffers(plan) >= buffers(plans[-1]):
            return context
    return contexts[-1]
