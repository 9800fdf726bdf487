"""Tiny random-weight models of every supported architecture, saved as ordinary model folders
(with the bundled tokenizer, which covers their small vocabularies) so tests load them through
the same path a user's model takes."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, Qwen2Config, Qwen3Config

COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def config_for(arch: str, vocab_size: int = 512, **overrides):
    kwargs = {**COMMON, "vocab_size": vocab_size, **overrides}
    if arch == "llama":
        return LlamaConfig(**kwargs)
    if arch == "qwen2":
        return Qwen2Config(**kwargs)  # q/k/v biases
    if arch == "qwen3":
        return Qwen3Config(head_dim=16, **kwargs)  # per-head q/k norms
    raise ValueError(arch)


def save_random_model(folder: Path, arch: str, tokenizer_folder: Path, seed: int = 0, **overrides) -> Path:
    """A random model whose logits are peaked enough for drafts to be accepted sometimes."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config_for(arch, **overrides), dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.15)  # larger than the 0.02 default: less uniform outputs
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_folder).save_pretrained(folder)
    return folder
