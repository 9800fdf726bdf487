"""The decoder forward pass (Llama / Qwen2 / Qwen3 / Mistral), written out in plain PyTorch.

One `Transformer` owns what every copy of the network shares: embeddings, norms, rotary tables and
lm_head. The decoder-layer linears come from a `LayerStack` passed to each call: the target's
(resident + streamed bf16) or the substitute's (HQQ modules), so the draft and the target run the
very same code over the very same KV cache. Any forward takes T tokens at explicit positions and
cache slots with an explicit [T, kv_end] attention mask, which is all tree drafting and tree
verification need.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers.activations import ACT2FN

from engine.cache import KVCache
from engine.pointwise import EAGER, Pointwise, pad_rows

# Eager forwards attend over key lengths never seen before (the length grows by one token or one
# accepted path per step). cuDNN's attention builds and caches an execution plan per shape: on an
# H200 each new length stalled the host 20-50 ms, long enough to starve the layer stream (vanilla
# 7B ran at 0.85 of the PCIe bound, 1.00 without cuDNN; benchmarks/offload_gpu.py). These kernels
# take any length with no per-shape set-up. Draft steps replayed from CUDA graphs have a few fixed
# shapes, so they plan once per shape and keep cuDNN's single masked-attention kernel.
ANY_LENGTH_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
FIXED_SHAPE_ATTENTION = [SDPBackend.CUDNN_ATTENTION, *ANY_LENGTH_ATTENTION]


class Stack(Protocol):
    """Per-layer linears for one forward (see engine.offload.LayerStack)."""

    num_layers: int

    def weights(self, i: int) -> dict: ...

    def done(self, i: int) -> None: ...


class Transformer:
    def __init__(self, hf_model: torch.nn.Module, device: torch.device, max_length: int) -> None:
        config = hf_model.config
        inner = hf_model.model
        self.config = config
        self.device = device
        self.dtype = inner.embed_tokens.weight.dtype
        self.num_layers = config.num_hidden_layers
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.vocab_size = config.vocab_size
        self.gate_up_sizes = (config.intermediate_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]
        self.embed = inner.embed_tokens.to(device)
        self.lm_head = hf_model.lm_head.to(device)
        # RMSNorms as (weight, eps): the math is engine.pointwise.rms_norm, the modules' own.
        self.final_norm = _norm(inner.norm, device)
        self.norms = [
            (_norm(layer.input_layernorm, device), _norm(layer.post_attention_layernorm, device),
             _norm(getattr(layer.self_attn, "q_norm", None), device), _norm(getattr(layer.self_attn, "k_norm", None), device))
            for layer in inner.layers
        ]
        positions = torch.arange(max_length, device=device)[None]
        probe = torch.empty(0, dtype=self.dtype, device=device)
        cos, sin = inner.rotary_emb.to(device)(probe, positions)
        self.cos, self.sin = cos[0], sin[0]  # [max_length, head_dim]: the shared rotary tables

    def new_cache(self, max_length: int) -> KVCache:
        return KVCache(self.num_layers, self.num_kv_heads, self.head_dim, max_length, self.dtype, self.device)

    @torch.inference_mode()
    def forward(
        self,
        stack: Stack,
        cache: KVCache,
        tokens: torch.Tensor,  # [T] token ids
        positions: torch.Tensor,  # [T] rotary positions
        slots: torch.Tensor,  # [T] KV cache slots to write
        mask: torch.Tensor | None,  # [T, kv_end] bool, True = may attend; None = attend all
        kv_end: int,  # attention reads slots [0, kv_end)
        logits_rows: torch.Tensor | slice = slice(None),
        ops: Pointwise = EAGER,
        fixed_shape: bool = False,  # this shape is replayed many times (a CUDA-graph draft step)
        features: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits (float32) of the selected rows, after writing the tokens' KV at `slots`; with
        `features`, also every row's final-normed hidden state [T, hidden] (an EAGLE head's input)."""
        x = self.embed(tokens)
        cos, sin = self.cos[positions], self.sin[positions]
        # The row-invariant target's rows, padded once here (padding rows compute and store nothing
        # anyone reads): its row-wise functions then run whole chunks.
        x, cos, sin = (pad_rows(t, ops.rows) for t in (x, cos, sin))
        attn_mask = None if mask is None else ops.attention_mask(mask, self.dtype)
        h = ops.rms_norm(x, *self.norms[0][0])
        with sdpa_kernel(FIXED_SHAPE_ATTENTION if fixed_shape else ANY_LENGTH_ATTENTION, set_priority=True):
            for i in range(stack.num_layers):
                x, h = self._layer(stack.weights(i), cache, i, x, h, cos, sin, slots, attn_mask, kv_end, ops)
                stack.done(i)
        logits = self._logits(h[: tokens.shape[0]][logits_rows], ops)
        return (logits, h[: tokens.shape[0]]) if features else logits

    @torch.inference_mode()
    def prefill(self, stack: Stack, cache: KVCache, prompt: torch.Tensor, chunk: int, kept: int = 0,
                ops: Pointwise = EAGER, features: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Run the prompt from slot `kept` (slots [0, kept) already hold the KV of its first `kept`
        tokens, reused from an earlier generation); returns the last token's logits [V] (with
        `features`, also the final-normed hidden states of the tokens it ran, [len - kept, hidden]).

        Layer by layer, each over every causal chunk of `chunk` new tokens: an offloaded layer
        crosses PCIe once per prefill however long the prompt (chunk by chunk through all layers,
        a 1500-token prompt streamed the weights three times). The chunks bound the workspace; the
        residual stream of every new token (two hidden-sized rows each) is what this costs.
        `ops`: the row-invariant target computes each row as a one-token forward would, so reused
        and freshly computed KV are the same numbers whatever the chunking."""
        cache.truncate(kept)
        spans = [(start, min(start + chunk, prompt.numel())) for start in range(kept, prompt.numel(), chunk)]
        rows = [self._prefill_rows(prompt, start, end, ops) for start, end in spans]  # (x, h, cos, sin) per chunk
        with sdpa_kernel(ANY_LENGTH_ATTENTION, set_priority=True):
            for i in range(stack.num_layers):
                weights = stack.weights(i)
                for k, (start, end) in enumerate(spans):
                    x, h, cos, sin = rows[k]
                    slots = torch.arange(start, end, device=self.device)
                    mask = ops.causal_mask(slots, end, self.dtype)
                    rows[k] = (*self._layer(weights, cache, i, x, h, cos, sin, slots, mask, end, ops), cos, sin)
                stack.done(i)
        cache.truncate(prompt.numel())
        last = spans[-1][1] - spans[-1][0] - 1
        logits = self._logits(rows[-1][1][last : last + 1], ops)[0]
        if not features:
            return logits
        return logits, torch.cat([h[: end - start] for (_, h, _, _), (start, end) in zip(rows, spans)])

    def _prefill_rows(self, prompt: torch.Tensor, start: int, end: int, ops: Pointwise) -> tuple[torch.Tensor, ...]:
        """The first layer's input of prompt[start:end]: (x, h = its input norm, cos, sin), padded."""
        positions = torch.arange(start, end, device=self.device)
        x, cos, sin = (pad_rows(t, ops.rows) for t in (self.embed(prompt[start:end]), self.cos[positions], self.sin[positions]))
        return x, ops.rms_norm(x, *self.norms[0][0]), cos, sin

    def _layer(self, weights, cache, i, x, h, cos, sin, slots, attn_mask, kv_end, ops):
        """Decoder layer i over hidden states x (h: x under the layer's input norm); returns the
        next layer's (x, h)."""
        _, post_norm, q_norm, k_norm = self.norms[i]
        attended = self._attention(weights, cache, i, h, cos, sin, slots, attn_mask, kv_end, q_norm, k_norm, ops)
        x, h = ops.add_rms_norm(x, attended, *post_norm)
        # gate and up die with the call: the norm below holds fp32 rows of its own.
        gated = ops.gated(self.act, *_projections(weights, "gate_up_proj", ("gate_proj", "up_proj"), self.gate_up_sizes, h, ops))
        mlp = _linear(weights, "down_proj", gated, ops)
        del gated
        next_norm = self.norms[i + 1][0] if i + 1 < self.num_layers else self.final_norm
        return ops.add_rms_norm(x, mlp, *next_norm)

    def _logits(self, h: torch.Tensor, ops: Pointwise) -> torch.Tensor:
        return ops.linear(h, self.lm_head.weight, self.lm_head.bias).float()

    def _attention(self, weights, cache, layer, h, cos, sin, slots, attn_mask, kv_end, q_norm, k_norm, ops):
        T = slots.shape[0]  # h's rows may be padded (Pointwise.rows)
        qkv = _concatenated(weights, "qkv_proj", ("q_proj", "k_proj", "v_proj"), h, ops)
        q = ops.store_attention_inputs(qkv.unflatten(-1, (-1, self.head_dim)), cos, sin, self.num_heads, q_norm,
                                       k_norm, cache.layer(layer), slots).transpose(0, 1)  # [H, T, D], a view
        keys, values = cache.view(layer, kv_end)
        attended = ops.attend(q[:, :T], keys, values, attn_mask)  # [T, H, D]
        return _linear(weights, "o_proj", pad_rows(attended.reshape(T, -1), ops.rows), ops)


