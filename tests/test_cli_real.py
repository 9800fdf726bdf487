"""`subspec run-test --json` and `subspec run-api` as real processes on the bundled SmolLM2-135M-Instruct."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

ROOT = Path(__file__).resolve().parents[1]
# Vanilla decoding with a short context keeps these real-model tests quick on a CPU.
GLOBAL_OPTIONS = ["--method", "vanilla", "--max-length", "256", "--device", "cpu"]
QUESTION = "What is the capital of France?"

pytestmark = pytest.mark.slow


def subspec(*argv: str) -> list[str]:
    return [sys.executable, "-m", "subspec_tui.cli", *argv]


def test_run_test_json_on_the_bundled_model():
    result = subprocess.run(
        subspec(*GLOBAL_OPTIONS, "run-test", "--prompt", QUESTION, "--max-new-tokens", "12", "--json"),
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    output = json.loads(result.stdout)
    assert output["method"] == "vanilla" and output["model"] == "SmolLM2-135M-Instruct"
    assert "Paris" in output["text"]
    stats = output["stats"]
    assert {"new_tokens", "tok_per_s", "tau", "iterations", "draft_ms", "verify_ms", "transfer_ms",
            "stream_bound_ms", "peak_gpu_bytes", "lossy"} <= set(stats)
    assert stats["new_tokens"] == len(output["token_ids"]) > 0
    assert stats["tau"] == 1.0 and stats["draft_ms"] is None and stats["lossy"] is False
    assert stats["transfer_ms"] is None and stats["peak_gpu_bytes"] is None  # CPU: nothing streams


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_run_api_serves_the_bundled_model():
    port = free_port()
    server = subprocess.Popen(subspec(*GLOBAL_OPTIONS, "run-api", "--port", str(port)), cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            assert server.poll() is None, server.stderr.read()
            assert time.monotonic() < deadline, "the server did not come up"
            try:
                model = httpx.get(f"{base}/health", timeout=2).json()["model"]
                break
            except httpx.HTTPError:
                time.sleep(1)
        assert model == "SmolLM2-135M-Instruct"
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=300)
        messages = [{"role": "user", "content": QUESTION}]

        answer = client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0)
        assert "Paris" in answer.choices[0].message.content
        assert answer.usage.completion_tokens <= 12 and answer.usage.prompt_tokens > 5

        stream = client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0,
                                                stream=True)
        streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert streamed == answer.choices[0].message.content  # greedy: the same tokens either way

        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=model, messages=[{"role": "user", "content": "word " * 400}])
        assert err.value.code == "context_length_exceeded"

        def ask(question: str) -> str:
            reply = client.chat.completions.create(model=model, max_tokens=4, temperature=0,
                                                   messages=[{"role": "user", "content": question}])
            return reply.choices[0].finish_reason

        with ThreadPoolExecutor(max_workers=2) as pool:
            assert set(pool.map(ask, ["Say hi.", "Count to three."])) <= {"stop", "length"}
        assert httpx.get(f"{base}/health").json()["queued"] == 0
    finally:
        server.terminate()
        server.wait(timeout=30)
