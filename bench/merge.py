"""Merge one entry's results from several rounds (`python -m bench --rounds K`).

Rounds interleave the entries in time (round 1: every entry, round 2: every entry, …), so a
slow spell of a shared host lands on every entry instead of one. Rounds during which other
processes used more than `BUSY` CPUs are left out when at least one quieter round exists;
the remaining rounds' runs are pooled (medians over all their runs), peaks take the maximum,
and each round's own medians stay in `per_round` for inspection.
"""

from __future__ import annotations

from bench.stats import median, summarize

_POOLED = ("ttft_s", "decode_tps")
BUSY = 0.1  # CPUs used by other processes above which a round counts as disturbed
_CONC_MEDIAN = ("itl_p50_ms", "itl_p95_ms", "ttft_p50_s", "ttft_p95_s", "stream_decode_tps_median")


def merge_rounds(rounds: list[dict]) -> dict:
    """One entry's result from its per-round results (all for the same entry)."""
    ok = [r for r in rounds if r.get("status") == "ok"]
    if not ok:
        return {**rounds[0], "rounds": len(rounds)}
    quiet = [r for r in ok if (r.get("foreign_cpus") or 0.0) <= BUSY]
    dropped = len(ok) - len(quiet) if quiet else 0
    ok = quiet or ok
    out = dict(ok[0])
    for key in _POOLED:
        blocks = [r.get(key) or {} for r in ok]
        out[key] = {n: summarize([x for b in blocks for x in b.get(n, {}).get("runs", [])])
                    for n in dict.fromkeys(n for b in blocks for n in b)}
    if any("concurrency" in r for r in ok):
        conc: dict = {}
        for n in dict.fromkeys(n for r in ok for n in r.get("concurrency", {})):
            levels = [r["concurrency"][n] for r in ok if n in r.get("concurrency", {})]
            merged = dict(levels[0])
            merged["aggregate_tps"] = summarize(
                [x for lv in levels for x in lv["aggregate_tps"]["runs"]])
            for k in _CONC_MEDIAN:
                merged[k] = median([lv[k] for lv in levels if lv.get(k) is not None])
            conc[n] = merged
        out["concurrency"] = conc
        out["server_peak_rss_mb"] = {
            n: max(r["server_peak_rss_mb"][n] for r in ok if n in r.get("server_peak_rss_mb", {}))
            for n in conc}
    for key in ("peak_rss_mb", "worker_peak_rss_mb", "foreign_cpus"):
        vals = [r[key] for r in ok if r.get(key) is not None]
        if vals:
            out[key] = max(vals)
    if any("server_rss" in r for r in ok):
        out["server_rss"] = max((r["server_rss"] for r in ok if "server_rss" in r),
                                key=lambda s: s["peak_rss_mb"] or 0)
    if all("load_s" in r for r in ok):
        out["load_s"] = median([r["load_s"] for r in ok])
    out["wall_s"] = sum(r.get("wall_s", 0) for r in rounds)
    out["rounds"] = len(rounds)
    out["rounds_ok"] = len(ok) + dropped
    out["rounds_dropped_busy"] = dropped
    out["per_round"] = [_digest(r) for r in rounds]
    return out


def _digest(r: dict) -> dict:
    d = {"status": r.get("status"), "foreign_cpus": r.get("foreign_cpus")}
    for key in _POOLED:
        if r.get(key):
            d[key] = {n: b["median"] for n, b in r[key].items()}
    if r.get("concurrency"):
        d["aggregate_tps"] = {n: c["aggregate_tps"]["median"] for n, c in r["concurrency"].items()}
    if r.get("code"):
        d["code"] = r["code"]
    return d
