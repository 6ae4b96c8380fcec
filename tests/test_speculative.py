"""Speculative decoding (`--speculative ngram`, serve.speculative): drafts, exactness, batching,
stops, logprobs, structured outputs, metrics, and the sampled distribution.

Greedy equality is asserted token for token everywhere: on fp32 graphs (the tiny random model,
the default model's fp32 export) and on the int4 default export, whose verify calls compute
what one-token steps do once the attention pad is on (the default with --speculative; README
"Speculative decoding").
"""

from __future__ import annotations

import asyncio
import re

import httpx
import numpy as np
import openai
import pytest

import serve.speculative
from serve.engine import Engine
from serve.events import EngineObserver, GenerationRequest
from serve.options import ServeOptions
from serve.runtime import RuntimeOptions, open_runtime
from serve.sampling import Sample, SamplingParams
from serve.speculative import DraftGate, SpeculativeConfig, propose_ngram, verify_cost
from serve.tokenizer import Tokenizer
from tests.test_runtime import _count_calls
from tests.test_server_e2e import running_server

REPETITIVE = ("The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the "
              "lazy dog. The quick brown fox")


# -- drafts --------------------------------------------------------------------------------


def ids(*values: int) -> np.ndarray:
    return np.asarray(values, np.int64)


def test_propose_ngram_takes_the_longest_then_most_recent_match():
    seq = ids(1, 2, 3, 4, 5, 1, 2, 9, 9, 1, 2)
    assert propose_ngram(seq, 3, 1, 3).tolist() == [9, 9, 1]  # "1 2": last seen at 5
    seq = ids(7, 1, 2, 3, 8, 2, 3, 6, 1, 2, 3)
    assert propose_ngram(seq, 2, 1, 3).tolist() == [8, 2]  # "1 2 3" beats the later "2 3"
    assert propose_ngram(seq, 2, 1, 2).tolist() == [6, 1]  # n <= 2: the later "2 3"
    assert propose_ngram(ids(5, 6, 7), 3, 1, 3).tolist() == []
    assert propose_ngram(ids(7, 7, 7, 7), 3, 1, 3).tolist() == [7]  # overlapping, to the end
    assert propose_ngram(ids(1, 2, 1), 5, 2, 3).tolist() == []  # below prompt_lookup_min


def test_propose_ngram_drafts_at_most_per_gram_tokens_a_matched_token():
    seq = ids(1, 2, *range(10, 20), 5, 1, 2)
    assert propose_ngram(seq, 12, 1, 3).tolist() == list(range(10, 20)) + [5, 1]
    assert propose_ngram(seq, 12, 1, 3, per_gram=3).tolist() == list(range(10, 16))  # n = 2
    assert propose_ngram(seq, 4, 1, 3, per_gram=3).tolist() == list(range(10, 14))  # k first
    assert propose_ngram(seq, 12, 1, 1, per_gram=3).tolist() == list(range(10, 13))  # n = 1


def test_config_is_checked():
    # out-of-range values name the flag a user typed
    with pytest.raises(ValueError, match="--prompt-lookup-min <= --prompt-lookup-max, got 3 and 2"):
        SpeculativeConfig(prompt_lookup_min=3, prompt_lookup_max=2)
    with pytest.raises(ValueError, match="--num-speculative-tokens must be >= 1, got 0"):
        ServeOptions(model_dir="m", speculative="ngram", num_speculative_tokens=0)
    with pytest.raises(ValueError, match="--speculative-disable-by-batch-size must be >= 1, got 0"):
        ServeOptions(model_dir="m", speculative="ngram", speculative_disable_by_batch_size=0)
    assert ServeOptions(model_dir="m").speculative_config() is None
    cfg = ServeOptions(model_dir="m", speculative="ngram", num_speculative_tokens=6).speculative_config()
    assert cfg == SpeculativeConfig(num_speculative_tokens=6)
    # a sub-flag without --speculative would change nothing: refused, naming every flag given
    with pytest.raises(ValueError, match="--num-speculative-tokens only applies with --speculative"):
        ServeOptions(model_dir="m", num_speculative_tokens=3)
    with pytest.raises(ValueError, match="--prompt-lookup-max, --prompt-lookup-min only apply"):
        ServeOptions(model_dir="m", prompt_lookup_max=3, prompt_lookup_min=1)
    with pytest.raises(ValueError, match="--speculative-adaptive only applies with --speculative"):
        ServeOptions(model_dir="m", speculative_adaptive=False)
    assert not ServeOptions(model_dir="m", speculative="ngram",
                            speculative_adaptive=False).speculative_config().adaptive


