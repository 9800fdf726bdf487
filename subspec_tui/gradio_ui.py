"""`subspec run-gradio`: a browser chat over one loaded engine (optional extra `ui`).

The TUI is the main interface; this is the reference's Gradio chat for those who want a browser.
The engine is not thread-safe: one reply streams at a time (a lock, plus Gradio's concurrency
limit of 1), and closing a stream in the browser cancels its generation.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator

from engine import Engine, EngineError, SamplingConfig

Respond = Callable[[str, list[dict]], Iterator[str]]
_DONE = object()


def chat_messages(history: list[dict], message: str) -> list[dict[str, str]]:
    """Gradio's messages history (content may be a list of parts) plus the new user message."""
    def text(content: object) -> str:
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            return "".join(part.get("text", "") if isinstance(part, dict) else str(part) for part in content)
        return str(content)

    turns = [{"role": m["role"], "content": text(m["content"])} for m in history if m.get("role") in ("user", "assistant")]
    return turns + [{"role": "user", "content": message}]


def responder(engine: Engine, sampling: SamplingConfig) -> Respond:
    """A streaming chat function: yields the reply so far after every new piece of text."""
    lock = threading.Lock()

    def respond(message: str, history: list[dict]) -> Iterator[str]:
        pieces: queue.Queue = queue.Queue()
        cancel = threading.Event()

        def generate() -> None:
            try:
                ids = engine.chat_ids(chat_messages(history, message))
                engine.generate(ids, sampling, on_text=pieces.put, cancel=cancel)
            except EngineError as err:
                pieces.put(err)
            finally:
                pieces.put(_DONE)

        with lock:
            worker = threading.Thread(target=generate, daemon=True)
            worker.start()
            reply = ""
            try:
                while (piece := pieces.get()) is not _DONE:
                    if isinstance(piece, EngineError):
                        yield f"{reply}\n\n**error:** {piece}"
                        continue
                    reply += piece
                    yield reply
            finally:  # the browser closed the stream (GeneratorExit) or the reply is complete
                cancel.set()
                worker.join()

    return respond


def serve(engine: Engine, sampling: SamplingConfig, host: str, port: int) -> None:
    import gradio as gr

    demo = gr.ChatInterface(
        responder(engine, sampling),
        title="SubSpec Chat",
        description=f"{engine.model_name} · {engine.config.method}",
        concurrency_limit=1,
    )
    demo.launch(server_name=host, server_port=port)
