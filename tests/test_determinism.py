"""The same request gets the same tokens whatever else the server does (issue 15, part 2).

On the default model (int4 with its row-invariant W8A8 graph) with the defaults (no flag), and
on its `--int4-symmetric` export with `--w8a8 prefill` (decode steps on the main graph), 8
different prompts, greedy and seeded: alone, all together, after their prefixes were cached,
next to a long prompt that prefills in chunks between their decode steps, on engines with
different prefill chunk sizes, and a second turn whose prompt holds the first turn's answer
after that answer sat in the prefix cache — always the same token ids, bit for bit. Then
once through the real server, flags left at their defaults.
"""

from __future__ import annotations

import asyncio
import re

import numpy as np
import pytest

from serve.engine import Engine
from serve.events import GenerationRequest
from serve.runtime import RuntimeOptions, open_runtime
from serve.sampling import SamplingParams
from serve.tokenizer import Tokenizer

pytestmark = pytest.mark.slow

QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colours.",
    "Write a haiku about the sea.",
    "How many legs does a spider have?",
    "What does a compiler do?",
    "Give me a synonym for happy.",
    "Why is the sky blue?",
    "Translate 'good morning' into Spanish.",
]
SYSTEM = "You are a concise assistant. Answer in one short sentence."
NEW_TOKENS = 10
GREEDY = {"temperature": 0.0}
SEEDED = {"temperature": 0.9, "seed": 1234}


@pytest.fixture(scope="module")
def tok(default_model_dir) -> Tokenizer:
    return Tokenizer.from_dir(default_model_dir)


@pytest.fixture(scope="module")
def prompts(tok) -> list[tuple[int, ...]]:
    return [tuple(tok.encode(tok.apply_chat_template(
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}],
        add_generation_prompt=True), add_special_tokens=False)) for q in QUESTIONS]


@pytest.fixture(scope="module", params=["default", "symmetric-w8a8-prefill"])
def runtime(request, default_model_dir, default_hf_dir, tmp_path_factory):
    """The default export as serve opens it (every step on its row-invariant W8A8 graph), and
    an `--int4-symmetric` export with `--w8a8 prefill`: prefills on the W8A8 graph, every
    decode step on the main graph, row-invariant itself (graph.row_invariant)."""
    if request.param == "default":
        rt = open_runtime(default_model_dir, RuntimeOptions(max_batch=10, max_length=2048,
                                                            w8a8="auto"))
        assert rt.batch_invariant, "the default int4 export's W8A8 graph should be row-invariant"
        return rt
    from export.api import export_model

    sym = tmp_path_factory.mktemp("symmetric") / "smollm2-int4-symmetric"
    export_model(default_hf_dir, sym, precision="int4", int4_symmetric=True, max_length=2048,
                 progress=False)
    rt = open_runtime(sym, RuntimeOptions(max_batch=10, max_length=2048, w8a8="prefill"))
    assert rt.batch_invariant and rt._session_for(1) is rt.session is rt._session_for(8)
    assert rt._session_for(1, prefill=True) is rt.w8a8_session
    return rt


def _request(ids, params) -> GenerationRequest:
    return GenerationRequest(tuple(ids), SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True,
                                                        **params))


async def _tokens(engine: Engine, request: GenerationRequest) -> tuple[int, ...]:
    out: list[int] = []
    async for event in engine.submit(request):
        assert event.error is None, event.error
        for c in event.choices:
            out.extend(c.token_ids)
    return tuple(out)


