"""What crosses between the routes and the engine thread: requests in, events out, the
errors `Engine.submit` raises, and the per-request statistics the engine reports.

`RequestStream` is the route's end of one request. This module is the contract between the
api layer and the engine: routes import these types from here, never from `serve.engine`;
nothing here knows HTTP, JSON or ONNX Runtime.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from serve.sampling import SamplingParams

# Event.error_code values the routes answer with 503 (other errors are 500s).
QUEUE_TIMEOUT = "queue_timeout"
SHUTTING_DOWN = "shutting_down"
# ... and with 429: the engine's queue was full (`QueueFull`), when the engine runs in another
# process (serve.frontend) and so answers a submission with an event, not an exception.
QUEUE_FULL = "queue_full"


class QueueFull(Exception):
    """More requests wait for a slot than the engine's `max_queue` allows."""


class ShuttingDown(Exception):
    """The engine is draining or stopped and takes no new requests."""


@dataclass(frozen=True)
class GenerationRequest:
    """What the engine runs: token ids in, `params.n` choices out.

    `prompt_logprobs=k` also reports every prompt token's logprob (+ top k) on the first
    event (completions `echo` + `logprobs`); it prefills one token per call to get them.
    `grammar` (an llguidance grammar string, `serve.constraints`) constrains every choice's
    tokens: each gets its own matcher, EOS only where the grammar accepts, and the choice
    stops when the grammar is complete. Compile it first (`check_grammar`), off this thread.
    `grammar_prefix`: token ids each choice's matcher reads first (a prefill the format
    covers; `serve.chat_prep.PreparedChat.grammar_prefix`, checked there).
    """

    prompt_ids: tuple[int, ...]
    params: SamplingParams
    prompt_logprobs: int | None = None
    request_id: str = ""
    grammar: str | None = None
    grammar_prefix: tuple[int, ...] = ()


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class ChoiceOutput:
    """What one choice produced in one step: new text (possibly empty while the detokenizer or
    the stop matcher holds text back), the token(s) and their logprobs, and why it ended
    (`stop_sequence`: the stop string that ended it, if one did)."""

    index: int
    text: str
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprob, ...] | None = None
    finish_reason: str | None = None
    stop_sequence: str | None = None


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0


@dataclass(frozen=True)
class Event:
    """One step of one request. The last event has `usage` (done) or `error` (failed);
    `error_code` says why when the client should retry elsewhere or later. The request's
    first token event also has `cached_tokens`: the prompt tokens the prefix cache supplied
    (final by then; the same number as the last event's `usage.cached_tokens`), so a stream's
    opening frame can report the prompt split before the end (Anthropic's `message_start`)."""

    choices: tuple[ChoiceOutput, ...] = ()
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
    usage: Usage | None = None
    error: str | None = None
    error_code: str | None = None
    cached_tokens: int | None = None

    @property
    def final(self) -> bool:
        return self.usage is not None or self.error is not None


@dataclass(frozen=True)
class RequestStats:
    """How one request went, reported once when it ends however it ends.

    `outcome` is "ok", "cancelled", "error", QUEUE_TIMEOUT or SHUTTING_DOWN. Times are
    seconds since `submit`: `queued` until the first slot (or the end, if it never got one),
    `ttft` until the first token (None without one), `duration` until the end.
    """

    request_id: str
    outcome: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    queued: float
    ttft: float | None
    duration: float
    finish_reasons: tuple[str, ...] = ()
    admitted: bool = True  # got a slot (and so looked up the prefix cache)

    @property
    def tokens_per_second(self) -> float | None:
        """Decode speed after the first token."""
        if self.ttft is None or self.completion_tokens < 2 or self.duration <= self.ttft:
            return None
        return (self.completion_tokens - 1) / (self.duration - self.ttft)

    def __str__(self) -> str:
        """The request's log line (never its text)."""
        tps = self.tokens_per_second
        return (f"request {self.request_id or '?'} {self.outcome}: {self.prompt_tokens} prompt "
                f"tokens ({self.cached_tokens} cached), {self.completion_tokens} completion tokens, "
                f"queued {self.queued:.3f} s, "
                f"TTFT {'-' if self.ttft is None else f'{self.ttft:.3f} s'}, "
                f"{'-' if tps is None else f'{tps:.1f}'} tok/s, "
                f"finish {','.join(self.finish_reasons) or '-'}")


class EngineObserver:
    """Hooks the engine thread calls; no-ops here (`serve.metrics.Metrics` implements them).
    They must be quick and thread-safe: they run between decode steps."""

    def first_token(self, ttft: float) -> None:
        """A request produced its first token `ttft` seconds after it was submitted."""

    def tokens(self, gaps: Sequence[float]) -> None:
        """One decode step gave a token to each running choice; `gaps` are the seconds since
        each one's previous token (inter-token latency)."""

    def request_done(self, stats: RequestStats) -> None:
        """A request ended (complete, cancelled, failed, timed out or shut down)."""

    def speculated(self, counts: tuple[int, int]) -> None:
        """A verify call checked (drafted, accepted) draft tokens (`serve.speculative`)."""

    def prefill_rows(self, n: int) -> None:
        """One engine step prefilled the next chunk of `n` prompts (`Engine._plan_prefill`)."""


_CANCELLED = Event(error="cancelled")


class RequestStream:
    """The route's end of a request: async-iterate its events; `cancel()` frees its slots.

    Args:
        job: the engine's record of the request (`cancel` sets its `cancelled` flag).
        events: what the engine thread sends (`LoopMailbox.sender`).
        wake: tells the engine thread to look at its requests again.
    """

    def __init__(self, job: Any, events: asyncio.Queue[Event], *, wake: Callable[[], None]) -> None:
        self._job, self._events, self._wake = job, events, wake
        self._done = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> Event:
        if self._done:
            raise StopAsyncIteration
        event = await self._events.get()
        if event is _CANCELLED:
            raise StopAsyncIteration
        self._done = event.final
        return event

    def cancel(self) -> None:
        """Idempotent; a no-op once the request has ended. Call from the event loop."""
        if not self._done:
            self._done = True
            self._job.cancelled = True
            self._wake()
            self._events.put_nowait(_CANCELLED)  # wakes a pending __anext__


class LoopMailbox:
    """The engine thread's way to put events on requests' queues in one event loop: `send`
    only lists an event; `flush` (the engine calls it after every step) wakes the loop once
    (`call_soon_threadsafe`: a write to the loop's self-pipe and a GIL handover), and the loop
    then delivers every listed event in order. A step's events for all the streams of a loop
    so cost one wake-up, not one each (~35 us a token at 64 streams, measured).

    Args:
        loop: the loop whose queues the events go to.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Queue[Event], Event]] = []
        self._scheduled = False  # a delivery is on its way: it takes what is listed by then

    def sender(self, events: asyncio.Queue[Event]) -> Callable[[Event], None]:
        """`send(event)` for one request's queue: lists the event for the next `flush`; any
        thread may call it, and it never blocks on the loop."""

        def send(event: Event) -> None:
            with self._lock:
                self._pending.append((events, event))

        return send

    def flush(self) -> None:
        """Wake the loop to deliver what `send` listed (nothing to do: no wake-up). A closed
        loop drops the events: nobody is listening any more."""
        with self._lock:
            if not self._pending or self._scheduled:
                return
            self._scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the loop is closed
            with self._lock:
                self._pending.clear()
                self._scheduled = False

    def _deliver(self) -> None:
        with self._lock:
            batch, self._pending, self._scheduled = self._pending, [], False
        for events, event in batch:
            events.put_nowait(event)
