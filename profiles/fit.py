"""Measure a plan on the real device with the engine (DESIGN.md section 4).

GPU: start from the memory model's N resident layers and B stream buffers, load the engine with
them, run a long-prompt generation with a full tree and timed forwards, and compare the measured
peak allocation with the budget; over budget (or out of memory) -> fewer layers, and once none is
resident fewer buffers (the memory model's 3 -> 2 -> 1 order), load again. Never hand back a plan
that has not run. The largest node count whose forward costs within FREE_TOLERANCE of a one-token
forward bounds the tree (while weights stream, extra tokens ride along for free); drafting them is
not free, so best-first budgets up to that bound then generate a real reply and the fastest wins:
this model's measured acceptance against this GPU's measured draft cost.

CPU: no offload; the method and tree that generate fastest on a short prompt win (vanilla included).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Callable, NamedTuple

import torch

from engine import Engine, EngineConfig, EngineError, GenerationStats, SamplingConfig, load_engine
from engine.config import MIN_DRAFT_PROB
from profiles.memory import DEFAULT_PREFILL_CHUNK, STREAM_BUFFER_FALLBACK, Plan, estimate_plan, longest_context
from profiles.source import model_config as read_model_config  # fit_gpu takes the target's as `model_config`
from profiles.store import ModelPlan, ProfileError

Progress = Callable[[str], None]
Loader = Callable[[EngineConfig, Progress], Engine]

TOPK = 6  # the reference tree's width; the depth follows from the node budget
TREE_POLICY = "best_first"  # the engine's default: measured the higher tau (engine/config.py)
# Nodes per draft forward tried with the whole free budget (smaller budgets: the first, the engine's
# default). A GPU's 4-bit kernel reads the weights once for up to 32 rows, so a wider forward costs
# little more (H200, 7B shape: 3.9 ms at 6 tokens, 4.4 at 16, 5.3 at 32) and a 288-node tree takes
# 10 forwards of 32 instead of 19 of 16 or 48 of 6. But no path is deeper than the forwards that
# drafted it: a model whose drafts are accepted deep needs the narrow, deep tree. The trial replies
# measure which wins for this model.
DRAFT_BATCHES = (EngineConfig.draft_batch, 32, 6)
# Best-first without a floor (the GPU's default), and with it at the full budget: the floor costs a
# host read per draft forward (H100, 7B: 0.89x) and pays only where this model's drafts run deep.
MIN_DRAFT_PROBS = (0.0, MIN_DRAFT_PROB)
# Reference trees of depth 4, 8, 16, 32, 48, 64 (1 + 6 * depth nodes), all within one prefill chunk.
NODE_CANDIDATES = (1, 25, 49, 97, 193, 289, 385)
TRIAL_DEPTH = 32  # the tree of the first trial load (the reference default, 193 nodes)
FREE_TOLERANCE = 0.05  # "free" = within 5% of a one-token forward
TIMING_REPEATS = 2  # best of: one-off stalls (page faults, a neighbour's copy) are not the cost
# Trial prompts are token ids, not text: any checkpoint whose config loads can be profiled, whatever
# its tokenizer makes of English. A prime stride spreads them over the vocabulary.
ID_STRIDE = 7919
# Tree budgets tried in real generations, as fractions of the free bound. On the H200's 7B shape a
# 288-node tree drafts in 19 forwards of ~4.6 ms (16 per forward) against a 235 ms verification;
# whether the last third of the nodes pays for its forwards depends on how deep this model's drafts
# are accepted.
TREE_FRACTIONS = (1.0, 2 / 3, 1 / 3)
TREE_TRIAL_PROMPT = "Explain in a few sentences why the sky looks blue during the day."
TREE_TRIAL_TOKENS = 64
VANILLA_LABEL = "vanilla"  # the tok/s label of vanilla's reply (timed where both streaming forms are compared)
COMPRESSED_SUFFIX = ", compressed streaming"  # appended to the label of a reply streamed compressed


@dataclass(frozen=True)
class CpuCandidate:
    label: str
    method: str
    max_depth: int = 0
    topk_len: int = 1


CPU_CANDIDATES = (
    CpuCandidate("vanilla", "vanilla"),
    CpuCandidate("subspec_sd depth 6 top-2", "subspec_sd", 6, 2),
    CpuCandidate("subspec_sd depth 12 top-4", "subspec_sd", 12, 4),
)
CPU_PROMPT = "Write the numbers from 1 to 40, separated by commas."
CLASSIC_CPU_CANDIDATE = CpuCandidate("classic_sd depth 6 top-2", "classic_sd", 6, 2)
EAGLE_CPU_CANDIDATE = CpuCandidate("eagle_sd depth 8 top-10", "eagle_sd", 8, 10)  # the preset's tree


def cpu_candidates_for(
    method: str | None, draft_model_path: str | None, candidates: tuple[CpuCandidate, ...] = CPU_CANDIDATES
) -> tuple[CpuCandidate, ...]:
    """What a CPU profile measures: every candidate when it chooses the method (`method` None),
    else only that method's (classic_sd and eagle_sd: one tree over their draft)."""
    if method is None:
        return candidates
    if method == "classic_sd":
        return (CLASSIC_CPU_CANDIDATE,)
    if method == "eagle_sd":
        return (EAGLE_CPU_CANDIDATE,)
    chosen = tuple(c for c in candidates if c.method == method)
    if not chosen:
        raise ProfileError(f"{method} cannot be profiled on this machine: use vanilla, subspec_sd or classic_sd")
    return chosen