def _with_engine(runtime, tok, coro_fn, **kwargs):
    for s in range(runtime.n_slots):
        runtime.reset(s)
    engine = Engine(runtime, tok, **kwargs)
    engine.start()
    try:
        return asyncio.run(asyncio.wait_for(coro_fn(engine), 900))
    finally:
        engine.stop()


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_same_tokens_alone_batched_cached_and_beside_a_long_prefill(runtime, tok, prompts,
                                                                    params):
    async def alone(engine):
        return [await _tokens(engine, _request(p, params)) for p in prompts]

    async def together(engine):
        return list(await asyncio.gather(*(_tokens(engine, _request(p, params))
                                           for p in prompts)))

    async def cached(engine):
        # every prompt's own prefix (all but its last 3 tokens) is in an idle slot first,
        # so each request prefills a few tokens after a prefix-cache hit
        for p in prompts:
            await _tokens(engine, GenerationRequest(p[:-3], SamplingParams(temperature=0.0,
                                                                           max_tokens=1)))
        return list(await asyncio.gather(*(_tokens(engine, _request(p, params))
                                           for p in prompts)))

    async def beside_long(engine):
        long_prompt = tok.encode(" ".join(QUESTIONS) * 12, add_special_tokens=False)[:700]
        long_task = asyncio.ensure_future(_tokens(engine, _request(long_prompt, GREEDY)))
        await asyncio.sleep(0)
        out = list(await asyncio.gather(*(_tokens(engine, _request(p, params))
                                          for p in prompts)))
        await long_task
        return out

    async def second_turn(engine):
        # each prompt, then the same conversation one turn on (its answer in the prompt):
        # the answer's KV, computed by decode steps, sits in the prefix cache meanwhile
        for p in prompts:
            await _tokens(engine, _request(p, params))
        return [await _tokens(engine, _request(p, params)) for p in turn_two]

    reference = _with_engine(runtime, tok, alone, prefix_cache_tokens=0)
    turn_two = [p + a + tuple(tok.encode("<|im_end|>\n<|im_start|>user\nAnd why?<|im_end|>\n"
                                         "<|im_start|>assistant\n", add_special_tokens=False))
                for p, a in zip(prompts, reference, strict=True)]
    cold_two = _with_engine(runtime, tok, lambda e: _all_alone(e, turn_two, params),
                            prefix_cache_tokens=0)
    assert len(set(reference)) > 1 and all(len(t) == NEW_TOKENS for t in reference)
    runs = {
        "alone, 7-token prefill chunks, prefix cache on": _with_engine(
            runtime, tok, alone, prefill_chunk=7),
        "all 8 together": _with_engine(runtime, tok, together, prefix_cache_tokens=0),
        "together after prefix-cache hits": _with_engine(runtime, tok, cached),
        "beside a 700-token prompt prefilled in 64-token chunks": _with_engine(
            runtime, tok, beside_long, prefill_chunk=64, prefix_cache_tokens=0),
    }
    for name, got in runs.items():
        assert got == reference, name
    assert _with_engine(runtime, tok, second_turn) == cold_two, "second turn after a cached first"


async def _all_alone(engine, prompts, params):
    return [await _tokens(engine, _request(p, params)) for p in prompts]


def test_lone_decode_equals_a_row_of_a_batch_in_the_runtime(runtime, prompts):
    """The runtime level, bit for bit: logits of each step alone vs as row 3 of 8."""
    def steps(slots, n=4):
        logits = [runtime.prefill(s, list(prompts[s])) for s in slots]
        rows = [logits]
        for _ in range(n):
            logits = list(runtime.decode(slots, [int(np.argmax(x)) for x in logits]))
            rows.append(logits)
        return rows

    for s in range(runtime.n_slots):
        runtime.reset(s)
    batched = steps(list(range(8)))
    runtime.reset(3)
    alone = steps([3])
    for step_alone, step_batched in zip(alone, batched, strict=True):
        assert np.array_equal(step_alone[0], step_batched[3])


@pytest.mark.parametrize("flags,new_tokens", [
    ((), NEW_TOKENS), (("--speculative", "ngram", "--batch-invariant"), 40)],
    ids=["defaults", "speculative-batch-invariant"])
