"""Offloaded decoding on a real GPU with a random-weight model of a real shape, under a VRAM cap.

Prints, next to each figure, its physical bound measured in the same run:
- pinned host-to-device bandwidth (GB/s);
- vanilla offloaded decode: ms per token and tok/s against stream_bound_ms (offloaded bytes /
  measured bandwidth), efficiency = bound / measured;
- SubSpec: one verification forward over trees of 193 and 289 nodes against the same bound, and one
  draft step (all substitute layers, 6 tokens) against the HBM floor of the 4-bit bytes.
Random weights do not change timings (they do change tau: tau needs real weights).

    python benchmarks/offload_gpu.py --shape qwen2.5-7b --vram-limit-gb 8 [--json out.json]
On a CPU it runs a tiny shape end to end (nothing meaningful is timed), so it cannot rot.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from engine import EngineConfig, SamplingConfig
from engine.build import engine_from_model
from engine.loading import LoadedModel
from engine.stats import Timer
from engine.tree import Tree
from profiles import estimate_plan

SHAPES = {
    "qwen2.5-7b": lambda: Qwen2Config(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                                       tie_word_embeddings=False, max_position_embeddings=32768),
    "qwen2.5-14b": lambda: Qwen2Config(hidden_size=5120, intermediate_size=13824, num_hidden_layers=48,
                                        num_attention_heads=40, num_key_value_heads=8, vocab_size=152064,
                                        tie_word_embeddings=False, max_position_embeddings=32768),
    "llama-3.1-8b": lambda: LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                         tie_word_embeddings=False, max_position_embeddings=131072),
    "tiny": lambda: Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                                num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False),
}


class _NoText:
    """Timing runs need token ids only; random weights make no text worth decoding."""

    eos_token_id = None
    chat_template = None

    def decode(self, ids, skip_special_tokens=True) -> str:
        return ""


def random_model(config, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """Built on the meta device and filled tensor by tensor where the random numbers are fast."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            if tensor.is_floating_point():
                tensor.copy_(torch.empty(tensor.shape, dtype=tensor.dtype, device=device).normal_(0, 0.02))
        model.model.rotary_emb.__init__(config)  # buffers recomputed, not random
    return model.eval()


def plan_layers(config, vram_gb: float, method: str, max_length: int, tree_nodes: int, slots: int = 3) -> int:
    plan = estimate_plan(config, int(vram_gb * 2**30), method, max_context=max_length, tree_nodes=tree_nodes,
                         stream_buffers=slots)
    if not plan.fits:
        raise SystemExit(f"{method} does not fit {vram_gb} GB: {plan.reason}")
    return plan.layers_on_gpu


def bench_vanilla(model, config, args, device, slots: int) -> dict:
    keep = plan_layers(config, args.vram_limit_gb, "vanilla", args.max_length, 1, slots) if device.type == "cuda" else 2
    engine = engine_from_model(
        EngineConfig(method="vanilla", device=str(device), vram_limit_gb=args.vram_limit_gb, offload_slots=slots,
                     keep_first_n_layers_on_gpu=keep, max_length=args.max_length, emulate_offload=device.type == "cpu"),
        LoadedModel(model, _NoText(), args.shape, None),
    )
    prompt = torch.randint(0, config.vocab_size, (64,)).tolist()
    engine.generate(prompt, SamplingConfig(max_new_tokens=4))  # warm-up
    gen = engine.generate(prompt, SamplingConfig(max_new_tokens=args.tokens))
    stats = gen.stats.as_dict()
    info = engine.describe()
    engine.close()
    ms_per_token = 1e3 / stats["tok_per_s"]
    return {
        "layers_on_gpu": info["layers_on_gpu"], "layers_total": info["layers_total"],
        "offloaded_gb": info["offloaded_bytes"] / 1e9, "h2d_gbps": info["h2d_gbps"],
        "ms_per_token": ms_per_token, "tok_per_s": stats["tok_per_s"], "verify_ms": stats["verify_ms"],
        "transfer_ms": stats["transfer_ms"], "stream_bound_ms": stats["stream_bound_ms"],
        "efficiency": stats["stream_bound_ms"] / ms_per_token if stats["stream_bound_ms"] else None,
        "peak_gpu_gb": (stats["peak_gpu_bytes"] or 0) / 1e9,
    }


