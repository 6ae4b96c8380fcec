"""The engine's scheduling against a fake Runtime (pure Python KV: token lists per slot).

The fake model's next token depends on the whole sequence in its slot, so any mix-up of
slots, a wrong truncate or a wrong copy changes the text: "same output regardless of how
many slots" then checks the scheduling end to end. The tokenizer is a real byte-level one.
"""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from serve.engine import Engine, GenerationRequest
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

    def copy_slot(self, src, dst):
        self.calls.append(("copy", src, dst))
        self.seqs[dst] = list(self.seqs[src])

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
