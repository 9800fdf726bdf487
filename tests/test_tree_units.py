"""Unit tests of the engine's tree machinery: tree storage (mask, positions, slots, reuse), the two
drafting policies driven by hand-made draft steps, the acceptance walks, the lossy gate and the KV
cache compaction. Everything runs on small hand-built inputs on the CPU, in milliseconds."""

from __future__ import annotations

import math
import random
from typing import Literal

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from engine.cache import KVCache
from engine.tree import Tree, TreeShape, grow_best_first, grow_reference
from engine.config import MIN_DRAFT_PROB, EngineConfig, SamplingConfig, min_draft_prob_by_default
from engine.verify import ROWS_AT_ONCE, choose, lenient_nodes, walk, walk_lossy

CPU = torch.device("cpu")


# --- helpers -------------------------------------------------------------------------------------


def build(tree: Tree, prefix_len: int, root: int, batches: list[tuple[list[int], list[int]]]) -> None:
    """Reset `tree` and add each (parents, tokens) batch in turn."""
    tree.reset(root, prefix_len)
    for parents, tokens in batches:
        tree.add(torch.tensor(parents), torch.tensor(tokens), torch.zeros(len(parents)))


def ancestor_sets(parents: list[int]) -> list[set[int]]:
    """Each node's ancestors and itself, from the parent list alone (node 0 is the root)."""
    sets = [{0}]
    for node in range(1, len(parents)):
        sets.append(sets[parents[node]] | {node})
    return sets


def depths_of(parents: list[int]) -> list[int]:
    depths = [0]
    for node in range(1, len(parents)):
        depths.append(depths[parents[node]] + 1)
    return depths


def expected_mask(parents: list[int], prefix_len: int, nodes: list[int]) -> torch.Tensor:
    sets = ancestor_sets(parents)
    rows = [[True] * prefix_len + [col in sets[node] for col in range(len(parents))] for node in nodes]
    return torch.tensor(rows, dtype=torch.bool).reshape(len(nodes), prefix_len + len(parents))


def check_tree(tree: Tree, prefix_len: int, parents: list[int]) -> None:
    """Mask, positions and slots of every node (and of a subset) match the parent list."""
    size = len(parents)
    assert tree.size == size and tree.prefix_len == prefix_len
    nodes = torch.arange(size)
    assert torch.equal(tree.mask(nodes), expected_mask(parents, prefix_len, list(range(size))))
    assert tree.positions(nodes).tolist() == [prefix_len + d for d in depths_of(parents)]
    assert tree.slots(nodes).tolist() == [prefix_len + i for i in range(size)]
    subset = list(range(size - 1, 0, -2))  # any rows, in any order
    assert torch.equal(tree.mask(torch.tensor(subset, dtype=torch.long)), expected_mask(parents, prefix_len, subset))


# --- tree storage --------------------------------------------------------------------------------

#   0 ─┬─ 1 ─┬─ 3 ── 6
#      │     └─ 4
#      └─ 2 ── 5
HAND_PARENTS = [0, 0, 0, 1, 1, 2, 3]
HAND_BATCHES = [([0, 0], [11, 12]), ([1, 1, 2], [13, 14, 15]), ([3], [16])]


def test_hand_built_tree_mask_positions_and_slots():
    tree = Tree(capacity=10, device=CPU)
    build(tree, prefix_len=5, root=10, batches=HAND_BATCHES)
    check_tree(tree, 5, HAND_PARENTS)
    mask = tree.mask(torch.arange(7))
    assert mask.shape == (7, 5 + 7)
    # Spelled out for the deepest node: prefix, root, 1, 3 and itself; not its uncle 2 or cousins.
    assert mask[6].tolist() == [True] * 5 + [True, True, False, True, False, False, True]
    assert tree.positions(torch.tensor([0, 1, 3, 6])).tolist() == [5, 6, 7, 8]
    assert [list(row) for row in tree.host_view()[:2]] == [[10, 11, 12, 13, 14, 15, 16], HAND_PARENTS]
    assert tree.depths[:7].tolist() == [0, 1, 1, 2, 2, 2, 3]


def test_add_returns_the_new_indices_and_stores_scores():
    tree = Tree(capacity=6, device=CPU)
    tree.reset(3, prefix_len=0)
    first = tree.add(torch.tensor([0, 0]), torch.tensor([4, 5]), torch.tensor([-0.5, -1.0]))
    second = tree.add(torch.tensor([2]), torch.tensor([6]), torch.tensor([-1.5]))
    assert first.tolist() == [1, 2] and second.tolist() == [3]
    assert tree.scores[:4].tolist() == [0.0, -0.5, -1.0, -1.5]
    check_tree(tree, 0, [0, 0, 0, 2])  # a zero-length prefix adds no columns


