"""The engine's scheduling against a fake Runtime (pure Python KV: token lists per slot).

The fake model's next token depends on the whole sequence in its slot, so any mix-up of
slots, a wrong truncate or a wrong copy changes the text: "same output regardless of how
many slots" then checks the scheduling end to end. The tokenizer is a real byte-level one.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from serve.engine import Engine
from serve.events import QUEUE_TIMEOUT, SHUTTING_DOWN, GenerationRequest, QueueFull, ShuttingDown
from serve.runtime import ContextFull
from serve.sampling import SamplingParams
from serve.tokenizer import Tokenizer

EOS = 256
VOCAB = 257


def _byte_tokenizer() -> Tokenizer:
    # GPT-2's byte → printable character table, so token id == byte value.
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    hf = HFTokenizer(models.BPE(vocab={chars[b]: b for b in range(256)}, merges=[]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens(["<eos>"])
    return Tokenizer(hf, config={"eos_token": "<eos>"}, generation_config={"eos_token_id": EOS})


TOKENIZER = _byte_tokenizer()


class FakeRuntime:
    """Runtime's interface over Python lists. Logits favour `next_token(sequence)`; with
    `eos_logit` set, EOS competes with it (random lengths when sampling)."""

    def __init__(self, n_slots: int = 1, max_length: int = 64, *, eos_logit: float | None = None,
                 limit: int | None = None) -> None:
        self.info = SimpleNamespace(max_length=max_length, vocab_size=VOCAB, name="fake")
        self.n_slots = n_slots
        self.seqs: list[list[int]] = [[] for _ in range(n_slots)]
        self.eos_logit = eos_logit
        self.limit = limit or max_length  # where ContextFull is raised
        self.calls: list[tuple] = []
        self.fail_decode = False

    @staticmethod
    def next_token(seq: list[int]) -> int:
        return 97 + (sum(seq) * 7 + len(seq)) % 26  # a..z

    def _logits(self, seq: list[int]) -> np.ndarray:
        logits = np.zeros(VOCAB, np.float32)
        logits[self.next_token(seq)] = 10.0
        if self.eos_logit is not None:
            logits[EOS] = self.eos_logit
        return logits

    def length(self, slot: int) -> int:
        return len(self.seqs[slot])

    def kv_bytes(self) -> int:
        return 0

    def kv_bytes_in_use(self) -> int:
        return 0

    def _room(self, slot: int, n: int) -> None:
        if len(self.seqs[slot]) + n > self.limit:
            raise ContextFull(f"slot {slot}")

    def prefill(self, slot, ids):
        self._room(slot, len(ids))
        self.calls.append(("prefill", slot, len(ids)))
        self.seqs[slot].extend(ids)
        return self._logits(self.seqs[slot])

    def decode(self, slots, ids):
        if self.fail_decode:
            raise RuntimeError("device lost")
        for s in slots:
            self._room(s, 1)
        self.calls.append(("decode", tuple(slots)))
        for s, t in zip(slots, ids, strict=True):
            self.seqs[s].append(t)
        return np.stack([self._logits(self.seqs[s]) for s in slots])

    def truncate(self, slot, length):
        self.calls.append(("truncate", slot, length))
        del self.seqs[slot][length:]

    def copy_slot(self, src, dst, length=None):
        self.calls.append(("copy", src, dst))
        self.seqs[dst] = list(self.seqs[src][:length])

    def reset(self, slot):
        self.seqs[slot] = []


def expected_text(prompt: list[int], n: int) -> str:
    seq, out = list(prompt), []
    for _ in range(n):
        t = FakeRuntime.next_token(seq)
        seq.append(t)
        out.append(chr(t))
    return "".join(out)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


async def collect(engine: Engine, request: GenerationRequest):
    """(texts per choice, finish reasons, events) of one request."""
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    events = []
    async for event in engine.submit(request):
        events.append(event)
        for c in event.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    return texts, finish, events


@pytest.fixture
def make_engine():
    engines = []

    def make(runtime: FakeRuntime, **kwargs) -> Engine:
        engine = Engine(runtime, TOKENIZER, **kwargs)
        engine.start()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.stop()


def req(prompt="hello", **params) -> GenerationRequest:
    params.setdefault("temperature", 0.0)
    return GenerationRequest(tuple(TOKENIZER.encode(prompt)), SamplingParams(**params))


def test_greedy_text_length_and_usage(make_engine):
    engine = make_engine(FakeRuntime())
    texts, finish, events = run(collect(engine, req(max_tokens=6)))
    assert texts == {0: expected_text(TOKENIZER.encode("hello"), 6)}
    assert finish == {0: "length"}
    assert events[-1].usage.prompt_tokens == 5 and events[-1].usage.completion_tokens == 6
    assert all(e.usage is None for e in events[:-1])
    assert engine.slots_in_use == 0


def test_default_max_tokens_is_the_rest_of_the_context(make_engine):
    engine = make_engine(FakeRuntime(max_length=20))
    texts, finish, events = run(collect(engine, req()))
    assert len(texts[0]) == 15 and finish == {0: "length"}
    assert events[-1].usage.completion_tokens == 15


def test_runtime_context_full_ends_with_length(make_engine):
    runtime = FakeRuntime(max_length=64, limit=12)  # the runtime is tighter than it says
    engine = make_engine(runtime)
    texts, finish, _ = run(collect(engine, req(max_tokens=30)))
    assert finish == {0: "length"} and len(texts[0]) == 8
    assert engine.slots_in_use == 0


def test_eos_and_ignore_eos(make_engine):
    engine = make_engine(FakeRuntime(eos_logit=20.0))
    texts, finish, events = run(collect(engine, req(max_tokens=5)))
    assert texts == {0: ""} and finish == {0: "stop"}
    assert events[-1].usage.completion_tokens == 1  # the EOS token counts as generated
    texts, finish, _ = run(collect(engine, req(max_tokens=3, ignore_eos=True)))
    assert finish == {0: "length"} and texts == {0: ""}  # EOS has no text


def test_stop_string(make_engine):
    engine = make_engine(FakeRuntime())
    full = expected_text(TOKENIZER.encode("hello"), 10)
    stop = full[4:6]
    texts, finish, _ = run(collect(engine, req(max_tokens=10, stop=(stop,))))
    assert finish == {0: "stop"} and texts[0] == full[: full.index(stop)]


def test_chunked_prefill(make_engine):
    runtime = FakeRuntime()
    engine = make_engine(runtime, prefill_chunk=4)
    run(collect(engine, req("abcdefghij", max_tokens=2)))
    assert [c for c in runtime.calls if c[0] == "prefill"] == [
        ("prefill", 0, 4), ("prefill", 0, 4), ("prefill", 0, 2)]


def test_logprobs_and_prompt_logprobs(make_engine):
    runtime = FakeRuntime()
    engine = make_engine(runtime)
    request = GenerationRequest(tuple(TOKENIZER.encode("abc")),
                                SamplingParams(temperature=0, max_tokens=3, logprobs=2), prompt_logprobs=1)
    _, _, events = run(collect(engine, request))
    assert [c for c in runtime.calls if c[0] == "prefill"] == [("prefill", 0, 1)] * 3
    prompt_lps = events[0].prompt_logprobs
    assert prompt_lps[0] is None and len(prompt_lps) == 3
    assert prompt_lps[1].token_id == ord("b") and len(prompt_lps[1].top) == 1
    assert all(e.prompt_logprobs is None for e in events[1:])
    lps = [lp for e in events for c in e.choices for lp in (c.logprobs or ())]
    assert len(lps) == 3 and all(len(lp.top) == 2 and lp.top[0][0] == lp.token_id for lp in lps)


@pytest.mark.parametrize("slots", [1, 2, 3])
def test_n_choices_are_the_same_whatever_the_slot_count(make_engine, slots):
    """n=3 sampled choices with EOS competing: on 1 slot they run one after another (prompt
    prefilled again), on 2 the third starts from a sibling's KV (copy + truncate)."""
    runtime = FakeRuntime(slots, eos_logit=9.0)
    engine = make_engine(runtime)
    texts, finish, events = run(collect(engine, req(max_tokens=12, n=3, temperature=1.0, seed=0)))
    reference = FakeRuntime(3, eos_logit=9.0)
    ref_engine = make_engine(reference)
    ref_texts, ref_finish, ref_events = run(collect(ref_engine, req(max_tokens=12, n=3, temperature=1.0, seed=0)))
    assert texts == ref_texts and finish == ref_finish
    assert len(set(texts.values())) > 1  # the seeds differ per choice
    assert events[-1].usage == ref_events[-1].usage
    assert events[-1].usage.completion_tokens == sum(
        len(c.token_ids) for e in events for c in e.choices)
    assert engine.slots_in_use == 0
    assert sum(1 for c in reference.calls if c[0] == "prefill") == 1  # shared prefill
    if slots == 2:
        assert any(c[0] == "truncate" for c in runtime.calls)