def test_same_text_through_the_real_server_alone_and_concurrent(default_model_dir, tmp_path,
                                                                flags, new_tokens):
    """The defaults of `llorch serve`, the official client: each prompt alone, then all 8 at
    once (greedy and seeded at temperature 0.9) — the same text. With `--speculative ngram
    --batch-invariant` (the attention pad on): alone each sequence drafts, together none does
    (one stream drafts by default) and their decode steps run one call each — the same text
    again (QA once saw "Write the alphabet twice." answer otherwise beside two other
    requests). `--speculative` alone is not batch-invariant: batched steps run unpadded."""
    import httpx
    import openai
    from test_server_e2e import running_server

    questions = QUESTIONS if not flags else [*QUESTIONS[:7], "Write the alphabet twice."]
    messages = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]
                for q in questions]

    async def ask(client, m, params):
        r = await client.chat.completions.create(model="smollm2-135m-instruct", messages=m,
                                                 max_tokens=new_tokens, **params)
        return r.choices[0].message.content

    async def run_all(base):
        out = {}
        async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0,
                                      timeout=600) as client:
            for name, params in (("greedy", GREEDY), ("seeded", SEEDED)):
                alone = [await ask(client, m, params) for m in messages]
                together = await asyncio.gather(*(ask(client, m, params) for m in messages))
                out[name] = (alone, list(together))
        return out

    with running_server(default_model_dir, "--threads", "2", "--max-batch", "8", *flags,
                        log_path=tmp_path / "server.log") as base:
        results = asyncio.run(asyncio.wait_for(run_all(base), 900))
        metrics = httpx.get(f"{base}/metrics").text
    if flags:  # drafts were made and kept
        accepted = re.search(r"^llorch_spec_accepted_tokens_total\{[^}]*\} (\S+)$", metrics, re.M)
        assert accepted and float(accepted.group(1)) > 0
    for name, (alone, together) in results.items():
        assert all(alone) and len(set(alone)) > 1, name
        assert together == alone, name


def test_a_cached_prefix_leaving_129_tokens_to_prefill_gives_the_cold_logprobs(default_model_dir,
                                                                               tmp_path):
    """ORT's CPU GroupQueryAttention computes the last row of a 129-token call in another
    kernel, so a prompt whose cached prefix left exactly 129 tokens to prefill got other
    logits than the same prompt cold (found in QA: a greedy answer changed when the chat
    template's prefix happened to be cached). Through the real server, the official client:
    each prompt's prefix cached first, then the prompt, against a server without a prefix
    cache; token-id prompts, so the lengths are exact."""
    import openai
    from test_server_e2e import running_server

    rng = np.random.default_rng(5)
    cases = [(131, 2), (300, 171), (400, 271)]  # (prompt tokens, cached prefix): 129 left
    prompts = [[int(t) for t in rng.integers(100, 40000, n)] for n, _ in cases]

    def answer(client, prompt, max_tokens=4):
        r = client.completions.create(model="smollm2-135m-instruct", prompt=prompt,
                                      max_tokens=max_tokens, temperature=0, logprobs=0)
        return r.choices[0].logprobs.token_logprobs, r.usage

    got = {}
    for name, flags in (("cached", ()), ("cold", ("--prefix-cache-size", "0"))):
        with running_server(default_model_dir, "--threads", "2", *flags,
                            log_path=tmp_path / f"{name}.log") as base:
            client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0,
                                   timeout=300)
            out = []
            for (_, k), prompt in zip(cases, prompts, strict=True):
                if name == "cached":
                    answer(client, prompt[:k], max_tokens=1)  # its prefix into an idle slot
                logprobs, usage = answer(client, prompt)
                assert usage.prompt_tokens_details.cached_tokens == (k if name == "cached" else 0)
                out.append(logprobs)
            got[name] = out
    assert got["cached"] == got["cold"]


@pytest.mark.parametrize("flags,reason", [
    (("--no-batch-invariant",), "not batch-invariant: a request's tokens may depend on what "
                                "else runs (--no-batch-invariant)"),
    (("--speculative", "ngram", "--no-attention-pad"), "not batch-invariant: a request's tokens "
                                                       "may depend on what else runs (--speculative without"),
    (("--speculative", "ngram"), "not batch-invariant: a request's tokens may depend on what "
                                 "else runs (--speculative: the attention pad pads a lone decode "
                                 "step, a step of 2+ sequences runs as one unpadded call"),
    (("--speculative", "ngram", "--batch-invariant"),
     "batch-invariant: the same request gives the same tokens whatever else runs, with or "
     "without drafts (attention pad with --batch-invariant"),
], ids=["no-batch-invariant", "speculative-without-pad", "speculative",
        "speculative-batch-invariant"])