def bench_subspec(model, config, args, device) -> dict:
    keep = plan_layers(config, args.vram_limit_gb, "subspec_sd", args.max_length, 289) if device.type == "cuda" else 2
    engine = engine_from_model(
        EngineConfig(method="subspec_sd", device=str(device), vram_limit_gb=args.vram_limit_gb,
                     keep_first_n_layers_on_gpu=keep, max_length=args.max_length, max_depth=48, topk_len=6,
                     emulate_offload=device.type == "cpu"),
        LoadedModel(model, _NoText(), args.shape, None),
    )
    target, drafter = engine.target, engine.drafter
    prompt = torch.randint(0, config.vocab_size, (64,), device=device)
    target.transformer.prefill(target.stack, target.cache, prompt, 512)
    timer = Timer(device)
    out: dict = {"layers_on_gpu": engine.describe()["layers_on_gpu"],
                 "substitute_gb": engine.describe()["substitute_bytes"] / 1e9,
                 "stream_bound_ms": engine.describe()["stream_bound_ms"]}
    for nodes in (1, 193, 289):
        tree = _random_tree(nodes, config.vocab_size, target.cache.length, device)
        times = []
        for _ in range(args.repeats):
            with timer.span("verify"):
                idx = torch.arange(tree.size, device=device)
                target.transformer.forward(target.stack, target.cache, tree.tokens[: tree.size], tree.positions(idx),
                                           tree.slots(idx), tree.mask(idx), target.cache.length + tree.size)
            times.append(timer.collect()["verify"])
            target.stack.take_transfer_ms()
        out[f"verify_ms_{nodes}"] = sorted(times)[len(times) // 2]
    tree = _random_tree(1 + 6 * 8, config.vocab_size, target.cache.length, device)
    frontier = torch.arange(tree.size - 6, tree.size, device=device)
    times = []
    for _ in range(args.repeats):
        with timer.span("draft"):
            drafter._step(tree, frontier)
        times.append(timer.collect()["draft"])
    out["draft_ms_per_depth"] = sorted(times)[len(times) // 2]
    out["substitute_hbm_floor_ms"] = out["substitute_gb"] / 4.8e3 * 1e3  # 4.8 TB/s datasheet HBM
    engine.close()
    return out


def _random_tree(nodes: int, vocab: int, prefix_len: int, device: torch.device) -> Tree:
    """Reference-shaped tree: a root then layers of 6 nodes, each hanging off the previous layer."""
    tree = Tree(nodes, device)
    tree.reset(torch.tensor(1, device=device), prefix_len)
    frontier = torch.zeros(1, dtype=torch.long, device=device)
    while tree.size < nodes:
        width = min(6, nodes - tree.size)
        parents = frontier[torch.randint(0, frontier.numel(), (width,), device=device)]
        frontier = tree.add(parents, torch.randint(0, vocab, (width,), device=device), torch.zeros(width, device=device))
    return tree


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-7b")
    parser.add_argument("--vram-limit-gb", type=float, default=8.0)
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-subspec", action="store_true")
    parser.add_argument("--slots", type=int, nargs="+", default=[3])
    parser.add_argument("--json")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        args.shape = "tiny"
    config = SHAPES[args.shape]()
    started = time.perf_counter()
    model = random_model(config, torch.bfloat16 if device.type == "cuda" else torch.float32, device)
    print(f"built random {args.shape} in {time.perf_counter() - started:.1f} s on {device}")
    result = {"shape": args.shape, "vram_limit_gb": args.vram_limit_gb,
              "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
    for slots in args.slots:
        result[f"vanilla_slots{slots}"] = v = bench_vanilla(model, config, args, device, slots)
        print(f"vanilla, {slots} prefetch slots: {v['layers_on_gpu']}/{v['layers_total']} layers on GPU, "
              f"{v['offloaded_gb']:.2f} GB streamed per token")
        if v["stream_bound_ms"]:
            print(f"  pinned H2D {v['h2d_gbps']:.1f} GB/s -> stream_bound_ms {v['stream_bound_ms']:.1f}")
            print(f"  measured {v['ms_per_token']:.1f} ms/token ({v['tok_per_s']:.2f} tok/s), forward {v['verify_ms']:.1f} ms, "
                  f"copy stream {v['transfer_ms']:.1f} ms -> efficiency {v['efficiency']:.3f} of the bound; "
                  f"peak {v['peak_gpu_gb']:.2f} GB")
    if not args.skip_subspec:
        result["subspec"] = s = bench_subspec(model, config, args, device)
        bound = s["stream_bound_ms"]
        print(f"subspec: {s['layers_on_gpu']} bf16 layers resident + {s['substitute_gb']:.2f} GB substitute")
        for nodes in (1, 193, 289):
            ratio = f" = {s[f'verify_ms_{nodes}'] / bound:.3f} x bound {bound:.1f}" if bound else ""
            print(f"  verify {nodes:3d} nodes: {s[f'verify_ms_{nodes}']:.1f} ms{ratio}")
        print(f"  draft step (6 tokens, all layers): {s['draft_ms_per_depth']:.2f} ms "
              f"vs HBM floor {s['substitute_hbm_floor_ms']:.3f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
