"""The Starlette app: OpenAI routes, SSE streaming, auth, body limits, readiness, metrics.

```
POST /v1/chat/completions ─┐ auth → body (serve.body: JSON only, ≤ max_body_bytes, depth, text)
POST /v1/completions ──────┘ → pydantic (strict) → length bound → prompt ids (thread pool)
                             → context check → Engine.submit → events → one JSON body | SSE chunks
                             (429 + Retry-After when the queue is full; see serve.streaming)
POST /v1/responses ────────┐ adapters: translated into a chat request, then the chat route's
POST /v1/messages ─────────┘ path (`generate_chat`); serve.api_responses, serve.api_messages
GET|DELETE /v1/responses/{id}    the Responses store (serve.response_store); GET …/input_items,
                                 POST …/cancel
POST /v1/messages/count_tokens   the Anthropic request's prompt length
POST /v1/responses/input_tokens  the Responses request's prompt length (…/compact: 400)
POST /tokenize, /detokenize  token counting (vLLM's shapes)
GET  /v1/models, /v1/models/{id}    every served model, with its status (serve.models)
POST /v1/models/{id}/load, /unload operators (behind --api-key)
GET  /health                 503 while the default model loads at startup and while draining
GET  /                       the chat page (serve.webui; --no-webui: off)
GET  /metrics                Prometheus text format (serve.metrics); --protect-metrics: keyed
```

The request's `model` picks one of the served models (serve.models: loaded on demand, least
recently used idle ones stopped to make room); without `model`, the first one given.
A trailing slash is answered like the path without it. Every response carries the
`system_fingerprint` (serve.fingerprint) and, with logprobs, each token's raw bytes.

`drain(app, timeout)` is the graceful shutdown `serve.main` runs on SIGTERM/SIGINT: new
requests get 503, queued ones end with 503, running ones get `timeout` seconds to finish.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any, Protocol, TypeVar

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from serve import api_messages, api_responses, webui
from serve.api_messages import CountTokensRequest, MessagesOutput, MessagesRequest, anthropic_errors
from serve.api_responses import InputTokensRequest, ResponsesOutput, ResponsesRequest
from serve.body import ClientGone, read_json
from serve.chat_prep import encode_chat, prepare_chat
from serve.constraints import require_compiled
from serve.errors import (
    EXCEPTION_HANDLERS,
    GENERIC_SERVER_ERROR,
    APIError,
    AuthenticationError,
    InvalidRequestError,
    NotFoundError,
    RateLimitError,
    ServerError,
    ServiceUnavailableError,
    api_error_handler,
    http_error,
)
from serve.events import GenerationRequest, QueueFull, RequestStream, ShuttingDown
from serve.metrics import CONTENT_TYPE, Metrics
from serve.models import ERROR, ModelEntry, ModelRegistry, model_info_or_none
from serve.options import ServeOptions
from serve.param_names import Renamer
from serve.parsers import ChoiceParser
from serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    check_context,
    check_fits,
    check_token_ids,
    parse_request,
)
from serve.request_id import RequestIdMiddleware
from serve.response_store import ResponseStore, StoredResponse, StoredThread
from serve.responses import ChatOutput, CompletionOutput, Output, new_id
from serve.sampling import SamplingParams
from serve.streaming import RETRY_AFTER_S, respond, when_sent

log = logging.getLogger("serve.app")



class EngineLike(Protocol):
    """What the routes need from `serve.engine.Engine` (tests pass a fake). The engine's
    state gauges (`slots_in_use`, `num_requests`, …) are read where present. `model_id` (the
    served id) and `fingerprint` are set by `create_app` when the engine is loaded."""

    tokenizer: Any
    max_length: int
    vocab_size: int
    model_id: str
    fingerprint: str

    def submit(self, request: GenerationRequest) -> RequestStream: ...
    def stop(self) -> None: ...


class _State:
    def __init__(self, options: ServeOptions, models: ModelRegistry, metrics: Metrics,
                 responses: ResponseStore | None = None) -> None:
        self.options = options
        self.models = models
        self.metrics = metrics
        self.started = False  # the startup load of the default model has finished
        self.draining = False
        self.responses = ResponseStore(options.responses_store_size) if responses is None else responses


def create_app(
    options: ServeOptions,
    load: Callable[..., EngineLike],
    *,
    model_name: str | None = None,
    entries: list[ModelEntry] | None = None,
    on_load_error: Callable[[BaseException], None] | None = None,
    metrics: Metrics | None = None,
    responses: ResponseStore | None = None,
    on_started: Callable[[], None] | None = None,
) -> Starlette:
    """The ASGI app serving `entries` (serve.models; the first is the default model), each
    loaded by `load(entry)` (returns a started engine; runs on a worker thread). Without
    `entries`: one model named `model_name`, and `load()` takes no argument (tests pass a
    fake engine).

    The default model loads on a background thread at startup; until that ends `/health`
    says 503 and the generation routes answer 503. With one model, a failed startup load is
    passed to `on_load_error`; the others load on their first request. `metrics` is what
    `/metrics` reports (the caller hands `metrics.observer(id)` to each engine); `responses`
    the Responses API's store (default: one of its own, `--responses-store-size`);
    `on_started()` is called (on the loading thread) once the startup load has succeeded and
    the generation routes answer."""
    metrics = metrics or Metrics()
    if entries is None:
        if model_name is None:
            raise ValueError("create_app needs entries or model_name")
        entries = [ModelEntry(model_name, options, model_info_or_none(options.model_dir))]
        load_one = load
        load = lambda entry: load_one()  # noqa: E731

    def load_entry(entry: ModelEntry) -> EngineLike:
        engine = load(entry)
        engine.model_id, engine.fingerprint = entry.id, entry.fingerprint
        return engine

    models = ModelRegistry(
        entries, load_entry, max_loaded=options.max_loaded_models, memory_budget=options.memory_budget,
        idle_unload=options.idle_unload, wait_timeout=options.queue_timeout,
        on_loaded=lambda e: metrics.bind(e.engine, e.id), on_unloaded=lambda e: metrics.unbind(e.id))
    state = _State(options, models, metrics, responses)

    def load_in_background() -> None:
        loaded = False
        try:
            models.ensure_loaded(models.default)
            loaded = True
        except BaseException as exc:
            if on_load_error is not None and len(models.entries) == 1:
                on_load_error(models.default.exception or exc)
        finally:
            state.started = True
        if loaded and on_started is not None:
            on_started()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        threading.Thread(target=load_in_background, name="llorch-load", daemon=True).start()
        models.start_idle_unloader()
        yield
        await run_in_threadpool(models.stop_all)

    def route(path: str, handler: Handler, method: str) -> Route:
        return Route(path, _endpoint(handler, path), methods=[method])

    middleware = [Middleware(RequestIdMiddleware)]  # outermost: every answer carries the id
    if options.cors_origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=list(options.cors_origins),
                                     allow_methods=["*"], allow_headers=["*"],
                                     expose_headers=["x-request-id", "request-id", "retry-after"]))
    middleware.append(Middleware(_StripTrailingSlash))
    app = Starlette(
        routes=[
            route("/health", health, "GET"),
            route("/metrics", metrics_text, "GET"),
            route("/v1/models", list_models, "GET"),
            route("/v1/models/{model_id:path}/load", load_model, "POST"),
            route("/v1/models/{model_id:path}/unload", unload_model, "POST"),
            route("/v1/models/{model_id:path}", get_model, "GET"),
            route("/v1/chat/completions", chat_completions, "POST"),
            route("/v1/completions", completions, "POST"),
            route("/v1/responses", create_response, "POST"),
            route("/v1/responses/input_tokens", count_response_tokens, "POST"),
            route("/v1/responses/compact", compact_response, "POST"),
            route("/v1/responses/{response_id}", get_response, "GET"),
            route("/v1/responses/{response_id}", delete_response, "DELETE"),
            route("/v1/responses/{response_id}/input_items", list_input_items, "GET"),
            route("/v1/responses/{response_id}/cancel", cancel_response, "POST"),
            route("/v1/messages", anthropic_errors(create_message), "POST"),
            route("/v1/messages/count_tokens", anthropic_errors(count_message_tokens), "POST"),
            route("/tokenize", tokenize, "POST"),
            route("/detokenize", detokenize, "POST"),
            *(webui.routes() if options.webui else []),
        ],
        middleware=middleware,
        exception_handlers={**EXCEPTION_HANDLERS, HTTPException: _http_exception},
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
    engines = [e for e in state.models.loaded() if hasattr(e, "drain")]

    def in_flight() -> int:
        return sum(getattr(e, "num_requests", 0) for e in engines)

    if not engines:
        return
    log.info("draining: %d requests in flight, up to %g s to finish", in_flight(), timeout)
    for engine in engines:
        engine.drain(timeout)
    deadline = time.monotonic() + timeout + 5.0  # the engines end them at `timeout`
    while in_flight() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


Handler = Callable[[Request, _State], Awaitable[Response]]


async def _http_exception(request: Request, exc: Exception) -> Response:
    """No route (404) or wrong method (405): in Anthropic's shape under /v1/messages, else OpenAI's."""
    error = http_error(request, exc)
    if request.url.path.startswith("/v1/messages"):
        return JSONResponse(api_messages.error_body(error, request), status_code=error.status_code,
                            headers=error.headers or None)
    return await api_error_handler(request, error)


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
        except ClientGone:
            # The client hung up mid-body: its event, not a server error (nginx's 499).
            status = 499
            log.info("client disconnected while sending %s %s", request.method, request.url.path)
            return Response(status_code=499)
        except Exception:
            log.exception("error in %s %s", request.method, request.url.path)
            raise ServerError(GENERIC_SERVER_ERROR) from None
        finally:
            for entry in request.scope.pop(_LEASES, ()):
                state.models.release(entry)
            state.metrics.request(path, status)

    return endpoint


# --------------------------------------------------------------------- small routes


async def health(request: Request, state: _State) -> Response:
    """503 while draining and during the startup load; then 200 with the KV slots in use
    (all models) and, with several models, each one's status. One model that failed to
    load: 503 with the error."""
    models = state.models
    if state.draining:
        return JSONResponse({"status": "draining"}, status_code=503)
    if len(models.entries) == 1 and models.default.status == ERROR:
        return JSONResponse({"status": "error", "message": models.default.error}, status_code=503)
    if not state.started:
        return JSONResponse({"status": "loading"}, status_code=503)
    body: dict[str, Any] = {"status": "ok"}
    slots = [getattr(e, "slots_in_use", None) for e in models.loaded()]
    if any(n is not None for n in slots):
        body["slots_in_use"] = sum(n for n in slots if n is not None)
    if len(models.entries) > 1:
        body["models"] = {e.id: e.status for e in models.entries.values()}
    return JSONResponse(body)


async def metrics_text(request: Request, state: _State) -> Response:
    if state.options.protect_metrics:
        _authorize(request, state)
    # a thread: with --api-workers the text comes from the engine process
    return Response(await run_in_threadpool(state.metrics.render), media_type=CONTENT_TYPE)


async def list_models(request: Request, state: _State) -> Response:
    """Every served model, the default first (serve.models.ModelEntry.card), as one page that
    both OpenAI's list and Anthropic's cursor page (`has_more`, `first_id`, `last_id`) read;
    the key may come as Anthropic's `x-api-key`, as the anthropic SDK's `models.list()` sends it."""
    _authorize(request, state, x_api_key=True)
    cards = [e.card() for e in state.models.entries.values()]
    return JSONResponse({"object": "list", "data": cards, "has_more": False,
                         "first_id": cards[0]["id"] if cards else None,
                         "last_id": cards[-1]["id"] if cards else None})


async def get_model(request: Request, state: _State) -> Response:
    _authorize(request, state, x_api_key=True)
    return JSONResponse(state.models.entry(request.path_params["model_id"]).card())


async def load_model(request: Request, state: _State) -> Response:
    """Load a model now (a failed one is tried again) → its card; 500 naming the file."""
    _authorize(request, state)
    entry = state.models.entry(request.path_params["model_id"])
    await run_in_threadpool(functools.partial(state.models.ensure_loaded, entry, retry=True))
    return JSONResponse(entry.card())


async def unload_model(request: Request, state: _State) -> Response:
    """Stop a model's engine now → its card; 409 while requests use it; 400 under
    --api-workers, where the model lives in the engine process all workers share, and in a
    Ray Serve replica with --engine-process, where it lives in the replica's engine child."""
    _authorize(request, state)
    entry = state.models.entry(request.path_params["model_id"])
    # stopping this process's client would free nothing: the engine process keeps the model
    if state.options.api_workers > 1:
        raise InvalidRequestError(
            f"Unloading is not supported with --api-workers: the model `{entry.id}` lives in the engine "
            "process every HTTP worker shares and stays loaded until the server stops (serve without "
            "--api-workers to unload models at run time).", code="unload_not_supported")
    if state.options.engine_process_in_effect:
        raise InvalidRequestError(
            f"Unloading is not supported with --engine-process: the model `{entry.id}` lives in each "
            "replica's engine process and stays loaded until the replica stops (serve with "
            "--no-engine-process to unload models at run time).", code="unload_not_supported")
    await run_in_threadpool(state.models.unload, entry)
    return JSONResponse(entry.card())


