"""The real server (uvicorn in a subprocess, free port) through the official `openai` client,
sync and async, and raw `httpx` streaming for the exact bytes a `curl -N` user sees.

`tiny_model_dir` (a tiny random Llama exported by our exporter) exercises every request
parameter; `default_model_dir` (SmolLM2-135M-Instruct int4) checks real answers.
Random weights give repetitive text, so the tests derive what to expect from the server's own
greedy / seeded output rather than from fixed strings.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from openai import AsyncOpenAI, OpenAI

from serve.model_dir import load_model_info
from serve.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
MSG = [{"role": "user", "content": "Tell me a story about a hello world."}]
API_KEY = "sk-e2e-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def split_mode_args(*args: str) -> list[str]:
    """``--api-workers N`` when $LLORCH_TEST_API_WORKERS=N (N > 1): every e2e server then runs
    split (serve.frontend), the CI proof that the split serves exactly what one process does.
    Not for several models (the split mode refuses them) or where the test sets the flag."""
    workers = os.environ.get("LLORCH_TEST_API_WORKERS", "")
    if not workers or int(workers) < 2 or "--api-workers" in args or "--models-dir" in args:
        return []
    if any(not a.startswith("-") and Path(a.partition("=")[0]).is_dir() for a in args):
        return []  # a second model directory
    return ["--api-workers", workers]


@contextlib.contextmanager
def running_server(model_dir: Path, *args: str, log_path: Path, timeout: float = 180) -> Iterator[str]:
    """`python -m serve.main` on a free port; yields the base URL once /health says 200."""
    port = _free_port()
    cmd = [sys.executable, "-m", "serve.main", str(model_dir), "--port", str(port), *args,
           *split_mode_args(*args)]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        saw_loading = False
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{log_path.read_text()}")
            try:
                status = httpx.get(f"{base}/health", timeout=2).status_code
                if status == 200:
                    break
                saw_loading = saw_loading or status == 503
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not ready after {timeout}s:\n{log_path.read_text()}")
            time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def tiny_server(tiny_model_dir, tmp_path_factory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("tiny-server") / "server.log"
    with running_server(tiny_model_dir, "--max-batch", "4", "--threads", "1", "--model-name", "tiny",
                        log_path=log) as base:
        yield base


@pytest.fixture(scope="module")
def tiny_tok(tiny_model_dir) -> Tokenizer:
    return Tokenizer.from_dir(tiny_model_dir)


@pytest.fixture(scope="module")
def tiny_ctx(tiny_model_dir) -> int:
    return load_model_info(tiny_model_dir).max_length


@pytest.fixture
def client(tiny_server) -> Iterator[OpenAI]:
    with OpenAI(base_url=f"{tiny_server}/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def chat(client: OpenAI, **kw):
    kw.setdefault("messages", MSG)
    return client.chat.completions.create(model="tiny", **kw)


def complete(client: OpenAI, **kw):
    kw.setdefault("prompt", "hello world")
    return client.completions.create(model="tiny", **kw)


@pytest.fixture(scope="module")
def varied(tiny_tok) -> dict:
    """Sampling settings that make a random model's text varied: random tied embeddings
    mostly repeat one token even at temperature 1. Sixteen letters get +100 and the
    repetition penalty divides the logit of each letter already seen by 10, so sampling
    walks over the letters (and whatever else then competes) instead of looping."""
    letters = {tiny_tok.encode(ch, add_special_tokens=False)[0] for ch in "abcdefghijklmnop"}
    return dict(temperature=1.0, logit_bias={str(t): 100 for t in sorted(letters)},
                extra_body={"ignore_eos": True, "repetition_penalty": 10.0})


def prompt_ids(tok: Tokenizer, messages) -> list[int]:
    return tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True), add_special_tokens=False)


def joined_chat_stream(stream) -> tuple[dict[int, str], dict[int, str], list]:
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    chunks = list(stream)
    for chunk in chunks:
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    return texts, finish, chunks


# ---------------------------------------------------------------------------- basics


def test_models(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_chat_max_tokens_length_and_exact_usage(client, tiny_tok):
    r = chat(client, max_tokens=7, temperature=0, extra_body={"ignore_eos": True})
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == "tiny"
    [choice] = r.choices
    assert choice.finish_reason == "length" and choice.message.role == "assistant"
    assert r.usage.prompt_tokens == len(prompt_ids(tiny_tok, MSG))
    assert r.usage.completion_tokens == 7
    assert r.usage.total_tokens == r.usage.prompt_tokens + 7
    assert r.usage.prompt_tokens_details.cached_tokens == 0
    r2 = chat(client, max_completion_tokens=3, temperature=0, extra_body={"ignore_eos": True})
    assert r2.usage.completion_tokens == 3 and r2.choices[0].finish_reason == "length"


def test_default_max_tokens_is_the_rest_of_the_context(client, tiny_tok, tiny_ctx):
    r = chat(client, temperature=0, extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length"
    assert r.usage.total_tokens == tiny_ctx


def test_context_overflow_is_a_400_with_numbers(client, tiny_tok, tiny_ctx):
    n_prompt = len(prompt_ids(tiny_tok, MSG))
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, max_tokens=tiny_ctx)
    err = info.value.body
    assert err["param"] == "messages" and err["type"] == "invalid_request_error"
    assert f"maximum context length is {tiny_ctx} tokens" in err["message"]
    assert f"you requested {n_prompt + tiny_ctx} tokens ({n_prompt} in the messages, {tiny_ctx} in the completion)" in err["message"]


def test_greedy_is_deterministic_and_streaming_matches(client):
    a = chat(client, temperature=0, max_tokens=24)
    b = chat(client, temperature=0, max_tokens=24)
    assert a.choices[0].message.content == b.choices[0].message.content
    texts, finish, chunks = joined_chat_stream(
        chat(client, temperature=0, max_tokens=24, stream=True))
    assert texts == {0: a.choices[0].message.content}
    assert finish == {0: a.choices[0].finish_reason}
    assert len({(c.id, c.created, c.model) for c in chunks}) == 1
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_seed_reproduces(client, varied):
    a = chat(client, max_tokens=24, seed=1234, **varied).choices[0].message.content
    b = chat(client, max_tokens=24, seed=1234, **varied).choices[0].message.content
    assert a == b
    texts, _, _ = joined_chat_stream(chat(client, stream=True, max_tokens=24, seed=1234, **varied))
    assert texts == {0: a}
    others = {chat(client, max_tokens=24, seed=s, **varied).choices[0].message.content for s in (1, 2, 3)}
    assert others - {a}  # and other seeds give other text


def test_n_choices(client, varied):
    r = chat(client, n=3, seed=5, max_tokens=12, **varied)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert all(c.finish_reason == "length" for c in r.choices)
    assert len({c.message.content for c in r.choices}) > 1  # each choice samples on its own
    assert r.usage.completion_tokens == 36  # summed over choices, as OpenAI does
    again = chat(client, n=3, seed=5, max_tokens=12, **varied)
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]
    # more choices than the server's 4 slots: the rest start once slots free up, same text
    many = chat(client, n=6, seed=5, max_tokens=12, **varied)
    assert [c.message.content for c in many.choices[:3]] == [c.message.content for c in r.choices]
    assert many.usage.completion_tokens == 72
    greedy = chat(client, temperature=0, max_tokens=5, extra_body={"ignore_eos": True}).choices[0].message.content
    many = chat(client, n=6, temperature=0, max_tokens=5, extra_body={"ignore_eos": True})
    assert [c.message.content for c in many.choices] == [greedy] * 6


def test_n_streaming(client, varied):
    kw = dict(n=2, seed=9, max_tokens=12, **varied)
    full = chat(client, **kw)
    texts, finish, chunks = joined_chat_stream(chat(client, stream=True, **kw))
    assert texts == {c.index: c.message.content for c in full.choices}
    assert finish == {0: "length", 1: "length"}
    assert {c.choices[0].index for c in chunks if c.choices[0].delta.role == "assistant"} == {0, 1}


def test_stop_strings(client, varied):
    kw = dict(seed=77, max_tokens=30, **varied)
    text = chat(client, **kw).choices[0].message.content
    stop = text[4:6]
    expected = text[: text.index(stop)]
    assert expected
    r = chat(client, stop=stop, **kw)
    assert r.choices[0].message.content == expected
    assert r.choices[0].finish_reason == "stop"
    r = chat(client, stop=["\u2603never", stop], **kw)
    assert r.choices[0].message.content == expected
    texts, finish, _ = joined_chat_stream(chat(client, stop=[stop], stream=True, **kw))
    assert texts == {0: expected} and finish == {0: "stop"}  # no partial stop text leaked


def test_logit_bias(client, tiny_tok):
    token = tiny_tok.encode("hello", add_special_tokens=False)[0]
    r = complete(client, temperature=0, max_tokens=5, logit_bias={str(token): 100},
                 extra_body={"ignore_eos": True})
    assert r.choices[0].text == tiny_tok.decode([token] * 5)
    first = complete(client, temperature=0, max_tokens=1).choices[0].text
    ids = tiny_tok.encode(first, add_special_tokens=False)
    if len(ids) == 1:
        banned = complete(client, temperature=0, max_tokens=1, logit_bias={str(ids[0]): -100})
        assert banned.choices[0].text != first


def test_penalties(client, tiny_tok):
    token = tiny_tok.encode("hello", add_special_tokens=False)[0]
    kw = dict(prompt="hello world", temperature=0, max_tokens=40, logit_bias={str(token): 20})
    same = tiny_tok.decode([token] * 40)
    assert complete(client, **kw, extra_body={"ignore_eos": True}).choices[0].text == same
    # frequency: -2 per earlier occurrence eats the +20 bias within 10 repeats
    freq = complete(client, frequency_penalty=2.0, **kw, extra_body={"ignore_eos": True}).choices[0].text
    assert freq.startswith(tiny_tok.decode([token] * 2)) and not freq.startswith(tiny_tok.decode([token] * 11))
    # repetition (HF semantics, the prompt counts): the biased logit is divided by 100
    rep = complete(client, **kw, extra_body={"ignore_eos": True, "repetition_penalty": 100.0})
    assert not rep.choices[0].text.startswith(tiny_tok.decode([token]))
    # presence: accepted and applied
    assert complete(client, presence_penalty=1.5, temperature=0, max_tokens=5).choices[0].finish_reason


def test_truncation_extras_reduce_to_greedy(client):
    greedy = chat(client, temperature=0, max_tokens=12, extra_body={"ignore_eos": True}).choices[0].message.content
    for extra in ({"top_k": 1}, {"min_p": 1.0}):
        r = chat(client, temperature=1.0, seed=3, max_tokens=12, extra_body={"ignore_eos": True, **extra})
        assert r.choices[0].message.content == greedy, extra
    r = chat(client, temperature=1.0, top_p=1e-9, seed=3, max_tokens=12, extra_body={"ignore_eos": True})
    assert r.choices[0].message.content == greedy


def test_chat_logprobs(client):
    r = chat(client, temperature=0, max_tokens=6, logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 6 == r.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and entry.bytes == list(entry.token.encode())
        assert len(entry.top_logprobs) == 3
        lps = [t.logprob for t in entry.top_logprobs]
        assert lps == sorted(lps, reverse=True)
        assert entry.top_logprobs[0].token == entry.token  # greedy picks the top token
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
    assert chat(client, max_tokens=2).choices[0].logprobs is None
    stream = chat(client, temperature=0, max_tokens=6, logprobs=True, top_logprobs=2, stream=True,
                  extra_body={"ignore_eos": True})
    streamed = [lp for chunk in stream for c in chunk.choices if c.logprobs for lp in c.logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content]


def _kept_tokens(tokens: list[str], cut: int) -> list[str]:
    """The tokens whose text starts before character `cut` of their joined text."""
    starts = [sum(map(len, tokens[:i])) for i in range(len(tokens))]
    return [t for t, start in zip(tokens, starts, strict=True) if start < cut]


def test_stop_strings_cut_the_logprobs_too(client, varied):
    """A stop string that spans tokens ends the text before it; the logprobs of the tokens it
    cut off (their text is not in the output) go with it, streamed or not, chat and legacy
    completions. They used to stay: `stop: [" in P"]` gave a message ending "palindrome"
    whose `logprobs.content` went on with ' in' and ' Python'."""
    kw = dict(seed=77, max_tokens=30, **varied)
    free = chat(client, logprobs=True, **kw).choices[0]
    tokens = [e.token for e in free.logprobs.content]
    text = free.message.content
    assert "".join(tokens) == text and len(tokens) >= 8
    k = next(i for i in range(3, len(tokens) - 1) if tokens[i] and tokens[i + 1])
    for stop in (tokens[k] + tokens[k + 1], tokens[k][-1] + tokens[k + 1]):  # at / inside a token
        cut = text.index(stop)
        want = _kept_tokens(tokens, cut)
        r = chat(client, logprobs=True, stop=[stop], **kw).choices[0]
        assert (r.message.content, r.finish_reason) == (text[:cut], "stop")
        got = r.logprobs.content
        assert [e.token for e in got] == want
        assert [e.logprob for e in got] == [e.logprob for e in free.logprobs.content[:len(want)]]
        texts, finish, chunks = joined_chat_stream(chat(client, logprobs=True, stop=[stop], stream=True, **kw))
        streamed = [e.token for ch in chunks for c in ch.choices if c.logprobs for e in c.logprobs.content]
        assert (texts, finish, streamed) == ({0: text[:cut]}, {0: "stop"}, want)
        # legacy completions: `tokens` / `text_offset` stop where the text does
        p = dict(prompt="hello world", logprobs=1, **kw)
        whole = complete(client, **p).choices[0]
        ctoks = whole.logprobs.tokens
        ctext = whole.text
        assert "".join(ctoks) == ctext
        cstop = ctoks[k][-1] + ctoks[k + 1]
        ccut = ctext.index(cstop)
        for c in (complete(client, stop=[cstop], **p).choices[0],):
            assert c.text == ctext[:ccut] and c.finish_reason == "stop"
            assert c.logprobs.tokens == _kept_tokens(ctoks, ccut)
            assert c.logprobs.text_offset == whole.logprobs.text_offset[:len(c.logprobs.tokens)]
        streamed = [t for ch in complete(client, stop=[cstop], stream=True, **p)
                    for c in ch.choices if c.logprobs for t in c.logprobs.tokens]
        assert streamed == _kept_tokens(ctoks, ccut)


def test_completions_logprobs_and_echo(client, tiny_tok):
    r = complete(client, temperature=0, max_tokens=4, logprobs=2, extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    assert all(len(t) <= 2 for t in lp.top_logprobs) and lp.text_offset == sorted(lp.text_offset)
    prompt = "hello world"
    e = complete(client, prompt=prompt, temperature=0, max_tokens=4, echo=True, logprobs=1,
                 extra_body={"ignore_eos": True})
    [choice] = e.choices
    assert choice.text == prompt + r.choices[0].text
    n_prompt = len(tiny_tok.encode(prompt))
    assert e.usage.prompt_tokens == n_prompt
    assert len(choice.logprobs.tokens) == n_prompt + 4
    assert choice.logprobs.token_logprobs[0] is None
    assert all(x is not None and x <= 0 for x in choice.logprobs.token_logprobs[1:])
    assert choice.logprobs.text_offset[0] == 0
    assert choice.logprobs.token_logprobs[n_prompt:] == pytest.approx(lp.token_logprobs, abs=1e-4)
    plain = complete(client, prompt=prompt, max_tokens=2, echo=True, extra_body={"ignore_eos": True})
    assert plain.choices[0].text.startswith(prompt) and plain.choices[0].logprobs is None


def test_completion_prompt_forms(client, tiny_tok):
    kw = dict(temperature=0, max_tokens=5, extra_body={"ignore_eos": True})
    a = complete(client, prompt="hello world", **kw).choices[0].text
    ids = tiny_tok.encode("hello world")
    assert complete(client, prompt=ids, **kw).choices[0].text == a
    b = complete(client, prompt="the world", **kw).choices[0].text
    r = complete(client, prompt=["hello world", "the world"], n=2, **kw)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert [(c.index, c.text) for c in r.choices] == [(0, a), (1, a), (2, b), (3, b)]
    assert r.usage.prompt_tokens == len(ids) + len(tiny_tok.encode("the world"))
    assert r.usage.completion_tokens == 20
    r = complete(client, prompt=[ids, tiny_tok.encode("the world")], **kw)
    assert [c.text for c in r.choices] == [a, b]
    with pytest.raises(openai.BadRequestError) as info:
        complete(client, prompt="x", suffix="y")
    assert info.value.body["param"] == "suffix"


def test_completions_streaming_matches(client):
    kw = dict(prompt=["hello world", "the world"], temperature=0, max_tokens=8, n=2)
    full = complete(client, **kw)
    texts: dict[int, str] = {}
    chunks = list(complete(client, stream=True, stream_options={"include_usage": True}, **kw))
    for chunk in chunks[:-1]:
        assert chunk.object == "text_completion" and chunk.usage is None
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
    assert texts == {c.index: c.text for c in full.choices}
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == full.usage.model_dump()


def test_include_usage(client):
    chunks = list(chat(client, temperature=0, max_tokens=5, stream=True,
                       stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 5
    full = chat(client, temperature=0, max_tokens=5, extra_body={"ignore_eos": True})
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_messages_forms_and_unknown_fields(client):
    parts = [{"role": "system", "content": "Hi"},
             {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
             {"role": "assistant", "content": "c"},
             {"role": "developer", "content": "d"}]
    r = chat(client, messages=parts, max_tokens=3, user="someone",
             extra_body={"frobnicate": {"x": 1}, "response_format": {"type": "text"}})
    assert r.choices[0].message.content is not None
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    assert info.value.body["param"] == "messages.[0].content"


@pytest.mark.parametrize(
    "kw, param",
    [
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"n": 0}, "n"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"logit_bias": {"1": 500}}, "logit_bias"),
        ({"logit_bias": {"99999999": 1}}, "logit_bias"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"messages": []}, "messages"),
    ],
)
def test_bad_requests(client, kw, param):
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, **kw)
    assert info.value.status_code == 400
    assert info.value.body["param"] == param and info.value.body["type"] == "invalid_request_error"


def test_error_statuses(tiny_server, client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4o", messages=MSG)
    assert info.value.body["code"] == "model_not_found"
    json_ct = {"content-type": "application/json"}
    r = httpx.post(f"{tiny_server}/v1/chat/completions", content=b"{oops", headers=json_ct)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(f"{tiny_server}/v1/chat/completions", content=b"{oops")  # no Content-Type
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
    r = httpx.get(f"{tiny_server}/v1/chat/completions")
    assert r.status_code == 405 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.get(f"{tiny_server}/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(f"{tiny_server}/v1/completions", content=b'{"prompt": "' + b"x" * (9 << 20) + b'"}',
                   headers=json_ct)
    assert r.status_code == 413 and "error" in r.json()


def test_async_client_and_simultaneous_requests(tiny_server):
    asyncio.run(asyncio.wait_for(_async_scenario(tiny_server), 120))


async def _async_scenario(tiny_server: str) -> None:
    async with AsyncOpenAI(base_url=f"{tiny_server}/v1", api_key="unused", max_retries=0) as aclient:
        kw = dict(model="tiny", temperature=0, max_tokens=12, extra_body={"ignore_eos": True})
        m1 = [{"role": "user", "content": "first question"}]
        m2 = [{"role": "user", "content": "a different, longer second question"}]
        solo1 = (await aclient.chat.completions.create(messages=m1, **kw)).choices[0].message.content
        solo2 = (await aclient.chat.completions.create(messages=m2, **kw)).choices[0].message.content

        async def streamed(messages) -> str:
            stream = await aclient.chat.completions.create(messages=messages, stream=True, **kw)
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

        together = await asyncio.gather(
            aclient.chat.completions.create(messages=m1, **kw), streamed(m2),
            aclient.completions.create(prompt="hello world", **kw), streamed(m1))
        assert together[0].choices[0].message.content == solo1
        assert together[1] == solo2 and together[3] == solo1
        assert together[2].usage.completion_tokens == 12


def test_raw_sse_bytes(tiny_server):
    body = {"model": "tiny", "messages": MSG, "max_tokens": 6, "temperature": 0, "stream": True,
            "ignore_eos": True}
    pieces = []
    with httpx.stream("POST", f"{tiny_server}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"] == "text/event-stream; charset=utf-8"
        assert r.headers["cache-control"] == "no-cache"
        for piece in r.iter_raw():
            pieces.append(piece)
    raw = b"".join(pieces)
    assert len(pieces) > 1  # written as produced, not buffered into one body
    events = raw.split(b"\n\n")
    assert events[-1] == b"" and events[-2] == b"data: [DONE]"
    payloads = []
    for event in events[:-2]:
        assert re.fullmatch(rb"data: \{[^\n]*\}", event), event
        payloads.append(json.loads(event[len(b"data: "):]))
    assert payloads[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert payloads[-1]["choices"][0]["delta"] == {} and payloads[-1]["choices"][0]["finish_reason"] == "length"
    assert all("usage" not in p for p in payloads)
    # completions: the same framing
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{tiny_server}/v1/completions", json=body, timeout=60) as r:
        raw = r.read()
    assert raw.endswith(b"data: [DONE]\n\n")
    assert all(json.loads(e[6:])["object"] == "text_completion" for e in raw.split(b"\n\n")[:-2])


def _slots_in_use(base: str) -> int:
    return httpx.get(f"{base}/health").json()["slots_in_use"]


def _wait_for_free_slots(base: str) -> None:
    deadline = time.monotonic() + 30
    while _slots_in_use(base):
        assert time.monotonic() < deadline, "slots were not given back"
        time.sleep(0.05)


def test_client_disconnects_free_their_slots(tiny_server, client):
    body = {"model": "tiny", "messages": MSG, "stream": True, "ignore_eos": True, "n": 4}
    with httpx.stream("POST", f"{tiny_server}/v1/chat/completions", json=body, timeout=60) as r:
        chunks = r.iter_raw()  # kept: a dropped iterator closes the connection when
        next(chunks)  # collected, and the stream would end before the test wants it to
    _wait_for_free_slots(tiny_server)
    with contextlib.suppress(httpx.ReadTimeout):  # a non-streaming client that gives up
        httpx.post(f"{tiny_server}/v1/chat/completions", timeout=0.05,
                   json={"model": "tiny", "messages": MSG, "ignore_eos": True, "n": 4})
    _wait_for_free_slots(tiny_server)
    # the server still answers, with every slot usable
    r = chat(client, n=4, temperature=0, max_tokens=3, extra_body={"ignore_eos": True})
    assert len(r.choices) == 4 and r.usage.completion_tokens == 12
    assert _slots_in_use(tiny_server) == 0


# ------------------------------------------------------------------ startup and auth


def test_api_key(tiny_model_dir, tmp_path):
    with running_server(tiny_model_dir, "--api-key", API_KEY, "--threads", "1",
                        log_path=tmp_path / "server.log") as base:
        assert httpx.get(f"{base}/health").status_code == 200
        with OpenAI(base_url=f"{base}/v1", api_key="sk-wrong", max_retries=0) as bad:
            with pytest.raises(openai.AuthenticationError) as info:
                bad.models.list()
            assert info.value.body["type"] == "invalid_request_error"  # OpenAI's type for a 401
            assert info.value.body["code"] == "invalid_api_key"
            with pytest.raises(openai.AuthenticationError):
                bad.chat.completions.create(model=tiny_model_dir.name, messages=MSG)
        r = httpx.post(f"{base}/v1/chat/completions", json={"messages": MSG})
        assert r.status_code == 401
        with OpenAI(base_url=f"{base}/v1", api_key=API_KEY, max_retries=0) as good:
            [model] = good.models.list().data
            r = good.chat.completions.create(model=model.id, messages=MSG, max_tokens=2)
            assert r.choices[0].finish_reason in ("length", "stop")


def test_unavailable_provider_is_a_startup_error(tiny_model_dir):
    import onnxruntime

    missing = next(p for p in ("coreml", "cuda") if {"coreml": "CoreMLExecutionProvider",
                   "cuda": "CUDAExecutionProvider"}[p] not in onnxruntime.get_available_providers())
    proc = subprocess.run([sys.executable, "-m", "serve.main", str(tiny_model_dir), "--provider", missing,
                           "--port", str(_free_port())], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert missing in proc.stderr and "CPUExecutionProvider" in proc.stderr


# --------------------------------------------------------------------- default model


@pytest.fixture(scope="module")
def default_server(default_model_dir, tmp_path_factory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("default-server") / "server.log"
    with running_server(default_model_dir, "--max-batch", "2", log_path=log) as base:
        yield base


@pytest.fixture
def default_client(default_server) -> Iterator[OpenAI]:
    with OpenAI(base_url=f"{default_server}/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.mark.slow
def test_default_model_knows_paris(default_client, default_model_dir):
    model = default_client.models.list().data[0].id
    r = default_client.chat.completions.create(model=model, messages=FRANCE, temperature=0, max_tokens=40)
    answer = r.choices[0].message.content
    assert "Paris" in answer, answer
    texts, finish, _ = joined_chat_stream(default_client.chat.completions.create(
        model=model, messages=FRANCE, temperature=0, max_tokens=40, stream=True))
    assert texts == {0: answer} and finish == {0: r.choices[0].finish_reason}

    tok = Tokenizer.from_dir(default_model_dir)
    prompt = tok.apply_chat_template(FRANCE, add_generation_prompt=True)
    c = default_client.completions.create(model=model, prompt=prompt, temperature=0, max_tokens=40)
    assert "Paris" in c.choices[0].text, c.choices[0].text
    assert c.usage.prompt_tokens == r.usage.prompt_tokens
    assert c.choices[0].text == answer


@pytest.mark.slow
def test_default_model_max_tokens(default_client):
    model = default_client.models.list().data[0].id
    r = default_client.chat.completions.create(model=model, messages=FRANCE, temperature=0, max_tokens=5)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 5


@pytest.mark.slow
def test_default_model_streams_whole_characters(default_client):
    model = default_client.models.list().data[0].id
    messages = [{"role": "user", "content": "Repeat exactly: 🌊🐳 日本語のテキスト Ünïcödé"}]
    full = default_client.chat.completions.create(model=model, messages=messages, temperature=0,
                                                  max_tokens=40).choices[0].message.content
    pieces = [c.choices[0].delta.content or "" for c in default_client.chat.completions.create(
        model=model, messages=messages, temperature=0, max_tokens=40, stream=True) if c.choices]
    assert "".join(pieces) == full
    assert any(ord(ch) > 0xFFFF or 0x3040 <= ord(ch) <= 0x9FFF for ch in full), full  # emoji or CJK
    if "\ufffd" not in full:
        assert not any("\ufffd" in p for p in pieces)


@pytest.mark.slow
def test_default_model_with_w8a8(default_model_dir, tmp_path):
    """`llorch serve --w8a8`: the prompt prefilled on the W8A8 graph and n=2 choices decoded
    together on it still answer the question; the server says which graph it runs."""
    log = tmp_path / "server.log"
    with running_server(default_model_dir, "--max-batch", "2", "--w8a8", log_path=log) as base, \
            OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120) as client:
        model = client.models.list().data[0].id
        r = client.chat.completions.create(model=model, messages=FRANCE, temperature=0,
                                           max_tokens=24, n=2)
        answers = [c.message.content for c in r.choices]
        assert len(answers) == 2 and all("Paris" in a for a in answers), answers
        assert answers[0] == answers[1]  # rows of one batch never depend on each other
    assert "W8A8 graph model_w8a8.onnx" in log.read_text()


def test_stop_token_ids_outside_the_vocabulary_are_a_400(client, tiny_tok):
    """vLLM's `stop_token_ids` through the real server: ids are checked against the model's
    vocabulary like `logit_bias`'s; a valid list is taken (its effect: tests/test_engine.py)."""
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, max_tokens=2, extra_body={"stop_token_ids": [10**9]})
    assert info.value.body["param"] == "stop_token_ids"
    r = chat(client, max_tokens=3, extra_body={"stop_token_ids": [0, 1]})
    assert r.choices[0].finish_reason in ("stop", "length")


