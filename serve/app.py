"""The Starlette app: OpenAI routes, SSE streaming, auth, body limits, readiness.

```
POST /v1/chat/completions ─┐ auth → body (≤ max_body_bytes) → pydantic → prompt ids (thread pool)
POST /v1/completions ──────┘ → context check → Engine.submit → events → one JSON body | SSE chunks
GET  /v1/models, /v1/models/{id}, /health (503 until the engine has loaded)
```

A stream only starts once the engine's first event is in, so anything that fails before the
first token still gets a proper HTTP status; later failures become a final SSE error event.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, Protocol

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from serve.chat_template import ChatTemplateError
from serve.engine import Event, GenerationRequest, RequestStream
from serve.errors import (
    EXCEPTION_HANDLERS,
    GENERIC_SERVER_ERROR,
    APIError,
    AuthenticationError,
    InvalidRequestError,
    NotFoundError,
    PayloadTooLargeError,
    ServerError,
    ServiceUnavailableError,
)
from serve.options import ServeOptions
from serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    check_context,
    check_token_ids,
    parse_request,
)
from serve.responses import SSE_DONE, ChatOutput, CompletionOutput, Output, new_id, now

log = logging.getLogger("serve.app")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class EngineLike(Protocol):
    """What the routes need from `serve.engine.Engine` (tests pass a fake)."""

    tokenizer: Any
    max_length: int
    vocab_size: int

    def submit(self, request: GenerationRequest) -> RequestStream: ...
    def stop(self) -> None: ...


class _State:
    def __init__(self, options: ServeOptions, model_name: str) -> None:
        self.options = options
        self.model_name = model_name
        self.created = now()
        self.engine: EngineLike | None = None
        self.load_error: str | None = None


def create_app(
    options: ServeOptions,
    load: Callable[[], EngineLike],
    *,
    model_name: str,
    on_load_error: Callable[[BaseException], None] | None = None,
) -> Starlette:
    """The ASGI app. `load()` runs on a background thread at startup and returns a started
    engine; until it returns, `/health` says 503 and the generation routes answer 503.
    `model_name` is the only model id served."""
    state = _State(options, model_name)

    def load_in_background() -> None:
        try:
            state.engine = load()
            log.info("model %s is ready", state.model_name)
        except BaseException as exc:
            log.error("loading the model failed", exc_info=exc)
            state.load_error = f"{type(exc).__name__}: {exc}"
            if on_load_error is not None:
                on_load_error(exc)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        threading.Thread(target=load_in_background, name="llorch-load", daemon=True).start()
        yield
        if state.engine is not None:
            await run_in_threadpool(state.engine.stop)

    app = Starlette(
        routes=[
            Route("/health", _endpoint(health), methods=["GET"]),
            Route("/v1/models", _endpoint(list_models), methods=["GET"]),
            Route("/v1/models/{model_id:path}", _endpoint(get_model), methods=["GET"]),
            Route("/v1/chat/completions", _endpoint(chat_completions), methods=["POST"]),
            Route("/v1/completions", _endpoint(completions), methods=["POST"]),
        ],
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=lifespan,
    )
    app.state.llorch = state
    return app


Handler = Callable[[Request, _State], Awaitable[Response]]


def _endpoint(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
    """Pass the server state; turn unexpected exceptions into a logged, traceback-free 500."""

    @functools.wraps(handler)
    async def endpoint(request: Request) -> Response:
        try:
            return await handler(request, request.app.state.llorch)
        except APIError:
            raise
        except Exception:
            log.exception("error in %s %s", request.method, request.url.path)
            raise ServerError(GENERIC_SERVER_ERROR) from None

    return endpoint


# --------------------------------------------------------------------- small routes


async def health(request: Request, state: _State) -> Response:
    if state.engine is not None:
        slots = getattr(state.engine, "slots_in_use", None)
        return JSONResponse({"status": "ok"} if slots is None else {"status": "ok", "slots_in_use": slots})
    if state.load_error is not None:
        return JSONResponse({"status": "error", "message": state.load_error}, status_code=503)
    return JSONResponse({"status": "loading"}, status_code=503)


def _model_card(state: _State) -> dict[str, Any]:
    return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "llorch"}


async def list_models(request: Request, state: _State) -> Response:
    _authorize(request, state)
    return JSONResponse({"object": "list", "data": [_model_card(state)]})


async def get_model(request: Request, state: _State) -> Response:
    _authorize(request, state)
    _check_model(request.path_params["model_id"], state)
    return JSONResponse(_model_card(state))


# ----------------------------------------------------------------- shared checks


def _authorize(request: Request, state: _State) -> None:
    key = state.options.api_key
    if key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationError(
            "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'.",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise AuthenticationError(
            "Incorrect API key provided.", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}
        )


def _check_model(model: str | None, state: _State) -> None:
    if model is not None and model != state.model_name:
        raise NotFoundError(
            f"The model `{model}` does not exist; this server serves `{state.model_name}`.",
            param="model",
            code="model_not_found",
        )


def _engine(state: _State) -> EngineLike:
    if state.engine is None:
        raise ServiceUnavailableError(
            "The model is still loading; retry when /health answers 200.", code="model_loading"
        )
    return state.engine


async def _read_json(request: Request, limit: int) -> dict[str, Any]:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(f"The request body is {declared} bytes; the limit is {limit} bytes.")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise PayloadTooLargeError(f"The request body exceeds the limit of {limit} bytes.")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(
            f"We could not parse the JSON body of your request ({exc}). The body must be a JSON object."
        ) from None
    if not isinstance(data, dict):
        raise InvalidRequestError("The request body must be a JSON object.")
    return data


# ------------------------------------------------------------------ generation routes


async def chat_completions(request: Request, state: _State) -> Response:
    _authorize(request, state)
    req = parse_request(ChatCompletionRequest, await _read_json(request, state.options.max_body_bytes))
    _check_model(req.model, state)
    engine = _engine(state)
    prompt_ids = await run_in_threadpool(_chat_prompt_ids, engine.tokenizer, req)
    check_context(
        prompt_tokens=len(prompt_ids),
        max_tokens=req.max_completion_tokens or req.max_tokens,
        max_length=engine.max_length,
        what="messages",
        param="messages",
    )
    params = req.to_sampling_params()
    check_token_ids(list(params.logit_bias), engine.vocab_size, param="logit_bias")
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    out = ChatOutput(new_id("chatcmpl"), state.model_name, params.n, engine.tokenizer.token_text,
                      logprobs=bool(req.logprobs), include_usage=include_usage)
    stream = engine.submit(GenerationRequest(tuple(prompt_ids), params, request_id=out.id))
    return await _respond(request, [stream], out, streaming=bool(req.stream))


def _chat_prompt_ids(tokenizer: Any, req: ChatCompletionRequest) -> list[int]:
    try:
        text = tokenizer.apply_chat_template(req.template_messages(), add_generation_prompt=True)
    except ChatTemplateError as exc:
        raise InvalidRequestError(f"The chat template rejected the messages: {exc}", param="messages") from None
    # The template already wrote any BOS it wants.
    return tokenizer.encode(text, add_special_tokens=False)


async def completions(request: Request, state: _State) -> Response:
    _authorize(request, state)
    req = parse_request(CompletionRequest, await _read_json(request, state.options.max_body_bytes))
    _check_model(req.model, state)
    engine = _engine(state)
    prompts = await run_in_threadpool(_completion_prompts, engine.tokenizer, req)
    for _, ids in prompts:
        check_token_ids(ids, engine.vocab_size, param="prompt")
        check_context(prompt_tokens=len(ids), max_tokens=req.max_tokens,
                      max_length=engine.max_length, what="prompt", param="prompt")
    params = req.to_sampling_params()
    check_token_ids(list(params.logit_bias), engine.vocab_size, param="logit_bias")
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    echo_logprobs = req.logprobs if req.echo else None
    out = CompletionOutput(new_id("cmpl"), state.model_name, params.n, engine.tokenizer.token_text,
                            logprobs=req.logprobs is not None, include_usage=include_usage,
                            echo=[(t, ids) for t, ids in prompts] if req.echo else None,
                            n_prompts=len(prompts))
    streams = [
        engine.submit(GenerationRequest(tuple(ids), params, echo_logprobs, request_id=out.id))
        for _, ids in prompts
    ]
    return await _respond(request, streams, out, streaming=bool(req.stream))


def _completion_prompts(tokenizer: Any, req: CompletionRequest) -> list[tuple[str, list[int]]]:
    prompts = []
    for prompt in req.prompt:
        if isinstance(prompt, str):
            prompts.append((prompt, tokenizer.encode(prompt)))
        else:
            text = tokenizer.decode(prompt, skip_special_tokens=False) if req.echo else ""
            prompts.append((text, list(prompt)))
    return prompts


# --------------------------------------------------------------- events → response


class _Merged:
    """The events of one or more RequestStreams (one per completions prompt) as (k, event)."""

    def __init__(self, streams: Sequence[RequestStream]) -> None:
        self.streams = list(streams)
        self._queue: asyncio.Queue[tuple[int, Event | None]] = asyncio.Queue()
        self._live = len(self.streams)
        self._tasks = []
        if len(self.streams) > 1:
            self._tasks = [asyncio.create_task(self._pump(k, s)) for k, s in enumerate(self.streams)]

    async def _pump(self, k: int, stream: RequestStream) -> None:
        try:
            async for event in stream:
                self._queue.put_nowait((k, event))
        finally:
            self._queue.put_nowait((k, None))

    def __aiter__(self) -> _Merged:
        return self

    async def __anext__(self) -> tuple[int, Event]:
        if not self._tasks:
            return 0, await self.streams[0].__anext__()
        while self._live:
            k, event = await self._queue.get()
            if event is not None:
                return k, event
            self._live -= 1
        raise StopAsyncIteration

    def close(self) -> None:
        """Synchronous, so it is safe in `finally` under cancellation."""
        for task in self._tasks:
            task.cancel()
        for stream in self.streams:
            stream.cancel()


@asynccontextmanager
async def _cancel_on_disconnect(request: Request, events: _Merged) -> AsyncIterator[list[bool]]:
    """While the body is being waited for, a client disconnect cancels the requests."""
    disconnected = [False]

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        disconnected[0] = True
        events.close()

    task = asyncio.create_task(watch())
    try:
        yield disconnected
    finally:
        task.cancel()


async def _respond(request: Request, streams: list[RequestStream], out: Output, *, streaming: bool) -> Response:
    events = _Merged(streams)
    try:
        async with _cancel_on_disconnect(request, events) as disconnected:
            if not streaming:
                async for k, event in events:
                    out.add(k, event)
            else:  # wait for the first event: errors up to here keep their HTTP status
                first = await anext(events, None)
                if first is not None:
                    head = [*out.start(), *out.chunks(*first)]
    except BaseException:
        events.close()
        raise
    if disconnected[0]:
        return Response(status_code=499)  # nobody is listening; for the access log only
    if streaming and first is None:
        raise ServerError(GENERIC_SERVER_ERROR)  # the engine ended the request without a word
    if not streaming:
        return JSONResponse(out.response())
    return _SSEResponse(_sse(out, head, events), events)


class _SSEResponse(StreamingResponse):
    """Closes the engine streams however the response ends, even when the client left
    before the body iterator ever started (then its own `finally` never runs)."""

    def __init__(self, content: AsyncIterator[bytes], events: _Merged) -> None:
        super().__init__(content, media_type="text/event-stream", headers=SSE_HEADERS)
        self._events = events

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._events.close()


async def _sse(out: Output, head: list[bytes], events: _Merged) -> AsyncIterator[bytes]:
    error: APIError | None = None
    try:
        for chunk in head:
            yield chunk
        async for k, event in events:
            for chunk in out.chunks(k, event):
                yield chunk
        for chunk in out.end():
            yield chunk
    except APIError as exc:
        error = exc
    except Exception:
        log.exception("error while streaming %s", out.id)
        error = ServerError(GENERIC_SERVER_ERROR)
    finally:
        events.close()  # a no-op when done; frees the slots when the client went away
    if error is not None:
        yield error.sse()
    yield SSE_DONE