def test_concurrent_requests_share_decode_steps(make_engine):
    runtime = FakeRuntime(2)
    engine = make_engine(runtime)

    async def both():
        return await asyncio.gather(collect(engine, req("abc", max_tokens=8)),
                                    collect(engine, req("xyz", max_tokens=8)))

    (a, _, _), (b, _, _) = run(both())
    assert a == {0: expected_text(TOKENIZER.encode("abc"), 8)}
    assert b == {0: expected_text(TOKENIZER.encode("xyz"), 8)}
    assert any(c[0] == "decode" and len(c[1]) == 2 for c in runtime.calls)


def test_a_steps_events_wake_the_loop_once(make_engine):
    """Every request of one loop shares a LoopMailbox: a decode step's events for all of them
    arrive with one call_soon_threadsafe, not one each (each is a self-pipe write and a GIL
    handover), in order, and the text is what each request gets alone."""
    runtime = FakeRuntime(4)
    engine = make_engine(runtime)
    prompts = ["abc", "xyz", "hello", "qq"]

    async def four():
        loop = asyncio.get_running_loop()
        wakes = 0
        original = loop.call_soon_threadsafe

        def counted(*args, **kwargs):
            nonlocal wakes
            if threading.current_thread().name == "llorch-engine":
                wakes += 1
            return original(*args, **kwargs)

        loop.call_soon_threadsafe = counted
        try:
            got = await asyncio.gather(*(collect(engine, req(p, max_tokens=12)) for p in prompts))
        finally:
            del loop.call_soon_threadsafe
        return got, wakes

    got, wakes = run(four())
    for p, (texts, finish, events) in zip(prompts, got, strict=True):
        assert texts == {0: expected_text(TOKENIZER.encode(p), 12)} and finish == {0: "length"}
        assert len(events) == 12 and events[-1].usage is not None
    steps = sum(c[0] in ("decode", "prefill") for c in runtime.calls)
    assert wakes <= steps < 4 * 12  # at most one a step, where one a token was 48


