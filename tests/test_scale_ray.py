"""`llorch serve --replicas 2` on Ray Serve, end to end on the default model (slow).

Two replicas with one thread each (disjoint cores) and two ingress replicas behind Ray Serve's
HTTP proxy, through the official openai client and raw httpx: greedy answers equal a single
process's, streams are incremental and end with [DONE], under load a replica sends fewer Ray
chunks than SSE events (a lone stream's are never held), a disconnect frees the slot on its
replica, `ray.kill` of a replica mid-stream ends that stream with an OpenAI-shaped error and Ray
brings a replica back, prefix-affinity routing (one table for both ingresses) beats Ray's plain
router on the prefix-cache hit rate (the router's deployment is the session's `plain_routing`,
shared with tests/test_scale_drain.py), SIGTERM drains every ingress: a running stream ends in
full, one that outlives --drain-timeout ends with the `shutting_down` error event.
Skipped when Ray is not installed (`pip install 'llorch[ray]'`).
"""

from __future__ import annotations

import json
import time

import httpx
import pytest

pytest.importorskip("ray", reason="Ray Serve is the optional .[ray] extra: pip install 'llorch[ray]'")

from _scale_cluster import (  # noqa: E402 - after the skip
    MODEL,
    QUESTIONS,
    TOPICS,
    busy_replicas,
    check_a_disconnect_frees_the_slot,
    check_sigterm_drains_then_exits,
    cluster_fixtures,
    gcs_address,
    health,
    hit_rate,
    kill_replica,
    wait_for_a_replacement,
    wait_for_idle_replicas,
)

pytestmark = pytest.mark.slow

# --max-batch 2: each replica's idle slots hold two prompts, so four distinct system prompts
# fit on two replicas only when each replica keeps getting the same two.
# Two ingress replicas (the default: one per replica) share the prefix table. A low
# --stream-chunk-rate makes the coalescing visible at this machine's token rate: with 4 or more
# requests in flight on a replica its streams' events wait up to 50 ms for company.
RAY_FLAGS = ("--replicas", "2", "--threads", "1", "--max-batch", "2", "--stream-chunk-rate", "50")
# --drain-timeout: the SIGTERM test also runs a stream past it (a running stream of 60 tokens
# still has to finish inside it, on a starved machine too).
DRAIN_S = 8.0

# Ray's own router (the baseline that prefix affinity must beat) is measured on the session's
# `plain_routing` deployment (tests/conftest.py), gone before this one starts.
cluster, client = cluster_fixtures("ray", *RAY_FLAGS, "--drain-timeout", str(DRAIN_S),
                                   after="plain_routing")


def test_greedy_answers_equal_a_single_process(client, single_process_answers):
    for question, expected in single_process_answers.items():
        r = client.chat.completions.create(model=MODEL, max_tokens=24, temperature=0,
                                           messages=[{"role": "user", "content": question}])
        assert r.choices[0].message.content == expected
    assert "Paris" in single_process_answers[QUESTIONS[0]]


