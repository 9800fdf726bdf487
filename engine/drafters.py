"""Drafters: what distinguishes the methods. Each grows a token tree from the root; the generation
loop (engine.generate) verifies and emits the same way for all of them.

- vanilla: the tree is the root alone, so a verification is a plain decode step;
- subspec_sd: the substitute (quantized copy of the target's layers) drafts over the target's own
  KV cache: nothing to prefill, nothing to keep in sync;
- classic_sd: a separate small model drafts over its own cache, prefilled with the prompt and
  compacted along the same accepted paths as the target's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from engine.cache import KVCache
from engine.config import EngineConfig
from engine.model import Stack, Transformer
from engine.tree import Tree, TreeShape, grow_best_first, grow_reference


class Drafter(Protocol):
    def prefill(self, prompt: torch.Tensor, chunk: int) -> None: ...

    def draft(self, tree: Tree, shape: TreeShape) -> None: ...

    def commit(self, path_slots: list[int]) -> None: ...


class VanillaDrafter:
    def prefill(self, prompt: torch.Tensor, chunk: int) -> None:
        pass

    def draft(self, tree: Tree, shape: TreeShape) -> None:
        pass

    def commit(self, path_slots: list[int]) -> None:
        pass


@dataclass
class TreeDrafter:
    """Drafts with `transformer` over `stack` and `cache`. For the substitute, cache is the target's
    (owns_cache False: the loop already prefills and compacts it)."""

    transformer: Transformer
    stack: Stack
    cache: KVCache
    owns_cache: bool
    config: EngineConfig

    def prefill(self, prompt: torch.Tensor, chunk: int) -> None:
        if self.owns_cache:
            self.transformer.prefill(self.stack, self.cache, prompt, chunk)

    def draft(self, tree: Tree, shape: TreeShape) -> None:
        if self.config.tree_policy == "best_first":
            grow_best_first(tree, self._step, shape, batch=self.config.topk_len, children=self.config.topk_len)
        else:
            grow_reference(tree, self._step, shape, topk=self.config.topk_len)

    def commit(self, path_slots: list[int]) -> None:
        if self.owns_cache:
            self.cache.commit(path_slots)

    def _step(self, tree: Tree, nodes: torch.Tensor) -> torch.Tensor:
        logits = self.transformer.forward(
            self.stack,
            self.cache,
            tree.tokens[nodes],
            tree.positions(nodes),
            tree.slots(nodes),
            tree.mask(nodes),
            kv_end=tree.prefix_len + tree.size,
        )
        return (logits / self.config.draft_temperature).log_softmax(dim=-1)
