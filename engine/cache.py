"""Static KV cache (batch 1) with in-place compaction of an accepted tree path.

Keys and values share one tensor [layers, 2, kv_heads, slots, head_dim], so one kernel writes both
(a draft step writes its tokens into every layer: one launch per layer saved) and one gather moves
an accepted path. Slots [0, length) hold committed tokens. A forward writes its tokens' keys and
values at explicit slots (a tree's nodes sit right after the prefix); after verification the
accepted path is moved to contiguous slots after the prefix. Tensors are allocated once and never
reallocated, so their addresses stay stable for CUDA graphs.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        max_length: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.kv = torch.zeros((num_layers, 2, num_kv_heads, max_length, head_dim), dtype=dtype, device=device)
        self.max_length = max_length
        self.length = 0  # committed tokens
        # Bumped by every change of what the slots hold: whoever remembers which tokens the cache
        # holds (the engine, for the next turn) checks that nothing else has written since.
        self.version = 0

    @property
    def nbytes(self) -> int:
        return self.kv.nbytes

    def layer(self, layer: int) -> torch.Tensor:
        """Keys and values of `layer`, [2, kv_heads, slots, head_dim]: where a forward writes its
        tokens' (engine.pointwise.Pointwise.store_attention_inputs)."""
        return self.kv[layer]

    def view(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of slots [0, end) of `layer`: what attention reads."""
        return self.kv[layer, 0, :, :end], self.kv[layer, 1, :, :end]

    def commit(self, path_slots: list[int]) -> None:
        """Move the entries at `path_slots` (the accepted path, in order, all >= length) to the
        slots right after the committed prefix, in every layer, and count them as committed.

        A path only goes deeper and deeper nodes sit later, so `path_slots` ascends: when it is
        already the destination range nothing moves; otherwise the gather copies before writing."""
        start, count = self.length, len(path_slots)
        if path_slots != list(range(start, start + count)):
            # From pageable memory without waiting for the device: the loop never syncs here.
            src = torch.tensor(path_slots).to(self.kv.device, non_blocking=True)
            self.kv[:, :, :, start : start + count] = self.kv[:, :, :, src]
        self.length = start + count
        self.version += 1

    def truncate(self, length: int) -> None:
        """Forget everything after slot `length` (entries are overwritten by later writes)."""
        self.length = length
        self.version += 1