class _Seq:
    """A stand-in for a running Choice: the gate reads only its slot (-1: ended)."""

    slot = 0


def test_verify_cost_follows_the_readme_table():
    assert verify_cost(1) == 1.0 and verify_cost(6) == 1.92 and verify_cost(13) == 2.95
    assert verify_cost(8) == pytest.approx((2.05 + 2.33) / 2)
    assert verify_cost(17) == pytest.approx(2.95 + 0.62)  # past the table: the last slope


def test_gate_backs_off_doubling_and_a_hit_brings_drafting_back():
    gate, c = DraftGate(), _Seq()

    def sat_out() -> int:  # steps until the gate allows c again
        n = 0
        while not gate.allows(c):
            n += 1
        return n

    assert gate.allows(c) and gate.limit(c, 5) == 5
    misses = 0
    while gate.allows(c):  # every draft of 5 missed: gain 1 / c(6) = 0.52 a verify
        gate.record(c, 5, 0)
        misses += 1
    assert misses == 3  # the mean falls from PRIOR 1.5 below 1 at the 3rd miss
    assert [sat_out()] == [3]  # the 4-step back-off: the call above sat out its first step
    assert gate.limit(c, 5) == 1  # then a probe of one token
    waits = []
    for _ in range(6):  # each probe misses too: 8, 16, 32, 64, 64 steps
        gate.record(c, 1, 0)
        waits.append(sat_out())
    assert waits == [8, 16, 32, 64, 64, 64]
    gate.record(c, 1, 1)  # a probe that hits (gain 2 / 1.30) lifts the mean above 1
    assert gate.allows(c) and gate.allows(c) and gate.limit(c, 5) == 5
    for _ in range(20):  # drafts that pay never stop drafting
        gate.record(c, 5, 2)  # 3 / 1.92 = 1.56
        assert gate.allows(c) and gate.limit(c, 5) == 5
    c.slot = -1
    gate.prune()
    assert not gate._state


def test_gate_grows_k_after_whole_hits_and_halves_it_after_misses():
    gate, c = DraftGate(grow=True), _Seq()
    assert gate.limit(c, 5) == 5  # the caller's K at the first draft
    ks = []
    for _ in range(3):  # drafts accepted whole: 5 -> 10 -> 12 (MAX_TOKENS) -> 12
        gate.record(c, gate.limit(c, 5), gate.limit(c, 5))
        ks.append(gate.limit(c, 5))
    assert ks == [10, 12, 12]
    gate.record(c, 12, 3)  # a miss halves K: a sequence whose drafts miss drafts short
    assert gate.limit(c, 5) == 6
    gate.record(c, 6, 6)  # a draft cut short (room, the 3n cap) but kept whole grows it too
    assert gate.limit(c, 5) == 12
    ks = []
    while gate.allows(c) and (k := gate.limit(c, 5)) > 1:  # misses: 12, 6, 3, 2, 2, ...
        ks.append(k)
        gate.record(c, k, 0)
    assert ks[:4] == [12, 6, 3, 2] and set(ks[3:]) == {2}
    assert gate.limit(c, 5) == 1  # the mean fell below 1: the gate's probe, as without grow
    while not gate.allows(c):
        pass
    gate.record(c, 1, 0)
    while not gate.allows(c):
        pass
    gate.record(c, 1, 1)  # the probe hits: full drafts again, from K's floor MIN_TOKENS
    assert gate.limit(c, 5) == 2
    # K beyond the bounds is the caller's: --num-speculative-tokens 16 starts and tops at 16
    big, small = _Seq(), _Seq()
    assert gate.limit(big, 16) == 16
    gate.record(big, 16, 16)
    assert gate.limit(big, 16) == 16
    assert gate.limit(small, 1) == 1
    gate.record(small, 1, 0)
    assert gate.limit(small, 1) == 1
    # without grow (the draft-model speculator) K stays the caller's
    fixed = DraftGate()
    fixed.record(c, 5, 5)
    assert fixed.limit(c, 5) == 5


# -- the engine on the tiny model ------------------------------------------------------------


class Counts(EngineObserver):
    def __init__(self) -> None:
        self.drafted = self.accepted = 0

    def speculated(self, counts: tuple[int, int]) -> None:
        self.drafted += counts[0]
        self.accepted += counts[1]


