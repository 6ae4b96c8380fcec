"""Sampler: greedy is argmax, seeds reproduce, truncation and penalties do what they say."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serve import sampling
from serve.sampling import Sample, Sampler, SamplingParams

VOCAB = 49152


@pytest.fixture(scope="module")
def logits() -> np.ndarray:
    rng = np.random.default_rng(0)
    return (rng.standard_normal(VOCAB) * 3).astype(np.float32)


def draws(params: SamplingParams, logits: np.ndarray, n: int = 20, **kw) -> list[int]:
    s = Sampler(params, **kw)
    return [s.sample(logits, []).token for _ in range(n)]


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**32), size=st.integers(2, 2000))
def test_temperature_zero_is_argmax(seed: int, size: int) -> None:
    x = np.random.default_rng(seed).standard_normal(size).astype(np.float32)
    assert Sampler(SamplingParams(temperature=0.0)).sample(x, []).token == int(np.argmax(x))
    assert Sampler(SamplingParams(top_k=1, seed=seed)).sample(x, []).token == int(np.argmax(x))
    assert Sampler(SamplingParams(top_p=1e-9, seed=seed)).sample(x, []).token == int(np.argmax(x))


def test_greedy_does_not_touch_the_input(logits: np.ndarray) -> None:
    before = logits.copy()
    Sampler(
        SamplingParams(temperature=0, logit_bias={5: 100.0}, repetition_penalty=1.3),
        prompt_ids=[1, 2, 3],
    ).sample(logits, [4, 4])
    np.testing.assert_array_equal(logits, before)


def test_fixed_seed_reproduces(logits: np.ndarray) -> None:
    p = SamplingParams(temperature=1.5, top_p=0.95, top_k=100, seed=1234)
    assert draws(p, logits) == draws(p, logits)
    free = SamplingParams(temperature=1.5)
    assert draws(free, logits) != draws(free, logits)  # fresh entropy without a seed


def test_negative_seed(logits: np.ndarray) -> None:
    p = SamplingParams(temperature=1.0, seed=-5)
    assert draws(p, logits) == draws(p, logits)


def test_seed_offsets_differ(logits: np.ndarray) -> None:
    p = SamplingParams(temperature=2.0, seed=7)
    a, b = draws(p, logits, seed_offset=0), draws(p, logits, seed_offset=1)
    assert a != b
    assert b == draws(SamplingParams(temperature=2.0, seed=8), logits)


def test_top_k_keeps_only_k(logits: np.ndarray) -> None:
    top = set(np.argsort(logits)[-5:].tolist())
    got = draws(SamplingParams(temperature=5.0, top_k=5, seed=0), logits, n=200)
    assert set(got) <= top and len(set(got)) > 1


def test_top_p_keeps_the_nucleus() -> None:
    probs = np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float64)
    x = np.log(probs).astype(np.float32)
    got = draws(SamplingParams(top_p=0.8, seed=0), x, n=400)
    assert set(got) == {0, 1}  # 0.5 + 0.3 reaches 0.8
    got = draws(SamplingParams(top_p=0.81, seed=0), x, n=400)
    assert set(got) == {0, 1, 2}


def test_top_p_grows_past_first_guess() -> None:
    x = np.zeros(VOCAB, dtype=np.float32)  # uniform: the nucleus is ~90% of the vocab
    got = draws(SamplingParams(top_p=0.9, seed=3), x, n=500)
    assert len(set(got)) > 400


def test_min_p() -> None:
    probs = np.array([0.4, 0.3, 0.2, 0.09, 0.01])
    x = np.log(probs).astype(np.float32)
    got = draws(SamplingParams(min_p=0.5, seed=0), x, n=400)  # keeps p >= 0.2
    assert set(got) == {0, 1, 2}


def test_logit_bias_forces_and_bans(logits: np.ndarray) -> None:
    best = int(np.argmax(logits))
    forced = draws(SamplingParams(logit_bias={123: 100.0}, seed=0), logits)
    assert set(forced) == {123}
    banned = Sampler(SamplingParams(temperature=0, logit_bias={best: -100.0})).sample(logits, [])
    assert banned.token == int(np.argsort(logits)[-2])
    x = np.zeros(4, dtype=np.float32)
    got = draws(SamplingParams(logit_bias={0: -100.0, 1: -100.0}, seed=0), x, n=200)
    assert set(got) == {2, 3}


def test_logit_bias_out_of_range() -> None:
    with pytest.raises(ValueError, match="logit_bias"):
        Sampler(SamplingParams(logit_bias={10: 1.0})).sample(np.zeros(4, np.float32), [])


def processed(params: SamplingParams, x: np.ndarray, generated, prompt=()) -> np.ndarray:
    s = Sampler(params, prompt_ids=prompt)
    s._update_history(generated)
    return s._process(np.asarray(x, dtype=np.float32), len(generated))


def test_repetition_penalty_hf_semantics() -> None:
    x = np.array([2.0, -2.0, 2.0, -2.0, 1.0], dtype=np.float32)
    out = processed(SamplingParams(repetition_penalty=2.0), x, generated=[1, 1], prompt=[0])
    np.testing.assert_allclose(out, [1.0, -4.0, 2.0, -2.0, 1.0])


def test_presence_and_frequency_openai_semantics() -> None:
    x = np.zeros(5, dtype=np.float32)
    p = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    out = processed(p, x, generated=[1, 1, 1, 3], prompt=[2])  # prompt ids don't count
    np.testing.assert_allclose(out, [0.0, -1.25, 0.0, -0.75, 0.0])
    # Negative values encourage repetition.
    out = processed(SamplingParams(presence_penalty=-1.0), x, generated=[4])
    np.testing.assert_allclose(out, [0, 0, 0, 0, 1.0])


def test_penalty_history_is_incremental() -> None:
    x = np.zeros(6, dtype=np.float32)
    s = Sampler(SamplingParams(frequency_penalty=1.0, repetition_penalty=1.0))
    gen: list[int] = []
    for t in [2, 2, 5]:
        gen.append(t)
        s._update_history(gen)
    np.testing.assert_allclose(s._process(x, len(gen)), [0, 0, -2, 0, 0, -1])
    s._update_history([1])  # a shorter list is a new sequence
    np.testing.assert_allclose(s._process(x, 1), [0, -1, 0, 0, 0, 0])


def test_logprobs(logits: np.ndarray) -> None:
    s = Sampler(SamplingParams(temperature=0.7, top_k=40, logprobs=5, seed=1, logit_bias={3: 5.0}))
    out = s.sample(logits, [])
    m = logits.astype(np.float64).max()
    log_softmax = logits - (m + np.log(np.exp(logits.astype(np.float64) - m).sum()))
    assert np.isclose(np.exp(log_softmax).sum(), 1.0)
    # Raw model logprobs: before bias, penalties and temperature.
    assert out.logprob == pytest.approx(log_softmax[out.token], abs=1e-4)
    assert len(out.top) == 5
    want = np.argsort(logits)[::-1][:5]
    assert [t for t, _ in out.top] == want.tolist()
    for t, lp in out.top:
        assert lp == pytest.approx(log_softmax[t], abs=1e-4)
    assert all(a[1] >= b[1] for a, b in itertools.pairwise(out.top))


def test_logprobs_zero_and_none(logits: np.ndarray) -> None:
    assert Sampler(SamplingParams(temperature=0)).sample(logits, []) == Sample(
        int(np.argmax(logits))
    )
    out = Sampler(SamplingParams(temperature=0, logprobs=0)).sample(logits, [])
    assert out.top == () and out.logprob is not None and out.logprob < 0


def test_greedy_never_softmaxes(logits: np.ndarray, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*a, **k):
        raise AssertionError("exp called on the greedy path")

    monkeypatch.setattr(np, "exp", boom)
    Sampler(SamplingParams(temperature=0.0, presence_penalty=0.5)).sample(logits, [1, 2])
    Sampler(SamplingParams(top_k=1)).sample(logits, [])


def test_distribution_matches_softmax() -> None:
    x = np.log(np.array([0.1, 0.2, 0.3, 0.4])).astype(np.float32)
    counts = np.bincount(draws(SamplingParams(seed=42), x, n=20000), minlength=4)
    np.testing.assert_allclose(counts / counts.sum(), [0.1, 0.2, 0.3, 0.4], atol=0.015)
    # Temperature 0.5 squares then renormalises the probabilities.
    counts = np.bincount(draws(SamplingParams(temperature=0.5, seed=42), x, n=20000), minlength=4)
    want = np.array([0.01, 0.04, 0.09, 0.16]) / 0.30
    np.testing.assert_allclose(counts / counts.sum(), want, atol=0.015)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": -1},
        {"top_p": 0},
        {"top_p": 1.5},
        {"min_p": 2},
        {"repetition_penalty": 0},
        {"n": 0},
        {"logprobs": -1},
    ],
)
def test_params_validation(kwargs) -> None:
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


# The helpers that replace full sorts and cumsums, against the obvious implementations.

SIZES = st.sampled_from([3, 100, 2049, 5000, VOCAB])


@settings(max_examples=40, deadline=None)
@given(size=SIZES, k=st.integers(1, 300), seed=st.integers(0, 2**32), ties=st.booleans())
def test_top_indices(size: int, k: int, seed: int, ties: bool) -> None:
    x = np.random.default_rng(seed).standard_normal(size).astype(np.float32)
    if ties:
        x = np.round(x)  # many equal values
    k = min(k, size)
    got = sampling._top_indices(x, k)
    assert len(got) == len(set(got.tolist())) == k
    assert np.sort(x[got]).tolist() == np.sort(x)[size - k :].tolist()


@settings(max_examples=40, deadline=None)
@given(
    size=SIZES,
    seed=st.integers(0, 2**32),
    top_p=st.floats(0.01, 0.999),
    temperature=st.sampled_from([0.3, 1.0, 3.0]),
)
def test_nucleus(size: int, seed: int, top_p: float, temperature: float) -> None:
    x = np.random.default_rng(seed).standard_normal(size).astype(np.float32) * 4
    w = np.exp((x - x.max()) / np.float32(temperature))
    got = sampling._nucleus(w, top_p)
    order = np.argsort(-w, kind="stable")
    cs = np.cumsum(w[order], dtype=np.float64)
    n = int(np.searchsorted(cs, top_p * cs[-1])) + 1
    # The smallest most-likely set reaching top_p (ties with its last value may be added).
    assert set(order[:n].tolist()) <= set(got.tolist())
    assert np.all(w[got] >= w[order[n - 1]])


@settings(max_examples=60, deadline=None)
@given(
    size=SIZES,
    seed=st.integers(0, 2**32),
    u=st.floats(0.0, 1.0, exclude_max=True),
    zeros=st.floats(0.0, 0.99),
)
def test_inverse_cdf(size: int, seed: int, u: float, zeros: float) -> None:
    rng = np.random.default_rng(seed)
    w = rng.random(size).astype(np.float32)
    w[rng.random(size) < zeros] = 0
    w[rng.integers(size)] = 1.0
    i = sampling._inverse_cdf(w, u)
    assert w[i] > 0
    cs = np.cumsum(w, dtype=np.float64)
    # Same answer as one float64 cumsum, up to float32 block-sum rounding at a boundary.
    want = int(np.searchsorted(cs, u * cs[-1], side="right"))
    assert abs(cs[i] - cs[min(want, size - 1)]) <= 1e-4 * cs[-1] + w[i]


def test_greedy_tokens_is_what_each_rows_sampler_picks() -> None:
    """The engine's one-argmax-a-step path: where `greedy_tokens` says a row's token is final,
    it is `Sampler.sample`'s (ties: the first index), with the same logprobs through `take`;
    rows with NaN, +inf or no finite logit are left to `sample`."""
    from serve.sampling import greedy_tokens

    rng = np.random.default_rng(0)
    x = rng.standard_normal((7, 49152)).astype(np.float32)
    x[1, [5, 900, 40000]] = x[1].max() + 1  # a tie
    x[2, 100] = np.nan
    x[3, 7] = np.inf
    x[4, :] = -np.inf
    x[5, ::2] = -np.inf  # -inf entries beside finite ones are fine
    x[6, 3] = np.nan
    x[6, 4] = np.inf
    tokens, finite = greedy_tokens(x)
    assert finite == [True, True, False, False, False, True, False]
    for params in (SamplingParams(temperature=0), SamplingParams(top_k=1, logprobs=3)):
        for j in range(7):
            s = Sampler(params)
            assert s.plain_greedy
            want = s.sample(x[j])
            if finite[j]:
                assert s.take(x[j], tokens[j]) == want
    assert tokens[1] == 5
    assert not Sampler(SamplingParams(temperature=0, presence_penalty=0.5)).plain_greedy
    assert not Sampler(SamplingParams(temperature=0, logit_bias={1: 2.0})).plain_greedy
    assert not Sampler(SamplingParams(temperature=0.5)).plain_greedy


# ------------------------------------------------------ vLLM's token masks


def test_allowed_token_ids_restrict_greedy_and_sampled_draws(logits) -> None:
    """Only the listed ids come out, greedy or sampled, whatever the model prefers; the
    logprobs stay the model's (raw), as vLLM's default."""
    best = int(np.argmax(logits))
    allowed = (3, 17, 4000)
    assert best not in allowed
    greedy = Sampler(SamplingParams(temperature=0, allowed_token_ids=allowed, logprobs=2)).sample(logits, [])
    assert greedy.token == max(allowed, key=lambda t: logits[t])
    assert greedy.top[0][0] == best  # alternatives are the model's, not the mask's
    got = set(draws(SamplingParams(temperature=2.0, seed=1, allowed_token_ids=allowed), logits, n=200))
    assert got == set(allowed)  # at temperature 2 each of the three turns up in 200 draws
    s = Sampler(SamplingParams(temperature=0, allowed_token_ids=allowed))
    assert not s.plain_greedy and s.row_draw() is None  # the mask needs the host


def test_min_tokens_keeps_eos_and_stop_token_ids_out_until_reached() -> None:
    x = np.array([0.0, 1.0, 9.0, 8.0, 7.0], np.float32)  # EOS = 2 is the model's choice, then 3
    params = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=(3,))
    s = Sampler(params, eos_ids=(2,))
    assert not s.plain_greedy and s.row_draw() is None
    assert [s.sample(x, [9] * n).token for n in range(4)] == [4, 4, 2, 2]
    # ignore_eos: EOS ends nothing, so min_tokens leaves it alone (vLLM's all_stop_token_ids)
    assert Sampler(SamplingParams(temperature=0, min_tokens=2, ignore_eos=True),
                   eos_ids=(2,)).sample(x, []).token == 2
    assert Sampler(SamplingParams(temperature=0), eos_ids=(2,)).plain_greedy  # min_tokens 0: no mask


def test_a_grammar_wins_over_masks_that_leave_it_nothing() -> None:
    """A grammar-masked row (only EOS left: the grammar is complete) under min_tokens, or
    with allowed ids the grammar forbids: the row is sampled as the grammar masked it."""
    row = np.full(5, -np.inf, np.float32)
    row[2] = 1.0
    assert Sampler(SamplingParams(temperature=0, min_tokens=9), eos_ids=(2,)).sample(row, []).token == 2
    assert Sampler(SamplingParams(temperature=1, seed=0, allowed_token_ids=(0, 1))).sample(row, []).token == 2


def test_token_mask_params_are_checked() -> None:
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=5, max_tokens=4)
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=-1)
    with pytest.raises(ValueError, match="allowed_token_ids"):
        SamplingParams(allowed_token_ids=())
    with pytest.raises(ValueError, match="allowed_token_ids"):
        Sampler(SamplingParams(allowed_token_ids=(7,))).sample(np.zeros(4, np.float32), [])