def test_fifo_when_slots_are_busy(make_engine):
    engine = make_engine(FakeRuntime(1))
    order = []

    async def one(name, prompt):
        async for event in engine.submit(req(prompt, max_tokens=4)):
            if event.final:
                order.append(name)

    async def all_three():
        await asyncio.gather(one("a", "aa"), one("b", "bb"), one("c", "cc"))

    run(all_three())
    assert order == ["a", "b", "c"]


def test_cancel_frees_the_slot(make_engine):
    class SlowDecode(FakeRuntime):  # 1 ms a step, like a small real model
        def decode(self, slots, ids):
            time.sleep(0.001)
            return super().decode(slots, ids)

    runtime = SlowDecode(1, max_length=10_000)
    engine = make_engine(runtime)

    async def cancel_midway():
        stream = engine.submit(req(max_tokens=5000))
        await stream.__anext__()
        stream.cancel()
        assert [e async for e in stream] == []
        for _ in range(200):
            if engine.slots_in_use == 0:
                break
            await asyncio.sleep(0.01)
        return await collect(engine, req(max_tokens=3))

    texts, finish, _ = run(cancel_midway())
    assert engine.slots_in_use == 0 and finish == {0: "length"}
    assert sum(1 for c in runtime.calls if c[0] == "decode") < 1000  # not the 5000 asked for


def test_errors_end_the_request_not_the_thread(make_engine):
    runtime = FakeRuntime(1)
    engine = make_engine(runtime)
    runtime.fail_decode = True
    _, _, events = run(collect(engine, req(max_tokens=5)))
    assert events[-1].error and "Traceback" not in events[-1].error
    assert engine.slots_in_use == 0
    # a sampler error (bias on a token the logits do not have) fails only its request
    runtime.fail_decode = False
    _, _, events = run(collect(engine, req(max_tokens=5, logit_bias={VOCAB + 5: 1.0})))
    assert events[-1].error
    texts, finish, _ = run(collect(engine, req(max_tokens=2)))
    assert finish == {0: "length"} and len(texts[0]) == 2