def engine_for(model_dir, spec: SpeculativeConfig | None, *, max_batch: int = 1,
               attention_pad: bool = False, w8a8: str = "off",
               batch_invariant: bool | None = None, **kwargs) -> Engine:
    runtime = open_runtime(model_dir, RuntimeOptions(threads=1, max_batch=max_batch,
                                                     attention_pad=attention_pad, w8a8=w8a8,
                                                     batch_invariant=batch_invariant))
    engine = Engine(runtime, Tokenizer.from_dir(model_dir), speculative=spec,
                    observer=Counts(), **kwargs)
    engine.start()
    return engine


async def tokens_of(engine: Engine, prompt: list[int], **params) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    async for event in engine.submit(GenerationRequest(tuple(prompt), SamplingParams(**params))):
        assert event.error is None, event.error
        for c in event.choices:
            out.setdefault(c.index, []).extend(c.token_ids)
    return out


def run_all(engine: Engine, prompts: list[list[int]], **params) -> list[dict[int, list[int]]]:
    async def go():
        return await asyncio.gather(*(tokens_of(engine, p, **params) for p in prompts))
    return asyncio.run(asyncio.wait_for(go(), 300))


def test_drafts_that_miss_stop_being_proposed(tiny_model_dir):
    """A sampled stream over four tokens (temperature 1, allowed_token_ids): every bigram of
    it occurred before, so prompt lookup drafts on every step, and a draft's first token is
    right about one time in four. The adaptive gate (the default) stops drafting: a fraction
    of --no-speculative-adaptive's draft tokens; the tokens are plain decoding's either way
    (the same seed draws the same numbers: backing off chooses only whether to draft)."""
    tok = Tokenizer.from_dir(tiny_model_dir)
    prompt = tok.encode("a b c d b a d c a c b d " * 4)
    allowed = tuple(sorted(set(prompt[-12:])))
    params = dict(temperature=1.0, max_tokens=120, ignore_eos=True, seed=7,
                  allowed_token_ids=allowed)
    plain = engine_for(tiny_model_dir, None)
    adaptive = engine_for(tiny_model_dir, SpeculativeConfig())
    always = engine_for(tiny_model_dir, SpeculativeConfig(adaptive=False))
    try:
        want = run_all(plain, [prompt], **params)[0]
        got = run_all(adaptive, [prompt], **params)[0]
        got_always = run_all(always, [prompt], **params)[0]
    finally:
        for e in (plain, adaptive, always):
            e.stop()
    assert got == want and got_always == want
    a, b = adaptive.observer, always.observer
    assert b.drafted > 200 and b.accepted < 0.35 * b.drafted  # drafts were there, and missed
    assert a.drafted < 0.25 * b.drafted, (a.drafted, b.drafted)


@pytest.fixture(scope="module")
def tiny_prompts(tiny_model_dir) -> list[list[int]]:
    tok = Tokenizer.from_dir(tiny_model_dir)
    texts = [REPETITIVE, "a b c d a b c d a b", "Hello there, how are you today?",
             "def f(x):\n    return x + 1\n\ndef g(x):\n    return"]
    return [tok.encode(t) for t in texts]


def test_greedy_equal_and_batching_mix(tiny_model_dir, tiny_prompts):
    """Greedy tokens with speculation equal those without, alone and with four sequences (and
    a request with n=2) decoding together, rows with and without drafts in one step."""
    plain = engine_for(tiny_model_dir, None, max_batch=4)
    spec = engine_for(tiny_model_dir, SpeculativeConfig(disable_by_batch_size=4), max_batch=4)
    try:
        params = dict(temperature=0.0, max_tokens=40, ignore_eos=True)
        want = [run_all(plain, [p], **params)[0] for p in tiny_prompts]
        alone = [run_all(spec, [p], **params)[0] for p in tiny_prompts]
        together = run_all(spec, tiny_prompts, **params)
        two = run_all(spec, [tiny_prompts[0]], n=2, **params)[0]
    finally:
        plain.stop()
        spec.stop()
    assert alone == want
    assert together == want
    assert two == {0: want[0][0], 1: want[0][0]}
    counts = spec.observer
    assert counts.accepted > 0 and counts.drafted > counts.accepted  # hits and misses


