"""`llorch serve --replicas 2` when its replicas are gone, and signals during the drain (slow).

On a real server (Ray Serve's proxy path, the default model, one thread a replica), through
the official openai client and httpx:

- every replica killed (and kept dead by a loop of `ray.kill`): a stream in flight ends with
  the `replica_died` error event and `[DONE]`; `/health` says 503 "unavailable"; a new
  request is answered 503 `no_replicas` (OpenAI-shaped, `Retry-After`) within a few seconds.
  Before, Ray's router held it for as long as no replica existed (71 s here, then a 200);
  once Ray's restarts are let through, the deployment serves again;
- SIGTERM then SIGINT during a drain with a stream in flight end the stream with
  `shutting_down`; a third signal exits at once (143) and leaves no Ray process behind (the
  driver's process group is empty).

Skipped without Ray.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI
from test_server_e2e import REPO, _free_port

pytest.importorskip("ray", reason="Ray Serve is the optional .[ray] extra: pip install 'llorch[ray]'")

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
FLAGS = ("--replicas", "2", "--threads", "1", "--max-batch", "2", "--drain-timeout", "600")
LONG_STREAM = {"model": MODEL, "max_tokens": 4000, "ignore_eos": True, "stream": True,
               "messages": [{"role": "user", "content": "Tell me a long story."}]}
# `ray.kill` every llorch replica that has reported in (loading or ready: its actor is up),
# again and again for argv[3] seconds, from a driver of its own (keeps Ray out of the test
# process; a local `ray.init` cluster uses token auth). Actors Ray is still creating are left
# alone: killing those made Ray lose a replica for good (one never came back in 300 s).
KILL_LOOP = """
import json, sys, time, urllib.request
import ray
ray.init(address=sys.argv[1], logging_level="ERROR")
end = time.monotonic() + float(sys.argv[3])
while time.monotonic() < end:
    try:
        with urllib.request.urlopen(sys.argv[2] + "/health", timeout=5) as r:
            ids = json.load(r)["replicas"]
    except urllib.error.HTTPError as e:
        ids = json.load(e)["replicas"]
    except OSError:
        ids = {}
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if "llorch-replica" in actor["name"] and actor["name"].rsplit("#", 1)[-1] in ids:
            try:
                ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]))
            except Exception:
                pass  # gone between the listing and the kill
    time.sleep(0.2)
