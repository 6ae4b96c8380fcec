"""A worker's view of the engine process: `EngineClient` offers what the routes use of
`serve.engine.Engine` (submit → `RequestStream`, the counters, tokenizer, max_length, …),
so the routes run unchanged; `MetricsProxy` stands in for `serve.metrics.Metrics`.

One reader thread per worker receives the engine's messages (`serve.frontend.hub` lists
them) and hands each step's events to the event loop in one `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import socket
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Client, Connection
from typing import Any

from serve.errors import ServiceUnavailableError, StartupError
from serve.events import Event, GenerationRequest, RequestStream, ShuttingDown
from serve.frontend.hub import EngineCounters, EngineInfo, unpack
from serve.tokenizer import Tokenizer

log = logging.getLogger("serve.frontend.client")

ENGINE_LOST = ("The engine process stopped unexpectedly; the request was not finished. "
               "Retry once the server is back.")
CONNECT_TIMEOUT_S = 60.0  # the engine process creates its socket before loading the model


class _Handle:
    """What `RequestStream.cancel` flags (the engine's `Job` in the single process)."""

    cancelled = False


class EngineClient:
    """Connects to the engine process at `address` and speaks for it in this worker.

    Args:
        address: the engine's AF_UNIX socket path; authkey: its `Listener`'s key.
        model_dir: where this worker's own `Tokenizer` comes from.
        on_lost: called (from the reader thread) once the engine process is gone.
        early: this worker accepts connections while the engine loads; it calls `serving()`
            once it answers requests, and the engine holds the other workers' "ready" until
            then (serve.frontend.hub.EngineHub says why).
    """

    def __init__(self, address: str, authkey: bytes, model_dir, *,
                 on_lost: Callable[[], None] | None = None, early: bool = False) -> None:
        self.address, self.authkey, self.model_dir = address, authkey, model_dir
        self.early = early
        self.on_lost = on_lost
        self.tokenizer: Any = None
        self.model_id = self.fingerprint = ""
        self.lost = False
        self._conn: Connection | None = None
        self._info: EngineInfo | None = None
        self._counters = EngineCounters()
        self._send_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._streams: dict[int, asyncio.Queue[Event]] = {}  # rid → its events (event loop only)
        self._calls: dict[int, concurrent.futures.Future] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._early_counts: list[tuple] = []  # HTTP counts from before the connection
        self._outgoing: dict[int, GenerationRequest] = {}  # submitted in this loop pass
        self._stopping = False

    # ------------------------------------------------------------------ connecting

    def connect(self) -> EngineClient:
        """Load the tokenizer, connect, wait until the engine has loaded the model (blocking:
        call from a thread). Raises `StartupError` when the engine could not load it."""
        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        while True:
            try:
                conn = Client(self.address, family="AF_UNIX", authkey=self.authkey)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise StartupError(f"no engine process at {self.address}") from None
                time.sleep(0.05)
        conn.send(("hello", self.early))
        kind, payload = conn.recv()
        if kind != "ready":
            conn.close()
            raise StartupError(payload)
        self.tokenizer = Tokenizer.from_dir(self.model_dir)  # after: the engine names a bad file
        self._conn, self._info, self._stopping = conn, payload, False
        for message in self._early_counts:
            self._send_quietly(message)
        self._early_counts.clear()
        threading.Thread(target=self._read, name="llorch-engine-client", daemon=True).start()
        return self

    @property
    def connected(self) -> bool:
        return self._info is not None

    # ------------------------------------------------------------------ Engine's surface

    @property
    def max_length(self) -> int:
        return self._info.max_length

    @property
    def vocab_size(self) -> int:
        return self._info.vocab_size

    @property
    def n_slots(self) -> int:
        return self._info.n_slots

    def kv_bytes(self) -> int:
        return self._info.kv_bytes

    def kv_bytes_in_use(self) -> int:
        return self._counters.kv_bytes_in_use

    @property
    def slots_in_use(self) -> int:
        return self._counters.slots_in_use

    @property
    def num_waiting(self) -> int:
        return self._counters.num_waiting

    @property
    def num_running(self) -> int:
        return self._counters.num_running

    @property
    def cached_prefix_tokens(self) -> int:
        return self._counters.cached_prefix_tokens

    @property
    def num_requests(self) -> int:
        """This worker's requests in flight (draining waits for these; the engine's total is
        `engine_requests`)."""
        return len(self._streams)

    @property
    def engine_requests(self) -> int:
        return self._counters.num_requests

    def submit(self, request: GenerationRequest) -> RequestStream:
        """`Engine.submit` across the process boundary; call from the event loop. A full queue
        or a draining engine answer with a first error event (serve.streaming: 429 / 503).

        Raises:
            ShuttingDown: the engine process is gone.
        """
        if self.lost:
            raise ShuttingDown(ENGINE_LOST)
        self._loop = self._loop or asyncio.get_running_loop()
        rid = next(self._ids)
        events: asyncio.Queue[Event] = asyncio.Queue()
        self._streams[rid] = events
        if not self._outgoing:
            self._loop.call_soon(self._send_submissions)
        self._outgoing[rid] = request
        return RequestStream(_Handle(), events, wake=lambda: self._cancel(rid))

    def _send_submissions(self) -> None:
        """Event loop, once per loop pass with submissions: all of them in one message, so
        the engine queues a response's requests together (as `Engine.submit` does: its
        --max-queue check must not see some of them already admitted)."""
        batch, self._outgoing = list(self._outgoing.items()), {}
        if not batch:  # cancelled before it went
            return
        try:
            self._send(("submit", batch))
        except OSError:
            for rid, _ in batch:
                queue = self._streams.pop(rid, None)
                if queue is not None:
                    queue.put_nowait(Event(error=ENGINE_LOST))

    def serving(self) -> None:
        """The early worker answers requests now: the engine lets the others start."""
        self._send_quietly(("serving",))

    def drain(self, timeout: float) -> None:
        self._send_quietly(("drain", timeout))

    def stop(self) -> None:
        """Detach this worker (the engine cancels its requests); the engine keeps running."""
        conn = self._conn
        if conn is not None and not conn.closed:
            self._stopping, self._info = True, None  # `connect` starts afresh
            try:  # the reader thread sees EOF and closes it (no close under its recv)
                with socket.fromfd(conn.fileno(), socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    # ------------------------------------------------------------------ metrics

    def http_request(self, endpoint: str, status: int) -> None:
        if self._conn is None:  # /health while the model loads
            self._early_counts.append(("http", endpoint, status))
            return
        self._send_quietly(("http", endpoint, status))

    def call(self, what: Any, timeout: float = 10.0) -> Any:
        """Ask the engine process and wait for the answer (blocking)."""
        call_id = next(self._ids)
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._calls[call_id] = future
        try:
            self._send(("call", call_id, what))
            return future.result(timeout)
        except (OSError, concurrent.futures.TimeoutError):
            raise ServiceUnavailableError("The engine process does not answer.") from None
        finally:
            self._calls.pop(call_id, None)

    # ------------------------------------------------------------------ internals

    def _send(self, message: tuple) -> None:
        if self._conn is None or self.lost:
            raise OSError("not connected to the engine")
        with self._send_lock:
            self._conn.send(message)

    def _send_quietly(self, message: tuple) -> None:
        try:
            self._send(message)
        except OSError:
            pass

    def _cancel(self, rid: int) -> None:
        if self._streams.pop(rid, None) is None:
            return
        if self._outgoing.pop(rid, None) is None:  # else it was never sent
            self._send_quietly(("cancel", rid))

    def _read(self) -> None:
        conn = self._conn
        assert conn is not None
        try:
            while True:
                message = conn.recv()
                kind = message[0]
                if kind == "events":
                    self._counters = message[2]
                    if message[1] and self._loop is not None:
                        self._loop.call_soon_threadsafe(self._dispatch, message[1])
                elif kind == "reply":
                    future = self._calls.get(message[1])
                    if future is not None:
                        future.set_result(message[2])
        except Exception as exc:  # EOF, a broken pipe
            if self._stopping or conn is not self._conn:  # stop(): this worker is leaving
                conn.close()
                return
            if not isinstance(exc, (EOFError, OSError)):
                log.exception("reading from the engine process failed")
        log.error("lost the engine process")
        self.lost = True
        for future in list(self._calls.values()):
            future.set_exception(OSError("engine lost"))
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._fail_all)
            except RuntimeError:  # the loop is closed
                pass
        if self.on_lost is not None:
            self.on_lost()

    def _dispatch(self, batch: list[tuple]) -> None:
        """Event loop: one engine step's events for this worker."""
        streams = self._streams
        for item in batch:
            rid, event = unpack(item)
            queue = streams.get(rid)
            if queue is None:  # cancelled meanwhile
                continue
            if event.final:
                del streams[rid]
            queue.put_nowait(event)

    def _fail_all(self) -> None:
        streams, self._streams = self._streams, {}
        for queue in streams.values():
            queue.put_nowait(Event(error=ENGINE_LOST))


class RemoteResponseStore:
    """`serve.response_store.ResponseStore` kept in the engine process, so that every worker
    sees the responses any worker stored (a short blocking call each: the Responses API's
    store and previous_response_id, not the token path)."""

    def __init__(self, client: EngineClient, capacity: int) -> None:
        self.client, self.capacity = client, capacity

    def __len__(self) -> int:
        return self.client.call(("responses", "__len__", ()))

    def put(self, response_id: str, stored: Any) -> None:
        self.client.call(("responses", "put", (response_id, stored)))

    def get(self, response_id: str) -> Any:
        return self.client.call(("responses", "get", (response_id,)))

    def delete(self, response_id: str) -> bool:
        return self.client.call(("responses", "delete", (response_id,)))

    def reserve(self, message_id: str) -> bool:
        return self.client.call(("responses", "reserve", (message_id,)))

    def release(self, message_id: str) -> None:
        self.client.call(("responses", "release", (message_id,)))


class MetricsProxy:
    """`serve.metrics.Metrics` for a worker: HTTP counts go to the engine process, whose
    registry renders /metrics (engine counters and every worker's HTTP counts, one set)."""

    def __init__(self, client: EngineClient) -> None:
        self.client = client

    def request(self, endpoint: str, status: int) -> None:
        self.client.http_request(endpoint, status)

    def render(self) -> bytes:
        return self.client.call("metrics")

    def bind(self, engine: Any, model: str) -> None:
        """The engine process binds its engine itself."""

    def unbind(self, model: str) -> None:
        """See `bind`."""