async def tokenize(request: Request, state: _State) -> Response:
    """`{"prompt": str, "add_special_tokens"?: true}` or `{"messages": [...], "tools"?: [...],
    "add_generation_prompt"?: true, "continue_final_message"?: false}` → `{"tokens", "count",
    "max_model_len"}` (vLLM)."""
    _authorize(request, state)
    data = await read_json(request, state.options.max_body_bytes)
    engine = await _engine(request, state, data.get("model"))
    tokenizer = engine.tokenizer
    if "messages" in data:
        req = parse_request(ChatCompletionRequest, {k: data[k] for k in (
            "messages", "tools", "chat_template_kwargs", "add_generation_prompt", "continue_final_message")
            if k in data})
        special = _flag(data, "add_special_tokens", False)

        def encode() -> list[int]:
            check_fits(tokenizer, "".join(m.content or "" for m in req.messages), engine.max_length,
                       what="messages", param="messages")
            text, ids = encode_chat(tokenizer, req, state.options)
            if special and getattr(tokenizer, "add_bos", False) and ids[:1] != [tokenizer.bos_id]:
                ids = [tokenizer.bos_id, *ids]  # as Tokenizer.encode: BOS once, if wanted
            return ids
    else:
        prompt = data.get("prompt", data.get("content"))  # llama-server says "content"
        if not isinstance(prompt, str):
            raise InvalidRequestError("'prompt' must be a string (or send 'messages').", param="prompt",
                                      code="invalid_type")
        special = _flag(data, "add_special_tokens", True)

        def encode() -> list[int]:
            check_fits(tokenizer, prompt, engine.max_length, what="prompt", param="prompt")
            return tokenizer.encode(prompt, add_special_tokens=special)
    tokens = await run_in_threadpool(encode)
    return JSONResponse({"tokens": tokens, "count": len(tokens), "max_model_len": engine.max_length})


