"""The engine: one thread owns the Runtime and schedules every request onto its KV slots.

```
 route ── submit() ──► inbox ──► engine thread (loops while there is work)
   ▲                               1. admit   FIFO head takes free slots, one per choice
   │                               2. prefill one chunk of the oldest admitted prompt
   │                                          (then copy its KV to the sibling choices' slots)
   │                               3. decode  one Runtime.decode over every running slot
   │                               4. per choice: Sampler → detokenizer → StopMatcher
   └── asyncio.Queue per request ◄── Event (call_soon_threadsafe)
```

ORT is never called from the event loop. A request's choices that do not fit the free slots
wait at the head of the FIFO and start later from the prompt KV of a running sibling
(`copy_slot` + `truncate`), or from a fresh prefill when none is left. Cancellation is a flag
the thread checks every step; finished, failed and cancelled choices give their slot back.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import queue
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from serve.detokenizer import IncrementalDetokenizer
from serve.runtime import ContextFull
from serve.sampling import Sample, Sampler, SamplingParams
from serve.stops import StopMatcher

log = logging.getLogger("serve.engine")


# ------------------------------------------------------------------- what crosses threads


@dataclass(frozen=True)
class GenerationRequest:
    """What the engine runs: token ids in, `params.n` choices out.

    `prompt_logprobs=k` also reports every prompt token's logprob (+ top k) on the first
    event (completions `echo` + `logprobs`); it prefills one token per call to get them.
    """

    prompt_ids: tuple[int, ...]
    params: SamplingParams
    prompt_logprobs: int | None = None
    request_id: str = ""


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class ChoiceOutput:
    """What one choice produced in one step: new text (possibly empty while the detokenizer or
    the stop matcher holds text back), the token(s) and their logprobs, and why it ended."""

    index: int
    text: str
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprob, ...] | None = None
    finish_reason: str | None = None


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0


@dataclass(frozen=True)
class Event:
    """One step of one request. The last event has `usage` (done) or `error` (failed)."""

    choices: tuple[ChoiceOutput, ...] = ()
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
    usage: Usage | None = None
    error: str | None = None

    @property
    def final(self) -> bool:
        return self.usage is not None or self.error is not None


_CANCELLED = Event(error="cancelled")


class RequestStream:
    """The route's end of a request: async-iterate its events; `cancel()` frees its slots."""

    def __init__(self, engine: Engine, job: _Job, events: asyncio.Queue[Event]) -> None:
        self._engine, self._job, self._events = engine, job, events
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
            self._engine._inbox.put(_WAKE)
            self._events.put_nowait(_CANCELLED)  # wakes a pending __anext__


# --------------------------------------------------------------------- engine-thread state


class _Choice:
    """One sequence: a choice of a request, on one KV slot."""

    __slots__ = ("job", "index", "slot", "sampler", "detok", "stops", "generated", "next_token")

    def __init__(self, job: _Job, index: int, slot: int, engine: Engine) -> None:
        params = job.request.params
        self.job, self.index, self.slot = job, index, slot
        self.sampler = Sampler(params, prompt_ids=job.prompt, seed_offset=index)
        self.detok = IncrementalDetokenizer(engine.tokenizer, prompt_ids=job.prompt)
        self.stops = StopMatcher(params.stop)
        self.generated: list[int] = []
        self.next_token = -1  # sampled, not yet fed to the model


class _Job:
    """One request inside the engine thread."""

    def __init__(self, request: GenerationRequest, send: Callable[[Event], None], max_tokens: int):
        self.request = request
        self.prompt = list(request.prompt_ids)
        self.send = send
        self.max_tokens = max_tokens
        self.pending = deque(range(request.params.n))  # choices not yet on a slot
        self.slotted: list[_Choice] = []  # every choice given a slot (freed ones have slot -1)
        self.running: list[_Choice] = []  # choices past prefill
        self.group: list[_Choice] = []  # choices whose prompt is being prefilled
        self.fed = 0  # prompt tokens prefilled into group[0].slot
        self.prompt_logits: np.ndarray | None = None  # kept while choices are pending
        self.prompt_logprobs: list[TokenLogprob | None] | None = None
        self.prompt_logprobs_sent = False
        self.completion_tokens = 0
        self.finished = 0
        self.cancelled = False  # set from the event loop

    @property
    def done(self) -> bool:
        return self.finished == self.request.params.n