def test_max_tokens_and_context_mid_draft_roll_back(tiny_model_dir, tiny_prompts):
    """A draft never runs past max_tokens or the context, and the slot's KV holds exactly the
    tokens fed (its prefix-cache entry is then right)."""
    spec = engine_for(tiny_model_dir, SpeculativeConfig(num_speculative_tokens=8, prompt_lookup_min=1))
    plain = engine_for(tiny_model_dir, None)
    try:
        for max_tokens in (1, 2, 3, 7, 13):
            got = run_all(spec, [tiny_prompts[0]], temperature=0.0, max_tokens=max_tokens,
                          ignore_eos=True)[0][0]
            want = run_all(plain, [tiny_prompts[0]], temperature=0.0, max_tokens=max_tokens,
                           ignore_eos=True)[0][0]
            assert got == want and len(got) == max_tokens
            assert spec.runtime.length(0) == len(tiny_prompts[0]) + max_tokens - 1
        # the prefix cache hit that follows: same tokens as a cold start
        again = run_all(spec, [tiny_prompts[0]], temperature=0.0, max_tokens=13, ignore_eos=True)
        assert again[0][0] == want
    finally:
        spec.stop()
        plain.stop()
    assert spec.observer.accepted > 0


def test_k_grows_on_a_copying_stream_and_stays_exact_to_the_context_end(default_model_dir):
    """Prompt lookup's K per sequence (`DraftGate` grow, the default): an int4 greedy answer
    that quotes its prompt drafts more than --num-speculative-tokens a call (up to
    `DraftGate.MAX_TOKENS`), never past the context, and is plain decoding's (under the pad)
    to the slot's last position."""
    from bench.spec_prompts import GROUNDED, chat_ids

    class Sizes(Counts):
        def __init__(self) -> None:
            super().__init__()
            self.sizes: list[int] = []

        def speculated(self, counts: tuple[int, int]) -> None:
            super().speculated(counts)
            self.sizes.append(counts[0])

    tok = Tokenizer.from_dir(default_model_dir)
    prompt = chat_ids(tok, dict(GROUNDED)["quote-sentences"])
    engines = []
    for spec, observer in ((None, Counts()), (SpeculativeConfig(), Sizes())):
        runtime = open_runtime(default_model_dir, RuntimeOptions(
            threads=1, max_batch=1, max_length=len(prompt) + 70, attention_pad=True, w8a8="auto"))
        engines.append(Engine(runtime, tok, speculative=spec, observer=observer))
        engines[-1].start()
    plain, spec = engines
    try:
        want = run_all(plain, [prompt], temperature=0.0, ignore_eos=True)[0][0]
        got = run_all(spec, [prompt], temperature=0.0, ignore_eos=True)[0][0]
    finally:
        plain.stop()
        spec.stop()
    assert got == want and len(want) == 70  # to the context's end
    sizes = spec.observer.sizes
    assert SpeculativeConfig().num_speculative_tokens < max(sizes) <= DraftGate.MAX_TOKENS, sizes


def test_replay_counts_the_drafts_the_engine_makes(tiny_model_dir):
    """bench.spec_replay's walk of a plain answer through the shipped policy proposes and
    keeps exactly the draft tokens the speculative engine does (greedy, and sampled over four
    tokens where most drafts miss and the gate backs off), so its policy comparisons are
    about the drafts the server would make."""
    from bench.spec_replay import Policy, capped, replay

    tok = Tokenizer.from_dir(tiny_model_dir)
    shipped = Policy("shipped", capped(2, 4, serve.speculative.DRAFTS_PER_GRAM),
                     k0=SpeculativeConfig().num_speculative_tokens,
                     gate=lambda: DraftGate(grow=True))
    walk = tok.encode("a b c d b a d c a c b d " * 4)
    cases = [(tok.encode(REPETITIVE), dict(temperature=0.0)),
             (walk, dict(temperature=1.0, seed=7, allowed_token_ids=tuple(sorted(set(walk[-12:])))))]
    plain = engine_for(tiny_model_dir, None)
    try:
        for prompt, params in cases:
            spec = engine_for(tiny_model_dir, SpeculativeConfig())
            try:
                got = run_all(spec, [prompt], max_tokens=90, ignore_eos=True, **params)[0][0]
            finally:
                spec.stop()
            answer = run_all(plain, [prompt], max_tokens=90, ignore_eos=True, **params)[0][0]
            assert got == answer
            score = replay(shipped, prompt, answer, max_tokens=90)
            assert (score.drafted, score.accepted) == (spec.observer.drafted, spec.observer.accepted)
            assert score.drafted > 0
    finally:
        plain.stop()


