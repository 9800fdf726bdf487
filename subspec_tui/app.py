"""`subspec-chat`: the Textual app, the product's front door.

Modes: chat (default), models (F3), profile (F4). Blocking work (profiling, model load,
generation, downloads, model listing) runs in thread workers; engine errors become notifications.

Start-up: the profile of this machine + model + method (profiles.run_profile: measured on a first
start, shown on the profile screen, then stored and reused), then the engine with the profile's
plan applied over the method's preset.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

from textual import work
from textual.app import App
from textual.binding import Binding
from textual.command import DiscoveryHit, Hit, Hits, Provider
from textual.message import Message
from textual.worker import Worker, WorkerState

from engine import Engine, EngineConfig, EngineError, SamplingConfig, load_engine
from profiles import run_profile
from profiles.choose import Planned, check_method, choose_plan
from subspec_tui import models
from subspec_tui.history import ChatStore
from subspec_tui.screens.chat import ChatScreen
from subspec_tui.screens.dialogs import HelpScreen
from subspec_tui.screens.models import ModelsScreen
from subspec_tui.screens.profile import ProfileScreen
from subspec_tui.settings import ConfigError, Settings, resolve_settings

Progress = Callable[[str], None]
EngineLoader = Callable[[EngineConfig, Progress], Engine]
# profiles.run_profile: (model, vram_limit_gb, method or None, progress, force, *, max_context, draft_model_path)
Profiler = Callable[..., object]
GpuInfo = tuple[str, int] | None  # (name, total VRAM bytes); None = no CUDA device

MODEL_PREFERENCE = "model"
METHOD_PREFERENCE = "method"  # only a method the user chose; unset = the profile's choice
CHOOSABLE_METHODS = ("vanilla", "subspec_sd", "classic_sd")


def detect_gpu() -> GpuInfo:
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return props.name, props.total_memory


def plan_settings(
    model_ref: str | None, method: str | None, draft_model_path: str | None, profiler: Profiler,
    progress: Progress, force: bool, gpu: bool, vram_limit_gb: float | None = None, max_length: int | None = None,
) -> tuple[Settings, Planned]:
    """What the app loads with, decided as for every front end (profiles.choose_plan): the method
    the user chose, else the profile's; the profile's plan over the method's preset."""
    chosen = {"llm_path": model_ref, "draft_model_path": draft_model_path, "vram_limit_gb": vram_limit_gb,
              "max_length": max_length}
    chosen |= {"method": method} if method else {}
    asked = resolve_settings(None, {k: v for k, v in chosen.items() if v is not None})
    explicit = {key for key in ("method", "max_length") if chosen.get(key)}
    planned = choose_plan(asked.engine, explicit, force=force, progress=progress, profiler=profiler, gpu=gpu)
    settings = resolve_settings(None, {k: v for k, v in chosen.items() if v is not None}, planned.overrides,
                                planned.origin)
    return settings, planned


class SubSpecCommands(Provider):
    """Command palette entries: every app action, one 'Use model …' per local model and one
    'Use method …' per method."""

    def _commands(self) -> list[tuple[str, Callable[[], object], str]]:
        app: SubSpecChatApp = self.app  # type: ignore[assignment]
        commands = [
            ("New chat", partial(app.run_chat_action, "new_chat"), "Start an empty chat"),
            ("Open chat…", partial(app.run_chat_action, "open_chat"), "Continue or delete a stored chat"),
            ("Stop generation", partial(app.run_chat_action, "stop"), "Stop the reply being streamed"),
            ("Chat settings", partial(app.run_chat_action, "chat_settings"), "System prompt and sampling"),
            ("Export chat to Markdown", partial(app.run_chat_action, "export"), "Write the chat to a .md file"),
            ("Models", partial(app.switch_mode, "models"), "Local models, downloads, deletion"),
            ("Profile", partial(app.switch_mode, "profile"), "GPU profile and memory plan"),
            ("Keys", app.action_help, "Every key binding"),
            ("Use method chosen by the profile", partial(app.use_method, None),
             "The fastest method this machine's profile measured"),
        ]
        for method in CHOOSABLE_METHODS:
            commands.append((f"Use method {method}", partial(app.use_method, method), f"Reload the model with {method}"))
        for model in app.known_models:
            commands.append((f"Use model {model.repo_id}", partial(app.use_model, model.llm_path, model.repo_id),
                             f"Load {model.repo_id}"))
        return commands

    async def discover(self) -> Hits:
        for name, callback, help_text in self._commands():
            yield DiscoveryHit(name, callback, help=help_text)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for name, callback, help_text in self._commands():
            if (score := matcher.match(name)) > 0:
                yield Hit(score, matcher.highlight(name), callback, help=help_text)