def test_stop_ends_waiting_requests(make_engine):
    release = threading.Event()

    class SlowRuntime(FakeRuntime):
        def prefill(self, slot, ids):
            release.wait(5)
            return super().prefill(slot, ids)

    engine = make_engine(SlowRuntime(1))

    async def scenario():
        stream = engine.submit(req(max_tokens=3))
        await asyncio.sleep(0.05)
        stopper = threading.Thread(target=engine.stop)
        stopper.start()
        release.set()
        events = [e async for e in stream]
        stopper.join()
        return events

    events = run(scenario())
    assert events[-1].final


# ------------------------------------------------------- continuous batching, prefix cache


class SlowDecode(FakeRuntime):
    """1 ms a decode step, like a small real model, so requests overlap."""

    def decode(self, slots, ids):
        time.sleep(0.001)
        return super().decode(slots, ids)


def enc(text: str) -> list[int]:
    return TOKENIZER.encode(text)


def test_a_long_prompt_is_prefilled_between_decode_steps(make_engine):
    runtime = SlowDecode(2, max_length=400)
    engine = make_engine(runtime, prefill_chunk=4)

    async def scenario():
        a = engine.submit(req("ab", max_tokens=60))
        await a.__anext__()
        b = await collect(engine, req("x" * 40, max_tokens=3))
        rest = [e async for e in a]
        return b, rest

    (b_texts, _, _), _ = run(scenario())
    assert b_texts == {0: expected_text(enc("x" * 40), 3)}
    calls = runtime.calls
    b_chunks = [i for i, c in enumerate(calls) if c[0] == "prefill" and c[2] == 4]
    assert len(b_chunks) == 10
    for i, j in itertools.pairwise(b_chunks):  # the running stream got a token in between
        assert any(c[0] == "decode" for c in calls[i + 1 : j])


def test_random_mix_gives_the_same_text_as_alone(make_engine):
    """Requests joining and leaving the batch, sharing prefixes (so the cache copies and
    truncates KV), n > 1, more requests than slots: every text is what it is alone."""
    rng = random.Random(7)
    runtime = SlowDecode(4, max_length=120)
    engine = make_engine(runtime, prefill_chunk=5)
    stems = ["You are a helpful assistant. ", "System: be brief. ", ""]
    cases = [(rng.choice(stems) + rng.choice(["hi", "hello there", "abc", "what?"]) * rng.randint(1, 3),
              rng.randint(1, 25), rng.choice([1, 1, 2])) for _ in range(14)]

    async def one(prompt, max_tokens, n, delay):
        await asyncio.sleep(delay)
        return await collect(engine, req(prompt, max_tokens=max_tokens, n=n, ignore_eos=True))

    async def all_of_them():
        return await asyncio.gather(*(one(*case, rng.random() * 0.05) for case in cases))

    for (prompt, max_tokens, n), (texts, finish, events) in zip(cases, run(all_of_them()), strict=True):
        assert texts == {i: expected_text(enc(prompt), max_tokens) for i in range(n)}
        assert finish == {i: "length" for i in range(n)}
        usage = events[-1].usage
        assert usage.prompt_tokens == len(enc(prompt)) and usage.completion_tokens == n * max_tokens
        assert 0 <= usage.cached_tokens <= max(len(enc(prompt)) - 2, 0)
    assert engine.slots_in_use == 0 and engine.num_requests == 0
    assert any(c[0] == "truncate" for c in runtime.calls) or any(c[0] == "copy" for c in runtime.calls)