# ------------------------------------------------- vLLM's output-changing extensions


def _model(client: OpenAI) -> str:
    return client.models.list().data[0].id


def _streamed_chat(client: OpenAI, **kw) -> tuple[dict[int, str], dict[int, str]]:
    texts, finish, _ = joined_chat_stream(client.chat.completions.create(stream=True, **kw))
    return texts, finish


@pytest.mark.slow
def test_default_model_min_tokens_writes_past_eos_and_early_stop_strings(default_client, default_model_dir):
    """vLLM's `min_tokens`: the greedy answer ends (EOS) after L tokens; with min_tokens L + 8
    EOS is kept out until then, so the same answer goes on past its end, streamed or not, for
    every choice, on both routes; a stop string that completes before min_tokens ends
    nothing."""
    model = _model(default_client)
    base = dict(model=model, messages=FRANCE, temperature=0, max_tokens=60)
    plain = default_client.chat.completions.create(**base)
    answer, n_plain = plain.choices[0].message.content, plain.usage.completion_tokens
    assert plain.choices[0].finish_reason == "stop" and "Paris" in answer and n_plain < 20
    least = n_plain + 8
    r = default_client.chat.completions.create(**base, n=2, logprobs=True,
                                               extra_body={"min_tokens": least})
    for c in r.choices:
        assert c.message.content.startswith(answer) and len(c.message.content) > len(answer) + 10
        tokens = [t.token for t in c.logprobs.content]
        assert "<|im_end|>" not in tokens[:least] and len(tokens) >= least
    assert r.usage.completion_tokens >= 2 * least
    texts, finish = _streamed_chat(default_client, **base, n=2, extra_body={"min_tokens": least})
    assert texts == {c.index: c.message.content for c in r.choices}
    assert finish == {c.index: c.finish_reason for c in r.choices}

    # "Paris" completes at token < least: with min_tokens it ends nothing (vLLM's detokenizer
    # checks stop strings only in text past min_tokens)
    cut = default_client.chat.completions.create(**base, stop=["Paris"])
    assert cut.choices[0].message.content == answer[: answer.index("Paris")]
    kept = default_client.chat.completions.create(**base, stop=["Paris"], extra_body={"min_tokens": least})
    assert kept.choices[0].message.content.startswith(answer)
    # a stop token id is kept out until min_tokens: the answer cannot say " Paris" where it did
    tok = Tokenizer.from_dir(default_model_dir)
    (paris,) = tok.encode(" Paris", add_special_tokens=False)
    r = default_client.chat.completions.create(**base, extra_body={"min_tokens": least,
                                                                   "stop_token_ids": [paris]})
    head = answer[: answer.index(" Paris")]
    assert r.choices[0].message.content.startswith(head)
    assert not r.choices[0].message.content.startswith(head + " Paris")

    prompt = tok.apply_chat_template(FRANCE, add_generation_prompt=True)
    c = default_client.completions.create(model=model, prompt=prompt, temperature=0, max_tokens=60,
                                          extra_body={"min_tokens": least})
    assert c.choices[0].text.startswith(answer) and len(c.choices[0].text) > len(answer) + 10
    assert c.usage.completion_tokens >= least


