"""`llorch serve --replicas 2` for the Ray Serve e2e files (tests/test_scale_*.py): one way to
start a deployment and the checks that several deployments share (a plain module beside the
tests, not a conftest; it never imports Ray, so the files can skip first).

- ``ray_server``: the server on a free port, yielded once both replicas report ready.
- ``cluster_fixtures(name, *flags)``: a file's module-scoped ``cluster`` (``Cluster``: base
  URL, process, log path) and its ``client`` (the official openai client on it).
- ``answers_of_a_single_process``: greedy answers of one plain process, the reference every
  deployment's answers must equal (tests/conftest.py keeps them for the whole session).
- ``plain_routing_then_two_signals``: the one deployment of Ray's own router, for its
  prefix-cache hit rate and then for a drain cut short (also kept for the session).
- ``check_*``: a behaviour every ingress must have, run on a file's ``cluster``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import httpx
import pytest
from openai import OpenAI
from test_server_e2e import REPO, _free_port, running_server

MODEL = "smollm2-135m-instruct"
QUESTIONS = ["What is the capital of France?", "Name three colours.", "Say hello in German."]
TOPICS = ["astronomy", "cooking", "sailing", "chess"]  # hit_rate's four system prompts
# Ray Serve holds a stopping direct-ingress (HAProxy) replica open for this long (default 30 s,
# a pure sleep) so that external load balancers can deregister it. HAProxy is Ray's own here
# and llorch has drained before it deletes the app, so the tests wait 1 s: each HAProxy
# deployment's SIGTERM took 40 s with the default.
RAY_ENV = {"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1"}


class Cluster(NamedTuple):
    base: str  # http://127.0.0.1:PORT
    proc: subprocess.Popen
    log: Path


@contextlib.contextmanager
def ray_server(model_dir: Path, *args: str, log_path: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """`python -m serve.main MODEL --replicas …` on a free port; yields (base URL, process)
    once both replicas report ready. Teardown: SIGTERM (a drain), then SIGKILL."""
    port = _free_port()
    cmd = [sys.executable, "-m", "serve.main", str(model_dir), "--port", str(port), *args]
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **RAY_ENV})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 400
        while not ready_replicas(base) == 2:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{log_path.read_text()[-5000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"replicas not ready:\n{log_path.read_text()[-5000:]}")
            time.sleep(0.5)
        yield base, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(90)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


def cluster_fixtures(name: str, *flags: str, after: str | None = None):
    """A test file's `cluster` (module scope: `ray_server` with `flags`, started after the
    session's single-process answers and after fixture `after`, e.g. one whose own cluster must
    be gone first) and `client` fixtures: `cluster, client = cluster_fixtures(…)`."""

    @pytest.fixture(scope="module")
    def cluster(request, default_model_dir, tmp_path_factory, single_process_answers) -> Iterator[Cluster]:
        if after:
            request.getfixturevalue(after)
        log = tmp_path_factory.mktemp(name) / "server.log"
        with ray_server(default_model_dir, *flags, log_path=log) as (base, proc):
            yield Cluster(base, proc, log)

    @pytest.fixture
    def client(cluster) -> Iterator[OpenAI]:
        with OpenAI(base_url=f"{cluster.base}/v1", api_key="none", max_retries=0) as client:
            yield client

    return cluster, client


def answers_of_a_single_process(model_dir: Path, log_path: Path) -> dict[str, str]:
    """{question: greedy answer, 24 tokens} of one plain process with one thread (as each
    replica has), for every question in QUESTIONS."""
    with running_server(model_dir, "--threads", "1", log_path=log_path) as base:
        with OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0) as client:
            return {q: client.chat.completions.create(
                model=MODEL, max_tokens=24, temperature=0,
                messages=[{"role": "user", "content": q}]).choices[0].message.content
                for q in QUESTIONS}


def health(base: str) -> dict:
    try:
        return httpx.get(f"{base}/health", timeout=5).json()
    except (httpx.TransportError, ValueError):
        return {}


def ready_replicas(base: str) -> int:
    return health(base).get("ready_replicas", 0)


def slots_in_use(base: str) -> int:
    return sum(r.get("slots_in_use") or 0 for r in health(base).get("replicas", {}).values())


def busy_replicas(base: str) -> list[str]:
    return [rid for rid, h in health(base).get("replicas", {}).items() if h.get("slots_in_use")]


def cancelled(base: str) -> float:
    """Requests the replicas' engines counted as cancelled (a replica's count is a beat old)."""
    metrics = httpx.get(f"{base}/metrics", timeout=10).text
    return sum(float(v) for v in re.findall(
        r'llorch_engine_requests_total\{replica="\w+"[^}]*outcome="cancelled"[^}]*\} (\S+)', metrics))


def wait_for_idle_replicas(base: str) -> None:
    """Until every replica's last report shows no slot in use: reports are up to a beat old,
    so an earlier test's stream can still look busy for a second after it ended."""
    deadline = time.monotonic() + 20
    while slots_in_use(base):
        assert time.monotonic() < deadline, f"slots still in use: {health(base)}"
        time.sleep(0.2)


