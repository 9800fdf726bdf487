"""run-gradio: the browser chat streams the engine's reply, serialises engine use, cancels an
abandoned stream, and reports engine errors in the reply; the CLI binds 127.0.0.1 by default."""

from __future__ import annotations

import time

import gradio as gr
import pytest
from tui_fake_engine import FakeEngine

from engine import SamplingConfig
from subspec_tui import cli
from subspec_tui.gradio_ui import chat_messages, responder

REPLY = "The capital of France is Paris."


def test_history_with_parts_becomes_chat_messages():
    history = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "!"}]},
        {"role": "tool", "content": "ignored"},
    ]
    assert chat_messages(history, "Capital of France?") == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Capital of France?"},
    ]


def test_reply_streams_cumulatively():
    engine = FakeEngine(reply=REPLY, piece_words=2)
    stream = list(responder(engine, SamplingConfig())("Capital of France?", []))
    assert stream[-1] == REPLY and len(stream) == 3
    assert all(later.startswith(earlier) for earlier, later in zip(stream, stream[1:]))
    assert engine.seen_messages == [[{"role": "user", "content": "Capital of France?"}]]


def test_an_engine_error_is_shown_in_the_reply():
    engine = FakeEngine(generate_error="out of GPU memory while generating")
    assert list(responder(engine, SamplingConfig())("Hi", [])) == ["\n\n**error:** out of GPU memory while generating"]


class LongReply:
    """Emits up to `pieces` pieces, stopping early when cancelled."""

    model_name = "long"

    def __init__(self, pieces: int = 2000) -> None:
        self.pieces, self.emitted, self.cancelled = pieces, 0, False

    def chat_ids(self, messages):
        return [1]

    def generate(self, ids, sampling, on_text=None, cancel=None):
        for _ in range(self.pieces):
            if cancel.is_set():
                self.cancelled = True
                return
            self.emitted += 1
            on_text("x")
            time.sleep(0.001)


def test_closing_a_stream_cancels_its_generation_and_frees_the_engine():
    engine = LongReply()
    respond = responder(engine, SamplingConfig())
    stream = respond("Hi", [])
    assert next(stream) == "x"
    stream.close()  # what Gradio does when the browser stops the stream
    assert engine.cancelled and engine.emitted < engine.pieces
    engine.pieces = 5  # the lock is free again: the next request streams to its end
    assert list(respond("Again", []))[-1] == "xxxxx"


def test_real_bundled_reply_equals_plain_greedy(bundled_engine):
    engine = bundled_engine("vanilla")
    sampling = SamplingConfig(max_new_tokens=24)
    expected = engine.generate(engine.chat_ids([{"role": "user", "content": "Capital of France?"}]), sampling).text
    assert list(responder(engine, sampling)("Capital of France?", []))[-1] == expected


def test_run_gradio_builds_the_chat_and_binds_loopback(monkeypatch, capsys):
    launched = {}

    def fake_launch(self, **kwargs):
        launched.update(kwargs, fn=self.fn)

    monkeypatch.setattr(gr.ChatInterface, "launch", fake_launch)
    monkeypatch.setattr(cli, "load_engine", lambda config, progress=None: FakeEngine(config, reply=REPLY))
    assert cli.main(["--method", "vanilla", "run-gradio"]) == 0
    assert (launched["server_name"], launched["server_port"]) == ("127.0.0.1", 7860)
    assert list(launched["fn"]("Hi", []))[-1] == REPLY


def test_run_gradio_without_gradio_is_one_clear_error(monkeypatch, capsys):
    monkeypatch.setitem(__import__("sys").modules, "gradio", None)  # import gradio raises ImportError
    monkeypatch.setattr(cli, "load_engine", pytest.fail)
    assert cli.main(["run-gradio"]) == 1
    assert capsys.readouterr().err == "subspec: error: run-gradio needs the ui extra (gradio is missing): pip install 'subspec-chat[ui]'\n"