def test_reset_of_a_reused_tree_leaves_no_stale_ancestors():
    tree = Tree(capacity=12, device=CPU)
    chain = [0] + list(range(10))  # 0 <- 1 <- 2 ... <- 10: every node sees all earlier ones
    build(tree, prefix_len=20, root=1, batches=[([p], [100 + p]) for p in chain[1:]])
    check_tree(tree, 20, chain)

    # A smaller, flat tree afterwards: stale chain bits would show as extra ancestors.
    build(tree, prefix_len=3, root=2, batches=[([0, 0, 0], [7, 8, 9])])
    check_tree(tree, 3, [0, 0, 0, 0])
    assert tree.tokens[0].item() == 2 and tree.scores[0].item() == 0.0
    # Growing it further still sees only the new tree.
    tree.add(torch.tensor([2, 3]), torch.tensor([1, 1]), torch.zeros(2))
    check_tree(tree, 3, [0, 0, 0, 0, 2, 3])


def test_random_trees_on_one_reused_tree_object():
    rng = random.Random(0)
    tree = Tree(capacity=40, device=CPU)
    for _ in range(30):
        prefix_len = rng.randrange(0, 50)
        tree.reset(rng.randrange(100), prefix_len)
        parents = [0]
        while len(parents) < 40:
            count = min(rng.randint(1, 6), 40 - len(parents))
            batch = [rng.randrange(len(parents)) for _ in range(count)]  # parents already in the tree
            tree.add(torch.tensor(batch), torch.tensor([rng.randrange(100) for _ in batch]), torch.zeros(count))
            parents += batch
            if rng.random() < 0.2:
                break
        check_tree(tree, prefix_len, parents)


# --- drafting policies with a fake draft step ----------------------------------------------------


class FakeStep:
    """A draft step returning hand-made log-probabilities, recording every frontier it was asked to
    draft. Rows of `logp` are looked up by each node's token (`by="token"`, hand-computable) or by
    its index (`by="node"`: no two paths score alike, so orderings have no ties)."""

    def __init__(self, logp: torch.Tensor, by: Literal["token", "node"] = "token") -> None:
        self.logp, self.by = logp, by
        self.calls: list[list[int]] = []

    def row(self, tree: Tree, node: int) -> torch.Tensor:
        return self.logp[tree.tokens[node] if self.by == "token" else node]

    def __call__(self, tree: Tree, nodes: torch.Tensor) -> torch.Tensor:
        self.calls.append(nodes.tolist())
        return torch.stack([self.row(tree, node) for node in self.calls[-1]])


def table(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32).log()


def random_table(rows: int, vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, vocab, generator=g) * 2).log_softmax(dim=-1)


def nodes_of(tree: Tree) -> list[tuple[int, int, int, float]]:
    """(parent, token, depth, score) of every non-root node."""
    tokens, parents = tree.tokens[: tree.size].tolist(), tree.parents[: tree.size].tolist()
    depths, scores = tree.depths[: tree.size].tolist(), tree.scores[: tree.size].tolist()
    return [(parents[i], tokens[i], depths[i], scores[i]) for i in range(1, tree.size)]


def reference_oracle(logp: torch.Tensor, root: int, shape: TreeShape, topk: int) -> list[tuple[int, int, float]]:
    """Per depth, the global top-k children of the previous depth by cumulative log p, in plain
    Python, with draft rows `logp` per node index: (parent, token, score) per node in order."""
    nodes = [(0, root, 0.0)]
    frontier = [0]
    for _ in range(shape.max_depth):
        width = min(topk, shape.max_nodes - (len(nodes) - 1))
        if width <= 0:
            break
        candidates = [(nodes[f][2] + logp[f, v].item(), f, v) for f in frontier for v in range(logp.shape[1])]
        candidates.sort(key=lambda c: -c[0])
        frontier = []
        for score, parent, token in candidates[:width]:
            frontier.append(len(nodes))
            nodes.append((parent, token, score))
    return nodes[1:]


def test_reference_keeps_the_global_top_k_per_depth_by_hand():
    # Root token 0. Depth 1: tokens 1 (.6) and 2 (.3). Depth 2: both best children hang under
    # node 1 (.6 * .6 = .36 and .6 * .35 = .21 beat node 2's best, .3 * .5 = .15).
    logp = table([
        [0.05, 0.60, 0.30, 0.05],
        [0.02, 0.03, 0.60, 0.35],
        [0.10, 0.50, 0.20, 0.20],
        [0.25, 0.25, 0.25, 0.25],
    ])
    tree, step = Tree(5, CPU), FakeStep(logp)
    tree.reset(0, prefix_len=7)
    grow_reference(tree, step, TreeShape(max_depth=2, max_nodes=100), topk=2)
    got = nodes_of(tree)
    assert [(p, t, d) for p, t, d, _ in got] == [(0, 1, 1), (0, 2, 1), (1, 2, 2), (1, 3, 2)]
    assert [s for *_, s in got] == pytest.approx([math.log(x) for x in (0.6, 0.3, 0.36, 0.21)], rel=1e-5)
    assert step.calls == [[0], [1, 2]]  # one draft per depth; the last depth is never drafted


