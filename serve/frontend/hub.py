"""The engine process of `--api-workers`: the `Engine` thread plus one reader thread per HTTP
worker, connected by `multiprocessing.connection` (AF_UNIX, authenticated).

Worker → engine messages (tuples, pickled):
    ("hello", early)                     first; early: this worker accepts connections while
                                         the engine loads (one does, for /health's 503)
    ("serving",)                         the early worker answers requests now
    ("submit", [(rid, GenerationRequest), …])  rid: the worker's request number; a loop
                                         pass's submissions together (a response's prompts)
    ("cancel", rid)                      the client went away: free the slots
    ("drain", timeout_s)                 `Engine.drain`
    ("http", endpoint, status)           one HTTP request, for /metrics
    ("call", call_id, "metrics")         → ("reply", call_id, Prometheus text bytes)
    ("call", call_id, ("responses", method, args))  → ("reply", call_id, the result): the
                                         Responses API's store lives here, shared by the workers
Engine → worker:
    ("ready", EngineInfo) | ("failed", message)   once, after the worker's ("hello", early);
                                         to the other workers only once the early one is
                                         serving (see `EngineHub`)
    ("events", [item, …], EngineCounters) at most one per engine step and worker; an item is
                                         `pack(rid, event)`: plain tuples for the common event
                                         (text and token ids), pickled 3× faster than the
                                         dataclasses on the engine's thread

A step's events go out from the engine thread in one message per worker (`Engine.on_step`),
never through an event loop. A worker whose connection breaks has its requests cancelled.
"""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass
from multiprocessing.connection import Connection, Listener
from typing import Any

from serve.events import (
    QUEUE_FULL,
    SHUTTING_DOWN,
    ChoiceOutput,
    Event,
    GenerationRequest,
    QueueFull,
    ShuttingDown,
)
from serve.metrics import Metrics
from serve.options import ServeOptions
from serve.response_store import ResponseStore

log = logging.getLogger("serve.frontend.hub")

EARLY_WORKER_WAIT_S = 30.0  # the other workers' "ready" waits this long for the early one


@dataclass(frozen=True)
class EngineInfo:
    """What a worker's `EngineClient` needs to know of the engine once (`Engine` attributes)."""

    max_length: int
    vocab_size: int
    n_slots: int
    kv_bytes: int


@dataclass(frozen=True)
class EngineCounters:
    """The engine's state gauges as of the end of a step (`Engine` properties of the same names)."""

    num_waiting: int = 0
    num_running: int = 0
    num_requests: int = 0
    slots_in_use: int = 0
    cached_prefix_tokens: int = 0
    kv_bytes_in_use: int = 0


def pack(rid: int, event: Event) -> tuple:
    """(rid, event) for the wire: (rid, ((index, text, token_ids, finish_reason,
    stop_sequence), …), usage, cached_tokens) when the event has only those, else (rid, event)."""
    if event.error is None and event.prompt_logprobs is None and \
            all(c.logprobs is None for c in event.choices):
        return rid, tuple((c.index, c.text, c.token_ids, c.finish_reason, c.stop_sequence)
                          for c in event.choices), event.usage, event.cached_tokens
    return rid, event


def unpack(item: tuple) -> tuple[int, Event]:
    """`pack`'s inverse."""
    if len(item) == 2:
        return item
    rid, choices, usage, cached_tokens = item
    return rid, Event(tuple(ChoiceOutput(i, text, ids, None, finish, stop)
                            for i, text, ids, finish, stop in choices), None, usage,
                      cached_tokens=cached_tokens)


