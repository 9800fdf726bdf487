"""What a front end loads with: one decision for subspec-chat, run-test, run-benchmark, run-api
and run-gradio (data flows front end -> profiles -> engine).

1. **flags**: the user named the resident layers (`--keep-first-n-layers-on-gpu` or the YAML key),
   or the CPU on a machine with a GPU (`--device cpu`): no profile is read or measured.
2. **profile**: the stored profile for this device, model files, method, cap and context; on the
   first run it is measured now and stored (progress through `progress`).
3. **estimate** (`use_profile=False`, `--no-profile`): the memory model's plan from config.json,
   instant and not measured.

The method is the user's when they chose one; otherwise the profile's (on a CPU, the fastest it
measured). The result is a set of EngineConfig values the front end layers between the method
preset and the user's own settings (preset < plan < YAML < command line), plus what to tell the
user and what to report with every result (`Planned.describe`).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Literal

from engine.config import EngineConfig, method_unavailable, min_draft_prob_by_default
from profiles.runner import Profile, vram_budget
from profiles.store import ProfileError

if TYPE_CHECKING:
    from profiles.memory import Plan

PlanSource = Literal["flags", "profile", "estimate"]
Progress = Callable[[str], None]
# profiles.run_profile's signature: (model, vram_limit_gb, method or None, progress, force, *, max_context, draft_model_path)
Profiler = Callable[..., Profile]


@dataclass
class Planned:
    source: PlanSource
    overrides: dict[str, Any]  # EngineConfig fields the plan decides (never one the user set)
    profile: Profile | None = None
    notes: list[str] = field(default_factory=list)  # one line each, for the user

    @property
    def origin(self) -> str:
        """Where the plan's values come from, in words (error messages, the CLI's plan line)."""
        if self.source == "profile":
            return f"the profile {self.profile.path}" if self.profile and self.profile.path else "the measured profile"
        return {"flags": "your settings", "estimate": "the memory model's estimate (--no-profile)"}[self.source]

    @property
    def warnings(self) -> list[str]:
        """The notes that are problems (a profile moved aside, one that cannot be saved)."""
        return list(self.profile.messages) if self.profile else []

    def describe(self, config: EngineConfig, engine_details: dict[str, Any]) -> dict[str, Any]:
        """Which plan ran: the `plan` object of run-test's JSON, benchmark records and /health."""
        on_gpu = str(engine_details.get("device", "cpu")).startswith("cuda")
        drafts = config.method != "vanilla"
        path = self.profile.path if self.profile is not None else None
        return {
            "source": self.source,
            "method": config.method,
            "device": engine_details.get("device"),
            "layers_on_gpu": engine_details.get("layers_on_gpu") if on_gpu else None,
            "layers_total": engine_details.get("layers_total"),
            "stream_buffers": engine_details.get("stream_buffers", 0) if on_gpu else 0,
            # Streamed layers cross compressed (only where some stream).
            "compressed_streaming": bool(config.compressed_streaming and engine_details.get("stream_buffers")),
            "tree_policy": config.tree_policy if drafts else None,
            "node_budget": config.draft_nodes() if drafts else None,
            "max_depth": config.max_depth if drafts else None,
            "draft_batch": config.draft_batch if drafts and config.tree_policy == "best_first" else None,
            "min_draft_prob": min_draft_prob_by_default(config, "cuda" if on_gpu else "cpu")
            if drafts and config.tree_policy == "best_first" else None,
            "max_length": engine_details.get("max_length", config.max_length),
            "profile_path": str(path) if path else None,
        }