def trial_ids(tokenizer, count: int, offset: int = 0) -> list[int]:
    """`count` deterministic ids of ordinary tokens (no special ones) from `tokenizer`'s vocabulary."""
    special = set(getattr(tokenizer, "all_special_ids", None) or [])
    usable = [i for i in range(len(tokenizer)) if i not in special]
    if not usable:
        raise ProfileError("the tokenizer has no ordinary tokens to profile with")
    return [usable[(offset + k * ID_STRIDE) % len(usable)] for k in range(count)]


def reply_prompt(engine: Engine, question: str) -> list[int]:
    """The chat-templated question, or token ids when the tokenizer makes (almost) nothing of it."""
    try:
        prompt = engine.chat_ids([{"role": "user", "content": question}])
    except Exception:  # noqa: BLE001 - a template that fails is a tokenizer to profile by ids
        prompt = []
    return prompt if len(set(prompt)) >= 4 else trial_ids(engine.tokenizer, 48)


def engine_loader(config: EngineConfig, progress: Progress) -> Engine:
    # No warm-up at load: every trial's first generation compiles and captures, and is not timed.
    return load_engine(config, progress, warm_up=False)


@dataclass
class _Trial:
    engine: Engine
    peak_bytes: int
    forward_ms_by_nodes: dict[int, float]