"""


def _health(base: str) -> tuple[int, dict]:
    try:
        r = httpx.get(f"{base}/health", timeout=5)
        return r.status_code, r.json()
    except (httpx.TransportError, ValueError):
        return 0, {}


@contextlib.contextmanager
def _server(model_dir: Path, log_path: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """`python -m serve.main MODEL --replicas 2 …` in a session (process group) of its own;
    yields (base URL, process) once both replicas are ready. Teardown: SIGKILL of the group."""
    port = _free_port()
    log = open(log_path, "wb")
    proc = subprocess.Popen([sys.executable, "-m", "serve.main", str(model_dir), "--port", str(port),
                             *FLAGS], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 400
        # the driver logs the cluster's address once serve.run returned; the replicas report
        # ready to /health a little earlier
        while (_health(base)[1].get("ready_replicas") != 2
               or "Ray cluster at" not in log_path.read_text()):
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{log_path.read_text()[-5000:]}")
            assert time.monotonic() < deadline, f"replicas not ready:\n{log_path.read_text()[-5000:]}"
            time.sleep(0.5)
        yield base, proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and every Ray process it started
        proc.wait()
        log.close()


@pytest.fixture(scope="module")
def cluster(default_model_dir, tmp_path_factory) -> Iterator[tuple[str, subprocess.Popen, Path]]:
    log = tmp_path_factory.mktemp("faults") / "server.log"
    with _server(default_model_dir, log) as (base, proc):
        yield base, proc, log


def _data_lines(lines: Iterator[str], n: int) -> list[str]:
    """The next `n` SSE data payloads (fewer if the stream ends)."""
    out = []
    for line in lines:
        if line.startswith("data: "):
            out.append(line.removeprefix("data: "))
            if len(out) == n:
                break
    return out


def test_with_every_replica_dead_requests_get_503_json_at_once_and_ray_recovers(cluster):
    base, _, log = cluster
    gcs = re.search(r"Ray cluster at (\S+)", log.read_text()).group(1)
    client = OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=60)
    question = [{"role": "user", "content": "What is the capital of France?"}]
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=LONG_STREAM, timeout=120) as r:
        lines = r.iter_lines()
        assert len(_data_lines(lines, 2)) == 2
        killer = subprocess.Popen([sys.executable, "-c", KILL_LOOP, gcs, base, "30"], cwd=REPO,
                                  env={**os.environ, "RAY_AUTH_MODE": "token"})
        rest = _data_lines(lines, 100_000)
    try:
        # The stream in flight ends with an OpenAI-shaped error event, then [DONE].
        assert rest[-1] == "[DONE]", rest[-3:]
        assert json.loads(rest[-2])["error"]["code"] == "replica_died"
        deadline = time.monotonic() + 20
        while (health := _health(base))[0] != 503:
            assert time.monotonic() < deadline, f"/health still says {health}"
            time.sleep(0.5)
        assert health[1]["status"] == "unavailable" and health[1]["ready_replicas"] == 0
        for stream in (False, True):
            start = time.monotonic()
            with pytest.raises(openai.APIStatusError) as caught:
                client.chat.completions.create(model=MODEL, max_tokens=4, messages=question,
                                               stream=stream)
            took = time.monotonic() - start
            assert caught.value.status_code == 503, caught.value
            error = caught.value.response.json()["error"]
            assert error["code"] == "no_replicas" and error["type"] == "server_error", error
            assert set(error) == {"message", "type", "param", "code"}
            assert caught.value.response.headers["retry-after"].isdigit()
            assert took < 8, took  # 3 s of no replica (NO_REPLICA_WAIT_S), not the whole outage
    finally:
        killer.wait(120)
    deadline = time.monotonic() + 300  # Ray restarts both replicas once the kills stop
    while _health(base)[1].get("ready_replicas") != 2:
        assert time.monotonic() < deadline, \
            f"no replacement replicas: {_health(base)}\n{log.read_text()[-4000:]}"
        time.sleep(1)
    answer = client.chat.completions.create(model=MODEL, max_tokens=8, temperature=0, messages=question)
    assert "Paris" in answer.choices[0].message.content


def test_signals_during_the_drain_end_the_driver_and_its_ray(cluster):
    """Runs last (it stops the server): SIGTERM with a stream in flight starts a drain of up
    to 600 s; SIGINT cuts it short (the stream ends with `shutting_down`); a third signal, while
    the application is still being taken down, exits at once (128 + 15) and leaves no Ray
    process behind. Before, the third signal was ignored: the orderly stop took its ~10 s."""
    base, proc, _ = cluster
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=LONG_STREAM, timeout=120) as r:
        lines = r.iter_lines()
        assert len(_data_lines(lines, 1)) == 1
        for sig in (signal.SIGTERM, signal.SIGINT):
            proc.send_signal(sig)
            time.sleep(0.5)
        rest = _data_lines(lines, 100_000)
    assert rest[-1] == "[DONE]" and json.loads(rest[-2])["error"]["code"] == "shutting_down", rest[-3:]
    assert proc.poll() is None  # still stopping the application
    proc.send_signal(signal.SIGTERM)
    start = time.monotonic()
    assert proc.wait(30) == 128 + signal.SIGTERM
    assert time.monotonic() - start < 3
    deadline = time.monotonic() + 15  # the replicas and other workers end with their raylet
    while left := _group(proc.pid):
        assert time.monotonic() < deadline, f"Ray processes left after the driver exited: {left}"
        time.sleep(0.5)


def _group(pgid: int) -> list[str]:
    """`pid command` of every process still in process group `pgid`."""
    out = subprocess.run(["ps", "-e", "-o", "pid=,pgid=,args="], capture_output=True, text=True).stdout
    return [f"{fields[0]} {fields[2][:80]}" for fields in
            (line.split(None, 2) for line in out.splitlines()) if len(fields) == 3
            and int(fields[1]) == pgid]