class _Worker:
    """The engine process's end of one HTTP worker: its connection and its requests."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.send_lock = threading.Lock()  # the engine thread and the reader thread both send
        self.jobs: dict[int, Any] = {}  # rid → serve.sequence.Job, until its final event
        self.outbox: list[tuple[int, Event]] = []  # this step's events (engine thread only)
        self.counters: EngineCounters | None = None  # the last ones sent
        self.alive = True
        self.early = False  # accepts HTTP connections while the engine loads

    def send(self, message: tuple) -> None:
        with self.send_lock:
            self.conn.send(message)


class EngineHub:
    """Serves the engine to the workers that connect to `listener`.

    Args:
        listener: where workers connect (`multiprocessing.connection.Listener`).
        metrics: the server's metrics; the engine reports to `metrics.observer(model)`,
            workers send their HTTP request counts here and read /metrics from here.
        responses: the Responses API's store, one for every worker.

    The workers share one listening socket, so a client's next connection may reach any
    accepting worker: once one has answered /health 200, every accepting one must serve. The
    early worker accepts while the engine loads (503s) and connects in the background; the
    others accept only once connected. So they are answered "ready" only after the early one
    says ("serving",) (or drops, or `EARLY_WORKER_WAIT_S` passes): else another worker could
    answer /health 200 while the early one is still connecting, and the client's next
    connection, accepted by the early one, would get 503 `model_loading`.
    """

    def __init__(self, listener: Listener, metrics: Metrics, responses: ResponseStore) -> None:
        self.listener = listener
        self.metrics = metrics
        self.responses = responses
        self.engine: Any = None
        self.failure: str | None = None
        self._settled = threading.Event()  # the engine loaded, or failed to
        self._early_serving = threading.Event()  # the early worker serves, or is gone
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()  # guards _workers
        self._store_lock = threading.Lock()

    def start(self) -> None:
        threading.Thread(target=self._accept, name="llorch-accept", daemon=True).start()

    def ready(self, engine: Any) -> None:
        """The engine is loaded and started: answer the workers' hellos, flush every step."""
        self.engine = engine
        engine.on_step = self.flush
        self._settled.set()

    def failed(self, message: str) -> None:
        self.failure = message
        self._settled.set()

    # ------------------------------------------------------------------ reader threads

    def _accept(self) -> None:
        while True:
            try:
                conn = self.listener.accept()
            except OSError:  # the listener was closed: the process is ending
                return
            except Exception:  # a connection that failed authentication: not a worker
                log.exception("a connection to the engine was refused")
                continue
            worker = _Worker(conn)
            threading.Thread(target=self._serve, args=(worker,), name="llorch-hub-reader",
                             daemon=True).start()

    def _serve(self, worker: _Worker) -> None:
        try:
            hello = worker.conn.recv()  # ("hello", early)
            worker.early = bool(hello[1])
            self._settled.wait()
            if self.failure is not None:
                worker.send(("failed", self.failure))
                return
            if not worker.early and not self._early_serving.wait(EARLY_WORKER_WAIT_S):
                log.warning("the early HTTP worker is not serving after %g s: answering the "
                            "others anyway", EARLY_WORKER_WAIT_S)
                self._early_serving.set()
            e = self.engine
            worker.send(("ready", EngineInfo(e.max_length, e.vocab_size, e.n_slots, int(e.kv_bytes()))))
            with self._lock:
                self._workers.append(worker)
            while True:
                self._handle(worker, worker.conn.recv())
        except (EOFError, OSError):
            pass  # the worker exited or died
        except Exception:
            log.exception("engine hub: a worker's message failed")
        finally:
            self._drop(worker)

    def _handle(self, worker: _Worker, message: tuple) -> None:
        kind = message[0]
        if kind == "submit":
            refused = [r for r in (self._submit(worker, rid, req) for rid, req in message[1]) if r]
            if refused:
                worker.send(("events", [pack(rid, event) for rid, event in refused], self.counters()))
        elif kind == "serving":
            self._early_serving.set()
        elif kind == "cancel":
            job = worker.jobs.pop(message[1], None)
            if job is not None:
                job.cancelled = True
                self.engine.wake()
        elif kind == "drain":
            self.engine.drain(message[1])
        elif kind == "http":
            self.metrics.request(message[1], message[2])
        elif kind == "call":
            what = message[2]
            if what == "metrics":
                result: Any = self.metrics.render()
            else:  # ("responses", get | put | delete | len | reserve | release, args)
                with self._store_lock:  # one reader thread per worker
                    result = getattr(self.responses, what[1])(*what[2])
            worker.send(("reply", message[1], result))
        else:
            log.error("engine hub: unknown message %r", kind)

    def _submit(self, worker: _Worker, rid: int, request: GenerationRequest) -> tuple[int, Event] | None:
        """Queue one request; (rid, its error event) when the engine refuses it."""
        outbox = worker.outbox

        def send(event: Event) -> None:  # engine thread: collected, flushed after the step
            outbox.append((rid, event))

        try:
            worker.jobs[rid] = self.engine.enqueue(request, send)
            return None
        except QueueFull as exc:
            event = Event(error=str(exc), error_code=QUEUE_FULL)
        except ShuttingDown as exc:
            event = Event(error=str(exc), error_code=SHUTTING_DOWN)
        except ValueError as exc:  # the route checks these first; a mismatch is our bug
            log.error("request %s refused by the engine: %s", request.request_id, exc)
            event = Event(error=f"The engine refused the request: {exc}")
        return rid, event

    def _drop(self, worker: _Worker) -> None:
        worker.alive = False
        if worker.early:  # the others need not wait for it any longer
            self._early_serving.set()
        with self._lock:
            if worker in self._workers:
                self._workers.remove(worker)
        for job in list(worker.jobs.values()):
            job.cancelled = True
        worker.jobs.clear()
        if self.engine is not None:
            self.engine.wake()
        worker.conn.close()

    # ------------------------------------------------------------------ engine thread

    def counters(self) -> EngineCounters:
        e = self.engine
        return EngineCounters(e.num_waiting, e.num_running, e.num_requests, e.slots_in_use,
                              e.cached_prefix_tokens, int(e.kv_bytes_in_use()))

    def flush(self) -> None:
        """`Engine.on_step`: each worker's events of this step in one message, with the
        counters (also sent alone when they changed, so /health and draining stay current)."""
        with self._lock:
            workers = list(self._workers)
        if not workers:
            return
        counters = self.counters()
        # the counters first to the workers without events: a client that reads an event and
        # then asks another worker's /health should find the step's counters there
        workers.sort(key=lambda w: bool(w.outbox))
        for worker in workers:
            if not worker.outbox and worker.counters == counters:
                continue
            batch = worker.outbox[:]
            del worker.outbox[: len(batch)]
            for rid, event in batch:
                if event.final:
                    worker.jobs.pop(rid, None)
            worker.counters = counters
            try:
                worker.send(("events", [pack(rid, event) for rid, event in batch], counters))
            except OSError:  # gone: its reader thread cancels its requests
                worker.alive = False


