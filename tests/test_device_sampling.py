"""serve.runtime.device_sampling: the token-choice graph (on the CPU provider here) picks what
the CPU sampler picks, given the same seeded uniform draw: greedy exactly, sampled across
temperature / top-k / top-p / min-p, with ties, non-finite logits and mixed batches."""

from __future__ import annotations

import asyncio

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
              SamplingParams(repetition_penalty=1.1), SamplingParams(frequency_penalty=-0.2),
              SamplingParams(allowed_token_ids=(1, 2)), SamplingParams(temperature=0, min_tokens=3)):
        assert Sampler(p, eos_ids=(0,)).row_draw() is None
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


# -- through the runtimes and the engine (the tiny model on the CPU provider) ------------------


def _runtimes(model_dir, **kw):
    from serve.model_dir import load_model_info
    from serve.runtime import RuntimeOptions, open_runtime
    from serve.runtime.cuda import CudaRuntime

    host = open_runtime(model_dir, RuntimeOptions(device_sampling=True, threads=1, **kw))
    # CudaRuntime's pointer-bound plan on host memory (its logits binding for the sampler)
    cuda_on_cpu = CudaRuntime(load_model_info(model_dir),
                              RuntimeOptions(threads=1, device_sampling=True, **kw), device="cpu")
    return host, cuda_on_cpu


def test_runtimes_pick_what_the_host_would(tiny_model_dir) -> None:
    from serve.runtime import RuntimeOptions, open_runtime

    ref = open_runtime(tiny_model_dir, RuntimeOptions(threads=1, max_batch=3))
    assert not ref.device_sampling
    with pytest.raises(NotImplementedError):
        ref.decode_sampled([0], [1], [RowDraw(greedy=True)])
    prompts = [[1, 2, 3, 4], [5, 6, 7], [8, 9, 10, 11, 12]]
    params = [SamplingParams(temperature=0), SamplingParams(seed=1, top_p=0.9),
              SamplingParams(seed=2, top_k=50, temperature=0.7, logprobs=3)]
    for rt in _runtimes(tiny_model_dir, max_batch=3):
        assert rt.device_sampling
        for r in (ref, rt):
            for s, p in enumerate(prompts):
                r.reset(s)
                r.prefill(s, p)
        cpu = [Sampler(p) for p in params]
        dev = [Sampler(p) for p in params]
        ids = [p[-1] for p in prompts]
        for _ in range(4):
            want = [s.sample(row) for s, row in zip(cpu, ref.decode([2, 0, 1], ids), strict=True)]
            got = rt.decode_sampled([2, 0, 1], ids, [dev[0].row_draw(), None, dev[2].row_draw()])
            assert got[0].token == want[0].token and got[2].token == want[2].token
            assert got[2].logprob == pytest.approx(want[2].logprob, abs=1e-4)
            assert isinstance(got[1], np.ndarray)  # a host row: its logits, for the host sampler
            assert dev[1].sample(got[1]).token == want[1].token
            ids = [s.token for s in want]


def test_engine_mixed_batch_equals_host_sampling(tiny_model_dir) -> None:
    """Greedy, seeded, logprobs, logit_bias, penalties, vLLM's token masks and a JSON grammar,
    all at once: the same tokens with device sampling as without, and the device picked most
    of them."""
    import asyncio

    from serve.engine import Engine
    from serve.events import GenerationRequest
    from serve.runtime import RuntimeOptions, open_runtime
    from serve.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(tiny_model_dir)
    mix = [SamplingParams(temperature=0, max_tokens=12, logprobs=2),
           SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_tokens=12),
           SamplingParams(temperature=1.2, top_k=30, min_p=0.02, seed=4, n=2, max_tokens=12),
           SamplingParams(logit_bias={100: 5.0}, seed=5, max_tokens=12),
           SamplingParams(presence_penalty=0.5, repetition_penalty=1.1, seed=6, max_tokens=12),
           SamplingParams(seed=7, logprobs=4, max_tokens=12),
           SamplingParams(allowed_token_ids=tuple(range(100, 140)), seed=8, max_tokens=12),
           SamplingParams(temperature=0, min_tokens=12, max_tokens=12)]

    def tokens(device: bool, greedy_only: bool = False) -> tuple[list, list]:
        rt = open_runtime(tiny_model_dir, RuntimeOptions(threads=1, max_batch=8,
                                                         device_sampling=device))
        # auto's mode on CUDA (the CPU provider's auto never opens the sampler): greedy rows only
        rt.device_greedy_only = greedy_only
        picked = []
        if device:
            real = rt.decode_sampled

            def spy(slots, ids, draws):
                picked.extend(d for d in draws if d is not None)
                return real(slots, ids, draws)

            rt.decode_sampled = spy
        engine = Engine(rt, tok)
        engine.start()

        async def one(params):
            out, logprobs = {}, []
            async for event in engine.submit(GenerationRequest(tuple(range(5, 25)), params)):
                assert event.error is None, event.error
                for c in event.choices:
                    out.setdefault(c.index, []).extend(c.token_ids)
                    logprobs += [(lp.logprob, *(v for _, v in lp.top)) for lp in c.logprobs or ()]
            return out, logprobs

        async def all_at_once():
            return await asyncio.gather(*(one(p) for p in mix))

        try:
            return asyncio.run(all_at_once()), picked
        finally:
            engine.stop()

    host, _ = tokens(False)
    greedy, greedy_picked = tokens(True, greedy_only=True)
    # greedy rows on the device, the seeded ones on the host: their random numbers untouched
    assert [d[0] for d in greedy] == [h[0] for h in host]
    assert greedy_picked and all(d.greedy for d in greedy_picked)
    device, picked = tokens(True)
    picked = len(picked)
    assert [d[0] for d in device] == [h[0] for h in host]
    assert set(device[6][0][0]) <= set(range(100, 140)) and len(device[7][0][0]) == 12
    for d, h in zip(device, host, strict=True):
        assert len(d[1]) == len(h[1])
        for a, b in zip(d[1], h[1], strict=True):
            np.testing.assert_allclose(a, b, atol=1e-4)
    # every decode step of the 5 device-able choices (the first token of each comes from the
    # prefill's logits, on the host)
    assert picked >= 5 * 10