def fit_gpu(
    source: str | None,
    method: str,
    model_config: dict,
    vram_bytes: int,
    vram_limit_gb: float | None,
    max_context: int,
    fingerprint: str,
    progress: Progress,
    loader: Loader = engine_loader,
    draft_model_path: str | None = None,
    compare_compressed: bool = True,
) -> ModelPlan:
    """The largest resident-layer count (with as many stream buffers as fit, up to 3) whose measured
    peak fits `vram_bytes`, and a tree budget. With `compare_compressed`, where layers stream, the
    same tree also runs with compressed streaming under its own placement: the faster is kept."""
    draft_config = read_model_config(draft_model_path) if method in ("classic_sd", "eagle_sd") else None
    estimate = _trial_estimate(model_config, vram_bytes, method, max_context, draft_config)
    if not estimate.fits:
        raise ProfileError(f"the model does not fit this GPU with {method}: {estimate.reason}"
                           + _shorter_context_hint(model_config, vram_bytes, method, max_context, draft_config))
    allowed = allocation_budget(estimate)
    progress(f"memory model: {estimate.summary()}")
    base = EngineConfig(method=method, llm_path=source, draft_model_path=draft_model_path, vram_limit_gb=vram_limit_gb,
                        max_length=max_context, max_depth=TRIAL_DEPTH, topk_len=TOPK, prefill_chunk=DEFAULT_PREFILL_CHUNK)
    trial, base = _fit_placement(base, estimate, allowed, loader, progress)
    layers, buffers = base.keep_first_n_layers_on_gpu or 0, base.offload_slots

    drafts = method != "vanilla"
    nodes = choose_node_budget(trial.forward_ms_by_nodes, FREE_TOLERANCE) if drafts else 1
    engine, peak = trial.engine, trial.peak_bytes
    if drafts and (nodes - 1) // TOPK > TRIAL_DEPTH:
        # The free tree is larger than the one that ran: its verification must fit too.
        engine.close()
        engine, peak, nodes = _confirm_bigger_tree(base, nodes, peak, allowed, loader, progress)
    tok_per_s: dict[str, float] = {}
    chosen = None
    compare = compare_compressed and layers < estimate.layers_total
    try:
        if drafts:
            chosen, tok_per_s, reply_peak = choose_tree(engine, nodes, allowed, progress)
            nodes, peak = chosen.budget + 1, max(peak, reply_peak)
        if compare and not drafts:
            tok_per_s[VANILLA_LABEL] = _reply(engine, TREE_TRIAL_PROMPT, TREE_TRIAL_TOKENS, VANILLA_LABEL, progress).tok_per_s
    finally:
        engine.close()
    depth = (nodes - 1) // TOPK
    tree = chosen.engine_fields() if chosen else {}
    verify_ms = trial.forward_ms_by_nodes
    compressed = False
    measured = _compressed_streaming(base, tree, model_config, vram_bytes, max_context, draft_config, allowed, loader,
                                     progress) if compare else None
    if measured is not None:
        label, placed, speed = measured
        tok_per_s[label] = speed
        bf16_speed = tok_per_s[chosen.label() if chosen else VANILLA_LABEL]
        compressed = speed > bf16_speed
        progress(f"compressed streaming {speed:.1f} tok/s against {bf16_speed:.1f} streaming bf16: "
                 + ("kept" if compressed else "not used"))
        if compressed:
            layers, buffers, peak, verify_ms = placed
            estimate = _trial_estimate(model_config, vram_bytes, method, max_context, draft_config, compressed=True)
    streamed = estimate.layers_total - layers
    return ModelPlan(
        method=method,
        device="cuda",
        layers_on_gpu=layers,
        layers_total=estimate.layers_total,
        max_context=max_context,
        stream_buffers=min(buffers, streamed),  # what the engine allocates: no more than the layers streamed
        config_fingerprint=fingerprint,
        measured_at=_now(),
        vram_limit_gb=vram_limit_gb,
        vram_budget_bytes=vram_bytes,
        substitute_bits=estimate.substitute_bits,
        substitute_group=estimate.substitute_group,
        tree_policy=TREE_POLICY if drafts else None,
        max_depth=depth if drafts else None,
        topk_len=TOPK if drafts else None,
        node_budget=nodes - 1 if drafts else None,
        draft_batch=chosen.batch if chosen else None,
        min_draft_prob=chosen.min_draft_prob if chosen else None,
        compressed_streaming=compressed,
        estimated_peak_bytes=estimate.estimated_peak_bytes,
        measured_peak_bytes=peak,
        verify_ms_by_nodes=verify_ms,
        tok_per_s_by_candidate=tok_per_s,
    )


class _Placed(NamedTuple):
    """A placement that ran within the budget, measured (its engine closed)."""

    layers_on_gpu: int
    stream_buffers: int
    peak_bytes: int
    forward_ms_by_nodes: dict[int, float]


def _fit_placement(
    base: EngineConfig, estimate: Plan, allowed: int, loader: Loader, progress: Progress
) -> tuple[_Trial, EngineConfig]:
    """From the memory model's placement down (resident layers, then stream buffers), the first that
    loads and runs a full-context generation within `allowed`: its trial (engine open) and config."""
    layers = estimate.layers_on_gpu
    # All resident: no buffer is budgeted, but should a layer have to stream after all, the most
    # preferred count is tried first.
    buffers = estimate.stream_buffers or STREAM_BUFFER_FALLBACK[0]
    while True:
        config = replace(base, keep_first_n_layers_on_gpu=layers, offload_slots=buffers)
        trial = _try(config, loader, progress, timed=True)
        if trial is not None and trial.peak_bytes <= allowed:
            return trial, config
        if trial is not None:
            progress(
                f"{layers} layers, {buffers} stream buffers: measured peak {trial.peak_bytes / 2**30:.2f} GiB "
                f"> budget {allowed / 2**30:.2f} GiB"
            )
            trial.engine.close()
            excess_layers = math.ceil((trial.peak_bytes - allowed) / estimate.layer_bytes)
        else:
            excess_layers = 1
        if layers == 0 and buffers == 1:
            raise ProfileError(
                f"the model does not fit this GPU with {base.method} even with every layer streamed through one "
                "buffer: lower --max-length or use a larger --vram-limit-gb"
            )
        layers, buffers = shrink(layers, buffers, excess_layers)


