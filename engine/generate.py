"""THE generation loop, for every method: prefill, then draft -> verify -> accept -> emit.

    root = first token from the prefill logits
    repeat:
        drafter grows a tree from root                   (vanilla: root only)
        target runs ONE forward over every tree node     (streams offloaded layers once)
        walk: follow the children the target agrees with; the target's token where it stops is
              the bonus token
        compact the accepted path's KV, emit path tokens + bonus; root = bonus
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch

from engine.cache import KVCache
from engine.config import EngineConfig, SamplingConfig
from engine.drafters import Drafter
from engine.emit import Emitter
from engine.model import Stack, Transformer
from engine.pointwise import EAGER, Pointwise
from engine.stats import GenerationStats, IterationStats, Timer, nvtx_range
from engine.tree import Tree, TreeShape
from engine.verify import choose, lenient_nodes, walk, walk_lossy


@dataclass
class Target:
    transformer: Transformer
    stack: Stack
    cache: KVCache
    transfer_ms: Callable[[], float | None]  # copy-stream time since the last call
    ops: Pointwise = EAGER  # or engine.pointwise.row_invariant: every row as plain decoding computes it


def run(
    target: Target,
    drafter: Drafter,
    config: EngineConfig,
    prompt_ids: list[int],
    sampling: SamplingConfig,
    emitter: Emitter,
    stats: GenerationStats,
    on_iteration: Callable[[IterationStats], None] | None = None,
    cancel: threading.Event | None = None,
    kept: int = 0,
) -> list[int]:
    """Generate after `prompt_ids`, whose first `kept` tokens the cache already holds (an earlier
    turn). Returns the token ids the cache holds afterwards, slot by slot (the next turn's `kept`
    is their common prefix with its prompt)."""
    device = target.transformer.device
    cache = target.cache
    generator = _generator(sampling, device)
    timer = Timer(device, nvtx=config.nvtx_profiling)
    tree = Tree(1 + config.draft_nodes(), device)

    started = time.perf_counter()
    prompt = torch.tensor(prompt_ids, dtype=torch.long, device=device)
    # An EAGLE head drafts from the target's features: the prefill's and each accepted path's.
    wants_features = drafter.needs_features
    prefilled = target.transformer.prefill(target.stack, cache, prompt, config.prefill_chunk, kept, target.ops,
                                           features=wants_features)
    last_logits, prompt_features = prefilled if wants_features else (prefilled, None)
    drafter.prefill(prompt, config.prefill_chunk, kept, prompt_features)
    held = list(prompt_ids)
    root = int(choose(last_logits[None], sampling, generator)[0])
    target.transfer_ms()  # the prefill's copies are not a verification's
    stats.prefill_ms = (time.perf_counter() - started) * 1e3
    decode_started = time.perf_counter()
    emitter.push([root])

    while not emitter.finished:
        if cancel is not None and cancel.is_set():
            emitter.finish("cancelled")
            break
        room = cache.max_length - cache.length  # slots left for the root and its tree
        if room < 1:
            emitter.finish("context")
            break
        iteration_started = time.perf_counter()
        shape = TreeShape(
            max_depth=min(config.max_depth, emitter.remaining - 1, room - 1),
            max_nodes=min(config.draft_nodes(), room - 1),
        )
        tree.reset(root, cache.length)
        with timer.span("draft"):
            draft_forwards = drafter.draft(tree, shape, cancel)
        if cancel is not None and cancel.is_set():  # stopped mid-draft: nothing of this tree is emitted
            emitter.finish("cancelled")
            break
        with timer.span("verify"):
            chosen, lenient, node_features = _verify(target, tree, sampling, generator, config, wants_features)
        if lenient is not None:
            tokens, parents, chosen_ids, lenient_ids = tree.host_view(chosen, lenient)
            result = walk_lossy(tokens, parents, chosen_ids, [bool(x) for x in lenient_ids], config.window_size)
        else:
            tokens, parents, chosen_ids = tree.host_view(chosen)
            result = walk(tokens, parents, chosen_ids)
        path_slots = [cache.length] + [cache.length + node for node in result.path]
        path_tokens = [tokens[0]] + [tokens[node] for node in result.path]
        with nvtx_range("commit", config.nvtx_profiling):
            cache.commit(path_slots)
            path_features = None
            if node_features is not None:  # from pageable memory without waiting, as cache.commit
                path_features = node_features[torch.tensor([0, *result.path]).to(device, non_blocking=True)]
            drafter.commit(path_slots, path_tokens, path_features)
        held += path_tokens
        accepted = [tokens[node] for node in result.path] + [result.bonus]
        emitted = emitter.push(accepted)  # tau counts what reached the user, not what ran past EOS
        timings = timer.collect()
        iteration = IterationStats(
            emitted=emitted,
            draft_ms=timings["draft"] if tree.size > 1 else None,
            verify_ms=timings["verify"],
            transfer_ms=target.transfer_ms(),
            tree_nodes=tree.size,
            draft_forwards=draft_forwards,
            accepted_depth=len(result.path),
            iteration_ms=(time.perf_counter() - iteration_started) * 1e3,
        )
        stats.add(iteration)
        if on_iteration is not None:
            on_iteration(iteration)
        root = result.bonus

    stats.decode_s = time.perf_counter() - decode_started
    return held


def _verify(
    target: Target, tree: Tree, sampling: SamplingConfig, generator: torch.Generator | None, config: EngineConfig,
    features: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The target's token at every node of the tree, verifying lossily which nodes may pass
    leniently, and with `features` every node's final-normed hidden state. The [nodes, vocab]
    logits live only in here: the next verification's are never allocated while these are still
    held (on a 7B model that is 176 MB of peak memory)."""
    cache = target.cache
    nodes = torch.arange(tree.size, device=target.transformer.device)
    out = target.transformer.forward(
        target.stack,
        cache,
        tree.tokens[: tree.size],
        tree.positions(nodes),
        tree.slots(nodes),
        tree.mask(nodes) if tree.size > 1 else None,
        kv_end=cache.length + tree.size,
        ops=target.ops,
        features=features,
    )
    logits, node_features = out if features else (out, None)
    with nvtx_range("sample", config.nvtx_profiling):
        chosen = choose(logits, sampling, generator)
    if config.verify_method != "lossy":
        return chosen, None, node_features
    return chosen, lenient_nodes(logits, tree.tokens[: tree.size], tree.parents[: tree.size],
                                 config.threshold_method, config.threshold), node_features


def _generator(sampling: SamplingConfig, device: torch.device) -> torch.Generator | None:
    if sampling.greedy:
        return None
    generator = torch.Generator(device=device)
    if sampling.seed is not None:
        generator.manual_seed(sampling.seed)
    else:
        generator.seed()
    return generator
