"""Modal dialogs: chat list, per-chat settings, confirmation, help."""

from __future__ import annotations

import time
from dataclasses import dataclass

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Checkbox, DataTable, Input, Label, Markdown, TextArea

from engine import SamplingConfig
from subspec_tui.history import ChatStore


class ChatListScreen(ModalScreen[int | None]):
    """Pick a stored chat to continue (enter), delete one (delete), or close (esc)."""

    BINDINGS = [
        Binding("escape", "dismiss(None)", "Close", id="chats.close"),
        Binding("delete", "delete", "Delete chat", id="chats.delete"),
    ]

    def __init__(self, store: ChatStore) -> None:
        super().__init__()
        self.store = store

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog", id="chat-list"):
            yield Label("Chats (enter: open · delete: remove · esc: close)", classes="dialog-title")
            yield DataTable(cursor_type="row", id="chats")

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        table.add_columns("updated", "title", "model", "method")
        self._fill()
        table.focus()

    def _fill(self) -> None:
        table = self.query_one(DataTable)
        table.clear()
        for chat in self.store.list_chats():
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(chat.updated))
            table.add_row(when, chat.title, chat.model or "bundled", chat.method or "?", key=str(chat.id))

    @on(DataTable.RowSelected)
    def open_row(self, event: DataTable.RowSelected) -> None:
        self.dismiss(int(event.row_key.value))

    def action_delete(self) -> None:
        table = self.query_one(DataTable)
        if table.row_count == 0:
            return
        row_key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key
        self.store.delete_chat(int(row_key.value))
        self._fill()


@dataclass
class ChatSettings:
    system_prompt: str
    sampling: SamplingConfig


class ChatSettingsScreen(ModalScreen[ChatSettings | None]):
    """System prompt and sampling settings of the current chat."""

    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel", id="settings.cancel")]

    def __init__(self, current: ChatSettings) -> None:
        super().__init__()
        self.current = current

    def compose(self) -> ComposeResult:
        s = self.current.sampling
        with Vertical(classes="dialog", id="chat-settings"):
            yield Label("Chat settings", classes="dialog-title")
            yield Label("System prompt")
            yield TextArea(self.current.system_prompt, id="system-prompt")
            with Grid(id="sampling-grid"):
                yield Label("max new tokens")
                yield Input(str(s.max_new_tokens), type="integer", id="max-new-tokens")
                yield Label("temperature")
                yield Input(str(s.temperature), type="number", id="temperature")
                yield Label("top p")
                yield Input(str(s.top_p), type="number", id="top-p")
                yield Label("top k (0 = off)")
                yield Input(str(s.top_k), type="integer", id="top-k")
                yield Label("seed (empty = random)")
                yield Input("" if s.seed is None else str(s.seed), type="integer", id="seed")
            yield Checkbox("sample (off = greedy, token-identical to plain decoding)", s.do_sample, id="do-sample")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Save", variant="primary", id="save")
                yield Button("Cancel", id="cancel")

    @on(Button.Pressed, "#cancel")
    def cancel(self) -> None:
        self.dismiss(None)

    @on(Button.Pressed, "#save")
    def save(self) -> None:
        try:
            settings = self._read()
        except ValueError as err:
            self.notify(str(err), severity="error")
            return
        self.dismiss(settings)

    def _read(self) -> ChatSettings:
        def value(widget_id: str) -> str:
            return self.query_one(f"#{widget_id}", Input).value.strip()

        def number(widget_id: str, kind: type, label: str, low: float, high: float | None = None):
            try:
                parsed = kind(value(widget_id))
            except ValueError:
                raise ValueError(f"{label} must be a number") from None
            if parsed < low or (high is not None and parsed > high):
                bound = f"between {low} and {high}" if high is not None else f"at least {low}"
                raise ValueError(f"{label} must be {bound}")
            return parsed

        sampling = SamplingConfig(
            max_new_tokens=number("max-new-tokens", int, "max new tokens", 1),
            temperature=number("temperature", float, "temperature", 0.0),
            top_p=number("top-p", float, "top p", 0.0, 1.0),
            top_k=number("top-k", int, "top k", 0),
            seed=number("seed", int, "seed", 0) if value("seed") else None,
            do_sample=self.query_one("#do-sample", Checkbox).value,
            stop=list(self.current.sampling.stop),
        )
        return ChatSettings(self.query_one("#system-prompt", TextArea).text, sampling)


class ConfirmScreen(ModalScreen[bool]):
    BINDINGS = [Binding("escape", "dismiss(False)", "No", id="confirm.no")]

    def __init__(self, question: str) -> None:
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog", id="confirm"):
            yield Label(self.question, id="confirm-question")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Yes", variant="error", id="yes")
                yield Button("No", id="no")

    @on(Button.Pressed)
    def answer(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")


class HelpScreen(ModalScreen[None]):
    """Every key binding of the app and of the screen it was opened from, from the bindings themselves."""

    BINDINGS = [Binding("escape,f1,q", "dismiss(None)", "Close", id="help.close")]

    def __init__(self, sections: list[tuple[str, list[tuple[str, str, str]]]]) -> None:
        super().__init__()
        self.sections = sections

    def compose(self) -> ComposeResult:
        lines = ["# Keys", ""]
        for title, rows in self.sections:
            lines += [f"## {title}", "", "| key | action | id |", "|---|---|---|"]
            lines += [f"| `{key}` | {description} | {binding_id} |" for key, description, binding_id in rows]
            lines.append("")
        lines.append("Command palette: `ctrl+p` (every action above, plus *Use model …* and *Use method …*).")
        with Vertical(classes="dialog", id="help"):
            yield Markdown("\n".join(lines))
