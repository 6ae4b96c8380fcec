"""The engine: one thread owns the Runtime and schedules every request onto its KV slots.

```
 route ── submit() ──► inbox ──► engine thread (loops while there is work)
   │  QueueFull past max_queue       1. expire  queued past queue_timeout; all past a drain deadline
   │  ShuttingDown once draining     2. admit   FIFO head takes idle slots, one per choice; the
   │                                            first starts from the longest cached prefix
   ▲                                 3. prefill the next chunk of the admitted prompts, oldest
   │                                            first, while the step's tokens (padding counted)
   │                                            fit --prefill-chunk: those from an empty slot in
   │                                            one Runtime.prefill_batch (right-padded rows),
   │                                            the rest a call each (--batch-invariant: the
   │                                            oldest only); a prompt all in: its KV copied to
   │                                            the sibling choices' slots, first tokens sent
   │                                 4. decode  one Runtime.decode over every running slot
   │                                            (decode_sampled: tokens picked on the device)
   │                                            (--speculative: a drafted slot verifies its
   │                                            drafts in a call of its own, serve.speculative;
   │                                            drafts by prompt lookup, or from a draft
   │                                            model's runtime, serve.draft_model)
   │                                 5. constrained rows: grammar bitmask → forbidden logits -inf
   │                                 6. per choice: Sampler → detokenizer → StopMatcher
   └── asyncio.Queue per request ◄── Event (LoopMailbox: one wake-up per loop and batch)
```

ORT is never called from the event loop. Continuous batching: a request joins the decode
batch as soon as its prompt is in, and leaves it the step it finishes; a long prompt is
prefilled one chunk per step, so the running streams get a token between its chunks. Prompts
that arrive together are prefilled in the same step (`_plan_prefill`): ORT's
GroupQueryAttention batches multi-token rows only from position 0, so prompts whose slot
already holds a prefix (a prefix-cache hit, an earlier chunk) take a call each, except where
the runtime says padding is free (GPUs: `prefill_padding` None), where they join the batch
from position 0 and report no cached tokens.

Slots that finish keep their KV as a prefix cache (`serve.prefix_cache`): a new prompt takes
the idle slot sharing its longest prefix (or copies that prefix from a running sequence) and
prefills only the rest: at least one token, since its logits are needed (two, see
`_reuse_limit`). A request's
choices that do not fit the free slots wait at the head of the FIFO and later start from a
slot holding the whole prompt (a running sibling's, a cached one) or from a fresh prefill.
Cancellation is a flag the thread checks every step; finished, failed and cancelled choices
give their slot back.

Where the runtime picks tokens on the device (`runtime.device_sampling`), a decode step asks
each choice's Sampler for a `RowDraw` (with the uniform number it would have drawn itself, so
seeds reproduce); choices with a grammar, logit_bias, penalties, token masks
(`allowed_token_ids`, `min_tokens`) or more logprobs than the device gives get their row's
logits back and sample on the host as before, in the same step.
The first token after a prefill is always sampled on the host.

Batched rows are computed independently of each other, so a sequence's logits do not depend
on what else runs. Where the runtime's graphs have a one-row kernel of their own (int4
MatMulNBits at accuracy level 0: exports without a batch-invariant W8A8 graph, `--w8a8 off`
or `prefill`), `runtime.batch_invariant` is False, and `batch_invariant` pads a lone decode
to two rows. For those graphs, too, prefills never end on a one-token chunk or reuse all but
one prompt token.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from serve.constraints import fill_bitmasks
from serve.draft_model import DraftModelSpeculator
from serve.errors import GENERIC_SERVER_ERROR
from serve.events import (
    QUEUE_TIMEOUT,
    SHUTTING_DOWN,
    ChoiceOutput,
    EngineObserver,
    Event,
    GenerationRequest,
    LoopMailbox,
    QueueFull,
    RequestStream,
    ShuttingDown,
    TokenLogprob,
    Usage,
)
from serve.prefix_cache import SlotPool
from serve.runtime import ContextFull, RowDraw, RowToken
from serve.sampling import Sample, device_sample, greedy_tokens
from serve.sequence import Choice, Job, prompt_logprob
from serve.speculative import SpeculativeConfig, Speculator, verify_choice

log = logging.getLogger("serve.engine")

# ORT's CPU GroupQueryAttention computes a call's query rows in tiles of this many; a lone
# last row (a call of 128k + 1 tokens) rounds differently (`Engine._chunk`).
_GQA_QUERY_TILE = 128

# Prompt tokens per prefill call on CPU and on GPUs (serve.options.ServeOptions.prefill_chunk
# says why).
CPU_PREFILL_CHUNK = 256
GPU_PREFILL_CHUNK = 2048

_SHUTDOWN_MESSAGE = "The server is shutting down; retry on another instance."
_WAKE = object()
_STOP = object()
_DRAIN = object()


class Engine:
    """Owns a `Runtime` and a `Tokenizer` (both built by the caller) on a thread of its own.

    Args:
        runtime: KV slots (the `serve.runtime.Runtime` protocol, from `open_runtime`).
        tokenizer: `serve.tokenizer.Tokenizer`.
        prefill_chunk: prompt tokens a step prefills, padded rows of a batched call counted
            (the oldest prompt's chunk always goes).
        max_queue: the most requests that may wait for a slot; `submit` raises `QueueFull`
            past it (None: unbounded).
        queue_timeout: seconds a request may wait for a slot before it ends with a
            QUEUE_TIMEOUT error event (None: forever).
        prefix_cache_tokens: the most tokens idle slots keep for reuse (None: all they hold;
            0: none, the prefix cache is off).
        observer: hooks for metrics (`EngineObserver`).
        batch_invariant: a request's tokens must not depend on what else runs (module
            docstring). None (the default): where the runtime is row-invariant
            (`runtime.batch_invariant`: free there; not under the attention pad unless the
            runtime was opened with ``batch_invariant`` True: batched steps run unpadded
            otherwise, `serve.runtime.interface.decodes_apart`). True on other runtimes: a
            lone sequence decodes with a padding row (int4 MatMulNBits has another kernel for one row; costs
            12-30% of single-stream speed there) and prompts prefill one a step. On, the prefix
            cache reuses only prompt tokens that a prefill of 2+ tokens computed (a decode step's
            KV, generated tokens', comes from another attention kernel), unless the runtime
            computes every position alike (`positions_alike`: the attention pad).
        speculative: speculative decoding (`serve.speculative`); None: off.
        draft: with ``speculative``, the draft model's runtime (`serve.draft_model`: its slot
            i drafts for slot i); None: drafts by prompt lookup.

    Raises:
        ValueError: ``speculative`` on a runtime without ``verify``; ``draft`` without
            ``speculative``, or with fewer or shorter slots than ``runtime``.
    """

    def __init__(self, runtime, tokenizer, *, prefill_chunk: int = CPU_PREFILL_CHUNK, max_queue: int | None = None,
                 queue_timeout: float | None = None, prefix_cache_tokens: int | None = None,
                 observer: EngineObserver | None = None, batch_invariant: bool | None = None,
                 speculative: SpeculativeConfig | None = None, draft=None) -> None:
        self.runtime = runtime
        self.tokenizer = tokenizer
        self.prefill_chunk = prefill_chunk
        self.max_queue = max_queue
        self.queue_timeout = queue_timeout
        self.batch_invariant = (bool(getattr(runtime, "batch_invariant", False))
                                if batch_invariant is None else batch_invariant)
        self.observer = observer or EngineObserver()
        self.max_length: int = runtime.info.max_length
        self.vocab_size: int = runtime.info.vocab_size
        self.n_slots: int = runtime.n_slots
        self.slots = SlotPool(runtime, prefix_cache_tokens)
        if speculative is not None and not callable(getattr(runtime, "verify", None)):
            raise ValueError(f"speculative decoding needs a runtime with verify (GroupQueryAttention "
                             f"exports with host KV, e.g. --provider cpu); {type(runtime).__name__} has none")
        self.speculator = None if speculative is None else Speculator(speculative)
        self.draft = draft
        if draft is not None:
            if speculative is None:
                raise ValueError("a draft model runtime needs speculative (a SpeculativeConfig)")
            if draft.n_slots < runtime.n_slots or draft.info.max_length < runtime.info.max_length:
                raise ValueError(f"the draft model's runtime has {draft.n_slots} slots of "
                                 f"{draft.info.max_length} tokens, fewer or shorter than the "
                                 f"target's {runtime.n_slots} of {runtime.info.max_length}")
            self.speculator = DraftModelSpeculator(speculative, draft, tokenizer.eos_ids,
                                                   runtime.n_slots)
        self._eos = frozenset(tokenizer.eos_ids)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._waiting: deque[Job] = deque()
        self._prefilling: deque[Job] = deque()
        self._running: list[Choice] = []
        self._lock = threading.Lock()  # guards the counters submit() reads
        self._queued = 0  # submitted, never had a slot, not ended
        self._alive = 0  # submitted, not ended
        self._active = 0  # had a slot, not ended (engine thread only)
        self._closed = False
        self._drain_deadline: float | None = None
        self._mailboxes: dict[asyncio.AbstractEventLoop, LoopMailbox] = {}  # event-loop side
        self._thread = threading.Thread(target=self._run, name="llorch-engine", daemon=True)
        # called on the engine thread after every step (the events of a step are all sent):
        # serve.frontend flushes a step's events to the HTTP workers in one message
        self.on_step: Callable[[], None] | None = None

    # ------------------------------------------------------------------ event-loop side

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = 10.0) -> None:
        """Ends every request with a SHUTTING_DOWN error event and joins the thread."""
        with self._lock:
            self._closed = True
        if self._thread.is_alive():
            self._inbox.put(_STOP)
            self._thread.join(timeout)

    def drain(self, timeout: float) -> None:
        """Take no new requests, end the queued ones (SHUTTING_DOWN) and give the running
        ones `timeout` seconds to finish before ending them the same way."""
        with self._lock:
            self._closed = True
        self._inbox.put((_DRAIN, time.monotonic() + timeout))

    @property
    def slots_in_use(self) -> int:
        return self.n_slots - self.slots.n_free

    @property
    def num_waiting(self) -> int:
        """Requests waiting for a slot."""
        return self._queued

    @property
    def num_running(self) -> int:
        """Requests holding slots (prefilling or decoding)."""
        return self._active

    @property
    def num_requests(self) -> int:
        """Requests submitted and not yet ended."""
        return self._alive

    @property
    def cached_prefix_tokens(self) -> int:
        """Tokens idle slots keep for the prefix cache."""
        return self.slots.cache.tokens

    def kv_bytes(self) -> int:
        """KV bytes preallocated, the draft model's included."""
        return self.runtime.kv_bytes() + (self.draft.kv_bytes() if self.draft is not None else 0)

    def kv_bytes_in_use(self) -> int:
        """KV bytes holding tokens, the draft model's included."""
        return self.runtime.kv_bytes_in_use() + (
            self.draft.kv_bytes_in_use() if self.draft is not None else 0)

    def submit(self, request: GenerationRequest) -> RequestStream:
        """Queue a request; call from the event loop. The route has validated it already.

        Raises:
            QueueFull: `max_queue` requests already wait for a slot.
            ShuttingDown: after `drain` or `stop`.
        """
        events: asyncio.Queue[Event] = asyncio.Queue()
        job = self.enqueue(request, self._mailbox(asyncio.get_running_loop()).sender(events))
        return RequestStream(job, events, wake=self.wake)

    def _mailbox(self, loop: asyncio.AbstractEventLoop) -> LoopMailbox:
        """The loop's mailbox: every request of one loop shares it, and `_after_step` flushes
        it, so a step's events wake the loop once (`LoopMailbox`). Closed loops' mailboxes
        are dropped."""
        box = self._mailboxes.get(loop)
        if box is None:
            for old in [lp for lp in self._mailboxes if lp.is_closed()]:
                del self._mailboxes[old]
            box = self._mailboxes[loop] = LoopMailbox(loop)
        return box

    def wake(self) -> None:
        """Make the engine thread look at its requests again (after setting `cancelled`)."""
        self._inbox.put(_WAKE)

    def enqueue(self, request: GenerationRequest, send: Callable[[Event], None]) -> Job:
        """`submit` without an event loop: the engine thread calls `send(event)` for each of
        the request's events (from its own thread; it must not block). Cancel by setting the
        returned job's `cancelled` flag, then `wake()`. Any thread may call it.

        Raises:
            QueueFull, ShuttingDown: as `submit`.
            ValueError: an empty prompt, or one that fills the context.
        """
        if not request.prompt_ids:
            raise ValueError("empty prompt")
        room = self.max_length - len(request.prompt_ids)
        if room < 1:
            raise ValueError(f"prompt of {len(request.prompt_ids)} tokens fills the context")
        max_tokens = min(request.params.max_tokens or room, room)
        job = Job(request, send, max_tokens)
        with self._lock:
            if self._closed:
                raise ShuttingDown(_SHUTDOWN_MESSAGE)
            # idle slots take queued requests first; only the rest really wait
            if self.max_queue is not None and self._queued + 1 - self.slots.n_free > self.max_queue:
                raise QueueFull(f"The server is busy: its queue of requests waiting for a slot is "
                                f"full ({self.max_queue}). Retry later.")
            self._queued += 1
            self._alive += 1
            self._inbox.put(job)
        return job

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
                    self._fail_all(_SHUTDOWN_MESSAGE, SHUTTING_DOWN)
                    self._after_step()
                    return
                if isinstance(item, Job):
                    self._waiting.append(item)
                elif isinstance(item, tuple) and item[0] is _DRAIN:
                    self._start_draining(item[1])
                try:
                    item = self._inbox.get_nowait()
                except queue.Empty:
                    break
            try:
                self._step()
            except Exception:  # a scheduler bug: end what is in flight, keep serving
                log.exception("engine step failed")
                self._fail_all(GENERIC_SERVER_ERROR)
                self.slots.clear()
                if self.speculator is not None:
                    self.speculator.clear()
            self._after_step()

    def _flush(self) -> None:
        """Hand the events sent so far to their event loops: one wake-up a loop."""
        for box in list(self._mailboxes.values()):
            box.flush()

    def _after_step(self) -> None:
        self._flush()
        if self.on_step is not None:
            try:
                self.on_step()
            except Exception:
                log.exception("on_step hook failed")

    def _step(self) -> None:
        self._drop_cancelled()
        self._expire(time.monotonic())
        self._admit()
        if self._prefilling:
            self._prefill_step()
            self._flush()  # first tokens go out now, not after this step's decode
        if self._running:
            self._decode()

    def _jobs(self) -> list[Job]:
        """Every job the thread knows, once each, oldest first."""
        running = (c.job for c in self._running)
        return list(dict.fromkeys(itertools.chain(self._waiting, self._prefilling, running)))

    def _drop_cancelled(self) -> None:
        for job in self._jobs():
            if job.cancelled:
                self._remove(job)
                self._end(job, "cancelled")

    def _expire(self, now: float) -> None:
        if self._drain_deadline is not None and now >= self._drain_deadline:
            self._fail_all(_SHUTDOWN_MESSAGE, SHUTTING_DOWN)
            return
        if self.queue_timeout is None:
            return
        for job in [j for j in self._waiting if not j.admitted]:
            waited = now - job.t_submit
            if waited > self.queue_timeout:
                self._remove(job)
                self._end(job, QUEUE_TIMEOUT)
                job.send(Event(error=f"The server is busy: the request waited {waited:.1f} s for "
                               "a free slot. Retry later.", error_code=QUEUE_TIMEOUT))

    def _start_draining(self, deadline: float) -> None:
        self._drain_deadline = min(deadline, self._drain_deadline or deadline)
        for job in [j for j in self._waiting if not j.admitted]:
            self._remove(job)
            self._end(job, SHUTTING_DOWN)
            job.send(Event(error=_SHUTDOWN_MESSAGE, error_code=SHUTTING_DOWN))

    # ------------------------------------------------------------------ admission

    def _admit(self) -> None:
        while self._waiting and self.slots.n_free:
            job = self._waiting[0]
            if job.group:  # its first choices are still prefilling; the rest wait for that
                return
            if not job.admitted:
                with self._lock:  # before the slot is taken: submit's estimate errs to accept
                    self._queued -= 1
                job.admitted, job.t_admit = True, time.monotonic()
                self._active += 1
            group: list[Choice] = []
            reuse = 0
            try:
                while job.pending and self.slots.n_free:
                    c = Choice(job, job.pending[0], self.tokenizer)
                    if group or self._recomputes_prefix(job):
                        c.slot = self.slots.acquire_blank()
                    else:
                        limit = self._reuse_limit(job)
                        c.slot, reuse = self.slots.acquire(job.prompt_arr, limit, self._busy)
                    job.pending.popleft()
                    job.slotted.append(c)
                    group.append(c)
                if not job.pending:
                    self._waiting.popleft()
                self._place(job, group, reuse)
            except Exception as exc:
                self._fail(job, exc)

    def _batches_prefills(self) -> bool:
        """Whether the runtime prefills several prompts in one call, each row's logits those it
        would get alone (`prefill_batch`, and not switched off by `batched_prefill`)."""
        return (callable(getattr(self.runtime, "prefill_batch", None))
                and getattr(self.runtime, "batched_prefill", True))

    def _recomputes_prefix(self, job: Job) -> bool:
        """Whether the job's first choice should take a blank slot rather than copy a cached
        prefix: where padding is free (`prefill_padding` None: GPUs) a prompt that fits the
        step's budget joins a batched call from position 0 anyway when other prompts wait
        to prefill beside it (`_plan_prefill`), so copying its prefix first (1.3 ms a slot on
        an H200) would be thrown away. A lone prompt still takes its prefix."""
        return (not self.batch_invariant and job.prompt_logits is None
                and not job.wants_prompt_logprobs
                and getattr(self.runtime, "prefill_padding", 1.0) is None
                and self._batches_prefills()
                and len(job.prompt) <= self.prefill_chunk
                and (len(self._waiting) > 1 or bool(self._prefilling)))

    def _reuse_limit(self, job: Job) -> int:
        """How much of the prompt's KV may come from elsewhere."""
        if job.wants_prompt_logprobs:
            return 0  # every prompt token's logits are needed
        if job.prompt_logits is not None:
            return len(job.prompt)  # a later choice: the prompt's logits are known
        # Prefill at least one token, for its logits; two where the prompt allows, because a
        # one-row call runs another int4 kernel (MatMulNBits M=1) whose rounding differs, and
        # the logits should equal those of an uncached prefill bit for bit.
        return max(len(job.prompt) - 2, 0)

    def _reusable(self, job: Job, ids: np.ndarray) -> np.ndarray:
        """The leading ``ids`` of a slot filled by ``job`` whose KV another prompt may reuse:
        all of them, or with `batch_invariant` only prompt tokens that prefill calls of 2+
        tokens computed. A decode step's KV (generated tokens, a verify's drafts) and a
        one-token prefill's (prompt logprobs, a one-token prompt) come from another attention
        kernel, whose rounding differs: a multi-turn prompt reusing them would not get the
        tokens it gets cold — except where every call computes a position alike
        (`runtime.positions_alike`: the attention pad), which reuses all of them too."""
        if not self.batch_invariant or getattr(self.runtime, "positions_alike", False):
            return ids
        exact = 0 if job.wants_prompt_logprobs or len(job.prompt) < 2 else len(job.prompt)
        return ids[:exact]

    def _busy(self) -> Iterable[tuple[int, np.ndarray]]:
        """(slot, reusable ids its KV holds) of every busy slot with a prompt in it."""
        for c in self._running:
            yield c.slot, self._reusable(c.job, c.held_ids(self.runtime.length(c.slot)))
        for job in self._prefilling:
            if job.fed:
                yield job.group[0].slot, self._reusable(job, job.prompt_arr[: job.fed])

    def _place(self, job: Job, group: list[Choice], reuse: int) -> None:
        if not job.slotted[:-len(group)]:  # the request's first placement
            job.cached_tokens = reuse
        if reuse == len(job.prompt):  # a later group from a slot holding the whole prompt
            for c in group[1:]:
                self.runtime.copy_slot(group[0].slot, c.slot)
            self._start(job, group, job.prompt_logits)
        else:
            job.group, job.fed = group, reuse
            self._prefilling.append(job)

    # ------------------------------------------------------------------ prefill and decode

    def _prefill_step(self) -> None:
        """The next chunk of as many admitted prompts as fit the step's budget (`_plan_prefill`):
        prompts starting from an empty slot share one `prefill_batch` call, the others take a
        call each. With batch invariance on a runtime that is not row-invariant
        (`_invariant_by_padding`) only the oldest prompt's chunk, alone (a row's logits must
        not depend on what else prefills)."""
        if self._invariant_by_padding:
            job = self._prefilling[0]
            self._prefill(job, self._chunk(job))
            return
        together, alone = self._plan_prefill()
        self._observe("prefill_rows", len(together) + len(alone))
        if len(together) > 1:
            for job, _ in together:
                if self.runtime.length(job.group[0].slot):  # recomputed from position 0
                    self.runtime.truncate(job.group[0].slot, 0)
                    job.fed = job.cached_tokens = 0
            self._prefill_together([(job, size) for job, size in together])
            self._flush()
        else:
            alone = [(job, self._chunk(job)) for job, _ in together] + alone
        for job, size in alone:
            self._prefill(job, size)
            self._flush()

    def _plan_prefill(self) -> tuple[list[tuple[Job, int]], list[tuple[Job, int]]]:
        """(rows for one `prefill_batch`, prompts prefilled alone), as (job, tokens) lists,
        oldest first.

        The oldest prompt's chunk always goes; the others follow while the step's tokens stay
        within ``prefill_chunk``, padding counted (a batched call costs rows x its longest
        row). A prompt joins the batch where it wants no prompt logprobs, its slot is empty
        (GroupQueryAttention batches multi-token rows only from position 0) and the batch's
        padding stays within the runtime's ``prefill_padding`` (padded tokens per real
        token: on the CPU, where padding costs what real tokens do, one call per prompt beats
        a batch whose rows differ much in length). Where padding is free next to a call's
        fixed cost (``prefill_padding`` None: GPUs), a prompt whose slot holds a prefix (a
        prefix-cache hit, an earlier chunk) joins the batch too, from position 0 (its row is
        the prefix and the chunk; `_prefill_step` empties the slot, and the request's
        ``cached_tokens`` becomes 0), rather than take a call of its own.
        """
        can_batch = self._batches_prefills()
        padding = getattr(self.runtime, "prefill_padding", None)
        together: list[tuple[Job, int]] = []
        alone: list[tuple[Job, int]] = []
        width = real = spent = 0  # the batch's longest row and real tokens; alone tokens
        for job in self._prefilling:
            size = self._chunk(job)
            oldest = not together and not alone
            if can_batch and not job.wants_prompt_logprobs:
                held = self.runtime.length(job.group[0].slot)
                row = size if held == 0 else job.fed + size if padding is None else 0
                rows, w = len(together) + 1, max(width, row)
                # (a prefix recomputed must fit the budget even for the oldest prompt: else it
                # takes its chunk alone)
                if row and ((padding is None or rows * w <= padding * (real + row))
                            and (oldest and not held or rows * w + spent <= self.prefill_chunk)):
                    together.append((job, row))
                    width, real = w, real + row
                    continue
            if oldest or len(together) * width + spent + size <= self.prefill_chunk:
                alone.append((job, size))
                spent += size
        return together, alone

    def _chunk(self, job: Job) -> int:
        """Prompt tokens the job's next prefill call takes: one where it wants prompt
        logprobs, else up to ``prefill_chunk``, never leaving a one-token last chunk (its
        logits would come from another kernel), and with `batch_invariant` never a chunk of
        128k + 1 tokens: ORT's CPU GroupQueryAttention (1.32) computes the last query row of
        such a call in another kernel (row 128 of 129: ~2e-7 off row 128 of 130), so a prompt
        whose cached prefix left 129 tokens to prefill got other logits than cold (a greedy
        answer changed)."""
        left = len(job.prompt) - job.fed
        if job.wants_prompt_logprobs:
            return 1
        size = self.prefill_chunk
        if size > 1 and left - size == 1:
            size -= 1
        size = min(size, left)
        if self.batch_invariant and size > 1 and size % _GQA_QUERY_TILE == 1:
            size -= 2 if size == left else 1  # the rest: 2 tokens, or more than 1
        return size

    def _prefill(self, job: Job, size: int) -> None:
        """One prefill call of the job's next ``size`` prompt tokens."""
        try:
            logits = self.runtime.prefill(job.group[0].slot, job.prompt[job.fed : job.fed + size])
            self._prefilled(job, size, logits)
        except Exception as exc:
            self._fail(job, exc)

    def _prefill_together(self, rows: list[tuple[Job, int]]) -> None:
        """One `prefill_batch` call for the (job, chunk size) rows, each job's slot empty. If
        it fails, every row is prefilled alone, so that only a failing row fails its job."""
        try:
            logits = self.runtime.prefill_batch(
                [job.group[0].slot for job, _ in rows],
                [job.prompt[job.fed : job.fed + size] for job, size in rows],
                decoding=[c.slot for c in self._running])
        except Exception:
            log.warning("a batched prefill of %d prompts failed; prefilling them one by one",
                        len(rows), exc_info=True)
            for job, size in rows:
                slot = job.group[0].slot
                if self.runtime.length(slot) != job.fed:  # the failed call kept some rows
                    self.runtime.truncate(slot, job.fed)
                self._prefill(job, size)
            return
        for (job, size), row in zip(rows, logits, strict=True):
            try:
                self._prefilled(job, size, row)
            except Exception as exc:
                self._fail(job, exc)

    def _prefilled(self, job: Job, size: int, logits: np.ndarray) -> None:
        """``size`` more prompt tokens of the job are in its slot, ``logits`` after the last:
        record a prompt logprob, or once the whole prompt is in, copy its KV to the sibling
        choices' slots and sample each choice's first token."""
        job.fed = min(job.fed + size, len(job.prompt))
        if job.wants_prompt_logprobs:
            if job.prompt_logprobs is None:
                job.prompt_logprobs = [None]  # nothing predicts the first prompt token
            if job.fed < len(job.prompt):
                k = job.request.prompt_logprobs or 0
                job.prompt_logprobs.append(prompt_logprob(logits, job.prompt[job.fed], k))
        if job.fed < len(job.prompt):
            return
        if job.cancelled:  # while its call ran: it ends now, before it joins a decode step
            self._remove(job)
            self._end(job, "cancelled")
            return
        self._prefilling.remove(job)
        group, job.group = job.group, []
        for c in group[1:]:
            self.runtime.copy_slot(group[0].slot, c.slot)
        self._start(job, group, logits)

    def _start(self, job: Job, group: list[Choice], logits: np.ndarray) -> None:
        """The group's prompt KV is in place: sample each choice's first token."""
        job.prompt_logits = logits if job.pending else None
        now = time.monotonic()
        first = job.t_first is None
        if first:
            job.t_first = now
            self._observe("first_token", now - job.t_submit)
        outputs = []
        rows = self._constrain(group, [logits] * len(group))
        for c, row in zip(group, rows, strict=True):  # (samplers never modify their logits)
            c.t_last = now
            job.running.append(c)
            self._running.append(c)
            outputs.append(self._accept(c, c.sampler.sample(row, c.generated)))
        prompt_logprobs = None
        if job.prompt_logprobs is not None and not job.prompt_logprobs_sent:
            prompt_logprobs, job.prompt_logprobs_sent = tuple(job.prompt_logprobs), True
        self._send(job, outputs, prompt_logprobs, cached_tokens=job.cached_tokens if first else None)

    def _decode(self) -> None:
        """One token for every running choice, or more for those that speculate: drafted
        choices are verified one runtime call each (`serve.speculative`), the rest decode
        together in one call."""
        batch = list(self._running)
        drafts = {} if self.speculator is None else self.speculator.drafts(
            batch, self.runtime.length, self.max_length)
        outputs: dict[Job, list[ChoiceOutput]] = {}
        gaps: list[float] = []
        plain = [c for c in batch if c not in drafts] if drafts else batch
        if plain:
            self._decode_plain(plain, outputs, gaps)
        for c, draft in drafts.items():
            self._verify(c, draft, outputs, gaps)
        self._observe("tokens", gaps)
        for job, outs in outputs.items():
            self._send(job, outs)

    def _verify(self, c: Choice, draft: list[int], outputs: dict[Job, list[ChoiceOutput]],
                gaps: list[float]) -> None:
        job = c.job
        if job.cancelled or c.slot < 0:  # its job failed in this step's plain decode
            return
        try:
            v = verify_choice(self.runtime, c, draft, eos_ids=self._eos, max_length=self.max_length,
                              constrain=lambda ch, row: self._constrain([ch], [row])[0],
                              batched=self._invariant_by_padding)
        except Exception as exc:
            outputs.pop(job, None)
            self._fail(job, exc)
            return
        if v.output.finish_reason is not None:
            self._release(c)
        now = time.monotonic()
        gaps += [now - c.t_last] + [0.0] * (len(v.output.token_ids) - 1)
        c.t_last = now
        outputs.setdefault(job, []).append(v.output)
        self.speculator.record(c, v.drafted, v.accepted)
        self._observe("speculated", (v.drafted, v.accepted))

    def _decode_plain(self, batch: list[Choice], outputs: dict[Job, list[ChoiceOutput]],
                      gaps: list[float]) -> None:
        """One Runtime.decode over ``batch``; each choice's output into ``outputs``."""
        draws = self._draws(batch)
        try:
            try:
                rows = self._decode_batch([c.slot for c in batch], [c.next_token for c in batch],
                                          draws)
            except ContextFull:
                # Our length check should prevent this; if the runtime's limit is tighter,
                # find the full sequences one by one and end them with "length".
                rows = [self._decode_alone(c, d) for c, d in zip(batch, draws, strict=True)]
        except Exception as exc:  # whose fault is unknowable in a batched call: fail them all
            for job in dict.fromkeys(c.job for c in batch):
                self._fail(job, exc)
            self.slots.clear()  # rows may have moved half-way: trust no idle KV either
            return
        now = time.monotonic()
        try:
            rows = self._constrain(batch, rows)
        except Exception as exc:
            for job in dict.fromkeys(c.job for c in batch if c.constraint is not None):
                self._fail(job, exc)
        firsts, finite = self._greedy_tokens(batch, rows)
        for i, (c, row) in enumerate(zip(batch, rows, strict=True)):
            job = c.job
            if job.cancelled or c.slot < 0:
                continue
            try:
                if row is None:
                    out = c.end("length")
                    self._release(c)
                else:
                    gaps.append(now - c.t_last)
                    c.t_last = now
                    if isinstance(row, RowToken):
                        sample = device_sample(row)
                    elif finite[i] and c.sampler.plain_greedy and c.constraint is None:
                        sample = c.sampler.take(row, firsts[i])
                    else:
                        sample = c.sampler.sample(row, c.generated)
                    out = self._accept(c, sample)
                outputs.setdefault(job, []).append(out)
            except Exception as exc:
                outputs.pop(job, None)
                self._fail(job, exc)

    @staticmethod
    def _greedy_tokens(batch: Sequence[Choice], rows) -> tuple[list[int], list[bool]]:
        """Where a step's host logits came back as one [rows, vocab] array and a choice is
        greedy without bias or penalties, its token in one argmax over the array
        (`serve.sampling.greedy_tokens`: per row the first argmax, and whether it is
        finite); ([], every row False) when no row can take it."""
        if (isinstance(rows, np.ndarray) and rows.ndim == 2
                and any(c.sampler.plain_greedy for c in batch)):
            return greedy_tokens(rows)
        return [], [False] * len(batch)

    def _draws(self, batch: Sequence[Choice]) -> list[RowDraw | None]:
        """Per choice, how the runtime picks its token on the device, or None: its logits come
        back for the host (every row where the runtime cannot pick, or a grammar applies)."""
        if not getattr(self.runtime, "device_sampling", False):
            return [None] * len(batch)
        # greedy only (the runtime's auto mode): a sampled row is not asked for its draw at all,
        # which would take its uniform number (the host sampler then takes its own)
        greedy_only = getattr(self.runtime, "device_greedy_only", False)
        return [c.sampler.row_draw() if c.constraint is None
                and (c.sampler.params.greedy or not greedy_only) else None for c in batch]

    @staticmethod
    def _constrain(choices: Sequence[Choice], rows: Sequence[np.ndarray | None]) -> Sequence[np.ndarray | None]:
        """The rows with each constrained choice's forbidden tokens at -inf (copies; a row may
        be shared by sibling choices). llguidance fills the bitmasks with the GIL released;
        choices without a grammar keep their row as it is, and cost nothing."""
        todo = [i for i, c in enumerate(choices) if c.constraint is not None and rows[i] is not None]
        if not todo:
            return rows
        masks = fill_bitmasks([choices[i].constraint for i in todo])
        rows = list(rows)
        for k, i in enumerate(todo):
            rows[i] = choices[i].constraint.mask(rows[i], masks[k])
        return rows

    @property
    def _invariant_by_padding(self) -> bool:
        """Batch invariance asked of a runtime whose graphs are not row-invariant: a lone
        decode gets a padding row, prompts prefill one a step, drafts verify as a batch."""
        return self.batch_invariant and not getattr(self.runtime, "batch_invariant", False)

    def _decode_batch(self, slots: list[int], ids: list[int], draws: list[RowDraw | None]
                      ) -> np.ndarray | list[np.ndarray | RowToken]:
        """One Runtime.decode (float32 [rows, vocab]; decode_sampled, a list of rows, where a
        row is picked on the device); with
        `batch_invariant` a lone sequence gets an idle slot as a padding row (then cut back),
        so it runs the same kernels as in a batch."""
        pad = None
        if self._invariant_by_padding and len(slots) == 1 and self.slots.n_free:
            pad = self.slots.cache.victim()
            pad_length = self.runtime.length(pad)
            if pad_length >= self.max_length:
                pad = None
        on_device = any(d is not None for d in draws)
        if pad is not None:
            pad_draw = RowDraw(greedy=True) if on_device else None
            slots, ids, draws = [*slots, pad], [*ids, ids[0]], [*draws, pad_draw]
        try:
            if on_device:
                rows = self.runtime.decode_sampled(slots, ids, draws)
            else:  # float32 [rows, vocab]: greedy rows take one argmax over it
                rows = self.runtime.decode(slots, ids)
        finally:
            if pad is not None:
                self.runtime.truncate(pad, pad_length)
        return rows[:1] if pad is not None else rows

    def _decode_alone(self, c: Choice, draw: RowDraw | None) -> np.ndarray | RowToken | None:
        try:
            if draw is not None:
                return self.runtime.decode_sampled([c.slot], [c.next_token], [draw])[0]
            return self.runtime.decode([c.slot], [c.next_token])[0]
        except ContextFull:
            return None

    def _accept(self, c: Choice, sample: Sample) -> ChoiceOutput:
        """Record a sampled token; returns the choice's output for this step."""
        out = c.accept(sample, eos_ids=self._eos, max_length=self.max_length)
        if out.finish_reason is not None:
            self._release(c)
        return out

    # ------------------------------------------------------------------ endings

    def _release(self, c: Choice, *, keep: bool = True) -> None:
        """Give the choice's slot back; with `keep` its KV stays for the prefix cache."""
        if c.slot < 0:
            return
        if c in self._running:  # swap-remove: the rest keep their runtime rows
            i = self._running.index(c)
            last = self._running.pop()
            if i < len(self._running):
                self._running[i] = last
        slot, c.slot = c.slot, -1
        try:
            self.slots.release(slot, (lambda: self._reusable(c.job, c.held_ids(self.runtime.length(slot))))
                               if keep else None)
        finally:
            if self.speculator is not None:  # a draft model's idle slots keep no more than these
                self.speculator.trim_idle(self.slots.cache.idle_ids())

    def _send(
        self,
        job: Job,
        outputs: Sequence[ChoiceOutput],
        prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None,
        *,
        cached_tokens: int | None = None,
    ) -> None:
        usage = None
        if job.done:
            usage = Usage(len(job.prompt), job.completion_tokens, job.cached_tokens)
            job.running.clear()
            self._end(job, "ok")  # first, so metrics are current when the client hears
        job.send(Event(tuple(outputs), prompt_logprobs, usage, cached_tokens=cached_tokens))

    def _remove(self, job: Job, *, keep: bool = True) -> None:
        """Take a job out of every structure and give back its slots."""
        if job in self._waiting:
            self._waiting.remove(job)
        if job in self._prefilling:
            self._prefilling.remove(job)
        for c in job.slotted:
            try:
                self._release(c, keep=keep)
            except Exception:
                log.exception("freeing a slot failed")
        job.slotted.clear()
        job.running.clear()
        job.group = []
        job.pending.clear()

    def _fail(self, job: Job, exc: BaseException) -> None:
        log.error("request %s failed", job.request.request_id or "?", exc_info=exc)
        self._remove(job, keep=False)
        self._end(job, "error")
        job.send(Event(error=GENERIC_SERVER_ERROR))

    def _fail_all(self, message: str, code: str | None = None) -> None:
        for job in self._jobs():
            self._remove(job, keep=code is not None)
            self._end(job, code or "error")
            job.send(Event(error=message, error_code=code))

    def _end(self, job: Job, outcome: str) -> None:
        """Bookkeeping once per request, however it ends: counters, the log line, metrics."""
        if job.ended:
            return
        job.ended = True
        with self._lock:
            self._alive -= 1
            if not job.admitted:
                self._queued -= 1
        if job.admitted:
            self._active -= 1
        stats = job.stats(outcome)
        log.info("%s", stats)
        self._observe("request_done", stats)

    def _observe(self, hook: str, arg) -> None:
        try:
            getattr(self.observer, hook)(arg)
        except Exception:
            log.exception("metrics hook %s failed", hook)
