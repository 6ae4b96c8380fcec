"""`EngineProcess`: a Ray Serve replica's engine in a child process of its own
(`--engine-process`), the replica's own process keeping HTTP, chat templates, tokenizing and
SSE — the split of `--api-workers` (serve.frontend), with the replica as its one worker.

```
replica actor process (Ray's HTTP server / handle calls, serve.app routes, EngineClient)
        │  AF_UNIX socket, one message per engine step (serve.frontend.hub)
        ▼
engine child process (serve.frontend.hub.engine_main: Engine thread, Runtime, sampling)
```

Why: in one replica process the engine thread and the replica's per-token HTTP work share
one GIL; on an H200 a replica decoded 64 streams at 6.2 ms a step where the split
single-process server (`--api-workers`) takes about 3. The child inherits the replica's
CPU affinity (its pinned cores) and environment (Ray's `CUDA_VISIBLE_DEVICES`).

Faults: a child that dies ends the replica's requests in flight with an error event
(`EngineClient`), the replica answers 503 from then on and fails Ray's health check, so Ray
replaces it. The replica's shutdown stops the child (and kills it if it does not stop).
"""

from __future__ import annotations

import multiprocessing
import secrets
import tempfile
from collections.abc import Callable
from pathlib import Path

from serve.frontend.client import EngineClient
from serve.frontend.hub import engine_main, stop_engine_process
from serve.options import ServeOptions

STOP_S = 15.0  # how long the child gets to stop before it is killed


class EngineProcess:
    """Start the engine child for `options` (one model, served as `model_id`) and the
    `EngineClient` that speaks for it; `connect()` then waits for the model to load.

    Args:
        options: the replica's options (`model_dir`, `threads`, provider, …).
        model_id: the served model id.
        on_lost: called from the client's reader thread once the child is gone.
    """

    def __init__(self, options: ServeOptions, model_id: str,
                 on_lost: Callable[[], None] | None = None) -> None:
        ctx = multiprocessing.get_context("spawn")  # no fork of a process with threads
        self._dir = tempfile.TemporaryDirectory(prefix="llorch-replica-")
        address = str(Path(self._dir.name) / "engine.sock")
        authkey = secrets.token_bytes(32)
        self._control, child = ctx.Pipe()
        self.process = ctx.Process(target=engine_main, name="llorch-engine", daemon=True,
                                   args=(options, model_id, address, authkey, child))
        self.process.start()
        child.close()
        # The child's only client: "early", so that the engine answers it "ready" at once
        # instead of holding it for an early HTTP worker (--api-workers' first) that never
        # comes (EARLY_WORKER_WAIT_S, 30 s, at every replica's start before this).
        self.client = EngineClient(address, authkey, options.model_dir, on_lost=on_lost, early=True)

    def connect(self) -> EngineClient:
        """Wait (blocking: call from a thread) until the child has loaded the model.

        Raises:
            StartupError: the model failed to load (the message names the file), or the
                child never opened its socket.
        """
        return self.client.connect()

    @property
    def alive(self) -> bool:
        return self.process.is_alive()

    def stop(self) -> None:
        """Ask the child to stop (it ends what still runs), then kill it after `STOP_S`."""
        stop_engine_process(self.process, self._control, STOP_S)
        self._control.close()
        self._dir.cleanup()
