"""The chat screen: transcript, prompt, stop/new chat, and the live stats panel beside it."""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import TYPE_CHECKING, Callable

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Footer, Header, Static
from textual.worker import Worker, WorkerState

from engine import EngineError, Generation, SamplingConfig
from subspec_tui.history import Chat
from subspec_tui.widgets.alerts import AlertBar, ScreenAlerts
from subspec_tui.widgets.chat_log import AssistantTurn, PromptInput, UserTurn
from subspec_tui.widgets.stats_panel import LiveStats, StatsPanel

if TYPE_CHECKING:
    from subspec_tui.app import SubSpecChatApp

SAVE_INTERVAL_S = 0.5  # a killed app loses at most this much of a streaming reply
TITLE_LENGTH = 48
# A prompt must leave the reply this many tokens of context (or max_new_tokens, if fewer): below
# that the app offers to leave the oldest turns out rather than answer in a few words.
REPLY_ROOM = 128

FINISH_NOTICES = {
    "length": "reply stopped at the max new tokens limit (chat settings: F5)",
    "cancelled": "stopped",
    "error": "⚠ reply ended by an error",
    # A stored reply with no finish reason was still streaming when the app was closed or killed.
    None: "⚠ reply interrupted: the app was closed while it streamed",
}
WAITING_NOTICE = "waiting for the model to load; sent as soon as it is ready"


def chat_title(prompt: str, limit: int = TITLE_LENGTH) -> str:
    """The first words of the first prompt, cut at a word boundary."""
    words = " ".join(prompt.split())
    if len(words) <= limit:
        return words
    cut = words[:limit]
    if words[limit] != " " and " " in cut:  # the limit falls inside a word: drop that word
        cut = cut.rsplit(" ", 1)[0]
    return cut.rstrip(" ,.;:") + "…"


def trim_to_context(
    messages: list[dict[str, str]], count_tokens: Callable[[list[dict[str, str]]], int], limit: int
) -> tuple[list[dict[str, str]], int]:
    """The messages without their oldest turns (the system prompt and the last message always
    kept) until they count at most `limit` tokens; and how many messages were left out. Raises
    ValueError when even the system prompt and the last message do not fit."""
    head = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(head):]
    for dropped in range(len(turns)):
        kept = head + turns[dropped:]
        if count_tokens(kept) <= limit:
            return kept, dropped
    raise ValueError("the last message alone is longer than the context")


def context_notice(max_length: int) -> str:
    return f"⚠ reply cut off: the context limit ({max_length} tokens) is full; start a new chat (ctrl+n)"


