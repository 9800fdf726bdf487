"""Fixed-shape draft steps (engine.graphs): a frontier of any width runs in a graph of the next
power of two, padded with copies of its last row; what the caller gets back is its own rows'."""

from __future__ import annotations

import pytest
import torch

from engine.graphs import DraftGraphs, padded_width

CPU = torch.device("cpu")


def test_widths_round_up_to_powers_of_two():
    assert [padded_width(w) for w in (1, 2, 3, 4, 5, 8, 9, 16, 17, 32)] == [1, 2, 4, 4, 8, 8, 16, 16, 32, 32]


@pytest.mark.parametrize("width", [1, 3, 5, 6, 8, 11, 16])
def test_a_padded_step_returns_the_frontier_s_own_rows(width):
    seen = []

    def step(tokens, positions, slots, mask, kv_end):
        seen.append((tokens.clone(), positions.clone(), slots.clone(), mask.clone(), kv_end))
        # Each row's output depends on every input of that row.
        return (tokens * 1000 + positions * 100 + slots * 10 + mask.sum(dim=1))[:, None].float()

    graphs = DraftGraphs(step, max_length=4096, device=CPU, capture=False)
    g = torch.Generator().manual_seed(width)
    tokens, positions = torch.randint(0, 50, (width,), generator=g), torch.randint(0, 9, (width,), generator=g)
    slots = torch.randperm(width, generator=g) + 20
    mask = torch.rand(width, 40, generator=g) < 0.5
    out = graphs(tokens, positions, slots, mask, kv_end=40)
    assert torch.equal(out, step(tokens, positions, slots, mask, 40))
    padded_tokens, _, padded_slots, padded_mask, kv_end = seen[0]
    rows = padded_width(width)
    assert padded_tokens.shape == (rows,) and kv_end == 256  # the attention bucket
    # The extra rows repeat the last one: the same token written to the same slot.
    assert torch.equal(padded_tokens[width:], tokens[-1].expand(rows - width))
    assert torch.equal(padded_slots[width:], slots[-1].expand(rows - width))
    assert torch.equal(padded_mask[width:, :40], mask[-1:].expand(rows - width, 40))
    assert not padded_mask[:, 40:].any()