def test_the_startup_line_says_when_tokens_may_depend_on_what_else_runs(default_model_dir,
                                                                        tmp_path, flags, reason):
    """One startup line on invariance, and the true one: `--no-batch-invariant` logged nothing
    about it; `--speculative` without the attention pad (README: QA saw "Write the alphabet
    twice." answer otherwise beside two other requests) logged "batch-invariant"; with the
    pad (its default) a lone stream's drafts change no number, but on auto a decode step of
    several sequences runs as one unpadded call, so the line says not batch-invariant; with
    `--batch-invariant` such a step runs one call a sequence, and the line says so."""
    from test_server_e2e import running_server

    log_path = tmp_path / "server.log"
    with running_server(default_model_dir, "--threads", "1", *flags, log_path=log_path):
        pass
    lines = [line for line in log_path.read_text().splitlines() if "batch-invariant" in line]
    assert len(lines) == 1 and reason in lines[0], lines


def test_fingerprint_follows_the_invariance_in_effect(default_model_dir, tiny_model_dir):
    """`system_fingerprint` hashes the batch-invariance mode in effect, not the raw flag: on the
    default export the default and `--batch-invariant` compute the same numbers (the same
    fingerprint), and there the slot count changes none; `--no-batch-invariant` does."""
    from serve.fingerprint import batch_invariance, system_fingerprint
    from serve.options import ServeOptions

    def fp(d, **kw):
        return system_fingerprint(ServeOptions(d, **kw))

    assert batch_invariance(ServeOptions(default_model_dir)) == "rows"
    assert fp(default_model_dir) == fp(default_model_dir, batch_invariant=True)
    assert fp(default_model_dir) == fp(default_model_dir, max_batch=8)
    assert fp(default_model_dir) != fp(default_model_dir, batch_invariant=False)
    assert batch_invariance(ServeOptions(default_model_dir, w8a8="off")) == "off"
    assert batch_invariance(ServeOptions(tiny_model_dir, batch_invariant=True)) == "padded"
    # elsewhere the slot count still counts (captured CUDA sizes, padding)
    assert fp(tiny_model_dir) != fp(tiny_model_dir, max_batch=8)
    # the attention pad (auto with --speculative), invariance on auto: steps of 2+ sequences
    # run unpadded, so not batch-invariant ("rows-batched"): the slot count counts again, and
    # a plain --attention-pad server computes what a speculative one does (one stream drafts)
    spec = {"speculative": "ngram"}
    assert batch_invariance(ServeOptions(default_model_dir, **spec)) == "rows-batched"
    assert batch_invariance(ServeOptions(default_model_dir, attention_pad=True)) == "rows-batched"
    assert batch_invariance(ServeOptions(default_model_dir, batch_invariant=True, **spec)) == "rows"
    assert fp(default_model_dir, **spec) == fp(default_model_dir, attention_pad=True)
    assert fp(default_model_dir, **spec) != fp(default_model_dir, batch_invariant=True, **spec)
    assert fp(default_model_dir, **spec) != fp(default_model_dir, max_batch=8, **spec)
    assert fp(default_model_dir, batch_invariant=True, **spec) == fp(
        default_model_dir, batch_invariant=True, max_batch=8, **spec)
    # drafting beside other sequences: a padded verify call replaces an unpadded batched row
    assert fp(default_model_dir, **spec) != fp(default_model_dir,
                                               speculative_disable_by_batch_size=2, **spec)
    assert fp(default_model_dir, batch_invariant=True, **spec) == fp(
        default_model_dir, batch_invariant=True, speculative_disable_by_batch_size=2, **spec)


