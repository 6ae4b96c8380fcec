"""`run_split(options)`: bind the port, start the engine process and N HTTP workers, watch them.

- The engine loads the model; until it is ready the workers' /health answers 503 (as the
  single process does). A model that fails to load: `StartupError`, exit 2.
- A worker that dies is started again on the same socket (the engine cancels its requests).
- The engine process dying is fatal: the workers end their requests with an error and exit,
  then `run_split` raises `EngineCrashed` (exit status 1) for a process manager to restart.
- SIGTERM/SIGINT: passed on to the workers, which drain (serve.main.DrainingServer); once they
  have exited the engine stops and `run_split` returns (exit 0). A second signal cuts the
  drain short (still exit 0), a third kills everything and exits at once (128 + signal).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import secrets
import signal
import socket
import tempfile
import time
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from pathlib import Path

import uvicorn

from serve.errors import EngineCrashed, StartupError
from serve.frontend.hub import engine_main, stop_engine_process
from serve.frontend.worker import worker_main
from serve.models import ModelEntry
from serve.options import ServeOptions
from serve.runtime.session import default_threads

log = logging.getLogger("serve.frontend")

WORKER_EXIT_GRACE_S = 15.0  # past the drain timeout: then the workers are killed
ENGINE_STOP_S = 15.0


def check_split(options: ServeOptions, entries: list[ModelEntry]) -> None:
    """Refuse what the split mode does not do (yet). Raises `StartupError`."""
    if len(entries) > 1:
        raise StartupError("--api-workers serves one model: several model directories or "
                           "--models-dir are not supported with it yet (drop --api-workers to "
                           "serve several models from one process)")


class _Supervisor:
    def __init__(self, options: ServeOptions, entry: ModelEntry) -> None:
        self.options, self.entry = options, entry
        self.ctx = multiprocessing.get_context("spawn")  # no fork of a process with threads
        self.dir = tempfile.TemporaryDirectory(prefix="llorch-")
        self.address = str(Path(self.dir.name) / "engine.sock")
        self.authkey = secrets.token_bytes(32)
        self.sock = self._bind()
        self.signals = 0
        self.workers: list[BaseProcess | None] = [None] * options.api_workers
        self.engine: BaseProcess | None = None
        self.control = None

    def _bind(self) -> socket.socket:
        config = uvicorn.Config(app=None, host=self.options.host, port=self.options.port)
        try:
            return config.bind_socket()
        except SystemExit:  # uvicorn logs the OSError and exits
            raise StartupError(f"cannot listen on {self.options.host}:{self.options.port}") from None

    def _start_worker(self, index: int, early: bool = False) -> None:
        proc = self.ctx.Process(target=worker_main, name=f"llorch-worker-{index}",
                                args=(self.options, self.sock, self.address, self.authkey, index, early))
        proc.start()
        self.workers[index] = proc

    def _on_signal(self, sig: int, frame) -> None:
        """1st: the workers drain; 2nd: passed on, they end their running requests now (exit
        0 still); 3rd: everything is killed and the process exits at once, 128 + signal."""
        self.signals += 1
        name = signal.Signals(sig).name
        if self.signals >= 3:
            log.warning("%s a third time: killing the workers and the engine, exiting now (status %d)",
                        name, 128 + sig)
            for proc in [*self._live_workers(), self.engine]:
                if proc is not None and proc.is_alive():
                    proc.kill()
            self.dir.cleanup()
            logging.shutdown()
            os._exit(128 + sig)
        if self.signals == 1:
            log.info("%s: draining the workers", name)
        else:
            log.info("%s again: the workers end their running requests now (a third signal exits at once)", name)
        for proc in self._live_workers():
            try:
                os.kill(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def _live_workers(self) -> list[BaseProcess]:
        return [p for p in self.workers if p is not None and p.is_alive()]

    def run(self) -> None:
        parent, child = self.ctx.Pipe()
        self.control = parent
        self.engine = self.ctx.Process(
            target=engine_main, name="llorch-engine",
            args=(self.entry.options, self.entry.id, self.address, self.authkey, child))
        self.engine.start()
        child.close()
        for i in range(len(self.workers)):
            self._start_worker(i, early=i == 0)  # worker 0 answers /health 503 while loading
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        log.info("serving '%s' on http://%s:%d with %d HTTP workers and an engine process "
                 "(pids: engine %d, workers %s)", self.entry.id, self.options.host, self.options.port,
                 len(self.workers), self.engine.pid, ", ".join(str(p.pid) for p in self.workers))
        try:
            self._watch()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            self._shutdown()

    def _watch(self) -> None:
        failure: str | None = None
        while True:
            if self.signals:
                return self._wait_workers()
            ready = wait([self.engine.sentinel, self.control,
                          *(p.sentinel for p in self._live_workers())], timeout=0.5)
            if self.control in ready:
                try:
                    message = self.control.recv()
                except (EOFError, OSError):
                    message = ("lost",)
                if message[0] == "failed":
                    failure = message[1]
                elif message[0] == "ready":
                    log.info("model '%s' is ready", self.entry.id)
            if failure is not None or not self.engine.is_alive():
                self.engine.join(ENGINE_STOP_S)
                self._wait_workers(grace=10.0)  # they end their requests with an error and exit
                if failure is not None:
                    raise StartupError(f"could not load {self.entry.options.model_dir}: {failure}")
                raise EngineCrashed(f"the engine process died (exit code {self.engine.exitcode}); "
                                    "requests in flight ended with an error")
            for i, proc in enumerate(self.workers):
                if proc is not None and not proc.is_alive() and not self.signals:
                    log.error("HTTP worker %d (pid %d) exited with %s; starting it again",
                              i, proc.pid, proc.exitcode)
                    self._start_worker(i)

    def _wait_workers(self, grace: float | None = None) -> None:
        """Until every worker has exited (signals keep being passed on meanwhile)."""
        limit = self.options.drain_timeout + WORKER_EXIT_GRACE_S if grace is None else grace
        deadline = time.monotonic() + limit
        while self._live_workers() and time.monotonic() < deadline:
            wait([p.sentinel for p in self._live_workers()], timeout=0.2)
        for proc in self._live_workers():
            log.error("HTTP worker %s did not exit: killing it", proc.pid)
            proc.kill()

    def _shutdown(self) -> None:
        for proc in self._live_workers():
            proc.kill()
        for proc in self.workers:
            if proc is not None:
                proc.join(5)
        if self.engine is not None:
            stop_engine_process(self.engine, self.control, ENGINE_STOP_S)
        self.sock.close()
        self.dir.cleanup()


def run_split(options: ServeOptions, entries: list[ModelEntry]) -> None:
    """Serve with the engine in its own process and `options.api_workers` HTTP workers.

    Raises:
        StartupError: several models, the port is taken, or the model failed to load.
        EngineCrashed: the engine process died.
    """
    check_split(options, entries)
    cpus = default_threads()  # the CPUs this process may use
    if options.api_workers > cpus:
        log.warning("--api-workers %d is more than the CPUs this process may use (%d): the workers "
                    "and the engine will compete for them", options.api_workers, cpus)
    _Supervisor(options, entries[0]).run()
