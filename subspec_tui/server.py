"""OpenAI-compatible HTTP API (`subspec run-api`) over one loaded engine.

Routes: GET /health, GET /v1/models, POST /v1/chat/completions, POST /v1/completions (both with
`stream` as server-sent events ending in `data: [DONE]`). The engine is not thread-safe, so every
engine call (tokenizing included) runs on one worker thread in arrival order: concurrent clients
are served in turn. Bad requests get a 4xx with OpenAI's error body
`{"error": {"message", "type", "param", "code"}}`. Requests name a model by id and can only name
the one being served: nothing in a request makes the server load a file.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any, Literal, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine import Engine, EngineError, Generation, SamplingConfig

T = TypeVar("T")
MAX_STOP_SEQUENCES = 4  # as in OpenAI's API
FINISH_REASONS = {"eos": "stop", "stop": "stop", "cancelled": "stop", "length": "length", "context": "length"}


# ---------------------------------------------------------------- errors


class APIError(Exception):
    """A request the server refuses, answered with OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def _validation_error(exc: RequestValidationError) -> APIError:
    first = exc.errors()[0]
    if first.get("type") == "json_invalid":
        return APIError(400, f"the request body is not valid JSON ({first.get('msg', '')})", code="invalid_json")
    fields = [str(part) for part in first.get("loc", ()) if part != "body" and not isinstance(part, int)]
    param = fields[0] if fields else None
    where = ".".join(fields) or "request body"
    return APIError(400, f"{where}: {first.get('msg', 'invalid value')}", param=param, code="invalid_value")


# ---------------------------------------------------------------- request bodies


class ContentPart(BaseModel):
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    """One turn. `tool` results are context like any other turn (the model's chat template renders
    them); `content: null` is accepted only from the assistant (OpenAI's tool-call turns)."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    def text(self, index: int) -> str:
        if self.content is None:
            if self.role != "assistant":
                raise APIError(400, f"messages[{index}].content: null is only accepted for assistant messages",
                               param="messages", code="invalid_value")
            return ""
        if isinstance(self.content, str):
            return self.content
        unsupported = [p.type for p in self.content if p.type != "text"]
        if unsupported:
            raise APIError(400, f"content parts of type '{unsupported[0]}' are not supported (text only)",
                           param="messages", code="unsupported_content")
        return "".join(p.text or "" for p in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = False


class GenerationRequest(BaseModel):
    """The fields both endpoints share; unknown OpenAI fields are accepted and ignored."""

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=1, description="one choice per request")

    def new_token_limit(self) -> int | None:
        return self.max_tokens

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise APIError(400, f"stop: at most {MAX_STOP_SEQUENCES} sequences", param="stop", code="invalid_value")
        return [s for s in stops if s]


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    def new_token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(GenerationRequest):
    prompt: str | list[str]

    def prompt_text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise APIError(400, "prompt: exactly one prompt per request", param="prompt", code="invalid_value")
        return self.prompt[0]


# ---------------------------------------------------------------- the engine worker


class ClientGone(Exception):
    """The client of a queued request went away before its turn: nothing is generated for it."""


class EngineWorker:
    """Runs engine calls one at a time on a single thread, first come first served. `pending`
    counts calls queued or running; a cancelled queued call leaves the count at once."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="subspec-engine")
        self._lock = threading.Lock()
        self.pending = 0  # calls queued or running

    def submit(self, fn: Callable[[], T]) -> Future[T]:
        with self._lock:
            self.pending += 1
        future = self._executor.submit(fn)
        future.add_done_callback(self._finished)
        return future

    def _finished(self, _: Future) -> None:
        with self._lock:
            self.pending -= 1

    async def run(self, fn: Callable[[], T]) -> T:
        return await asyncio.wrap_future(self.submit(fn))

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------- one request