class SubSpecChatApp(App):
    CSS_PATH = "app.tcss"
    TITLE = "SubSpec Chat"
    COMMANDS = App.COMMANDS | {SubSpecCommands}
    SCREENS = {"chat": ChatScreen, "models": ModelsScreen, "profile": ProfileScreen}
    MODES = {"chat": "chat", "models": "models", "profile": "profile"}
    BINDINGS = [
        Binding("f1", "help", "Keys", id="app.help"),
        Binding("f2", "switch_mode('chat')", "Chat", id="app.chat"),
        Binding("f3", "switch_mode('models')", "Models", id="app.models"),
        Binding("f4", "switch_mode('profile')", "Profile", id="app.profile"),
        Binding("ctrl+l", "dismiss_alerts", "Dismiss alerts", show=False, id="app.dismiss_alerts"),
    ]

    class LoadProgress(Message):
        def __init__(self, text: str) -> None:
            super().__init__()
            self.text = text

    class ProfileProgress(Message):
        def __init__(self, text: str) -> None:
            super().__init__()
            self.text = text

    def __init__(
        self,
        model_ref: str | None = None,
        method: str | None = None,
        engine_loader: EngineLoader = load_engine,
        store: ChatStore | None = None,
        gpu: GpuInfo | str = "detect",
        profiler: Profiler = run_profile,
        draft_model_path: str | None = None,
        vram_limit_gb: float | None = None,
        max_length: int | None = None,  # the context the user chose; None: the profile's
    ) -> None:
        super().__init__()
        self.vram_limit_gb = vram_limit_gb
        self.max_length = max_length
        self.engine_loader = engine_loader
        self.profiler = profiler
        self.store_warning: str | None = None
        if store is None:
            store, self.store_warning = ChatStore.open_or_recover()
        self.store = store
        # --model / --method win; otherwise the last choice; otherwise the bundled model and the
        # method this machine's profile measured fastest.
        self.model_ref = model_ref or store.get_preference(MODEL_PREFERENCE) or None
        self.method: str | None = method or store.get_preference(METHOD_PREFERENCE) or None
        if method:
            self.store.set_preference(METHOD_PREFERENCE, method)
        self.draft_model_path = draft_model_path
        self.model_label = self.model_ref or models.BUNDLED_ID
        gpu_info = detect_gpu() if gpu == "detect" else gpu
        self.gpu_name, self.gpu_vram_bytes = gpu_info if gpu_info else (None, None)
        self.engine: Engine | None = None
        self.engine_loading = False
        self.engine_error: str | None = None
        self.load_progress = ""
        self.planned: Planned | None = None
        self.profile_log: list[str] = []  # progress of the latest measurement
        self.measuring = False  # run_profile is measuring (not reading a stored profile)
        self.return_to_chat = False  # the profile screen was opened to show a measurement
        self.default_sampling = SamplingConfig()
        self.pending_sampling = SamplingConfig()
        self.pending_system_prompt = ""
        self.known_models: list[models.LocalModel] = []

    @property
    def profile(self):
        return self.planned.profile if self.planned else None

    @property
    def method_label(self) -> str:
        """The method running, else the one asked for, else what the profile will choose."""
        if self.engine is not None:
            return self.engine.config.method
        return self.method or "method from the profile"

    def on_mount(self) -> None:
        self.switch_mode("chat")
        self.store.on_unsaved = lambda reason: self.alert(reason, "warning")
        if self.store_warning:
            self.alert(self.store_warning, "warning")
        self.list_models()  # the command palette's "Use model …" entries, before F3 is ever opened
        self.load_model()

    # ------------------------------------------------------------ alerts, models

    def alert(self, text: str, severity: str = "error", screen: str = "chat") -> None:
        """An error that stays on the screen it concerns until dismissed (toasts vanish)."""
        self.get_screen(screen).alert(text, severity)  # type: ignore[attr-defined]

    def action_dismiss_alerts(self) -> None:
        alerts = getattr(self.screen, "alerts", None)
        if alerts is not None:
            alerts.clear()

    @work(thread=True, exclusive=True, group="known-models", exit_on_error=False)
    def list_models(self) -> list[models.LocalModel]:
        return models.list_models()

    # ------------------------------------------------------------ profile, then engine

    def busy_reason(self) -> str | None:
        """Why the engine cannot be replaced right now (None: it can)."""
        if self.engine_loading:
            return "the model is still loading: wait for it to finish"
        if self.chat_screen().generating:
            return "a reply is streaming: stop it first (esc)"
        return None

    def use_model(self, model_ref: str | None, label: str | None = None) -> None:
        if (reason := self.busy_reason()) is not None:
            self.notify(reason, severity="warning")
            return
        self.model_ref = model_ref
        self.model_label = label or model_ref or models.BUNDLED_ID
        self.store.set_preference(MODEL_PREFERENCE, model_ref or "")
        self.load_model()

    def use_method(self, method: str | None) -> None:
        """Reload with `method` (None: the one the profile measured fastest); remembered."""
        if (reason := self.busy_reason()) is not None:
            self.notify(reason, severity="warning")
            return
        if method == "classic_sd" and not self.draft_model_path:
            self.alert("classic_sd needs a draft model: start subspec-chat with --draft-model-path")
            return
        self.method = method
        self.store.set_preference(METHOD_PREFERENCE, method or "")
        self.load_model()

    def load_model(self, force_profile: bool = False) -> None:
        """Plan (the stored profile, measured on a first start or after the GPU or the model
        changed), then load the engine with the plan. `force_profile` measures again."""
        if (reason := self.busy_reason()) is not None:
            self.notify(reason, severity="warning")
            return
        try:  # refused before minutes of measuring: eagle_sd, classic_sd without a draft
            check_method(EngineConfig(method=self.method or "vanilla", draft_model_path=self.draft_model_path))
        except EngineError as err:
            self.engine_failed(err)
            self.refresh_views()
            return
        if self.engine is not None:
            self.engine.close()  # a measurement needs the GPU memory the old engine holds
            self.engine = None
        self.engine_loading, self.engine_error = True, None
        self.load_progress = "checking this machine's profile"
        self.planned, self.profile_log = None, []
        self.refresh_views()
        self.profile_worker(force_profile)

    @work(thread=True, exclusive=True, group="profile", exit_on_error=False)
    def profile_worker(self, force: bool) -> tuple[Settings, Planned]:
        progress = lambda text: self.post_message(self.ProfileProgress(text))  # noqa: E731
        return plan_settings(self.model_ref, self.method, self.draft_model_path, self.profiler, progress, force,
                             gpu=self.gpu_vram_bytes is not None, vram_limit_gb=self.vram_limit_gb,
                             max_length=self.max_length)

    def on_sub_spec_chat_app_profile_progress(self, message: ProfileProgress) -> None:
        # run_profile reports progress only while it measures; a stored profile comes back silently.
        if not self.measuring:
            self.measuring = True
            if self.current_mode != "profile":
                self.switch_mode("profile")
                self.return_to_chat = True
        self.profile_log.append(message.text)
        self.load_progress = f"measuring this machine: {message.text}"
        self.refresh_views()

    @work(thread=True, exclusive=True, group="engine", exit_on_error=False)
    def load_engine_worker(self, config: EngineConfig) -> Engine:
        return self.engine_loader(config, lambda text: self.post_message(self.LoadProgress(text)))

    def on_sub_spec_chat_app_load_progress(self, message: LoadProgress) -> None:
        self.load_progress = message.text
        self.refresh_views()

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        group = event.worker.group
        if group == "known-models" and event.state == WorkerState.SUCCESS:
            self.known_models = event.worker.result
            return
        if group not in ("profile", "engine") or event.state not in (WorkerState.SUCCESS, WorkerState.ERROR):
            return
        if group == "profile":
            self.measuring = False
            if self.return_to_chat:
                self.return_to_chat = False
                self.switch_mode("chat")  # the measurement is over: land in the chat
        if event.state == WorkerState.ERROR:
            self.engine_failed(event.worker.error)
        elif group == "profile":
            self.plan_ready(*event.worker.result)
        else:
            self.engine_ready(event.worker.result)
        self.refresh_views()

    def plan_ready(self, settings: Settings, planned: Planned) -> None:
        self.planned = planned
        for note in planned.notes:
            if note in planned.warnings:  # a corrupt profile moved aside, a read-only store: they stay
                self.alert(note, "warning")
            else:  # the method a first measurement chose
                self.notify(note, timeout=10)
        self.default_sampling = self.pending_sampling = settings.sampling
        self.load_progress = ""
        self.load_engine_worker(settings.engine)

    def engine_ready(self, engine: Engine) -> None:
        self.engine_loading = False
        self.engine = engine
        self.notify(f"{engine.model_name} loaded ({engine.config.method})")
        self.chat_screen().send_waiting()  # a prompt typed while the model loaded

    def engine_failed(self, error: BaseException | None) -> None:
        # Anything but an EngineError (ProfileError included) or a bad plan value is a bug: say so, stay up.
        self.engine_loading = False
        expected = isinstance(error, (EngineError, ConfigError))
        self.engine_error = str(error) if expected else f"internal error: {error!r}"
        self.alert(f"no model loaded: {self.engine_error}")
        self.chat_screen().drop_waiting()

    def refresh_views(self) -> None:
        """Redraw what shows the engine's state: the chat status line and the profile screen."""
        chat = self.chat_screen()
        if chat.is_mounted:
            chat.update_status()
        profile = self.get_screen("profile")
        if profile.is_mounted:
            profile.show_measured()  # type: ignore[attr-defined]

    def chat_screen(self) -> ChatScreen:
        return self.get_screen("chat")  # type: ignore[return-value]

    # ------------------------------------------------------------ actions

    def run_chat_action(self, action: str) -> None:
        self.switch_mode("chat")
        getattr(self.chat_screen(), f"action_{action}")()

    def action_help(self) -> None:
        if isinstance(self.screen, HelpScreen):
            return
        sections = [("Everywhere", _binding_rows(self.BINDINGS) + [("ctrl+p", "Command palette", "app.palette"),
                                                                 ("ctrl+q", "Quit", "app.quit")])]
        screen_bindings = _binding_rows(getattr(type(self.screen), "BINDINGS", []))
        if screen_bindings:
            sections.append((type(self.screen).__name__.removesuffix("Screen") + " screen", screen_bindings))
        chat_bindings = _binding_rows(ChatScreen.BINDINGS)
        if type(self.screen) is not ChatScreen:
            sections.append(("Chat screen", chat_bindings))
        self.push_screen(HelpScreen(sections))

    def on_unmount(self) -> None:
        if self.engine is not None:
            self.engine.close()
        self.store.close()


def _binding_rows(bindings: list) -> list[tuple[str, str, str]]:
    return [(b.key, b.description, b.id or "") for b in bindings if isinstance(b, Binding)]