class ChatScreen(ScreenAlerts, Screen):
    AUTO_FOCUS = "#prompt"
    BINDINGS = [
        Binding("escape", "stop", "Stop", id="chat.stop"),
        Binding("ctrl+n", "new_chat", "New chat", id="chat.new"),
        Binding("ctrl+o", "open_chat", "Chats", id="chat.open"),
        Binding("f5", "chat_settings", "Settings", id="chat.settings"),
        Binding("ctrl+s", "export", "Export", id="chat.export"),
    ]

    class Chunk(Message):
        def __init__(self, text: str) -> None:
            super().__init__()
            self.text = text

    class Finished(Message):
        def __init__(self, generation: Generation) -> None:
            super().__init__()
            self.generation = generation

    class Failed(Message):
        def __init__(self, error: str) -> None:
            super().__init__()
            self.error = error

    class ContextFull(Message):
        """The conversation no longer fits the context: ask before leaving turns out."""

        def __init__(self, needed: int, limit: int, messages: list[dict[str, str]], sampling: SamplingConfig) -> None:
            super().__init__()
            self.needed, self.limit, self.messages, self.sampling = needed, limit, messages, sampling

    app: "SubSpecChatApp"

    def __init__(self) -> None:
        super().__init__()
        self.live = LiveStats()
        self.chat: Chat | None = None
        self.cancel = threading.Event()
        self.generating = False
        self._reply: AssistantTurn | None = None
        self._reply_id: int | None = None
        self._reply_text = ""
        self._last_save = 0.0
        self._waiting: str | None = None  # a prompt sent while the model was still loading
        self._context_used: int | None = None  # tokens of the context the conversation fills, after a reply
        self._left_out = 0  # messages of this conversation the last reply was generated without

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal():
            with Vertical(id="chat-pane"):
                yield AlertBar(id="chat-alerts")
                yield VerticalScroll(id="transcript")
                yield Static("", id="chat-status", markup=False)
                yield PromptInput(self.app.store.recent_prompts(), placeholder="Ask something… (enter to send)",
                                  id="prompt")
            yield StatsPanel(self.live, id="stats")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#transcript", VerticalScroll).anchor()
        self.show_early_alerts()
        self.update_status()

    # ------------------------------------------------------------ status

    def update_status(self) -> None:
        app = self.app
        if app.engine_loading:
            text = f"loading {app.model_label} ({app.method_label})… {app.load_progress}"
        elif app.engine is None:
            text = f"no model loaded{': ' + app.engine_error if app.engine_error else ''} (F3: models)"
        else:
            chat = f"chat: {self.chat.title}" if self.chat else "new chat"
            text = f"{app.engine.model_name} · {app.engine.config.method} · {chat}"
            if self._context_used is not None:
                text += f" · context {self._context_used} of {app.engine.max_length} tokens"
        self.query_one("#chat-status", Static).update(text)
        self.query_one(StatsPanel).set_engine(app.engine.describe() if app.engine else None)

    # ------------------------------------------------------------ chats

    def show_chat(self, chat: Chat | None) -> None:
        """Display a stored chat (None = a fresh one, created on the first message)."""
        self.chat = chat
        self._context_used = None
        transcript = self.query_one("#transcript", VerticalScroll)
        transcript.remove_children()
        for message in chat.messages if chat else []:
            if message.role == "user":
                transcript.mount(UserTurn(message.content))
            else:
                transcript.mount(AssistantTurn(message.content, self._notice(message.finish_reason, stored=True)))
        self.live.reset()
        self.update_status()

    def _notice(self, finish_reason: str | None, stored: bool = False) -> str | None:
        if finish_reason == "context":
            return context_notice(self.app.engine.max_length if self.app.engine else 0)
        if finish_reason is None and not stored:
            return None
        return FINISH_NOTICES.get(finish_reason)

    def action_new_chat(self) -> None:
        if self.generating:
            self.notify("stop the current reply first (esc)", severity="warning")
            return
        if self.chat is not None:  # the new chat keeps the settings of the one the user was in
            self.app.pending_system_prompt = self.chat.system_prompt
            self.app.pending_sampling = self.sampling()
        self.show_chat(None)
        self.query_one(PromptInput).focus()

    def action_open_chat(self) -> None:
        from subspec_tui.screens.dialogs import ChatListScreen

        def opened(chat_id: int | None) -> None:
            if chat_id is not None:
                self.show_chat(self.app.store.get_chat(chat_id))

        if self.generating:
            self.notify("stop the current reply first (esc)", severity="warning")
            return
        self.app.push_screen(ChatListScreen(self.app.store), opened)

    def action_chat_settings(self) -> None:
        from subspec_tui.screens.dialogs import ChatSettings, ChatSettingsScreen

        current = ChatSettings(
            system_prompt=self.chat.system_prompt if self.chat else self.app.pending_system_prompt,
            sampling=self.sampling(),
        )

        def saved(settings: ChatSettings | None) -> None:
            if settings is None:
                return
            sampling = dataclasses.asdict(settings.sampling)
            if self.chat is None:
                self.app.pending_system_prompt = settings.system_prompt
                self.app.pending_sampling = settings.sampling
            else:
                self.app.store.update_chat(self.chat.id, system_prompt=settings.system_prompt, sampling=sampling)
                self.chat = self.app.store.get_chat(self.chat.id)
            self.notify("chat settings saved")

        self.app.push_screen(ChatSettingsScreen(current), saved)

    def action_export(self) -> None:
        if self.chat is None:
            self.notify("nothing to export yet", severity="warning")
            return
        path = self.app.store.export_markdown(self.chat.id)
        self.notify(f"exported to {path}")

    def sampling(self) -> SamplingConfig:
        if self.chat is None:
            return self.app.pending_sampling
        fields = {f.name for f in dataclasses.fields(SamplingConfig)}
        stored = {k: v for k, v in self.chat.sampling.items() if k in fields}
        return dataclasses.replace(self.app.default_sampling, **stored)

    # ------------------------------------------------------------ generation

    @on(PromptInput.Submitted, "#prompt")
    async def send(self, event: PromptInput.Submitted) -> None:
        prompt = event.value.strip()
        if not prompt:
            return
        if self.generating or self._waiting is not None:
            self.notify("a reply is still streaming: stop it with esc", severity="warning")
            return
        if self.app.engine is None and not self.app.engine_loading:
            self.notify("no model is loaded (F3: models)", severity="warning")
            return
        prompt_input = self.query_one(PromptInput)
        prompt_input.remember(prompt)
        prompt_input.value = ""
        if self.app.engine is None:  # still loading: keep the prompt, send it once the model is ready
            self._waiting = prompt
            await self.query_one("#transcript", VerticalScroll).mount(UserTurn(prompt, WAITING_NOTICE))
            return
        await self._start(prompt, mount_prompt=True)

    def send_waiting(self) -> None:
        """The model is ready: send the prompt typed while it loaded."""
        if self._waiting is not None:
            prompt, self._waiting = self._waiting, None
            for turn in self.query(UserTurn):
                turn.clear_notice()
            self.run_worker(self._start(prompt, mount_prompt=False), group="send-waiting")

    def drop_waiting(self) -> None:
        """The model failed to load: the waiting prompt stays in the input line, not sent."""
        if self._waiting is not None:
            prompt, self._waiting = self._waiting, None
            for turn in self.query(UserTurn):
                if turn.has_notice:
                    turn.remove()
            self.query_one(PromptInput).value = prompt

    async def _start(self, prompt: str, mount_prompt: bool) -> None:
        store = self.app.store
        if self.chat is None:
            self.chat = store.create_chat(
                chat_title(prompt), model=self.app.model_label, method=self.app.engine.config.method,
                system_prompt=self.app.pending_system_prompt,
                sampling=dataclasses.asdict(self.app.pending_sampling),
            )
        store.add_message(self.chat.id, "user", prompt)  # saved before anything can go wrong
        self.chat = store.get_chat(self.chat.id)
        transcript = self.query_one("#transcript", VerticalScroll)
        if mount_prompt:
            await transcript.mount(UserTurn(prompt))
        self._reply = AssistantTurn()
        await transcript.mount(self._reply)
        self._reply_id, self._reply_text = None, ""
        self.live.reset()
        self.cancel = threading.Event()
        self.generating = True
        self.update_status()
        self.generate(self.chat.engine_messages(), self.sampling())

    @work(thread=True, exclusive=True, group="generate", exit_on_error=False)
    def generate(self, messages: list[dict[str, str]], sampling: SamplingConfig, leave_out_oldest: bool = False) -> None:
        engine = self.app.engine
        room = min(sampling.max_new_tokens, REPLY_ROOM)
        limit = engine.max_length - room
        try:
            self._left_out = 0
            if leave_out_oldest:
                messages, self._left_out = trim_to_context(messages, lambda m: len(engine.chat_ids(m)), limit)
            ids = engine.chat_ids(messages)
            if len(ids) > limit:
                self.post_message(self.ContextFull(len(ids), engine.max_length, messages, sampling))
                return
            generation = engine.generate(
                ids, sampling,
                on_text=lambda text: self.post_message(self.Chunk(text)),
                on_iteration=self.live.add,
                cancel=self.cancel,
            )
        except ValueError as err:  # trim_to_context: not even the last message fits
            self.post_message(self.Failed(f"{err} ({engine.max_length} tokens): start a new chat (ctrl+n)"))
            return
        except EngineError as err:
            self.post_message(self.Failed(str(err)))
            return
        self.post_message(self.Finished(generation))

    async def on_chat_screen_context_full(self, message: ContextFull) -> None:
        """Say so, and offer to go on without the oldest turns (the stored chat keeps them)."""
        from subspec_tui.screens.dialogs import ConfirmScreen

        def answered(yes: bool | None) -> None:
            if yes:
                self.generating = True
                self.generate(message.messages, message.sampling, leave_out_oldest=True)
            else:
                self.alert(f"not sent: the conversation is {message.needed} tokens and the context holds "
                           f"{message.limit} with room for a reply; start a new chat (ctrl+n) or leave out "
                           "the oldest turns", "warning")
                self.call_later(self._abandon_reply)

        self.generating = False
        question = (f"This conversation is {message.needed} tokens; the context holds {message.limit}, with room "
                    "for a reply. Continue with the oldest turns left out? (The chat keeps them.)")
        await self.app.push_screen(ConfirmScreen(question), answered)

    async def _abandon_reply(self) -> None:
        if self._reply is not None:
            await self._reply.remove()
        self._end_generation()

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        # An exception other than EngineError is an engine bug: report it, keep the app alive.
        if event.worker.group == "generate" and event.state == WorkerState.ERROR:
            self.post_message(self.Failed(f"internal error: {event.worker.error!r}"))

    def action_stop(self) -> None:
        if self.generating:
            self.cancel.set()

    async def on_chat_screen_chunk(self, message: Chunk) -> None:
        if self._reply is None:
            return
        self._reply_text += message.text
        await self._reply.append(message.text)
        store = self.app.store
        if self._reply_id is None:
            self._reply_id = store.add_message(self.chat.id, "assistant", self._reply_text)
            self._last_save = time.monotonic()
        elif time.monotonic() - self._last_save >= SAVE_INTERVAL_S:
            store.update_message(self._reply_id, self._reply_text)
            self._last_save = time.monotonic()

    async def on_chat_screen_finished(self, message: Finished) -> None:
        gen = message.generation
        stats = gen.stats.as_dict()
        self.live.finish(stats["tok_per_s"])
        if self._reply_id is None:
            self._reply_id = self.app.store.add_message(self.chat.id, "assistant", gen.text)
        self.app.store.update_message(self._reply_id, gen.text, finish_reason=gen.finish_reason, stats=stats)
        self._context_used = stats["prompt_tokens"] + stats["new_tokens"]
        notice = self._notice(gen.finish_reason)
        if self._left_out:
            left_out = f"the oldest {self._left_out} messages were left out to fit the context"
            notice = f"{notice} · {left_out}" if notice else left_out
        if gen.finish_reason == "context":
            self.notify(notice, severity="warning")
        if self._reply is not None:
            await self._reply.finish(gen.text, notice)
        self._end_generation()

    async def on_chat_screen_failed(self, message: Failed) -> None:
        self.notify(message.error, severity="error")
        if self._reply is not None:
            if self._reply_id is None:
                await self._reply.remove()  # nothing was generated: the user turn stays, saved
            else:
                self.app.store.update_message(self._reply_id, self._reply_text, finish_reason="error")
                await self._reply.finish(self._reply_text, f"error: {message.error}")
        self._end_generation()

    def _end_generation(self) -> None:
        self.generating = False
        self._reply = None
        self.chat = self.app.store.get_chat(self.chat.id)
        self.update_status()