# -- the sampled distribution ---------------------------------------------------------------


def _chi2_pvalue(a: list[tuple], b: list[tuple]) -> float:
    """Two-sample chi-square test of homogeneity; categories seen < 5 times together are
    pooled into one."""
    import torch

    keys = sorted(set(a) | set(b))
    table = np.array([[a.count(k) for k in keys], [b.count(k) for k in keys]], np.float64)
    rare = table.sum(0) < 5
    if rare.any():
        table = np.column_stack([table[:, ~rare], table[:, rare].sum(1)])
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    stat = float(((table - expected) ** 2 / expected).sum())
    dof = table.shape[1] - 1
    # chi-square survival function = regularized upper incomplete gamma Q(dof/2, stat/2)
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def _samples(engine: Engine, prompt: list[int], seeds: range) -> list[tuple]:
    async def one(seed: int) -> tuple:
        out = await tokens_of(engine, prompt, temperature=1.0, top_k=3, max_tokens=4,
                              ignore_eos=True, seed=seed)
        return tuple(out[0][1:])  # the tokens decoded after the first (which prefill gives)

    async def go():
        return await asyncio.gather(*(one(s) for s in seeds))
    return list(asyncio.run(asyncio.wait_for(go(), 600)))


def test_sampled_distribution_is_preserved_and_a_broken_rule_is_caught(tiny_model_dir, tiny_prompts,
                                                                        monkeypatch):
    """Tokens 2-4 sampled (temperature 1, top-k 3) with speculation follow the distribution of
    plain decoding (chi-square, independent fixed seeds); the same test rejects a rule that
    accepts a draft half the time whatever its probability."""
    check_sampled_distribution(engine_for(tiny_model_dir, None),
                               engine_for(tiny_model_dir, SpeculativeConfig()), tiny_prompts[0],
                               monkeypatch)


def check_sampled_distribution(plain, spec, start, monkeypatch, n: int = 400) -> None:
    """Tokens 2-4 sampled (temperature 1, top-k 3) by ``spec`` follow ``plain``'s distribution
    (chi-square over ``n`` independent fixed seeds each), after a prompt that ends inside the
    model's own greedy loop (``start`` and its greedy continuation, so drafts are often likely
    tokens); a rule that accepts a draft half the time whatever its probability is rejected by
    the same test. Stops both engines."""
    try:
        prompt = start + run_all(plain, [start], temperature=0.0, max_tokens=30,
                                 ignore_eos=True)[0][0]
        reference = _samples(plain, prompt, range(10_000, 10_000 + n))
        good = _samples(spec, prompt, range(n))
        drafted, accepted = spec.observer.drafted, spec.observer.accepted
        rng = np.random.default_rng(0)

        def broken(c, row, proposed) -> Sample:
            if proposed is not None and rng.random() < 0.5:
                return Sample(proposed)
            return c.sampler.sample(row, c.generated)

        monkeypatch.setattr(serve.speculative, "draw", broken)
        bad = _samples(spec, prompt, range(n))
    finally:
        plain.stop()
        spec.stop()
    assert drafted > 0 and accepted > 0
    p_good, p_bad = _chi2_pvalue(good, reference), _chi2_pvalue(bad, reference)
    assert p_good > 1e-3, (p_good, p_bad)
    assert p_bad < 1e-4, (p_good, p_bad)


# -- through the real server ----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_pair(tiny_model_dir, tmp_path_factory):
    """(plain, speculative) servers of the tiny model."""
    logs = tmp_path_factory.mktemp("spec-servers")
    common = ("--max-batch", "2", "--threads", "1", "--model-name", "tiny")
    with running_server(tiny_model_dir, *common, log_path=logs / "plain.log") as plain, \
            running_server(tiny_model_dir, *common, "--speculative", "ngram",
                           "--num-speculative-tokens", "5", "--speculative-disable-by-batch-size",
                           "2", log_path=logs / "spec.log") as spec:
        yield plain, spec


def _client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)


def _spec_counts(base: str) -> tuple[float, float]:
    text = httpx.get(f"{base}/metrics").text
    draft = re.search(r'^llorch_spec_draft_tokens_total\{model="tiny"\} (\S+)$', text, re.M)
    acc = re.search(r'^llorch_spec_accepted_tokens_total\{model="tiny"\} (\S+)$', text, re.M)
    return float(draft.group(1)), float(acc.group(1))


