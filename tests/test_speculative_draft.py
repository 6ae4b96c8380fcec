"""Draft-model speculative decoding (`--speculative draft --draft-model DIR`, serve.draft_model):
what is refused, exactness alone and batched, roll-back and slot reuse, the sampled
distribution, and the real server (tiny model; the default model's fp32 export drafted by its
int4 export).

The tiny random model drafted by its own int4 export gives hits and misses (random weights:
int4 rounding flips many argmaxes); drafted by itself it accepts nearly every draft.
"""

from __future__ import annotations

import json
import re
import shutil

import httpx
import numpy as np
import pytest

from serve.draft_model import DraftModelSpeculator, check_draft_model
from serve.engine import Engine
from serve.main import main as serve_main
from serve.model_dir import ModelDirError
from serve.options import ServeOptions
from serve.runtime import RuntimeOptions, open_runtime
from serve.speculative import SpeculativeConfig
from serve.tokenizer import Tokenizer
from tests.test_server_e2e import running_server
from tests.test_speculative import (
    REPETITIVE,
    Counts,
    _client,
    _spec_counts,
    check_sampled_distribution,
    run_all,
)


@pytest.fixture(scope="module")
def tiny_int4_dir(tiny_hf_dir, tmp_path_factory):
    from export.api import export_model

    out = tmp_path_factory.mktemp("draft") / "tiny-int4"
    export_model(tiny_hf_dir, out, precision="int4", progress=False)
    return out


