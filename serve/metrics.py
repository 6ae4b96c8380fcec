"""Prometheus metrics for `GET /metrics`: HTTP requests, tokens, latencies, engine state.

`Metrics` owns one registry per server (so several apps in one process never clash). The
routes count requests; the engine thread reports through the `EngineObserver` hooks; the
gauges read the engine when scraped. Process RSS and CPU come from prometheus-client's
`ProcessCollector` (`process_resident_memory_bytes`; Linux only).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Sequence

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

from serve.events import EngineObserver, RequestStats

CONTENT_TYPE = CONTENT_TYPE_LATEST
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
TPS_BUCKETS = (1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500)
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
THROUGHPUT_WINDOW_S = 10.0


class Metrics(EngineObserver):
    """Every metric of one server. `bind(engine)` once the engine has loaded."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self._engine = None
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) for the throughput gauge
        self._recent_lock = threading.Lock()

        self.requests = Counter("llorch_requests", "HTTP requests by endpoint and status code.",
                                ["endpoint", "status"], registry=r)
        self.outcomes = Counter("llorch_engine_requests", "Engine requests by how they ended "
                                "(ok, cancelled, error, queue_timeout, shutting_down).",
                                ["outcome"], registry=r)
        self.prompt_tokens = Counter("llorch_prompt_tokens", "Prompt tokens of ended requests.",
                                     registry=r)
        self.generation_tokens = Counter("llorch_generation_tokens",
                                         "Tokens generated (all choices) by ended requests.", registry=r)
        self.cache_queries = Counter("llorch_prefix_cache_queries",
                                     "Prompt tokens looked up in the prefix cache.", registry=r)
        self.cache_hits = Counter("llorch_prefix_cache_hits",
                                  "Prompt tokens found in the prefix cache (not prefilled again).",
                                  registry=r)
        self.cache_hit_requests = Counter("llorch_prefix_cache_hit_requests",
                                          "Requests that reused cached prompt tokens.", registry=r)
        self.ttft = Histogram("llorch_time_to_first_token_seconds",
                              "Seconds from submission to the first token.", buckets=TTFT_BUCKETS,
                              registry=r)
        self.itl = Histogram("llorch_inter_token_latency_seconds",
                             "Seconds between consecutive tokens of one choice.", buckets=ITL_BUCKETS,
                             registry=r)
        self.request_tps = Histogram("llorch_request_tokens_per_second",
                                     "Decode speed of each request after its first token.",
                                     buckets=TPS_BUCKETS, registry=r)
        self.queue_time = Histogram("llorch_request_queue_seconds",
                                    "Seconds requests waited for a slot.", buckets=DURATION_BUCKETS,
                                    registry=r)
        self.duration = Histogram("llorch_request_duration_seconds",
                                  "Seconds from submission to the end of the request.",
                                  buckets=DURATION_BUCKETS, registry=r)
        gauges = {
            "llorch_generation_tokens_per_second":
                ("Tokens generated per second, all requests, over the last "
                 f"{THROUGHPUT_WINDOW_S:g} s.", self._throughput),
            "llorch_requests_running": ("Requests holding KV slots.", self._read("num_running")),
            "llorch_requests_waiting": ("Requests waiting for a KV slot.", self._read("num_waiting")),
            "llorch_slots_in_use": ("KV slots owned by running sequences.", self._read("slots_in_use")),
            "llorch_slots": ("KV slots (--max-batch).", self._read("n_slots")),
            "llorch_kv_cache_bytes_in_use": ("Bytes of KV cache holding tokens, idle cached "
                                             "slots included.", self._read("kv_bytes_in_use")),
            "llorch_kv_cache_bytes": ("Bytes of KV cache preallocated.", self._read("kv_bytes")),
            "llorch_prefix_cache_tokens": ("Tokens idle slots keep for reuse.",
                                           self._read("cached_prefix_tokens")),
        }
        for name, (doc, read) in gauges.items():
            Gauge(name, doc, registry=r).set_function(read)
        ProcessCollector(registry=r)

    def bind(self, engine) -> None:
        """The engine whose state the gauges report."""
        self._engine = engine

    def _read(self, attr: str):
        def read() -> float:
            value = getattr(self._engine, attr, 0) if self._engine is not None else 0
            return float(value() if callable(value) else value)

        return read

    def _throughput(self) -> float:
        cutoff = time.monotonic() - THROUGHPUT_WINDOW_S
        with self._recent_lock:
            while self._recent and self._recent[0][0] < cutoff:
                self._recent.popleft()
            return sum(n for _, n in self._recent) / THROUGHPUT_WINDOW_S

    def _add_recent(self, n: int) -> None:
        with self._recent_lock:
            self._recent.append((time.monotonic(), n))

    # -- HTTP side ---------------------------------------------------------------------------
    def request(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # -- engine hooks (engine thread) --------------------------------------------------------
    def first_token(self, ttft: float) -> None:
        self.ttft.observe(ttft)
        self._add_recent(1)

    def tokens(self, gaps: Sequence[float]) -> None:
        if not gaps:
            return
        for gap in gaps:
            self.itl.observe(gap)
        self._add_recent(len(gaps))

    def request_done(self, stats: RequestStats) -> None:
        self.outcomes.labels(outcome=stats.outcome).inc()
        self.prompt_tokens.inc(stats.prompt_tokens)
        self.generation_tokens.inc(stats.completion_tokens)
        self.queue_time.observe(stats.queued)
        self.duration.observe(stats.duration)
        if stats.admitted:
            self.cache_queries.inc(stats.prompt_tokens)
            self.cache_hits.inc(stats.cached_tokens)
            if stats.cached_tokens:
                self.cache_hit_requests.inc()
        tps = stats.tokens_per_second
        if tps is not None:
            self.request_tps.observe(tps)
