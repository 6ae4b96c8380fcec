"""serve.runtime.device_sampling: the token-choice graph (on the CPU provider here) picks what
the CPU sampler picks, given the same seeded uniform draw: greedy exactly, sampled across
temperature / top-k / top-p / min-p, with ties, non-finite logits and mixed batches."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from serve.runtime.device_sampling import DeviceSampler, sampling_model
from serve.runtime.interface import RowDraw, RowToken
from serve.sampling import Sampler, SamplingParams, token_logprobs

VOCAB = 49152


@pytest.fixture(scope="module")
def device() -> DeviceSampler:
    return DeviceSampler(VOCAB, ["CPUExecutionProvider"], threads=1)


def run(device: DeviceSampler, x: np.ndarray, draws) -> list:
    return device.sample(ort.OrtValue.ortvalue_from_numpy(x[:, None, :]), draws)


def random_logits(rows: int, seed: int, *, ties: bool = False) -> np.ndarray:
    x = (np.random.default_rng(seed).standard_normal((rows, VOCAB)) * 3).astype(np.float32)
    if ties:
        x = np.round(x)  # hundreds of equal values at every top-k / top-p boundary
    return x


SETTINGS = [
    {"temperature": 1.0},
    {"temperature": 0.7, "top_k": 40},
    {"temperature": 1.3, "top_p": 0.9},
    {"top_p": 0.5},
    {"temperature": 0.8, "top_k": 200, "top_p": 0.95},
    {"min_p": 0.05},
    {"temperature": 2.0, "top_k": 1000, "top_p": 0.8, "min_p": 0.01},
    {"temperature": 0.3, "top_p": 0.999},
    {"top_k": 5, "min_p": 0.5},
    {"temperature": 5.0, "top_p": 0.99},  # a nucleus of most of the vocabulary
]


def test_greedy_is_the_first_argmax(device: DeviceSampler) -> None:
    x = random_logits(16, 0)
    x[3, [7, 9000, 40000]] = x[3].max() + 1  # a tie: the first index wins, as np.argmax
    got = run(device, x, [RowDraw(greedy=True)] * 16)
    assert [r.token for r in got] == np.argmax(x, axis=-1).tolist()
    assert got[3].token == 7


@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_sampled_equals_the_cpu_sampler(device: DeviceSampler, settings: dict, ties: bool) -> None:
    """Per row its own seeded Sampler: `row_draw` takes the uniform the CPU `sample` would."""
    rows, steps = 8, 6
    x = random_logits(rows, SETTINGS.index(settings), ties=ties)
    params = SamplingParams(seed=11, **settings)
    cpu = [Sampler(params, seed_offset=j) for j in range(rows)]
    dev = [Sampler(params, seed_offset=j) for j in range(rows)]
    for step in range(steps):
        want = [s.sample(x[j]).token for j, s in enumerate(cpu)]
        got = run(device, x, [s.row_draw() for s in dev])
        assert [r.token for r in got] == want, f"step {step}"
        x = np.roll(x, 1, axis=0)  # other rows, same samplers


def test_mixed_batch_host_rows_and_greedy(device: DeviceSampler) -> None:
    x = random_logits(5, 3)
    sampled = SamplingParams(temperature=0.9, top_p=0.9, seed=5)
    cpu, dev = Sampler(sampled), Sampler(sampled)
    got = run(device, x, [None, RowDraw(greedy=True), dev.row_draw(), None, RowDraw(greedy=True)])
    np.testing.assert_array_equal(got[0], x[0])  # host rows: their raw logits, bit for bit
    np.testing.assert_array_equal(got[3], x[3])
    assert got[1].token == int(np.argmax(x[1])) and got[4].token == int(np.argmax(x[4]))
    assert got[2].token == cpu.sample(x[2]).token
    only_host = run(device, x, [None] * 5)
    np.testing.assert_array_equal(np.stack(only_host), x)


def test_logprobs(device: DeviceSampler) -> None:
    x = random_logits(3, 4)
    params = [SamplingParams(temperature=0, logprobs=5), SamplingParams(seed=2, logprobs=0),
              SamplingParams(seed=3, top_k=20, logprobs=20)]
    got = run(device, x, [Sampler(p).row_draw() for p in params])
    for j, p in enumerate(params):
        want = Sampler(p).sample(x[j])
        assert got[j].token == want.token
        lp, top = token_logprobs(x[j], want.token, p.logprobs)
        assert got[j].logprob == pytest.approx(lp, abs=1e-4)
        assert [t for t, _ in got[j].top] == [t for t, _ in top]
        np.testing.assert_allclose([v for _, v in got[j].top], [v for _, v in top], atol=1e-4)


def test_non_finite_logits(device: DeviceSampler) -> None:
    """finite_scores' rules: NaN is -inf, +inf the largest float, no finite logit → token 0."""
    x = random_logits(4, 5)
    x[0, 100] = np.nan
    x[0, 200] = np.inf
    x[1, :] = -np.inf
    x[2, :] = np.nan
    x[3, ::2] = np.nan
    for settings in ({"temperature": 0}, {"seed": 1}, {"seed": 1, "top_p": 0.5, "top_k": 3}):
        p = SamplingParams(**settings)
        want = [Sampler(p, seed_offset=j).sample(x[j]).token for j in range(4)]
        got = run(device, x, [Sampler(p, seed_offset=j).row_draw() for j in range(4)])
        assert [r.token for r in got] == want, settings
    assert want[:3] == [200, 0, 0]


def test_rows_the_device_cannot_serve() -> None:
    for p in (SamplingParams(logit_bias={1: 2.0}), SamplingParams(presence_penalty=0.5),
              SamplingParams(repetition_penalty=1.1), SamplingParams(frequency_penalty=-0.2)):
        assert Sampler(p).row_draw() is None
    assert Sampler(SamplingParams(logprobs=21)).row_draw() is None
    assert Sampler(SamplingParams(temperature=0, logprobs=20)).row_draw() == RowDraw(greedy=True,
                                                                                    logprobs=20)


def test_greedy_draws_take_no_random_number() -> None:
    """Greedy steps leave the generator alone, as `sample` does: later draws line up."""
    p = SamplingParams(top_k=1, seed=9)
    s = Sampler(p)
    s.row_draw()
    assert s._rng.random() == np.random.default_rng(9).random()


def test_graphs_are_valid_onnx() -> None:
    for kind in ("greedy", "sample", "sample_logprobs"):
        assert sampling_model(100, kind).graph.output[0].name == "tokens"
    with pytest.raises(ValueError, match="kind"):
        sampling_model(100, "beam")


def test_row_token_result_type(device: DeviceSampler) -> None:
    got = run(device, random_logits(1, 6), [RowDraw(greedy=True)])
    assert isinstance(got[0], RowToken) and got[0].logprob is None
    with pytest.raises(ValueError, match="draws"):
        run(device, random_logits(2, 6), [RowDraw(greedy=True)])