async def detokenize(request: Request, state: _State) -> Response:
    """`{"tokens": [int, ...]}` → `{"content": text, "prompt": text}` (llama-server, vLLM)."""
    _authorize(request, state)
    data = await read_json(request, state.options.max_body_bytes)
    engine = await _engine(request, state, data.get("model"))
    tokens = data.get("tokens")
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool)
                                               for t in tokens):
        raise InvalidRequestError("'tokens' must be a list of token ids.", param="tokens",
                                  code="invalid_type")
    check_token_ids(tokens, engine.vocab_size, param="tokens")
    text = await run_in_threadpool(engine.tokenizer.decode, tokens, skip_special_tokens=False)
    # llama-server's key is "content", vLLM's "prompt": both, so either client works.
    return JSONResponse({"content": text, "prompt": text})


def _flag(data: dict[str, Any], name: str, default: bool) -> bool:
    value = data.get(name, default)
    if not isinstance(value, bool):
        raise InvalidRequestError(f"'{name}' must be a boolean.", param=name, code="invalid_type")
    return value


# ----------------------------------------------------------------- shared checks


def _authorize(request: Request, state: _State, *, x_api_key: bool = False) -> None:
    """`--api-key` as `Authorization: Bearer KEY`, or (Anthropic routes) as `x-api-key: KEY`."""
    key = state.options.api_key
    if key is None:
        return
    if x_api_key and "x-api-key" in request.headers:
        if not hmac.compare_digest(request.headers["x-api-key"].strip().encode(), key.encode()):
            raise AuthenticationError("Incorrect API key provided.", code="invalid_api_key")
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        how = "'x-api-key: YOUR_KEY' (or 'Authorization: Bearer YOUR_KEY')" if x_api_key else \
            "'Authorization: Bearer YOUR_KEY'"
        raise AuthenticationError(
            f"You didn't provide an API key. Send it as {how}.",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise AuthenticationError(
            "Incorrect API key provided.", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}
        )


