"""Acceptance walks over a verified tree, and the target's token choice per node.

`choose` turns the target's logits at every tree node into the token the target emits there: the
argmax (greedy) or ONE independent sample from the processed distribution (temperature, top-k,
top-p). The walk then starts at the root and follows the child carrying the chosen token. Each
emitted token is therefore exactly the target's own choice given the tokens before it, so greedy
output equals plain decoding and sampled output follows the target distribution. Drawing a sample
at every node at once (one batched draw, one transfer) instead of along the path changes nothing:
the draws are independent and only the visited nodes' draws are used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from engine.config import SamplingConfig

# Rows of a tree's [nodes, vocab] logits processed at once where a row needs full-vocabulary
# temporaries (top-p's sort keeps fp32 values and int64 indices, the softmaxes fp32 copies): for a
# 289-node tree and Qwen's 152k vocabulary that is ~1 GB at once (counted from the ops; measured on
# an H200 without top-p, 0.35 GB), 16 rows at a time ~80 MB.
ROWS_AT_ONCE = 16
# Bytes per logit those temporaries take at most (profiles.memory plans for ROWS_AT_ONCE rows).
TEMPORARY_BYTES_PER_LOGIT = 32


def processed_probs(logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """Softmax after temperature, top-k then top-p (the order transformers applies them)."""
    logits = logits / sampling.temperature
    if sampling.top_k and sampling.top_k < logits.shape[-1]:
        kth = logits.topk(sampling.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative <= (1 - sampling.top_p)
        drop_sorted[..., -1:] = False  # always keep the most probable token
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(dim=-1)


def choose(logits: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """The target's token at each row of `logits` [N, V]."""
    if sampling.greedy:
        return logits.argmax(dim=-1)
    return _by_rows(lambda rows: torch.multinomial(processed_probs(rows, sampling), 1, generator=generator)[:, 0],
                    logits)


def _by_rows(fn: Callable[[torch.Tensor], torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
    """fn of every row, ROWS_AT_ONCE rows at a time (fn treats each row on its own)."""
    return torch.cat([fn(chunk) for chunk in rows.split(ROWS_AT_ONCE)])


@dataclass
class Walk:
    path: list[int]  # accepted nodes after the root, in order
    bonus: int  # the target's token at the last accepted node: always emitted
    lossy_accepts: int = 0  # draft tokens taken although the target chose otherwise


def walk(tokens: list[int], parents: list[int], chosen: list[int]) -> Walk:
    """Exact acceptance: follow the child that carries the target's token while there is one."""
    children = _token_children(tokens, parents)
    node, path = 0, []
    while (child := children[node].get(chosen[node])) is not None:
        path.append(child)
        node = child
    return Walk(path=path, bonus=chosen[node])


def walk_lossy(
    tokens: list[int],
    parents: list[int],
    chosen: list[int],
    lenient: list[bool],
    window_size: int,
) -> Walk:
    """Lossy acceptance (opt-in): where no child carries the target's token, a `lenient` child
    (the target is confident, see `lenient_nodes`) may still be taken if at least `window_size`
    exact matches follow it. Output no longer equals plain decoding; every stats object says so."""
    children = _token_children(tokens, parents)
    node, path, lossy = 0, [], 0
    while True:
        child = children[node].get(chosen[node])
        if child is None:
            child = next(
                (c for c in children[node].values()
                 if lenient[c] and _exact_run(children, chosen, c) >= window_size),
                None,
            )
            lossy += child is not None
        if child is None:
            return Walk(path=path, bonus=chosen[node], lossy_accepts=lossy)
        path.append(child)
        node = child


def lenient_nodes(
    logits: torch.Tensor, tokens: torch.Tensor, parents: torch.Tensor, method: str, threshold: float
) -> torch.Tensor:
    """Per node i: may its token be accepted although the target chose otherwise at its parent?
    entropy: the target's normalised entropy at the parent is below `threshold`;
    prob: the target gives node i's token a probability above `threshold` at the parent."""
    if method == "entropy":
        return _by_rows(lambda rows: _normalised_entropy(rows) < threshold, logits)[parents]
    # (parent, token) pairs: the parent's row is gathered for each node, so chunks bound it too.
    token_probs = _by_rows(lambda pairs: logits[pairs[:, 0]].float().softmax(dim=-1).gather(-1, pairs[:, 1:])[:, 0],
                           torch.stack((parents, tokens), dim=1))
    return token_probs > threshold


def _normalised_entropy(logits: torch.Tensor) -> torch.Tensor:
    probs = logits.float().softmax(dim=-1)
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(dim=-1)
    return entropy / torch.log(torch.tensor(float(logits.shape[-1])))


def _exact_run(children: list[dict[int, int]], chosen: list[int], node: int) -> int:
    count = 0
    while (node := children[node].get(chosen[node])) is not None:
        count += 1
    return count


def _token_children(tokens: list[int], parents: list[int]) -> list[dict[int, int]]:
    children: list[dict[int, int]] = [{} for _ in tokens]
    for node in range(1, len(tokens)):
        if parents[node] >= 0:  # -1: a placeholder no walk may take (Tree.host_view)
            children[parents[node]].setdefault(tokens[node], node)
    return children
