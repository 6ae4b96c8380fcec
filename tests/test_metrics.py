"""Metrics, CORS, prompt logging, 429/503 mapping, draining and the new flags, against a fake
engine (no model). The same features run through the real server in test_batching_e2e.py."""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient
from test_app_unit import MODEL, MSG, FakeEngine, wait_ready

from serve.app import create_app, drain
from serve.events import QueueFull, RequestStats, ShuttingDown
from serve.metrics import Metrics
from serve.options import ServeOptions, add_arguments, options_from_args


def samples(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def client_for(engine, **options) -> TestClient:
    app = create_app(ServeOptions(model_dir=Path("."), **options), lambda: engine, model_name=MODEL)
    return TestClient(app)


def test_metrics_observer_hooks():
    m = Metrics()
    o = m.observer("a")
    o.first_token(0.2)
    o.tokens([0.01, 0.02, 0.03])
    o.request_done(RequestStats("r1", "ok", prompt_tokens=40, cached_tokens=30, completion_tokens=4,
                                queued=0.1, ttft=0.2, duration=0.5, finish_reasons=("length",)))
    o.request_done(RequestStats("r2", "queue_timeout", prompt_tokens=9, cached_tokens=0,
                                completion_tokens=0, queued=2.0, ttft=None, duration=2.0, admitted=False))
    m.request("/v1/completions", 200)

    class Engine:
        num_running, num_waiting, slots_in_use, n_slots, cached_prefix_tokens = 1, 2, 3, 4, 5

        def kv_bytes(self):
            return 1000

        def kv_bytes_in_use(self):
            return 250

    m.bind(Engine(), "a")
    m.observer("b").request_done(RequestStats("r3", "ok", prompt_tokens=7, cached_tokens=0,
                                               completion_tokens=1, queued=0.0, ttft=0.1, duration=0.1))
    s = samples(m.render().decode())
    assert s[("llorch_requests_total", (("endpoint", "/v1/completions"), ("status", "200")))] == 1
    assert s[("llorch_prompt_tokens_total", (("model", "a"),))] == 49
    assert s[("llorch_generation_tokens_total", (("model", "a"),))] == 4
    assert s[("llorch_prefix_cache_queries_total", (("model", "a"),))] == 40  # the timed-out one never looked
    assert s[("llorch_prefix_cache_hits_total", (("model", "a"),))] == 30
    assert s[("llorch_prefix_cache_hit_requests_total", (("model", "a"),))] == 1
    assert s[("llorch_engine_requests_total", (("model", "a"), ("outcome", "queue_timeout")))] == 1
    assert s[("llorch_time_to_first_token_seconds_count", (("model", "a"),))] == 1
    assert s[("llorch_inter_token_latency_seconds_count", (("model", "a"),))] == 3
    assert s[("llorch_inter_token_latency_seconds_sum", (("model", "a"),))] == pytest.approx(0.06)
    assert s[("llorch_request_tokens_per_second_count", (("model", "a"),))] == 1  # (4 - 1) / 0.3 s
    assert s[("llorch_request_tokens_per_second_sum", (("model", "a"),))] == pytest.approx(10.0)
    assert s[("llorch_generation_tokens_per_second", (("model", "a"),))] == pytest.approx(0.4)  # 4 tokens / 10 s
    assert [s[(f"llorch_{g}", (("model", "a"),))] for g in ("requests_running", "requests_waiting", "slots_in_use",
                                            "slots", "prefix_cache_tokens")] == [1, 2, 3, 4, 5]
    assert s[("llorch_kv_cache_bytes", (("model", "a"),))] == 1000 and s[("llorch_kv_cache_bytes_in_use", (("model", "a"),))] == 250
    assert s[("llorch_prompt_tokens_total", (("model", "b"),))] == 7  # each model its own
    assert ("llorch_slots", (("model", "b"),)) not in s  # b's engine is not loaded
    m.unbind("a")
    assert ("llorch_slots", (("model", "a"),)) not in samples(m.render().decode())
    assert Metrics().render()  # one registry per instance: no duplicate-name errors


def test_metrics_route_counts_requests_by_endpoint_and_status():
    with client_for(FakeEngine()) as c:
        wait_ready(c)
        assert c.post("/v1/chat/completions", json={"messages": MSG}).status_code == 200
        assert c.post("/v1/chat/completions", json={"model": "gpt-4", "messages": MSG}).status_code == 404
        r = c.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        s = samples(r.text)
    chat = "/v1/chat/completions"
    assert s[("llorch_requests_total", (("endpoint", chat), ("status", "200")))] == 1
    assert s[("llorch_requests_total", (("endpoint", chat), ("status", "404")))] == 1
    assert s[("llorch_requests_total", (("endpoint", "/health"), ("status", "200")))] >= 1


def test_cors_is_off_by_default_and_on_for_listed_origins():
    preflight = {"Origin": "http://ui.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    with client_for(FakeEngine()) as c:
        wait_ready(c)
        r = c.post("/v1/chat/completions", json={"messages": MSG}, headers={"Origin": "http://ui.example"})
        assert "access-control-allow-origin" not in r.headers
        assert c.options("/v1/chat/completions", headers=preflight).status_code == 405
    with client_for(FakeEngine(), cors_origins=("http://ui.example",)) as c:
        wait_ready(c)
        r = c.options("/v1/chat/completions", headers=preflight)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://ui.example"
        r = c.post("/v1/chat/completions", json={"messages": MSG}, headers={"Origin": "http://ui.example"})
        assert r.headers["access-control-allow-origin"] == "http://ui.example"
        # a page's script can read the request id (and a 429's Retry-After)
        exposed = {h.strip() for h in r.headers["access-control-expose-headers"].split(",")}
        assert {"x-request-id", "request-id", "retry-after"} <= exposed and r.headers["x-request-id"]
        r = c.options("/v1/chat/completions", headers={**preflight, "Origin": "http://evil.example"})
        assert r.status_code == 400 and "access-control-allow-origin" not in r.headers


@pytest.mark.parametrize("log_prompts", [False, True])
def test_prompts_are_logged_only_when_asked(log_prompts, caplog):
    caplog.set_level(logging.INFO)
    with client_for(FakeEngine(), log_prompts=log_prompts) as c:
        wait_ready(c)
        c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "my secret"}]})
        c.post("/v1/completions", json={"prompt": "other secret"})
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert ("my secret" in logged) == log_prompts and ("other secret" in logged) == log_prompts


