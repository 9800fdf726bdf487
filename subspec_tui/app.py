"""`subspec-chat`: the Textual app, the product's front door.

Modes: chat (default), models (F3), profile (F4). Blocking work (profiling, model load,
generation, downloads, model listing) runs in thread workers; engine errors become notifications.

Start-up: the profile of this machine + model + method (profiles.run_profile: measured on a first
start, shown on the profile screen, then stored and reused), then the engine with the profile's
plan applied over the method's preset.
"""

from __future__ import annotations

import argparse
from functools import partial
from typing import Callable

from textual import work
from textual.app import App
from textual.binding import Binding
from textual.command import DiscoveryHit, Hit, Hits, Provider
from textual.message import Message
from textual.worker import Worker, WorkerState

from engine import METHODS, Engine, EngineConfig, EngineError, SamplingConfig, load_engine
from profiles import Profile, run_profile
from subspec_tui import models
from subspec_tui.history import ChatStore
from subspec_tui.screens.chat import ChatScreen
from subspec_tui.screens.dialogs import HelpScreen
from subspec_tui.screens.models import ModelsScreen
from subspec_tui.screens.profile import ProfileScreen
from subspec_tui.settings import ConfigError, DEFAULT_METHOD, Settings, resolve_settings, validate

Progress = Callable[[str], None]
EngineLoader = Callable[[EngineConfig, Progress], Engine]
# profiles.run_profile called positionally: (model, vram_limit_gb, method, progress, force) -> Profile
Profiler = Callable[[str | None, float | None, str, Progress, bool], Profile]
GpuInfo = tuple[str, int] | None  # (name, total VRAM bytes); None = no CUDA device

MODEL_PREFERENCE = "model"
METHOD_PREFERENCE = "method"


def detect_gpu() -> GpuInfo:
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return props.name, props.total_memory


def planned_settings(
    profile: Profile, model_ref: str | None, method: str, method_is_explicit: bool
) -> tuple[Settings, str | None]:
    """The settings to load with: the preset of the plan's method with the plan's fields over it,
    and a note for the user when the plan's method is not the one asked for. Raises ConfigError
    (naming the profile file) when the plan holds a value the engine does not accept."""
    plan = profile.plan
    overrides = plan.engine_overrides()
    note = None
    if plan.method != method:
        # Only a CPU profile picks another method (the fastest it measured). `--method` still wins;
        # the plan's tree belongs to the other method, so only its context length applies.
        if method_is_explicit:
            overrides = {"method": method, "max_length": overrides["max_length"]}
            note = f"this machine's profile measured {plan.method} as faster; using {method} as --method asks"
        else:
            note = f"using {plan.method}: the fastest method measured on this machine (asked for {method})"
    checked = validate(overrides, f"profile {profile.path}" if profile.path else "the measured profile")
    return resolve_settings(None, {"llm_path": model_ref, **checked}), note


