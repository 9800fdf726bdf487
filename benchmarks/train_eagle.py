"""Train an EAGLE head for a target on its own replies (self-distillation, as EAGLE does).

    python benchmarks/train_eagle.py [--llm-path PATH] [--prompts 150] [--new-tokens 128] [--epochs 8] [--out DIR]

1. Replies: the target's greedy replies (this engine's plain decoding) to prompts of the shared
   sets: MT-Bench first turns after the 20 that benchmarks/tau_bundled.py evaluates on, then GSM8K
   questions and HumanEval problems, in turn.
2. Features: the target's final-normed hidden states over prompt + reply (one forward each, the
   engine's own), and its next-token distributions.
3. The head (fc over [embedding of token t+1, feature at t], one Llama decoder layer without its
   input norm, transformers' modules) learns the feature at t+1: smooth L1 against it plus 0.1 x
   the cross-entropy of lm_head(prediction) against the target's greedy token (EAGLE weighs its
   two losses so; it uses the target's whole distribution, which for 150 replies would not fit in
   memory).
4. Saved in the EAGLE authors' format (engine.eagle) in --out, by default the platformdirs cache
   (<cache>/eagle-heads/<model>): never in the repository. Use it with
   `subspec --method eagle_sd --draft-model-path DIR ...`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine import EngineConfig, SamplingConfig, load_engine  # noqa: E402
from engine.loading import cache_dir, resolve_source  # noqa: E402

DATA = ROOT / "subspec_tui" / "data"
EVALUATED = 20  # MT-Bench first turns tau_bundled.py measures on: never trained on


def training_questions(count: int) -> list[str]:
    def lines(name: str) -> list[dict]:
        return [json.loads(line) for line in (DATA / name).read_text().splitlines()]

    pools = [[q["turns"][0] for q in lines("mt_bench_questions.jsonl")[EVALUATED:]],
             [q["question"] for q in lines("gsm8k_test.jsonl")],
             [f"Complete this Python function:\n{q['prompt']}" for q in lines("humaneval_problems.jsonl")]]
    interleaved = [pool[i] for i in range(max(map(len, pools))) for pool in pools if i < len(pool)]
    return interleaved[:count]


class Head(torch.nn.Module):
    """The EAGLE head in training: engine.eagle.EagleHead's forward with transformers' modules."""

    def __init__(self, target_config, embed: torch.nn.Embedding, cos: torch.Tensor, sin: torch.Tensor) -> None:
        super().__init__()
        hidden = target_config.hidden_size
        bias = bool(getattr(target_config, "attention_bias", False) or target_config.model_type == "qwen2")
        config = LlamaConfig(hidden_size=hidden, intermediate_size=target_config.intermediate_size,
                             num_attention_heads=target_config.num_attention_heads,
                             num_key_value_heads=target_config.num_key_value_heads,
                             head_dim=getattr(target_config, "head_dim", None) or hidden // target_config.num_attention_heads,
                             rms_norm_eps=target_config.rms_norm_eps, hidden_act=target_config.hidden_act,
                             attention_bias=bias, num_hidden_layers=1, vocab_size=target_config.vocab_size)
        config._attn_implementation = "sdpa"  # causal without a mask
        self.config = config
        self.fc = torch.nn.Linear(2 * hidden, hidden, bias=True)
        self.layer = LlamaDecoderLayer(config, layer_idx=0)
        self.embed, self.cos, self.sin = embed, cos, sin  # the target's, frozen

    def forward(self, tokens: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        x = self.fc(torch.cat((self.embed(tokens), features), dim=-1))[None]
        rotary = (self.cos[: tokens.numel()][None], self.sin[: tokens.numel()][None])
        attended, _ = self.layer.self_attn(hidden_states=x, position_embeddings=rotary, attention_mask=None)
        x = x + attended
        return (x + self.layer.mlp(self.layer.post_attention_layernorm(x)))[0]

    def eagle_state(self) -> dict[str, torch.Tensor]:
        state = {f"fc.{k}": v for k, v in self.fc.state_dict().items()}
        state |= {f"layers.0.{k}": v for k, v in self.layer.state_dict().items() if not k.startswith("input_layernorm")}
        return {k: v.detach().contiguous() for k, v in state.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llm-path", help="the target (default: the bundled model)")
    parser.add_argument("--prompts", type=int, default=150)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    folder, name = resolve_source(args.llm_path, lambda _msg: None)
    out = args.out or cache_dir() / "eagle-heads" / name.replace("/", "--").replace(":", "-")
    engine = load_engine(EngineConfig(llm_path=args.llm_path, dtype="float32", device="cpu"))
    target = engine.target.transformer

    started = time.perf_counter()
    sequences = []
    for question in training_questions(args.prompts):
        ids = engine.chat_ids([{"role": "user", "content": question}])
        sequences.append(torch.tensor(ids + engine.generate(ids, SamplingConfig(max_new_tokens=args.new_tokens)).token_ids))
    tokens_total = sum(s.numel() for s in sequences)
    print(f"{len(sequences)} replies, {tokens_total} tokens, in {time.perf_counter() - started:.0f} s", flush=True)

    data = []  # (tokens t+1, features t, features t+1, the target's greedy token t+2)
    for seq in sequences:
        cache = target.new_cache(seq.numel())
        positions = torch.arange(seq.numel())
        logits, features = target.forward(engine.target.stack, cache, seq, positions, positions,
                                          positions[None] <= positions[:, None], seq.numel(), features=True)
        data.append((seq[1:], features[:-1].clone(), features[1:].clone(), logits[1:].argmax(-1).clone()))

    hf_config = target.config
    head = Head(hf_config, torch.nn.Embedding.from_pretrained(target.embed.weight.detach().clone()),
                target.cos.clone(), target.sin.clone())
    trainable = [p for n, p in head.named_parameters() if not n.startswith("embed")]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)
    steps = args.epochs * len(data)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    lm_head = target.lm_head.weight.detach()
    started = time.perf_counter()
    for epoch in range(args.epochs):
        totals = [0.0, 0.0, 0]
        for i in torch.randperm(len(data)).tolist():
            next_tokens, features, wanted, greedy = data[i]
            predicted = head(next_tokens, features)
            regression = F.smooth_l1_loss(predicted, wanted)
            logits = F.linear(predicted, lm_head)
            classification = F.cross_entropy(logits, greedy)
            loss = regression + 0.1 * classification
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 0.5)
            optimizer.step()
            scheduler.step()
            agree = (logits.argmax(-1) == greedy).float().mean().item()
            totals = [totals[0] + regression.item(), totals[1] + agree, totals[2] + 1]
        print(f"epoch {epoch + 1}: smooth L1 {totals[0] / totals[2]:.4f}, top-1 agreement with the target "
              f"{totals[1] / totals[2]:.3f} (training data)", flush=True)
    print(f"trained in {time.perf_counter() - started:.0f} s", flush=True)

    out.mkdir(parents=True, exist_ok=True)
    save_file(head.eagle_state(), out / "model.safetensors")
    (out / "config.json").write_text(json.dumps({**head.config.to_dict(), "architectures": ["EagleHead"]}, indent=1))
    print(f"saved the head in {out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
