"""The EAGLE draft head (EAGLE-1/2, arXiv 2401.15077 and 2406.16858): one decoder layer over the
target's own features. At position t it reads [embedding of token t+1, the target's feature at t]
(the final-normed hidden state lm_head reads), squeezed back to the hidden size by `fc`, and
predicts the feature at t+1; the target's lm_head turns that into next-token logits. Embeddings,
lm_head and rotary tables are the target's; the head has its own one-layer KV cache.

Published heads (the EAGLE authors' format, e.g. yuhuili/EAGLE-LLaMA3.1-Instruct-8B): a folder with
config.json and `pytorch_model.bin` or `model.safetensors` holding `fc.weight` [H, 2H] (and
`fc.bias`), `layers.0.self_attn.{q,k,v,o}_proj.weight` (biases where the head has them),
`layers.0.mlp.{gate,up,down}_proj.weight` and `layers.0.post_attention_layernorm.weight`; the
first layer has no input norm and the output no final norm.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from engine.cache import KVCache
from engine.errors import EngineError
from engine.model import Transformer
from engine.pointwise import EAGER, rms_norm

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_PREFIX = {name: f"layers.0.{'self_attn' if name.endswith(('q_proj', 'k_proj', 'v_proj', 'o_proj')) else 'mlp'}.{name}"
           for name in LINEARS}


@dataclass
class EagleHead:
    target: Transformer  # embeddings, lm_head, rotary tables
    weights: dict[str, torch.Tensor]  # fc, fc.bias, the seven linears (+ biases), post_norm
    num_heads: int
    num_kv_heads: int
    head_dim: int
    eps: float
    act: object

    def new_cache(self, max_length: int) -> KVCache:
        return KVCache(1, self.num_kv_heads, self.head_dim, max_length, self.target.dtype, self.target.device)

    @torch.inference_mode()
    def forward(self, cache: KVCache, tokens: torch.Tensor, features: torch.Tensor, positions: torch.Tensor,
                slots: torch.Tensor, mask: torch.Tensor, kv_end: int) -> torch.Tensor:
        """The predicted features [T, H] of entries (token, feature of the position before it),
        after writing their KV at `slots`; `mask` [T, kv_end] says which slots each may attend."""
        w = self.weights
        x = F.linear(torch.cat((self.target.embed(tokens), features.to(self.target.dtype)), dim=-1), w["fc"], w.get("fc.bias"))
        qkv = torch.cat([F.linear(x, w[n], w.get(f"{n}.bias")) for n in ("q_proj", "k_proj", "v_proj")], dim=-1)
        cos, sin = self.target.cos[positions], self.target.sin[positions]
        q = EAGER.store_attention_inputs(qkv.unflatten(-1, (-1, self.head_dim)), cos, sin, self.num_heads, None,
                                         None, cache.layer(0), slots).transpose(0, 1)
        keys, values = cache.view(0, kv_end)
        attended = EAGER.attend(q, keys, values, EAGER.attention_mask(mask, x.dtype))
        x = x + F.linear(attended.reshape(x.shape[0], -1), w["o_proj"], w.get("o_proj.bias"))
        h = rms_norm(x, w["post_norm"], self.eps)
        mlp = F.linear(self.act(F.linear(h, w["gate_proj"])) * F.linear(h, w["up_proj"]), w["down_proj"])
        return x + mlp

    @torch.inference_mode()
    def logits(self, predicted: torch.Tensor) -> torch.Tensor:
        return F.linear(predicted, self.target.lm_head.weight, self.target.lm_head.bias).float()


def load_eagle_head(path: str | None, target: Transformer) -> EagleHead:
    """A head from `path` (see the module's docstring), checked against `target`; every expected
    failure is one EngineError line."""
    if not path:
        raise EngineError("eagle_sd needs an EAGLE head: pass --draft-model-path (a folder with config.json and weights)")
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise EngineError(f"not an EAGLE head folder (no config.json): {folder}")
    try:
        config = json.loads((folder / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise EngineError(f"corrupt config.json in {folder}: {err}") from None
    state = _read_weights(folder)
    hidden = target.embed.weight.shape[1]
    if "fc.weight" not in state or tuple(state["fc.weight"].shape) != (hidden, 2 * hidden):
        found = tuple(state["fc.weight"].shape) if "fc.weight" in state else "none"
        raise EngineError(f"the EAGLE head in {folder} does not fit this model: its fc is {found}, the model's "
                          f"hidden size {hidden} needs ({hidden}, {2 * hidden})")
    vocab = config.get("vocab_size")
    if vocab is not None and vocab != target.vocab_size:
        raise EngineError(f"the EAGLE head in {folder} has a vocabulary of {vocab}, the model {target.vocab_size}")
    missing = [f"{_PREFIX[n]}.weight" for n in LINEARS if f"{_PREFIX[n]}.weight" not in state]
    missing += [] if "layers.0.post_attention_layernorm.weight" in state else ["layers.0.post_attention_layernorm.weight"]
    if missing:
        raise EngineError(f"the EAGLE head in {folder} lacks {', '.join(missing)}")
    num_heads = config.get("num_attention_heads", target.num_heads)
    head_dim = config.get("head_dim") or hidden // num_heads
    if head_dim != target.head_dim:
        raise EngineError(f"the EAGLE head in {folder} has {head_dim}-wide attention heads, the model {target.head_dim}: "
                          "its rotary tables would not fit")
    device, dtype = target.device, target.dtype
    weights = {"fc": state["fc.weight"], "post_norm": state["layers.0.post_attention_layernorm.weight"]}
    if "fc.bias" in state:
        weights["fc.bias"] = state["fc.bias"]
    for name in LINEARS:
        weights[name] = state[f"{_PREFIX[name]}.weight"]
        if f"{_PREFIX[name]}.bias" in state:
            weights[f"{name}.bias"] = state[f"{_PREFIX[name]}.bias"]
    return EagleHead(
        target=target,
        weights={k: v.to(device=device, dtype=dtype) for k, v in weights.items()},
        num_heads=num_heads,
        num_kv_heads=config.get("num_key_value_heads", num_heads),
        head_dim=head_dim,
        eps=float(config.get("rms_norm_eps", 1e-6)),
        act=ACT2FN[config.get("hidden_act", "silu")],
    )


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not files:
        raise EngineError(f"no weights in the EAGLE head folder {folder} (model.safetensors or pytorch_model.bin)")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            part = load_file(file) if file.suffix == ".safetensors" else torch.load(file, map_location="cpu", weights_only=True)
        except (SafetensorError, OSError, RuntimeError, EOFError) as err:
            raise EngineError(f"cannot read the EAGLE head's weights {file}: {str(err).splitlines()[0]}") from None
        # Some heads were saved with a "model." prefix: the names inside are what matter.
        state |= {k.removeprefix("model."): v for k, v in part.items()}
    return state
