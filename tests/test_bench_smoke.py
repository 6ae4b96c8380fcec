"""The benchmark harness's pure helpers (prompts, stats, table rendering, selection).

Never runs a benchmark and never asserts a timing: those depend on the machine.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

# `bench/` is a repo directory, not an installed package: bare `pytest` (unlike
# `python -m pytest`) does not put the repo root on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import report  # noqa: E402
from bench.config import BenchConfig  # noqa: E402
from bench.machine import cpu_flags, machine_tag  # noqa: E402
from bench.merge import merge_rounds  # noqa: E402
from bench.prompts import PromptPool, build_prompt, corpus_ids, corpus_text  # noqa: E402
from bench.stats import advantage, decode_rate, gaps, median, percentile, summarize, ttft  # noqa: E402
from bench.suite import ENTRIES, select  # noqa: E402


def test_prompts_have_exact_lengths_and_never_overlap():
    pool = PromptPool(range(100_000))
    prompts = {n: pool.take_many(n, 4) for n in (16, 128, 1000, 4000)}
    assert all(len(p) == n for n, ps in prompts.items() for p in ps)
    streams = [pool.take_many(128, 32) for _ in range(2)]
    every = [t for ps in prompts.values() for p in ps for t in p] + [
        t for rd in streams for p in rd for t in p]
    assert len(every) == len(set(every)) == pool.used  # disjoint: no prefix-cache hits
    assert PromptPool(range(100_000)).take(16) == prompts[16][0] == list(range(16))
    assert build_prompt(list(range(50)), 16, index=1) == list(range(16, 32))


def test_prompt_longer_than_corpus_is_refused():
    with pytest.raises(ValueError, match="corpus has 10 tokens"):
        build_prompt(list(range(10)), 8, index=1)
    pool = PromptPool(range(10))
    pool.take(8)
    with pytest.raises(ValueError, match="corpus has 10 tokens"):
        pool.take(3)
    with pytest.raises(ValueError):
        build_prompt(list(range(10)), 0)


def test_corpus_is_big_enough_for_every_prompt():
    text = corpus_text()
    assert text == corpus_text()  # stable order
    # even a crude 5-bytes-per-token count covers every disjoint prompt of a full run
    ids = corpus_ids(lambda s: list(range(len(s.encode()) // 5)), text)
    cfg = BenchConfig()
    need = sum(n * (cfg.warmup + cfg.runs(n)) for n in {*cfg.ttft_lengths, *cfg.decode_lengths})
    need += (cfg.warmup + cfg.stream_rounds) * max(cfg.concurrency) * cfg.stream_prompt
    need += cfg.rss_slots * cfg.rss_prompt
    assert len(ids) > need


def test_stats_match_numpy():
    xs = [0.3, 0.1, 0.7, 0.2, 0.9, 0.4]
    for q in (0, 5, 50, 95, 100):
        assert percentile(xs, q) == pytest.approx(np.percentile(xs, q))
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert math.isnan(median([]))
    s = summarize([2, 1, 3])
    assert (s["median"], s["min"], s["max"], s["n"]) == (2, 1, 3, 3)


def test_stream_timings():
    times = [0.5, 0.6, 0.7, 0.8, 0.9]
    assert ttft(times) == 0.5
    assert decode_rate(times) == pytest.approx(10.0)  # 4 tokens after the first in 0.4 s
    assert decode_rate([0.5, 0.9], tokens=5) == pytest.approx(10.0)  # chunks carrying tokens
    assert gaps(times) == pytest.approx([0.1] * 4)
    with pytest.raises(ValueError):
        decode_rate([0.5])


def test_advantage_is_above_one_when_llorch_is_better():
    assert advantage(100.0, 50.0, higher_is_better=True) == 2.0  # tokens/s
    assert advantage(0.1, 0.4, higher_is_better=False) == 4.0  # seconds
    assert advantage(None, 1.0, higher_is_better=True) is None
    assert advantage(1.0, math.nan, higher_is_better=True) is None


def test_config_round_trips_through_json():
    for cfg in (BenchConfig(), BenchConfig.quick_config()):
        assert BenchConfig.from_dict(cfg.to_dict()) == cfg
    assert BenchConfig().max_context >= 4000 + 128


def test_select_by_group_and_key():
    entries, export = select(None)
    assert len(entries) == len(ENTRIES) and export
    entries, export = select(["llorch", "genai-int4"])
    assert [e.key for e in entries] == ["llorch-int4", "llorch-fp32", "genai-int4"] and not export
    with pytest.raises(ValueError, match="unknown"):
        select(["nope"])


def test_machine_tag():
    assert machine_tag(2, {"avx2", "fma"}) == "cpu2-avx2"
    assert machine_tag(8, {"avx2", "avx512f"}) == "cpu8-avx512"
    assert cpu_flags("processor: 0\nflags\t: fpu avx2\n") == {"fpu", "avx2"}


def _block(v: float) -> dict:
    return summarize([v])


def _results() -> dict:
    cfg = BenchConfig.quick_config().to_dict()
    one = lambda ttft_s, tps, rss: {  # noqa: E731
        "status": "ok", "ttft_s": {"16": _block(ttft_s), "128": _block(ttft_s * 2)},
        "decode_tps": {"128": _block(tps)}, "peak_rss_mb": rss, "load_before": [0.1, 0, 0],
        "load_after": [0.2, 0, 0]}
    return {
        "date": "2026-01-02T03:04:05",
        "machine": {"tag": "cpu2-avx2", "cpu": "Test CPU", "cpus": 2, "simd": ["avx2"],
                    "memory_gb": 8.0, "versions": {"llorch": "0.1.0", "llama-cpp-python": None}},
        "config": cfg,
        "load": {"start": [0.1, 0.2, 0.3], "end": [0.2, 0.2, 0.3]},
        "entries": {
            "llorch-int4": {**one(0.05, 90.0, 300.0), "label": "llorch int4",
                            "peer": "llorch_engine", "baseline": None},
            "genai-int4": {**one(0.10, 60.0, 330.0), "label": "GenAI int4", "peer": "genai",
                           "baseline": "llorch-int4"},
            "llamacpp-q4_1": {"status": "skipped", "reason": "llama_cpp is not importable",
                              "label": "llama.cpp", "peer": "llamacpp"},
            "llorch-concurrency": {
                "status": "ok", "label": "conc", "peer": "llorch_http", "baseline": None,
                "concurrency": {n: {"aggregate_tps": _block(a), "itl_p50_ms": 10.0,
                                    "itl_p95_ms": 20.0, "ttft_p50_s": 0.1, "ttft_p95_s": 0.2,
                                    "stream_decode_tps_median": a / int(n)}
                                for n, a in (("1", 90.0), ("4", 200.0))},
                "server_peak_rss_mb": {"1": 300.0, "4": 320.0}},
            "llorch-server-rss": {
                "status": "ok", "label": "rss", "peer": "llorch_http", "baseline": None,
                "server_rss": {"slots": 8, "max_length": 4096, "prompt": 1000, "new_tokens": 64,
                               "idle_rss_mb": 420.0, "peak_rss_mb": 900.0, "rss_after_mb": 800.0,
                               "kv_reserved_mb": 1440.0, "kv_touched_mb": 374.0,
                               "model_data_mb": 300.0, "tokens_held": 8512,
                               "rss_per_slot_mb": 47.5, "rss_per_1k_tokens_mb": 44.6}},
        },
        "export": {"hf": {"status": "ok", "wall_s": _block(3.5), "peak_rss_mb": _block(410.0)}},
    }


def test_markdown_report_has_ratios_skips_and_targets():
    md = report.render_markdown(_results())
    assert "cpu2-avx2" in md and "--quick" in md
    assert "| GenAI int4 | 100 ms (2.00×) | 200 ms (2.00×) | 60.0 (1.50×) | 330 MB (1.10×)" in md
    assert "`llamacpp-q4_1` **skipped**: llama_cpp is not importable" in md
    assert "| 4 | 200.0 | 2.22× |" in md
    assert "3.50 s" in md and "410 MB" in md
    assert "RSS added per slot (8512 tokens held in all) | 48 MB" in md
    assert "RSS added per 1k tokens held | 45 MB" in md
    rows = {t["target"].split(" (")[0]: t for t in report.targets(_results())}
    decode = rows["int4 batch-1 decode"]
    assert decode["measured"] == pytest.approx(1.5) and decode["met"] is True
    assert rows["aggregate tokens/s at 16 streams ≥ 4× single-stream"]["met"] is None


def test_rounds_pool_their_runs():
    def rnd(runs, agg, rss, foreign):
        return {"status": "ok", "ttft_s": {"16": summarize(runs)},
                "decode_tps": {"128": summarize([r * 100 for r in runs])},
                "concurrency": {"4": {"aggregate_tps": summarize([agg]), "itl_p50_ms": agg / 10,
                                      "itl_p95_ms": 1.0, "ttft_p50_s": 0.1, "ttft_p95_s": 0.2,
                                      "stream_decode_tps_median": 1.0}},
                "server_peak_rss_mb": {"4": rss}, "peak_rss_mb": rss, "foreign_cpus": foreign,
                "wall_s": 1.0}
    merged = merge_rounds([rnd([1.0, 2.0], 100.0, 300.0, 0.0), rnd([3.0], 200.0, 350.0, 0.05),
                           {"status": "error", "reason": "boom"}])
    assert merged["ttft_s"]["16"]["runs"] == [1.0, 2.0, 3.0]
    assert merged["ttft_s"]["16"]["median"] == 2.0
    assert merged["decode_tps"]["128"]["n"] == 3
    assert merged["concurrency"]["4"]["aggregate_tps"]["median"] == 150.0
    assert merged["concurrency"]["4"]["itl_p50_ms"] == 15.0
    assert merged["peak_rss_mb"] == merged["server_peak_rss_mb"]["4"] == 350.0
    assert merged["foreign_cpus"] == 0.05  # the worst round used
    assert (merged["rounds"], merged["rounds_ok"], merged["wall_s"]) == (3, 2, 2.0)
    # a round disturbed by other processes is left out while a quiet one exists
    busy = merge_rounds([rnd([1.0], 100.0, 300.0, 0.0), rnd([9.0], 10.0, 300.0, 0.7)])
    assert busy["ttft_s"]["16"]["runs"] == [1.0] and busy["rounds_dropped_busy"] == 1
