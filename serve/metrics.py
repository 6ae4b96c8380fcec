"""Prometheus metrics for `GET /metrics`: HTTP requests, tokens, latencies, engine state.

`Metrics` owns one registry per server (so several apps in one process never clash). The
routes count requests; each model's engine thread reports through its own `EngineObserver`
(`observer(model)`); the gauges read the loaded engines when scraped. Everything about an
engine carries a `model` label (the served id); HTTP request counts do not. Process RSS and CPU come from prometheus-client's
`ProcessCollector` (`process_resident_memory_bytes`; Linux only).
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from serve.events import EngineObserver, RequestStats

CONTENT_TYPE = CONTENT_TYPE_LATEST
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
TPS_BUCKETS = (1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500)
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
PREFILL_ROWS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
THROUGHPUT_WINDOW_S = 10.0


class Metrics:
    """Every metric of one server. `bind(engine, model)` once a model's engine has loaded,
    `unbind(model)` when it stops; `observer(model)` is what that engine reports to."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self._engines: dict[str, object] = {}
        self._recent: dict[str, deque[tuple[float, int]]] = {}  # (time, tokens): throughput
        self._recent_lock = threading.Lock()
        m = ["model"]

        self.requests = Counter("llorch_requests", "HTTP requests by endpoint and status code.",
                                ["endpoint", "status"], registry=r)
        self.outcomes = Counter("llorch_engine_requests", "Engine requests by how they ended "
                                "(ok, cancelled, error, queue_timeout, shutting_down).",
                                ["model", "outcome"], registry=r)
        self.prompt_tokens = Counter("llorch_prompt_tokens", "Prompt tokens of ended requests.",
                                     m, registry=r)
        self.generation_tokens = Counter("llorch_generation_tokens",
                                         "Tokens generated (all choices) by ended requests.", m,
                                         registry=r)
        self.cache_queries = Counter("llorch_prefix_cache_queries",
                                     "Prompt tokens looked up in the prefix cache.", m, registry=r)
        self.cache_hits = Counter("llorch_prefix_cache_hits",
                                  "Prompt tokens found in the prefix cache (not prefilled again).",
                                  m, registry=r)
        self.cache_hit_requests = Counter("llorch_prefix_cache_hit_requests",
                                          "Requests that reused cached prompt tokens.", m, registry=r)
        self.ttft = Histogram("llorch_time_to_first_token_seconds",
                              "Seconds from submission to the first token.", m, buckets=TTFT_BUCKETS,
                              registry=r)
        self.itl = Histogram("llorch_inter_token_latency_seconds",
                             "Seconds between consecutive tokens of one choice.", m,
                             buckets=ITL_BUCKETS, registry=r)
        self.request_tps = Histogram("llorch_request_tokens_per_second",
                                     "Decode speed of each request after its first token.", m,
                                     buckets=TPS_BUCKETS, registry=r)
        self.queue_time = Histogram("llorch_request_queue_seconds",
                                    "Seconds requests waited for a slot.", m,
                                    buckets=DURATION_BUCKETS, registry=r)
        self.duration = Histogram("llorch_request_duration_seconds",
                                  "Seconds from submission to the end of the request.", m,
                                  buckets=DURATION_BUCKETS, registry=r)
        self.spec_draft = Counter("llorch_spec_draft_tokens", "Draft tokens proposed by "
                                  "speculative decoding (--speculative) and verified.", m,
                                  registry=r)
        self.spec_accepted = Counter("llorch_spec_accepted_tokens", "Draft tokens accepted: "
                                     "acceptance rate = accepted / draft.", m, registry=r)
        self.prefill_rows = Histogram("llorch_prefill_batch_rows", "Prompts whose next chunk "
                                      "one engine step prefilled (one call for those starting "
                                      "from an empty slot, one each for the rest).", m,
                                      buckets=PREFILL_ROWS_BUCKETS, registry=r)
        r.register(_EngineGauges(self))
        ProcessCollector(registry=r)

    def bind(self, engine, model: str) -> None:
        """The engine whose state the gauges report for `model`."""
        self._engines[model] = engine

    def unbind(self, model: str) -> None:
        """`model`'s engine stopped: its gauges go."""
        self._engines.pop(model, None)

    def observer(self, model: str) -> EngineObserver:
        """The hooks `model`'s engine thread calls."""
        return _ModelObserver(self, model)

    def throughput(self, model: str) -> float:
        cutoff = time.monotonic() - THROUGHPUT_WINDOW_S
        with self._recent_lock:
            recent = self._recent.get(model, deque())
            while recent and recent[0][0] < cutoff:
                recent.popleft()
            return sum(n for _, n in recent) / THROUGHPUT_WINDOW_S

    def _add_recent(self, model: str, n: int) -> None:
        with self._recent_lock:
            self._recent.setdefault(model, deque()).append((time.monotonic(), n))

    # -- HTTP side ---------------------------------------------------------------------------
    def request(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


_GAUGES = {  # name: (help, engine attribute)
    "llorch_requests_running": ("Requests holding KV slots.", "num_running"),
    "llorch_requests_waiting": ("Requests waiting for a KV slot.", "num_waiting"),
    "llorch_slots_in_use": ("KV slots owned by running sequences.", "slots_in_use"),
    "llorch_slots": ("KV slots (--max-batch).", "n_slots"),
    "llorch_kv_cache_bytes_in_use": ("Bytes of KV cache holding tokens, idle cached slots "
                                     "included.", "kv_bytes_in_use"),
    "llorch_kv_cache_bytes": ("Bytes of KV cache preallocated.", "kv_bytes"),
    "llorch_prefix_cache_tokens": ("Tokens idle slots keep for reuse.", "cached_prefix_tokens"),
}


class _EngineGauges(Collector):
    """The loaded engines' state, read when scraped, one sample per model."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[GaugeMetricFamily]:
        engines = dict(self.metrics._engines)
        tps = GaugeMetricFamily("llorch_generation_tokens_per_second",
                                "Tokens generated per second, all requests, over the last "
                                f"{THROUGHPUT_WINDOW_S:g} s.", labels=["model"])
        for model in engines:
            tps.add_metric([model], self.metrics.throughput(model))
        yield tps
        for name, (doc, attr) in _GAUGES.items():
            family = GaugeMetricFamily(name, doc, labels=["model"])
            for model, engine in engines.items():
                value = getattr(engine, attr, 0)
                family.add_metric([model], float(value() if callable(value) else value))
            yield family


def observe_many(histogram, values: Sequence[float]) -> None:
    """``histogram.observe(v)`` for every value, as one increment a bucket: a decode step's
    inter-token gaps (one a running stream) cost ~2 us each through `observe` (a lock and a
    linear bucket walk each), on the engine thread. Uses prometheus-client's Histogram
    internals (`_upper_bounds`, `_buckets`, `_sum`, what `observe` itself touches); where a
    version lacks them, `observe` one by one."""
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if bounds is None or buckets is None or total is None or len(bounds) != len(buckets):
        for v in values:
            histogram.observe(v)
        return
    counts: dict[int, int] = {}
    for v in values:
        i = bisect.bisect_left(bounds, v)  # the first bound >= v, as observe's walk finds it
        counts[i] = counts.get(i, 0) + 1
    total.inc(float(sum(values)))
    for i, n in counts.items():
        buckets[i].inc(n)


class _ModelObserver(EngineObserver):
    """One model's engine hooks (engine thread): the shared metrics, labelled."""

    def __init__(self, metrics: Metrics, model: str) -> None:
        self.m, self.model = metrics, model
        for metric in (metrics.prompt_tokens, metrics.generation_tokens, metrics.cache_queries,
                       metrics.cache_hits, metrics.cache_hit_requests, metrics.ttft, metrics.itl,
                       metrics.request_tps, metrics.queue_time, metrics.duration,
                       metrics.spec_draft, metrics.spec_accepted, metrics.prefill_rows):
            metric.labels(model)  # a loaded model's series start at 0, not absent

    def first_token(self, ttft: float) -> None:
        self.m.ttft.labels(self.model).observe(ttft)
        self.m._add_recent(self.model, 1)

    def tokens(self, gaps: Sequence[float]) -> None:
        if not gaps:
            return
        observe_many(self.m.itl.labels(self.model), gaps)
        self.m._add_recent(self.model, len(gaps))

    def speculated(self, counts: tuple[int, int]) -> None:
        drafted, accepted = counts
        self.m.spec_draft.labels(self.model).inc(drafted)
        self.m.spec_accepted.labels(self.model).inc(accepted)

    def prefill_rows(self, n: int) -> None:
        self.m.prefill_rows.labels(self.model).observe(n)

    def request_done(self, stats: RequestStats) -> None:
        m, model = self.m, self.model
        m.outcomes.labels(model=model, outcome=stats.outcome).inc()
        m.prompt_tokens.labels(model).inc(stats.prompt_tokens)
        m.generation_tokens.labels(model).inc(stats.completion_tokens)
        m.queue_time.labels(model).observe(stats.queued)
        m.duration.labels(model).observe(stats.duration)
        if stats.admitted:
            m.cache_queries.labels(model).inc(stats.prompt_tokens)
            m.cache_hits.labels(model).inc(stats.cached_tokens)
            if stats.cached_tokens:
                m.cache_hit_requests.labels(model).inc()
        tps = stats.tokens_per_second
        if tps is not None:
            m.request_tps.labels(model).observe(tps)
