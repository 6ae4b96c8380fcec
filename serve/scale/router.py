"""`PrefixAffinityRouter`: a Ray Serve request router that sends a prompt to the replica
whose prefix cache most likely holds its beginning, unless that replica is saturated.

Each replica's recent prompts are remembered as chained hashes of fixed-size character
blocks (block i's hash covers blocks 0..i, as vLLM's KV block hashes do), so "replica R has
seen this prompt's first k blocks" is k set lookups. For a request:

```
best = the replica with the most leading blocks seen (ties: fewer requests in flight)
best matched ≥ 1 block and has fewer than `saturation` requests (its KV slots)
    → ranks [[best], [everyone else, least loaded first]]
otherwise
    → ranks [[everyone, least loaded first, then the one holding the fewest blocks]]
```

Ray's routing loop takes the ranks in order and, within a rank, the replica with the
shortest queue that is below `max_ongoing_requests`, so a saturated or full favourite falls
back to the least-loaded replica, and distinct new prompts spread over idle replicas.
The state is this router's own (one per ingress replica): a router learns from what it
routes. A replica that dies or leaves takes its blocks with it.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

from ray.serve.request_router import (
    PendingRequest,
    ReplicaID,
    ReplicaResult,
    RequestRouter,
    RunningReplica,
)

BLOCK_CHARS = 64  # ~16 tokens of English: finer than any system prompt worth caching
MAX_BLOCKS_PER_REPLICA = 100_000  # ~6 M characters of prompts remembered per replica


def block_hashes(text: str, block_chars: int = BLOCK_CHARS) -> list[bytes]:
    """Chained hashes of `text`'s whole blocks: element i identifies `text[:(i+1)*block]`."""
    hashes, h = [], b""
    for start in range(0, len(text) - block_chars + 1, block_chars):
        h = hashlib.blake2b(h + text[start:start + block_chars].encode(), digest_size=12).digest()
        hashes.append(h)
    return hashes


class PrefixAffinityRouter(RequestRouter):
    """Prefix-cache affinity with a least-loaded fallback (see the module docstring)."""

    def initialize_state(self, saturation: int = 4, block_chars: int = BLOCK_CHARS,
                         max_blocks: int = MAX_BLOCKS_PER_REPLICA) -> None:
        """Ray calls this once with `request_router_kwargs`.

        Args:
            saturation: requests in flight at which a replica stops attracting its prefixes
                (its KV slots, `--max-batch`).
            block_chars: characters per hashed block.
            max_blocks: blocks remembered per replica, least recently routed out.
        """
        self.saturation = saturation
        self.block_chars = block_chars
        self.max_blocks = max_blocks
        self.seen: dict[ReplicaID, OrderedDict[bytes, None]] = {}

    def _prompt(self, pending_request: PendingRequest | None) -> str:
        if pending_request is None:
            return ""
        for arg in pending_request.args:
            prompt = getattr(arg, "prompt", None)
            if isinstance(prompt, str):
                return prompt
        return ""

    async def _queue_lens(self, replicas: list[RunningReplica]) -> dict[ReplicaID, int]:
        """Requests in flight per replica: cached, else probed (unknown: treated as full)."""
        lens: dict[ReplicaID, int] = {}
        missing = []
        for r in replicas:
            cached = self._replica_queue_len_cache.get(r.replica_id)
            if cached is None:
                missing.append(r)
            else:
                lens[r.replica_id] = cached
        if missing:
            for r, n in await self._probe_queue_lens(missing, 0):
                lens[r.replica_id] = r.max_ongoing_requests if n is None else n
        return lens

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        lens = await self._queue_lens(candidate_replicas)
        hashes = block_hashes(self._prompt(pending_request), self.block_chars)

        def matched(r: RunningReplica) -> int:
            seen = self.seen.get(r.replica_id)
            if not seen:
                return 0
            n = 0
            for h in hashes:
                if h not in seen:
                    break
                n += 1
            return n

        def load(r: RunningReplica) -> tuple[int, int]:
            return lens.get(r.replica_id, 0), len(self.seen.get(r.replica_id, ()))

        by_load = sorted(candidate_replicas, key=load)
        if hashes and candidate_replicas:
            best = max(candidate_replicas, key=lambda r: (matched(r), -load(r)[0]))
            if matched(best) > 0 and lens.get(best.replica_id, 0) < self.saturation:
                return [[best], [r for r in by_load if r is not best]]
        return [by_load]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID,
                          result: ReplicaResult) -> None:
        """Remember the prompt's blocks as held by `replica_id` (most recent last)."""
        hashes = block_hashes(self._prompt(pending_request), self.block_chars)
        if not hashes:
            return
        seen = self.seen.setdefault(replica_id, OrderedDict())
        for h in hashes:
            seen[h] = None
            seen.move_to_end(h)
        while len(seen) > self.max_blocks:
            seen.popitem(last=False)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.seen.pop(replica_id, None)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        live = {r.replica_id for r in replicas}
        for rid in [rid for rid in self.seen if rid not in live]:
            del self.seen[rid]
