"""`Replica`: one Ray Serve replica = the single-process app (`serve.app.create_app` and its
engine thread), driven in-process through ASGI.

```
ingress ─ handle(ForwardedRequest) ─► receive(): the body, then waits for a disconnect
                                      app(scope, receive, send) ─ send(): start / body parts
        ◄─ [("start", …), ("body", …)] ◄ ChunkBuffer (serve.scale.coalesce): what the app
                                         sent since the last chunk, as one Ray item
```

The constructor pins the process to its own cores (CPU replicas with `--threads`), starts
the app's lifespan and returns only once the model has loaded, so Ray routes nothing to a
replica that cannot answer. A cancelled `handle` (the client went away, upstream) is the
app's `http.disconnect`: the app cancels the engine request and frees the slot, as it does
for a direct client. `check_health` fails once loading failed; Ray then replaces the replica.
Under load (`--stream-chunk-rate`) a stream's events gather for a few milliseconds and cross
Ray as one chunk; `llorch_ray_chunks_total` / `llorch_ray_body_messages_total` in `/metrics`
count what crossed against what the app sent.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

import ray
from prometheus_client import CollectorRegistry, Counter, generate_latest
from ray import serve

from serve.app import create_app, drain
from serve.frontend.client import MetricsProxy, RemoteResponseStore
from serve.main import load_engine
from serve.metrics import Metrics
from serve.options import ServeOptions
from serve.scale.coalesce import DEFAULT_CHUNK_RATE, ChunkBuffer, hold_seconds
from serve.scale.engine_process import EngineProcess
from serve.scale.forward import ForwardedRequest, ResponsePart
from serve.scale.registry import BEAT_S, STALE_S

log = logging.getLogger("serve.scale.replica")

# Ray Serve's actors' namespace (ray/serve/_private/constants.py SERVE_NAMESPACE); a replica's
# runtime context names its driver's namespace instead, where its actor name is not found.
SERVE_NAMESPACE = "serve"
EXIT_AFTER_LOST_S = 0.5  # --engine-process: time for the error events to go out after the child died
DISCONNECT_GRACE_S = 5.0  # after a disconnect, how long the app gets before its task is cancelled


class Replica:
    """A Ray Serve deployment class (made one by `serve.scale.ray_app`).

    Args:
        options: the replica's `ServeOptions` (`threads` = its ORT threads and cores).
        model_name: the served model id.
        registry: the `serve.scale.registry.Registry` actor handle.
    """

    async def __init__(self, options: ServeOptions, model_name: str, registry: Any) -> None:
        logging.basicConfig(level=options.log_level.upper(),
                            format="%(levelname)s %(name)s: %(message)s")
        context = serve.get_replica_context()
        self.replica_id = context.replica_id.unique_id
        runtime = ray.get_runtime_context()
        self.node_id = runtime.get_node_id()
        self._registry = registry
        self.cores: list[int] = []
        if options.provider == "cpu" and options.threads:
            # A replacement for a killed replica can start before the registry has noticed
            # the death (its last beat is fresh): ask again until the dead one goes stale.
            deadline = time.monotonic() + 2 * STALE_S  # its actor must be gone too: slower under load
            while True:
                self.cores = await registry.acquire_cores.remote(
                    self.replica_id, self.node_id, options.threads, sorted(os.sched_getaffinity(0)),
                    (runtime.get_actor_name(), SERVE_NAMESPACE) if runtime.get_actor_name() else None)
                if self.cores or time.monotonic() > deadline:
                    break
                await asyncio.sleep(BEAT_S)
            if self.cores:
                _pin_process(self.cores)
            else:
                log.warning("replica %s: fewer than %d free cores on this node; running unpinned",
                            self.replica_id, options.threads)
        self._chunk_rate = (DEFAULT_CHUNK_RATE if options.stream_chunk_rate is None
                            else options.stream_chunk_rate)
        self._in_flight = 0  # handle() calls running: sizes the coalescing window
        self._engine_process: EngineProcess | None = None
        if options.engine_process_in_effect:  # the engine in a child; here: HTTP, templates, SSE
            self._engine_process = EngineProcess(options, model_name, on_lost=self._engine_lost)
            client = self._engine_process.client
            self._metrics: Any = MetricsProxy(client)  # the child's registry renders
            self._own = CollectorRegistry()  # this process's counters, rendered beside it
            self._app = create_app(options, self._engine_process.connect, model_name=model_name,
                                   metrics=self._metrics,
                                   responses=RemoteResponseStore(client, options.responses_store_size))
        else:
            self._metrics = Metrics()
            self._own = self._metrics.registry
            self._app = create_app(options, partial(load_engine, options, self._metrics.observer(model_name)),
                                   model_name=model_name, metrics=self._metrics)
        self._chunks = Counter("llorch_ray_chunks", "Response chunks this replica sent through "
                               "Ray (each holds one or more of the app's body messages).",
                               registry=self._own)
        self._bodies = Counter("llorch_ray_body_messages", "Body messages (an SSE event each, "
                               "for a stream) the app sent.", registry=self._own)
        self._state = self._app.state.llorch
        self._lifespan = self._app.router.lifespan_context(self._app)
        await self._lifespan.__aenter__()
        self._ending: asyncio.Task | None = None  # ends the requests left once the drain is over
        self._beats = asyncio.create_task(self._beat_forever())
        while self._entry.engine is None and self._entry.error is None:
            await asyncio.sleep(0.05)
        if self._entry.error is not None:
            raise RuntimeError(f"could not load {options.model_dir}: {self._entry.error}")
        log.info("replica %s ready (cores %s)", self.replica_id, self.cores or "unpinned")

    @property
    def _entry(self) -> Any:
        """The served model's `serve.models.ModelEntry` (engine, load error)."""
        return self._state.models.default

    def health(self) -> dict[str, Any]:
        """The single-process `/health` body of this replica, plus its id, node and cores.
        A model that `--idle-unload` stopped leaves the replica "ok", as it leaves a single
        process's `/health` 200: its next request loads it again (reported as "loading",
        the deployment answered 503 "unavailable" whenever it sat idle)."""
        state, engine = self._state, self._entry.engine
        if state.draining:
            status = "draining"
        elif self._entry.error:
            status = "error"
        elif engine is not None or state.started:
            status = "ok"
        else:
            status = "loading"
        body: dict[str, Any] = {"status": status, "node": self.node_id, "cores": self.cores}
        if self._engine_process is not None:
            body["engine_pid"] = self._engine_process.process.pid
        if engine is not None:
            body["slots_in_use"] = getattr(engine, "slots_in_use", None)
            body["requests"] = getattr(engine, "num_requests", None)
        return body

    def _engine_lost(self) -> None:
        """`--engine-process`: the child is gone and its requests end with an error event.
        503 from now on, and once those events are out (`EXIT_AFTER_LOST_S`) this replica's
        process exits, so that Ray stops routing to it at once and starts another (as a
        `--api-workers` worker exits when its engine dies). Called from the client's reader
        thread."""
        log.error("replica %s: its engine process died; exiting so that Ray replaces it",
                  self.replica_id)
        self._state.draining = True
        threading.Timer(EXIT_AFTER_LOST_S, os._exit, (1,)).start()

    def _render_metrics(self) -> str:
        """This replica's llorch metrics (the engine's, from the child with
        `--engine-process`, and this process's counters). Blocking."""
        if self._engine_process is None:
            return self._metrics.render().decode()
        engine = self._metrics.render() if self._entry.engine is not None else b""
        return (engine + generate_latest(self._own)).decode()

    async def _beat_forever(self) -> None:
        while True:
            try:
                metrics = (await asyncio.to_thread(self._render_metrics)
                           if self._engine_process is not None else self._render_metrics())
                end = await self._registry.beat.remote(self.replica_id, self.node_id,
                                                       self.health(), metrics)
                if end and self._ending is None:  # the driver's drain is over: end the rest
                    self._ending = asyncio.create_task(drain(self._app, 0.0))
            except Exception:  # the registry restarting: the next beat tells it again
                log.warning("replica %s: heartbeat failed", self.replica_id, exc_info=True)
            await asyncio.sleep(BEAT_S)

    def check_health(self) -> None:
        """Ray Serve's health probe: raising makes Ray replace this replica."""
        if self._entry.error is not None:
            raise RuntimeError(self._entry.error)
        if self._engine_process is not None and not self._engine_process.alive:
            raise RuntimeError("the replica's engine process died")

    async def handle(self, request: ForwardedRequest) -> AsyncIterator[list[ResponsePart]]:
        """Run one HTTP request through the app; yield its response as it is sent, each item
        a list of parts (`serve.scale.coalesce.ChunkBuffer.chunks`)."""
        buffer = ChunkBuffer()
        disconnected = asyncio.Event()
        body_given = False

        async def receive() -> dict[str, Any]:
            nonlocal body_given
            if not body_given:
                body_given = True
                return {"type": "http.request", "body": request.body, "more_body": False}
            await disconnected.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if buffer.ended:
                return
            if message["type"] == "http.response.start":
                buffer.put(("start", message["status"], list(message.get("headers", []))))
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    buffer.put(("body", bytes(message["body"])))
                    self._bodies.inc()
                if not message.get("more_body", False):
                    buffer.end()

        self._in_flight += 1
        task = asyncio.create_task(self._app(request.scope(), receive, send))
        task.add_done_callback(lambda _: buffer.end())
        try:
            async for chunk in buffer.chunks(lambda: hold_seconds(self._in_flight, self._chunk_rate)):
                self._chunks.inc()
                yield chunk
            await task  # re-raises what the app raised (it renders its own errors)
        finally:
            self._in_flight -= 1
            if not task.done():  # cancelled upstream: the client is gone
                disconnected.set()
                asyncio.get_running_loop().call_later(DISCONNECT_GRACE_S, task.cancel)

    async def __del__(self) -> None:
        """Ray Serve's shutdown hook (after its graceful wait): end what is left, stop the
        engine thread, leave the registry."""
        if not hasattr(self, "_beats"):
            return  # the constructor failed before the app started: nothing to stop
        self._beats.cancel()
        await drain(self._app, 0.0)
        await self._lifespan.__aexit__(None, None, None)
        if self._engine_process is not None:
            await asyncio.to_thread(self._engine_process.stop)
        try:
            await self._registry.leave.remote(self.replica_id)
        except Exception:
            pass  # the registry went first (serve shutdown): nothing to leave


def _pin_process(cores: list[int]) -> None:
    """Every thread of this process (and the ones it starts later) on `cores` only."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cores)
        except OSError:  # a thread that just ended
            pass