def wait_for_a_replacement(base: str, dead: str) -> None:
    """Until Ray has replaced replica `dead`: two ready, `dead` gone from the heartbeats (which
    lag Ray's own count)."""
    deadline = time.monotonic() + 240
    while (ready_replicas(base) != 2 or dead in health(base)["replicas"]
           or len(health(base)["replicas"]) != 2):
        assert time.monotonic() < deadline, f"no replacement replica: {health(base)}"
        time.sleep(0.5)


def next_events(lines: Iterator[str], n: int) -> list[str]:
    """The next `n` SSE data payloads from a stream's line iterator (fewer if it ends)."""
    events = []
    for line in lines:
        if line.startswith("data: "):
            events.append(line.removeprefix("data: "))
            if len(events) == n:
                break
    return events


def kill_replica(gcs_address: str, replica_id: str) -> None:
    """`ray.kill` the replica from a separate driver (keeps Ray out of the test process)."""
    code = (
        "import ray, sys\n"
        f"ray.init(address={gcs_address!r}, logging_level='ERROR')\n"
        "names = ray.util.list_named_actors(all_namespaces=True)\n"
        f"name = next(a['name'] for a in names if a['name'].endswith('#{replica_id}'))\n"
        "ray.kill(ray.get_actor(name, namespace='serve'))\n")
    # A local `ray.init` cluster uses token auth; the token is in ~/.ray/auth_token.
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, cwd=REPO,
                   env={**os.environ, "RAY_AUTH_MODE": "token"})


def gcs_address(log: Path) -> str:
    return re.search(r"Ray cluster at (\S+)", log.read_text()).group(1)


def _system_prompt(topic: str) -> str:
    rules = " ".join(f"Rule {i}: when asked about {topic}, answer with care, cite point {i}, "
                     f"and keep the {topic} vocabulary precise." for i in range(12))
    return f"You are an expert assistant on {topic}. {rules}"


def hit_rate(base: str) -> tuple[float, list[int]]:
    """Four long system prompts (`TOPICS`), four questions each, one at a time:
    (cached/prompt tokens, each request's cached tokens)."""
    cached = prompt = 0
    per_request = []
    with OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0) as client:
        for question in ["Define it.", "Give one example.", "Why does it matter?", "Summarise."]:
            for topic in TOPICS:
                r = client.chat.completions.create(
                    model=MODEL, max_tokens=1, temperature=0,
                    messages=[{"role": "system", "content": _system_prompt(topic)},
                              {"role": "user", "content": question}])
                hit = r.usage.prompt_tokens_details.cached_tokens or 0
                cached, prompt = cached + hit, prompt + r.usage.prompt_tokens
                per_request.append(hit)
    return cached / prompt, per_request