@pytest.mark.parametrize(
    "vocab, topk, shape",
    [
        (8, 3, TreeShape(max_depth=5, max_nodes=100)),  # depth-bound: 1 + 5 * 3 nodes
        (8, 3, TreeShape(max_depth=5, max_nodes=7)),  # node-bound mid-depth: widths 3, 3, 1
        (8, 1, TreeShape(max_depth=6, max_nodes=100)),  # a chain
        (2, 3, TreeShape(max_depth=4, max_nodes=100)),  # tiny vocabulary: depth 1 has only 2 children
        (8, 4, TreeShape(max_depth=0, max_nodes=100)),  # nothing to draft
    ],
    ids=["depth-bound", "node-bound", "chain", "tiny-vocab", "depth-0"],
)
def test_reference_matches_a_plain_python_oracle(vocab, topk, shape):
    capacity = 1 + shape.max_depth * topk
    logp = random_table(capacity, vocab, seed=vocab * 10 + topk)
    tree, step = Tree(capacity, CPU), FakeStep(logp, by="node")
    tree.reset(1, prefix_len=4)
    grow_reference(tree, step, shape, topk)
    expected = reference_oracle(logp, 1, shape, topk)
    got = nodes_of(tree)
    assert [(p, t) for p, t, _, _ in got] == [(p, t) for p, t, _ in expected]
    assert [s for *_, s in got] == pytest.approx([s for *_, s in expected], rel=1e-5, abs=1e-5)
    assert tree.size - 1 <= shape.max_nodes and all(d <= shape.max_depth for _, _, d, _ in got)
    if vocab > topk and shape.max_nodes >= shape.max_depth * topk:
        assert tree.size == 1 + shape.max_depth * topk
    check_tree(tree, 4, tree.parents[: tree.size].tolist())


def test_best_first_expands_the_globally_most_probable_node_first_by_hand():
    # One node per draft (batch 1), two candidate children per node. Root token 0.
    #   draft 0: 1 (.6), 2 (.29)          -> add 0>1 (.6)
    #   draft 1: 2 (.5 -> .30), 3 (.35 -> .21) -> add 1>2 (.30)
    #   draft 2: 3 (.8 -> .24), 2 (.1 -> .03)  -> add 0>2 (.29), the root's second child
    #   draft 3 (token 2 under root): 3 (.8 -> .232) -> add 2>3 (.24), budget spent
    logp = table([
        [0.01, 0.60, 0.29, 0.10],
        [0.01, 0.14, 0.50, 0.35],
        [0.01, 0.09, 0.10, 0.80],
        [0.70, 0.10, 0.10, 0.10],
    ])
    tree, step = Tree(5, CPU), FakeStep(logp)
    tree.reset(0, prefix_len=2)
    grow_best_first(tree, step, TreeShape(max_depth=10, max_nodes=4), batch=1, children=2)
    got = nodes_of(tree)
    assert [(p, t, d) for p, t, d, _ in got] == [(0, 1, 1), (1, 2, 2), (0, 2, 1), (2, 3, 3)]
    assert [s for *_, s in got] == pytest.approx([math.log(x) for x in (0.6, 0.3, 0.29, 0.24)], rel=1e-5)
    assert step.calls == [[0], [1], [2], [3]]  # the last node added is not drafted
    check_tree(tree, 2, [0, 0, 1, 0, 2])


def best_first_oracle(logp: torch.Tensor, root: int, shape: TreeShape, batch: int, children: int,
                      min_score: float | None = None):
    """Best-first in plain Python, with draft rows `logp` per node index: each round, draft the
    newest nodes, then add the `batch` best candidates (top `children` per drafted node, not
    deeper than max_depth, not added yet), only those scoring `min_score` or more when given; no
    such candidate ends the tree."""
    nodes = [(0, root, 0.0, 0)]  # parent, token, score, depth
    pool: dict[tuple[int, int], float] = {}
    frontier = [0]
    while shape.max_nodes - (len(nodes) - 1) > 0:
        for f in frontier:
            top = logp[f].topk(min(children, logp.shape[1]))
            for value, token in zip(top.values.tolist(), top.indices.tolist()):
                if nodes[f][3] < shape.max_depth:
                    pool[(f, token)] = nodes[f][2] + value
        wanted = min(batch, shape.max_nodes - (len(nodes) - 1))
        best = sorted(pool.items(), key=lambda item: -item[1])[:wanted]
        if min_score is not None:
            best = [(pick, score) for pick, score in best if score >= min_score]
            if not best:
                break
        else:
            # Fewer real candidates than wanted is the tiny-vocabulary corner, tested separately.
            assert len(best) == wanted, "test setup: choose a shape with enough candidates"
        frontier = []
        for (parent, token), score in best:
            del pool[(parent, token)]
            frontier.append(len(nodes))
            nodes.append((parent, token, score, nodes[parent][3] + 1))
    return [(p, t, s) for p, t, s, _ in nodes[1:]]