def _compressed_streaming(
    base: EngineConfig, tree: dict, model_config: dict, vram_bytes: int, max_context: int, draft_config: dict | None,
    allowed: int, loader: Loader, progress: Progress,
) -> tuple[str, _Placed, float] | None:
    """The chosen tree's reply with compressed streaming under that form's own placement (its
    staging buffer can cost a resident layer): (label, placement, tok/s), or None where it does not
    fit or the model cannot be streamed compressed (not bfloat16)."""
    estimate = _trial_estimate(model_config, vram_bytes, base.method, max_context, draft_config, compressed=True)
    if not estimate.fits or estimate.layers_on_gpu >= estimate.layers_total:
        return None
    progress(f"compressed streaming: {estimate.summary()}")
    try:
        trial, config = _fit_placement(replace(base, compressed_streaming=True), estimate, allowed, loader, progress)
    except EngineError as err:  # it does not fit, or this model's weights are not bfloat16 (a one-line refusal)
        progress(f"compressed streaming not used: {err}")
        return None
    engine = trial.engine
    try:
        for key, value in tree.items():
            setattr(engine.config, key, value)
        label = (TreeChoice(tree["node_budget"], tree["draft_batch"], tree["min_draft_prob"]).label() if tree
                 else VANILLA_LABEL) + COMPRESSED_SUFFIX
        stats = _reply(engine, TREE_TRIAL_PROMPT, TREE_TRIAL_TOKENS, label, progress)
    except EngineError as err:
        if not _is_out_of_memory(err):
            raise
        progress("compressed streaming not used: out of memory with the chosen tree")
        return None
    finally:
        engine.close()
    peak = max(trial.peak_bytes, stats.peak_gpu_bytes or 0)
    if peak > allowed:
        progress(f"compressed streaming not used: peak {peak / 2**30:.2f} GiB is over the budget")
        return None
    placed = _Placed(config.keep_first_n_layers_on_gpu or 0, config.offload_slots, peak, trial.forward_ms_by_nodes)
    return label, placed, stats.tok_per_s


class TreeChoice(NamedTuple):
    """A best-first tree the profile tries: nodes besides the root, per draft forward, floor."""

    budget: int
    batch: int
    min_draft_prob: float

    def label(self) -> str:
        floor = f", floor {self.min_draft_prob:g}" if self.min_draft_prob else ""
        return f"best-first {self.budget + 1} nodes, {self.batch} per draft forward{floor}"

    def engine_fields(self) -> dict[str, int | float]:
        return {"node_budget": self.budget, "max_depth": self.budget // TOPK, "draft_batch": self.batch,
                "min_draft_prob": self.min_draft_prob}


def tree_candidates(max_nodes: int) -> list[TreeChoice]:
    """The full budget with every draft width and with the floor, then smaller budgets with the
    engine's default width, all without a floor but the one."""
    budgets = sorted({max(DRAFT_BATCHES[0], round((max_nodes - 1) * f)) for f in TREE_FRACTIONS}, reverse=True)
    floor, widest = MIN_DRAFT_PROBS[0], budgets[0]
    full = [TreeChoice(widest, batch, floor) for batch in DRAFT_BATCHES]
    full += [TreeChoice(widest, DRAFT_BATCHES[0], other) for other in MIN_DRAFT_PROBS[1:]]
    return full + [TreeChoice(budget, DRAFT_BATCHES[0], floor) for budget in budgets[1:]]


def _trial_estimate(
    model_config: dict, vram_bytes: int, method: str, max_context: int, draft_config: dict | None = None,
    compressed: bool = False,
) -> Plan:
    """The memory model's plan for the first trial load's tree."""
    return estimate_plan(model_config, vram_bytes, method, max_context=max_context, tree_nodes=1 + TRIAL_DEPTH * TOPK,
                         draft_config=draft_config, compressed_streaming=compressed)


def planned_context(model_config: dict, vram_bytes: int, method: str, draft_model_path: str | None = None) -> int:
    """The context to plan when the user chose none: profiles.memory.longest_context of the trial's plans."""
    draft_config = read_model_config(draft_model_path) if method in ("classic_sd", "eagle_sd") else None
    return longest_context(lambda context: _trial_estimate(model_config, vram_bytes, method, context, draft_config),
                           model_config)


