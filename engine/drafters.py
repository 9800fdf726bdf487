"""Drafters: what distinguishes the methods. Each grows a token tree from the root; the generation
loop (engine.generate) verifies and emits the same way for all of them.

- vanilla: the tree is the root alone, so a verification is a plain decode step;
- subspec_sd: the substitute (quantized copy of the target's layers) drafts over the target's own
  KV cache: nothing to prefill, nothing to keep in sync;
- classic_sd: a separate small model drafts over its own cache, prefilled with the prompt and
  compacted along the same accepted paths as the target's;
- eagle_sd: an EAGLE head (engine.eagle) drafts from the target's features, over a one-layer
  cache of its own.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import Protocol

import torch

from engine.cache import KVCache
from engine.config import EngineConfig, min_draft_prob_by_default
from engine.eagle import EagleHead
from engine.graphs import DraftGraphs
from engine.model import Stack, Transformer
from engine.pointwise import EAGER, Pointwise
from engine.tree import DraftStep, Tree, TreeShape, grow_best_first, grow_reference


class _Cancelled(Exception):
    """A stop request seen between draft forwards: unwinds the tree growth."""


class Drafter(Protocol):
    # True: the loop hands prefill and commit the target's features (final-normed hidden states)
    # of the tokens they cover; otherwise None.
    needs_features: bool

    # `kept`: the first tokens of `prompt` the target's cache still holds from the last generation.
    def prefill(self, prompt: torch.Tensor, chunk: int, kept: int = 0, features: torch.Tensor | None = None) -> None: ...

    # Returns the draft forwards it ran; stops early (a partial tree) once `cancel` is set.
    def draft(self, tree: Tree, shape: TreeShape, cancel: threading.Event | None = None) -> int: ...

    def commit(self, path_slots: list[int], path_tokens: list[int], features: torch.Tensor | None = None) -> None: ...


class VanillaDrafter:
    needs_features = False

    def prefill(self, prompt: torch.Tensor, chunk: int, kept: int = 0, features: torch.Tensor | None = None) -> None:
        pass

    def draft(self, tree: Tree, shape: TreeShape, cancel: threading.Event | None = None) -> int:
        return 0

    def commit(self, path_slots: list[int], path_tokens: list[int], features: torch.Tensor | None = None) -> None:
        pass


def grow(tree: Tree, step: DraftStep, shape: TreeShape, config: EngineConfig) -> None:
    """The configured tree policy over `step`; a stop request (`step` raising _Cancelled between
    forwards) leaves a partial tree."""
    try:
        if config.tree_policy == "best_first":
            min_prob = min_draft_prob_by_default(config, tree.tokens.device.type)
            floor = math.log(min_prob) if min_prob > 0 else None
            grow_best_first(tree, step, shape, batch=config.draft_batch or config.topk_len, children=config.topk_len,
                            min_score=floor)
        else:
            grow_reference(tree, step, shape, topk=config.topk_len)
    except _Cancelled:
        pass


@dataclass
class TreeDrafter:
    """Drafts with `transformer` over `stack` and `cache`. For the substitute, cache is the target's
    (owns_cache False: the loop already prefills and compacts it, and verification writes the KV
    of every node). A draft with its own cache never ran the deepest nodes it proposed, so when
    such a node is accepted its KV is computed at the start of the next draft."""

    transformer: Transformer
    stack: Stack
    cache: KVCache
    owns_cache: bool
    config: EngineConfig
    graphs: DraftGraphs | None = None  # fixed-shape (CUDA-graph) draft steps; None = eager
    pointwise: Pointwise = EAGER  # element-wise math of draft steps (compiled on a GPU)
    _drafted: int = 0  # tree nodes [0, _drafted) went through a draft forward this iteration
    _forwards: int = 0  # draft forwards this iteration
    _missing: list[tuple[int, int]] = field(default_factory=list)  # (slot, token) without draft KV
    _cancel: threading.Event | None = None  # the current draft's stop request
    needs_features = False

    def prefill(self, prompt: torch.Tensor, chunk: int, kept: int = 0, features: torch.Tensor | None = None) -> None:
        if self.owns_cache:
            # Its own cache holds the same tokens as the target's, but for a tail it never drafted.
            valid = self._missing[0][0] if self._missing else self.cache.length
            self.transformer.prefill(self.stack, self.cache, prompt, chunk, kept=min(kept, valid))
        self._missing = []  # left over from the previous generation: not this prompt's

    def draft(self, tree: Tree, shape: TreeShape, cancel: threading.Event | None = None) -> int:
        self._catch_up()
        self._drafted = self._forwards = 0
        # A deep tree takes seconds to draft on a CPU: a stop request is honoured between forwards.
        self._cancel = cancel
        try:
            grow(tree, self.draft_step, shape, self.config)
        finally:
            self._cancel = None
        return self._forwards

    def commit(self, path_slots: list[int], path_tokens: list[int], features: torch.Tensor | None = None) -> None:
        if not self.owns_cache:
            return
        start = self.cache.length
        self.cache.commit(path_slots)
        # Path nodes ascend, so only a tail of the path can lack draft KV.
        self._missing = [
            (start + i, token)
            for i, (slot, token) in enumerate(zip(path_slots, path_tokens))
            if slot - path_slots[0] >= self._drafted
        ]

    def _catch_up(self) -> None:
        if not self._missing:
            return
        device = self.transformer.device
        end = self._missing[-1][0] + 1
        slots = torch.tensor([slot for slot, _ in self._missing]).to(device, non_blocking=True)
        tokens = torch.tensor([token for _, token in self._missing]).to(device, non_blocking=True)
        mask = torch.arange(end, device=device)[None] <= slots[:, None]
        self.transformer.forward(self.stack, self.cache, tokens, slots, slots, mask, end, slice(0, 0))
        self._missing = []

    def draft_step(self, tree: Tree, nodes: torch.Tensor) -> torch.Tensor:
        """Draft log-probabilities [F, V] of the children of frontier `nodes` (their KV is written)."""
        if self._cancel is not None and self._cancel.is_set():
            raise _Cancelled
        self._drafted = tree.size  # the frontier is always the newest nodes
        self._forwards += 1
        inputs = (tree.tokens[nodes], tree.positions(nodes), tree.slots(nodes), tree.mask(nodes))
        kv_end = tree.prefix_len + tree.size
        if self.graphs is not None:
            return self.graphs(*inputs, kv_end)
        return self.log_probs(*inputs, kv_end)

    def log_probs(
        self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, mask: torch.Tensor, kv_end: int,
        fixed_shape: bool = False,
    ) -> torch.Tensor:
        logits = self.transformer.forward(self.stack, self.cache, tokens, positions, slots, mask, kv_end,
                                          ops=self.pointwise, fixed_shape=fixed_shape)
        return (logits / self.config.draft_temperature).log_softmax(dim=-1)


class EagleDrafter:
    """Drafts with an EAGLE head. Head entry p pairs token p + 1 with the target's feature at p,
    so its cache holds one entry fewer than the target's: entries [0, L - 1) for a target cache of
    L tokens, and the tree's root (token L) pairs with the feature at L - 1. Tree node i sits at head
    slot L - 1 + i and reads its parent's predicted feature. After verification the accepted path's
    entries are computed again from the target's true features, at the start of the next draft."""

    needs_features = True

    def __init__(self, head: EagleHead, config: EngineConfig, max_length: int) -> None:
        self.head = head
        self.config = config
        self.cache = head.new_cache(max_length)
        target = head.target
        hidden = target.embed.weight.shape[1]
        self.features = torch.zeros(max_length, hidden, dtype=target.dtype, device=target.device)  # true, by position
        # The input feature of node i's children: predicted[i + 1]; predicted[0] is the root's input.
        # Sized by the tree (draft): a profile's trial grows the tree of a loaded engine.
        self._predicted = torch.zeros(0, hidden, dtype=target.dtype, device=target.device)
        self._pending: tuple[int, list[int]] | None = None  # (first position, tokens) to enter with true features
        self._cancel: threading.Event | None = None
        self._forwards = 0

    def prefill(self, prompt: torch.Tensor, chunk: int, kept: int = 0, features: torch.Tensor | None = None) -> None:
        count = prompt.numel()
        self.features[kept:count] = features
        # Entries before the first changed token still hold; one more (its feature) was kept too.
        start = max(min(kept, self.cache.length + 1) - 1, 0)
        self._pending = (start, prompt[start + 1 :].tolist()) if count - 1 > start else None
        self.cache.truncate(start)

    def draft(self, tree: Tree, shape: TreeShape, cancel: threading.Event | None = None) -> int:
        self._enter_pending()
        self._forwards = 0
        self._cancel = cancel
        if self._predicted.shape[0] < tree.capacity + 1:
            self._predicted = self._predicted.new_zeros(tree.capacity + 1, self._predicted.shape[1])
        self._predicted[0] = self.features[tree.prefix_len - 1]
        try:
            grow(tree, self.draft_step, shape, self.config)
        finally:
            self._cancel = None
        return self._forwards

    def draft_step(self, tree: Tree, nodes: torch.Tensor) -> torch.Tensor:
        if self._cancel is not None and self._cancel.is_set():
            raise _Cancelled
        self._forwards += 1
        start = tree.prefix_len - 1  # the root's head slot and position
        inputs = self._predicted[torch.where(nodes == 0, 0, tree.parents[nodes] + 1)]
        predicted = self.head.forward(self.cache, tree.tokens[nodes], inputs, start + tree.depths[nodes], start + nodes,
                                      tree.mask(nodes)[:, 1:], start + tree.size)
        self._predicted[nodes + 1] = predicted
        return (self.head.logits(predicted) / self.config.draft_temperature).log_softmax(dim=-1)

    def commit(self, path_slots: list[int], path_tokens: list[int], features: torch.Tensor | None = None) -> None:
        start = path_slots[0]  # the target's length before the path: the root's position
        self.features[start : start + len(path_tokens)] = features
        # The tree's entries used predicted features: the path's are entered again with true ones.
        self.cache.truncate(start - 1)
        self._pending = (start - 1, path_tokens)

    def _enter_pending(self) -> None:
        """Head entries start.. for `tokens` (each with the true feature of the position before)."""
        if self._pending is None:
            return
        start, tokens = self._pending
        self._pending = None
        device = self.features.device
        count = len(tokens)
        positions = torch.arange(start, start + count, device=device)
        mask = torch.arange(start + count, device=device)[None] <= positions[:, None]
        ids = torch.tensor(tokens).to(device, non_blocking=True)
        self.head.forward(self.cache, ids, self.features[start : start + count], positions, positions, mask, start + count)
        self.cache.truncate(start + count)