_WAKE = object()
_STOP = object()


class Engine:
    """Owns a `Runtime` and a `Tokenizer` (both built by the caller) on a thread of its own.

    Args:
        runtime: KV-slot runtime (`serve.runtime.Runtime` or a stand-in with its interface).
        tokenizer: `serve.tokenizer.Tokenizer`.
        prefill_chunk: prompt tokens per prefill call.
    """

    def __init__(self, runtime, tokenizer, *, prefill_chunk: int = 512) -> None:
        self.runtime = runtime
        self.tokenizer = tokenizer
        self.prefill_chunk = prefill_chunk
        self.max_length: int = runtime.info.max_length
        self.vocab_size: int = runtime.info.vocab_size
        self.n_slots: int = runtime.n_slots
        self._eos = frozenset(tokenizer.eos_ids)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._waiting: deque[_Job] = deque()
        self._prefilling: deque[_Job] = deque()
        self._running: list[_Choice] = []
        self._free = list(range(self.n_slots))  # a heap: lowest slot first keeps them packed
        self._thread = threading.Thread(target=self._run, name="llorch-engine", daemon=True)

    # ------------------------------------------------------------------ event-loop side

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = 10.0) -> None:
        """Ends every request with an error event and joins the thread."""
        if self._thread.is_alive():
            self._inbox.put(_STOP)
            self._thread.join(timeout)

    @property
    def slots_in_use(self) -> int:
        return self.n_slots - len(self._free)

    def submit(self, request: GenerationRequest) -> RequestStream:
        """Queue a request; call from the event loop. The route has validated it already."""
        if not request.prompt_ids:
            raise ValueError("empty prompt")
        room = self.max_length - len(request.prompt_ids)
        if room < 1:
            raise ValueError(f"prompt of {len(request.prompt_ids)} tokens fills the context")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        max_tokens = min(request.params.max_tokens or room, room)
        job = _Job(request, _sender(loop, events), max_tokens)
        self._inbox.put(job)
        return RequestStream(self, job, events)

    # ----------------------------------------------------------------- engine thread

    def _run(self) -> None:
        while True:
            busy = bool(self._waiting or self._prefilling or self._running)
            try:
                item = self._inbox.get(block=not busy)
            except queue.Empty:
                item = _WAKE
            while True:  # drain everything that arrived
                if item is _STOP:
                    self._fail_all("The server is shutting down.")
                    return
                if isinstance(item, _Job):
                    self._waiting.append(item)
                try:
                    item = self._inbox.get_nowait()
                except queue.Empty:
                    break
            try:
                self._step()
            except Exception:  # a scheduler bug: end what is in flight, keep serving
                log.exception("engine step failed")
                self._fail_all("The server had an error while processing your request.")

    def _step(self) -> None:
        self._drop_cancelled()
        self._admit()
        if self._prefilling:
            self._prefill(self._prefilling[0])
        if self._running:
            self._decode()

    def _jobs(self) -> list[_Job]:
        """Every job the thread knows, once each, oldest first."""
        running = (c.job for c in self._running)
        return list(dict.fromkeys(itertools.chain(self._waiting, self._prefilling, running)))

    def _drop_cancelled(self) -> None:
        for job in self._jobs():
            if job.cancelled:
                log.debug("request %s cancelled", job.request.request_id)
                self._remove(job)

    def _admit(self) -> None:
        while self._waiting and self._free:
            job = self._waiting[0]
            if job.group:  # its first choices are still prefilling; the rest wait for that
                return
            group: list[_Choice] = []
            try:
                while job.pending and self._free:
                    c = _Choice(job, job.pending[0], self._free[0], self)
                    heapq.heappop(self._free)
                    job.pending.popleft()
                    job.slotted.append(c)
                    group.append(c)
                if not job.pending:
                    self._waiting.popleft()
                self._place(job, group)
            except Exception as exc:
                self._fail(job, exc)

    def _place(self, job: _Job, group: list[_Choice]) -> None:
        source = next((c for c in job.running if c.slot >= 0), None)
        if job.prompt_logits is not None and source is not None:
            # a sibling holds the prompt's KV: copy it and drop the sibling's own tokens
            for c in group:
                self.runtime.copy_slot(source.slot, c.slot)
                self.runtime.truncate(c.slot, len(job.prompt))
            self._start(job, group, job.prompt_logits)
        else:
            for c in group:
                self.runtime.reset(c.slot)
            job.group, job.fed = group, 0
            self._prefilling.append(job)

    def _prefill(self, job: _Job) -> None:
        slot = job.group[0].slot
        per_token = job.request.prompt_logprobs is not None and not job.prompt_logprobs_sent
        size = 1 if per_token else self.prefill_chunk
        try:
            logits = self.runtime.prefill(slot, job.prompt[job.fed : job.fed + size])
            job.fed = min(job.fed + size, len(job.prompt))
            if per_token:
                if job.prompt_logprobs is None:
                    job.prompt_logprobs = [None]  # nothing predicts the first prompt token
                if job.fed < len(job.prompt):
                    k = job.request.prompt_logprobs or 0
                    job.prompt_logprobs.append(_logprob(logits, job.prompt[job.fed], k))
            if job.fed < len(job.prompt):
                return
            self._prefilling.popleft()
            group, job.group = job.group, []
            for c in group[1:]:
                self.runtime.copy_slot(slot, c.slot)
            self._start(job, group, logits)
        except Exception as exc:
            self._fail(job, exc)

    def _start(self, job: _Job, group: list[_Choice], logits: np.ndarray) -> None:
        """The group's prompt KV is in place: sample each choice's first token."""
        job.prompt_logits = logits if job.pending else None
        outputs = []
        for c in group:  # (samplers never modify the logits they are given)
            job.running.append(c)
            self._running.append(c)
            outputs.append(self._accept(c, c.sampler.sample(logits, c.generated)))
        prompt_logprobs = None
        if job.prompt_logprobs is not None and not job.prompt_logprobs_sent:
            prompt_logprobs, job.prompt_logprobs_sent = tuple(job.prompt_logprobs), True
        self._send(job, outputs, prompt_logprobs)

    def _decode(self) -> None:
        batch = list(self._running)
        try:
            try:
                rows = list(self.runtime.decode([c.slot for c in batch], [c.next_token for c in batch]))
            except ContextFull:
                # Our length check should prevent this; if the runtime's limit is tighter,
                # find the full sequences one by one and end them with "length".
                rows = [self._decode_alone(c) for c in batch]
        except Exception as exc:  # whose fault is unknowable in a batched call: fail them all
            for job in dict.fromkeys(c.job for c in batch):
                self._fail(job, exc)
            return
        outputs: dict[_Job, list[ChoiceOutput]] = {}
        for c, row in zip(batch, rows, strict=True):
            job = c.job
            if job.cancelled or c.slot < 0:
                continue
            try:
                if row is None:
                    out = self._finish(c, "length", "")
                else:
                    out = self._accept(c, c.sampler.sample(row, c.generated))
                outputs.setdefault(job, []).append(out)
            except Exception as exc:
                outputs.pop(job, None)
                self._fail(job, exc)
        for job, outs in outputs.items():
            self._send(job, outs)

    def _decode_alone(self, c: _Choice) -> np.ndarray | None:
        try:
            return self.runtime.decode([c.slot], [c.next_token])[0]
        except ContextFull:
            return None

    def _accept(self, c: _Choice, sample: Sample) -> ChoiceOutput:
        """Record a sampled token; returns the choice's output for this step."""
        job, params, token = c.job, c.job.request.params, int(sample.token)
        c.generated.append(token)
        c.next_token = token
        job.completion_tokens += 1
        logprobs = None
        if params.logprobs is not None and sample.logprob is not None:
            top = tuple((int(i), float(p)) for i, p in (sample.top or ()))
            logprobs = (TokenLogprob(token, float(sample.logprob), top),)
        eos = token in self._eos and not params.ignore_eos
        text, stopped = c.stops.feed("" if eos else c.detok.add(token))
        finish = None
        if stopped or eos:
            finish = "stop"
        elif len(c.generated) >= job.max_tokens or len(job.prompt) + len(c.generated) >= self.max_length:
            finish = "length"
        if finish is None:
            return ChoiceOutput(c.index, text, (token,), logprobs)
        out = self._finish(c, finish, text, stopped=stopped)
        return ChoiceOutput(c.index, out.text, (token,), logprobs, out.finish_reason)

    def _finish(self, c: _Choice, reason: str, text: str, *, stopped: bool = False) -> ChoiceOutput:
        if not stopped:  # release held-back text; it may still complete a stop string
            tail, stopped = c.stops.feed(c.detok.flush())
            text += tail
            if stopped:
                reason = "stop"
            else:
                text += c.stops.flush()
        self._release(c)
        c.job.finished += 1
        return ChoiceOutput(c.index, text, finish_reason=reason)

    def _release(self, c: _Choice) -> None:
        if c.slot < 0:
            return
        if c in self._running:
            self._running.remove(c)
        try:
            self.runtime.reset(c.slot)
        finally:
            heapq.heappush(self._free, c.slot)
            c.slot = -1

    def _send(
        self,
        job: _Job,
        outputs: Sequence[ChoiceOutput],
        prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None,
    ) -> None:
        usage = None
        if job.done:
            usage = Usage(len(job.prompt), job.completion_tokens)
            job.running.clear()
        job.send(Event(tuple(outputs), prompt_logprobs, usage))

    def _remove(self, job: _Job) -> None:
        """Take a job out of every structure and give back its slots."""
        if job in self._waiting:
            self._waiting.remove(job)
        if job in self._prefilling:
            self._prefilling.remove(job)
        for c in job.slotted:
            try:
                self._release(c)
            except Exception:
                log.exception("resetting a slot failed")
        job.slotted.clear()
        job.running.clear()
        job.group = []
        job.pending.clear()

    def _fail(self, job: _Job, exc: BaseException) -> None:
        log.error("request %s failed", job.request.request_id or "?", exc_info=exc)
        self._remove(job)
        job.send(Event(error="The server had an error while processing your request."))

    def _fail_all(self, message: str) -> None:
        for job in self._jobs():
            self._remove(job)
            job.send(Event(error=message))


def _sender(loop: asyncio.AbstractEventLoop, events: asyncio.Queue[Event]) -> Callable[[Event], None]:
    def send(event: Event) -> None:
        try:
            loop.call_soon_threadsafe(events.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    return send


def _logprob(logits: np.ndarray, token: int, k: int) -> TokenLogprob:
    """Log-softmax of the raw logits at `token` (+ the top k), for prompt tokens."""
    logits = logits.astype(np.float64, copy=False)
    peak = logits.max()
    lse = peak + np.log(np.exp(logits - peak).sum())
    top: tuple[tuple[int, float], ...] = ()
    if k:
        idx = np.argpartition(-logits, k - 1)[:k]
        idx = idx[np.argsort(-logits[idx], kind="stable")]
        top = tuple((int(i), float(logits[i] - lse)) for i in idx)
    return TokenLogprob(int(token), float(logits[token] - lse), top)