@pytest.mark.slow
def test_default_model_min_tokens_yields_to_a_complete_grammar(default_client):
    """A constrained choice whose grammar is complete still ends (the grammar wins, as in
    vLLM): min_tokens only keeps EOS out where the grammar could go on."""
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
              "required": ["city"], "additionalProperties": False}
    base = dict(model=_model(default_client), messages=FRANCE, temperature=0, max_tokens=60,
                response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}})
    plain = default_client.chat.completions.create(**base)
    r = default_client.chat.completions.create(**base, extra_body={"min_tokens": 50})
    assert json.loads(r.choices[0].message.content) == json.loads(plain.choices[0].message.content)
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens < 50


@pytest.mark.slow
def test_default_model_include_stop_str_in_output(default_client, default_model_dir):
    """vLLM's `include_stop_str_in_output`: the stop string that ended the output is part of
    it, whole when it ends inside a token (" Paris" cut after "Par"), streamed and not, chat
    and completions; the tokens (logprobs) are those that produced the text."""
    model = _model(default_client)
    base = dict(model=model, messages=FRANCE, temperature=0, max_tokens=40, n=2)
    answer = default_client.chat.completions.create(**{**base, "n": 1}).choices[0].message.content
    for stop in ("Paris", "Par"):
        head = answer[: answer.index(stop)]
        without = default_client.chat.completions.create(**base, stop=[stop])
        assert [c.message.content for c in without.choices] == [head, head]
        r = default_client.chat.completions.create(**base, stop=[stop], logprobs=True,
                                                   extra_body={"include_stop_str_in_output": True})
        for c in r.choices:
            assert c.message.content == head + stop and c.finish_reason == "stop"
            joined = b"".join(bytes(t.bytes) for t in c.logprobs.content).decode()
            assert joined.startswith(c.message.content) and not joined.startswith(head + stop + ".")
        texts, finish = _streamed_chat(default_client, **base, stop=[stop],
                                       extra_body={"include_stop_str_in_output": True})
        assert texts == {0: head + stop, 1: head + stop} and finish == {0: "stop", 1: "stop"}

    # a stop token id (vLLM): its text is left out, unless include_stop_str_in_output
    tok = Tokenizer.from_dir(default_model_dir)
    (paris,) = tok.encode(" Paris", add_special_tokens=False)
    at_id = dict(model=model, messages=FRANCE, temperature=0, max_tokens=40)
    r = default_client.chat.completions.create(**at_id, extra_body={"stop_token_ids": [paris]})
    assert r.choices[0].message.content == answer[: answer.index(" Paris")]
    r = default_client.chat.completions.create(
        **at_id, extra_body={"stop_token_ids": [paris], "include_stop_str_in_output": True})
    assert r.choices[0].message.content == answer[: answer.index(" Paris")] + " Paris"
    assert r.choices[0].finish_reason == "stop"

    prompt = tok.apply_chat_template(FRANCE, add_generation_prompt=True)
    kw = dict(model=model, prompt=prompt, temperature=0, max_tokens=40, stop=["Par"],
              extra_body={"include_stop_str_in_output": True})
    c = default_client.completions.create(**kw)
    assert c.choices[0].text == answer[: answer.index("Par") + 3]
    streamed = "".join(ch.choices[0].text for ch in default_client.completions.create(**kw, stream=True)
                       if ch.choices)
    assert streamed == c.choices[0].text


