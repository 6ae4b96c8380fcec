"""`ChunkBuffer`: what a replica's app sends, gathered into fewer chunks for the trip through Ray.

Every piece of a response that crosses Ray (replica → ingress → Ray's HTTP proxy) costs each
hop a Python-level message; at one SSE event per token, 64 streams on a GPU are thousands of
messages a second and the front saturates long before the engines do (bench/gpu/README.md,
"Scale-out on two H200s"). So a replica sends, as one chunk, everything its app has sent
since the last chunk, and under load lets a stream's events gather for a short while first:

```
app send() ─► put(part) ─┐
                         ├─► chunks(hold): [start?, body] … one list per Ray item
end()  (response done) ──┘    the first body (the first token) and the end go at once;
                              later events wait up to hold() s, from the first one waiting
```

The client sees the same bytes in the same order (bodies are concatenated, never split or
reordered); only how many arrive per TCP write changes. `hold_seconds` sizes the wait from
the replica's load so the replica sends about `chunk_rate` chunks a second at most: none
below `MIN_STREAMS` requests in flight (a lone stream's inter-token latency is untouched),
never more than `MAX_HOLD_S`. No Ray here (unit-testable).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

from serve.scale.forward import ResponsePart

MIN_STREAMS = 4  # fewer requests in flight on a replica: every event goes at once
MAX_HOLD_S = 0.05  # the most an event waits for company (20 chunks a second per stream)
DEFAULT_CHUNK_RATE = 1000  # chunks/s a replica aims to stay under (`--stream-chunk-rate`)


def hold_seconds(streams: int, chunk_rate: float) -> float:
    """How long a stream's next event may wait for more, in seconds.

    Args:
        streams: requests in flight on this replica (its streams and plain requests).
        chunk_rate: chunks per second the replica aims to stay under, all streams together;
            0 turns coalescing off.

    Returns:
        0 when `chunk_rate` is 0 or fewer than `MIN_STREAMS` requests are in flight, else
        `streams / chunk_rate` capped at `MAX_HOLD_S`.
    """
    if chunk_rate <= 0 or streams < MIN_STREAMS:
        return 0.0
    return min(MAX_HOLD_S, streams / chunk_rate)


class ChunkBuffer:
    """One response's parts between the app (`put`, `end`) and the Ray stream (`chunks`).

    Lives on one event loop; `put` and `end` never block (the app's `send` calls them)."""

    def __init__(self) -> None:
        self._parts: list[ResponsePart] = []
        self._ready = asyncio.Event()  # parts waiting, or the end
        self._ended = asyncio.Event()

    def put(self, part: ResponsePart) -> None:
        """Queue `("start", status, headers)` or `("body", bytes)`, in the app's order."""
        self._parts.append(part)
        self._ready.set()

    def end(self) -> None:
        """The response is complete (or its app ended): flush what is left, then stop."""
        self._ended.set()
        self._ready.set()

    @property
    def ended(self) -> bool:
        return self._ended.is_set()

    async def chunks(self, hold: Callable[[], float]) -> AsyncIterator[list[ResponsePart]]:
        """The parts as chunks: each a list holding at most one start and, after it, the
        bodies that arrived meanwhile joined into one `("body", bytes)`.

        Args:
            hold: seconds the next chunk may wait for more parts (read once per chunk,
                after the chunk's first part arrived); not consulted until a body has gone,
                so the status line and the first token are never held.
        """
        body_sent = False
        while True:
            if not self._parts:
                if self._ended.is_set():
                    return
                self._ready.clear()
                await self._ready.wait()
                continue
            if body_sent and not self._ended.is_set():
                wait = hold()
                if wait > 0:  # the end still cuts the wait short: the last token is not held
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._ended.wait(), wait)
            parts, self._parts = self._parts, []
            chunk = _joined(parts)
            body_sent = body_sent or chunk[-1][0] == "body"
            yield chunk


def _joined(parts: list[ResponsePart]) -> list[ResponsePart]:
    """Consecutive bodies as one body; a start stays where it is."""
    out: list[ResponsePart] = []
    bodies: list[bytes] = []
    for part in parts:
        if part[0] == "body":
            bodies.append(part[1])
            continue
        if bodies:
            out.append(("body", b"".join(bodies)))
            bodies = []
        out.append(part)
    if bodies:
        out.append(("body", b"".join(bodies)))
    return out
