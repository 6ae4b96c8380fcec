"""`Ingress`: the deployment behind Ray Serve's HTTP proxy. It reads each request's body,
takes its routing text and hands it to the replicas' DeploymentHandle (whose router is
`serve.scale.router.PrefixAffinityRouter`), then streams the replica's answer back as it
comes. It answers `/health` (the deployment's state) and `/metrics` (every replica's llorch
metrics, labelled `replica`) itself, from the `Registry`.

Faults: a replica that dies before it answered gets the request retried once on another;
one that dies mid-stream ends the stream with the wire format's final error event
(`serve.scale.forward.stream_error`); a client that goes away cancels the replica's call,
which frees its slot. A request that no replica can take (every replica dead) is answered
503 `no_replicas` with `Retry-After` once the handle's router has known
no running replica for `NO_REPLICA_WAIT_S` (Ray's router would hold it until one exists:
a minute and more while Ray restarts them); with scale-to-zero (`--min-replicas 0`) it
waits, as a cold start must.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from functools import partial
from typing import Any

from ray.exceptions import RayActorError
from ray.serve.exceptions import RequestCancelledError

from serve.api_messages import error_body
from serve.errors import (
    GENERIC_SERVER_ERROR,
    APIError,
    AuthenticationError,
    PayloadTooLargeError,
    ServerError,
    ServiceUnavailableError,
)
from serve.metrics import CONTENT_TYPE
from serve.options import ServeOptions
from serve.request_id import without_x_request_id
from serve.scale.forward import (
    ForwardedRequest,
    complete_lifespan,
    merge_metrics,
    routing_text,
    stream_error,
)

log = logging.getLogger("serve.scale.ingress")

DRAIN_POLL_S = 0.25
REPLICA_DIED = "The replica serving this request stopped; retry the request."
NO_REPLICA_WAIT_S = 3.0  # no running replica this long while a request waits: 503 no_replicas
NO_REPLICA_POLL_S = 0.25
NO_REPLICAS = ("No replica of this model is running (they are starting or being restarted); "
               "retry shortly.")


class Ingress:
    """A Ray Serve ASGI deployment (made one by `serve.scale.ray_app` with `serve.ingress`).

    Args:
        replicas: DeploymentHandle of the `Replica` deployment.
        registry: the `Registry` actor handle.
        options: the served `ServeOptions` (body limit, API key for `/metrics`).
    """

    async def __init__(self, replicas: Any, registry: Any, options: ServeOptions) -> None:
        self._replicas = replicas.options(stream=True)  # also starts its router (Ray 2.60)
        self._registry = registry
        self._options = options
        # Scale-to-zero: a request with no replica running is what starts one (a cold start).
        self._wait_for_replicas = options.replicas is None and options.min_replicas == 0
        self._draining = False
        self._watch = asyncio.create_task(self._watch_draining())

    async def _watch_draining(self) -> None:
        while not self._draining:
            await asyncio.sleep(DRAIN_POLL_S)
            try:
                self._draining = await self._registry.draining.remote()
            except Exception:  # the registry is gone: the application is going away
                self._draining = True

    def __serve_build_asgi_app__(self) -> Any:
        return _ASGI(self._asgi)

    async def _asgi(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await complete_lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        try:
            if method == "GET" and path.rstrip("/") == "/health":
                return await self._health(send)
            if method == "GET" and path.rstrip("/") == "/metrics":
                return await self._metrics(scope, send)
            if self._draining:
                raise ServiceUnavailableError("The server is shutting down; retry elsewhere.",
                                              code="shutting_down")
            body = await _read_body(receive, self._options.max_body_bytes)
        except APIError as exc:
            return await send_error(send, path, exc)
        if body is None:
            return  # the client left while sending
        request = ForwardedRequest(
            method=method, path=path, query_string=scope.get("query_string", b""),
            headers=list(scope.get("headers", [])), body=body,
            client=tuple(scope["client"]) if scope.get("client") else None,
            prompt=routing_text(path, body))
        await self._forward(request, receive, send)

    async def _forward(self, request: ForwardedRequest, receive: Any, send: Any) -> None:
        error: APIError = ServiceUnavailableError(REPLICA_DIED, code="replica_died",
                                                  headers={"Retry-After": "1"})
        started = False
        for attempt in (1, 2):  # a second replica when the first died before answering
            call = self._replicas.handle.remote(request)
            watcher = asyncio.create_task(_wait_disconnect(receive))
            watcher.add_done_callback(partial(_cancel_if_gone, call))
            try:
                chunks = aiter(call)
                first = await self._first_chunk(call, chunks)
                async for chunk in _chained(first, chunks):  # a list of parts (serve.scale.coalesce)
                    for part in chunk:
                        if part[0] == "start":
                            await send({"type": "http.response.start", "status": part[1],
                                        "headers": without_x_request_id(part[2])})
                            started = True
                        else:
                            await send({"type": "http.response.body", "body": part[1],
                                        "more_body": True})
                if started:
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                    return
                raise RuntimeError("the replica ended the request without a response")
            except RayActorError:
                log.warning("a replica died while serving %s %s (%s)", request.method,
                            request.path, "mid-response" if started else f"attempt {attempt}")
                if started:
                    await send({"type": "http.response.body", "more_body": False,
                                "body": stream_error(request.path, REPLICA_DIED, "replica_died")})
                    return
            except _NoReplicas:
                call.cancel()
                log.warning("no running replica for %g s: %s %s answered 503", NO_REPLICA_WAIT_S,
                            request.method, request.path)
                error = ServiceUnavailableError(NO_REPLICAS, code="no_replicas",
                                                headers={"Retry-After": "2"})
                break
            except asyncio.CancelledError:
                call.cancel()
                raise
            except RequestCancelledError:  # the client went away (upstream): nobody to answer
                return
            except Exception:
                log.exception("error forwarding %s %s", request.method, request.path)
                if started:
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                    return
                error = ServerError(GENERIC_SERVER_ERROR)
                break
            finally:
                watcher.cancel()
        await send_error(send, request.path, error)

    async def _first_chunk(self, call: Any, chunks: Any) -> Any:
        """The call's first item (None when it has none). Raises `_NoReplicas`
        when, before the call was given to a replica, the router has known no running
        replica for `NO_REPLICA_WAIT_S` (never with scale-to-zero)."""
        task = asyncio.ensure_future(anext(chunks))
        empty_since: float | None = None
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=NO_REPLICA_POLL_S)
                if done:
                    try:
                        return task.result()
                    except StopAsyncIteration:
                        return None
                if self._wait_for_replicas or _assigned(call) or running_replicas(self._replicas) != 0:
                    empty_since = None
                    continue
                now = time.monotonic()
                empty_since = empty_since or now
                if now - empty_since >= NO_REPLICA_WAIT_S:
                    raise _NoReplicas
        finally:
            if not task.done():
                task.cancel()

    async def _health(self, send: Any) -> None:
        await health_response(self._registry, self._draining, send,
                              running_replica_ids(self._replicas))

    async def _metrics(self, scope: dict[str, Any], send: Any) -> None:
        await metrics_response(self._registry, self._options, scope, send)


async def health_response(registry: Any, draining: bool, send: Any,
                          running: set[str] | None = None) -> None:
    """`/health` for the deployment, from the `Registry`: 200 with each replica's health when
    at least one replica is ready (and not `draining`), else 503. `running`: the replica ids
    Ray's router can send to (None: unknown); a replica outside it is not counted ready even
    while its last report (up to `STALE_S` old) says "ok": it was killed or is stopping."""
    replicas = {rid: {"node": node, **health}
                for rid, (node, health, _) in (await registry.snapshot.remote()).items()}
    if running is not None:
        for rid, health in replicas.items():
            if health.get("status") == "ok" and rid not in running:
                health["status"] = "gone"
    ready = sum(1 for h in replicas.values() if h.get("status") == "ok")
    status = "draining" if draining else "ok" if ready else "unavailable"
    ready = 0 if draining else ready
    await _send_json(send, 200 if ready else 503,
                     {"status": status, "ready_replicas": ready, "replicas": replicas})


async def metrics_response(registry: Any, options: ServeOptions, scope: dict[str, Any],
                           send: Any) -> None:
    """`/metrics`: every replica's llorch metrics, labelled `replica`. Raises
    AuthenticationError when `--protect-metrics` and the request's key does not match."""
    if options.protect_metrics:
        _authorize(scope, options.api_key or "")
    snapshot = await registry.snapshot.remote()
    text = merge_metrics({rid: t for rid, (_, _, t) in snapshot.items()})
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", CONTENT_TYPE.encode())]})
    await send({"type": "http.response.body", "body": text.encode()})