class SubSpecCommands(Provider):
    """Command palette entries: every app action plus one 'Use model …' per local model."""

    def _commands(self) -> list[tuple[str, Callable[[], object], str]]:
        app: SubSpecChatApp = self.app  # type: ignore[assignment]
        return [
            ("New chat", partial(app.run_chat_action, "new_chat"), "Start an empty chat"),
            ("Open chat…", partial(app.run_chat_action, "open_chat"), "Continue or delete a stored chat"),
            ("Stop generation", partial(app.run_chat_action, "stop"), "Stop the reply being streamed"),
            ("Chat settings", partial(app.run_chat_action, "chat_settings"), "System prompt and sampling"),
            ("Export chat to Markdown", partial(app.run_chat_action, "export"), "Write the chat to a .md file"),
            ("Models", partial(app.switch_mode, "models"), "Local models, downloads, deletion"),
            ("Profile", partial(app.switch_mode, "profile"), "GPU profile and memory plan"),
            ("Keys", app.action_help, "Every key binding"),
        ]

    async def discover(self) -> Hits:
        for name, callback, help_text in self._commands():
            yield DiscoveryHit(name, callback, help=help_text)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        commands = self._commands()
        app: SubSpecChatApp = self.app  # type: ignore[assignment]
        for model in app.known_models:
            commands.append((f"Use model {model.repo_id}", partial(app.use_model, model.llm_path, model.repo_id),
                             f"Load {model.repo_id} with {app.method}"))
        for name, callback, help_text in commands:
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
    ) -> None:
        super().__init__()
        self.engine_loader = engine_loader
        self.profiler = profiler
        self.store_warning: str | None = None
        if store is None:
            store, self.store_warning = ChatStore.open_or_recover()
        self.store = store
        # --model / --method win; otherwise the last choice; otherwise the bundled model.
        self.model_ref = model_ref or store.get_preference(MODEL_PREFERENCE) or None
        self.method = method or store.get_preference(METHOD_PREFERENCE) or DEFAULT_METHOD
        self.method_is_explicit = method is not None  # --method: kept even if the profile measured another faster
        self.model_label = self.model_ref or models.BUNDLED_ID
        gpu_info = detect_gpu() if gpu == "detect" else gpu
        self.gpu_name, self.gpu_vram_bytes = gpu_info if gpu_info else (None, None)
        self.engine: Engine | None = None
        self.engine_loading = False
        self.engine_error: str | None = None
        self.load_progress = ""
        self.profile: Profile | None = None
        self.profile_log: list[str] = []  # progress of the latest measurement
        self.measuring = False  # run_profile is measuring (not reading a stored profile)
        self.return_to_chat = False  # the profile screen was opened to show a measurement
        self.default_sampling = SamplingConfig()
        self.pending_sampling = SamplingConfig()
        self.pending_system_prompt = ""
        self.known_models: list[models.LocalModel] = []

    def on_mount(self) -> None:
        self.switch_mode("chat")
        if self.store_warning:
            self.notify(self.store_warning, severity="warning", timeout=10)
        self.load_model()

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

    def load_model(self, force_profile: bool = False) -> None:
        """Profile this machine for the current model and method (measured on a first start or
        after the GPU or the model changed, read back from the store otherwise), then load the
        engine with the profile's plan. `force_profile` measures again (the profile screen)."""
        if (reason := self.busy_reason()) is not None:
            self.notify(reason, severity="warning")
            return
        if self.engine is not None:
            self.engine.close()  # a measurement needs the GPU memory the old engine holds
            self.engine = None
        self.engine_loading, self.engine_error = True, None
        self.load_progress = "checking this machine's profile"
        self.profile, self.profile_log = None, []
        self.refresh_views()
        self.profile_worker(force_profile)

    @work(thread=True, exclusive=True, group="profile", exit_on_error=False)
    def profile_worker(self, force: bool) -> Profile:
        return self.profiler(self.model_ref, None, self.method,
                             lambda text: self.post_message(self.ProfileProgress(text)), force)

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
            self.profile_ready(event.worker.result)
        else:
            self.engine_ready(event.worker.result)
        self.refresh_views()

    def profile_ready(self, profile: Profile) -> None:
        self.profile = profile
        for message in profile.messages:  # a corrupt profile moved aside, a store that is read-only
            self.notify(message, severity="warning", timeout=10)
        try:
            settings, note = planned_settings(profile, self.model_ref, self.method, self.method_is_explicit)
        except ConfigError as err:
            self.engine_failed(err)
            return
        if note:
            self.notify(note, timeout=10)
        self.default_sampling = self.pending_sampling = settings.sampling
        self.load_progress = ""
        self.load_engine_worker(settings.engine)

    def engine_ready(self, engine: Engine) -> None:
        self.engine_loading = False
        self.engine = engine
        self.store.set_preference(METHOD_PREFERENCE, self.method)
        self.notify(f"{engine.model_name} loaded ({engine.config.method})")

    def engine_failed(self, error: BaseException | None) -> None:
        # Anything but an EngineError (ProfileError included) or a bad plan value is a bug: say so, stay up.
        self.engine_loading = False
        expected = isinstance(error, (EngineError, ConfigError))
        self.engine_error = str(error) if expected else f"internal error: {error!r}"
        self.notify(self.engine_error, severity="error")

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="subspec-chat", description="Chat with local models larger than your GPU.")
    parser.add_argument("--model", help="hub id, model folder or .gguf file (default: the last one used, "
                        "else the bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--method", choices=METHODS, help=f"decoding method (default: the last one used, "
                        f"else {DEFAULT_METHOD})")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    SubSpecChatApp(model_ref=args.model, method=args.method).run()


if __name__ == "__main__":
    main()