def test_prefix_cache_reuses_a_finished_sequence(make_engine):
    runtime = FakeRuntime(2, max_length=200)
    engine = make_engine(runtime, prefill_chunk=8)
    system = "You are a helpful assistant. "
    first = run(collect(engine, req(system + "Hi", max_tokens=5)))
    assert first[2][-1].usage.cached_tokens == 0
    runtime.calls.clear()
    texts, _, events = run(collect(engine, req(system + "Bye", max_tokens=5)))
    assert texts == {0: expected_text(enc(system + "Bye"), 5)}
    assert events[-1].usage.cached_tokens == len(enc(system))
    assert sum(c[2] for c in runtime.calls if c[0] == "prefill") == 3  # "Bye" only
    # an empty slot was free: the prefix was copied there, the first sequence is intact
    assert ("copy", 0, 1) in runtime.calls
    again = run(collect(engine, req(system + "Hi", max_tokens=5)))
    assert again[0] == first[0] and again[2][-1].usage.cached_tokens == len(enc(system + "Hi")) - 2
    # the first event tells the same number (a stream's opening frame reports it), no later one does
    assert [e.cached_tokens for e in again[2]] == [len(enc(system + "Hi")) - 2] + [None] * (len(again[2]) - 1)
    # a chat that grows: the previous answer's tokens are reused too (all but the last one,
    # which was sampled but never fed)
    turn2 = system + "Hi" + first[0][0] + " and then?"
    texts, _, events = run(collect(engine, req(turn2, max_tokens=4)))
    assert texts == {0: expected_text(enc(turn2), 4)}
    assert events[-1].usage.cached_tokens == len(enc(system + "Hi")) + 4
    assert engine.slots_in_use == 0


def test_prefix_from_a_running_sequence(make_engine):
    runtime = SlowDecode(2, max_length=400)
    engine = make_engine(runtime)
    system = "Shared system prompt. "

    async def scenario():
        a = engine.submit(req(system + "first", max_tokens=300))
        await a.__anext__()
        b = await collect(engine, req(system + "second", max_tokens=3))
        a.cancel()
        return b

    texts, _, events = run(scenario())
    assert texts == {0: expected_text(enc(system + "second"), 3)}
    assert events[-1].usage.cached_tokens == len(enc(system))
    assert ("copy", 0, 1) in runtime.calls


def test_prefix_cache_off(make_engine):
    runtime = FakeRuntime(1)
    engine = make_engine(runtime, prefix_cache_tokens=0)
    run(collect(engine, req("hello world", max_tokens=2)))
    _, _, events = run(collect(engine, req("hello world", max_tokens=2)))
    assert events[-1].usage.cached_tokens == 0
    assert [c[2] for c in runtime.calls if c[0] == "prefill"] == [11, 11]


def test_prefix_cache_token_budget(make_engine):
    runtime = FakeRuntime(2, max_length=100)
    engine = make_engine(runtime, prefix_cache_tokens=12)
    run(collect(engine, req("abcdefghij", max_tokens=5)))  # 14 tokens held: kept 12
    assert engine.cached_prefix_tokens == 12 and sorted(map(len, runtime.seqs)) == [0, 12]
    _, _, events = run(collect(engine, req("abcdefghijkl", max_tokens=1)))
    assert events[-1].usage.cached_tokens == 10


# ------------------------------------------------------------ queue, timeout, drain


class RecordingObserver:
    def __init__(self):
        self.ttfts, self.gaps, self.stats = [], [], []

    def first_token(self, ttft):
        self.ttfts.append(ttft)

    def tokens(self, gaps):
        self.gaps.extend(gaps)

    def request_done(self, stats):
        self.stats.append(stats)


async def wait_until(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.002)


def test_max_queue(make_engine):
    engine = make_engine(SlowDecode(1, max_length=10_000), max_queue=1)

    async def scenario():
        a = engine.submit(req(max_tokens=5000))
        await wait_until(lambda: engine.slots_in_use == 1)
        b = engine.submit(req("bb", max_tokens=2))
        with pytest.raises(QueueFull):
            engine.submit(req("cc", max_tokens=2))
        assert engine.num_waiting == 1 and engine.num_running == 1
        a.cancel()
        return [e async for e in b]

    events = run(scenario())
    assert events[-1].usage.completion_tokens == 2
    assert engine.num_waiting == 0 and engine.num_requests == 0


def test_queue_timeout(make_engine):
    observer = RecordingObserver()
    engine = make_engine(SlowDecode(1, max_length=10_000), queue_timeout=0.05, observer=observer)

    async def scenario():
        a = engine.submit(req(max_tokens=5000))
        await a.__anext__()
        events = [e async for e in engine.submit(req("late", max_tokens=2))]
        a.cancel()
        await wait_until(lambda: engine.num_requests == 0)
        return events

    [event] = run(scenario())
    assert event.error and event.error_code == QUEUE_TIMEOUT
    late = next(s for s in observer.stats if s.outcome == QUEUE_TIMEOUT)
    assert late.queued >= 0.05 and late.ttft is None and not late.admitted
    assert engine.num_requests == 0 and engine.num_waiting == 0