@pytest.mark.parametrize(
    "batch, children, shape",
    [
        (3, 3, TreeShape(max_depth=32, max_nodes=18)),
        (2, 2, TreeShape(max_depth=3, max_nodes=12)),  # depth-capped: 12 of the 14 nodes of depth <= 3
        (1, 4, TreeShape(max_depth=32, max_nodes=9)),
        (5, 5, TreeShape(max_depth=32, max_nodes=12)),  # budget not a multiple of the batch
    ],
    ids=["batch3", "depth-cap", "batch1", "ragged"],
)
def test_best_first_matches_a_plain_python_oracle(batch, children, shape):
    logp = random_table(1 + shape.max_nodes, 40, seed=batch * 7 + children)
    tree, step = Tree(1 + shape.max_nodes, CPU), FakeStep(logp, by="node")
    tree.reset(3, prefix_len=6)
    grow_best_first(tree, step, shape, batch=batch, children=children)
    expected = best_first_oracle(logp, 3, shape, batch, children)
    got = nodes_of(tree)
    assert [(p, t) for p, t, _, _ in got] == [(p, t) for p, t, _ in expected]
    assert [s for *_, s in got] == pytest.approx([s for *_, s in expected], rel=1e-5, abs=1e-5)
    assert tree.size == 1 + shape.max_nodes
    assert all(d <= shape.max_depth for _, _, d, _ in got)
    check_tree(tree, 6, tree.parents[: tree.size].tolist())


@pytest.mark.parametrize("min_prob", [0.3, 0.05, 1e-3, 1e-6])
@pytest.mark.parametrize("batch, children, shape", [(3, 3, TreeShape(max_depth=32, max_nodes=18)),
                                                    (4, 2, TreeShape(max_depth=4, max_nodes=30))],
                         ids=["deep", "depth-cap"])
def test_best_first_with_a_floor_matches_a_plain_python_oracle(batch, children, shape, min_prob):
    # Peaked rows (temperature 0.3) as a real draft's: some picks fall below each floor.
    logp = (random_table(1 + shape.max_nodes, 40, seed=batch * 5 + children) / 0.3).log_softmax(dim=-1)
    floor = math.log(min_prob)
    tree, step = Tree(1 + shape.max_nodes, CPU), FakeStep(logp, by="node")
    tree.reset(3, prefix_len=6)
    grow_best_first(tree, step, shape, batch=batch, children=children, min_score=floor)
    expected = best_first_oracle(logp, 3, shape, batch, children, min_score=floor)
    got = nodes_of(tree)
    assert [(p, t) for p, t, _, _ in got] == [(p, t) for p, t, _ in expected]
    assert [s for *_, s in got] == pytest.approx([s for *_, s in expected], rel=1e-5, abs=1e-5)
    assert all(s >= floor for *_, s in got)  # no placeholders: nothing below the floor was added
    assert all(d <= shape.max_depth for _, _, d, _ in got)
    check_tree(tree, 6, tree.parents[: tree.size].tolist())


def test_a_floor_spends_the_budget_on_depth_where_the_draft_is_sure():
    # Each token's likely successor is the next token (p .97). Without a floor a batch of 4 spends
    # the 8 nodes in 3 forwards (2, 4 and 2 nodes: depth 3); with one, every forward extends the
    # sure chain.
    logp = table([[0.01 if t != (row + 1) % 4 else 0.97 for t in range(4)] for row in range(4)])
    shape = TreeShape(max_depth=20, max_nodes=8)
    plain, plain_step = Tree(9, CPU), FakeStep(logp)
    plain.reset(0, prefix_len=3)
    grow_best_first(plain, plain_step, shape, batch=4, children=2)
    assert max(d for _, _, d, _ in nodes_of(plain)) == 3 and len(plain_step.calls) == 3
    deep, deep_step = Tree(9, CPU), FakeStep(logp)
    deep.reset(0, prefix_len=3)
    grow_best_first(deep, deep_step, shape, batch=4, children=2, min_score=math.log(0.05))
    assert [(p, t, d) for p, t, d, _ in nodes_of(deep)] == [(i, (i + 1) % 4, i + 1) for i in range(8)]
    assert len(deep_step.calls) == 8  # the last node added is not drafted
    # A floor the chain falls under after 3 steps (.97^3 = .913, .97^4 = .885) ends the tree there.
    short, short_step = Tree(9, CPU), FakeStep(logp)
    short.reset(0, prefix_len=3)
    grow_best_first(short, short_step, shape, batch=4, children=2, min_score=math.log(0.9))
    assert short.size == 4 and short_step.calls == [[0], [1], [2], [3]]


