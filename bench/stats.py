"""Summary statistics of timings (pure functions: no numpy needed)."""

from __future__ import annotations

import math
from collections.abc import Sequence


def median(xs: Sequence[float]) -> float:
    return percentile(xs, 50)


def percentile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default method); NaN for no data."""
    if not xs:
        return math.nan
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    s = sorted(xs)
    pos = (len(s) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(xs: Sequence[float]) -> dict:
    """{"median", "min", "max", "n", "runs"}: what the results file keeps of repeated runs."""
    xs = [float(x) for x in xs]
    return {
        "median": median(xs),
        "min": min(xs) if xs else math.nan,
        "max": max(xs) if xs else math.nan,
        "n": len(xs),
        "runs": xs,
    }


def ttft(timestamps: Sequence[float]) -> float:
    """Time to first token: the first token's arrival, seconds after the request started."""
    if not timestamps:
        raise ValueError("no tokens arrived")
    return timestamps[0]


def decode_rate(timestamps: Sequence[float], tokens: int | None = None) -> float:
    """Tokens/s after the first token: (tokens - 1) / (last arrival - first arrival).

    `tokens` is how many tokens the timestamps stand for (an HTTP chunk may carry several, or
    none for a token whose text is held back); default: one token per timestamp.
    """
    n = len(timestamps) if tokens is None else tokens
    if n < 2 or len(timestamps) < 2:
        raise ValueError("decode rate needs at least two tokens")
    span = timestamps[-1] - timestamps[0]
    return (n - 1) / span if span > 0 else math.inf


def gaps(timestamps: Sequence[float]) -> list[float]:
    """Inter-token latencies: differences between consecutive arrivals."""
    return [b - a for a, b in zip(timestamps, timestamps[1:], strict=False)]


def advantage(llorch: float | None, peer: float | None, *, higher_is_better: bool) -> float | None:
    """How many times better llorch is than a peer (>1: llorch better), or None.

    Throughput: llorch / peer. Times and memory: peer / llorch.
    """
    if llorch is None or peer is None or not (llorch > 0 and peer > 0):
        return None
    if math.isinf(llorch) or math.isinf(peer) or math.isnan(llorch) or math.isnan(peer):
        return None
    return llorch / peer if higher_is_better else peer / llorch