def test_batch_invariant_and_speculative_need_the_attention_pad(default_model_dir, tiny_model_dir,
                                                             tmp_path):
    """`--batch-invariant --speculative` holds with the attention pad (on by default with
    `--speculative` on exports that have it): allowed, and the fingerprint is a plain
    `--attention-pad --batch-invariant` server's (speculation changes no number then). Without the pad it asks
    for what `--speculative` cannot give: a startup error (exit 2, the flags named), never a
    silent no, whether the pad is turned off or the export lacks it."""
    import json
    import shutil
    import subprocess
    import sys

    from serve.fingerprint import system_fingerprint
    from serve.options import ServeOptions

    spec = ServeOptions(default_model_dir, speculative="ngram", batch_invariant=True)
    assert spec.attention_pad_in_effect()
    assert system_fingerprint(spec) == system_fingerprint(
        ServeOptions(default_model_dir, attention_pad=True, batch_invariant=True))
    assert system_fingerprint(spec) != system_fingerprint(ServeOptions(default_model_dir))
    with pytest.raises(ValueError, match="--batch-invariant cannot hold with --speculative"):
        ServeOptions(default_model_dir, speculative="ngram", batch_invariant=True,
                     attention_pad=False)
    old = tmp_path / "old"  # an export from before the pad
    shutil.copytree(tiny_model_dir, old)
    manifest = json.loads((old / "llorch.json").read_text())
    del manifest["graph"]["attention_pad"]
    (old / "llorch.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="--batch-invariant cannot hold with --speculative"):
        ServeOptions(old, speculative="ngram", batch_invariant=True)
    assert not ServeOptions(old, speculative="ngram").attention_pad_in_effect()
    p = subprocess.run([sys.executable, "-m", "llorch", "serve", str(default_model_dir),
                        "--speculative", "ngram", "--batch-invariant", "--no-attention-pad"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "--batch-invariant cannot hold with --speculative" in p.stderr


def test_fingerprint_resolves_provider_auto(default_model_dir, tiny_model_dir, tmp_path,
                                           monkeypatch):
    """`--provider auto` computes what the provider it picks computes, so both get one
    fingerprint (they differed on the CPU: the raw flag was hashed); and `auto` on a build
    with CUDA is not the CPU's row-invariant mode (the W8A8 graph runs on the CPU only), so
    there the slot count enters the hash again. Through real servers first: `--provider auto`
    and `--provider cpu` on this (CPU-only) machine answer with one fingerprint."""
    import httpx
    import onnxruntime as ort
    from test_server_e2e import running_server

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        seen = []
        for flag in ("auto", "cpu"):
            with running_server(tiny_model_dir, "--threads", "1", "--provider", flag,
                                log_path=tmp_path / f"{flag}.log") as base:
                r = httpx.post(f"{base}/v1/completions", json={"prompt": "Hi", "max_tokens": 1},
                               timeout=60)
                seen.append(r.json()["system_fingerprint"])
        assert seen[0] == seen[1], seen
    from serve.fingerprint import batch_invariance, provider, system_fingerprint
    from serve.options import ServeOptions

    cpu_only = ["AzureExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: cpu_only)
    assert provider(ServeOptions(default_model_dir, provider="auto")) == "CPUExecutionProvider"
    assert system_fingerprint(ServeOptions(default_model_dir, provider="auto")) == \
        system_fingerprint(ServeOptions(default_model_dir, provider="cpu"))
    with_cuda = ["CUDAExecutionProvider", *cpu_only]
    monkeypatch.setattr(ort, "get_available_providers", lambda: with_cuda)
    auto = ServeOptions(default_model_dir, provider="auto")
    assert provider(auto) == "CUDAExecutionProvider"
    assert batch_invariance(auto) == "off" == batch_invariance(ServeOptions(default_model_dir,
                                                                            provider="cuda"))
    assert system_fingerprint(auto) != system_fingerprint(ServeOptions(default_model_dir,
                                                                       provider="auto", max_batch=8))
