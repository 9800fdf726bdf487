"""tau (tokens per verification, bonus included) of drafting policies on the bundled real model.

Greedy, MT-Bench first turns, every policy on the same prompts, prompt by prompt (running figures
are printed and saved after each prompt); each policy's tokens are compared with vanilla decoding's
(the lossless promise, reported per prompt). tau = emitted tokens / verifications over all prompts.

    python benchmarks/tau_bundled.py [--prompts 20] [--new-tokens 128] [--device cuda] [--dtype float32]
                                     [--row-invariant] [--policies 'best-first floor;chain'] [--eagle-head DIR]

In bfloat16 a policy can differ from vanilla at near-ties unless --row-invariant (README: "Greedy
output and bfloat16"); this counts the identical replies either way.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from engine import EngineConfig, SamplingConfig, load_engine
from engine.config import MIN_DRAFT_PROB

DATA = Path(__file__).resolve().parents[1] / "subspec_tui" / "data" / "mt_bench_questions.jsonl"


def best_first(budget: int, depth: int, batch: int, floor: bool = False) -> dict:
    """A best-first tree: without a floor it drafts `batch` nodes every forward (the rows here that
    predate the floor); with one it leaves out nodes below MIN_DRAFT_PROB (engine/config.py)."""
    return dict(tree_policy="best_first", max_depth=depth, topk_len=6, node_budget=budget, draft_batch=batch,
                min_draft_prob=MIN_DRAFT_PROB if floor else 0.0)


POLICIES = {
    "reference tree (depth 32, top-6)": dict(tree_policy="reference", max_depth=32, topk_len=6),
    "best-first (192-node budget)": best_first(192, 32, 6),
    "best-first (192-node budget, 16 per draft forward)": best_first(192, 32, 16),
    "best-first floor (192-node budget, 16 per draft forward)": best_first(192, 32, 16, floor=True),
    "best-first floor (192-node budget, 32 per draft forward)": best_first(192, 32, 32, floor=True),
    "chain (depth 32, top-1)": dict(tree_policy="reference", max_depth=32, topk_len=1),
    # The GPU profile's tree (289 nodes: free to verify on the 7B shape), 6, 16 or 32 nodes per
    # draft forward.
    "best-first 288 (6 per draft forward)": best_first(288, 48, 6),
    "best-first 288 (16 per draft forward)": best_first(288, 48, 16),
    # With the Triton int4 kernel a 32-token draft forward costs ~1.2x a 16-token one (H200, 7B).
    "best-first 288 (32 per draft forward)": best_first(288, 48, 32),
    "best-first floor 288 (16 per draft forward)": best_first(288, 48, 16, floor=True),
    "best-first floor 288 (32 per draft forward)": best_first(288, 48, 32, floor=True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--row-invariant", action=argparse.BooleanOptionalAction, default=None,
                        help="EngineConfig.row_invariant for every engine (default: the engine's, on in 16-bit dtypes)")
    parser.add_argument("--json")
    parser.add_argument("--policies", help="prefixes of the names to run, separated by ';' (names hold commas), "
                                           "e.g. 'best-first floor;chain' (default: all)")
    parser.add_argument("--eagle-head", help="also eagle_sd with this EAGLE head (benchmarks/train_eagle.py) on the "
                                             "default tree")
    args = parser.parse_args()
    policies = {name: dict(method="subspec_sd", **tree) for name, tree in POLICIES.items()
                if not args.policies or any(name.startswith(p) for p in args.policies.split(";"))}
    if args.eagle_head:
        policies["eagle_sd (best-first floor, 192-node budget, 16 per draft forward)"] = dict(
            method="eagle_sd", draft_model_path=args.eagle_head, **POLICIES["best-first floor (192-node budget, 16 per draft forward)"])
    questions = [json.loads(line)["turns"][0] for line in DATA.read_text().splitlines()[: args.prompts]]
    sampling = SamplingConfig(max_new_tokens=args.new_tokens)
    common = dict(device=args.device, dtype=args.dtype, row_invariant=args.row_invariant)

    vanilla = load_engine(EngineConfig(method="vanilla", **common))
    engines = {name: load_engine(EngineConfig(**common, **tree)) for name, tree in policies.items()}
    rows = {name: {"iterations": 0, "emitted": 0, "identical_to_vanilla": 0, "seconds": 0.0, "draft_forwards": 0,
                   "tree_nodes": 0}
            for name in policies}
    described = vanilla.describe()
    results = {"device": described["device"], "dtype": described["dtype"], "row_invariant": described["row_invariant"],
               "new_tokens": args.new_tokens, "prompts": 0, "vanilla_seconds": 0.0,
               "policies": rows}
    # Prompt by prompt, every policy on the same prompt: a run cut short still compares them fairly.
    for done, question in enumerate(questions, 1):
        prompt = vanilla.chat_ids([{"role": "user", "content": question}])
        started = time.perf_counter()
        want = vanilla.generate(prompt, sampling).token_ids
        results["vanilla_seconds"] += time.perf_counter() - started
        for name, engine in engines.items():
            started = time.perf_counter()
            gen = engine.generate(prompt, sampling)
            row = rows[name]
            row["seconds"] += time.perf_counter() - started
            row["identical_to_vanilla"] += gen.token_ids == want
            row["iterations"] += len(gen.stats.iterations)
            row["emitted"] += sum(it.emitted for it in gen.stats.iterations)
            row["draft_forwards"] += sum(it.draft_forwards for it in gen.stats.iterations)
            row["tree_nodes"] += sum(it.tree_nodes for it in gen.stats.iterations)
            row["tau"] = row["emitted"] / row["iterations"]
            row["draft_forwards_per_verification"] = row["draft_forwards"] / row["iterations"]
            row["nodes_per_verification"] = row["tree_nodes"] / row["iterations"]
        results["prompts"] = done
        print(f"after {done} prompts: " + "; ".join(
            f"{name}: tau {row['tau']:.2f}, {row['draft_forwards_per_verification']:.1f} draft forwards and "
            f"{row['nodes_per_verification']:.0f} nodes per verification, "
            f"{row['identical_to_vanilla']}/{done} identical" for name, row in rows.items()),
            flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
