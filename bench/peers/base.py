"""What every single-stream peer shares: the `Skip` signal and the measuring loop.

A peer only has to say when each token of one greedy generation arrived
(`StreamRun.times`, seconds after the request started, prefill included); this module turns
that into TTFT per prompt length and decode tokens/s, the same way for everyone.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from bench.config import BenchConfig
from bench.stats import decode_rate, summarize, ttft


class Skip(Exception):
    """The peer cannot run on this machine (not installed, no model); the message says why."""


@dataclass
class StreamRun:
    """One generation: arrival time of each token (or chunk) and how many tokens came."""

    times: list[float]
    tokens: int
    ids: list[int] = field(default_factory=list)


class Peer(Protocol):
    def generate(self, ids: list[int], new_tokens: int) -> StreamRun:
        """Greedy, EOS ignored, exactly `new_tokens` tokens after prefilling `ids` from scratch."""


def timed(tokens: Iterable[int]) -> StreamRun:
    """Drain a token generator, timing each token's arrival from the first `next()`.

    Pass a generator (its body, prefill included, only runs once iteration starts).
    """
    t0 = time.perf_counter()
    times, ids = [], []
    for tok in tokens:
        times.append(time.perf_counter() - t0)
        ids.append(int(tok))
    return StreamRun(times, len(ids), ids)


def single_stream(peer: Peer, cfg: BenchConfig, prompts: dict[int, list[list[int]]],
                  log: Callable[[str], None] = print) -> dict:
    """TTFT for `cfg.ttft_lengths` and decode tokens/s for `cfg.decode_lengths`.

    Decode-length runs generate `cfg.new_tokens` tokens and also give that length's TTFT;
    the others generate one token. Each length: `cfg.warmup` discarded runs, then
    `cfg.runs(length)` measured ones, each on its own prompt (`prompts[length][i]`).
    """
    out: dict = {"ttft_s": {}, "decode_tps": {}, "sample_ids": None}
    for n in sorted({*cfg.ttft_lengths, *cfg.decode_lengths}):
        new = cfg.new_tokens if n in cfg.decode_lengths else 1
        for ids in prompts[n][: cfg.warmup]:
            peer.generate(ids, new)
        runs = []
        for ids in prompts[n][cfg.warmup : cfg.warmup + cfg.runs(n)]:
            run = peer.generate(ids, new)
            if run.tokens < new:
                raise RuntimeError(f"asked for {new} tokens after a {n}-token prompt, got "
                                   f"{run.tokens} (EOS not ignored?)")
            runs.append(run)
        if n in cfg.ttft_lengths:
            out["ttft_s"][str(n)] = summarize([ttft(r.times) for r in runs])
        if n in cfg.decode_lengths:
            out["decode_tps"][str(n)] = summarize([decode_rate(r.times, r.tokens) for r in runs])
            if out["sample_ids"] is None and runs[0].ids:
                out["sample_ids"] = runs[0].ids[:32]
        log(f"  {n:>5} tokens: ttft {out['ttft_s'].get(str(n), {}).get('median', float('nan')):.3f} s"
            + (f", decode {out['decode_tps'][str(n)]['median']:.1f} tok/s"
               if str(n) in out["decode_tps"] else ""))
    return out


def prompts_of(job: dict) -> dict[int, list[list[int]]]:
    return {int(k): v for k, v in job["prompts"].items()}


def config_of(job: dict) -> BenchConfig:
    return BenchConfig.from_dict(job["config"])


def require(module: str, hint: str):
    """Import a peer's library or Skip with an install hint."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise Skip(f"{module} is not importable ({exc}); {hint}") from None