@pytest.mark.slow
def test_default_model_allowed_token_ids(default_client, default_model_dir):
    """vLLM's `allowed_token_ids`: every token sampled is one of the list (checked through
    the logprobs' token bytes), greedy and sampled, streamed and not, chat and completions;
    EOS is not implicitly allowed, so without it the choice runs to max_tokens."""
    tok = Tokenizer.from_dir(default_model_dir)
    words = (" Paris", " London", " yes", " no", ".")
    allowed = [tok.encode(w, add_special_tokens=False) for w in words]
    assert all(len(ids) == 1 for ids in allowed), allowed
    allowed = [ids[0] for ids in allowed]
    allowed_bytes = {tok.token_bytes(t) for t in allowed}
    model = _model(default_client)
    base = dict(model=model, messages=FRANCE, max_tokens=8, logprobs=True)
    greedy = default_client.chat.completions.create(**base, temperature=0,
                                                    extra_body={"allowed_token_ids": allowed})
    sampled = default_client.chat.completions.create(**base, temperature=1.0, seed=3, n=2,
                                                     extra_body={"allowed_token_ids": allowed})
    for c in [*greedy.choices, *sampled.choices]:
        assert {bytes(t.bytes) for t in c.logprobs.content} <= allowed_bytes, c.message.content
        assert c.finish_reason == "length" and len(c.logprobs.content) == 8  # no EOS allowed
    assert greedy.choices[0].message.content.startswith(" Paris")
    texts, _ = _streamed_chat(default_client, **{**base, "logprobs": False}, temperature=1.0, seed=3, n=2,
                              extra_body={"allowed_token_ids": allowed})
    assert texts == {c.index: c.message.content for c in sampled.choices}

    with_eos = default_client.chat.completions.create(
        **{**base, "max_tokens": 30}, temperature=0, extra_body={"allowed_token_ids": [*allowed, 2]})
    assert {bytes(t.bytes) for t in with_eos.choices[0].logprobs.content} <= allowed_bytes | {b"<|im_end|>"}

    prompt = tok.apply_chat_template(FRANCE, add_generation_prompt=True)
    c = default_client.completions.create(model=model, prompt=prompt, temperature=0, max_tokens=8,
                                          logprobs=1, extra_body={"allowed_token_ids": allowed})
    assert c.choices[0].text == greedy.choices[0].message.content
    assert set(c.choices[0].logprobs.tokens) <= set(words)