# -- through the real server and the official client -------------------------------------------

DEVICE_LOG = "device sampling: decode tokens are picked on CPUExecutionProvider"


@pytest.fixture(scope="module")
def servers(tiny_model_dir, tmp_path_factory):
    """The tiny model served twice: tokens picked by the sampling graph (on the CPU provider),
    and by the host sampler."""
    from test_server_e2e import running_server

    logs = {m: tmp_path_factory.mktemp(f"device-sampling-{m}") / "server.log" for m in ("on", "off")}
    with running_server(tiny_model_dir, "--max-batch", "8", "--threads", "1", "--model-name",
                        "tiny", "--device-sampling", "on", log_path=logs["on"]) as on, \
         running_server(tiny_model_dir, "--max-batch", "8", "--threads", "1", "--model-name",
                        "tiny", "--device-sampling", "off", log_path=logs["off"]) as off:
        yield {"on": on, "off": off}, logs


async def _mix(base: str) -> list:
    """Eight requests at once: rows the device picks (greedy, seeded top-p / top-k / min-p, n=2,
    logprobs) beside rows the host must sample (logit_bias + repetition_penalty, a JSON schema),
    streamed and not."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{base}/v1", api_key="x")
    msg = [{"role": "user", "content": "Tell me about the sea."}]
    common = dict(model="tiny", max_tokens=16)
    schema = {"type": "object", "properties": {"name": {"type": "string"}},
              "required": ["name"], "additionalProperties": False}

    async def streamed() -> str:
        stream = await client.chat.completions.create(messages=msg, temperature=0, stream=True,
                                                      **common)
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    calls = [
        client.chat.completions.create(messages=msg, temperature=0, logprobs=True,
                                       top_logprobs=3, **common),
        client.chat.completions.create(messages=msg, temperature=2.0, top_p=0.95, seed=1,
                                       **common),
        client.completions.create(prompt="Once upon a time", temperature=2.0, seed=2, n=2,
                                  logprobs=2, extra_body={"top_k": 40, "min_p": 0.01}, **common),
        client.chat.completions.create(messages=msg, temperature=1.5, seed=3,
                                       logit_bias={"100": 20, "200": 20},
                                       extra_body={"repetition_penalty": 2.0}, **common),
        client.chat.completions.create(
            messages=msg, temperature=0.9, seed=4, **common,
            response_format={"type": "json_schema",
                             "json_schema": {"name": "x", "schema": schema, "strict": True}}),
        client.chat.completions.create(messages=msg, temperature=0.7, seed=5, presence_penalty=1,
                                       **common),
        client.completions.create(prompt="The sea", temperature=2.0, seed=6, **common),
        streamed(),
    ]
    try:
        return list(await asyncio.gather(*calls))
    finally:
        await client.close()


def _texts(results: list) -> list:
    out = []
    for r in results:
        if isinstance(r, str):
            out.append(r)
            continue
        out.append([getattr(c, "text", None) or c.message.content for c in r.choices])
    return out


def test_server_mixed_batch_same_as_host_sampling(servers) -> None:
    bases, logs = servers
    on = asyncio.run(_mix(bases["on"]))
    off = asyncio.run(_mix(bases["off"]))
    assert _texts(on) == _texts(off)
    # logprobs picked on the device: the same tokens, values within float rounding
    chat_on, chat_off = on[0].choices[0].logprobs.content, off[0].choices[0].logprobs.content
    assert [t.token for t in chat_on] == [t.token for t in chat_off] and len(chat_on) == 16
    for a, b in zip(chat_on, chat_off, strict=True):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
        assert [t.token for t in a.top_logprobs] == [t.token for t in b.top_logprobs]
    for c_on, c_off in zip(on[2].choices, off[2].choices, strict=True):
        assert c_on.logprobs.tokens == c_off.logprobs.tokens
        np.testing.assert_allclose(c_on.logprobs.token_logprobs, c_off.logprobs.token_logprobs,
                                   atol=1e-4)
    assert on[0].choices[0].message.content  # a real answer, not an error
    assert DEVICE_LOG in logs["on"].read_text()
    assert DEVICE_LOG not in logs["off"].read_text()


def test_server_seeded_requests_reproduce(servers) -> None:
    bases, _ = servers
    first = asyncio.run(_mix(bases["on"]))
    again = asyncio.run(_mix(bases["on"]))
    assert _texts(first) == _texts(again)


def test_engine_batch_invariant_padding_row(tiny_model_dir) -> None:
    """A lone sequence decoded beside a padding row (`batch_invariant`) on the device path."""
    from serve.engine import Engine
    from serve.runtime import RuntimeOptions, open_runtime
    from serve.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(tiny_model_dir)

    def tokens(device: bool) -> list[int]:
        rt = open_runtime(tiny_model_dir, RuntimeOptions(threads=1, max_batch=2,
                                                         device_sampling=device))
        engine = Engine(rt, tok, batch_invariant=True)
        engine.start()

        async def go():
            await _engine_tokens(engine, (7, 8, 9), SamplingParams(temperature=0, max_tokens=2))
            return await _engine_tokens(engine, (5, 6), SamplingParams(seed=8, max_tokens=10))

        try:
            return asyncio.run(go())
        finally:
            engine.stop()

    assert tokens(True) == tokens(False)


async def _engine_tokens(engine, prompt, params) -> list[int]:
    from serve.events import GenerationRequest

    out = []
    async for event in engine.submit(GenerationRequest(prompt, params)):
        assert event.error is None, event.error
        out += [t for c in event.choices for t in c.token_ids]
    return out


def test_a_provider_that_cannot_run_the_graph(tiny_model_dir, monkeypatch, caplog) -> None:
    """By default (auto) the host samples, and no graph is built (not even on CUDA, for now);
    asked for, a graph that cannot run is an error at startup."""
    from serve.model_dir import load_model_info
    from serve.runtime import RuntimeOptions
    from serve.runtime.cuda import CudaRuntime

    def broken(self):
        raise RuntimeError("no kernel for CumSum(double)")

    monkeypatch.setattr(DeviceSampler, "check", broken)
    info = load_model_info(tiny_model_dir)
    rt = CudaRuntime(info, RuntimeOptions(threads=1), device="cpu")
    assert not rt.device_sampling and "CumSum" not in caplog.text
    with pytest.raises(RuntimeError, match="CumSum"):
        CudaRuntime(info, RuntimeOptions(threads=1, device_sampling=True), device="cpu")


@pytest.mark.parametrize("row", [
    np.array([np.nan] * 8, np.float32),
    np.array([np.inf, 1, np.nan, -np.inf, 2, 3, np.inf, 0], np.float32),
    np.array([-np.inf] * 8, np.float32),
    np.array([1e38, -1e38, 3e38, 0, 0, 0, 0, 0], np.float32),
    np.array([3e38, 3e38, -3e38, 1, 2, 3, 4, 5], np.float32),
])
@pytest.mark.parametrize("settings", [
    {"temperature": 0, "logprobs": 3}, {"temperature": 1, "logprobs": 3},
    {"temperature": 0.7, "top_p": 0.5, "top_k": 3, "min_p": 0.1, "logprobs": 2},
    {"temperature": 1e-300}, {"temperature": 5e-324, "top_p": 5e-324},
    {"temperature": 2, "top_p": 1e-300}, {"min_p": 1e-300}, {"min_p": 1}, {"top_k": 2**62},
    {"temperature": 1e-5}, {"temperature": 2, "top_k": 7, "top_p": 0.999999},
])
def test_extremes_as_the_host_sampler(row, settings) -> None:
    """The numeric extremes tests/test_faults.py sends: same token, floored logprobs."""
    from serve.sampling import device_sample

    small = DeviceSampler(row.size, ["CPUExecutionProvider"], threads=1)
    x = np.stack([row, row[::-1]])
    for seed in range(3):
        p = SamplingParams(seed=seed, **settings)
        want = [Sampler(p, seed_offset=j).sample(x[j]) for j in range(2)]
        got = [device_sample(r) for r in run(small, x, [Sampler(p, seed_offset=j).row_draw()
                                                          for j in range(2)])]
        assert [g.token for g in got] == [w.token for w in want]
        for g, w in zip(got, want, strict=True):
            if w.logprob is not None:
                assert g.logprob == pytest.approx(w.logprob, abs=1e-3)
                assert [t for t, _ in g.top] == [t for t, _ in w.top]
