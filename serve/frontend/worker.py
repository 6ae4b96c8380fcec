"""One HTTP worker process of `--api-workers`: the `serve.app` routes under uvicorn on the
supervisor's listening socket, with an `EngineClient` where the single process has its engine.

SIGTERM drains as in the single process (`serve.main.DrainingServer`): 503 for new requests,
this worker's running ones finish (the engine ends them at --drain-timeout), then it exits 0.
When the engine process is gone, every request in flight ends with an error and the worker
exits after a moment (its responses written).
"""

from __future__ import annotations

import logging
import os
import socket
import threading

import uvicorn

from serve.app import create_app
from serve.errors import StartupError
from serve.frontend.client import EngineClient, MetricsProxy, RemoteResponseStore
from serve.main import DrainingServer
from serve.models import build_entries, model_specs
from serve.options import ServeOptions

log = logging.getLogger("serve.frontend.worker")

EXIT_AFTER_LOST_S = 0.5  # time for the error events to reach the clients before shutting down


def worker_main(options: ServeOptions, sock: socket.socket, address: str, authkey: bytes,
                index: int, early: bool) -> None:
    """Serve HTTP on `sock` (already bound and listening) until told to stop.

    `early`: accept connections while the engine loads (/health: 503 "loading"); one worker
    does, the others (and restarted ones) accept only once connected and once the early one
    serves (the engine holds their "ready" until then), so a client that saw 200 never meets
    a worker still loading."""
    os.setpgrp()  # a terminal's Ctrl-C reaches the supervisor only; it tells the workers
    logging.basicConfig(level=options.log_level.upper(),
                        format=f"%(asctime)s %(levelname)s %(name)s[worker {index}]: %(message)s")
    entries = build_entries(options, model_specs(options), strict=True)
    server: DrainingServer | None = None

    def on_lost() -> None:
        app.state.llorch.draining = True  # /health: 503
        if server is not None:
            threading.Timer(EXIT_AFTER_LOST_S, lambda: setattr(server, "should_exit", True)).start()

    def on_load_error(exc: BaseException) -> None:
        log.error("the engine could not load the model: %s", exc)
        if server is not None:
            server.should_exit = True

    client = EngineClient(address, authkey, entries[0].options.model_dir, on_lost=on_lost, early=early)
    if not early:
        try:
            client.connect()
        except StartupError as exc:
            log.error("the engine could not load the model: %s", exc)
            return
    app = create_app(options, lambda entry: client if client.connected else client.connect(),
                     entries=entries,
                     on_load_error=on_load_error, metrics=MetricsProxy(client),
                     responses=RemoteResponseStore(client, options.responses_store_size),
                     on_started=client.serving if early else None)
    if not early:  # ready before the first accept: the startup load finds it loaded
        state = app.state.llorch
        state.models.ensure_loaded(state.models.default)
        state.started = True
    config = uvicorn.Config(app, log_level=options.log_level.lower(), timeout_graceful_shutdown=5)
    server = DrainingServer(config, app, options.drain_timeout)
    server.run(sockets=[sock])
