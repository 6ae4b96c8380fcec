"""`--ray-ingress haproxy`: clients reach each replica's own HTTP server through the HAProxy
that Ray Serve bundles ("direct ingress"), instead of through Ray's Python HTTP proxy and the
`Ingress` deployment.

```
client ─► HAProxy (C, on --host/--port) ─────────────────► DirectReplica's HTTP server (Ray
             │ POST: its Lua asks /internal/route first        starts one per replica) ─►
             ▼                                                  the single-process app
          Route (a deployment): the replicas' request router
          (PrefixAffinityRouter) picks one; HAProxy sends the request there
```

No response byte crosses Ray or a Python proxy: a stream goes from the replica's uvicorn to
HAProxy to the client, as from one process. A client that goes away closes HAProxy's
connection to the replica, and the app cancels the request as it does for a direct client.

What the replicas answer themselves, as the ingress does on the proxy path: `/health` (the
deployment's state from the `Registry`), `/metrics` (every replica's, labelled), and 503
`shutting_down` once the driver drains. What is lost: a replica that dies mid-stream cuts its
connection (HAProxy cannot append the `replica_died` error event the proxy path sends; the
client sees the stream end without `[DONE]`), and every POST waits for the Route's pick. With
no replica running, nothing here answers: clients get Ray's HAProxy's own answers (a
`text/plain` 500 or 503, or a wait on Ray's fallback proxy; see README "Scaling out"), which
come from Ray's config template, not from anything llorch can set.

Ray reads the switches from the environment of every Ray process when it imports
`ray.serve` (`serve.scale.environment`), so `serve.main` sets them before Ray is imported.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from ray import serve

from serve.errors import APIError
from serve.options import ServeOptions
from serve.scale.forward import complete_lifespan, json_object, routing_text
from serve.scale.ingress import DRAIN_POLL_S, health_response, metrics_response, send_error
from serve.scale.replica import Replica

log = logging.getLogger("serve.scale.direct")

ROUTE_PATH = "/internal/route"  # what HAProxy's Lua asks (ray/serve/_private/ingress_request_router.lua.tmpl)


class DirectReplica(Replica):
    """A `Replica` that Ray Serve deploys as the application's ingress: Ray runs an HTTP
    server in it (direct ingress) and serves `__serve_build_asgi_app__`'s app there.
    Same constructor arguments as `Replica`, plus the served `ServeOptions` for `/metrics`."""

    async def __init__(self, options: ServeOptions, model_name: str, registry: Any) -> None:
        await super().__init__(options, model_name, registry)
        self._options = options
        self._watch = asyncio.create_task(self._watch_draining())

    async def _watch_draining(self) -> None:
        """The driver's drain (SIGTERM) reaches the app: it answers 503 from then on."""
        while not self._state.draining:
            await asyncio.sleep(DRAIN_POLL_S)
            try:
                if await self._registry.draining.remote():
                    self._state.draining = True
            except Exception:  # the registry is gone: the application is going away
                self._state.draining = True

    def __serve_build_asgi_app__(self) -> Any:
        async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
            await self._direct(scope, receive, send)
        return asgi

    async def _direct(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":  # the app's own lifespan ran in the constructor
            return await complete_lifespan(receive, send)
        if scope["type"] == "http" and scope["method"] == "GET":
            path = scope["path"].rstrip("/")
            try:
                if path == "/health":
                    return await health_response(self._registry, self._state.draining, send)
                if path == "/metrics":
                    return await metrics_response(self._registry, self._options, scope, send)
            except APIError as exc:  # a /metrics key that does not match
                return await send_error(send, path, exc)
        await self._app(scope, receive, send)


class Route:
    """The ingress request router HAProxy consults: POST /internal/route with a request's
    body, answered `{"host", "port", "replica_id"}` of the replica the replicas' request
    router picks (`DeploymentHandle.choose_replica`, without reserving a slot: the request
    itself goes through HAProxy). The body's routing text is `serve.scale.forward.routing_text`
    of the chat, Responses or completions request it looks like.

    Args:
        replicas: DeploymentHandle of the `DirectReplica` deployment.
    """

    def __init__(self, replicas: Any) -> None:
        self._replicas = replicas
        self._replicas._init()

    def __serve_build_asgi_app__(self) -> Any:
        async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
            await self._asgi(scope, receive, send)
        return asgi

    async def _asgi(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            return await complete_lifespan(receive, send)
        if scope["type"] != "http":
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        prompt = routing_text(_path_of(bytes(body)), bytes(body))
        async with self._replicas.choose_replica(_Routed(prompt), _reserve=False) as chosen:
            replica = chosen._replica  # Ray's LLMRouter reads the same private field
            host, port = replica.backend_http_endpoint
            answer = {"host": host, "port": port, "replica_id": replica.replica_id.to_full_id_str()}
        raw = json.dumps(answer).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(raw)).encode())]})
        await send({"type": "http.response.body", "body": raw})


class _Routed:
    """What `PrefixAffinityRouter` reads from a request's arguments: its routing text."""

    def __init__(self, prompt: str) -> None:
        self.prompt = prompt


def _path_of(body: bytes) -> str:
    """The generating path a body belongs to, from its fields (HAProxy forwards the body
    alone): `messages` → chat, `input` → Responses, else completions."""
    data = json_object(body)
    if data is None:
        return ""
    if "messages" in data:
        return "/v1/chat/completions"
    return "/v1/responses" if "input" in data else "/v1/completions"


def route_deployment() -> Any:
    """The `Route` deployment: one replica, no CPU (it only picks)."""
    return serve.deployment(serve.ingress()(Route), name="llorch-route").options(
        num_replicas=1, max_ongoing_requests=100_000, ray_actor_options={"num_cpus": 0})