@pytest.mark.parametrize("timeout", [0.1, 5.0])
def test_drain(make_engine, timeout):
    engine = make_engine(SlowDecode(1, max_length=10_000))

    async def scenario():
        a = engine.submit(req("a", max_tokens=2000 if timeout < 1 else 50))
        await a.__anext__()
        b = engine.submit(req("b", max_tokens=2))
        engine.drain(timeout)
        with pytest.raises(ShuttingDown):
            engine.submit(req("c", max_tokens=2))
        return [e async for e in a], [e async for e in b]

    a_events, [b_event] = run(scenario())
    assert b_event.error_code == SHUTTING_DOWN
    if timeout < 1:  # cut at the deadline
        assert a_events[-1].error_code == SHUTTING_DOWN
    else:  # finished in time
        assert a_events[-1].usage.completion_tokens == 50
    assert engine.num_requests == 0 and engine.slots_in_use == 0


def test_observer_and_stats(make_engine):
    observer = RecordingObserver()
    engine = make_engine(SlowDecode(2), observer=observer)
    run(collect(engine, req("hello", max_tokens=6, n=2)))
    [stats] = observer.stats
    assert stats.outcome == "ok" and stats.prompt_tokens == 5 and stats.completion_tokens == 12
    assert stats.finish_reasons == ("length", "length") and stats.admitted
    assert 0 <= stats.queued <= stats.ttft <= stats.duration
    assert stats.tokens_per_second > 0
    assert len(observer.ttfts) == 1 and len(observer.gaps) == 10  # 5 decode steps x 2 choices


def test_batch_invariant_pads_a_lone_sequence(make_engine):
    runtime = FakeRuntime(2)
    engine = make_engine(runtime, batch_invariant=True)
    # slot 0 keeps its 4 prompt tokens as cache: under batch invariance an answer's KV (from
    # decode steps, another attention kernel than a prefill's) is not kept for reuse
    run(collect(engine, req("held", max_tokens=2)))
    assert runtime.seqs[0] == enc("held")
    runtime.calls.clear()
    texts, _, _ = run(collect(engine, req("zz", max_tokens=4)))
    assert texts == {0: expected_text(enc("zz"), 4)}
    decodes = [c[1] for c in runtime.calls if c[0] == "decode"]
    assert decodes == [(1, 0)] * 3  # the idle slot rides along ...
    assert runtime.seqs[0] == enc("held")  # ... untouched


def test_no_one_token_last_prefill_chunk(make_engine):
    runtime = FakeRuntime()
    engine = make_engine(runtime, prefill_chunk=4)
    run(collect(engine, req("abcdefghi", max_tokens=1)))  # 9 = 4 + 3 + 2, not 4 + 4 + 1
    assert [c[2] for c in runtime.calls if c[0] == "prefill"] == [4, 3, 2]


def test_stop_token_ids_end_the_choice_without_the_token_text(make_engine):
    """vLLM's `stop_token_ids`: the choice stops on the first of them it samples, finish
    "stop", that token's text left out unless `include_stop_str_in_output` (vLLM's
    detokenizer skips the token that ended a choice, EOS or stop id, unless asked), nothing
    after it."""
    engine = make_engine(FakeRuntime())
    full = expected_text(enc("hello"), 8)
    stop_at = full[4]  # the fake tokenizer: one character a token
    texts, finish, events = run(collect(engine, req(max_tokens=8, stop_token_ids=(ord(stop_at),))))
    cut = full.index(stop_at)
    assert texts == {0: full[:cut]} and finish == {0: "stop"}
    assert events[-1].usage.completion_tokens == cut + 1
    texts, _, _ = run(collect(engine, req(max_tokens=8, stop_token_ids=(ord(stop_at),),
                                          include_stop_str_in_output=True)))
    assert texts == {0: full[: cut + 1]}
    texts, finish, _ = run(collect(engine, req(max_tokens=8, stop_token_ids=(1,))))
    assert texts == {0: full} and finish == {0: "length"}  # an id it never samples
