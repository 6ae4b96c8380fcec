"""`llorch serve --replicas 2 --engine-process`: each Ray Serve replica runs its engine in a
child process (serve.scale.engine_process), end to end on the default model through HAProxy
(slow).

Through the official openai client and raw httpx: greedy answers and streams equal a single
process's, `/health` names each replica's engine process and `/metrics` carries the engine's
counters from the child, a disconnect frees the slot, a killed engine child ends its stream
with an error event (the replica's process lives on to send it) and Ray replaces that
replica, SIGTERM drains. Skipped without Ray.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time

import httpx
import pytest
from openai import OpenAI

pytest.importorskip("ray", reason="Ray Serve is the optional .[ray] extra: pip install 'llorch[ray]'")

from test_scale_haproxy import single_process_answers  # noqa: E402,F401 - a fixture
from test_scale_ray import (  # noqa: E402 - after the skip
    MODEL,
    QUESTIONS,
    _health,
    _next_events,
    _ready_replicas,
    _wait_for_idle_replicas,
    check_a_disconnect_frees_the_slot,
    check_sigterm_drains_then_exits,
    ray_server,
)

pytestmark = pytest.mark.slow

FLAGS = ("--replicas", "2", "--threads", "1", "--max-batch", "2", "--engine-process",
         "--ray-ingress", "haproxy")


@pytest.fixture(scope="module")
def cluster(default_model_dir, tmp_path_factory, single_process_answers):  # noqa: F811
    log = tmp_path_factory.mktemp("engine-process") / "server.log"
    with ray_server(default_model_dir, *FLAGS, log_path=log) as (base, proc):
        yield base, proc, log


@pytest.fixture
def client(cluster) -> OpenAI:
    return OpenAI(base_url=f"{cluster[0]}/v1", api_key="none", max_retries=0)


def _engine_pids(base: str) -> dict[str, int]:
    return {rid: h["engine_pid"] for rid, h in _health(base)["replicas"].items()}


def test_greedy_answers_and_streams_equal_a_single_process(cluster, client, single_process_answers):  # noqa: F811
    for question, expected in single_process_answers.items():
        r = client.chat.completions.create(model=MODEL, max_tokens=24, temperature=0,
                                           messages=[{"role": "user", "content": question}])
        assert r.choices[0].message.content == expected
    arrivals, text = [], ""
    stream = client.chat.completions.create(model=MODEL, max_tokens=24, temperature=0, stream=True,
                                            messages=[{"role": "user", "content": QUESTIONS[0]}])
    for chunk in stream:
        arrivals.append(time.monotonic())
        text += (chunk.choices[0].delta.content or "") if chunk.choices else ""
    assert text == single_process_answers[QUESTIONS[0]]
    assert len(arrivals) > 5 and arrivals[-2] - arrivals[1] > 0.05  # token by token


def test_each_replica_has_its_own_engine_process_and_metrics_come_from_it(cluster, client):
    base = cluster[0]
    pids = _engine_pids(base)
    assert len(pids) == 2 and len(set(pids.values())) == 2
    for pid in pids.values():
        os.kill(pid, 0)  # alive, a process of its own
        assert pid != cluster[1].pid
    cores = [tuple(h["cores"]) for h in _health(base)["replicas"].values()]
    assert cores[0] != cores[1]
    for rid, pid in pids.items():  # the child runs on its replica's core
        assert tuple(sorted(os.sched_getaffinity(pid))) == tuple(_health(base)["replicas"][rid]["cores"])

    def served() -> float:
        text = httpx.get(f"{base}/metrics", timeout=10).text
        return sum(float(v) for v in re.findall(
            r'^llorch_generation_tokens_total\{[^}]*\} (\S+)$', text, re.M))

    before = served()
    client.chat.completions.create(model=MODEL, max_tokens=5, temperature=0, extra_body={"ignore_eos": True},
                                   messages=[{"role": "user", "content": QUESTIONS[1]}])
    deadline = time.monotonic() + 10  # the replicas report once a second
    while served() < before + 5:
        assert time.monotonic() < deadline, httpx.get(f"{base}/metrics", timeout=10).text[-3000:]
        time.sleep(0.3)


def test_a_disconnect_frees_the_slot_on_its_replica(cluster):
    check_a_disconnect_frees_the_slot(cluster[0])


def test_a_killed_engine_process_ends_its_stream_with_an_error_and_ray_replaces_the_replica(
        cluster, client):
    base = cluster[0]
    _wait_for_idle_replicas(base)
    body = {"model": MODEL, "max_tokens": 1000, "ignore_eos": True, "stream": True,
            "messages": [{"role": "user", "content": "Count to a thousand."}]}
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=120) as r:
        lines = r.iter_lines()
        events = _next_events(lines, 2)
        deadline = time.monotonic() + 30
        while not (busy := [rid for rid, h in _health(base)["replicas"].items()
                            if h.get("slots_in_use")]):
            assert time.monotonic() < deadline
            events += _next_events(lines, 2)
        os.kill(_engine_pids(base)[busy[0]], signal.SIGKILL)
        events += _next_events(lines, 10_000)  # must end, not hang
    error = json.loads(events[-2])["error"]
    assert error["type"] == "server_error" and "engine process stopped" in error["message"]
    assert events[-1] == "[DONE]"
    time.sleep(1.0)  # the replica's process exits half a second after its engine's
    for q in QUESTIONS:  # the other replica answers meanwhile
        assert client.chat.completions.create(model=MODEL, max_tokens=4, temperature=0,
                                              messages=[{"role": "user", "content": q}]).choices
    deadline = time.monotonic() + 240  # Ray starts another in its place
    while (_ready_replicas(base) != 2 or busy[0] in _health(base)["replicas"]
           or len(_health(base)["replicas"]) != 2):
        assert time.monotonic() < deadline, f"no replacement replica: {_health(base)}"
        time.sleep(1)


def test_sigterm_drains_then_exits(cluster):
    check_sigterm_drains_then_exits(*cluster[:2])