def test_the_floor_is_on_by_default_on_a_cpu_only():
    # On a GPU its host read per draft forward costs more than it gains (docs/engine.md).
    assert min_draft_prob_by_default(EngineConfig(), "cpu") == MIN_DRAFT_PROB > 0
    assert min_draft_prob_by_default(EngineConfig(), "cuda") == 0.0
    assert min_draft_prob_by_default(EngineConfig(min_draft_prob=0.0), "cpu") == 0.0
    assert min_draft_prob_by_default(EngineConfig(min_draft_prob=1e-3), "cuda") == 1e-3


def check_genuine_candidates(tree: Tree, step: FakeStep, shape: TreeShape, children: int) -> list[tuple[int, int]]:
    """Every node with a finite score is a distinct (parent, token) among the top `children`
    continuations of a drafted parent, scored parent score + log p; every node respects the shape.
    Returns the real (parent, token) pairs."""
    drafted = {node for call in step.calls for node in call}
    got = nodes_of(tree)
    assert tree.size - 1 <= shape.max_nodes
    # Placeholders too: a node deeper than max_depth gets a rotary position past the table when
    # max_depth is bound by the room left in the cache.
    assert all(d <= shape.max_depth for _, _, d, _ in got), f"depths {[d for _, _, d, _ in got]}"
    scores = tree.scores[: tree.size].tolist()
    real = []
    for parent, token, _, score in got:
        if not math.isfinite(score):
            continue
        assert parent in drafted
        row = step.row(tree, parent)
        assert token in row.topk(min(children, row.numel())).indices.tolist()
        assert score == pytest.approx(scores[parent] + row[token].item(), rel=1e-5, abs=1e-5)
        real.append((parent, token))
    assert len(real) == len(set(real)), "a (parent, token) candidate was added twice"
    check_tree(tree, tree.prefix_len, tree.parents[: tree.size].tolist())
    return real


@pytest.mark.parametrize("max_depth", [1, 2, 5])
def test_best_first_on_a_tiny_vocabulary_adds_only_genuine_distinct_candidates(max_depth):
    # Two tokens, so there are fewer real candidates than the batch: whatever fills the rest
    # (nothing, or -inf placeholders) must not repeat or invent candidates.
    logp = table([[0.7, 0.3], [0.4, 0.6]])
    shape = TreeShape(max_depth=max_depth, max_nodes=12)
    tree, step = Tree(1 + shape.max_nodes, CPU), FakeStep(logp)
    tree.reset(0, prefix_len=1)
    grow_best_first(tree, step, shape, batch=4, children=4)
    real = check_genuine_candidates(tree, step, shape, children=4)
    assert (0, 0) in real and (0, 1) in real  # both of the root's children are there


def test_best_first_depth_one_keeps_only_the_roots_children():
    logp = random_table(11, 30, seed=5)
    shape = TreeShape(max_depth=1, max_nodes=10)
    tree, step = Tree(1 + shape.max_nodes, CPU), FakeStep(logp, by="node")
    tree.reset(4, prefix_len=0)
    grow_best_first(tree, step, shape, batch=3, children=3)
    real = check_genuine_candidates(tree, step, shape, children=3)
    assert sorted(real) == sorted((0, t) for t in logp[0].topk(3).indices.tolist())


# --- acceptance walks ----------------------------------------------------------------------------

#   0:10 ─┬─ 1:11 ─┬─ 3:13
#         │        └─ 4:14 ── 5:15
#         └─ 2:12 ── 6:13 ── 7:16
WALK_TOKENS = [10, 11, 12, 13, 14, 15, 13, 16]
WALK_PARENTS = [0, 0, 0, 1, 1, 4, 2, 6]


def chosen_with(overrides: dict[int, int]) -> list[int]:
    """The target's token per node: 99 (matches no child) except where overridden."""
    return [overrides.get(node, 99) for node in range(len(WALK_TOKENS))]


def test_walk_follows_the_child_carrying_the_targets_token():
    result = walk(WALK_TOKENS, WALK_PARENTS, chosen_with({0: 11, 1: 14, 4: 15, 5: 42}))
    assert (result.path, result.bonus, result.lossy_accepts) == ([1, 4, 5], 42, 0)


