"""Prefix cache over idle KV slots: a finished sequence leaves its KV in its slot, so a later
prompt that starts with the same tokens (a shared system prompt, a chat that grows by one
turn) reuses those positions instead of computing them again.

```
 slots:  busy (a running choice owns it)  |  idle, LRU first ─────────────────► MRU
                                          |  [empty] [sys+q1+a1] [sys+q2+a2]
 new prompt sys+q3:  match → [sys+q2+a2] shares `sys` ─► truncate it to len(sys), or copy
                     that prefix into an empty / least recently used slot to keep the rest
```

`PrefixCache` keeps the books (which idle slot holds which token ids, LRU order, the token
budget); `SlotPool` applies its decisions to the runtime's KV for the engine thread.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np

log = logging.getLogger("serve.prefix_cache")

_EMPTY = np.zeros(0, np.int64)


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the longest common prefix of two int arrays."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n


def as_ids(ids: Sequence[int] | np.ndarray) -> np.ndarray:
    return np.asarray(ids, dtype=np.int64)


class PrefixCache:
    """The idle slots, in LRU order, each with the token ids its KV still holds.

    Args:
        n_slots: KV slots of the runtime; all start idle and empty.
        capacity: the most tokens idle slots may keep in total; past it the least recently
            used are dropped (0 turns caching off: released slots are emptied).
    """

    def __init__(self, n_slots: int, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self._idle: OrderedDict[int, np.ndarray] = OrderedDict((s, _EMPTY) for s in range(n_slots))
        self.tokens = 0  # held by idle slots

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    @property
    def n_free(self) -> int:
        return len(self._idle)

    def held(self, slot: int) -> int:
        """Tokens an idle slot holds."""
        return len(self._idle[slot])

    def idle_ids(self) -> Iterator[tuple[int, np.ndarray]]:
        """(slot, the token ids its KV holds) of every idle slot, least recently used first."""
        return iter(self._idle.items())

    def match(self, ids: np.ndarray, limit: int) -> tuple[int | None, int]:
        """The idle slot sharing the longest prefix with `ids` and that length (at most
        `limit`); (None, 0) when none shares anything. Ties go to the least recently used."""
        best, best_len = None, 0
        if not self.enabled or limit <= 0:
            return best, best_len
        for slot, held in self._idle.items():
            n = min(common_prefix(held, ids), limit)
            if n > best_len:
                best, best_len = slot, n
        return best, best_len

    def victim(self) -> int:
        """The idle slot to overwrite: an empty one, else the least recently used."""
        if not self._idle:
            raise LookupError("no idle slot")
        for slot, held in self._idle.items():
            if not len(held):
                return slot
        return next(iter(self._idle))

    def take(self, slot: int) -> None:
        """`slot` becomes busy (its KV is the caller's now)."""
        self.tokens -= len(self._idle.pop(slot))

    def touch(self, slot: int) -> None:
        """`slot` was just used as a source: most recently used."""
        self._idle.move_to_end(slot)

    def release(self, slot: int, ids: Sequence[int] | np.ndarray) -> list[tuple[int, int]]:
        """`slot` becomes idle holding `ids` (most recently used). Returns the KV cuts the
        budget requires, as (slot, tokens to keep): 0 means reset the slot."""
        ids = as_ids(ids)
        keep = min(len(ids), self.capacity)
        cuts = [(slot, keep)] if keep < len(ids) else []
        ids = ids[:keep]
        self._idle[slot] = ids
        self._idle.move_to_end(slot)
        self.tokens += len(ids)
        for other in list(self._idle):
            if self.tokens <= self.capacity:
                break
            held = self._idle[other]
            if other == slot or not len(held):
                continue
            self.tokens -= len(held)
            self._idle[other] = _EMPTY
            cuts.append((other, 0))
        return cuts

    def clear(self) -> list[int]:
        """Forget every cached sequence; returns the slots whose KV to reset."""
        slots = [slot for slot, held in self._idle.items() if len(held)]
        for slot in slots:
            self._idle[slot] = _EMPTY
        self.tokens = 0
        return slots


class SlotPool:
    """The runtime's KV slots as the engine thread sees them: busy, or idle in the cache.

    Args:
        runtime: `serve.runtime.Runtime` (or a stand-in): `n_slots`, `length`, `reset`,
            `truncate`, `copy_slot(src, dst, length)`.
        capacity: `PrefixCache`'s token budget (None: everything idle slots hold).
    """

    def __init__(self, runtime, capacity: int | None) -> None:
        self.runtime = runtime
        if capacity is None:
            capacity = runtime.n_slots * runtime.info.max_length
        self.cache = PrefixCache(runtime.n_slots, capacity)

    @property
    def n_free(self) -> int:
        return self.cache.n_free

    def acquire(self, ids: np.ndarray, limit: int,
                busy: Callable[[], Iterable[tuple[int, np.ndarray]]] = tuple) -> tuple[int, int]:
        """Take an idle slot for the sequence `ids`, holding the longest prefix of it (at most
        `limit` tokens) found in an idle slot or in a busy one (`busy()` yields (slot, the ids
        its KV holds)); returns (slot, prefix length). The slot's KV then holds that prefix."""
        src, n = self.cache.match(ids, limit)
        running, running_n = None, 0
        if self.cache.enabled and limit > 0:
            for slot, held in busy():
                k = min(common_prefix(held, ids), limit)
                if k > running_n:
                    running, running_n = slot, k
        victim = self.cache.victim()
        if running_n > n:
            return self._claim(victim, lambda: self.runtime.copy_slot(running, victim, running_n)), running_n
        if src is None:
            return self._claim(victim, lambda: self.runtime.reset(victim)), 0
        if victim == src or n == self.cache.held(src):  # nothing worth keeping is lost
            return self._claim(src, lambda: self.runtime.truncate(src, n)), n
        self.cache.touch(src)  # keep the cached sequence; copy its prefix over the victim
        return self._claim(victim, lambda: self.runtime.copy_slot(src, victim, n)), n

    def acquire_blank(self) -> int:
        """Take an idle slot with an empty KV (an empty one if any, else the LRU one)."""
        victim = self.cache.victim()
        return self._claim(victim, lambda: self.runtime.reset(victim))

    def _claim(self, slot: int, prepare: Callable[[], None]) -> int:
        self.cache.take(slot)
        try:
            prepare()
        except BaseException:
            self.runtime.reset(slot)
            self.cache.release(slot, ())
            raise
        return slot

    def release(self, slot: int, held: Callable[[], np.ndarray] | None) -> None:
        """Give a busy slot back; `held()` gives the ids of its KV to keep for reuse, a prefix
        of what it holds (the rest is truncated; None: its KV is not to be trusted, forget
        it)."""
        ids: np.ndarray | tuple = ()
        try:
            if held is not None and self.cache.enabled:
                ids = held()
                if len(ids) < self.runtime.length(slot):  # the rest is not to be reused
                    self.runtime.truncate(slot, len(ids))
            else:
                self.runtime.reset(slot)
        finally:
            cuts = self.cache.release(slot, ids)
        for s, keep in cuts:
            if keep:
                self.runtime.truncate(s, keep)
            else:
                self.runtime.reset(s)

    def clear(self) -> None:
        """Forget every cached sequence."""
        for slot in self.cache.clear():
            try:
                self.runtime.reset(slot)
            except Exception:
                log.exception("resetting slot %d failed", slot)