def test_server_completions_stops_logprobs_usage(tiny_pair):
    plain, spec = (_client(b) for b in tiny_pair)
    before = _spec_counts(tiny_pair[1])
    requests = [
        dict(prompt=REPETITIVE, max_tokens=30, temperature=0),
        dict(prompt=REPETITIVE, max_tokens=30, temperature=0, logprobs=3),
        dict(prompt="a b c d a b c d a b", max_tokens=25, temperature=0, stop=[" d a"]),
        dict(prompt="a b c d a b c d a b", max_tokens=9, temperature=0, n=2, seed=5),
        dict(prompt=REPETITIVE, max_tokens=20, temperature=0.8, seed=11, n=2),
    ]
    for kwargs in requests:
        a = plain.completions.create(model="tiny", **kwargs)
        b = spec.completions.create(model="tiny", **kwargs)
        assert [c.text for c in b.choices] == [c.text for c in a.choices], kwargs
        assert [c.finish_reason for c in b.choices] == [c.finish_reason for c in a.choices]
        assert b.usage == a.usage
        if kwargs.get("logprobs"):
            la, lb = a.choices[0].logprobs, b.choices[0].logprobs
            assert lb.tokens == la.tokens
            np.testing.assert_allclose(lb.token_logprobs, la.token_logprobs, atol=1e-3)
            assert [list(t) for t in lb.top_logprobs] == [list(t) for t in la.top_logprobs]
    drafted, accepted = (x - y for x, y in zip(_spec_counts(tiny_pair[1]), before, strict=True))
    assert drafted > 0 and 0 < accepted <= drafted
    assert _spec_counts(tiny_pair[0]) == (0.0, 0.0)  # off by default


def test_server_token_masks_hold_for_drafted_tokens(tiny_pair, tiny_model_dir):
    """vLLM's `allowed_token_ids` and `min_tokens` with drafts: every emitted token is drawn
    by the choice's own sampler, masks applied, so no draft outside the allowed ids gets
    through and the output equals plain decoding's (greedy and seeded), drafts taken."""
    plain, spec = (_client(b) for b in tiny_pair)
    tok = Tokenizer.from_dir(tiny_model_dir)
    allowed = sorted(set(tok.encode(REPETITIVE, add_special_tokens=False)))
    texts = {tok.token_text(t) for t in allowed}
    before = _spec_counts(tiny_pair[1])
    requests = [
        dict(max_tokens=30, temperature=0, logprobs=0, extra_body={"allowed_token_ids": allowed}),
        dict(max_tokens=20, temperature=0.8, seed=7, n=2, logprobs=0,
             extra_body={"allowed_token_ids": allowed}),
        dict(max_tokens=30, temperature=0, logprobs=0, extra_body={"min_tokens": 25}),
    ]
    for kwargs in requests:
        a = plain.completions.create(model="tiny", prompt=REPETITIVE, **kwargs)
        b = spec.completions.create(model="tiny", prompt=REPETITIVE, **kwargs)
        assert [c.text for c in b.choices] == [c.text for c in a.choices], kwargs
        assert b.usage == a.usage
        if "allowed_token_ids" in kwargs["extra_body"]:
            assert all(set(c.logprobs.tokens) <= texts for c in b.choices)
        else:
            assert all(len(c.logprobs.tokens) >= 25 for c in b.choices)
    drafted, accepted = (x - y for x, y in zip(_spec_counts(tiny_pair[1]), before, strict=True))
    assert drafted > 0 and accepted > 0