@pytest.mark.slow
def test_default_model_skip_special_tokens_false(default_client):
    """`skip_special_tokens: false`: special tokens' text is part of the output (vLLM). The
    EOS that ends the choice is not (its text only comes with include_stop_str_in_output)."""
    base = dict(model=_model(default_client), messages=FRANCE, temperature=0, max_tokens=12)
    plain = default_client.chat.completions.create(**base, extra_body={"ignore_eos": True})
    raw = default_client.chat.completions.create(**base, extra_body={"ignore_eos": True,
                                                                     "skip_special_tokens": False})
    text = raw.choices[0].message.content
    assert "<|im_end|>" in text and "<|im_start|>" not in plain.choices[0].message.content
    assert re.sub(r"<\|im_(start|end)\|>", "", text) == plain.choices[0].message.content
    texts, _ = _streamed_chat(default_client, **base, extra_body={"ignore_eos": True,
                                                                  "skip_special_tokens": False})
    assert texts == {0: text}
    ended = default_client.chat.completions.create(**{**base, "max_tokens": 40},
                                                   extra_body={"skip_special_tokens": False})
    assert ended.choices[0].finish_reason == "stop" and "<|im_end|>" not in ended.choices[0].message.content
    shown = default_client.chat.completions.create(
        **{**base, "max_tokens": 40},
        extra_body={"skip_special_tokens": False, "include_stop_str_in_output": True})
    assert shown.choices[0].message.content == ended.choices[0].message.content + "<|im_end|>"