def test_walk_takes_the_second_child_and_ignores_unvisited_nodes():
    # Node 1's choice would match its child, but node 1 is never visited.
    result = walk(WALK_TOKENS, WALK_PARENTS, chosen_with({0: 12, 1: 13, 2: 13, 6: 16, 7: 5}))
    assert (result.path, result.bonus) == ([2, 6, 7], 5)


def test_walk_without_a_matching_child_emits_only_the_bonus():
    result = walk(WALK_TOKENS, WALK_PARENTS, chosen_with({0: 13, 1: 14}))  # 13 is a grandchild's token
    assert (result.path, result.bonus) == ([], 13)


def test_walk_stops_where_the_target_disagrees():
    result = walk(WALK_TOKENS, WALK_PARENTS, chosen_with({0: 11, 1: 15, 4: 15}))  # 15 is not 1's child
    assert (result.path, result.bonus) == ([1], 15)


def test_placeholder_nodes_are_out_of_every_walks_reach():
    # A node with score -inf is a placeholder (grow_best_first pads its batch with them): even
    # when the target chooses its token, the walks must not take it.
    tree = Tree(capacity=4, device=CPU)
    tree.reset(10, prefix_len=3)
    tree.add(torch.tensor([0, 0]), torch.tensor([11, 12]), torch.tensor([-0.1, float("-inf")]))
    tree.add(torch.tensor([1]), torch.tensor([13]), torch.tensor([float("-inf")]))
    tokens, parents = tree.host_view()[:2]
    chosen = [12, 13, 5, 6]
    assert (walk(tokens, parents, chosen).path, walk(tokens, parents, chosen).bonus) == ([], 12)
    lossy = walk_lossy(tokens, parents, [99, 13, 5, 6], [True] * 4, window_size=0)
    assert (lossy.path, lossy.bonus) == ([1], 13)  # the real node 1 leniently; never placeholder 3


def test_walk_of_the_root_alone():
    assert (walk([7], [0], [8]).path, walk([7], [0], [8]).bonus) == ([], 8)


def test_walk_down_a_deep_chain():
    depth = 40
    tokens, parents = list(range(100, 101 + depth)), [0] + list(range(depth))
    agree = [t + 1 for t in tokens]  # the target picks each node's child
    result = walk(tokens, parents, agree)
    assert result.path == list(range(1, depth + 1)) and result.bonus == agree[depth]
    agree[17] = 0  # disagreement at depth 17
    result = walk(tokens, parents, agree)
    assert result.path == list(range(1, 18)) and result.bonus == 0


def random_walk_case(rng: random.Random, size: int, vocab: int):
    parents = [0] + [rng.randrange(i) for i in range(1, size)]
    tokens = [rng.randrange(vocab) for _ in range(size)]
    chosen = [rng.randrange(vocab) for _ in range(size)]
    return tokens, parents, chosen


def test_lossy_walk_without_lenient_nodes_is_the_exact_walk():
    rng = random.Random(1)
    for _ in range(300):
        tokens, parents, chosen = random_walk_case(rng, rng.randint(1, 30), vocab=3)
        exact = walk(tokens, parents, chosen)
        for window in (0, 2):
            lossy = walk_lossy(tokens, parents, chosen, [False] * len(tokens), window)
            assert (lossy.path, lossy.bonus, lossy.lossy_accepts) == (exact.path, exact.bonus, 0)


def test_lossy_walk_extends_the_exact_walk_and_counts_its_lossy_steps():
    rng = random.Random(2)
    for _ in range(300):
        tokens, parents, chosen = random_walk_case(rng, rng.randint(1, 30), vocab=3)
        lenient = [rng.random() < 0.5 for _ in tokens]
        exact = walk(tokens, parents, chosen)
        lossy = walk_lossy(tokens, parents, chosen, lenient, window_size=1)
        assert lossy.path[: len(exact.path)] == exact.path  # identical until the exact walk stops
        disagreements = [node for node in lossy.path if chosen[parents[node]] != tokens[node]]
        assert lossy.lossy_accepts == len(disagreements)
        assert all(lenient[node] for node in disagreements)
        assert lossy.bonus == chosen[lossy.path[-1] if lossy.path else 0]


# 0:10 ─┬─ 1:11 ── 2:21 ── 3:22 ── 4:23        (node 1 not lenient, 3 exact matches follow it)
#       └─ 5:12 ── 6:31 ── 7:32                (node 5 lenient, 2 exact matches follow it)
#                         └─ 8:33 ── 9:34       (node 8 lenient under 6, 1 match follows it)
LOSSY_TOKENS = [10, 11, 21, 22, 23, 12, 31, 32, 33, 34]
LOSSY_PARENTS = [0, 0, 1, 2, 3, 0, 5, 6, 6, 8]
LOSSY_CHOSEN = [99, 21, 22, 23, 77, 31, 32, 66, 34, 55]
LOSSY_LENIENT = [False, False, False, False, False, True, False, False, True, False]


