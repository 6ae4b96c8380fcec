"""`Registry`: the Ray actor where replicas report in, one per llorch application.

Every replica beats every `BEAT_S` seconds with its health (the single-process `/health`
body) and its rendered `/metrics` text; the ingress reads both to answer `/health` (the
deployment's state) and `/metrics` (every replica's llorch metrics, labelled by replica).
It also hands CPU replicas disjoint cores per node, so two replicas' ONNX Runtime threads
never share a core. A replica silent for `STALE_S` seconds (killed, gone in a scale-down, or
starved of CPU) leaves the snapshot until it beats again; its cores go back to the pool only
once Ray no longer knows its actor (a replica that is merely slow keeps them: on a loaded
machine a replica loading its model was silent for seconds and a new one took its core).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

BEAT_S = 1.0
STALE_S = 5.0


class Registry:
    """Plain class; `serve.scale.ray_app` makes it a named, CPU-less Ray actor.

    Args:
        alive: `alive(actor name, namespace)` says whether Ray still knows that actor
            (default: a named-actor lookup; tests pass their own).
    """

    def __init__(self, alive: Callable[[str, str], bool] | None = None) -> None:
        # replica id -> (last beat, node id, health dict, metrics text)
        self._replicas: dict[str, tuple[float, str, dict[str, Any], str]] = {}
        self._cores: dict[str, dict[str, list[int]]] = {}  # node id -> replica id -> cores
        self._actors: dict[str, tuple[str, str]] = {}  # replica id -> (actor name, namespace)
        self._alive = alive or _actor_alive
        self._draining = False
        self._ending = False

    def _dead(self, replica_id: str, silent_since: float) -> bool:
        """Whether a core holder is gone: its actor is unknown to Ray, or (a holder that gave
        no actor name) it has not beaten since `silent_since`."""
        actor = self._actors.get(replica_id)
        if actor is not None:
            return not self._alive(*actor)
        return self._replicas.get(replica_id, (0.0,))[0] < silent_since

    def _release_dead(self, keep: str | None, silent_since: float) -> None:
        """Free the cores of holders silent since `silent_since` whose actor is gone."""
        for held in self._cores.values():
            for rid in [r for r in held if r != keep
                        and self._replicas.get(r, (0.0,))[0] < silent_since
                        and self._dead(r, silent_since)]:
                del held[rid]
                self._actors.pop(rid, None)

    def _sweep(self) -> None:
        cutoff = time.monotonic() - STALE_S
        for rid in [r for r, (t, *_) in self._replicas.items() if t < cutoff]:
            del self._replicas[rid]
        self._release_dead(None, cutoff)

    def acquire_cores(self, replica_id: str, node_id: str, n: int, cpus: list[int],
                      actor: tuple[str, str] | None = None) -> list[int]:
        """`n` of `cpus` (the replica's allowed CPU ids) that no live replica on `node_id`
        holds, lowest first; [] when fewer than `n` are free (the replica then runs unpinned).
        `actor` is the replica's (Ray actor name, namespace), for telling a dead holder from a
        slow one. Counts as the replica's first beat."""
        self._sweep()
        self._replicas.setdefault(replica_id, (time.monotonic(), node_id, {"status": "loading"}, ""))
        if actor is not None:
            self._actors[replica_id] = actor
        held = self._cores.setdefault(node_id, {})
        # A holder silent for a few beats whose actor Ray no longer knows is dead (killed)
        # before `STALE_S`: its replacement, started at once by Ray, gets its cores.
        self._release_dead(replica_id, time.monotonic() - 3 * BEAT_S)
        taken = {c for rid, cores in held.items() if rid != replica_id for c in cores}
        free = [c for c in sorted(cpus) if c not in taken]
        if len(free) < n:
            return []
        held[replica_id] = free[:n]
        return held[replica_id]

    def beat(self, replica_id: str, node_id: str, health: dict[str, Any], metrics: str) -> bool:
        """A replica's report: its `/health` body (with `"status"`) and `/metrics` text.
        Returns whether the replica is to end the requests it still runs (`end_requests`)."""
        self._replicas[replica_id] = (time.monotonic(), node_id, health, metrics)
        return self._ending

    def leave(self, replica_id: str) -> None:
        """A replica shutting down: forget it and free its cores."""
        self._replicas.pop(replica_id, None)
        self._actors.pop(replica_id, None)
        for held in self._cores.values():
            held.pop(replica_id, None)

    def set_draining(self) -> None:
        """SIGTERM on the driver: the ingress refuses new requests from now on."""
        self._draining = True

    def draining(self) -> bool:
        return self._draining

    def end_requests(self) -> None:
        """The drain's time is up (or a second signal): every replica ends what it still runs
        with an error event, told at its next beat."""
        self._ending = True

    def snapshot(self) -> dict[str, tuple[str, dict[str, Any], str]]:
        """replica id -> (node id, health, metrics text) of every live replica; each health
        dict gains `report_age_s`, the seconds since that replica's report (its counts, such
        as `slots_in_use`, are that old)."""
        self._sweep()
        now = time.monotonic()
        return {rid: (node, {**health, "report_age_s": round(now - t, 3)}, text)
                for rid, (t, node, health, text) in self._replicas.items()}


def _actor_alive(name: str, namespace: str) -> bool:
    """Whether Ray still knows the named actor (a killed or ended one is unknown)."""
    import ray  # noqa: PLC0415 - only inside the Registry actor

    try:
        ray.get_actor(name, namespace=namespace)
    except ValueError:
        return False
    return True