def check_greedy_answers_and_streams(base: str, client: OpenAI, answers: dict[str, str]) -> None:
    """Greedy answers equal `answers` (a single process's), a stream comes token by token with
    the same text, and a raw SSE stream ends with [DONE]."""
    for question, expected in answers.items():
        r = client.chat.completions.create(model=MODEL, max_tokens=24, temperature=0,
                                           messages=[{"role": "user", "content": question}])
        assert r.choices[0].message.content == expected
    arrivals, text = [], ""
    stream = client.chat.completions.create(model=MODEL, max_tokens=24, temperature=0, stream=True,
                                            messages=[{"role": "user", "content": QUESTIONS[0]}])
    for chunk in stream:
        arrivals.append(time.monotonic())
        text += (chunk.choices[0].delta.content or "") if chunk.choices else ""
    assert text == answers[QUESTIONS[0]]
    assert len(arrivals) > 5 and arrivals[-2] - arrivals[1] > 0.05  # token by token
    body = {"model": MODEL, "max_tokens": 8, "temperature": 0, "stream": True,
            "messages": [{"role": "user", "content": QUESTIONS[1]}]}
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert next_events(r.iter_lines(), 100)[-1] == "[DONE]"


def check_a_disconnect_frees_the_slot(base: str) -> None:
    """A stream that is running on a replica (its slot busy, tokens still arriving) is
    cancelled there when its client goes away: the slot comes back long before the stream
    could have ended, and the engine counts the request as cancelled, not finished.

    The line iterator is kept in a variable on purpose: `next(r.iter_lines())` drops the
    generator, and httpcore closes the connection when a dropped generator is collected, so
    the client would disconnect right after the first line (it did, before 2026-11-30's fix,
    and the test only passed when a report of the previous test's stream still showed a busy
    slot)."""
    wait_for_idle_replicas(base)  # from here on a busy slot is this test's stream
    cancelled_before = cancelled(base)
    body = {"model": MODEL, "max_tokens": 2000, "ignore_eos": True, "stream": True,
            "messages": [{"role": "user", "content": "Tell me a long story."}]}
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        events = next_events(lines, 1)
        deadline = time.monotonic() + 30  # replicas report every second; slower under load
        while not slots_in_use(base):
            assert time.monotonic() < deadline, "the stream never showed up as a busy slot"
            events += next_events(lines, 2)  # keep reading: the stream stays live meanwhile
        events += next_events(lines, 2)
        assert "[DONE]" not in events  # still running when the client goes
    # 2000 tokens take more than 30 s here; the slot must come back far sooner, cancelled.
    left = time.monotonic()
    while slots_in_use(base):
        assert time.monotonic() < left + 15, "the slot was not given back after the disconnect"
        time.sleep(0.2)
    while cancelled(base) < cancelled_before + 1:  # the engine's count comes with the next beat
        assert time.monotonic() < left + 20, "the engine did not count the request as cancelled"
        time.sleep(0.2)
    metrics = httpx.get(f"{base}/metrics", timeout=10).text
    assert len(set(re.findall(r'replica="(\w+)"', metrics))) == 2


LONG_STORY = {"model": MODEL, "max_tokens": 4000, "ignore_eos": True, "stream": True,
              "messages": [{"role": "user", "content": "Tell me a long story."}]}


def read_a_long_story(base: str, started: threading.Event) -> tuple[list[str], float]:
    """A stream far longer than any drain (4000 tokens): sets `started` once its first event
    is in, returns (the `data: ` lines after it, time.monotonic() at its end)."""
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=LONG_STORY, timeout=120) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        started.set()
        rest = [line for line in lines if line.startswith("data: ")]
    return rest, time.monotonic()


@contextlib.contextmanager
def a_long_story(base: str) -> Iterator[Future]:
    """`read_a_long_story` in a thread, yielded once its first event is in (its future)."""
    started = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        story = pool.submit(read_a_long_story, base, started)
        while not started.wait(0.1):
            if story.done():
                story.result()  # raises what stopped it
                pytest.fail("the long stream ended before its first event")
        yield story