class RefusingEngine(FakeEngine):
    def __init__(self, exc: Exception) -> None:
        super().__init__()
        self.exc = exc

    def submit(self, request):
        if len(self.requests) >= 1:  # the second prompt of a completions request is refused
            raise self.exc
        return super().submit(request)


def test_queue_full_is_429_and_shutdown_is_503():
    engine = RefusingEngine(QueueFull("The server is busy: its queue is full."))
    with client_for(engine) as c:
        wait_ready(c)
        r = c.post("/v1/completions", json={"prompt": ["a", "b"]})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"] == {"message": "The server is busy: its queue is full.",
                                     "type": "requests", "param": None, "code": "rate_limit_exceeded"}
        assert engine.streams[0].cancelled  # the accepted first prompt is given back
    with client_for(RefusingEngine(ShuttingDown("bye"))) as c:
        wait_ready(c)
        r = c.post("/v1/completions", json={"prompt": ["a", "b"]})
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"


def test_draining_refuses_new_requests():
    engine = FakeEngine()
    app = create_app(ServeOptions(model_dir=Path(".")), lambda: engine, model_name=MODEL)
    with TestClient(app) as c:
        wait_ready(c)
        asyncio.run(drain(app, 1.0))  # the fake engine has no drain(): only the flag
        assert c.get("/health").status_code == 503 and c.get("/health").json() == {"status": "draining"}
        r = c.post("/v1/chat/completions", json={"messages": MSG})
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
        assert c.post("/tokenize", json={"prompt": "still fine"}).status_code == 200


def test_new_flags_map_onto_serve_options():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--max-queue", "3", "--queue-timeout", "2.5", "--prefix-cache-size", "0",
                              "--cors-origins", "http://a.example, http://b.example",
                              "--log-prompts", "--drain-timeout", "4"])
    o = options_from_args(Path("m"), args)
    assert (o.max_queue, o.queue_timeout, o.prefix_cache_size, o.log_prompts, o.drain_timeout) == (
        3, 2.5, 0, True, 4.0)
    assert o.cors_origins == ("http://a.example", "http://b.example")
    d = options_from_args(Path("m"), parser.parse_args([]))
    assert (d.max_queue, d.queue_timeout, d.prefix_cache_size, d.cors_origins, d.log_prompts) == (
        256, 600.0, None, (), False)  # a request waits for a slot 600 s at most by default
    assert ServeOptions(model_dir=Path("m"), queue_timeout=0).queue_timeout is None  # 0: no limit
    for bad in ({"max_queue": -1}, {"queue_timeout": -1}, {"queue_timeout": float("nan")},
                {"prefix_cache_size": -5}, {"drain_timeout": -1}):
        with pytest.raises(ValueError):
            ServeOptions(model_dir=Path("m"), **bad)


def test_observe_many_equals_observe_one_by_one() -> None:
    """The engine's per-step inter-token gaps go in as one increment a bucket; the histogram
    reads as if each gap had been observed (bounds inclusive, +Inf, sum)."""
    import random

    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from serve.metrics import ITL_BUCKETS, observe_many

    rng = random.Random(0)
    values = [rng.choice([0.0, 0.001, 0.0025, 0.003, 0.5, 2.5, 7.0]) * rng.choice([1, 0.5])
              for _ in range(500)] + [float("inf")]
    texts = []
    for batch in (False, True):
        registry = CollectorRegistry()
        h = Histogram("itl", "gaps", buckets=ITL_BUCKETS, registry=registry)
        if batch:
            observe_many(h, values[:250])
            observe_many(h, values[250:])
        else:
            for v in values:
                h.observe(v)
        texts.append([line for line in generate_latest(registry).decode().splitlines()
                      if "_created" not in line])
    assert texts[0] == texts[1]
    assert any(line.startswith('itl_bucket{le="0.001"}') for line in texts[1])