def engine_main(options: ServeOptions, model_id: str, address: str, authkey: bytes,
                control: Connection) -> None:
    """The engine process: listen for workers, load the model, serve until the supervisor
    says "stop" on `control` (or goes away). Reports ("ready",) or ("failed", message) there.
    SIGINT/SIGTERM are the supervisor's to handle: the workers drain first."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=options.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s[engine]: %(message)s")
    from serve.main import load_engine  # noqa: PLC0415 - serve.main imports this package lazily

    metrics = Metrics()
    listener = Listener(address, family="AF_UNIX", authkey=authkey)
    hub = EngineHub(listener, metrics, ResponseStore(options.responses_store_size))
    hub.start()
    try:
        engine = load_engine(options, metrics.observer(model_id))
    except BaseException as exc:
        log.error("loading %s failed", options.model_dir, exc_info=exc)
        hub.failed(str(exc))
        control.send(("failed", str(exc)))
        listener.close()
        return
    metrics.bind(engine, model_id)
    hub.ready(engine)
    control.send(("ready",))
    try:
        control.recv()  # ("stop",)
    except (EOFError, OSError):
        log.error("the supervisor went away: stopping")
    engine.stop()
    listener.close()


def stop_engine_process(process: Any, control: Connection, timeout: float) -> None:
    """Stop an `engine_main` process: ("stop",) on its `control` pipe (it ends what still
    runs), then kill it if it has not exited after `timeout` seconds. No-op once it is gone."""
    if not process.is_alive():
        return
    try:
        control.send(("stop",))
    except OSError:
        pass
    process.join(timeout)
    if process.is_alive():
        log.error("the engine process did not stop: killing it")
        process.kill()
        process.join(5)