def choose_plan(
    config: EngineConfig,
    explicit: Collection[str],
    *,
    use_profile: bool = True,
    force: bool = False,
    progress: Progress | None = None,
    profiler: Profiler | None = None,
    gpu: bool | None = None,
) -> Planned:
    """The plan for `config` (method preset < YAML < command line, already merged) whose keys in
    `explicit` the user set. Raises ProfileError / EngineError with one line for the user
    (an unavailable method, a model that does not fit) before any weights load."""
    check_method(config)
    if gpu is None:
        import torch

        gpu = torch.cuda.is_available()
    on_gpu = gpu and not config.device.startswith("cpu")
    if "keep_first_n_layers_on_gpu" in explicit or (gpu and not on_gpu):
        return Planned("flags", {})
    if not use_profile:
        return _estimate(config, on_gpu, "max_length" in explicit)
    if profiler is None:
        from profiles.runner import run_profile as profiler
    method = config.method if "method" in explicit else None
    # No context asked for: the profile plans it (8192 tokens where that costs no stream buffer).
    context = config.max_length if "max_length" in explicit else None
    profile = profiler(config.llm_path, config.vram_limit_gb, method, progress or (lambda _text: None), force,
                       max_context=context, draft_model_path=config.draft_model_path)
    plan = profile.plan
    if "compressed_streaming" in explicit and plan.stream_buffers and config.compressed_streaming != plan.compressed_streaming:
        # The profile placed and timed the other streaming form: its plan has no room for (or wastes)
        # the staging buffer; the memory model plans the one asked for.
        flag = "--compressed-streaming" if config.compressed_streaming else "--no-compressed-streaming"
        measured = "compressed" if plan.compressed_streaming else "bf16"
        return _estimate(config, on_gpu, "max_length" in explicit,
                         why=f"{flag} (this GPU's profile measured {measured} streaming faster)")
    return _from_profile(profile, method, explicit)


def check_method(config: EngineConfig) -> None:
    """Refuse what cannot run before anything is measured or loaded."""
    if (problem := method_unavailable(config.method, config.draft_model_path)) is not None:
        raise ProfileError(problem)


def _from_profile(profile: Profile, method: str | None, explicit: Collection[str]) -> Planned:
    plan = profile.plan
    overrides = plan.engine_overrides()
    notes = list(profile.messages)
    if method is not None and plan.method != method:
        # A CPU profile of another method: its tree is not this method's, only its context applies.
        overrides = {"max_length": overrides["max_length"]}
        notes.append(f"this machine's profile measured {plan.method} as faster; using {method} as asked")
    elif method is None and plan.device == "cpu" and not profile.reused:
        notes.append(f"using {plan.method}: the fastest method measured on this machine (--method chooses another)")
    # The user's own settings win over the plan's; the method only when they chose one.
    kept = {key: value for key, value in overrides.items() if key not in explicit}
    if method is None:
        kept["method"] = plan.method
    return Planned("profile", kept, profile, notes)


def _estimate(config: EngineConfig, on_gpu: bool, context_chosen: bool, why: str = "--no-profile") -> Planned:
    """The memory model's plan, from config.json alone (instant, not measured); the context as
    the profile would plan it unless the user chose one."""
    if not on_gpu:
        return Planned("estimate", {}, notes=[f"no GPU: every layer runs on the CPU ({why}: not measured)"])
    import torch

    index = torch.device(config.device if config.device != "auto" else "cuda").index or 0
    plan = memory_estimate(config, vram_budget(index, config.vram_limit_gb), plan_context=not context_chosen)
    if not plan.fits:
        raise ProfileError(f"the model does not fit this GPU with {config.method}: {plan.reason}")
    overrides: dict[str, Any] = {"keep_first_n_layers_on_gpu": plan.layers_on_gpu}
    if not context_chosen:
        overrides["max_length"] = plan.max_context
    if plan.stream_buffers:
        overrides["offload_slots"] = plan.stream_buffers
    note = (f"{why}: the memory model's estimate ({plan.layers_on_gpu} of {plan.layers_total} layers on "
            "the GPU), not measured")
    return Planned("estimate", overrides, notes=[note])


def memory_estimate(config: EngineConfig, vram_bytes: int, download: bool = False, plan_context: bool = False) -> Plan:
    """The memory model's plan of `config` (its model, method, tree, substitute, context) on a card
    of `vram_bytes`, from config.json alone (with `download`, a hub model's config.json is fetched,
    never its weights). With `plan_context`, the context is the one a profile would plan
    (profiles.memory.longest_context), not config.max_length. Raises ProfileError (one line) for
    a model it cannot plan."""
    from profiles.memory import ModelShapeError, estimate_plan, longest_context
    from profiles.source import model_config

    draft = model_config(config.draft_model_path) if config.method in ("classic_sd", "eagle_sd") else None
    model = model_config(config.llm_path, download=download)

    def plan_at(context: int) -> Plan:
        return estimate_plan(model, vram_bytes, config.method, max_context=context, tree_nodes=1 + config.draft_nodes(),
                             substitute_bits=config.substitute_bits, substitute_group=config.substitute_group_size,
                             draft_config=draft, compressed_streaming=config.compressed_streaming)

    try:
        return plan_at(longest_context(plan_at, model) if plan_context else config.max_length)
    except ModelShapeError as err:
        raise ProfileError(f"cannot plan {config.llm_path or 'the bundled model'}: {err}") from None