@pytest.mark.parametrize(("extra", "param"), [
    ({"min_tokens": 5}, "min_tokens"),  # more than max_tokens=2
    ({"min_tokens": -1}, "min_tokens"),
    ({"allowed_token_ids": []}, "allowed_token_ids"),
    ({"allowed_token_ids": [1, 10**9]}, "allowed_token_ids"),
    ({"allowed_token_ids": [-3]}, "allowed_token_ids"),
    # every allowed id ends the choice and min_tokens forbids that: nothing could be sampled
    # (the sampler fell back to the unmasked logits, ids outside the list)
    ({"allowed_token_ids": [5, 6], "stop_token_ids": [6, 5], "min_tokens": 1}, "allowed_token_ids"),
])
def test_bad_vllm_extension_values_are_a_400_naming_them(client, extra, param):
    for create in (chat, complete):
        with pytest.raises(openai.BadRequestError) as info:
            create(client, max_tokens=2, extra_body=extra)
        assert info.value.body["param"].startswith(param), info.value.body


def test_min_tokens_past_the_context_is_a_400_without_max_tokens(client):
    """Without max_tokens a min_tokens the context cannot hold ran until the context was full
    and ended "length" short of it (vLLM: 400, its max_tokens defaulting to the room left)."""
    for create in (chat, complete):
        with pytest.raises(openai.BadRequestError) as info:
            create(client, extra_body={"min_tokens": 10**6})
        assert info.value.body["param"] == "min_tokens", info.value.body
        assert info.value.body["code"] == "context_length_exceeded", info.value.body