@pytest.fixture(scope="module")
def other_vocab_dir(tiny_model_dir, tmp_path_factory):
    """The tiny export with two tokens' ids swapped in tokenizer.json (weights linked)."""
    out = tmp_path_factory.mktemp("draft") / "tiny-other-vocab"
    out.mkdir()
    for f in tiny_model_dir.iterdir():
        (out / f.name).symlink_to(f)
    (out / "tokenizer.json").unlink()
    spec = json.loads((tiny_model_dir / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    vocab["the"], vocab["and"] = vocab["and"], vocab["the"]
    (out / "tokenizer.json").write_text(json.dumps(spec))
    return out


@pytest.fixture(scope="module")
def tiny_prompts(tiny_model_dir) -> list[list[int]]:
    tok = Tokenizer.from_dir(tiny_model_dir)
    texts = [REPETITIVE, "a b c d a b c d a b", "Hello there, how are you today?",
             "def f(x):\n    return x + 1\n\ndef g(x):\n    return"]
    return [tok.encode(t) for t in texts]


def draft_engine(target, draft, spec: SpeculativeConfig | None, *, max_batch: int = 1,
                 **kwargs) -> Engine:
    runtime = open_runtime(target, RuntimeOptions(threads=1, max_batch=max_batch))
    draft_rt = None if draft is None else open_runtime(
        draft, RuntimeOptions(threads=1, max_batch=max_batch, max_length=runtime.info.max_length))
    engine = Engine(runtime, Tokenizer.from_dir(target), speculative=spec, draft=draft_rt,
                    observer=Counts(), **kwargs)
    engine.start()
    return engine


# -- what is refused --------------------------------------------------------------------------


def test_flags_are_checked():
    with pytest.raises(ValueError, match="--speculative draft needs --draft-model"):
        ServeOptions(model_dir="m", speculative="draft")
    with pytest.raises(ValueError, match="--draft-model only applies with --speculative draft"):
        ServeOptions(model_dir="m", draft_model="d")
    with pytest.raises(ValueError, match="--draft-model only applies with --speculative draft"):
        ServeOptions(model_dir="m", speculative="ngram", draft_model="d")
    with pytest.raises(ValueError, match="--prompt-lookup-min only applies with --speculative ngram"):
        ServeOptions(model_dir="m", speculative="draft", draft_model="d", prompt_lookup_min=1)
    with pytest.raises(ValueError, match="one target model"):
        ServeOptions(model_dir="m", models_dir="ms", speculative="draft", draft_model="d")
    opts = ServeOptions(model_dir="m", speculative="draft", draft_model="d",
                        num_speculative_tokens=3, speculative_disable_by_batch_size=2)
    assert opts.speculative_config() == SpeculativeConfig(num_speculative_tokens=3,
                                                          disable_by_batch_size=2)


def test_vocabulary_check(tiny_model_dir, tiny_int4_dir, other_vocab_dir, tmp_path):
    check_draft_model(tiny_model_dir, tiny_int4_dir)  # same tokenizer: fine
    with pytest.raises(ModelDirError, match=r"tiny-other-vocab/tokenizer.json has another vocabulary"
                                            r".*tiny-llama/tokenizer.json.*2 differ"):
        check_draft_model(tiny_model_dir, other_vocab_dir)
    wide = tmp_path / "wide"
    shutil.copytree(tiny_int4_dir, wide)
    cfg = json.loads((wide / "genai_config.json").read_text())
    cfg["model"]["vocab_size"] += 64
    (wide / "genai_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelDirError, match="logits cover"):
        check_draft_model(tiny_model_dir, wide)
    with pytest.raises(ModelDirError, match="not found"):
        check_draft_model(tiny_model_dir, tmp_path / "missing")


@pytest.mark.parametrize("extra, needle", [
    (("--speculative", "draft"), "--speculative draft needs --draft-model"),
    (("--draft-model", "DRAFT"), "--draft-model only applies with --speculative draft"),
    (("--speculative", "draft", "--draft-model", "OTHER"), "has another vocabulary"),
])
def test_cli_exits_2_naming_the_flag_or_file(tiny_model_dir, other_vocab_dir, tiny_int4_dir,
                                             capsys, extra, needle):
    args = [a.replace("DRAFT", str(tiny_int4_dir)).replace("OTHER", str(other_vocab_dir))
            for a in extra]
    assert serve_main([str(tiny_model_dir), "--port", "1", *args]) == 2
    err = capsys.readouterr().err
    assert needle in err
    if "OTHER" in extra:
        assert str(other_vocab_dir / "tokenizer.json") in err


def test_a_draft_export_shorter_than_the_target_slots_is_refused(tiny_model_dir, tiny_int4_dir):
    from types import SimpleNamespace

    from serve.errors import StartupError
    from serve.main import open_draft

    options = ServeOptions(model_dir=tiny_model_dir, speculative="draft", draft_model=tiny_int4_dir)
    longer = SimpleNamespace(info=SimpleNamespace(max_length=10**6), n_slots=1)
    with pytest.raises(StartupError, match=r"holds \d+ tokens a sequence, the target 1000000: "
                                           r"pass --max-length"):
        open_draft(options, longer)
    fits = open_runtime(tiny_model_dir, RuntimeOptions(threads=1, max_batch=3, max_length=64))
    draft = open_draft(options, fits)
    assert (draft.n_slots, draft.info.max_length) == (3, 64)


def test_engine_refuses_a_smaller_draft_runtime(tiny_model_dir, tiny_int4_dir):
    target = open_runtime(tiny_model_dir, RuntimeOptions(threads=1, max_batch=2))
    draft = open_runtime(tiny_int4_dir, RuntimeOptions(threads=1, max_batch=1))
    tok = Tokenizer.from_dir(tiny_model_dir)
    with pytest.raises(ValueError, match="fewer or shorter"):
        Engine(target, tok, speculative=SpeculativeConfig(), draft=draft)
    with pytest.raises(ValueError, match="needs speculative"):
        Engine(target, tok, draft=draft)


# -- the engine on the tiny model ---------------------------------------------------------------


def test_greedy_equal_alone_batched_and_n2(tiny_model_dir, tiny_int4_dir, tiny_prompts):
    """Greedy tokens with int4 drafts equal plain decoding's, alone, with four sequences
    drafting together (one batched draft decode a step) and with n=2; drafts both hit and
    miss."""
    plain = draft_engine(tiny_model_dir, None, None, max_batch=4)
    spec = draft_engine(tiny_model_dir, tiny_int4_dir, SpeculativeConfig(disable_by_batch_size=4),
                        max_batch=4)
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
    assert counts.accepted > 0 and counts.drafted > counts.accepted


def test_self_draft_accepts_nearly_everything(tiny_model_dir, tiny_prompts):
    """The target drafting for itself: drafts are its own greedy tokens, so all but float
    near-ties are accepted, and a stream is emitted K + 1 tokens a verify call."""
    spec = draft_engine(tiny_model_dir, tiny_model_dir, SpeculativeConfig(num_speculative_tokens=4))
    try:
        got = run_all(spec, [tiny_prompts[2]], temperature=0.0, max_tokens=51, ignore_eos=True)[0][0]
    finally:
        spec.stop()
    assert len(got) == 51
    assert spec.observer.accepted >= 0.95 * spec.observer.drafted
    assert spec.observer.drafted == 4 * 10  # 1 token from prefill + 10 calls of 4 drafts + 1


def test_max_tokens_mid_draft_roll_back_and_slot_reuse(tiny_model_dir, tiny_int4_dir, tiny_prompts):
    """max_tokens ending inside a draft, then prefix-cache hits and another prompt in the same
    slot: same tokens as plain decoding; an idle draft slot holds no more than its target
    slot (its tokens are the target's)."""
    cfg = SpeculativeConfig(num_speculative_tokens=6)
    spec = draft_engine(tiny_model_dir, tiny_model_dir, cfg)  # self-draft: long accepted runs
    plain = draft_engine(tiny_model_dir, None, None)
    speculator = spec.speculator
    assert isinstance(speculator, DraftModelSpeculator)
    try:
        for prompt in (tiny_prompts[0], tiny_prompts[0], tiny_prompts[3], tiny_prompts[0]):
            for max_tokens in (1, 2, 5, 9, 13):
                params = dict(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
                got = run_all(spec, [prompt], **params)[0][0]
                assert got == run_all(plain, [prompt], **params)[0][0]
                assert len(got) == max_tokens
                held = speculator._held[0]
                assert spec.runtime.length(0) == len(prompt) + max_tokens - 1
                assert speculator.draft.length(0) == len(held) <= spec.runtime.length(0)
                assert held.tolist() == (prompt + got)[: len(held)]
                assert spec.kv_bytes_in_use() == (spec.runtime.kv_bytes_in_use()
                                                  + speculator.draft.kv_bytes_in_use())
    finally:
        spec.stop()
        plain.stop()
    assert spec.observer.accepted > 0


def test_a_failing_draft_model_falls_back_to_plain_decoding(tiny_model_dir, tiny_int4_dir,
                                                            tiny_prompts, monkeypatch):
    """A draft runtime that raises costs the step its drafts, never the request."""
    plain = draft_engine(tiny_model_dir, None, None)
    spec = draft_engine(tiny_model_dir, tiny_int4_dir, SpeculativeConfig())
    calls = {"n": 0}
    verify = spec.speculator._verify

    def flaky(slot, ids):
        calls["n"] += 1
        if calls["n"] % 3 == 0:
            raise RuntimeError("injected draft failure")
        return verify(slot, ids)

    monkeypatch.setattr(spec.speculator, "_verify", flaky)
    try:
        params = dict(temperature=0.0, max_tokens=30, ignore_eos=True)
        assert run_all(spec, [tiny_prompts[1]], **params) == run_all(plain, [tiny_prompts[1]], **params)
    finally:
        spec.stop()
        plain.stop()
    assert calls["n"] >= 3


def test_sampled_distribution_is_preserved(tiny_model_dir, tiny_int4_dir, tiny_prompts, monkeypatch):
    """Tokens 2-4 sampled (temperature 1, top-k 3) with int4 drafts follow plain decoding's
    distribution (chi-square, independent seeds); a rule that keeps a draft half the time
    whatever its probability is caught by the same test."""
    check_sampled_distribution(
        draft_engine(tiny_model_dir, None, None),
        draft_engine(tiny_model_dir, tiny_int4_dir, SpeculativeConfig(num_speculative_tokens=3)),
        tiny_prompts[0], monkeypatch)


# -- through the real server ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_servers(tiny_model_dir, tiny_int4_dir, tmp_path_factory):
    """(plain, draft-model) servers of the tiny model, the draft its int4 export."""
    logs = tmp_path_factory.mktemp("draft-servers")
    common = ("--max-batch", "2", "--threads", "1", "--model-name", "tiny")
    with running_server(tiny_model_dir, *common, log_path=logs / "plain.log") as plain, \
            running_server(tiny_model_dir, *common, "--speculative", "draft", "--draft-model",
                           str(tiny_int4_dir), "--speculative-disable-by-batch-size", "2",
                           log_path=logs / "draft.log") as spec:
        yield plain, spec
    assert "speculative decoding: draft" in (logs / "draft.log").read_text()


def test_server_tiny_completions_chat_grammar_stream(tiny_servers):
    plain, spec = (_client(b) for b in tiny_servers)
    before = _spec_counts(tiny_servers[1])
    requests = [
        dict(prompt=REPETITIVE, max_tokens=30, temperature=0),
        dict(prompt=REPETITIVE, max_tokens=7, temperature=0, logprobs=3),
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
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20}},
              "required": ["name"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": schema, "strict": True}}
    messages = [{"role": "user", "content": REPETITIVE}]
    a, b = (c.chat.completions.create(model="tiny", messages=messages, response_format=fmt,
                                      max_tokens=60, temperature=0) for c in (plain, spec))
    assert b.choices[0].message.content == a.choices[0].message.content
    json.loads(b.choices[0].message.content)
    chunks = list(spec.chat.completions.create(model="tiny", messages=messages, max_tokens=30,
                                               temperature=0, stream=True,
                                               stream_options={"include_usage": True}))
    want = plain.chat.completions.create(model="tiny", messages=messages, max_tokens=30, temperature=0)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        want.choices[0].message.content
    assert chunks[-1].usage == want.usage
    drafted, accepted = (x - y for x, y in zip(_spec_counts(tiny_servers[1]), before, strict=True))
    assert drafted > 0 and 0 < accepted < drafted


def _counts(base: str) -> tuple[float, float]:
    text = httpx.get(f"{base}/metrics").text
    return tuple(float(re.search(rf"^llorch_spec_{k}_tokens_total\{{[^}}]*\}} (\S+)$", text, re.M).group(1))
                 for k in ("draft", "accepted"))


def test_server_default_fp32_drafted_by_int4_equals_plain(default_fp32_dir, default_model_dir,
                                                          tmp_path):
    """The pairing README recommends: the default model's fp32 export drafted by its int4
    export, through the real server and the openai client: greedy chat answers (grounded and
    open-ended), logprobs, a stop and max_tokens landing mid-draft, n=2 and a json_schema
    answer equal plain fp32 decoding's, token for token."""
    from bench.spec_prompts import GROUNDED, OPEN_ENDED

    common = ("--max-batch", "2", "--threads", "2", "--max-length", "1024")
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                               "country": {"type": "string", "maxLength": 30}},
              "required": ["city", "country"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "place", "schema": schema, "strict": True}}
    chats = [msg for _, msg in GROUNDED[:3]] + [OPEN_ENDED[0][1]]
    outs = {}
    for name, extra in (("plain", ()), ("draft", ("--speculative", "draft", "--draft-model",
                                                  str(default_model_dir)))):
        with running_server(default_fp32_dir, *common, *extra, log_path=tmp_path / f"{name}.log") as base:
            client = _client(base)
            model = client.models.list().data[0].id

            def chat(content: str, client=client, model=model, **kw):
                return client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": content}], **kw)

            out = [chat(m, max_tokens=80, temperature=0).choices[0].message.content for m in chats]
            lp = chat(chats[0], max_tokens=13, temperature=0, logprobs=True, top_logprobs=2)
            out.append([(t.token, round(t.logprob, 2)) for t in lp.choices[0].logprobs.content])
            out.append(lp.choices[0].finish_reason)
            stop = chat(chats[1], max_tokens=60, temperature=0, stop=["\n", "."])
            out.append((stop.choices[0].message.content, stop.choices[0].finish_reason))
            two = chat(chats[2], max_tokens=11, temperature=0, n=2)
            out.append([c.message.content for c in two.choices])
            js = chat("Where is the Eiffel Tower? Answer in JSON.", max_tokens=60, temperature=0,
                      response_format=fmt)
            out.append(js.choices[0].message.content)
            outs[name] = out
            if name == "draft":
                drafted, accepted = _counts(base)
    assert outs["draft"] == outs["plain"]
    assert json.loads(outs["draft"][-1])["city"]
    assert accepted > 0.8 * drafted > 0  # int4 drafts for its own fp32 weights mostly hit