_LEASES = "llorch.leases"  # request.scope key: the models a request holds until its route returns


async def _engine(request: Request, state: _State, model: Any, *, generating: bool = False) -> EngineLike:
    """The engine of the model a request names (None: the default), loaded first if need be
    (the request waits; others keep flowing). The request holds the model until its route
    returns, so it is not evicted between this lookup and the submission.

    Raises:
        NotFoundError: no such model (404); InvalidRequestError: `model` not a string.
        ServiceUnavailableError: draining, the startup load still running, or no room.
        ModelLoadFailed: the model's files could not be loaded (500 naming the file).
    """
    entry = state.models.entry(model)
    if generating and state.draining:
        raise ServiceUnavailableError("The server is shutting down; retry on another instance.",
                                      code="shutting_down")
    if not state.started:
        raise ServiceUnavailableError(
            "The model is still loading; retry when /health answers 200.", code="model_loading",
            headers={"Retry-After": "1"})
    engine = state.models.lease(entry)
    request.scope.setdefault(_LEASES, []).append(entry)
    if engine is None:
        engine = await run_in_threadpool(state.models.ensure_loaded, entry)
    return engine


def _check_admissible(n_requests: int, engine: EngineLike, state: _State) -> None:
    """400 for more engine requests (completions prompts) than the slots plus the queue can
    ever hold at once: a 429 would tell the client to retry what can never succeed."""
    slots = getattr(engine, "n_slots", None)
    if not isinstance(slots, int):
        return
    room = slots + state.options.max_queue
    if n_requests > room:
        raise InvalidRequestError(
            f"This request has {n_requests} prompts, but this server can hold at most {room} "
            f"requests at once ({slots} running + --max-queue {state.options.max_queue} waiting). "
            "Send fewer prompts per request.",
            param="prompt", code="too_many_prompts")


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


