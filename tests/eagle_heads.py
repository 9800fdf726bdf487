"""EAGLE heads for tests, in the EAGLE authors' format (config.json + model.safetensors)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def save_random_head(folder: Path, target: Path, seed: int = 0, std: float = 0.1) -> Path:
    """A random head shaped for the model in `target`."""
    config = json.loads((target / "config.json").read_text())
    hidden, heads, kv_heads = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    shapes = {"q_proj": (heads * head_dim, hidden), "k_proj": (kv_heads * head_dim, hidden),
              "v_proj": (kv_heads * head_dim, hidden), "o_proj": (hidden, heads * head_dim),
              "gate_proj": (config["intermediate_size"], hidden), "up_proj": (config["intermediate_size"], hidden),
              "down_proj": (hidden, config["intermediate_size"])}
    state = {f"layers.0.{'self_attn' if n in ATTENTION else 'mlp'}.{n}.weight": r(*s) for n, s in shapes.items()}
    state |= {"fc.weight": r(hidden, 2 * hidden), "fc.bias": r(hidden),
              "layers.0.post_attention_layernorm.weight": 1 + r(hidden)}
    return _save(folder, config, state)


def save_exact_head(folder: Path, target: Path) -> Path:
    """For a one-layer target whose attention adds nothing (o_proj zero) and whose final norm's
    weights are ones: the head that computes the target's feature up to a positive scale per row
    (fc passes the token's embedding, the layer is the target's; with no attention output the
    layer's input norm changes nothing), so it drafts the target's own greedy tokens."""
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
    layer = model.model.layers[0]
    hidden = model.config.hidden_size
    state = {f"layers.0.self_attn.{n}.weight": getattr(layer.self_attn, n).weight.data for n in ATTENTION}
    state |= {f"layers.0.mlp.{n}.weight": getattr(layer.mlp, n).weight.data for n in MLP}
    state |= {"fc.weight": torch.cat((torch.eye(hidden), torch.zeros(hidden, hidden)), dim=1),
              "layers.0.post_attention_layernorm.weight": layer.post_attention_layernorm.weight.data}
    return _save(folder, json.loads((target / "config.json").read_text()), state)


def exact_head_target(folder: Path) -> Path:
    """Reshape a saved one-layer random model into what save_exact_head needs."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight.zero_()
        model.model.norm.weight.fill_(1.0)
    model.save_pretrained(folder)
    return folder


def _save(folder: Path, config: dict, state: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))
    return folder
