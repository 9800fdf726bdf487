"""Chat transcript widgets: user turns, streaming assistant replies, and the prompt input."""

from __future__ import annotations

from markdown_it import MarkdownIt
from textual.binding import Binding
from textual.containers import Vertical
from textual.widgets import Input, Markdown, Static
from textual.widgets.markdown import MarkdownStream


def reply_parser() -> MarkdownIt:
    """Markdown as chat models write it: a single newline is a line break (a poem keeps its lines),
    where CommonMark would join the lines into one paragraph. markdown-it's `breaks` option only
    changes its HTML output, so the soft breaks become hard ones in the token stream Textual reads."""
    parser = MarkdownIt("gfm-like")
    parser.core.ruler.push("soft_breaks_are_hard", _soft_breaks_are_hard)
    return parser


def _soft_breaks_are_hard(state) -> None:
    for token in state.tokens:
        for child in token.children or ():
            if child.type == "softbreak":
                child.type = "hardbreak"


class UserTurn(Static):
    """A user's message, shown verbatim (no markup interpretation), with an optional notice line."""

    def __init__(self, text: str, notice: str | None = None) -> None:
        self.text, self.notice = text, notice
        super().__init__(self._content(), markup=False, classes="turn user-turn")

    def _content(self) -> str:
        return self.text + (f"\n({self.notice})" if self.notice else "")

    @property
    def has_notice(self) -> bool:
        return self.notice is not None

    def clear_notice(self) -> None:
        self.notice = None
        self.update(self._content())


class AssistantTurn(Vertical):
    """An assistant reply: Markdown streamed while generating, fully re-rendered at the end."""

    def __init__(self, text: str = "", notice: str | None = None) -> None:
        super().__init__(classes="turn assistant-turn")
        self.text = text
        self._initial_notice = notice
        self._stream: MarkdownStream | None = None

    def compose(self):
        yield Markdown(self.text, parser_factory=reply_parser)
        yield Static(self._initial_notice or "", classes="turn-notice", markup=False)

    def on_mount(self) -> None:
        self.query_one(".turn-notice", Static).display = bool(self._initial_notice)

    async def append(self, fragment: str) -> None:
        if self._stream is None:
            self._stream = Markdown.get_stream(self.query_one(Markdown))
        self.text += fragment
        await self._stream.write(fragment)

    async def finish(self, text: str, notice: str | None = None) -> None:
        """Stop streaming and render the final text in one pass (streaming renders incrementally)."""
        if self._stream is not None:
            await self._stream.stop()
            self._stream = None
        self.text = text
        await self.query_one(Markdown).update(text)
        if notice:
            self.show_notice(notice)

    def show_notice(self, notice: str) -> None:
        label = self.query_one(".turn-notice", Static)
        label.update(notice)
        label.display = True


class PromptInput(Input):
    """The prompt line, with shell-like history on up/down."""

    BINDINGS = [
        Binding("up", "history(-1)", "Previous prompt", show=False, id="prompt.history_previous"),
        Binding("down", "history(1)", "Next prompt", show=False, id="prompt.history_next"),
    ]

    def __init__(self, history: list[str] | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.history: list[str] = list(history or [])
        self._position = len(self.history)
        self._draft = ""

    def remember(self, prompt: str) -> None:
        if prompt and (not self.history or self.history[-1] != prompt):
            self.history.append(prompt)
        self._position = len(self.history)
        self._draft = ""

    def action_history(self, step: int) -> None:
        if not self.history:
            return
        if self._position == len(self.history):
            self._draft = self.value
        self._position = max(0, min(len(self.history), self._position + step))
        self.value = self.history[self._position] if self._position < len(self.history) else self._draft
        self.cursor_position = len(self.value)