class _StripTrailingSlash:
    """`/v1/chat/completions/` is `/v1/chat/completions`: answered, not redirected (a 307
    makes some clients drop the POST body or the Authorization header)."""

    def __init__(self, app: Callable[..., Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and len(path) > 1 and path.endswith("/"):
            scope = {**scope, "path": path.rstrip("/") or "/"}
            if scope.get("raw_path"):
                scope["raw_path"] = scope["raw_path"].rstrip(b"/") or b"/"
        await self.app(scope, receive, send)


# ------------------------------------------------------------------ generation routes


async def chat_completions(request: Request, state: _State) -> Response:
    _authorize(request, state)
    req = parse_request(ChatCompletionRequest, await read_json(request, state.options.max_body_bytes))

    def output(engine: EngineLike, params: SamplingParams, prompt_ids: list[int],
               make_parser: Callable[[], ChoiceParser]) -> Output:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return ChatOutput(new_id("chatcmpl"), engine.model_id, params.n, engine.tokenizer.token_text,
                          logprobs=bool(req.logprobs), include_usage=include_usage,
                          make_parser=make_parser, legacy_functions=req.functions is not None,
                          **_output_extras(engine, state))

    return await generate_chat(request, state, req, output)


MakeOutput = Callable[[EngineLike, SamplingParams, list[int], Callable[[], ChoiceParser]], Output]


async def generate_chat(request: Request, state: _State, req: ChatCompletionRequest, make_output: MakeOutput,
                        *, param: str = "messages", clamp_to_context: bool = False) -> Response:
    """The chat path every chat-shaped wire format ends in: prompt (chat template) →
    checks → `Engine.submit` → `respond`. `make_output(engine, params, prompt_ids,
    make_parser)` builds the renderer (`make_parser()`: a fresh output parser for a choice);
    `param` names the request field a too-long prompt is blamed on. `clamp_to_context`
    (Anthropic's rule): a completion limit past the context left after the prompt is cut to
    it instead of a 400 (`params.max_tokens` then says where the reply will stop)."""
    engine = await _engine(request, state, req.model, generating=True)
    # Prompt, grammar (tools or response_format; compiled and cached here, off the engine
    # thread) and the per-choice output parser.
    prepared = await run_in_threadpool(prepare_chat, engine.tokenizer, req, state.options,
                                       engine.max_length)
    max_tokens = req.requested_max_tokens()
    room = engine.max_length - len(prepared.prompt_ids)
    if clamp_to_context and max_tokens is not None and 0 < room < max_tokens:
        max_tokens = room
    check_context(
        prompt_tokens=len(prepared.prompt_ids),
        max_tokens=max_tokens,
        max_length=engine.max_length,
        what=param,
        param=param,
    )
    return await _generate(
        request, state, engine, req, max_tokens, [(prepared.prompt_text, prepared.prompt_ids)],
        lambda params: make_output(engine, params, prepared.prompt_ids, prepared.make_parser),
        grammar=prepared.grammar, grammar_prefix=prepared.grammar_prefix)


async def _generate(request: Request, state: _State, engine: EngineLike,
                    req: ChatCompletionRequest | CompletionRequest, max_tokens: int | None,
                    prompts: list[tuple[str, list[int]]], make_output: Callable[[SamplingParams], Output],
                    *, grammar: str | None, prompt_logprobs: int | None = None,
                    grammar_prefix: tuple[int, ...] = ()) -> Response:
    """The tail of both generation routes, after the prompts are tokenized and checked
    against the context: the request becomes engine types here (`to_sampling_params`), one
    `GenerationRequest` per prompt goes to `Engine.submit`, and `respond` answers (JSON or SSE).

    Args:
        req: the validated request; max_tokens: its completion length, decided once by the
            route (`requested_max_tokens()`).
        prompts: (prompt text, token ids) per engine request; the text only for the prompt
            log ("" for token-id prompts, decoded then).
        make_output: the response renderer for these sampling settings.
        grammar: the compiled output constraint, or None; prompt_logprobs: completions
            `echo` + `logprobs`; grammar_prefix: token ids the grammar reads first (a prefill
            it covers, `PreparedChat.grammar_prefix`).

    Raises:
        InvalidRequestError: a `logit_bias`, `stop_token_ids` or `allowed_token_ids` token
            outside the vocabulary; `allowed_token_ids` that `min_tokens` leaves empty;
            a `min_tokens` that does not fit the context after the prompt.
        RateLimitError, ServiceUnavailableError: as `_submit`.
    """
    params = req.to_sampling_params(max_tokens)
    check_token_ids(list(params.logit_bias), engine.vocab_size, param="logit_bias")
    check_token_ids(params.stop_token_ids, engine.vocab_size, param="stop_token_ids")
    check_token_ids(params.allowed_token_ids or (), engine.vocab_size, param="allowed_token_ids")
    check_allowed_vs_min_tokens(params, engine.tokenizer.eos_ids)
    longest = max((len(ids) for _, ids in prompts), default=0)
    if longest + params.min_tokens > engine.max_length:  # max_tokens, when given, was checked
        raise InvalidRequestError(
            f"Invalid 'min_tokens': {params.min_tokens} tokens do not fit the context: this "
            f"model's maximum context length is {engine.max_length} tokens and the prompt has "
            f"{longest}.", param="min_tokens", code="context_length_exceeded")
    out = make_output(params)
    if state.options.log_prompts:
        for k, (text, ids) in enumerate(prompts):
            log.info("request %s prompt %d: %r", out.id, k,
                     text or engine.tokenizer.decode(ids, skip_special_tokens=False))
    streams = _submit(engine, [GenerationRequest(tuple(ids), params, prompt_logprobs, request_id=out.id,
                                                 grammar=grammar, grammar_prefix=grammar_prefix)
                               for _, ids in prompts])
    return await respond(request, streams, out, streaming=bool(req.stream))


def check_allowed_vs_min_tokens(params: SamplingParams, eos_ids: Collection[int]) -> None:
    """Raises InvalidRequestError (naming `allowed_token_ids`) where every allowed id ends the
    choice (an EOS, unless `ignore_eos`, or a `stop_token_ids` id) and `min_tokens` > 0 keeps
    them all out: the sampler would find no token and fall back to the unmasked logits,
    emitting ids outside the list."""
    allowed = params.allowed_token_ids
    if not params.min_tokens or allowed is None:
        return
    if set(allowed) <= params.ending_ids(eos_ids):
        raise InvalidRequestError(
            f"Invalid 'allowed_token_ids': every id it lists ends the choice (EOS or "
            f"stop_token_ids), and min_tokens ({params.min_tokens}) forbids those before "
            f"{params.min_tokens} tokens, so no token could be sampled. Allow other ids too, "
            f"or drop min_tokens.",
            param="allowed_token_ids", code="invalid_value")


def _output_extras(engine: EngineLike, state: _State) -> dict[str, Any]:
    """What every response carries besides the choices: token bytes for logprobs, and the
    system fingerprint."""
    return {"token_bytes": getattr(engine.tokenizer, "token_bytes", None),
            "fingerprint": engine.fingerprint}


async def completions(request: Request, state: _State) -> Response:
    _authorize(request, state)
    req = parse_request(CompletionRequest, await read_json(request, state.options.max_body_bytes))
    engine = await _engine(request, state, req.model, generating=True)
    _check_admissible(len(req.prompt), engine, state)
    max_tokens = req.requested_max_tokens()
    # Prompt ids and the output constraint's grammar (compiled into the cache) off the loop.
    prompts, grammar = await run_in_threadpool(
        lambda: (_completion_prompts(engine.tokenizer, req, engine.max_length, max_tokens),
                 _grammar(req, engine.tokenizer)))
    for _, ids in prompts:
        check_token_ids(ids, engine.vocab_size, param="prompt")
        check_context(prompt_tokens=len(ids), max_tokens=max_tokens,
                      max_length=engine.max_length, what="prompt", param="prompt")
    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    def output(params: SamplingParams) -> Output:
        return CompletionOutput(new_id("cmpl"), engine.model_id, params.n, engine.tokenizer.token_text,
                                logprobs=req.logprobs is not None, include_usage=include_usage,
                                echo=[(t, ids) for t, ids in prompts] if req.echo else None,
                                n_prompts=len(prompts), **_output_extras(engine, state))

    return await _generate(request, state, engine, req, max_tokens, prompts, output, grammar=grammar,
                           prompt_logprobs=req.logprobs if req.echo else None)


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


def _completion_prompts(tokenizer: Any, req: CompletionRequest, max_length: int,
                        max_tokens: int | None) -> list[tuple[str, list[int]]]:
    for prompt in req.prompt:  # refuse what cannot fit before tokenizing any of it
        if isinstance(prompt, str):
            check_fits(tokenizer, prompt, max_length, what="prompt", param="prompt")
    prompts = []
    for prompt in req.prompt:
        if isinstance(prompt, str):
            prompts.append((prompt, tokenizer.encode(prompt)))
            # stop at the first prompt that does not fit: tokenizing the rest is wasted work
            check_context(prompt_tokens=len(prompts[-1][1]), max_tokens=max_tokens,
                          max_length=max_length, what="prompt", param="prompt")
        else:
            text = tokenizer.decode(prompt, skip_special_tokens=False) if req.echo else ""
            prompts.append((text, list(prompt)))
    return prompts


# ------------------------------------------------- other wire formats over the chat path


async def create_response(request: Request, state: _State) -> Response:
    """`POST /v1/responses` (serve.api_responses)."""
    _authorize(request, state)
    req = api_responses.parse_body(ResponsesRequest, await read_json(request, state.options.max_body_bytes))
    req.check()
    history = _response_history(req, state)
    body = req.chat_body(history)
    chat = _renamed(req.renamer, parse_request, ChatCompletionRequest, body)
    conversation = [*history, *req.input_messages()]
    items = tuple(api_responses.input_items(req.input))

    stored = req.store is not False and state.responses.capacity > 0

    def store(response: dict[str, Any]) -> None:
        if stored:
            output = api_responses.output_messages(response["output"])
            state.responses.put(response["id"], StoredResponse(response, (*conversation, *output), items))

    def output(engine: EngineLike, params: SamplingParams, prompt_ids: list[int],
               make_parser: Callable[[], ChoiceParser]) -> Output:
        return ResponsesOutput(api_responses.new_item_id("resp"), engine.model_id, engine.tokenizer.token_text,
                               echo={**req.echo(), "store": stored}, logprobs=req.logprobs, on_done=store,
                               make_parser=make_parser,
                               token_bytes=getattr(engine.tokenizer, "token_bytes", None))

    return await _renamed_async(req.renamer, generate_chat(request, state, chat, output, param="input"))


def _response_history(req: ResponsesRequest, state: _State) -> list[dict[str, Any]]:
    """The chat messages of `req.previous_response_id`'s conversation ([] without one).

    Raises:
        NotFoundError: the id is unknown, evicted, or a Messages thread's.
    """
    if req.previous_response_id is None:
        return []
    previous = state.responses.get(req.previous_response_id)
    if not isinstance(previous, StoredResponse):
        raise NotFoundError(f"Previous response with id '{req.previous_response_id}' not found.",
                            param="previous_response_id")
    return list(previous.conversation)


async def count_response_tokens(request: Request, state: _State) -> Response:
    """`POST /v1/responses/input_tokens` → `{"object": "response.input_tokens", "input_tokens": n}`:
    the prompt a `POST /v1/responses` with this body would run (instructions, the
    `previous_response_id` history, input, tools)."""
    _authorize(request, state)
    req = api_responses.parse_body(InputTokensRequest, await read_json(request, state.options.max_body_bytes))
    req.check()
    body = req.chat_body(_response_history(req, state))
    chat = _renamed(req.renamer, parse_request, ChatCompletionRequest, body)
    engine = await _engine(request, state, chat.model)
    prepared = await _renamed_async(req.renamer, run_in_threadpool(prepare_chat, engine.tokenizer, chat,
                                                                   state.options, engine.max_length))
    return JSONResponse({"object": "response.input_tokens", "input_tokens": len(prepared.prompt_ids)})


async def compact_response(request: Request, state: _State) -> Response:
    """`POST /v1/responses/compact` (the openai SDK's `responses.compact`): server-side
    compaction is not done here (as `context_management` compaction is refused); a 400 that
    says so, where the path read as a response id answered 405 "allowed: HEAD, GET"."""
    _authorize(request, state)
    raise InvalidRequestError("Compacting a conversation is not supported by this server; send the "
                              "conversation itself (or continue it with 'previous_response_id').", param=None)


T = TypeVar("T")


def _renamed(renamer: Renamer, fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)`, its `APIError`s naming the route's own fields (serve.param_names)."""
    try:
        return fn(*args)
    except APIError as exc:
        raise renamer.rename(exc) from None


async def _renamed_async(renamer: Renamer, work: Awaitable[T]) -> T:
    """`await work`, its `APIError`s (before a response starts) naming the route's own fields."""
    try:
        return await work
    except APIError as exc:
        raise renamer.rename(exc) from None


def _stored_response(request: Request, state: _State) -> tuple[str, StoredResponse | None]:
    _authorize(request, state)
    response_id = request.path_params["response_id"]
    stored = state.responses.get(response_id)
    return response_id, stored if isinstance(stored, StoredResponse) else None  # not a Messages thread


async def get_response(request: Request, state: _State) -> Response:
    """`GET /v1/responses/{id}`: the stored response. `?stream=true` (the openai SDK's
    `responses.retrieve(id, stream=True)`) streams a background response's events at OpenAI;
    this server runs none, and answering JSON there left the SDK an empty stream: a 400."""
    response_id, stored = _stored_response(request, state)
    if stored is None:
        raise NotFoundError(f"Response with id '{response_id}' not found.", param="response_id")
    stream = request.query_params.get("stream", "false")
    if stream == "true":
        raise InvalidRequestError("Only responses created with 'background': true can be streamed again; this "
                                  "server does not run background responses: retrieve it without 'stream'.",
                                  param="stream")
    if stream != "false":
        raise InvalidRequestError("Invalid 'stream': expected true or false.", param="stream", code="invalid_type")
    return JSONResponse(stored.body)


async def list_input_items(request: Request, state: _State) -> Response:
    """`GET /v1/responses/{id}/input_items?order=desc&limit=20&after=ID`: the stored response's
    `input` items, as OpenAI's cursor page."""
    response_id, stored = _stored_response(request, state)
    if stored is None:
        raise NotFoundError(f"Response with id '{response_id}' not found.", param="response_id")
    query = request.query_params
    try:
        limit = int(query.get("limit", "20"))
    except ValueError:
        raise InvalidRequestError("Invalid 'limit': expected an integer.", param="limit") from None
    return JSONResponse(api_responses.list_page(list(stored.input_items), order=query.get("order", "desc"),
                                                limit=limit, after=query.get("after")))


async def cancel_response(request: Request, state: _State) -> Response:
    """`POST /v1/responses/{id}/cancel`: only background responses can be cancelled, and this
    server makes none (`background` is refused), so a stored response is a 400, others 404."""
    response_id, stored = _stored_response(request, state)
    if stored is None:
        raise NotFoundError(f"Response with id '{response_id}' not found.", param="response_id")
    raise InvalidRequestError("Only responses created with 'background': true can be cancelled; this "
                              "server does not run background responses.", param="response_id")


async def delete_response(request: Request, state: _State) -> Response:
    _authorize(request, state)
    response_id = request.path_params["response_id"]
    if not isinstance(state.responses.get(response_id), StoredResponse) or not state.responses.delete(response_id):
        raise NotFoundError(f"Response with id '{response_id}' not found.", param="response_id")
    return JSONResponse({"id": response_id, "object": "response", "deleted": True})


async def create_message(request: Request, state: _State) -> Response:
    """`POST /v1/messages` (serve.api_messages); errors in Anthropic's shape."""
    _authorize(request, state, x_api_key=True)
    req = parse_request(MessagesRequest, await read_json(request, state.options.max_body_bytes))
    req.check()
    previous = _resume_thread(req, state, reserve=True)
    if previous is None:
        return await _create_message(request, state, req, previous)
    # Each reply is continued once: this request holds the continuation from here (one atomic
    # `reserve`) until it has answered; one that fails first hands it back
    reserved = req.continues
    try:
        response = await _create_message(request, state, req, previous)
    except BaseException:
        state.responses.release(reserved)
        raise
    when_sent(response, lambda: state.responses.release(reserved))
    return response


async def _create_message(request: Request, state: _State, req: MessagesRequest,
                          previous: StoredThread | None) -> Response:
    body = req.chat_body()
    chat = _renamed(req.renamer, parse_request, ChatCompletionRequest, body)

    def keep_thread(message: dict[str, Any]) -> None:
        # `thread`: the conversation with this reply, under its id; the reply continued is spent
        state.responses.put(message["id"], api_messages.thread_after(req, message))
        if req.continues is not None and previous is not None:
            state.responses.put(req.continues, replace(previous, messages=(), continued=True))

    def output(engine: EngineLike, params: SamplingParams, prompt_ids: list[int],
               make_parser: Callable[[], ChoiceParser]) -> Output:
        return MessagesOutput(api_messages.new_message_id(), engine.model_id, engine.tokenizer.token_text,
                              prompt_tokens=len(prompt_ids), make_parser=make_parser,
                              on_done=keep_thread if req.thread is not None else None,
                              context_cut=params.max_tokens is not None and params.max_tokens < req.max_tokens)

    # As Anthropic's API: max_tokens may exceed the context left after the prompt; the reply
    # then stops at the context's end with stop_reason "model_context_window_exceeded"
    return await _renamed_async(req.renamer, generate_chat(request, state, chat, output, clamp_to_context=True))


def _resume_thread(req: MessagesRequest, state: _State, *, reserve: bool = False) -> StoredThread | None:
    """A `thread: continue` request made whole (`api_messages.resume_thread`); the thread
    it continues, or None for other requests. `reserve`: the reply continued is marked as
    being continued (`ResponseStore.reserve`; the caller releases it), and one that another
    request in flight continues is a 400 `thread_already_continued`."""
    if req.continues is None:
        return None
    previous = state.responses.get(req.continues)
    if not (reserve and isinstance(previous, StoredThread)):
        api_messages.resume_thread(req, previous)
        return previous if isinstance(previous, StoredThread) else None
    held = state.responses.reserve(req.continues)
    try:
        api_messages.resume_thread(req, previous, in_flight=not held)
    except BaseException:
        if held:
            state.responses.release(req.continues)
        raise
    return previous


async def count_message_tokens(request: Request, state: _State) -> Response:
    """`POST /v1/messages/count_tokens` → `{"input_tokens": n}`: the prompt's length."""
    _authorize(request, state, x_api_key=True)
    req = parse_request(CountTokensRequest, await read_json(request, state.options.max_body_bytes))
    req.check()
    _resume_thread(req, state)  # a `continue` counts the whole conversation
    body = req.chat_body()
    chat = _renamed(req.renamer, parse_request, ChatCompletionRequest, body)
    engine = await _engine(request, state, chat.model)
    prepared = await _renamed_async(req.renamer, run_in_threadpool(prepare_chat, engine.tokenizer, chat,
                                                                   state.options, engine.max_length))
    return JSONResponse({"input_tokens": len(prepared.prompt_ids)})