def signal_a_long_story(base: str, proc: subprocess.Popen, signals: int) -> tuple[list[str], float, int]:
    """`signals` SIGTERMs 0.5 s apart while a long story streams: (its remaining `data: `
    lines, seconds from the first signal to its end, the server's exit status)."""
    with a_long_story(base) as story:
        signalled = time.monotonic()
        for _ in range(signals):
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
        rest, ended = story.result()
    return rest, ended - signalled, proc.wait(60)


class PlainRouting(NamedTuple):
    rate: float  # hit_rate's cached/prompt tokens under Ray's own power-of-two router
    per_request: list[int]  # hit_rate's cached tokens, request by request
    drain: tuple[list[str], float, int]  # signal_a_long_story(…, signals=2): rest, took, status


def plain_routing_then_two_signals(model_dir: Path, log_path: Path) -> PlainRouting:
    """One deployment serves two files (a deployment is ~30 s to start and stop here): Ray's
    own router (`--routing least-loaded`) for tests/test_scale_ray.py's hit-rate baseline, then
    its shutdown, a stream running past `--drain-timeout 600` when a second SIGTERM cuts the
    drain short, with engine processes (judged by tests/test_scale_drain.py). The deployment
    is gone when this returns, so no other can run beside it."""
    flags = ("--replicas", "2", "--threads", "1", "--max-batch", "2", "--routing", "least-loaded",
             "--drain-timeout", "600", "--engine-process")
    with ray_server(model_dir, *flags, log_path=log_path) as (base, proc):
        rate, per_request = hit_rate(base)
        return PlainRouting(rate, per_request, signal_a_long_story(base, proc, signals=2))


def check_ended_by_the_drain(rest: list[str], took: float, exit_status: int, drain_s: float) -> None:
    """A stream still running when the drain's `drain_s` were up ended with the wire format's
    error event (`shutting_down`, from the engine's drain) and [DONE], soon after; the server
    exited 0. Not `replica_died` from the ingress (Ray's force-kill, 2 x drain_s + 5 s and more
    after the signal) nor a cut connection."""
    assert rest[-1] == "data: [DONE]", rest[-3:]
    error = json.loads(rest[-2].removeprefix("data: "))["error"]
    assert error["code"] == "shutting_down", (error, took)
    assert took < drain_s + 6, took
    assert exit_status == 0


def check_sigterm_drains_then_exits(base: str, proc: subprocess.Popen,
                                    drain_s: float | None = None) -> None:
    """A running stream ends in full, new requests get 503 `shutting_down`, the server exits 0.

    With `drain_s` (the server's --drain-timeout), a second stream, far longer than the drain,
    runs alongside and must end with the `shutting_down` error event soon after `drain_s`
    (`check_ended_by_the_drain`): one shutdown shows both ends of a drain."""
    body = {"model": MODEL, "max_tokens": 60, "ignore_eos": True, "stream": True,
            "messages": [{"role": "user", "content": "Tell me a story."}]}
    with contextlib.ExitStack() as stack:
        story = None if drain_s is None else stack.enter_context(a_long_story(base))
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=120) as r:
            lines = r.iter_lines()
            next(lines)
            proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            deadline = signalled + 10
            while httpx.get(f"{base}/health", timeout=5).status_code != 503:
                assert time.monotonic() < deadline, "still healthy after SIGTERM"
                time.sleep(0.1)
            time.sleep(0.6)  # every ingress replica reads the drain flag every 0.25 s
            refused = httpx.post(f"{base}/v1/chat/completions", json={**body, "stream": False},
                                 timeout=30)
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        finish = [json.loads(e.removeprefix("data: "))["choices"][0]["finish_reason"]
                  for e in rest[:-1] if json.loads(e.removeprefix("data: "))["choices"]]
        assert finish[-1] == "length"  # it ran to its end, not cut off
        if story is not None:
            story_rest, ended = story.result()
            check_ended_by_the_drain(story_rest, ended - signalled, proc.wait(90), drain_s)
    assert proc.wait(90) == 0
