"""The Starlette app: OpenAI routes, SSE streaming, auth, body limits, readiness, metrics.

```
POST /v1/chat/completions ─┐ auth → body (≤ max_body_bytes) → pydantic → prompt ids (thread pool)
POST /v1/completions ──────┘ → context check → Engine.submit → events → one JSON body | SSE chunks
                             (429 + Retry-After when the queue is full; see serve.streaming)
POST /tokenize, /detokenize  token counting (vLLM's shapes)
GET  /v1/models, /v1/models/{id}
GET  /health                 503 while loading and while draining
GET  /metrics                Prometheus text format (serve.metrics)
```

`drain(app, timeout)` is the graceful shutdown `serve.main` runs on SIGTERM/SIGINT: new
requests get 503, queued ones end with 503, running ones get `timeout` seconds to finish.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, Protocol

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from serve.chat_prep import prepare_chat, render_chat
from serve.constraints import require_compiled
from serve.engine import GenerationRequest, QueueFull, RequestStream, ShuttingDown
from serve.errors import (
    EXCEPTION_HANDLERS,
    GENERIC_SERVER_ERROR,
    APIError,
    AuthenticationError,
    InvalidRequestError,
    NotFoundError,
    PayloadTooLargeError,
    RateLimitError,
    ServerError,
    ServiceUnavailableError,
)
from serve.metrics import CONTENT_TYPE, Metrics
from serve.options import ServeOptions
from serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    check_context,
    check_token_ids,
    parse_request,
)
from serve.responses import ChatOutput, CompletionOutput, new_id, now
from serve.streaming import respond

log = logging.getLogger("serve.app")

RETRY_AFTER_S = 1  # what a 429 tells clients to wait


class EngineLike(Protocol):
    """What the routes need from `serve.engine.Engine` (tests pass a fake). The engine's
    state gauges (`slots_in_use`, `num_requests`, …) are read where present."""

    tokenizer: Any
    max_length: int
    vocab_size: int

    def submit(self, request: GenerationRequest) -> RequestStream: ...
    def stop(self) -> None: ...


class _State:
    def __init__(self, options: ServeOptions, model_name: str, metrics: Metrics) -> None:
        self.options = options
        self.model_name = model_name
        self.metrics = metrics
        self.created = now()
        self.engine: EngineLike | None = None
        self.load_error: str | None = None
        self.draining = False


def create_app(
    options: ServeOptions,
    load: Callable[[], EngineLike],
    *,
    model_name: str,
    on_load_error: Callable[[BaseException], None] | None = None,
    metrics: Metrics | None = None,
) -> Starlette:
    """The ASGI app. `load()` runs on a background thread at startup and returns a started
    engine; until it returns, `/health` says 503 and the generation routes answer 503.
    `model_name` is the only model id served; `metrics` is what `/metrics` reports (the
    caller hands the same object to the engine as its observer)."""
    state = _State(options, model_name, metrics or Metrics())

    def load_in_background() -> None:
        try:
            engine = load()
            state.metrics.bind(engine)
            state.engine = engine
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

    def route(path: str, handler: Handler, method: str) -> Route:
        return Route(path, _endpoint(handler, path), methods=[method])

    middleware = []
    if options.cors_origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=list(options.cors_origins),
                                     allow_methods=["*"], allow_headers=["*"]))
    app = Starlette(
        routes=[
            route("/health", health, "GET"),
            route("/metrics", metrics_text, "GET"),
            route("/v1/models", list_models, "GET"),
            route("/v1/models/{model_id:path}", get_model, "GET"),
            route("/v1/chat/completions", chat_completions, "POST"),
            route("/v1/completions", completions, "POST"),
            route("/tokenize", tokenize, "POST"),
            route("/detokenize", detokenize, "POST"),
        ],
        middleware=middleware,
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=lifespan,
    )
    app.state.llorch = state
    return app


async def drain(app: Starlette, timeout: float) -> None:
    """Graceful shutdown, first half: refuse new requests (503), end the queued ones, let
    the running ones finish for up to `timeout` seconds (then the engine ends them with a
    final error event); returns once the engine holds no request. The caller then stops
    the server, which waits for the responses to be written."""
    state: _State = app.state.llorch
    state.draining = True
    engine = state.engine
    if engine is None or not hasattr(engine, "drain"):
        return
    log.info("draining: %d requests in flight, up to %g s to finish",
             getattr(engine, "num_requests", 0), timeout)
    engine.drain(timeout)
    deadline = time.monotonic() + timeout + 5.0  # the engine ends them at `timeout`
    while getattr(engine, "num_requests", 0) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


Handler = Callable[[Request, _State], Awaitable[Response]]


def _endpoint(handler: Handler, path: str) -> Callable[[Request], Awaitable[Response]]:
    """Pass the server state; count the request by status; turn unexpected exceptions into
    a logged, traceback-free 500."""

    @functools.wraps(handler)
    async def endpoint(request: Request) -> Response:
        state: _State = request.app.state.llorch
        status = 500
        try:
            response = await handler(request, state)
            status = response.status_code
            return response
        except APIError as exc:
            status = exc.status_code
            raise
        except Exception:
            log.exception("error in %s %s", request.method, request.url.path)
            raise ServerError(GENERIC_SERVER_ERROR) from None
        finally:
            state.metrics.request(path, status)

    return endpoint


# --------------------------------------------------------------------- small routes


async def health(request: Request, state: _State) -> Response:
    if state.draining:
        return JSONResponse({"status": "draining"}, status_code=503)
    if state.engine is not None:
        slots = getattr(state.engine, "slots_in_use", None)
        return JSONResponse({"status": "ok"} if slots is None else {"status": "ok", "slots_in_use": slots})
    if state.load_error is not None:
        return JSONResponse({"status": "error", "message": state.load_error}, status_code=503)
    return JSONResponse({"status": "loading"}, status_code=503)


async def metrics_text(request: Request, state: _State) -> Response:
    return Response(state.metrics.render(), media_type=CONTENT_TYPE)


def _model_card(state: _State) -> dict[str, Any]:
    return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "llorch"}


async def list_models(request: Request, state: _State) -> Response:
    _authorize(request, state)
    return JSONResponse({"object": "list", "data": [_model_card(state)]})


async def get_model(request: Request, state: _State) -> Response:
    _authorize(request, state)
    _check_model(request.path_params["model_id"], state)
    return JSONResponse(_model_card(state))


async def tokenize(request: Request, state: _State) -> Response:
    """`{"prompt": str, "add_special_tokens"?: true}` or `{"messages": [...], "tools"?: [...],
    "add_generation_prompt"?: true}` → `{"tokens", "count", "max_model_len"}` (vLLM)."""
    _authorize(request, state)
    data = await _read_json(request, state.options.max_body_bytes)
    _check_model(data.get("model"), state)
    engine = _engine(state)
    tokenizer = engine.tokenizer
    if "messages" in data:
        req = parse_request(ChatCompletionRequest, {k: data[k] for k in ("messages", "tools", "chat_template_kwargs")
                                                    if k in data})
        generation_prompt = _flag(data, "add_generation_prompt", True)
        special = _flag(data, "add_special_tokens", False)

        def encode() -> list[int]:
            text = render_chat(tokenizer, req, add_generation_prompt=generation_prompt)
            return tokenizer.encode(text, add_special_tokens=special)
    else:
        prompt = data.get("prompt", data.get("content"))  # llama-server says "content"
        if not isinstance(prompt, str):
            raise InvalidRequestError("'prompt' must be a string (or send 'messages').", param="prompt")
        special = _flag(data, "add_special_tokens", True)

        def encode() -> list[int]:
            return tokenizer.encode(prompt, add_special_tokens=special)
    tokens = await run_in_threadpool(encode)
    return JSONResponse({"tokens": tokens, "count": len(tokens), "max_model_len": engine.max_length})


async def detokenize(request: Request, state: _State) -> Response:
    """`{"tokens": [int, ...]}` → `{"prompt": text}` (vLLM)."""
    _authorize(request, state)
    data = await _read_json(request, state.options.max_body_bytes)
    _check_model(data.get("model"), state)
    engine = _engine(state)
    tokens = data.get("tokens")
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool)
                                               for t in tokens):
        raise InvalidRequestError("'tokens' must be a list of token ids.", param="tokens")
    check_token_ids(tokens, engine.vocab_size, param="tokens")
    text = await run_in_threadpool(engine.tokenizer.decode, tokens, skip_special_tokens=False)
    return JSONResponse({"prompt": text})


def _flag(data: dict[str, Any], name: str, default: bool) -> bool:
    value = data.get(name, default)
    if not isinstance(value, bool):
        raise InvalidRequestError(f"'{name}' must be a boolean.", param=name)
    return value


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


def _engine(state: _State, *, generating: bool = False) -> EngineLike:
    if generating and state.draining:
        raise ServiceUnavailableError("The server is shutting down; retry on another instance.",
                                      code="shutting_down")
    if state.engine is None:
        raise ServiceUnavailableError(
            "The model is still loading; retry when /health answers 200.", code="model_loading"
        )
    return state.engine


def _submit(engine: EngineLike, requests: list[GenerationRequest]) -> list[RequestStream]:
    """All of a response's engine requests, or none: 429 when the queue is full, 503 when
    the engine is shutting down."""
    streams: list[RequestStream] = []
    try:
        for request in requests:
            streams.append(engine.submit(request))
    except (QueueFull, ShuttingDown) as exc:
        for stream in streams:
            stream.cancel()
        if isinstance(exc, QueueFull):
            log.warning("request %s refused: %s", requests[0].request_id, exc)
            raise RateLimitError(str(exc), code="rate_limit_exceeded",
                                 headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        raise ServiceUnavailableError(str(exc), code="shutting_down") from None
    return streams


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
    engine = _engine(state, generating=True)
    # Prompt, grammar (tools or response_format; compiled and cached here, off the engine
    # thread) and the per-choice output parser.
    prepared = await run_in_threadpool(prepare_chat, engine.tokenizer, req, state.options)
    check_context(
        prompt_tokens=len(prepared.prompt_ids),
        max_tokens=req.max_completion_tokens or req.max_tokens,
        max_length=engine.max_length,
        what="messages",
        param="messages",
    )
    params = req.to_sampling_params()
    check_token_ids(list(params.logit_bias), engine.vocab_size, param="logit_bias")
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    out = ChatOutput(new_id("chatcmpl"), state.model_name, params.n, engine.tokenizer.token_text,
                      logprobs=bool(req.logprobs), include_usage=include_usage,
                      make_parser=prepared.make_parser, legacy_functions=req.functions is not None)
    if state.options.log_prompts:
        log.info("request %s prompt: %r", out.id, prepared.prompt_text)
    streams = _submit(engine, [GenerationRequest(tuple(prepared.prompt_ids), params, request_id=out.id,
                                                 grammar=prepared.grammar)])
    return await respond(request, streams, out, streaming=bool(req.stream))


async def completions(request: Request, state: _State) -> Response:
    _authorize(request, state)
    req = parse_request(CompletionRequest, await _read_json(request, state.options.max_body_bytes))
    _check_model(req.model, state)
    engine = _engine(state, generating=True)
    # Prompt ids and the output constraint's grammar (compiled into the cache) off the loop.
    prompts, grammar = await run_in_threadpool(
        lambda: (_completion_prompts(engine.tokenizer, req), _grammar(req, engine.tokenizer)))
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
    if state.options.log_prompts:
        for k, (text, ids) in enumerate(prompts):
            log.info("request %s prompt %d: %r", out.id, k,
                     text or engine.tokenizer.decode(ids, skip_special_tokens=False))
    streams = _submit(engine, [GenerationRequest(tuple(ids), params, echo_logprobs, request_id=out.id,
                                                 grammar=grammar)
                               for _, ids in prompts])
    return await respond(request, streams, out, streaming=bool(req.stream))


def _grammar(req: CompletionRequest, tokenizer: Any) -> str | None:
    """The request's output constraint (response_format, structured_outputs, json_schema,
    grammar, guided_*) as an llguidance grammar, validated and compiled so the engine finds it
    cached; None when the output is free. Call it in the thread pool (a large schema takes
    milliseconds).

    Raises:
        InvalidRequestError: a malformed or unenforceable constraint, or more than one.
    """
    found = req.constraint()
    if found is None:
        return None
    grammar, param = found
    require_compiled(grammar, tokenizer, param=param)
    return grammar


def _completion_prompts(tokenizer: Any, req: CompletionRequest) -> list[tuple[str, list[int]]]:
    prompts = []
    for prompt in req.prompt:
        if isinstance(prompt, str):
            prompts.append((prompt, tokenizer.encode(prompt)))
        else:
            text = tokenizer.decode(prompt, skip_special_tokens=False) if req.echo else ""
            prompts.append((text, list(prompt)))
    return prompts
