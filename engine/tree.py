"""Token trees: storage, attention masks, positions, and the drafting policies that grow them.

Node 0 is the root (the last emitted token, whose KV is not cached yet). Node i sits at cache slot
`prefix_len + i` and rotary position `prefix_len + depth[i]`; it may attend to the prefix, its
ancestors and itself. A tree lives in device tensors sized once for its capacity, and node counts
per step are fixed by the policy, so drafting never waits on the host.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

# Draft log-probabilities [F, V] of the children of frontier nodes `nodes` (F,), the frontier's KV
# written into the cache as a side effect.
DraftStep = Callable[["Tree", torch.Tensor], torch.Tensor]


class Tree:
    def __init__(self, capacity: int, device: torch.device) -> None:
        self.capacity = capacity
        self.tokens = torch.zeros(capacity, dtype=torch.long, device=device)
        self.parents = torch.zeros(capacity, dtype=torch.long, device=device)
        self.depths = torch.zeros(capacity, dtype=torch.long, device=device)
        self.scores = torch.zeros(capacity, dtype=torch.float32, device=device)  # cumulative log p
        self.ancestors = torch.zeros(capacity, capacity, dtype=torch.bool, device=device)
        self.size = 0
        self.prefix_len = 0

    def reset(self, root_token: int, prefix_len: int) -> None:
        self.prefix_len = prefix_len
        self.size = 1
        # fill_, not `= value`: an assigned Python number is copied from pageable host memory, which
        # waits for the GPU (torch.cuda.set_sync_debug_mode flags it); fill_ passes it as an argument.
        self.tokens[0].fill_(root_token)
        self.depths[0].fill_(0)
        self.scores[0].fill_(0.0)
        self.ancestors[0].zero_()
        self.ancestors[0, 0].fill_(True)

    def add(self, parents: torch.Tensor, tokens: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Append len(parents) nodes; returns their indices."""
        start, count = self.size, parents.numel()
        idx = torch.arange(start, start + count, device=self.tokens.device)
        self.tokens[idx] = tokens
        self.parents[idx] = parents
        self.depths[idx] = self.depths[parents] + 1
        self.scores[idx] = scores
        self.ancestors[idx] = self.ancestors[parents]
        # Values as device tensors: an assigned Python number would wait for the GPU (see reset).
        self.ancestors[idx, idx] = torch.ones_like(idx, dtype=torch.bool)
        self.size = start + count
        return idx

    def positions(self, nodes: torch.Tensor) -> torch.Tensor:
        return self.prefix_len + self.depths[nodes]

    def slots(self, nodes: torch.Tensor) -> torch.Tensor:
        return self.prefix_len + nodes

    def mask(self, nodes: torch.Tensor) -> torch.Tensor:
        """[len(nodes), prefix_len + size] bool: prefix, ancestors and self."""
        prefix = torch.ones(nodes.numel(), self.prefix_len, dtype=torch.bool, device=nodes.device)
        return torch.cat((prefix, self.ancestors[nodes, : self.size]), dim=1)

    def host_view(self, *per_node: torch.Tensor) -> list[list[int]]:
        """[tokens, parents, *per_node] of the whole tree on the host, in ONE transfer: the loop's
        only wait for the device. A placeholder node (score -inf, see grow_best_first) gets parent
        -1, so no walk can reach it."""
        n = self.size
        parents = self.parents[:n].masked_fill(~torch.isfinite(self.scores[:n]), -1)
        rows = [self.tokens[:n], parents] + [t[:n].long() for t in per_node]
        return torch.stack(rows).tolist()


@dataclass
class TreeShape:
    """How big a tree may grow this iteration (the policy's budget capped by cache and output)."""

    max_depth: int
    max_nodes: int  # besides the root


def grow_reference(tree: Tree, step: DraftStep, shape: TreeShape, topk: int) -> None:
    """The reference policy: per depth, keep the global top-k children of the frontier by
    cumulative draft probability; 1 + depth * k nodes."""
    frontier = torch.zeros(1, dtype=torch.long, device=tree.tokens.device)
    for _ in range(shape.max_depth):
        width = min(topk, shape.max_nodes - (tree.size - 1))
        if width <= 0:
            break
        logp = step(tree, frontier)  # [F, V]
        candidates = (tree.scores[frontier][:, None] + logp).flatten()
        scores, flat = candidates.topk(min(width, candidates.numel()))
        vocab = logp.shape[1]
        frontier = tree.add(frontier[flat // vocab], flat % vocab, scores)


def grow_best_first(
    tree: Tree, step: DraftStep, shape: TreeShape, batch: int, children: int, min_score: float | None = None
) -> None:
    """Best-first: repeatedly add the `batch` most probable (cumulative) nodes not in the tree yet,
    among the top `children` continuations of every node drafted so far, then draft them.

    Without `min_score`, node counts never depend on device values (the host never waits): when
    fewer real candidates remain than the batch (a tiny vocabulary, the depth cap), the picks with
    score -inf are added as placeholders that no acceptance walk can reach (Tree.host_view).

    With `min_score` (a cumulative log-probability), a pick below it is not drafted, and the tree
    ends when no candidate reaches it: the host reads the count once per forward. Nodes the draft
    all but rules out then leave their budget to the paths it is sure of, so a confident stretch is
    drafted deeper than `max_nodes / batch` forwards would reach, and an unsure one stops early."""
    device = tree.tokens.device
    candidate_scores = torch.full((tree.capacity, children), float("-inf"), device=device)
    candidate_tokens = torch.zeros((tree.capacity, children), dtype=torch.long, device=device)
    frontier = torch.zeros(1, dtype=torch.long, device=device)
    budget = min(shape.max_nodes, _full_tree_nodes(children, shape.max_depth))
    while True:
        room = budget - (tree.size - 1)
        if room <= 0:
            break
        logp = step(tree, frontier)
        top_logp, top_tokens = logp.topk(min(children, logp.shape[1]), dim=1)
        candidate_scores[frontier, : top_logp.shape[1]] = tree.scores[frontier][:, None] + top_logp
        candidate_tokens[frontier, : top_tokens.shape[1]] = top_tokens
        # A node deeper than max_depth must not be added: mask out children of the deepest nodes.
        too_deep = (tree.depths[: tree.size] >= shape.max_depth)[:, None]
        pool = candidate_scores[: tree.size].masked_fill(too_deep, float("-inf")).flatten()
        # Every node has drafted `children` candidates and every node but the root took one of them:
        # at most this many real ones remain (with children = 1 the tree stays a chain at any batch).
        remaining = tree.size * (children - 1) + 1
        scores, flat = pool.topk(min(batch, room, remaining, pool.numel()))
        if min_score is not None:
            likely = int((scores >= min_score).sum())  # the host waits for the draft here
            if likely == 0:
                break
            scores, flat = scores[:likely], flat[:likely]
        parents, picks = flat // children, flat % children
        # A placeholder hangs off the root: depth 1 keeps its rotary position inside the context.
        hang_from = torch.where(torch.isfinite(scores), parents, 0)
        frontier = tree.add(hang_from, candidate_tokens[parents, picks], scores)
        candidate_scores[parents, picks] = torch.full_like(scores, float("-inf"))  # a device tensor: see Tree.add


def _full_tree_nodes(children: int, depth: int) -> int:
    """Nodes below the root of a complete tree: no best-first tree can hold more real ones."""
    total, level = 0, 1
    for _ in range(depth):
        level *= children
        total += level
        if total > 1 << 20:
            break
    return total