class _NoReplicas(Exception):
    """No running replica could take the request for `NO_REPLICA_WAIT_S`."""


def _router_replicas(handle: Any) -> list[Any] | None:
    """The replicas (`RunningReplica`) the handle's request router can send to now; None when
    that is unknown (the router has not started, or Ray's internals changed: the callers then
    behave as before, waiting on Ray). Ray 2.60: DeploymentHandle._router._asyncio_router
    ._request_router.curr_replicas (the router runs in a thread of its own: a copy)."""
    try:
        router = handle._router._asyncio_router._request_router
        return None if router is None else list(router.curr_replicas.values())
    except (AttributeError, RuntimeError):  # RuntimeError: changed while copied
        return None


def running_replicas(handle: Any) -> int | None:
    """How many replicas the handle's router can send to (None: unknown)."""
    replicas = _router_replicas(handle)
    return None if replicas is None else len(replicas)


def running_replica_ids(handle: Any) -> set[str] | None:
    """The unique ids (the `Registry`'s replica ids) of `_router_replicas` (None: unknown)."""
    replicas = _router_replicas(handle)
    try:
        return None if replicas is None else {r.replica_id.unique_id for r in replicas}
    except AttributeError:
        return None


def _assigned(call: Any) -> bool:
    """Whether Ray's router has given the call to a replica (unknown: True, so that nothing
    that may be running is cut). Ray 2.60: DeploymentResponseGenerator._replica_result_future."""
    future = getattr(call, "_replica_result_future", None)
    return future is None or future.done()


