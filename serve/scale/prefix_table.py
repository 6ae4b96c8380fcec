"""`PrefixTable`: which replica holds which prompt prefixes, and where a prompt should go.

One table per llorch application, in a named Ray actor (`serve.scale.ray_app`), shared by
the routers of every ingress replica: a prefix one ingress sent to replica R is routed to R
by all of them. (Ray Serve keeps one router per caller, so a table inside each router would
learn each prefix once per ingress and could place it on a different replica each time.)

A prompt is remembered as chained hashes of fixed-size character blocks (block i's hash
covers blocks 0..i, as vLLM's KV block hashes do), so "replica R has seen this prompt's
first k blocks" is k set lookups. For a request:

```
best = the replica with the most leading blocks seen (ties: fewer requests in flight)
best matched ≥ 1 block, is busy with fewer than `saturation` requests (its KV slots) and
with at most `saturation // 2` more than the least busy replica
    → [[best], [everyone else, least loaded first]]
nobody matched: a new prefix
    → [[of the replicas below `saturation`, the one holding the fewest blocks], [the rest,
       least loaded first]]: new prefixes spread by what the replicas cache, so each one's
       slots hold its share (the load a router sees is a little stale; it only decides once
       replicas fill up)
otherwise (best is saturated or that far ahead, or everyone is saturated)
    → [[least loaded (ties: holding the fewest blocks)], [everyone else, same order]]
```

and the first choice is remembered at once as holding the prompt, so the next request with
that prefix goes there even before the first one was answered.

The imbalance bound is Ray's `PrefixCacheAffinityRouter` idea (`imbalanced_threshold`): a
prefix every request shares (a chat template's default system prompt) would otherwise keep a
whole burst on one replica until its slots fill. On two H200s 64 such streams went to one
replica (GPU 39% and 5% busy, 1.21x one replica); with the bound the second replica takes the
prefix once the first is half its slots ahead, and equal matches then go to the less busy.

"Busy" is the smaller of two counts that can each only err high: the load the calling
router sees (Ray's queue-length cache, which lags completions by a request or two) and the
requests this table's routers started on the replica and have not seen complete (which
misses requests without a prompt prefix, and keeps a dead router's requests). With a few
KV slots a replica, the first alone would make a replica look full after a burst and send
every new prompt elsewhere. No Ray here (unit-testable).
"""

from __future__ import annotations

import bisect
import hashlib
import time
from collections import OrderedDict, deque

BLOCK_CHARS = 64  # ~16 tokens of English: finer than any system prompt worth caching
MAX_BLOCKS_PER_REPLICA = 100_000  # ~6 M characters of prompts remembered per replica
# Callers that never see a request start (count_started False: the HAProxy route) count the
# picks of the last PICK_WINDOW_S as busy too: a replica's probed load shows a request only
# once it arrives there, so the picks of a burst would all see the same stale loads. The
# route probes every 50 ms (serve.scale.router.REFRESH_S), so two probe rounds cover the
# lag; a whole second counted requests long finished: one-at-a-time requests of 4 prompts
# over 2 replicas of 2 slots then looked like 2 busy slots on their holder and lost their
# affinity (prefix-cache hit rate 0.56 in a clean-clone CI run; 0.61 with 0.25 s).
PICK_WINDOW_S = 0.1
# With the time each replica's latest answered probe was sent (`route(seen_at=)`), a pick
# counts until a probe sent after it has answered: the 0.1 s window alone let a burst's early
# picks expire before the replicas' probes showed them (a replica's event loop answers probes
# late while 64 requests arrive), so the prefix's holder took ~96 of 128 streams and queued
# the rest behind its 64 slots (two H200s: 24k vs 34-39k tok/s, run to run). A pick made up
# to ARRIVAL_S before a probe was sent may or may not have arrived by then (a replica busy
# with a burst takes its connections in late: TTFT p95 near 0.3 s there, and 0.05 s still
# left one replica 1.5 s of queue); PICK_MAX_S bounds what a replica whose probes never
# answer accumulates. Only picks of a burst count so (a pick within BURST_GAP_S of another):
# one-at-a-time requests are answered before the next pick, so a lone pick before the probe
# is finished, not on its way (counted, four prompts asked in turn over 2 replicas of 2 slots
# made their holder look full: prefix-cache hit rate 0.556 in a clean-clone CI run).
ARRIVAL_S = 0.5
BURST_GAP_S = 0.02
PICK_MAX_S = 2.0


def block_hashes(text: str, block_chars: int = BLOCK_CHARS) -> list[bytes]:
    """Chained hashes of `text`'s whole blocks: element i identifies `text[:(i+1)*block]`
    (12-byte BLAKE2b digests)."""
    hashes, h = [], b""
    for start in range(0, len(text) - block_chars + 1, block_chars):
        h = hashlib.blake2b(h + text[start:start + block_chars].encode(), digest_size=12).digest()
        hashes.append(h)
    return hashes


