"""`run_profile`: the stored profile for this device + model + method, measured when missing or stale."""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from engine.config import method_unavailable
from engine.offload import measure_h2d_gbps
from profiles import fit
from profiles.hardware import DeviceInfo, detect
from profiles.memory import CUDA_CONTEXT_BYTES, DEFAULT_MAX_CONTEXT, GIB
from profiles.source import config_fingerprint, model_config, model_key
from profiles.store import ModelPlan, ProfileError, ProfileStore

CPU_NEW_TOKENS = 16
GPU_METHOD = "subspec_sd"  # what a GPU profile fits when no method is asked for: offloaded, it wins
AUTO = "auto"  # the plan key of a CPU profile that chose the method itself
# CPU use of other programs per core while measuring above which a profile's timings are suspect:
# it is stored with a note, and measured again once the machine is quieter (below half that load).
BUSY_LOAD_PER_CORE = 0.5
LOAD_SAMPLE_S = 0.25  # how long a start that reads a busy profile looks at the machine


@dataclass
class Profile:
    device: DeviceInfo
    model: str  # the profile key of the model (bundled:..., an absolute path or a hub id)
    requested_method: str | None  # None: the profile chose the method (a CPU's fastest)
    plan: ModelPlan
    path: Path | None  # where it is stored; None when it could not be saved (kept in memory)
    reused: bool  # True: read from the store, nothing measured
    messages: list[str] = field(default_factory=list)  # moved-aside files, unsaved profile...

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (`subspec profile --json`)."""
        return {
            "device": {
                "key": self.device.key,
                "gpu": dataclasses.asdict(self.device.gpu) if self.device.gpu else None,
                "cpu": dataclasses.asdict(self.device.cpu),
            },
            "model": self.model,
            "requested_method": self.requested_method,
            "plan": self.plan.as_dict(),
            "engine_overrides": self.plan.engine_overrides(),
            "path": str(self.path) if self.path else None,
            "reused": self.reused,
            "messages": list(self.messages),
        }


def run_profile(
    model: str | None,
    vram_limit_gb: float | None,
    method: str | None = None,
    progress: Callable[[str], None] | None = None,
    force: bool = False,
    *,
    max_context: int | None = None,
    draft_model_path: str | None = None,
    store: ProfileStore | None = None,
    cpu_candidates: tuple[fit.CpuCandidate, ...] = fit.CPU_CANDIDATES,
    cpu_new_tokens: int = CPU_NEW_TOKENS,
    loader: fit.Loader = fit.engine_loader,
) -> Profile:
    """The profile of `model` (None = bundled) + `method` on this machine's GPU (or CPU).

    `method` None lets the profile choose: a GPU fits subspec_sd, a CPU measures vanilla and
    subspec_sd trees and keeps the fastest; a method given is the only one measured.
    Reused from the store when it matches (same device file, model fingerprint, method, cap and
    context, measured on a quiet machine) unless `force`; otherwise measured and saved. The context
    is `max_context`, or when None the planned one: DEFAULT_MAX_CONTEXT on a CPU, on a GPU the
    longest that costs no stream buffer on this card or cap (fit.planned_context). A store
    that cannot be written leaves the profile in memory with a message. Raises ProfileError /
    EngineError (one line) when the model cannot be found or does not fit at all.
    """
    say = progress or (lambda _msg: None)
    if vram_limit_gb is not None and vram_limit_gb <= 0:
        raise ProfileError(f"--vram-limit-gb must be positive, got {vram_limit_gb}")
    if method is not None and (problem := method_unavailable(method, draft_model_path)) is not None:
        raise ProfileError(problem)
    store = store or ProfileStore()
    device = detect()
    key = model_key(model)
    fingerprint = config_fingerprint(model)
    cap = vram_limit_gb if device.gpu else None
    method_key = plan_key(method, draft_model_path, device.gpu is not None)
    stored, messages = store.read(device.key)
    if max_context is None:
        max_context = _planned_context(model, device, cap, method, draft_model_path, messages)
    if device.gpu is None and vram_limit_gb is not None:
        messages.append("no CUDA GPU: --vram-limit-gb does not apply, profiling the CPU")
    if stored is not None and not force:
        plan = stored.plans.get(key, {}).get(method_key)
        if plan and (plan.config_fingerprint, plan.vram_limit_gb, plan.max_context) == (fingerprint, cap, max_context):
            load_now = machine_load() if _was_busy(plan) else 0.0  # only a busy profile costs a look
            if not (_was_busy(plan) and load_now < plan.machine_load / 2):
                return Profile(stored.device, key, method, plan, store.path(device.key), True, messages)
            messages.append(f"the stored profile was measured on a busy machine (other programs {plan.machine_load:.2f} "
                            f"per core, now {load_now:.2f}): measuring again")

    say(f"profiling {key} ({method or 'fastest method'}) on {device.describe()}")
    meter = LoadMeter()
    if device.gpu is None:
        candidates = fit.cpu_candidates_for(method, draft_model_path, cpu_candidates)
        plan = fit.choose_cpu(model, candidates, max_context, cpu_new_tokens, fingerprint, say, loader,
                              draft_model_path=draft_model_path)
    else:
        gpu_device = torch.device("cuda", device.gpu.index)
        device = dataclasses.replace(device, gpu=dataclasses.replace(device.gpu, h2d_gbps=measure_h2d_gbps(gpu_device)))
        say(f"pinned host-to-device bandwidth {device.gpu.h2d_gbps:.1f} GB/s")
        plan = fit.fit_gpu(
            model, method or GPU_METHOD, model_config(model), vram_budget(device.gpu.index, cap), cap,
            max_context, fingerprint, say, loader, draft_model_path=draft_model_path,
        )
    load = meter.per_core()
    if load is not None and load >= BUSY_LOAD_PER_CORE:
        messages.append(f"the machine was busy while measuring (other programs used {load:.2f} per core): timings "
                        "may be low; the profile is measured again once it is quieter")
    plan = dataclasses.replace(plan, machine_load=None if load is None else round(load, 2))
    try:
        path, save_messages = store.save_plan(device, key, method_key, plan)
    except ProfileError as err:
        path, save_messages = None, [f"{err}: the profile is kept for this session only"]
    return Profile(device, key, method, plan, path, False, messages + save_messages)


def plan_key(method: str | None, draft_model_path: str | None, gpu: bool) -> str:
    """The name of a plan under its model in the profile file: the method measured (a CPU's own
    choice is "auto"), and for classic_sd and eagle_sd the draft too."""
    if method is None:
        return GPU_METHOD if gpu else AUTO
    if method in ("classic_sd", "eagle_sd"):
        return f"{method}@{model_key(draft_model_path)}"
    return method


class LoadMeter:
    """The CPU time other programs used since this meter started, per core: the system's busy time
    (/proc/stat) less this process's own. Unlike the load average it neither lags nor counts the
    commands that just ran before this one. None where /proc/stat does not exist."""

    def __init__(self) -> None:
        self._start = _cpu_seconds()

    def per_core(self) -> float | None:
        end = _cpu_seconds()
        if self._start is None or end is None:
            return None
        (busy0, own0, wall0), (busy1, own1, wall1) = self._start, end
        elapsed = wall1 - wall0
        return max(0.0, (busy1 - busy0) - (own1 - own0)) / (elapsed * (os.cpu_count() or 1)) if elapsed > 0 else 0.0


def machine_load() -> float:
    """Other programs' CPU use per core right now (a short sample)."""
    meter = LoadMeter()
    time.sleep(LOAD_SAMPLE_S)
    return meter.per_core() or 0.0