@pytest.mark.parametrize("window, path, bonus, lossy", [
    (0, [5, 6, 7], 66, 1),
    (2, [5, 6, 7], 66, 1),  # exactly window_size matches follow node 5
    (3, [], 99, 0),  # node 1 has 3 matches after it but is not lenient
])
def test_lossy_walk_takes_a_lenient_child_only_with_window_matches_after_it(window, path, bonus, lossy):
    result = walk_lossy(LOSSY_TOKENS, LOSSY_PARENTS, LOSSY_CHOSEN, LOSSY_LENIENT, window)
    assert (result.path, result.bonus, result.lossy_accepts) == (path, bonus, lossy)


def test_lossy_walk_prefers_the_exact_child():
    chosen = list(LOSSY_CHOSEN)
    chosen[0] = 11  # the target agrees with node 1: the lenient sibling is not considered
    result = walk_lossy(LOSSY_TOKENS, LOSSY_PARENTS, chosen, LOSSY_LENIENT, window_size=0)
    assert (result.path, result.bonus, result.lossy_accepts) == ([1, 2, 3, 4], 77, 0)


def test_lossy_walk_counts_every_lenient_step_along_the_path():
    chosen = list(LOSSY_CHOSEN)
    chosen[6] = 40  # at node 6 the target picks neither child: node 8 (lenient) is taken lossily
    result = walk_lossy(LOSSY_TOKENS, LOSSY_PARENTS, chosen, LOSSY_LENIENT, window_size=1)
    assert (result.path, result.bonus, result.lossy_accepts) == ([5, 6, 8, 9], 55, 2)
    # The window counts exact matches only: node 5 now has one after it, too few for a window of 2.
    result = walk_lossy(LOSSY_TOKENS, LOSSY_PARENTS, chosen, LOSSY_LENIENT, window_size=2)
    assert (result.path, result.bonus, result.lossy_accepts) == ([], 99, 0)


def test_lenient_nodes_entropy_gate_at_the_parent():
    minus_inf = float("-inf")
    logits = torch.tensor([
        [0.0, 0.0, minus_inf, minus_inf],  # two equal tokens of four: normalised entropy 0.5
        [0.0, 0.0, 0.0, 0.0],  # uniform: 1.0
        [30.0, 0.0, 0.0, 0.0],  # peaked: ~0
    ])
    tokens, parents = torch.tensor([0, 1, 3, 2, 0]), torch.tensor([0, 0, 0, 1, 2])
    gate = lambda threshold: lenient_nodes(logits, tokens, parents, "entropy", threshold)[1:].tolist()
    assert gate(0.0) == [False, False, False, False]  # nothing is below 0
    assert gate(0.5) == [False, False, False, True]  # strictly below
    assert gate(0.51) == [True, True, False, True]  # the token itself does not matter
    assert gate(1.5) == [True, True, True, True]


def test_lenient_nodes_prob_gate_on_the_nodes_own_token():
    logits = torch.tensor([[0.7, 0.2, 0.1], [0.3, 0.3, 0.4]]).log()
    tokens, parents = torch.tensor([0, 0, 2, 1, 2]), torch.tensor([0, 0, 0, 1, 1])
    gate = lambda threshold: lenient_nodes(logits, tokens, parents, "prob", threshold)[1:].tolist()
    assert gate(0.5) == [True, False, False, False]
    assert gate(0.35) == [True, False, False, True]
    assert gate(0.0) == [True, True, True, True]
    assert gate(1.0) == [False, False, False, False]  # no probability exceeds 1


# --- KV cache compaction -------------------------------------------------------------------------

LAYERS, HEADS, DIM, LENGTH = 3, 2, 4, 24


def filled_cache(prefix_len: int, written: int) -> KVCache:
    """A cache with `prefix_len` committed slots and `written` slots written in all, every entry
    distinct: keys layer*1000 + head*100 + slot + dim/10, values their negatives."""
    cache = KVCache(LAYERS, HEADS, DIM, LENGTH, torch.float32, CPU)
    slots = torch.arange(written)
    for layer in range(LAYERS):
        k = (layer * 1000 + torch.arange(HEADS)[:, None, None] * 100 + slots[None, :, None]
             + torch.arange(DIM)[None, None, :] / 10).float()
        cache.layer(layer).index_copy_(2, slots, torch.stack((k, -k)))
    cache.commit(list(range(prefix_len)))  # contiguous from 0: counts them, moves nothing
    return cache


