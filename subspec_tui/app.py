"""`subspec-chat`: the Textual app, the product's front door.

Modes: chat (default), models (F3), profile (F4). Blocking work (model load, generation,
downloads, profiling) runs in thread workers; engine errors become notifications.
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
from subspec_tui import models
from subspec_tui.history import ChatStore
from subspec_tui.screens.chat import ChatScreen
from subspec_tui.screens.dialogs import HelpScreen
from subspec_tui.screens.models import ModelsScreen
from subspec_tui.screens.profile import ProfileScreen
from subspec_tui.settings import ConfigError, DEFAULT_METHOD, resolve_settings

EngineLoader = Callable[[EngineConfig, Callable[[str], None]], Engine]
GpuInfo = tuple[str, int] | None  # (name, total VRAM bytes); None = no CUDA device

MODEL_PREFERENCE = "model"
METHOD_PREFERENCE = "method"


def detect_gpu() -> GpuInfo:
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return props.name, props.total_memory


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

    def __init__(
        self,
        model_ref: str | None = None,
        method: str | None = None,
        engine_loader: EngineLoader = load_engine,
        store: ChatStore | None = None,
        gpu: GpuInfo | str = "detect",
    ) -> None:
        super().__init__()
        self.engine_loader = engine_loader
        self.store_warning: str | None = None
        if store is None:
            store, self.store_warning = ChatStore.open_or_recover()
        self.store = store
        # --model / --method win; otherwise the last choice; otherwise the bundled model.
        self.model_ref = model_ref or store.get_preference(MODEL_PREFERENCE) or None
        self.method = method or store.get_preference(METHOD_PREFERENCE) or DEFAULT_METHOD
        self.model_label = self.model_ref or models.BUNDLED_ID
        gpu_info = detect_gpu() if gpu == "detect" else gpu
        self.gpu_name, self.gpu_vram_bytes = gpu_info if gpu_info else (None, None)
        self.engine: Engine | None = None
        self.engine_loading = False
        self.engine_error: str | None = None
        self.load_progress = ""
        self.default_sampling = SamplingConfig()
        self.pending_sampling = SamplingConfig()
        self.pending_system_prompt = ""
        self.known_models: list[models.LocalModel] = []

    def on_mount(self) -> None:
        self.switch_mode("chat")
        if self.store_warning:
            self.notify(self.store_warning, severity="warning", timeout=10)
        self.load_model()

    # ------------------------------------------------------------ engine

    def engine_config(self) -> EngineConfig:
        settings = resolve_settings(None, {"method": self.method, "llm_path": self.model_ref})
        self.default_sampling = settings.sampling
        return settings.engine

    def use_model(self, model_ref: str | None, label: str | None = None) -> None:
        self.model_ref = model_ref
        self.model_label = label or model_ref or models.BUNDLED_ID
        self.store.set_preference(MODEL_PREFERENCE, model_ref or "")
        self.load_model()

    def load_model(self) -> None:
        try:
            config = self.engine_config()
        except ConfigError as err:
            self.engine_error = str(err)
            self.notify(str(err), severity="error")
            return
        self.pending_sampling = self.default_sampling
        if self.engine is not None:
            self.engine.close()
            self.engine = None
        self.engine_loading, self.engine_error, self.load_progress = True, None, ""
        self.refresh_chat_status()
        self.load_engine_worker(config)

    @work(thread=True, exclusive=True, group="engine", exit_on_error=False)
    def load_engine_worker(self, config: EngineConfig) -> Engine:
        return self.engine_loader(config, lambda text: self.post_message(self.LoadProgress(text)))

    def on_sub_spec_chat_app_load_progress(self, message: LoadProgress) -> None:
        self.load_progress = message.text
        self.refresh_chat_status()

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if event.worker.group != "engine" or event.state not in (WorkerState.SUCCESS, WorkerState.ERROR):
            return
        self.engine_loading = False
        if event.state == WorkerState.SUCCESS:
            self.engine = event.worker.result
            self.store.set_preference(METHOD_PREFERENCE, self.method)
            self.notify(f"{self.engine.model_name} loaded ({self.method})")
        else:
            error = event.worker.error
            self.engine_error = str(error) if isinstance(error, EngineError) else f"internal error: {error!r}"
            self.notify(self.engine_error, severity="error")
        self.refresh_chat_status()

    def refresh_chat_status(self) -> None:
        chat = self.chat_screen()
        if chat.is_mounted:
            chat.update_status()

    def chat_screen(self) -> ChatScreen:
        return self.get_screen("chat")  # type: ignore[return-value]

    def current_model(self) -> models.LocalModel | None:
        if not self.known_models:
            self.known_models = models.list_models()
        return next((m for m in self.known_models if m.llm_path == self.model_ref), None)

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
