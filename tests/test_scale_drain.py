"""`llorch serve --replicas 2`: SIGTERM with a stream that outlives `--drain-timeout` (slow).

The stream gets `--drain-timeout` seconds, then the replicas end it with the wire format's
error event (`shutting_down`) and `[DONE]`, as a single process does, and the server exits 0.
It used to run on until Ray's graceful shutdown (another --drain-timeout + 5 s) force-killed
the replica: the ingress then sent `replica_died` (2 x --drain-timeout + 5 s after the
signal), or, with the default 15 s, was killed too and the client saw the connection cut
(httpx `RemoteProtocolError`) after 35 s.
Skipped without Ray.
"""

from __future__ import annotations

import json
import signal
import time

import httpx
import pytest

pytest.importorskip("ray", reason="Ray Serve is the optional .[ray] extra: pip install 'llorch[ray]'")

from test_scale_ray import MODEL, ray_server  # noqa: E402 - after the skip

pytestmark = pytest.mark.slow

DRAIN_S = 2.0


@pytest.mark.parametrize("flags, signals", [
    (("--drain-timeout", str(DRAIN_S)), 1),
    (("--drain-timeout", str(DRAIN_S), "--engine-process"), 1),
    (("--drain-timeout", "600", "--engine-process"), 2),  # the second signal cuts the drain short
], ids=["in-process", "engine-process", "second-signal"])
def test_a_stream_past_the_drain_timeout_ends_with_an_error_event(flags, signals, default_model_dir,
                                                                  tmp_path):
    body = {"model": MODEL, "max_tokens": 4000, "ignore_eos": True, "stream": True,
            "messages": [{"role": "user", "content": "Tell me a long story."}]}
    args = ("--replicas", "2", "--threads", "1", "--max-batch", "2", *flags)
    with ray_server(default_model_dir, *args, log_path=tmp_path / "server.log") as (base, proc):
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=120) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            start = time.monotonic()
            for _ in range(signals):
                proc.send_signal(signal.SIGTERM)
                time.sleep(0.5)
            rest = [line for line in lines if line.startswith("data: ")]
            took = time.monotonic() - start
        assert rest[-1] == "data: [DONE]", rest[-3:]
        error = json.loads(rest[-2].removeprefix("data: "))["error"]
        # the engine's drain ended it, not the replica's death under Ray's force-kill
        # (`replica_died` from the ingress, 2 x DRAIN_S + 5 s and more after the signal)
        assert error["code"] == "shutting_down", (error, took)
        assert took < DRAIN_S + 6, took
        assert proc.wait(60) == 0