class PrefixTable:
    """Replica id → the block hashes it was sent, least recently routed first.

    Args:
        max_blocks: blocks remembered per replica; the least recently routed go first.
    """

    def __init__(self, max_blocks: int = MAX_BLOCKS_PER_REPLICA) -> None:
        self.max_blocks = max_blocks
        self.seen: dict[str, OrderedDict[bytes, None]] = {}
        self.running: dict[str, int] = {}  # started here, not yet finished
        self.picks: dict[str, deque[float]] = {}  # count_started False: recent picks' times
        self.all_picks: deque[float] = deque()  # ... of every replica, oldest first

    def matched(self, replica: str, hashes: list[bytes]) -> int:
        """How many of `hashes`' leading blocks `replica` was sent."""
        seen = self.seen.get(replica)
        n = 0
        if seen:
            for h in hashes:
                if h not in seen:
                    break
                n += 1
        return n

    def route(self, hashes: list[bytes], loads: dict[str, int], saturation: int,
              count_started: bool = True, seen_at: dict[str, float] | None = None
              ) -> list[list[str]]:
        """The replicas to try, in ranks (see the module docstring).

        Args:
            hashes: the prompt's `block_hashes` ([]: no affinity, least loaded first).
            loads: requests in flight per candidate replica id (the caller's view).
            saturation: requests at which a replica stops attracting its prefixes.
            count_started: busy is the smaller of `loads` and the requests `started` and not
                `finished` here (see the module docstring); False: the larger of `loads` and
                this table's picks of the last `PICK_WINDOW_S` (callers that never see a
                request start or finish).
            seen_at: with count_started False, per replica id the `time.monotonic()` at
                which the probe behind its `loads` entry was sent: busy is then that load
                plus this table's picks since, the picks of a burst in the `ARRIVAL_S`
                before it counted only where the load does not already cover them
                (`picks_since`); a replica without an entry uses the window.

        Returns:
            Ranks of replica ids, every candidate once; [] when there is no candidate.
        """
        def held(r: str) -> int:
            return len(self.seen.get(r, ()))

        now = time.monotonic()
        if count_started:
            busy = {r: min(n, self.running.get(r, 0)) for r, n in loads.items()}
        else:
            busy = {r: self.picks_since(r, n, now, (seen_at or {}).get(r))
                    for r, n in loads.items()}
        by_load = sorted(loads, key=lambda r: (busy[r], loads[r], held(r)))
        if not by_load:
            return []
        first = by_load[0]
        if hashes:
            best = max(by_load, key=lambda r: (self.matched(r, hashes), -busy[r]))
            open_ = [r for r in by_load if busy[r] < saturation]
            if self.matched(best, hashes) > 0:
                if busy[best] < saturation and busy[best] - busy[first] <= saturation // 2:
                    first = best
            elif open_:  # a new prefix: to the replica with the least cached, while it has room
                first = min(open_, key=lambda r: (held(r), busy[r]))
            self.remember(hashes, first)
        if not count_started:
            self.picks.setdefault(first, deque()).append(now)
            self.all_picks.append(now)
            while self.all_picks and now - self.all_picks[0] > PICK_MAX_S:
                self.all_picks.popleft()
        return [[first], [r for r in by_load if r != first]]

    def picks_since(self, replica: str, load: int, now: float, seen_at: float | None) -> int:
        """Busy by `replica`'s probed `load` and this table's picks the load cannot show yet
        (see `route`'s `seen_at`); forgets the picks no later answer will need."""
        times = self.picks.get(replica)
        if times is None:
            return load
        if seen_at is None:
            while times and now - times[0] > PICK_WINDOW_S:
                times.popleft()
            return max(load, len(times))
        while times and (times[0] <= seen_at - ARRIVAL_S or now - times[0] > PICK_MAX_S):
            times.popleft()
        after = sum(t > seen_at for t in times)
        burst = sum(self._in_burst(t) for t in times if t <= seen_at)
        return after + max(load, burst)

    def _in_burst(self, t: float) -> bool:
        """Whether another pick (of any replica) came within `BURST_GAP_S` of the pick at `t`."""
        everyone = self.all_picks
        i = bisect.bisect_left(everyone, t)
        return ((i > 0 and t - everyone[i - 1] <= BURST_GAP_S)
                or (i + 1 < len(everyone) and everyone[i + 1] - t <= BURST_GAP_S))

    def remember(self, hashes: list[bytes], replica: str) -> None:
        """`replica` was sent a prompt with these block hashes (most recent last)."""
        if not hashes:
            return
        seen = self.seen.setdefault(replica, OrderedDict())
        for h in hashes:
            seen[h] = None
            seen.move_to_end(h)
        while len(seen) > self.max_blocks:
            seen.popitem(last=False)

    def started(self, hashes: list[bytes], replica: str) -> None:
        """A request with these block hashes went to `replica` (Ray's final pick)."""
        self.remember(hashes, replica)
        self.running[replica] = self.running.get(replica, 0) + 1

    def finished(self, replica: str) -> None:
        """A request `started` on `replica` completed (answered, failed or cancelled)."""
        if self.running.get(replica, 0) > 0:
            self.running[replica] -= 1

    def forget(self, replica: str) -> None:
        """`replica` died or left: what it held is gone with it."""
        self.seen.pop(replica, None)
        self.running.pop(replica, None)
        self.picks.pop(replica, None)
