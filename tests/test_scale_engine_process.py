"""`llorch serve --replicas 2 --engine-process`: each Ray Serve replica runs its engine in a
child process (serve.scale.engine_process), end to end on the default model through HAProxy
(slow).

Through the official openai client and raw httpx: greedy answers and streams equal a single
process's, `/health` names each replica's engine process and `/metrics` carries the engine's
counters from the child, a disconnect frees the slot, a killed engine child ends its stream
with an error event (the replica's process lives on to send it) and Ray replaces that
replica, SIGTERM drains: a running stream ends in full, one past --drain-timeout ends with the
`shutting_down` error event. Skipped without Ray.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time

import httpx
import pytest

pytest.importorskip("ray", reason="Ray Serve is the optional .[ray] extra: pip install 'llorch[ray]'")

from _scale_cluster import (  # noqa: E402 - after the skip
    MODEL,
    QUESTIONS,
    busy_replicas,
    check_a_disconnect_frees_the_slot,
    check_greedy_answers_and_streams,
    check_sigterm_drains_then_exits,
    cluster_fixtures,
    health,
    next_events,
    wait_for_a_replacement,
    wait_for_idle_replicas,
)

pytestmark = pytest.mark.slow

# --drain-timeout: the SIGTERM test also runs a stream past it (a running stream of 60 tokens
# still has to finish inside it, on a starved machine too).
DRAIN_S = 8.0
FLAGS = ("--replicas", "2", "--threads", "1", "--max-batch", "2", "--engine-process",
         "--ray-ingress", "haproxy", "--drain-timeout", str(DRAIN_S))

cluster, client = cluster_fixtures("engine-process", *FLAGS)


def _engine_pids(base: str) -> dict[str, int]:
    return {rid: h["engine_pid"] for rid, h in health(base)["replicas"].items()}


def test_greedy_answers_and_streams_equal_a_single_process(cluster, client, single_process_answers):
    check_greedy_answers_and_streams(cluster.base, client, single_process_answers)


def test_each_replica_has_its_own_engine_process_and_metrics_come_from_it(cluster, client):
    base = cluster.base
    pids = _engine_pids(base)
    assert len(pids) == 2 and len(set(pids.values())) == 2
    for pid in pids.values():
        os.kill(pid, 0)  # alive, a process of its own
        assert pid != cluster.proc.pid
    cores = [tuple(h["cores"]) for h in health(base)["replicas"].values()]
    assert cores[0] != cores[1]
    for rid, pid in pids.items():  # the child runs on its replica's core
        assert tuple(sorted(os.sched_getaffinity(pid))) == tuple(health(base)["replicas"][rid]["cores"])

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
    check_a_disconnect_frees_the_slot(cluster.base)


def test_a_killed_engine_process_ends_its_stream_with_an_error_and_ray_replaces_the_replica(
        cluster, client):
    base = cluster.base
    wait_for_idle_replicas(base)
    body = {"model": MODEL, "max_tokens": 1000, "ignore_eos": True, "stream": True,
            "messages": [{"role": "user", "content": "Count to a thousand."}]}
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=120) as r:
        lines = r.iter_lines()
        events = next_events(lines, 2)
        deadline = time.monotonic() + 30
        while not (busy := busy_replicas(base)):
            assert time.monotonic() < deadline
            events += next_events(lines, 2)
        os.kill(_engine_pids(base)[busy[0]], signal.SIGKILL)
        events += next_events(lines, 10_000)  # must end, not hang
    error = json.loads(events[-2])["error"]
    assert error["type"] == "server_error" and "engine process stopped" in error["message"]
    assert events[-1] == "[DONE]"
    time.sleep(1.0)  # the replica's process exits half a second after its engine's
    for q in QUESTIONS:  # the other replica answers meanwhile
        assert client.chat.completions.create(model=MODEL, max_tokens=4, temperature=0,
                                              messages=[{"role": "user", "content": q}]).choices
    wait_for_a_replacement(base, busy[0])  # Ray starts another in its place


def test_sigterm_drains_then_exits(cluster):
    """A running stream ends in full while one that outlives --drain-timeout ends with the
    `shutting_down` error event: the engine processes' drain (their deployment's SIGTERM serves
    both checks; tests/test_scale_ray.py has the in-process one on the proxy path)."""
    check_sigterm_drains_then_exits(cluster.base, cluster.proc, drain_s=DRAIN_S)