def _cpu_seconds() -> tuple[float, float, float] | None:
    """(the system's busy CPU seconds, this process's CPU seconds, wall seconds)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    ticks = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq + steal) / ticks, time.process_time(), time.monotonic()


def _was_busy(plan: ModelPlan) -> bool:
    return plan.machine_load is not None and plan.machine_load >= BUSY_LOAD_PER_CORE


def _planned_context(model: str | None, device: DeviceInfo, cap: float | None, method: str | None,
                     draft_model_path: str | None, messages: list[str]) -> int:
    """The context when the user chose none (run_profile). Planned for the whole card or the cap,
    not what other programs leave free now: the same on every run, so the stored profile is found."""
    if device.gpu is None:  # the engine holds no more than the model's max_position_embeddings
        return DEFAULT_MAX_CONTEXT
    vram_bytes = int(cap * GIB) if cap else device.gpu.total_vram_bytes
    context = fit.planned_context(model_config(model), vram_bytes, method or GPU_METHOD, draft_model_path)
    if context < DEFAULT_MAX_CONTEXT:
        messages.append(f"context {context} tokens: {DEFAULT_MAX_CONTEXT} would cost a stream buffer on this GPU "
                        f"(--max-length {DEFAULT_MAX_CONTEXT} asks for it anyway)")
    return context


def vram_budget(index: int, vram_limit_gb: float | None) -> int:
    """The card (or the cap), less what other processes hold: their memory is left alone."""
    free, total = torch.cuda.mem_get_info(index)
    ours = torch.cuda.memory_reserved(index)
    # Our own CUDA context is in `total - free` too; the memory model counts it separately.
    elsewhere = max(0, total - free - ours - CUDA_CONTEXT_BYTES)
    available = total - elsewhere
    return min(available, int(vram_limit_gb * GIB)) if vram_limit_gb else available


def format_profile(profile: Profile) -> str:
    """Plain text for `subspec profile` and the TUI (`profile.messages` are shown separately)."""
    plan = profile.plan
    lines = [
        f"Device:   {profile.device.describe()}",
        f"Model:    {profile.model}",
        f"Method:   {plan.method}" + _method_note(plan, profile.requested_method),
    ]
    if plan.device == "cuda":
        streamed = plan.layers_total - plan.layers_on_gpu
        if streamed:
            plural = "s" if plan.stream_buffers > 1 else ""
            form = "compressed (Huffman-coded exponents)" if plan.compressed_streaming else "bf16"
            streaming = (f"{streamed} streamed from pinned memory through {plan.stream_buffers} device buffer{plural}, "
                         f"{form}")
        else:
            streaming = "none streamed (no stream buffers)"
        lines.append(f"Layers:   {plan.layers_on_gpu} of {plan.layers_total} on the GPU, {streaming}")
        cap = f" (capped at {plan.vram_limit_gb:g} GiB)" if plan.vram_limit_gb else ""
        lines.append(
            f"Memory:   budget {_gib(plan.vram_budget_bytes)}{cap}, estimated peak {_gib(plan.estimated_peak_bytes)}, "
            f"measured peak {_gib(plan.measured_peak_bytes)}"
        )
    if plan.substitute_bits:
        lines.append(f"Substitute: HQQ {plan.substitute_bits}-bit, group {plan.substitute_group}")
    if plan.max_depth is not None:
        batch = f", {plan.draft_batch} per draft forward" if plan.draft_batch else ""
        floor = f", floor {plan.min_draft_prob:g}" if plan.min_draft_prob else ""
        lines.append(f"Tree:     {plan.tree_policy}, depth {plan.max_depth}, top-{plan.topk_len} "
                     f"({(plan.node_budget or 0) + 1} nodes{batch}{floor})")
    lines.append(f"Context:  {plan.max_context} tokens")
    if plan.verify_ms_by_nodes:
        costs = ", ".join(f"{n}: {ms:.1f} ms" for n, ms in sorted(plan.verify_ms_by_nodes.items()))
        lines.append(f"Forward cost by tokens: {costs}")
    if plan.tok_per_s_by_candidate:
        speeds = "; ".join(f"{label}: {tps:.1f} tok/s" for label, tps in plan.tok_per_s_by_candidate.items())
        lines.append(f"Measured: {speeds}")
    if plan.machine_load is not None:
        busy = " (busy: timings may be low)" if plan.machine_load >= BUSY_LOAD_PER_CORE else ""
        lines.append(f"Load:     other programs used {plan.machine_load:.2f} per core while measuring{busy}")
    origin = "reused" if profile.reused else "measured"
    lines.append(f"Profile:  {origin} {plan.measured_at:%Y-%m-%d %H:%M} UTC, " + (f"stored in {profile.path}" if profile.path else "not saved"))
    return "\n".join(lines)


def _method_note(plan: ModelPlan, requested: str | None) -> str:
    if requested is None:
        return " (the fastest measured)" if plan.device == "cpu" else ""
    return "" if plan.method == requested else f" (fastest measured; asked for {requested})"


def _gib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / GIB:.2f} GiB"
