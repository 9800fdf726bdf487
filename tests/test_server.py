"""The OpenAI-compatible API, served by uvicorn on a free loopback port over a stand-in engine,
driven by the official `openai` client (stream and not) and raw httpx for bad input."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import openai
import pytest
import uvicorn
from headless_fakes import REPLY, FakeEngine

from engine import SamplingConfig
from subspec_tui.server import create_app

MODEL = FakeEngine.model_name
PLAN = {"source": "profile", "method": "vanilla", "layers_on_gpu": None, "profile_path": "/x/cpu.toml"}


@contextmanager
def serving(app) -> Iterator[str]:
    """Run `app` with uvicorn in a thread on 127.0.0.1:<free port>; yields the base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture(scope="module")
def fake() -> FakeEngine:
    return FakeEngine(max_length=200, seconds_per_iteration=0.002)


@pytest.fixture(scope="module")
def base_url(fake) -> Iterator[str]:
    with serving(create_app(fake, SamplingConfig(max_new_tokens=100), PLAN)) as url:
        yield url


@pytest.fixture
def client(base_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=30)


def chat(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_chat_completion(client, fake):
    result = client.chat.completions.create(model=MODEL, messages=chat("Capital of France?"))
    assert result.choices[0].message.content == REPLY
    assert result.choices[0].message.role == "assistant"
    assert result.choices[0].finish_reason == "stop"
    prompt = "<user>Capital of France?<assistant>"
    assert fake.prompts[-1] == prompt
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (len(prompt), len(REPLY))
    assert result.usage.total_tokens == len(prompt) + len(REPLY)
    assert result.model == MODEL and result.id.startswith("chatcmpl-")


def test_chat_completion_stream(client):
    stream = client.chat.completions.create(model=MODEL, messages=chat("Hi"), stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == REPLY
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) == 16  # streamed as generated, not in one piece
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert chunks[-1].usage.completion_tokens == len(REPLY)


def test_request_parameters_reach_the_engine(client, fake):
    result = client.chat.completions.create(
        model=MODEL, messages=chat("x"), temperature=0.5, top_p=0.9, seed=7, max_tokens=10, stop=["France"],
    )
    assert result.choices[0].message.content == "The capita"
    assert result.choices[0].finish_reason == "length"
    sampling = fake.samplings[-1]
    assert (sampling.do_sample, sampling.temperature, sampling.top_p, sampling.seed) == (True, 0.5, 0.9, 7)
    assert (sampling.max_new_tokens, sampling.stop) == (10, ["France"])

    result = client.chat.completions.create(model=MODEL, messages=chat("x"), temperature=0, stop="Paris")
    assert result.choices[0].message.content == "The capital of France is "
    assert result.choices[0].finish_reason == "stop"
    assert fake.samplings[-1].do_sample is False
    assert fake.samplings[-1].max_new_tokens == 100  # the server's default


def test_system_message_and_text_parts(client, fake):
    client.chat.completions.create(model=MODEL, messages=[
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "One"}, {"type": "text", "text": " two"}]},
    ])
    assert fake.prompts[-1] == "<system>Be brief.<user>One two<assistant>"


def test_completions(client, fake):
    result = client.completions.create(model=MODEL, prompt="Once upon", max_tokens=8)
    assert result.choices[0].text == REPLY[:8]
    assert fake.prompts[-1] == "Once upon"  # raw text, no chat template
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (9, 8)
    streamed = "".join(c.choices[0].text for c in client.completions.create(model=MODEL, prompt="a", stream=True))
    assert streamed == REPLY


def test_models_and_health(client, base_url):
    assert [m.id for m in client.models.list().data] == [MODEL]
    health = httpx.get(f"{base_url}/health").json()
    assert health == {"status": "ok", "model": MODEL, "queued": 0, "plan": PLAN}  # which plan the server runs


@pytest.mark.parametrize(
    ("path", "body", "status", "param", "code"),
    [
        ("/v1/chat/completions", b'{"model": "x", "messages": [', 400, None, "invalid_json"),
        ("/v1/chat/completions", b"not json at all", 400, None, "invalid_json"),
        ("/v1/chat/completions", {"model": "other/model", "messages": chat("hi")}, 404, "model", "model_not_found"),
        ("/v1/chat/completions", {"model": "/etc/passwd", "messages": chat("hi")}, 404, "model", "model_not_found"),
        ("/v1/chat/completions", {"model": MODEL, "messages": chat("hi"), "max_tokens": -1}, 400, "max_tokens",
         "invalid_value"),
        ("/v1/chat/completions", {"model": MODEL, "messages": chat("hi"), "max_tokens": 10**9}, 400, "max_tokens",
         "context_length_exceeded"),
        ("/v1/chat/completions", {"model": MODEL, "messages": chat("x" * 500)}, 400, "messages",
         "context_length_exceeded"),
        ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages", "invalid_value"),
        ("/v1/chat/completions", {"model": MODEL}, 400, "messages", "invalid_value"),
        ("/v1/chat/completions", {"messages": chat("hi")}, 400, "model", "invalid_value"),
        ("/v1/chat/completions", {"model": MODEL, "messages": chat("hi"), "temperature": 5}, 400, "temperature",
         "invalid_value"),
        ("/v1/chat/completions", {"model": MODEL, "messages": chat("hi"), "n": 3}, 400, "n", "invalid_value"),
        ("/v1/chat/completions", {"model": MODEL, "messages": chat("hi"), "stop": ["a", "b", "c", "d", "e"]}, 400,
         "stop", "invalid_value"),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]}, 400, "messages",
         "unsupported_content"),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, 400,
         "messages", "invalid_value"),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": None}]}, 400,
         "messages", "invalid_value"),
        ("/v1/completions", {"model": MODEL, "prompt": "x" * 300}, 400, "prompt", "context_length_exceeded"),
        ("/v1/completions", {"model": MODEL, "prompt": ["a", "b"]}, 400, "prompt", "invalid_value"),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "stream": "sometimes"}, 400, "stream", "invalid_value"),
        ("/v1/nothing-here", {}, 404, None, None),
    ],
)
def test_bad_requests_get_openai_error_bodies(base_url, path, body, status, param, code):
    if isinstance(body, bytes):
        response = httpx.post(base_url + path, content=body, headers={"content-type": "application/json"})
    else:
        response = httpx.post(base_url + path, json=body)
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["param"], error["code"]) == (param, code)
    assert error["message"] and "\n" not in error["message"]
    assert error["type"] in {"invalid_request_error", "not_found_error"}