def test_one_request_id_crosses_ray(cluster):
    """Ray Serve's proxy appends its own X-Request-ID; the replica's copy is dropped at the
    ingress, so a client (and the SDKs' `_request_id`) reads one id, the same as `request-id`."""
    r = httpx.post(f"{cluster.base}/v1/chat/completions", timeout=120,
                   json={"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200
    assert r.headers.get_list("x-request-id") == r.headers.get_list("request-id") and len(r.headers.get_list("request-id")) == 1


def test_replicas_hold_disjoint_cores_and_report_in_health(cluster):
    state = health(cluster.base)
    assert state["status"] == "ok" and state["ready_replicas"] == 2
    cores = [tuple(r["cores"]) for r in state["replicas"].values()]
    assert len(cores) == 2 and all(len(c) == 1 for c in cores) and cores[0] != cores[1]
    assert all(0 <= r["report_age_s"] < 5 for r in state["replicas"].values())  # a beat a second


def test_streams_pass_through_chunk_by_chunk(cluster, client, single_process_answers):
    base = cluster.base
    body = {"model": MODEL, "max_tokens": 24, "temperature": 0, "stream": True,
            "messages": [{"role": "user", "content": QUESTIONS[0]}]}
    arrivals, events = [], []
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                arrivals.append(time.monotonic())
                events.append(line.removeprefix("data: "))
    assert events[-1] == "[DONE]"
    text = "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1])
    assert text == single_process_answers[QUESTIONS[0]]
    # Incremental: the first token came well before the last (24 tokens take >100 ms here).
    assert len(events) > 5 and arrivals[-2] - arrivals[1] > 0.05
    stream = client.chat.completions.create(model=MODEL, max_tokens=24, temperature=0, stream=True,
                                            messages=[{"role": "user", "content": QUESTIONS[1]}])
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == \
        single_process_answers[QUESTIONS[1]]


def test_a_disconnect_frees_the_slot_on_its_replica(cluster):
    check_a_disconnect_frees_the_slot(cluster.base)


def _ray_counters(base: str) -> dict[str, float]:
    """Chunks sent through Ray, the app's body messages and generated tokens, all replicas."""
    sums = dict.fromkeys(("llorch_ray_chunks_total", "llorch_ray_body_messages_total",
                          "llorch_generation_tokens_total"), 0.0)
    for line in httpx.get(f"{base}/metrics", timeout=10).text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in sums:
            sums[name] += float(line.rsplit(" ", 1)[1])
    return sums


def _settled_counters(base: str) -> dict[str, float]:
    """`_ray_counters` once two readings a few heartbeats apart agree (replicas report every s)."""
    last = _ray_counters(base)
    for _ in range(20):
        time.sleep(2.5)
        now = _ray_counters(base)
        if now == last:
            return now
        last = now
    return last


def _stream_events(base: str, content: str, max_tokens: int) -> list[str]:
    body = {"model": MODEL, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0,
            "stream": True, "messages": [{"role": "user", "content": content}]}
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=300) as r:
        assert r.status_code == 200
        return [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]


def test_under_load_streams_cross_ray_in_fewer_chunks_with_the_same_events(cluster):
    """A lone stream: one chunk per event (nothing held). Eight at once on two replicas (four
    in flight on each): several events per chunk, and every stream still whole and in order."""
    from concurrent.futures import ThreadPoolExecutor

    base = cluster.base
    before = _settled_counters(base)
    alone = _stream_events(base, "Count slowly.", 16)
    after_one = _settled_counters(base)
    chunks = after_one["llorch_ray_chunks_total"] - before["llorch_ray_chunks_total"]
    messages = after_one["llorch_ray_body_messages_total"] - before["llorch_ray_body_messages_total"]
    # Nothing is held: about one chunk per event (the head, role + first token, goes as one).
    assert alone[-1] == "[DONE]" and 0.75 * messages <= chunks <= messages
    with ThreadPoolExecutor(8) as pool:
        streams = list(pool.map(lambda k: _stream_events(base, f"Count from {k}.", 24), range(8)))
    after = _settled_counters(base)
    chunks = after["llorch_ray_chunks_total"] - after_one["llorch_ray_chunks_total"]
    messages = after["llorch_ray_body_messages_total"] - after_one["llorch_ray_body_messages_total"]
    tokens = after["llorch_generation_tokens_total"] - after_one["llorch_generation_tokens_total"]
    print(f"\n8 streams x 24 tokens: {chunks:.0f} Ray chunks for {messages:.0f} SSE events, "
          f"{tokens:.0f} tokens ({chunks / tokens:.2f} chunks per token)")
    # Without coalescing a chunk carries ~1.0-1.1 events (only the head joins); with it, 0.56-0.80
    # of a chunk per event was measured here (the quieter the machine, the less there is to join).
    assert tokens == 8 * 24 and chunks < 0.9 * messages
    for events in streams:
        assert events[-1] == "[DONE]"
        chunks_ = [json.loads(e) for e in events[:-1]]
        assert chunks_[0]["choices"][0]["delta"]["role"] == "assistant"
        assert chunks_[-1]["choices"][0]["finish_reason"] == "length"
        assert len({c["id"] for c in chunks_}) == 1


def test_prefix_affinity_beats_plain_routing(cluster, plain_routing):
    affinity, per_request = hit_rate(cluster.base)
    plain, plain_per_request = plain_routing.rate, plain_routing.per_request
    print(f"\nprefix-cache hit rate (cached/prompt tokens), 4 system prompts x 4 questions over "
          f"2 replicas x 2 slots: affinity {affinity:.3f} {per_request}, plain {plain:.3f} "
          f"{plain_per_request}")
    # With affinity, each prompt's first request is the only miss.
    assert sum(1 for hit in per_request[len(TOPICS):] if hit == 0) == 0
    assert affinity > plain + 0.1


def test_killing_a_replica_mid_stream_ends_it_with_an_error_and_ray_recovers(cluster, client):
    base = cluster.base
    body = {"model": MODEL, "max_tokens": 1000, "ignore_eos": True, "stream": True,
            "messages": [{"role": "user", "content": "Count to a thousand."}]}
    wait_for_idle_replicas(base)  # earlier tests' reports gone: the busy replica will be ours
    events = []
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=120) as r:
        lines = r.iter_lines()
        events.append(next(lines))
        deadline = time.monotonic() + 10
        while not (busy := busy_replicas(base)):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        kill_replica(gcs_address(cluster.log), busy[0])
        events.extend(line for line in lines if line.startswith("data: "))
    error = json.loads(events[-2].removeprefix("data: "))["error"]
    assert error["code"] == "replica_died" and error["type"] == "server_error"
    assert events[-1] == "data: [DONE]"
    # New requests keep being answered meanwhile, and Ray brings a second replica back.
    for q in QUESTIONS:
        assert client.chat.completions.create(model=MODEL, max_tokens=4, temperature=0,
                                              messages=[{"role": "user", "content": q}]).choices
    wait_for_a_replacement(base, busy[0])
    cores = [tuple(r["cores"]) for r in health(base)["replicas"].values()]
    assert all(len(c) == 1 for c in cores) and cores[0] != cores[1]  # the dead one's core reused


def test_sigterm_drains_then_exits(cluster):
    """A running stream ends in full while one that outlives --drain-timeout ends with the
    `shutting_down` error event, in process on the proxy path (tests/test_scale_engine_process.py:
    with engine processes behind HAProxy; tests/test_scale_drain.py: a second signal)."""
    check_sigterm_drains_then_exits(cluster.base, cluster.proc, drain_s=DRAIN_S)