class Job:
    """A validated request: prompt token ids and the sampling settings to generate with."""

    def __init__(self, prompt_ids: list[int], sampling: SamplingConfig) -> None:
        self.prompt_ids = prompt_ids
        self.sampling = sampling
        self.id = uuid.uuid4().hex
        self.created = int(time.time())

    def usage(self, gen: Generation) -> dict[str, int]:
        completion = len(gen.token_ids)
        return {"prompt_tokens": len(self.prompt_ids), "completion_tokens": completion,
                "total_tokens": len(self.prompt_ids) + completion}


def _sampling_for(req: GenerationRequest, defaults: SamplingConfig, prompt_len: int, max_length: int) -> SamplingConfig:
    room = max_length - prompt_len
    if room < 1:
        raise APIError(400, f"the prompt is {prompt_len} tokens but this model's context is {max_length} tokens",
                       param="messages" if isinstance(req, ChatCompletionRequest) else "prompt",
                       code="context_length_exceeded")
    limit = req.new_token_limit()
    if limit is not None and limit > room:
        raise APIError(400, f"max_tokens is {limit} but only {room} tokens fit after the {prompt_len}-token prompt "
                            f"(context {max_length})", param="max_tokens", code="context_length_exceeded")
    sampling = replace(defaults, max_new_tokens=min(limit or defaults.max_new_tokens, room), stop=req.stop_list())
    if req.temperature is not None:
        sampling = replace(sampling, temperature=req.temperature, do_sample=req.temperature > 0)
    if req.top_p is not None:
        sampling = replace(sampling, top_p=req.top_p)
    if req.seed is not None:
        sampling = replace(sampling, seed=req.seed)
    return sampling


DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is still there


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


# ---------------------------------------------------------------- the app


