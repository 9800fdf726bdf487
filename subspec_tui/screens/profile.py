"""The profile screen: this machine's GPU, its measured profile (with the progress of a measurement
under way), the loaded engine, the estimated plan for the current model, and re-profiling."""

from __future__ import annotations

from typing import TYPE_CHECKING

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.screen import Screen
from textual.widgets import Button, Footer, Header, Label, ProgressBar, Static
from textual.worker import Worker, WorkerState

import profiles
from engine import EngineError
from subspec_tui import models
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


PROFILE_LOG_LINES = 12  # the latest progress lines of a measurement shown at once


class ProfileScreen(Screen):
    BINDINGS = [
        Binding("ctrl+r", "reprofile", "Re-run profiling", id="profile.rerun"),
        Binding("escape", "app.switch_mode('chat')", "Back to chat", id="profile.back"),
    ]

    app: "SubSpecChatApp"

    def compose(self) -> ComposeResult:
        yield Header()
        with VerticalScroll(id="profile-pane"):
            yield Label("Hardware", classes="panel-title")
            yield Static(id="profile-hardware")
            yield Label("Measured profile (this machine, current model and method)", classes="panel-title")
            yield Static(id="profile-measured", markup=False)
            yield ProgressBar(total=None, show_eta=False, show_percentage=False, id="profile-progress")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Re-run profiling", id="reprofile")
            yield Label("Loaded engine", classes="panel-title")
            yield Static(id="profile-engine")
            yield Label("Memory plan for the current model (estimate)", classes="panel-title")
            yield Static(id="profile-plan")
        yield Footer()

    def on_screen_resume(self) -> None:  # also the first time the screen is shown
        self.refresh_profile()

    def refresh_profile(self) -> None:
        app = self.app
        vram = app.gpu_vram_bytes
        hardware = f"GPU            {app.gpu_name} ({format_bytes(vram)})" if vram else \
            "GPU            none: everything runs on the CPU (no offload, no PCIe)"
        self.query_one("#profile-hardware", Static).update(hardware)
        self.show_measured()
        self.show_estimate()

    def show_measured(self) -> None:
        """The stored or just measured profile, or the progress of the measurement under way."""
        app = self.app
        describe = app.engine.describe() if app.engine else None
        self.query_one("#profile-engine", Static).update("\n".join(engine_lines(describe)))
        self.query_one("#profile-progress", ProgressBar).display = app.measuring
        self.query_one("#profile-measured", Static).update(measured_text(app))

    # ------------------------------------------------------------ estimate from the model list

    def show_estimate(self) -> None:
        plan = self.query_one("#profile-plan", Static)
        if self.app.gpu_vram_bytes is None:
            plan.update("no GPU: no VRAM plan (all layers stay in CPU memory)")
        elif (text := current_estimate(self.app)) is not None:
            plan.update(text)
        else:
            # Scanning the hub cache reads every model's files: never on the UI thread.
            plan.update("scanning the model cache…")
            self.list_models()

    @work(thread=True, exclusive=True, group="list", exit_on_error=False)
    def list_models(self) -> list[models.LocalModel]:
        return models.list_models()

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if event.worker.group != "list":
            return
        plan = self.query_one("#profile-plan", Static)
        if event.state == WorkerState.SUCCESS:
            self.app.known_models = event.worker.result
            plan.update(current_estimate(self.app) or "the current model is not in the model list (F3)")
        elif event.state == WorkerState.ERROR:
            error = event.worker.error
            plan.update("cannot list the local models")
            self.notify(str(error) if isinstance(error, EngineError) else f"internal error: {error!r}",
                        severity="error")

    @on(Button.Pressed, "#reprofile")
    def action_reprofile(self) -> None:
        self.app.load_model(force_profile=True)


def current_estimate(app: "SubSpecChatApp") -> str | None:
    """The memory model's plan for the current model on this GPU; None when the model is not in
    the app's list of local models (yet)."""
    model = next((m for m in app.known_models if m.llm_path == app.model_ref), None)
    if model is None:
        return None
    try:
        plan = profiles.estimate_plan(model.config, app.gpu_vram_bytes, app.method or "subspec_sd")
    except profiles.ModelShapeError as err:
        return f"cannot plan {model.repo_id}: {err}"
    return "\n".join(plan_lines(plan))


def measured_text(app: "SubSpecChatApp") -> str:
    if app.measuring:
        head = (f"measuring {app.model_label} ({app.method_label}) on this machine; "
                "the profile is stored and reused by later starts")
        return "\n".join([head, *app.profile_log[-PROFILE_LOG_LINES:]])
    if app.profile is not None:
        return "\n".join([profiles.format_profile(app.profile), *app.profile.messages])
    if app.engine_loading:
        return "checking this machine's profile…"
    if app.engine_error:
        return f"no profile: {app.engine_error}"
    return "not profiled yet"