def test_commit_moves_a_non_contiguous_path_after_the_prefix():
    cache = filled_cache(prefix_len=5, written=18)
    before_k, before_v = cache.kv[:, 0].clone(), cache.kv[:, 1].clone()
    address = cache.kv.data_ptr()
    path = [5, 7, 8, 12, 17]  # the root, then deeper and deeper nodes
    cache.commit(path)
    assert cache.length == 10
    for layer in range(LAYERS):
        keys, values = cache.view(layer, cache.length)
        assert torch.equal(keys[:, :5], before_k[layer, :, :5])  # the prefix is untouched
        assert torch.equal(keys[:, 5:10], before_k[layer, :, path])
        assert torch.equal(values[:, 5:10], before_v[layer, :, path])
    assert cache.kv.data_ptr() == address  # in place


def test_commit_of_a_contiguous_path_moves_nothing():
    cache = filled_cache(prefix_len=4, written=12)
    before_k, before_v = cache.kv[:, 0].clone(), cache.kv[:, 1].clone()
    cache.commit([4, 5, 6])
    assert cache.length == 7
    assert torch.equal(cache.kv[:, 0], before_k) and torch.equal(cache.kv[:, 1], before_v)
    cache.commit([7])  # the root alone
    assert cache.length == 8 and torch.equal(cache.kv[:, 0], before_k)


def test_truncate_then_commit_starts_from_the_new_length():
    cache = filled_cache(prefix_len=10, written=16)
    before_k = cache.kv[:, 0].clone()
    cache.truncate(6)
    assert cache.length == 6 and cache.view(0, cache.length)[0].shape == (HEADS, 6, DIM)
    cache.commit([6, 9, 15])
    assert cache.length == 9
    assert torch.equal(cache.kv[:, 0][:, :, 6:9], before_k[:, :, [6, 9, 15]])
    assert torch.equal(cache.kv[:, 0][:, :, :6], before_k[:, :, :6])


def test_choice_and_gates_over_more_rows_than_are_processed_at_once():
    """Rows are sampled and gated ROWS_AT_ONCE at a time: every row keeps its own distribution and
    its place, across the chunk boundaries."""
    rows, vocab = 2 * ROWS_AT_ONCE + 5, 64
    torch.manual_seed(0)
    logits = torch.randn(rows, vocab)
    own = torch.randperm(vocab)[:rows] % vocab
    logits[torch.arange(rows), own] = 40.0  # each row all but certain of its own token
    generator = torch.Generator().manual_seed(0)
    for sampling in (SamplingConfig(do_sample=True, temperature=0.8, top_p=0.9, top_k=10),
                     SamplingConfig(do_sample=True)):
        assert torch.equal(choose(logits, sampling, generator), own)
    parents = torch.randint(0, rows, (rows,))
    tokens = torch.where(torch.rand(rows) < 0.5, own[parents], (own[parents] + 1) % vocab)
    probs = logits.softmax(dim=-1)
    assert torch.equal(lenient_nodes(logits, tokens, parents, "prob", 0.5), probs[parents, tokens] > 0.5)
    logits[::3] = 0.0  # uniform rows: entropy 1
    gate = lenient_nodes(logits, tokens, parents, "entropy", 0.5)
    assert torch.equal(gate, (parents % 3 != 0))


class _NumbersToTensors(TorchDispatchMode):
    """Records each Python number turned into a tensor (aten.lift_fresh), outside the draft step."""

    def __init__(self) -> None:
        super().__init__()
        self.lifted, self.paused = 0, False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.lift_fresh.default and not self.paused:
            self.lifted += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("policy", ["best_first", "reference"])
def test_drafting_never_copies_a_python_number_to_the_device(policy):
    # `tensor[index] = 0.0` lifts the number into a host tensor and copies it over; on a GPU that copy
    # from pageable memory waits until every queued kernel has run. Found with
    # torch.cuda.set_sync_debug_mode on an H200: the host waited at every draft step and reset
    # (a 288-node draft of 48 steps took 184 ms, 166 ms without). fill_ and device tensors do not wait.
    logp = random_table(40, 30, seed=5)
    tree, recorder = Tree(40, CPU), _NumbersToTensors()
    fake = FakeStep(logp, by="node")

    def step(tree: Tree, nodes: torch.Tensor) -> torch.Tensor:
        recorder.paused = True  # the fake step's own bookkeeping is not the drafter's
        try:
            return fake(tree, nodes)
        finally:
            recorder.paused = False

    with recorder:
        tree.reset(3, prefix_len=6)
        if policy == "best_first":
            grow_best_first(tree, step, TreeShape(6, 30), batch=4, children=3)
        else:
            grow_reference(tree, step, TreeShape(6, 30), topk=3)
    assert tree.size > 10 and recorder.lifted == 0