def _linear(weights: dict, name: str, x: torch.Tensor, ops: Pointwise, partial_sums: bool | None = None) -> torch.Tensor:
    """x W^T + b; with partial sums (ops.partial_sums unless told), as [S, ...] partial sums for a
    reader that adds them: a split-K int4 linear's own, else the output as the only one."""
    partial_sums = ops.partial_sums if partial_sums is None else partial_sums
    w = weights[name]
    if partial_sums and hasattr(w, "partial_sums"):
        return w.partial_sums(x)
    if isinstance(w, torch.Tensor):
        y = ops.linear(x, w, weights.get(f"{name}.bias"))
    else:
        y = w(x)  # a quantized module (the substitute) carries its own bias
    return y[None] if partial_sums else y


def _projections(
    weights: dict, fused: str, names: tuple[str, ...], sizes: tuple[int, ...], x: torch.Tensor, ops: Pointwise
) -> tuple[torch.Tensor, ...]:
    """The linears `names` (output widths `sizes`) of x: one matmul when the stack holds them
    stacked as `fused` (the substitute's kernels), else one each (the target's streamed weights)."""
    if fused not in weights:
        return tuple(_linear(weights, name, x, ops) for name in names)
    return _linear(weights, fused, x, ops).split(sizes, dim=-1)


def _concatenated(weights: dict, fused: str, names: tuple[str, ...], x: torch.Tensor, ops: Pointwise) -> torch.Tensor:
    """The linears `names` of x side by side: one matmul when the stack holds them stacked as
    `fused`, else one each, concatenated."""
    if fused in weights:
        return _linear(weights, fused, x, ops)
    out = torch.cat([_linear(weights, name, x, ops, partial_sums=False) for name in names], dim=-1)
    return out[None] if ops.partial_sums else out


def _norm(module: torch.nn.Module | None, device: torch.device) -> tuple[torch.Tensor, float] | None:
    if module is None:
        return None
    return module.weight.data.to(device), float(module.variance_epsilon)