def _shorter_context_hint(model_config: dict, vram_bytes: int, method: str, max_context: int, draft_config: dict | None = None) -> str:
    """'; it fits with --max-length N' for the longest of a half, a quarter or an eighth of the
    context with which the memory model says it fits (the KV cache and the workspace shrink)."""
    for context in (max_context // 2, max_context // 4, max_context // 8):
        if context >= 256 and _trial_estimate(model_config, vram_bytes, method, context, draft_config).fits:
            return f"; it fits with --max-length {context}"
    return ""


def _confirm_bigger_tree(
    base: EngineConfig, nodes: int, peak: int, allowed: int, loader: Loader, progress: Progress
) -> tuple[Engine, int, int]:
    """Load and run a `nodes` tree: (engine, peak, nodes) when it fits; else the trial's tree again."""
    bigger = _try(replace(base, max_depth=(nodes - 1) // TOPK), loader, progress, timed=False)
    if bigger is not None and bigger.peak_bytes <= allowed:
        return bigger.engine, max(peak, bigger.peak_bytes), nodes
    trial_nodes = 1 + TRIAL_DEPTH * TOPK
    progress(f"a {nodes}-node tree does not fit: keeping {trial_nodes} nodes")
    if bigger is not None:
        bigger.engine.close()
    again = _try(base, loader, progress, timed=False)
    if again is None:
        raise ProfileError("the GPU ran out of memory reloading a plan that fitted a moment ago: run the profile again")
    return again.engine, peak, trial_nodes


def choose_tree(
    engine: Engine, max_nodes: int, allowed_bytes: int | None, progress: Progress
) -> tuple[TreeChoice, dict[str, float], int]:
    """The best-first tree of at most `max_nodes` nodes (tree_candidates) that generates a real
    reply fastest within `allowed_bytes`, the tok/s of each candidate tried and the highest peak
    among those kept. `engine` is reconfigured in place (its drafter reads its config)."""
    config = engine.config
    config.tree_policy, config.topk_len = TREE_POLICY, TOPK
    speeds: dict[str, float] = {}
    fitting: dict[TreeChoice, float] = {}
    peak = 0
    for choice in tree_candidates(max_nodes):
        label = choice.label()
        for key, value in choice.engine_fields().items():
            setattr(config, key, value)
        try:
            stats = _reply(engine, TREE_TRIAL_PROMPT, TREE_TRIAL_TOKENS, label, progress)
        except EngineError as err:  # wider draft widths capture more graphs: they may not fit
            if not _is_out_of_memory(err):
                raise
            progress(f"{label}: out of memory")
            continue
        speeds[label] = stats.tok_per_s
        if allowed_bytes is not None and (stats.peak_gpu_bytes or 0) > allowed_bytes:
            progress(f"{label}: peak {stats.peak_gpu_bytes / 2**30:.2f} GiB is over the budget")
            continue
        fitting[choice] = stats.tok_per_s
        peak = max(peak, stats.peak_gpu_bytes or 0)
    if not fitting:
        raise ProfileError("no draft tree fits next to the model in a real reply: lower --max-length")
    return max(fitting, key=fitting.get), speeds, peak


def _reply(engine: Engine, question: str, new_tokens: int, label: str, progress: Progress) -> GenerationStats:
    """The stats of a greedy reply to `question`, after a short warm-up reply (first calls
    allocate; a tree's new draft widths capture their graphs)."""
    prompt = reply_prompt(engine, question)
    engine.generate(prompt, SamplingConfig(max_new_tokens=4))
    generation = engine.generate(prompt, SamplingConfig(max_new_tokens=new_tokens))
    progress(f"{label}: {generation.stats.tok_per_s:.1f} tok/s, tau {generation.stats.tau:.2f}")
    return generation.stats


def shrink(layers: int, buffers: int, excess_layers: int) -> tuple[int, int]:
    """Give up `excess_layers` layer-sized allocations: resident layers first, then stream buffers
    down to one (the memory model's order: a buffer is worth more than a resident layer)."""
    from_layers = min(layers, excess_layers)
    return layers - from_layers, max(1, buffers - (excess_layers - from_layers))


def allocation_budget(plan: Plan) -> int:
    """What torch may allocate: the card minus the CUDA context and the safety margin."""
    return plan.vram_bytes - plan.cuda_context_bytes - plan.safety_margin_bytes


def choose_node_budget(forward_ms_by_nodes: dict[int, float], tolerance: float = FREE_TOLERANCE) -> int:
    """The largest node count whose forward costs at most (1 + tolerance) x a one-token forward.
    When even the smallest tree is not free (a compute-bound GPU), the smallest tree: drafting
    still saves forwards, it just does not come for free."""
    single = forward_ms_by_nodes[1]
    free = [n for n, ms in forward_ms_by_nodes.items() if n > 1 and ms <= single * (1 + tolerance)]
    trees = [n for n in forward_ms_by_nodes if n > 1]
    return max(free) if free else min(trees)


def choose_cpu(
    source: str | None,
    candidates: tuple[CpuCandidate, ...],
    max_context: int,
    new_tokens: int,
    fingerprint: str,
    progress: Progress,
    loader: Loader = engine_loader,
    draft_model_path: str | None = None,
) -> ModelPlan:
    """Generate the same short reply with each candidate; the highest decode tok/s wins."""
    tok_per_s: dict[str, float] = {}
    layers_total = 0
    for candidate in candidates:
        progress(f"measuring {candidate.label}")
        config = EngineConfig(
            method=candidate.method,  # type: ignore[arg-type]
            llm_path=source,
            draft_model_path=draft_model_path,
            device="cpu",
            max_length=max_context,
            max_depth=candidate.max_depth,
            topk_len=candidate.topk_len,
        )
        engine = loader(config, progress)
        try:
            layers_total = int(engine.describe()["layers_total"])
            tok_per_s[candidate.label] = _reply(engine, CPU_PROMPT, new_tokens, candidate.label, progress).tok_per_s
        finally:
            engine.close()
    best = max(candidates, key=lambda c: tok_per_s[c.label])
    drafts = best.method != "vanilla"
    return ModelPlan(
        method=best.method,
        device="cpu",
        layers_on_gpu=0,
        layers_total=layers_total,
        max_context=max_context,
        stream_buffers=0,  # no offload on a CPU
        config_fingerprint=fingerprint,
        measured_at=_now(),
        tree_policy=TREE_POLICY if drafts else None,
        max_depth=best.max_depth if drafts else None,
        topk_len=best.topk_len if drafts else None,
        node_budget=best.max_depth * best.topk_len if drafts else None,
        tok_per_s_by_candidate=tok_per_s,
    )


def _try(config: EngineConfig, loader: Loader, progress: Progress, timed: bool) -> _Trial | None:
    """Load and run `config`; None when it ran out of memory. Other engine errors propagate."""
    progress(f"trial: {config.keep_first_n_layers_on_gpu} layers on the GPU, tree depth {config.max_depth}")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    engine = None
    try:
        engine = loader(replace(config), progress)  # its own copy: choose_tree reconfigures it
        peaks = [torch.cuda.max_memory_allocated() if cuda else 0]  # loading has its own transients
        # A prompt that leaves just room for the tree: the attention and mask at full context.
        prompt_len = max(1, config.max_length - (1 + config.max_depth * config.topk_len) - config.max_depth - 8)
        prompt = trial_ids(engine.tokenizer, prompt_len)
        generation = engine.generate(prompt, SamplingConfig(max_new_tokens=config.max_depth + 2))
        peaks.append(generation.stats.peak_gpu_bytes or 0)
        forward_ms: dict[int, float] = {}
        if timed:
            for nodes in (n for n in NODE_CANDIDATES if n < config.max_length):
                forward_ms[nodes], peak = _forward_ms(engine, prompt[:nodes])
                peaks.append(peak)
        return _Trial(engine, max(peaks), forward_ms)
    except EngineError as err:
        if engine is not None:
            engine.close()
        if not _is_out_of_memory(err):
            raise
        progress(f"out of memory: {err}")
        return None


def _forward_ms(engine: Engine, prompt: list[int]) -> tuple[float, int]:
    """Best wall time of one forward over `prompt` (a 1-token generation is exactly the prefill),
    synchronised on CUDA since the engine only waits for events; and the peak it allocated."""
    best = math.inf
    peak = 0
    for _ in range(TIMING_REPEATS):
        engine.forget()  # the whole prompt, every time: a forward over `prompt`, not a reused prefix
        _synchronize()
        started = time.perf_counter()
        generation = engine.generate(prompt, SamplingConfig(max_new_tokens=1))
        _synchronize()
        best = min(best, (time.perf_counter() - started) * 1e3)
        peak = max(peak, generation.stats.peak_gpu_bytes or 0)
    return best, peak


def _is_out_of_memory(err: EngineError) -> bool:
    # The engine turns torch's OOM into a one-line EngineError and keeps the original as context.
    return isinstance(err.__context__, torch.cuda.OutOfMemoryError)


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)
