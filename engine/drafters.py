"""Drafters: what distinguishes the methods. Each grows a token tree from the root; the generation
loop (engine.generate) verifies and emits the same way for all of them.

- vanilla: the tree is the root alone, so a verification is a plain decode step;
- subspec_sd: the substitute (quantized copy of the target's layers) drafts over the target's own
  KV cache: nothing to prefill, nothing to keep in sync;
- classic_sd: a separate small model drafts over its own cache, prefilled with the prompt and
  compacted along the same accepted paths as the target's.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Protocol

import torch

from engine.cache import KVCache
from engine.config import EngineConfig
from engine.graphs import DraftGraphs
from engine.model import Stack, Transformer
from engine.pointwise import EAGER, Pointwise
from engine.tree import Tree, TreeShape, grow_best_first, grow_reference


class _Cancelled(Exception):
    """A stop request seen between draft forwards: unwinds the tree growth."""


class Drafter(Protocol):
    # `kept`: the first tokens of `prompt` the target's cache still holds from the last generation.
    def prefill(self, prompt: torch.Tensor, chunk: int, kept: int = 0) -> None: ...

    # Returns the draft forwards it ran; stops early (a partial tree) once `cancel` is set.
    def draft(self, tree: Tree, shape: TreeShape, cancel: threading.Event | None = None) -> int: ...

    def commit(self, path_slots: list[int], path_tokens: list[int]) -> None: ...


class VanillaDrafter:
    def prefill(self, prompt: torch.Tensor, chunk: int, kept: int = 0) -> None:
        pass

    def draft(self, tree: Tree, shape: TreeShape, cancel: threading.Event | None = None) -> int:
        return 0

    def commit(self, path_slots: list[int], path_tokens: list[int]) -> None:
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

    def prefill(self, prompt: torch.Tensor, chunk: int, kept: int = 0) -> None:
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
            if self.config.tree_policy == "best_first":
                batch = self.config.draft_batch or self.config.topk_len
                grow_best_first(tree, self.draft_step, shape, batch=batch, children=self.config.topk_len)
            else:
                grow_reference(tree, self.draft_step, shape, topk=self.config.topk_len)
        except _Cancelled:
            pass
        finally:
            self._cancel = None
        return self._forwards

    def commit(self, path_slots: list[int], path_tokens: list[int]) -> None:
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
