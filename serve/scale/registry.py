"""`Registry`: the Ray actor where replicas report in, one per llorch application.

Every replica beats every `BEAT_S` seconds with its health (the single-process `/health`
body) and its rendered `/metrics` text; the ingress reads both to answer `/health` (the
deployment's state) and `/metrics` (every replica's llorch metrics, labelled by replica).
It also hands CPU replicas disjoint cores per node, so two replicas' ONNX Runtime threads
never share a core. A replica silent for `STALE_S` seconds (killed, or gone in a scale-down)
is dropped and its cores go back to the pool.
"""

from __future__ import annotations

import time
from typing import Any

BEAT_S = 1.0
STALE_S = 5.0


class Registry:
    """Plain class; `serve.scale.ray_app` makes it a named, CPU-less Ray actor."""

    def __init__(self) -> None:
        # replica id -> (last beat, node id, health dict, metrics text)
        self._replicas: dict[str, tuple[float, str, dict[str, Any], str]] = {}
        self._cores: dict[str, dict[str, list[int]]] = {}  # node id -> replica id -> cores
        self._draining = False

    def _sweep(self) -> None:
        cutoff = time.monotonic() - STALE_S
        for rid in [r for r, (t, *_) in self._replicas.items() if t < cutoff]:
            del self._replicas[rid]
            for held in self._cores.values():
                held.pop(rid, None)

    def acquire_cores(self, replica_id: str, node_id: str, n: int, cpus: list[int]) -> list[int]:
        """`n` of `cpus` (the replica's allowed CPU ids) that no live replica on `node_id`
        holds, lowest first; [] when fewer than `n` are free (the replica then runs unpinned).
        Counts as the replica's first beat."""
        self._sweep()
        self._replicas.setdefault(replica_id, (time.monotonic(), node_id, {"status": "loading"}, ""))
        held = self._cores.setdefault(node_id, {})
        # A holder silent for a few beats is dead (killed) even before `STALE_S`: its
        # replacement, started at once by Ray, gets its cores.
        silent = time.monotonic() - 3 * BEAT_S
        for rid in [r for r in held if r != replica_id and self._replicas.get(r, (0.0,))[0] < silent]:
            del held[rid]
        taken = {c for rid, cores in held.items() if rid != replica_id for c in cores}
        free = [c for c in sorted(cpus) if c not in taken]
        if len(free) < n:
            return []
        held[replica_id] = free[:n]
        return held[replica_id]

    def beat(self, replica_id: str, node_id: str, health: dict[str, Any], metrics: str) -> None:
        """A replica's report: its `/health` body (with `"status"`) and `/metrics` text."""
        self._replicas[replica_id] = (time.monotonic(), node_id, health, metrics)

    def leave(self, replica_id: str) -> None:
        """A replica shutting down: forget it and free its cores."""
        self._replicas.pop(replica_id, None)
        for held in self._cores.values():
            held.pop(replica_id, None)

    def set_draining(self) -> None:
        """SIGTERM on the driver: the ingress refuses new requests from now on."""
        self._draining = True

    def draining(self) -> bool:
        return self._draining

    def snapshot(self) -> dict[str, tuple[str, dict[str, Any], str]]:
        """replica id -> (node id, health, metrics text) of every live replica; each health
        dict gains `report_age_s`, the seconds since that replica's report (its counts, such
        as `slots_in_use`, are that old)."""
        self._sweep()
        now = time.monotonic()
        return {rid: (node, {**health, "report_age_s": round(now - t, 3)}, text)
                for rid, (t, node, health, text) in self._replicas.items()}