def test_openai_client_sees_errors_as_exceptions(client):
    with pytest.raises(openai.NotFoundError, match="the model 'gpt-4' does not exist here") as err:
        client.chat.completions.create(model="gpt-4", messages=chat("hi"))
    assert (err.value.code, err.value.param) == ("model_not_found", "model")
    with pytest.raises(openai.BadRequestError, match="context is 200 tokens") as err:
        client.chat.completions.create(model=MODEL, messages=chat("x" * 500))
    assert err.value.code == "context_length_exceeded"


def test_concurrent_clients_are_served_in_turn(client, fake):
    def ask(i: int) -> str:
        if i % 2:
            stream = client.chat.completions.create(model=MODEL, messages=chat(f"q{i}"), stream=True)
            return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        return client.chat.completions.create(model=MODEL, messages=chat(f"q{i}")).choices[0].message.content

    before = len(fake.prompts)
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(ask, range(8)))
    assert answers == [REPLY] * 8
    assert sorted(fake.prompts[before:]) == sorted(f"<user>q{i}<assistant>" for i in range(8))
    assert fake.overlapped is False


def test_a_client_that_disconnects_cancels_its_generation():
    slow = FakeEngine(seconds_per_iteration=0.1)  # 16 iterations: 1.6 s when not cancelled
    with serving(create_app(slow)) as url:
        body = {"model": MODEL, "messages": chat("long"), "stream": True}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")  # the role chunk
            while not next(lines).startswith('data: {"id"'):
                pass  # up to the first text piece
        deadline = time.monotonic() + 5
        while not slow.finish_reasons and time.monotonic() < deadline:
            time.sleep(0.02)
        assert slow.finish_reasons == ["cancelled"]
        # and the server goes on serving
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        slow.seconds_per_iteration = 0.0
        assert client.chat.completions.create(model=MODEL, messages=chat("next")).choices[0].message.content == REPLY


def test_engine_factory_is_loaded_at_startup_and_closed_at_shutdown():
    made: list[FakeEngine] = []
    app = create_app(lambda: made.append(FakeEngine()) or made[-1])
    assert made == []
    with serving(app) as url:
        assert len(made) == 1 and not made[0].closed
        assert httpx.get(f"{url}/health").json()["model"] == MODEL
    assert made[0].closed


def test_tool_results_and_assistant_tool_calls_are_context(client, fake):
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
    ]
    assert client.chat.completions.create(model=MODEL, messages=messages).choices[0].message.content == REPLY
    assert fake.prompts[-1] == "<user>Weather in Paris?<assistant><tool>sunny, 21 C<assistant>"


def test_a_non_streaming_client_that_disconnects_stops_its_generation_and_leaves_the_queue():
    slow = FakeEngine(seconds_per_iteration=0.1)  # 16 iterations: 1.6 s when not cancelled
    with serving(create_app(slow)) as url:
        body = {"model": MODEL, "messages": chat("long")}
        with ThreadPoolExecutor(max_workers=2) as pool:
            # the first runs, the second waits in the queue; both clients give up after 0.4 s
            gone = [pool.submit(httpx.post, f"{url}/v1/chat/completions", json=body, timeout=0.4) for _ in range(2)]
            for future in gone:
                with pytest.raises(httpx.TimeoutException):
                    future.result()
        deadline = time.monotonic() + 5
        while httpx.get(f"{url}/health").json()["queued"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert httpx.get(f"{url}/health").json()["queued"] == 0
        # stopped within a poll; the queued one left the queue (or, reaching its turn in the same poll, stopped too)
        assert slow.finish_reasons and set(slow.finish_reasons) == {"cancelled"}
        slow.seconds_per_iteration = 0.0
        started = time.monotonic()
        answer = httpx.post(f"{url}/v1/chat/completions", json={**body, "max_tokens": 5}).json()
        assert answer["choices"][0]["message"]["content"] == REPLY[:5] and time.monotonic() - started < 2
