"""The profile screen: this machine's GPU, the plan for the current model, and re-profiling."""

from __future__ import annotations

from typing import TYPE_CHECKING

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Button, Footer, Header, Label, Static
from textual.worker import Worker, WorkerState

import profiles
from engine import EngineError
from subspec_tui.models import format_bytes

if TYPE_CHECKING:
    from subspec_tui.app import SubSpecChatApp


def engine_lines(describe: dict | None) -> list[str]:
    if describe is None:
        return ["no model loaded"]
    lines = [f"model          {describe.get('model', '?')}", f"method         {describe.get('method', '?')}",
             f"device         {describe.get('device', '?')} ({describe.get('dtype', '?')})"]
    if str(describe.get("device")) == "cpu":
        lines.append("offload        none (CPU, no offload)")
    else:
        lines.append(f"layers on GPU  {describe.get('layers_on_gpu', '?')} of {describe.get('layers_total', '?')}")
        lines.append(f"offloaded      {format_bytes(describe.get('offloaded_bytes'))}")
        gbps = describe.get("h2d_gbps")
        lines.append(f"pinned H2D     {'not measured' if gbps is None else f'{gbps:.1f} GB/s'}")
        bound = describe.get("stream_bound_ms")
        lines.append(f"stream bound   {'n/a' if bound is None else f'{bound:.1f} ms per forward'}")
    if describe.get("substitute_bits"):
        lines.append(f"substitute     HQQ {describe['substitute_bits']}-bit, "
                     f"{format_bytes(describe.get('substitute_bytes'))}")
    lines.append(f"max length     {describe.get('max_length', '?')} tokens")
    return lines


def plan_lines(plan: profiles.Plan) -> list[str]:
    return [
        f"layers on GPU  {plan.layers_on_gpu} of {plan.layers_total}",
        f"weights        {format_bytes(plan.weights_bytes)}",
        f"KV cache       {format_bytes(plan.kv_cache_bytes)} ({plan.max_context} tokens)",
        f"buffers        {format_bytes(plan.buffers_bytes)}",
        f"total          {format_bytes(plan.total_bytes)} of {format_bytes(plan.vram_bytes)}",
        f"tree budget    {plan.tree_nodes} nodes per verification",
        "verdict        " + ("fits" if plan.fits else f"does not fit: {plan.reason}"),
    ]


class ProfileScreen(Screen):
    BINDINGS = [
        Binding("ctrl+r", "reprofile", "Re-run profiling", id="profile.rerun"),
        Binding("escape", "app.switch_mode('chat')", "Back to chat", id="profile.back"),
    ]

    class ProfileProgress(Message):
        def __init__(self, text: str) -> None:
            super().__init__()
            self.text = text

    app: "SubSpecChatApp"

    def compose(self) -> ComposeResult:
        yield Header()
        with VerticalScroll(id="profile-pane"):
            yield Label("Hardware", classes="panel-title")
            yield Static(id="profile-hardware")
            yield Label("Loaded engine", classes="panel-title")
            yield Static(id="profile-engine")
            yield Label("Memory plan for the current model", classes="panel-title")
            yield Static(id="profile-plan")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Re-run profiling", id="reprofile")
            yield Static("", id="profile-status")
        yield Footer()

    def on_mount(self) -> None:
        self.refresh_profile()

    def on_screen_resume(self) -> None:
        self.refresh_profile()

    def refresh_profile(self) -> None:
        app = self.app
        vram = app.gpu_vram_bytes
        hardware = f"GPU            {app.gpu_name} ({format_bytes(vram)})" if vram else \
            "GPU            none: everything runs on the CPU (no offload, no PCIe)"
        self.query_one("#profile-hardware", Static).update(hardware)
        describe = app.engine.describe() if app.engine else None
        self.query_one("#profile-engine", Static).update("\n".join(engine_lines(describe)))
        self.query_one("#profile-plan", Static).update(self.plan_text())

    def plan_text(self) -> str:
        app = self.app
        if app.gpu_vram_bytes is None:
            return "no GPU: no VRAM plan (all layers stay in CPU memory)"
        model = app.current_model()
        if model is None:
            return "the current model is not in the model list (F3)"
        try:
            plan = profiles.estimate_plan(model.config, app.gpu_vram_bytes, app.method)
        except profiles.ModelShapeError as err:
            return f"cannot plan {model.repo_id}: {err}"
        return "\n".join(plan_lines(plan))

    @on(Button.Pressed, "#reprofile")
    def action_reprofile(self) -> None:
        run_profile = getattr(profiles, "run_profile", None)
        if run_profile is None:
            self.notify("measured profiling is not available in this build (profiles.run_profile missing)",
                        severity="warning")
            return
        self.query_one("#profile-status", Static).update("profiling…")
        self.reprofile(run_profile)

    @work(thread=True, exclusive=True, group="profile", exit_on_error=False)
    def reprofile(self, run_profile) -> object:
        return run_profile(
            model=self.app.model_ref, vram_limit_gb=None, method=self.app.method, force=True,
            progress=lambda text: self.post_message(self.ProfileProgress(text)),
        )

    def on_profile_screen_profile_progress(self, message: ProfileProgress) -> None:
        self.query_one("#profile-status", Static).update(message.text)

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if event.worker.group != "profile":
            return
        status = self.query_one("#profile-status", Static)
        if event.state == WorkerState.SUCCESS:
            status.update(profiles.format_profile(event.worker.result))
        elif event.state == WorkerState.ERROR:
            error = event.worker.error
            status.update("")
            self.notify(str(error) if isinstance(error, EngineError) else f"internal error: {error!r}",
                        severity="error")