def create_app(engine: Engine | Callable[[], Engine], default_sampling: SamplingConfig | None = None,
               plan: dict[str, Any] | None = None) -> FastAPI:
    """The API over `engine`, or over the engine `engine()` returns at start-up (closed at shutdown).
    `plan` (which plan the engine was loaded with) is shown by /health."""
    defaults = default_sampling or SamplingConfig()
    state: dict[str, EngineWorker] = {}

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        owned = not hasattr(engine, "generate")  # a factory, not an engine
        loaded = await asyncio.to_thread(engine) if owned else engine
        state["worker"] = EngineWorker(loaded)
        try:
            yield
        finally:
            state["worker"].shutdown()
            if owned:
                loaded.close()

    app = FastAPI(title="SubSpec Chat API", lifespan=lifespan)

    def worker() -> EngineWorker:
        return state["worker"]

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return APIError(exc.status_code, str(exc.detail), kind=kind).response()

    def check_model(req: GenerationRequest) -> None:
        served = worker().engine.model_name
        if req.model != served:
            raise APIError(404, f"the model '{req.model}' does not exist here; this server serves '{served}'",
                           param="model", code="model_not_found")

    async def prepare(req: GenerationRequest, tokenize: Callable[[Engine], list[int]]) -> Job:
        check_model(req)
        eng = worker().engine
        try:
            ids = await worker().run(lambda: tokenize(eng))
        except EngineError as err:
            raise APIError(400, str(err), code="engine_error") from None
        return Job(ids, _sampling_for(req, defaults, len(ids), eng.max_length))

    def submit(job: Job, cancel: threading.Event, on_text: Callable[[str], None] | None = None) -> Future[Generation]:
        """Queue `job`'s generation; a cancelled job (its client gone) is skipped when its turn comes."""
        eng = worker().engine

        def run() -> Generation:
            if cancel.is_set():
                raise ClientGone
            return eng.generate(job.prompt_ids, job.sampling, on_text=on_text, cancel=cancel)

        return worker().submit(run)

    async def generate(job: Job, request: Request) -> Generation:
        """A whole generation; stopped (or dropped from the queue) as soon as the client disconnects."""
        cancel = threading.Event()
        future = submit(job, cancel)
        done = asyncio.wrap_future(future)
        while not done.done():
            await asyncio.wait({done}, timeout=DISCONNECT_POLL_S)
            if not done.done() and await request.is_disconnected():
                cancel.set()
                future.cancel()  # still queued: leaves the queue now
                break
        try:
            return await done
        except (ClientGone, asyncio.CancelledError):
            raise APIError(499, "the client closed the request", code="client_closed") from None
        except EngineError as err:
            raise APIError(400, str(err), code="engine_error") from None

    async def stream(job: Job, chunk: Callable[[str | None, str | None], dict[str, Any]],
                     include_usage: bool, opening: dict[str, Any] | None) -> AsyncIterator[str]:
        """SSE events: `chunk(text, finish_reason)` per piece, then usage (if asked) and [DONE]."""
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[str | None] = asyncio.Queue()
        cancel = threading.Event()
        on_text = lambda piece: loop.call_soon_threadsafe(pieces.put_nowait, piece)  # noqa: E731
        future = submit(job, cancel, on_text)
        done = asyncio.wrap_future(future)
        # Runs on the loop after every piece queued before the generation finished.
        done.add_done_callback(lambda _: pieces.put_nowait(None))
        try:
            if opening is not None:
                yield _sse(opening)
            while (piece := await pieces.get()) is not None:
                yield _sse(chunk(piece, None))
            try:
                gen = done.result()
            except EngineError as err:
                yield _sse(APIError(400, str(err), code="engine_error").body())
            else:
                yield _sse(chunk(None, FINISH_REASONS[gen.finish_reason]))
                if include_usage:
                    yield _sse({**chunk(None, None), "choices": [], "usage": job.usage(gen)})
            yield _sse("[DONE]")
        finally:
            cancel.set()  # a client that went away stops its generation (no-op once finished)
            future.cancel()  # ...or, still queued, leaves the queue

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": worker().engine.model_name, "queued": worker().pending, "plan": plan}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [
            {"id": worker().engine.model_name, "object": "model", "created": 0, "owned_by": "subspec"}
        ]}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(req: ChatCompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
        messages = [{"role": m.role, "content": m.text(i)} for i, m in enumerate(req.messages)]
        job = await prepare(req, lambda eng: eng.chat_ids(messages))
        model = worker().engine.model_name

        def chunk(text: str | None, finish: str | None) -> dict[str, Any]:
            delta = {} if text is None else {"content": text}
            return {"id": f"chatcmpl-{job.id}", "object": "chat.completion.chunk", "created": job.created,
                    "model": model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

        if req.stream:
            opening = chunk(None, None)
            opening["choices"][0]["delta"] = {"role": "assistant", "content": ""}
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(stream(job, chunk, include_usage, opening), media_type="text/event-stream")
        gen = await generate(job, request)
        return JSONResponse({
            "id": f"chatcmpl-{job.id}", "object": "chat.completion", "created": job.created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": gen.text},
                         "finish_reason": FINISH_REASONS[gen.finish_reason]}],
            "usage": job.usage(gen),
            "subspec_stats": gen.stats.as_dict(),
        })

    @app.post("/v1/completions", response_model=None)
    async def completions(req: CompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
        prompt = req.prompt_text()
        job = await prepare(req, lambda eng: list(eng.tokenizer.encode(prompt)))
        model = worker().engine.model_name

        def chunk(text: str | None, finish: str | None) -> dict[str, Any]:
            return {"id": f"cmpl-{job.id}", "object": "text_completion", "created": job.created, "model": model,
                    "choices": [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}]}

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(stream(job, chunk, include_usage, None), media_type="text/event-stream")
        gen = await generate(job, request)
        body = chunk(gen.text, FINISH_REASONS[gen.finish_reason])
        return JSONResponse({**body, "usage": job.usage(gen), "subspec_stats": gen.stats.as_dict()})

    return app


def serve(engine: Engine, default_sampling: SamplingConfig, sock: socket.socket, plan: dict[str, Any] | None = None) -> None:
    """Serve on `sock` (bound before the model loaded, so a taken port fails fast) until interrupted."""
    import uvicorn

    config = uvicorn.Config(create_app(engine, default_sampling, plan), log_level="info")
    uvicorn.Server(config).run(sockets=[sock])
