"""tau (tokens per verification, bonus included) of drafting policies on the bundled real model.

Greedy, MT-Bench first turns, the same prompts for every policy; vanilla decoding runs first and
every policy's tokens are compared with it (the lossless promise, reported per prompt).

    python benchmarks/tau_bundled.py [--prompts 20] [--new-tokens 128] [--device cuda] [--dtype float32]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from engine import EngineConfig, SamplingConfig, load_engine

DATA = Path(__file__).resolve().parents[1] / "subspec_tui" / "data" / "mt_bench_questions.jsonl"
POLICIES = {
    "reference tree (depth 32, top-6)": dict(tree_policy="reference", max_depth=32, topk_len=6),
    "best-first (192-node budget)": dict(tree_policy="best_first", max_depth=32, topk_len=6, node_budget=192),
    "chain (depth 32, top-1)": dict(tree_policy="reference", max_depth=32, topk_len=1),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--json")
    args = parser.parse_args()
    questions = [json.loads(line)["turns"][0] for line in DATA.read_text().splitlines()[: args.prompts]]
    sampling = SamplingConfig(max_new_tokens=args.new_tokens)
    common = dict(device=args.device, dtype=args.dtype)

    vanilla = load_engine(EngineConfig(method="vanilla", **common))
    prompts = [vanilla.chat_ids([{"role": "user", "content": q}]) for q in questions]
    started = time.perf_counter()
    expected = [vanilla.generate(p, sampling).token_ids for p in prompts]
    vanilla_s = time.perf_counter() - started
    print(f"vanilla on {vanilla.describe()['device']} ({vanilla.describe()['dtype']}): "
          f"{sum(map(len, expected))} tokens in {vanilla_s:.1f} s")
    vanilla.close()

    results = {"device": args.device, "dtype": args.dtype, "prompts": args.prompts, "new_tokens": args.new_tokens,
               "vanilla_s": vanilla_s, "policies": {}}
    for name, tree in POLICIES.items():
        engine = load_engine(EngineConfig(method="subspec_sd", **common, **tree))
        engine.generate(prompts[0], SamplingConfig(max_new_tokens=8))  # warm-up (graph captures)
        taus, identical, started = [], 0, time.perf_counter()
        iterations = emitted = 0
        for prompt, want in zip(prompts, expected):
            gen = engine.generate(prompt, sampling)
            identical += gen.token_ids == want
            taus.append(gen.stats.tau)
            iterations += len(gen.stats.iterations)
            emitted += sum(it.emitted for it in gen.stats.iterations)
        seconds = time.perf_counter() - started
        results["policies"][name] = row = {
            "tau": emitted / iterations, "tau_mean_of_prompts": statistics.mean(taus),
            "identical_to_vanilla": identical, "seconds": seconds,
        }
        print(f"{name}: tau {row['tau']:.2f} (mean over prompts {row['tau_mean_of_prompts']:.2f}); "
              f"{identical}/{len(prompts)} prompts token-identical to vanilla; {seconds:.1f} s", flush=True)
        engine.close()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
