"""Batched prefill in the engine: admitted prompts share a step, and those starting from an
empty slot share one `prefill_batch` call.

Scheduling against the fake Runtime of test_engine (whose next token depends on the whole
sequence in a slot, so any mix-up changes the text), then the real engine on real runtimes:
the tiny model for the scheduling, the default model (fp32 export) where text matters, and
the real server through the openai client.
"""

from __future__ import annotations

import asyncio
import random
import threading

import numpy as np
import pytest
from test_engine import (
    TOKENIZER,
    FakeRuntime,
    SlowDecode,
    collect,
    enc,
    expected_text,
    req,
    run,
)

from serve.engine import Engine
from serve.events import GenerationRequest
from serve.runtime import RuntimeOptions, open_runtime
from serve.runtime.shared_kv import HostRuntime
from serve.sampling import SamplingParams
from serve.tokenizer import Tokenizer


class BatchingFake(SlowDecode):
    """The fake runtime with `prefill_batch` (empty slots only, as the real one), a gate
    that can hold a batched call, and a poison token that makes any call holding it fail."""

    prefill_padding = None

    def __init__(self, *args, poison: int | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.poison = poison
        self.decoding: list = []  # each prefill_batch call's `decoding` argument
        self.gate: threading.Event | None = None
        self.entered = threading.Event()

    def _check(self, ids) -> None:
        if self.poison is not None and self.poison in ids:
            raise RuntimeError("poisoned prompt")

    def prefill(self, slot, ids):
        self._check(ids)
        return super().prefill(slot, ids)

    def prefill_batch(self, slots, seqs, *, decoding=None):
        assert len(slots) > 1 and not any(self.seqs[s] for s in slots), "empty slots only"
        for s in slots:
            self._room(s, max(len(ids) for ids in seqs))
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(10)
        for ids in seqs:
            self._check(ids)
        self.calls.append(("prefill_batch", tuple(slots), tuple(len(ids) for ids in seqs)))
        self.decoding.append(decoding)
        for s, ids in zip(slots, seqs, strict=True):
            self.seqs[s].extend(ids)
        return np.stack([self._logits(self.seqs[s]) for s in slots])


@pytest.fixture
def engines():
    made = []
    yield made
    for engine in made:
        engine.stop()


def submitted_together(engines, runtime, requests, **kwargs):
    """Every request submitted before the engine thread starts, so the first step admits them
    all; returns each one's (texts, finish reasons, events)."""
    engine = Engine(runtime, TOKENIZER, **kwargs)
    engines.append(engine)

    async def scenario():
        tasks = [asyncio.ensure_future(collect(engine, r)) for r in requests]
        await asyncio.sleep(0)  # every task has submitted
        engine.start()
        return await asyncio.gather(*tasks)

    return run(scenario()), engine


class Paused:
    """Holds a started engine's thread after a step (its ``on_step`` hook), so that requests
    submitted meanwhile are all admitted by the next step; `release` lets it go on."""

    def __init__(self, engine: Engine) -> None:
        self._go, self._held = threading.Event(), threading.Event()
        engine.on_step = self._hook
        engine.wake()
        assert self._held.wait(10)

    def _hook(self) -> None:
        if not self._go.is_set():
            self._held.set()
            self._go.wait(10)

    def release(self) -> None:
        self._go.set()


def kinds(calls) -> list[str]:
    return [c[0] for c in calls if c[0] != "truncate" and c[0] != "copy"]


def test_prompts_arriving_together_share_one_prefill_call(engines):
    runtime = BatchingFake(4, max_length=200)
    prompts = ["hello", "a much longer prompt than that", "hi", "zz top"]
    got, engine = submitted_together(engines, runtime, [req(p, max_tokens=6) for p in prompts],
                                     prefill_chunk=256)
    for p, (texts, finish, _) in zip(prompts, got, strict=True):
        assert texts == {0: expected_text(enc(p), 6)} and finish == {0: "length"}
    assert runtime.calls[0] == ("prefill_batch", (0, 1, 2, 3), tuple(len(enc(p)) for p in prompts))
    assert kinds(runtime.calls)[1:] == ["decode"] * 5
    assert engine.slots_in_use == 0


def test_the_step_budget_counts_padding(engines):
    """prefill_chunk=12: two 5-token rows (10 padded tokens) share a call, a third would make
    15; the next step takes the next two."""
    runtime = BatchingFake(4, max_length=200)
    prompts = ["aaaaa", "bbbbb", "ccccc", "ddddd"]
    got, _ = submitted_together(engines, runtime, [req(p, max_tokens=3) for p in prompts],
                                prefill_chunk=12)
    assert [t for t, _, _ in got] == [{0: expected_text(enc(p), 3)} for p in prompts]
    assert kinds(runtime.calls)[:3] == ["prefill_batch", "decode", "prefill_batch"]
    assert [c[2] for c in runtime.calls if c[0] == "prefill_batch"] == [(5, 5), (5, 5)]
    # the second pair goes after the first pair's rows, where the next decode wants it
    first, second = [c[1] for c in runtime.calls if c[0] == "prefill_batch"]
    assert runtime.decoding == [[], list(first)]


def test_rows_too_different_for_the_padding_limit_go_alone_in_the_same_step(engines):
    runtime = BatchingFake(3, max_length=200)
    runtime.prefill_padding = 1.25
    prompts = ["abcdefghijklmnopqrst", "ab", "abcdefghijklmnopqrsu"]
    got, _ = submitted_together(engines, runtime, [req(p, max_tokens=3) for p in prompts])
    assert [t for t, _, _ in got] == [{0: expected_text(enc(p), 3)} for p in prompts]
    # the 2-token prompt would pad 40 real tokens to 60: it takes a call of its own, before
    # the first decode all the same
    assert runtime.calls[:3] == [("prefill_batch", (0, 2), (20, 20)), ("prefill", 1, 2),
                                 ("decode", (0, 2, 1))]


def _hit_then_two_fresh(engines, runtime, system: str, **engine_kwargs) -> list:
    """A started engine serves ``system + "Hi"`` (its KV then idle in the prefix cache); the
    runtime's calls are cleared, then ``system + "Bye"`` and two fresh prompts are admitted in
    one step. Checks each answer's text; returns (texts, finish, events) per request."""
    engine = Engine(runtime, TOKENIZER, **engine_kwargs)
    engines.append(engine)
    engine.start()
    run(collect(engine, req(system + "Hi", max_tokens=2)))
    runtime.calls.clear()
    prompts = [system + "Bye", "fresh one ", "fresh two "]

    async def scenario():
        pause = Paused(engine)
        tasks = [asyncio.ensure_future(collect(engine, req(p, max_tokens=4))) for p in prompts]
        await asyncio.sleep(0)
        pause.release()
        return await asyncio.gather(*tasks)

    got = run(scenario())
    assert [t for t, _, _ in got] == [{0: expected_text(enc(p), 4)} for p in prompts]
    return got


@pytest.mark.parametrize("padding", [1.25, None])
def test_prefix_hit_and_fresh_prompts_in_one_step(engines, padding):
    """A prompt whose prefix an idle slot holds is prefilled in the same step as the fresh
    ones that share a batched call: in a call of its own where padding costs (the CPU: the
    kernel batches multi-token rows only from position 0), or where padding is free (GPUs)
    as a row of the batch from position 0 (prefix and all: usage then reports no hit)."""
    runtime = BatchingFake(4, max_length=200)
    runtime.prefill_padding = padding
    system = "You are a helpful assistant. "
    got = _hit_then_two_fresh(engines, runtime, system)
    calls = [c for c in runtime.calls if c[0] not in ("copy", "truncate")]
    if padding is not None:
        assert [g[2][-1].usage.cached_tokens for g in got] == [len(enc(system)), 0, 0]
        assert calls[:3] == [("prefill_batch", (2, 3), (10, 10)), ("prefill", 1, 3),
                             ("decode", (2, 3, 1))]  # "Bye" after the hit
    else:
        assert [g[2][-1].usage.cached_tokens for g in got] == [0, 0, 0]
        assert calls[:2] == [("prefill_batch", (1, 2, 3), (len(enc(system + "Bye")), 10, 10)),
                             ("decode", (1, 2, 3))]
        # the prefix is recomputed in the batch: it is not copied into the slot first
        assert not [c for c in runtime.calls if c[0] == "copy"]


def test_a_long_cached_prefix_is_not_recomputed_past_the_budget(engines):
    """Where padding is free, a hit joins the batch from position 0 only if prefix and chunk fit
    the step's budget: a 60-token cached prefix with a budget of 32 prefills its new tokens
    alone, beside the fresh prompts' batched call, and keeps its cached tokens."""
    runtime = BatchingFake(4, max_length=200)
    system = "You are a helpful assistant. You answer briefly. "  # 49 tokens
    got = _hit_then_two_fresh(engines, runtime, system, prefill_chunk=32)
    assert got[0][2][-1].usage.cached_tokens == len(enc(system))
    calls = [c for c in runtime.calls if c[0] not in ("copy", "truncate")]
    assert calls[:3] == [("prefill_batch", (2, 3), (10, 10)), ("prefill", 1, 3),
                         ("decode", (2, 3, 1))]


def test_prompt_logprobs_prefill_alone_one_token_at_a_time(engines):
    runtime = BatchingFake(3, max_length=200)
    lp = GenerationRequest(tuple(enc("abcd")), SamplingParams(temperature=0, max_tokens=3),
                           prompt_logprobs=1)
    requests = [req("first one", max_tokens=3), lp, req("second one", max_tokens=3)]
    got, _ = submitted_together(engines, runtime, requests)
    assert runtime.calls[:2] == [("prefill_batch", (0, 2), (9, 10)), ("prefill", 1, 1)]
    assert [c for c in runtime.calls if c[0] == "prefill"] == [("prefill", 1, 1)] * 4
    alone_rt = FakeRuntime(1, max_length=200)
    alone = Engine(alone_rt, TOKENIZER)
    engines.append(alone)
    alone.start()
    ref = run(collect(alone, GenerationRequest(tuple(enc("abcd")), SamplingParams(
        temperature=0, max_tokens=3), prompt_logprobs=1)))
    assert got[1][0] == ref[0]
    assert got[1][2][0].prompt_logprobs == ref[2][0].prompt_logprobs


def test_batch_invariant_keeps_one_prompt_a_step(engines):
    runtime = BatchingFake(3, max_length=200)
    prompts = ["one", "two", "three"]
    got, _ = submitted_together(engines, runtime, [req(p, max_tokens=4) for p in prompts],
                                batch_invariant=True)
    assert [t for t, _, _ in got] == [{0: expected_text(enc(p), 4)} for p in prompts]
    assert kinds(runtime.calls)[:5] == ["prefill", "decode", "prefill", "decode", "prefill"]


def test_a_failing_row_fails_only_its_job(engines):
    """The batched call fails; its rows are prefilled one by one, and only the prompt that
    fails alone ends with an error."""
    runtime = BatchingFake(3, max_length=200, poison=ord("!"))
    prompts = ["good one", "bad one!", "good two"]
    got, engine = submitted_together(engines, runtime, [req(p, max_tokens=3) for p in prompts])
    assert got[0][0] == {0: expected_text(enc("good one"), 3)}
    assert got[2][0] == {0: expected_text(enc("good two"), 3)}
    assert got[1][0] == {} and got[1][2][-1].error
    assert not any(c[0] == "prefill_batch" for c in runtime.calls)
    assert engine.slots_in_use == 0 and engine.num_requests == 0


def test_cancel_one_job_while_its_batch_runs(engines):
    runtime = BatchingFake(3, max_length=200)
    runtime.gate = threading.Event()
    engine = Engine(runtime, TOKENIZER)
    engines.append(engine)

    async def scenario():
        streams = [engine.submit(req(p, max_tokens=5)) for p in ("alpha", "bravo", "charlie")]
        tasks = [asyncio.ensure_future(_drain(s)) for s in streams]
        engine.start()
        assert await asyncio.to_thread(runtime.entered.wait, 10)
        streams[1].cancel()
        runtime.gate.set()
        return await asyncio.gather(*tasks)

    async def _drain(stream):
        text = ""
        async for event in stream:
            text += "".join(c.text for c in event.choices)
        return text

    a, b, c = run(scenario())
    assert a == expected_text(enc("alpha"), 5) and c == expected_text(enc("charlie"), 5)
    assert b == ""  # a cancelled stream ends without its output
    assert runtime.calls[0][0] == "prefill_batch"
    assert engine.slots_in_use == 0 and engine.num_requests == 0
    decoded = {s for call in runtime.calls if call[0] == "decode" for s in call[1]}
    assert len(decoded) == 2  # the cancelled one never decoded


def test_n_choices_in_a_batch_copy_the_prompt_to_their_siblings(engines):
    runtime = BatchingFake(4, max_length=200)
    requests = [req("abc", max_tokens=5, n=2), req("xyz", max_tokens=5)]
    got, _ = submitted_together(engines, runtime, requests)
    assert got[0][0] == {0: expected_text(enc("abc"), 5), 1: expected_text(enc("abc"), 5)}
    assert got[1][0] == {0: expected_text(enc("xyz"), 5)}
    assert runtime.calls[0][0] == "prefill_batch" and runtime.calls[0][2] == (3, 3)
    assert runtime.calls[1][0] == "copy"


@pytest.mark.parametrize("cache", [True, False])
def test_random_mix_with_batched_prefill_gives_the_same_text_as_alone(engines, cache):
    """test_engine's random mix on a runtime that batches: n > 1, more requests than slots,
    long prompts in chunks, with prefix sharing (hits prefill alone) or without (every
    prompt starts from an empty slot, so those admitted together share calls)."""
    rng = random.Random(7)
    runtime = BatchingFake(6, max_length=120)
    engine = Engine(runtime, TOKENIZER, prefill_chunk=40, prefix_cache_tokens=None if cache else 0)
    engines.append(engine)
    engine.start()
    stems = ["You are a helpful assistant. ", "System: be brief. ", ""]
    cases = [(rng.choice(stems) + rng.choice(["hi", "hello there", "abc", "what?"]) * rng.randint(1, 3),
              rng.randint(1, 25), rng.choice([1, 1, 2])) for _ in range(14)]

    async def one(prompt, max_tokens, n, delay):
        await asyncio.sleep(delay)
        return await collect(engine, req(prompt, max_tokens=max_tokens, n=n, ignore_eos=True))

    async def all_of_them():
        delays = [rng.choice([0.0, rng.random() * 0.02]) for _ in cases]  # some in a burst
        return await asyncio.gather(*(one(*case, d) for case, d in zip(cases, delays, strict=True)))

    for (prompt, max_tokens, n), (texts, finish, _) in zip(cases, run(all_of_them()), strict=True):
        assert texts == {i: expected_text(enc(prompt), max_tokens) for i in range(n)}
        assert finish == {i: "length" for i in range(n)}
    assert engine.slots_in_use == 0 and engine.num_requests == 0
    assert cache or any(c[0] == "prefill_batch" for c in runtime.calls)


# -- the real engine on real runtimes ----------------------------------------------------------


class CountingRuntime(HostRuntime):
    """The CPU runtime, counting its prefill calls (rows per call); no padding limit, so that
    prompts of different lengths share calls."""

    prefill_padding = None

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.prefill_calls: list[int] = []

    def prefill(self, slot, ids):
        self.prefill_calls.append(1)
        return super().prefill(slot, ids)

    def prefill_batch(self, slots, seqs, *, decoding=None):
        self.prefill_calls.append(len(slots))
        return super().prefill_batch(slots, seqs)


def _counting(model_dir, n_slots: int, max_length: int | None = None) -> CountingRuntime:
    from serve.model_dir import load_model_info

    return CountingRuntime(load_model_info(model_dir), RuntimeOptions(max_batch=n_slots,
                                                                      threads=1, max_length=max_length))


QUESTIONS = ["What is the capital of France?", "Name three primary colours.",
             "Write a haiku about the sea.", "How many legs does a spider have?",
             "What does a compiler do?", "Give me a synonym for happy.", "Why is the sky blue?",
             "Translate 'good morning' into Spanish, and explain when to use it."]


def _chat_ids(tok: Tokenizer, question: str) -> tuple[int, ...]:
    return tuple(tok.encode(tok.apply_chat_template([{"role": "user", "content": question}],
                                                    add_generation_prompt=True),
                            add_special_tokens=False))


def _greedy(ids, n=12) -> GenerationRequest:
    return GenerationRequest(tuple(ids), SamplingParams(temperature=0.0, max_tokens=n,
                                                        ignore_eos=True))


async def _tokens(engine: Engine, request: GenerationRequest) -> tuple[int, ...]:
    out: list[int] = []
    async for event in engine.submit(request):
        assert event.error is None, event.error
        for c in event.choices:
            out.extend(c.token_ids)
    return tuple(out)


def _together(engines, runtime, tok, requests, *, warm=(), **kwargs):
    """Each of ``warm`` alone, then ``requests`` admitted in one step; their token ids."""
    engine = Engine(runtime, tok, **kwargs)
    engines.append(engine)
    engine.start()

    async def scenario():
        for r in warm:
            await _tokens(engine, r)
        pause = Paused(engine)
        tasks = [asyncio.ensure_future(_tokens(engine, r)) for r in requests]
        await asyncio.sleep(0)
        pause.release()
        return list(await asyncio.gather(*tasks))

    return asyncio.run(asyncio.wait_for(scenario(), 600))


@pytest.mark.slow
def test_default_model_eight_prompts_together_equal_each_alone(engines, default_fp32_dir):
    """fp32 export, greedy: 8 different chat prompts admitted in one step (one call, rows of
    different lengths padded) give each prompt the tokens it gets alone. Then after 4 of them
    left their prompt but the last 5 tokens in idle slots, so that every prompt is a
    prefix-cache hit (the chat template's system prompt is common to all): prefilled again
    from position 0 in one batched call (padding free: the GPUs' rule), or one call each
    (the CPU's rule) — the same tokens either way."""
    tok = Tokenizer.from_dir(default_fp32_dir)
    prompts = [_chat_ids(tok, q) for q in QUESTIONS]
    alone_rt = _counting(default_fp32_dir, 1)
    alone = [_together(engines, alone_rt, tok, [_greedy(p)], prefix_cache_tokens=0)[0]
             for p in prompts]
    assert len(set(alone)) == len(alone)
    rt = _counting(default_fp32_dir, 8)
    assert _together(engines, rt, tok, [_greedy(p) for p in prompts], prefill_chunk=512) == alone
    assert rt.prefill_calls == [8]  # one call for all eight
    warm = [_greedy(p[:-5], 1) for p in prompts[:4]]
    for padding, calls in ((None, [8]), (1.25, [1] * 8)):
        rt2 = _counting(default_fp32_dir, 8)
        rt2.prefill_padding = padding
        got = _together(engines, rt2, tok, [_greedy(p) for p in prompts], warm=warm,
                        prefill_chunk=512)
        assert got == alone, padding
        assert rt2.prefill_calls[len(warm):] == calls, padding


def test_tiny_model_batched_prefill_through_the_engine_and_context_edges(engines, tiny_model_dir):
    """Rows of 1 to 400 tokens (a prompt that nearly fills a 512-token context next to short
    ones) through the engine: the same tokens as each alone; the runtime saw batched calls."""
    tok = Tokenizer.from_dir(tiny_model_dir)
    rng = np.random.default_rng(5)
    prompts = [[int(t) for t in rng.integers(3, 40000, n)] for n in (1, 2, 7, 30, 400, 31, 5)]
    info_rt = _counting(tiny_model_dir, 1)
    alone = [_together(engines, info_rt, tok, [_greedy(p, 6)], prefix_cache_tokens=0)[0]
             for p in prompts]
    rt = _counting(tiny_model_dir, len(prompts))
    got = _together(engines, rt, tok, [_greedy(p, 6) for p in prompts], prefill_chunk=4096,
                    prefix_cache_tokens=0)
    assert got == alone
    assert max(rt.prefill_calls) == len(prompts)


def test_cuda_runtime_on_the_host_through_the_engine(engines, tiny_hf_dir, tmp_path):
    """CudaRuntime (device "cpu": host memory standing in for the GPU's, the same pointer
    plan and device gather of the logits) batches prefill like the CPU runtime."""
    from export.api import export_model
    from serve.model_dir import load_model_info
    from serve.runtime.cuda import CudaRuntime

    d = tmp_path / "fp16"
    export_model(tiny_hf_dir, d, precision="fp16", target="cuda", progress=False)
    tok = Tokenizer.from_dir(d)
    rng = np.random.default_rng(6)
    prompts = [[int(t) for t in rng.integers(3, 40000, n)] for n in (3, 20, 9, 14)]
    calls: list[int] = []

    class Counting(CudaRuntime):
        def prefill_batch(self, slots, seqs, *, decoding=None):
            calls.append(len(slots))
            return super().prefill_batch(slots, seqs)

    info = load_model_info(d)
    alone = [_together(engines, open_runtime(d, RuntimeOptions(max_batch=1)), tok,
                       [_greedy(p, 6)])[0] for p in prompts]
    rt = Counting(info, RuntimeOptions(max_batch=4), device="cpu")
    assert _together(engines, rt, tok, [_greedy(p, 6) for p in prompts]) == alone
    assert calls == [4] and rt.rows_gathered == 4  # each prompt's logits row, gathered


def test_level0_int4_export_prefills_each_prompt_alone(engines, default_model_dir,
                                                      default_hf_dir, tmp_path):
    """An int4 export made with --down-proj-accuracy-level 0 prefills on a W8A8 graph that is
    not row-invariant, where a batched call changed greedy answers from their first token (QA:
    4 of 16 chat prompts): there the engine prefills the prompts arriving together a call
    each, in the same step. The default export (level 4, row-invariant) batches them."""
    from export.api import export_model
    from serve.model_dir import load_model_info

    level0 = tmp_path / "smollm2-135m-instruct-int4-l0"
    export_model(default_hf_dir, level0, precision="int4", down_proj_accuracy_level=0,
                 progress=False)
    tok = Tokenizer.from_dir(default_model_dir)
    prompts = [_chat_ids(tok, q) for q in QUESTIONS]
    rt = CountingRuntime(load_model_info(level0),
                         RuntimeOptions(max_batch=8, threads=1, w8a8="all"))  # the server's default
    assert rt.batched_prefill is False
    _together(engines, rt, tok, [_greedy(p) for p in prompts], prefill_chunk=512)
    assert rt.prefill_calls == [1] * 8
    rt = CountingRuntime(load_model_info(default_model_dir),
                         RuntimeOptions(max_batch=8, threads=1, w8a8="all"))
    assert rt.batched_prefill is True
    _together(engines, rt, tok, [_greedy(p) for p in prompts], prefill_chunk=512)
    assert rt.prefill_calls == [8]


def test_a_failed_group_of_a_cuda_batch_leaves_no_row_prefilled(engines, tiny_hf_dir, tmp_path):
    """CudaRuntime prefills a batch in groups of a power of two rows, one call each. When a
    later group's call fails, the earlier groups' rows were already in their slots; the engine
    then prefills every row alone, which appended each of those prompts a second time (the
    prompt twice in the KV: other text, silently). The failed `prefill_batch` must leave no
    row prefilled, so that the rows prefilled alone get the tokens they get alone."""
    from export.api import export_model
    from serve.model_dir import load_model_info
    from serve.runtime.cuda import CudaRuntime

    d = tmp_path / "fp16"
    export_model(tiny_hf_dir, d, precision="fp16", target="cuda", progress=False)
    tok = Tokenizer.from_dir(d)
    rng = np.random.default_rng(8)
    prompts = [[int(t) for t in rng.integers(3, 40000, n)] for n in (5, 9, 14, 7, 11, 6)]
    poison = prompts[5][0]  # in the second group (rows 4-5), which fails as a batch

    class FailingGroup(CudaRuntime):
        def _run(self, call, ids, mask):
            if ids.shape[0] > 1 and poison in ids:
                raise RuntimeError("the group's call failed")
            super()._run(call, ids, mask)

    alone = [_together(engines, open_runtime(d, RuntimeOptions(max_batch=1)), tok,
                       [_greedy(p, 6)])[0] for p in prompts]
    rt = FailingGroup(load_model_info(d), RuntimeOptions(max_batch=6), device="cpu")
    assert _together(engines, rt, tok, [_greedy(p, 6) for p in prompts]) == alone


def test_a_batched_call_that_fails_half_way_is_cut_back_before_the_rows_go_alone(engines):
    """The engine does not trust a failed `prefill_batch` to have appended nothing: a runtime
    that kept some rows' tokens before it raised gets those slots cut back, so each row
    prefilled alone holds its prompt once (same text as without the failure)."""

    class HalfWay(BatchingFake):
        def prefill_batch(self, slots, seqs, *, decoding=None):
            self.seqs[slots[0]].extend(seqs[0])  # the first row went in, then the call failed
            raise RuntimeError("failed half-way")

    runtime = HalfWay(3, max_length=200)
    prompts = ["first one", "second one", "third one"]
    got, engine = submitted_together(engines, runtime, [req(p, max_tokens=4) for p in prompts])
    assert [t for t, _, _ in got] == [{0: expected_text(enc(p), 4)} for p in prompts]
    assert engine.slots_in_use == 0 and engine.num_requests == 0
