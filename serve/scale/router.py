"""`PrefixAffinityRouter`: a Ray Serve request router that sends a prompt to the replica
whose prefix cache most likely holds its beginning, unless that replica is saturated.

The policy and its memory are `serve.scale.prefix_table.PrefixTable`, kept in one named
actor per application and shared by the routers of every ingress replica, so every ingress
sends a prefix to the same replica. A router that cannot reach that actor (it is gone, or
the router runs outside llorch's application) decides with a table of its own.

Ray's routing loop takes the ranks in order and, within a rank, the replica with the
shortest queue that is below `max_ongoing_requests`, so a saturated or full favourite falls
back to the least-loaded replica, and distinct new prompts spread over idle replicas.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import ray
from ray.serve.request_router import (
    PendingRequest,
    ReplicaID,
    ReplicaResult,
    RequestRouter,
    RunningReplica,
)

from serve.scale.prefix_table import BLOCK_CHARS, PrefixTable, block_hashes

log = logging.getLogger("serve.scale.router")

TABLE_TIMEOUT_S = 1.0  # a table slower than this: decide alone for this request
PROBE_TRIES = 4  # picks_only: load probes per round, deadlines 0.1, 0.2, 0.4, 0.8 s (Ray's backoff)
REFRESH_S = 0.05  # picks_only: how often the loads are probed, off the pick's path


class PrefixAffinityRouter(RequestRouter):
    """Prefix-cache affinity with a least-loaded fallback (see the module docstring)."""

    def initialize_state(self, saturation: int = 4, table: str | None = None,
                         namespace: str = "llorch", block_chars: int = BLOCK_CHARS,
                         picks_only: bool = False) -> None:
        """Ray calls this once with `request_router_kwargs`.

        Args:
            saturation: requests in flight at which a replica stops attracting its prefixes
                (its KV slots, `--max-batch`).
            table: name of the shared `PrefixTable` actor (None: this router's own table).
            namespace: the actor's Ray namespace.
            block_chars: characters per hashed block.
            picks_only: Ray only asks for picks (`choose_replica(..., _reserve=False)`, the
                HAProxy ingress): no request is seen to start or complete, so the table goes
                by the replicas' probed loads and this router's recent picks. The loads are
                probed every `REFRESH_S` by a task of their own, not on a pick's path (a
                pick that waited for its probes, and for the shared table's actor, took 8–39
                ms when a burst arrived, once per request).
        """
        self.saturation = saturation
        self.block_chars = block_chars
        self.picks_only = picks_only
        self._last_lens: dict[ReplicaID, int] = {}  # picks_only: each replica's last answer
        self._probed_at: dict[ReplicaID, float] = {}  # ... and when its probe was sent
        self.local = PrefixTable()
        self._table_name, self._namespace = table, namespace
        self._shared: Any = None
        self._warned = False
        self._started: dict[str, str] = {}  # internal request id -> replica, until completed
        self._refresher: asyncio.Task | None = None  # picks_only: the load probes' task
        self._candidates: list[RunningReplica] = []  # picks_only: what the task probes

    def _table(self) -> Any:
        """The shared table's actor handle, looked up once; None when there is none."""
        if self._shared is None and self._table_name:
            try:
                self._shared = ray.get_actor(self._table_name, namespace=self._namespace)
            except ValueError:
                self._fallback("no actor named %s", self._table_name)
                self._table_name = None
        return self._shared

    def _fallback(self, why: str, *args: Any) -> None:
        if not self._warned:
            self._warned = True
            log.warning("prefix routing with this router's own table: " + why, *args)

    def _prompt(self, pending_request: PendingRequest | None) -> str:
        if pending_request is None:
            return ""
        for arg in pending_request.args:
            prompt = getattr(arg, "prompt", None)
            if isinstance(prompt, str):
                return prompt
        return ""

    async def _queue_lens(self, replicas: list[RunningReplica]) -> dict[ReplicaID, int]:
        """Requests in flight per replica: cached, else probed (unknown: treated as full).

        `picks_only`: the last answer of `_refresh`'s probes (0 for a replica that never
        answered: as full, a slow holder of a prefix would lose it to another replica); only
        a replica never probed yet is probed here, before the pick."""
        if self.picks_only:
            self._candidates = replicas
            if self._refresher is None or self._refresher.done():
                self._refresher = asyncio.get_running_loop().create_task(self._refresh())
            new = [r for r in replicas if r.replica_id not in self._last_lens]
            if new:
                await self._probe(new)
            return {r.replica_id: self._last_lens.get(r.replica_id, 0) for r in replicas}
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

    async def _probe(self, replicas: list[RunningReplica]) -> None:
        """Probe `replicas`' loads into `_last_lens` (and Ray's queue-length cache), asking a
        replica that misses Ray's deadline (0.1 s, often missed on a starved CPU) again with
        a longer one, up to `PROBE_TRIES` times; one that never answers keeps its last
        value (0 if none)."""
        missing = list(replicas)
        for backoff in range(PROBE_TRIES):
            sent = time.monotonic()
            answers = await self._probe_queue_lens(missing, backoff)
            missing = [r for r, n in answers if n is None]
            for r, n in answers:
                if n is not None:
                    self._last_lens[r.replica_id] = n
                    self._probed_at[r.replica_id] = sent
            if not missing:
                return
        for r in missing:
            self._last_lens.setdefault(r.replica_id, 0)

    async def _refresh(self) -> None:
        """`picks_only`: probe the candidates of the latest pick every `REFRESH_S`, for as
        long as this router lives."""
        while True:
            try:
                await self._probe(self._candidates)
            except asyncio.CancelledError:
                raise
            except Exception:  # a replica gone mid-probe: the next round sees the new set
                log.debug("load probe failed", exc_info=True)
            await asyncio.sleep(REFRESH_S)

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        lens = await self._queue_lens(candidate_replicas)
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        loads = {rid: lens.get(r.replica_id, 0) for rid, r in by_id.items()}
        hashes = block_hashes(self._prompt(pending_request), self.block_chars)
        ranks = None
        table = self._table() if hashes else None
        if table is not None:
            try:
                ranks = await asyncio.wait_for(
                    table.route.remote(hashes, loads, self.saturation, not self.picks_only),
                    TABLE_TIMEOUT_S)
            except Exception as exc:  # gone or slow: this request is routed without it
                self._fallback("the shared table failed (%r)", exc)
        if ranks is None:
            seen_at = ({rid: self._probed_at[r.replica_id] for rid, r in by_id.items()
                        if r.replica_id in self._probed_at} if self.picks_only else None)
            ranks = self.local.route(hashes, loads, self.saturation, not self.picks_only,
                                     seen_at)
        return [[by_id[rid] for rid in rank if rid in by_id] for rank in ranks]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID,
                          result: ReplicaResult) -> None:
        """Remember the prompt's blocks as held by the replica Ray actually picked, and the
        request as running there until `on_request_completed`."""
        hashes = block_hashes(self._prompt(pending_request), self.block_chars)
        if not hashes:
            return
        rid = replica_id.unique_id
        self._started[pending_request.metadata.internal_request_id] = rid
        self.local.started(hashes, rid)
        if self._shared is not None:
            self._shared.started.remote(hashes, rid)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        rid = self._started.pop(internal_request_id, None)
        if rid is not None:
            self.local.finished(rid)
            if self._shared is not None:
                self._shared.finished.remote(rid)

    def _forget(self, replica_id: ReplicaID) -> None:
        self._last_lens.pop(replica_id, None)
        self._probed_at.pop(replica_id, None)
        self.local.forget(replica_id.unique_id)
        if self._shared is not None:
            self._shared.forget.remote(replica_id.unique_id)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._forget(replica_id)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        # Only the ones this router saw go away: a router a step behind the others must
        # not drop a replica it has not heard of yet from the shared table.
        before = set(getattr(self, "_known", ()))
        self._known = {r.replica_id for r in replicas}
        super().update_replicas(replicas)
        for rid in before - self._known:
            self._forget(rid)