async def _chained(first: Any, rest: Any) -> Any:
    """`first` (unless None: the call had no item), then the rest of the async iterator."""
    if first is None:
        return
    yield first
    async for item in rest:
        yield item


class _ASGI:
    """A coroutine `__call__`, so uvicorn's lifespan code takes it for ASGI 3 (a bound
    method looks like ASGI 2 to it)."""

    def __init__(self, app: Any) -> None:
        self._app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        await self._app(scope, receive, send)


def _authorize(scope: dict[str, Any], key: str) -> None:
    headers = dict(scope.get("headers", []))
    given = headers.get(b"authorization", b"").decode("latin-1")
    if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
        raise AuthenticationError("Incorrect API key provided.", code="invalid_api_key")


async def _read_body(receive: Any, limit: int) -> bytes | None:
    """The whole request body; None when the client disconnected while sending.
    Raises PayloadTooLargeError past `limit` bytes."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLargeError(f"The request body is larger than {limit} bytes.",
                                       code="request_too_large")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _cancel_if_gone(call: Any, watcher: asyncio.Task) -> None:
    """The watcher's end: a disconnect cancels the replica's call (and frees its slot)."""
    if not watcher.cancelled() and watcher.exception() is None:
        call.cancel()


async def _wait_disconnect(receive: Any) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def send_error(send: Any, path: str, exc: APIError) -> None:
    """The error in the shape of the path's API: Anthropic's for /v1/messages, else OpenAI's."""
    body = error_body(exc) if path.rstrip("/").startswith("/v1/messages") else exc.body()
    await _send_json(send, exc.status_code, body, exc.headers)


async def _send_json(send: Any, status: int, body: dict[str, Any],
                     headers: dict[str, str] | None = None) -> None:
    raw = json.dumps(body).encode()
    pairs = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    pairs += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": pairs})
    await send({"type": "http.response.body", "body": raw})