def test_server_stream_and_structured_output(tiny_pair):
    plain, spec = (_client(b) for b in tiny_pair)
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20}},
              "required": ["name"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": schema, "strict": True}}
    messages = [{"role": "user", "content": REPETITIVE}]
    a = plain.chat.completions.create(model="tiny", messages=messages, response_format=fmt,
                                      max_tokens=60, temperature=0)
    b = spec.chat.completions.create(model="tiny", messages=messages, response_format=fmt,
                                     max_tokens=60, temperature=0)
    assert b.choices[0].message.content == a.choices[0].message.content
    assert b.usage == a.usage
    stream = spec.chat.completions.create(model="tiny", messages=messages, max_tokens=30,
                                          temperature=0, stream=True,
                                          stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    want = plain.chat.completions.create(model="tiny", messages=messages, max_tokens=30,
                                         temperature=0)
    assert text == want.choices[0].message.content
    assert chunks[-1].usage == want.usage


def test_server_greedy_equal_on_the_default_fp32_model(default_fp32_dir, tmp_path):
    """The default model's fp32 export: greedy text with and without speculation, several
    input-grounded prompts (bench.spec_prompts), equal token for token."""
    from bench.spec_prompts import GROUNDED

    common = ("--max-batch", "1", "--threads", "2", "--max-length", "1024")
    outs = {}
    for name, extra in (("plain", ()), ("spec", ("--speculative", "ngram"))):
        with running_server(default_fp32_dir, *common, *extra, log_path=tmp_path / f"{name}.log") as base:
            client = _client(base)
            outs[name] = [client.chat.completions.create(
                model=client.models.list().data[0].id, max_tokens=80, temperature=0,
                messages=[{"role": "user", "content": msg}]).choices[0].message.content
                for _, msg in GROUNDED[:4]]
            if name == "spec":
                text = httpx.get(f"{base}/metrics").text
                drafted = float(re.search(r"^llorch_spec_draft_tokens_total\{[^}]*\} (\S+)$", text, re.M).group(1))
                accepted = float(re.search(r"^llorch_spec_accepted_tokens_total\{[^}]*\} (\S+)$", text, re.M).group(1))
    assert outs["spec"] == outs["plain"]
    assert accepted > 0.3 * drafted  # input-grounded prompts: most drafts hit


def test_int4_greedy_equal_to_plain_decoding(default_model_dir):
    """The int4 default model, attention pad on, `--batch-invariant` (every step on the
    row-invariant W8A8 graph, a decode step of several sequences one padded call each):
    greedy output with speculation is plain decoding's (under the pad) token for token on the
    9 prompts of bench.spec_prompts, 110 tokens each (EOS ignored), alone and four at a time
    drafting together, and plain four at a time. Without the pad 6 of the 9 part within 110
    tokens (README). (Batch invariance on auto, serve's default: the alone part holds, the
    together parts need not: test_default_speculative_is_not_batch_invariant.)"""
    from bench.spec_prompts import GROUNDED, OPEN_ENDED, chat_ids

    tok = Tokenizer.from_dir(default_model_dir)
    prompts = [chat_ids(tok, msg) for _, msg in GROUNDED + OPEN_ENDED]
    plain = engine_for(default_model_dir, None, max_batch=4, attention_pad=True, w8a8="auto",
                       batch_invariant=True)
    spec = engine_for(default_model_dir, SpeculativeConfig(disable_by_batch_size=4), max_batch=4,
                      attention_pad=True, w8a8="auto", batch_invariant=True)
    try:
        params = dict(temperature=0.0, max_tokens=110, ignore_eos=True)
        want = [run_all(plain, [p], **params)[0] for p in prompts]
        alone = [run_all(spec, [p], **params)[0] for p in prompts]
        together = run_all(spec, prompts[:4], **params)
        plain_together = run_all(plain, prompts[4:8], **params)  # no drafts, 4 a step
    finally:
        plain.stop()
        spec.stop()
    for name, got, expected in zip([n for n, _ in GROUNDED + OPEN_ENDED], alone, want, strict=True):
        assert got == expected, name
    assert together == want[:4]
    assert plain_together == want[4:8]
    counts = spec.observer
    assert counts.accepted > 0.3 * counts.drafted > 0


def test_default_speculative_is_not_batch_invariant(default_model_dir):
    """`--speculative ngram` with batch invariance on auto, opened as the server opens it
    (`load_engine`): the attention pad on, not batch-invariant (fingerprint mode
    "rows-batched"), every step on the row-invariant W8A8 graph (a lone one too), and a decode
    step of two sequences runs as one ORT call; `--speculative ngram --batch-invariant` runs it
    as one padded call a sequence, batch-invariant (mode "rows")."""
    from serve.fingerprint import batch_invariance
    from serve.main import load_engine

    prompts = [[1, 9038, 2114, 314, 253, 1030], [1, 504, 3458, 3615, 16495, 1789, 28, 30]]
    for batch_invariant, calls_a_step in ((None, 1), (True, 2)):
        options = ServeOptions(default_model_dir, speculative="ngram", max_batch=2, threads=1,
                               max_length=256, batch_invariant=batch_invariant)
        engine = load_engine(options)
        engine.stop()
        rt = engine.runtime
        assert rt.attention_pad and rt._session_for(1) is rt.w8a8_session
        assert engine.batch_invariant is bool(batch_invariant) is rt.batch_invariant
        assert batch_invariance(options) == ("rows" if batch_invariant else "rows-batched")
        for slot, prompt in enumerate(prompts):
            rt.prefill(slot, prompt)
        calls = _count_calls(rt)
        rt.decode([0, 1], [13, 13])
        assert len(calls) == calls_a_step, batch_invariant


def test_server_int4_default_model_greedy_equal_to_plain(default_model_dir, tmp_path):
    """Through the server and the openai client, the int4 default model: `--speculative ngram`
    (the attention pad on by default with it, batch invariance on auto: not batch-invariant,
    the startup line says so) answers a lone stream as a plain server started with
    --attention-pad, token for token, under the same system_fingerprint; input-grounded
    drafts are mostly accepted, and the answers stay right."""
    from bench.spec_prompts import GROUNDED, OPEN_ENDED

    common = ("--max-batch", "2", "--threads", "2", "--max-length", "1024")
    questions = [dict(GROUNDED)["rename-variable"], dict(GROUNDED)["fix-typos"],
                 dict(GROUNDED)["summarize"], dict(OPEN_ENDED)["poem"],
                 "What is the capital of France?"]
    outs, fingerprints = {}, {}
    for name, extra in (("plain", ("--attention-pad",)), ("spec", ("--speculative", "ngram"))):
        log_path = tmp_path / f"{name}.log"
        with running_server(default_model_dir, *common, *extra, log_path=log_path) as base:
            client = _client(base)
            model = client.models.list().data[0].id
            answers = [client.chat.completions.create(
                model=model, max_tokens=120, temperature=0,
                messages=[{"role": "user", "content": q}]) for q in questions]
            outs[name] = [a.choices[0].message.content for a in answers]
            fingerprints[name] = {a.system_fingerprint for a in answers}
            if name == "spec":
                text = httpx.get(f"{base}/metrics").text
                drafted = float(re.search(r"^llorch_spec_draft_tokens_total\{[^}]*\} (\S+)$", text, re.M).group(1))
                accepted = float(re.search(r"^llorch_spec_accepted_tokens_total\{[^}]*\} (\S+)$", text, re.M).group(1))
        lines = [line for line in log_path.read_text().splitlines() if "batch-invariant" in line]
        assert len(lines) == 1 and "not batch-invariant" in lines[0], lines
    assert outs["spec"] == outs["plain"]
    assert fingerprints["spec"] == fingerprints["plain"] and len(fingerprints["spec"]) == 1
    assert "def average_order_value(orders):" in outs["spec"][0]  # the 135M model copies it
    assert "Paris" in outs["spec"][-1]
    assert accepted > 0.3 * drafted > 0


def test_int4_second_turn_reuses_the_answer_under_the_pad(default_model_dir):
    """With the attention pad and `--batch-invariant` (whose prefix cache otherwise reuses
    only prompt tokens a prefill computed) the prefix cache also reuses an earlier answer's KV
    (decode steps' and verify calls' computed it): a second turn over the first turn's answer
    takes it from the cache and gets the tokens it gets cold."""
    from bench.spec_prompts import GROUNDED, chat_ids

    async def answer(engine, prompt):
        tokens, cached = [], None
        request = GenerationRequest(tuple(prompt), SamplingParams(temperature=0.0, max_tokens=60,
                                                                  ignore_eos=True))
        async for event in engine.submit(request):
            assert event.error is None, event.error
            cached = event.usage.cached_tokens if event.usage else cached
            for c in event.choices:
                tokens.extend(c.token_ids)
        return tokens, cached

    tok = Tokenizer.from_dir(default_model_dir)
    first = chat_ids(tok, dict(GROUNDED)["rename-variable"])
    warm = engine_for(default_model_dir, SpeculativeConfig(), attention_pad=True, w8a8="auto",
                      batch_invariant=True)
    cold = engine_for(default_model_dir, SpeculativeConfig(), attention_pad=True, w8a8="auto",
                      batch_invariant=True, prefix_cache_tokens=0)
    try:
        assert warm.runtime.positions_alike
        reply, _ = asyncio.run(answer(warm, first))
        second = first + reply + tok.encode("\nNow rename `count` to `n`.")
        got, cached = asyncio.run(answer(warm, second))
        want, cold_cached = asyncio.run(answer(cold, second))
    finally:
        warm.stop()
        cold.stop()
    assert cached >= len(first) + len(reply) - 1 and cold_cached == 0
    assert got == want
    assert warm.observer.accepted > 0  # the reply's KV includes verified drafts
