"""A server many clients share, through the real server (uvicorn subprocess) with concurrent
`AsyncOpenAI` clients and raw `httpx`: continuous batching, the prefix cache, cancellation,
backpressure (429 / 503), graceful shutdown, `/metrics`, `/tokenize` and `/detokenize`.

The model is the tiny random Llama exported with a 4096-token context, so that a stream can
run for seconds (about 2 ms a token) while a test does something else.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from openai import AsyncOpenAI
from prometheus_client.parser import text_string_to_metric_families
from test_server_e2e import REPO, _free_port, prompt_ids, running_server, split_mode_args

from serve.tokenizer import Tokenizer

CONTEXT = 4096
MODEL = "tiny"
M = (("model", MODEL),)  # the engine metrics' labels
SYSTEM = ("You are the ship's computer of the research vessel Calypso. You answer questions about "
          "navigation, weather, tides and the crew's schedule in short, precise sentences, and you "
          "never invent readings you do not have. ") * 6


@pytest.fixture(scope="module")
def long_tiny_dir(tiny_hf_dir, tmp_path_factory) -> Path:
    from export.api import export_model

    out = tmp_path_factory.mktemp("tiny-4k") / "tiny-4k"
    export_model(tiny_hf_dir, out, precision="fp32", progress=False, max_length=CONTEXT)
    return out


@pytest.fixture(scope="module")
def tok(long_tiny_dir) -> Tokenizer:
    return Tokenizer.from_dir(long_tiny_dir)


def _serve(model_dir: Path, tmp_path_factory, name: str, *args: str):
    log = tmp_path_factory.mktemp(name) / "server.log"
    return running_server(model_dir, "--threads", "1", "--model-name", MODEL, *args, log_path=log), log


@pytest.fixture(scope="module")
def server(long_tiny_dir, tmp_path_factory) -> Iterator[tuple[str, Path]]:
    """8 slots, prefix cache on (the default)."""
    ctx, log = _serve(long_tiny_dir, tmp_path_factory, "batch-server", "--max-batch", "8")
    with ctx as base:
        yield base, log


@pytest.fixture(scope="module")
def nocache_server(long_tiny_dir, tmp_path_factory) -> Iterator[str]:
    ctx, _ = _serve(long_tiny_dir, tmp_path_factory, "nocache-server", "--max-batch", "8",
                    "--prefix-cache-size", "0")
    with ctx as base:
        yield base


def aclient(base: str) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)


def run(coro, timeout: float = 120):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def letters_bias(tok: Tokenizer) -> dict:
    """Greedy text that depends on small logit differences (random weights alone mostly
    repeat one token): sixteen letters get +100 and each one seen is divided by 10."""
    letters = {tok.encode(ch, add_special_tokens=False)[0] for ch in "abcdefghijklmnop"}
    return {"logit_bias": {str(t): 100 for t in sorted(letters)},
            "extra_body": {"ignore_eos": True, "repetition_penalty": 10.0}}


async def chat_text(client: AsyncOpenAI, messages, *, stream: bool, delay: float = 0.0, **kw):
    """(text, usage) of one greedy chat completion, streamed or not."""
    await asyncio.sleep(delay)
    if not stream:
        r = await client.chat.completions.create(model=MODEL, messages=messages, **kw)
        return r.choices[0].message.content, r.usage
    chunks = await client.chat.completions.create(model=MODEL, messages=messages, stream=True,
                                                  stream_options={"include_usage": True}, **kw)
    parts, usage = [], None
    async for chunk in chunks:
        usage = chunk.usage or usage
        parts += [c.delta.content or "" for c in chunk.choices]
    return "".join(parts), usage


def metrics(base: str) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics as {(name, sorted labels): value}."""
    text = httpx.get(f"{base}/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def wait_for(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def slots_in_use(base: str) -> int:
    return httpx.get(f"{base}/health").json()["slots_in_use"]


# ------------------------------------------------------------------ continuous batching


@pytest.mark.parametrize("which", ["server", "nocache_server"])
def test_batched_greedy_equals_solo(which, request, tok):
    """One request's greedy text is the same alone and alongside 7 others of mixed prompt
    and output lengths that join mid-decode (with and without the prefix cache)."""
    base = request.getfixturevalue(which)
    base = base[0] if isinstance(base, tuple) else base
    words = "north wind tide chart depth sonar heading crew watch".split()
    rng = random.Random(3)
    cases = [([{"role": "user", "content": " ".join(rng.choices(words, k=rng.choice([1, 5, 40, 150])))}],
              rng.choice([8, 24, 48])) for _ in range(8)]
    bias = letters_bias(tok)

    async def scenario():
        async with aclient(base) as client:
            alone = [await chat_text(client, m, stream=False, temperature=0, max_tokens=n, **bias)
                     for m, n in cases]
            together = await asyncio.gather(*(
                chat_text(client, m, stream=i % 2 == 0, delay=0.01 * i, temperature=0, max_tokens=n, **bias)
                for i, (m, n) in enumerate(cases)))
            return alone, together

    alone, together = run(scenario())
    for (messages, n), (a_text, a_usage), (t_text, t_usage) in zip(cases, alone, together, strict=True):
        assert t_text == a_text
        assert a_usage.completion_tokens == t_usage.completion_tokens == n
        assert a_usage.prompt_tokens == t_usage.prompt_tokens == len(prompt_ids(tok, messages))
    assert len({t for t, _ in alone}) > 1


def test_16_simultaneous_streams_of_mixed_lengths_and_parameters(server, tok):
    base, _ = server
    rng = random.Random(11)
    specs = []
    for i in range(16):
        messages = [{"role": "user", "content": f"request {i}: " + "tell me more " * rng.randint(1, 60)}]
        kw = dict(max_tokens=rng.choice([1, 6, 17, 40, 90]), n=rng.choice([1, 1, 2]), logprobs=True,
                  extra_body={"ignore_eos": True})
        if i % 3 == 0:
            kw.update(temperature=0)
        else:
            kw.update(temperature=0.9, top_p=0.95, seed=i)
        specs.append((messages, kw))

    async def stream(client, messages, kw):
        chunks = await client.chat.completions.create(model=MODEL, messages=messages, stream=True,
                                                      stream_options={"include_usage": True}, **kw)
        tokens, finish, usage = {}, {}, None
        async for chunk in chunks:
            usage = chunk.usage or usage
            for c in chunk.choices:
                tokens[c.index] = tokens.get(c.index, 0) + len(c.logprobs.content if c.logprobs else [])
                if c.finish_reason:
                    finish[c.index] = c.finish_reason
        return tokens, finish, usage

    async def scenario():
        async with aclient(base) as client:
            return await asyncio.gather(*(stream(client, m, kw) for m, kw in specs))

    for (messages, kw), (tokens, finish, usage) in zip(specs, run(scenario()), strict=True):
        n, max_tokens = kw["n"], kw["max_tokens"]
        assert tokens == {i: max_tokens for i in range(n)}
        assert finish == {i: "length" for i in range(n)}
        assert usage.completion_tokens == n * max_tokens
        assert usage.prompt_tokens == len(prompt_ids(tok, messages))
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    wait_for(lambda: slots_in_use(base) == 0, what="free slots")


def test_prompts_arriving_together_are_prefilled_in_batched_steps(long_tiny_dir, tmp_path_factory, tok):
    """8 chat prompts of one length arrive while a 2000-token prompt is being prefilled in
    256-token chunks (each chunk fills a step's budget, so the 8 wait for the last ones: a window
    of several steps): the steps after it prefill them several at a time (one batched call
    a step: their slots are empty), /metrics counts those steps, and each text is what the
    prompt gets alone."""
    ctx, _ = _serve(long_tiny_dir, tmp_path_factory, "prefill-batch-server", "--max-batch", "9",
                    "--prefix-cache-size", "0", "--prefill-chunk", "256")
    bias = letters_bias(tok)
    cases = [[{"role": "user", "content": f"request {i}: plot a course past the reef"}]
             for i in range(8)]
    assert len({len(prompt_ids(tok, m)) for m in cases}) == 1
    long_text = " ".join(["north wind tide chart depth sonar heading crew watch"] * 200)

    async def scenario(base):
        async with aclient(base) as client:
            alone = [await chat_text(client, m, stream=False, temperature=0, max_tokens=12, **bias)
                     for m in cases]
            before = metrics(base)
            long_task = asyncio.ensure_future(chat_text(
                client, [{"role": "user", "content": long_text}], stream=False, max_tokens=2))
            together = await asyncio.gather(*(
                chat_text(client, m, stream=i % 2 == 0, delay=0.005, temperature=0, max_tokens=12,
                          **bias) for i, m in enumerate(cases)))
            await long_task
            return alone, together, before, metrics(base)

    with ctx as base:
        alone, together, before, after = run(scenario(base))
    assert [t for t, _ in together] == [t for t, _ in alone]

    def moved(le: str) -> float:
        key = ("llorch_prefill_batch_rows_bucket", (("le", le), ("model", MODEL)))
        return after[key] - before.get(key, 0)

    # Prompts that arrived while the long one prefilled share the step after it; how many
    # that is depends on how fast uvicorn took the 8 requests in against the tiny model's
    # chunks (a quiet machine: 4 + 3 + 1 seen), so the bound is on batching, not on one step.
    steps = {le: moved(le) for le in ("1.0", "2.0", "4.0", "8.0", "+Inf")}
    assert moved("+Inf") - moved("2.0") >= 1, steps  # a step prefilled 3 or more prompts
    assert moved("+Inf") - moved("1.0") <= 4, steps  # the 8 in at most four batched steps


# ------------------------------------------------------------------------ prefix cache


def test_prefix_cache_same_system_prompt(server, nocache_server, tok):
    base, _ = server
    system = [{"role": "system", "content": SYSTEM}]
    q1 = system + [{"role": "user", "content": "When is high tide?"}]
    q2 = system + [{"role": "user", "content": "Who is on watch tonight?"}]
    kw = dict(temperature=0, max_tokens=24, **letters_bias(tok))
    ids1, ids2 = prompt_ids(tok, q1), prompt_ids(tok, q2)
    shared = next(i for i, (a, b) in enumerate(zip(ids1, ids2, strict=False)) if a != b)
    before = metrics(base)

    async def scenario():
        async with aclient(base) as client, aclient(nocache_server) as plain:
            first = await chat_text(client, q1, stream=False, **kw)
            again = await chat_text(client, q1, stream=True, **kw)
            other = await chat_text(client, q2, stream=False, **kw)
            reference = await chat_text(plain, q2, stream=False, **kw)
            return first, again, other, reference

    first, again, other, reference = run(scenario())
    assert again[0] == first[0]
    assert again[1].prompt_tokens_details.cached_tokens == first[1].prompt_tokens - 2
    assert other[0] == reference[0]
    assert other[1].prompt_tokens_details.cached_tokens == shared > 200
    assert reference[1].prompt_tokens_details.cached_tokens == 0
    after = metrics(base)
    hits = after[("llorch_prefix_cache_hits_total", M)] - before[("llorch_prefix_cache_hits_total", M)]
    assert hits >= again[1].prompt_tokens_details.cached_tokens + other[1].prompt_tokens_details.cached_tokens


# ------------------------------------------------------------------------ cancellation


def test_killed_streaming_clients_free_their_slots(server):
    base, _ = server
    before = metrics(base)
    rng = random.Random(5)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "go on"}], "stream": True,
            "max_tokens": 3000, "ignore_eos": True, "temperature": 0.7}

    async def killed_client(http: httpx.AsyncClient, chunks: int) -> None:
        async with http.stream("POST", f"{base}/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            seen = 0
            async for _ in r.aiter_raw():
                seen += 1
                if seen >= chunks:
                    break  # leaving the block closes the connection mid-stream

    async def scenario():
        async with httpx.AsyncClient(timeout=60) as http:
            clients = [killed_client(http, rng.randint(1, 40)) for _ in range(8)]
            # two more give up before the response even started
            early = [asyncio.wait_for(killed_client(http, 10**6), timeout=t) for t in (0.001, 0.05)]
            results = await asyncio.gather(*clients, *early, return_exceptions=True)
        assert all(r is None or isinstance(r, TimeoutError) for r in results), results

    run(scenario())
    wait_for(lambda: slots_in_use(base) == 0, timeout=5, what="slots back to zero")
    after = metrics(base)
    cancelled = ("llorch_engine_requests_total", (("model", MODEL), ("outcome", "cancelled")))
    assert after[cancelled] - before.get(cancelled, 0) >= 8
    assert after[("llorch_requests_running", M)] == 0 and after[("llorch_requests_waiting", M)] == 0
    with openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0) as client:
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=5, extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5
    assert slots_in_use(base) == 0


# ---------------------------------------------------------------------- backpressure


def test_full_queue_is_429_and_a_long_wait_is_503(long_tiny_dir, tmp_path):
    args = ("--threads", "1", "--model-name", MODEL, "--max-batch", "1", "--max-queue", "1",
            "--queue-timeout", "1")
    long_body = {"model": MODEL, "messages": [{"role": "user", "content": "a"}], "stream": True,
                 "max_tokens": 3500, "ignore_eos": True}
    short = dict(model=MODEL, messages=[{"role": "user", "content": "b"}], max_tokens=2)

    async def scenario(base: str):
        async with httpx.AsyncClient(timeout=60) as http, aclient(base) as client:
            async with http.stream("POST", f"{base}/v1/chat/completions", json=long_body) as running:
                stream = running.aiter_raw()
                await anext(stream)  # the slot is taken
                queued = asyncio.create_task(client.chat.completions.create(**short))
                while metrics(base)[("llorch_requests_waiting", M)] < 1:
                    await asyncio.sleep(0.01)
                with pytest.raises(openai.RateLimitError) as refused:
                    await client.chat.completions.create(**short)
                with pytest.raises(openai.InternalServerError) as timed_out:
                    await queued
            # leaving the stream frees the slot: the next request is served
            r = await client.chat.completions.create(**short)
            return refused.value, timed_out.value, r

    with running_server(long_tiny_dir, *args, log_path=tmp_path / "server.log") as base:
        refused, timed_out, r = run(scenario(base))
        assert refused.status_code == 429 and refused.response.headers["retry-after"] == "1"
        assert refused.body["code"] == "rate_limit_exceeded" and "queue" in refused.body["message"]
        assert timed_out.status_code == 503 and timed_out.body["code"] == "queue_timeout"
        assert r.usage.completion_tokens >= 1
        m = metrics(base)
        chat = "/v1/chat/completions"
        assert m[("llorch_requests_total", (("endpoint", chat), ("status", "429")))] == 1
        assert m[("llorch_requests_total", (("endpoint", chat), ("status", "503")))] == 1
        assert m[("llorch_engine_requests_total", (("model", MODEL), ("outcome", "queue_timeout")))] == 1


# ------------------------------------------------------------------ graceful shutdown


def _sse_events(raw: bytes) -> list:
    events = raw.split(b"\n\n")
    assert events[-1] == b"" and events[-2] == b"data: [DONE]", raw[-300:]
    return [json.loads(e[len(b"data: "):]) for e in events[:-2]]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_drains_then_exits_0(sig, long_tiny_dir, tmp_path):
    """Running streams finish or end with a final error event + [DONE]; new requests get
    503 meanwhile; the process exits 0."""
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "server.log"
    cmd = [sys.executable, "-m", "serve.main", str(long_tiny_dir), "--port", str(port), "--threads", "1",
           "--model-name", MODEL, "--max-batch", "2", "--drain-timeout", "2.5"]
    cmd += split_mode_args(*cmd[4:])
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: _ready(base, proc), timeout=60, what="server ready")
        body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream": True,
                "ignore_eos": True}
        # The short stream must finish inside the drain on a loaded machine (100 tokens at
        # 55 tok/s did not: cut at 92 of them), the long one must not on a quiet one (~1100
        # tok/s at most seen here: 2.5 s is ~2750 of its 4000 tokens).
        with httpx.Client(timeout=30) as http:
            with http.stream("POST", f"{base}/v1/chat/completions", json={**body, "max_tokens": 4000}) as long, \
                 http.stream("POST", f"{base}/v1/chat/completions", json={**body, "max_tokens": 30}) as short:
                long_chunks, short_chunks = long.iter_raw(), short.iter_raw()
                raw_long, raw_short = [next(long_chunks)], [next(short_chunks)]
                proc.send_signal(sig)
                wait_for(lambda: httpx.get(f"{base}/health").status_code == 503, timeout=5, what="draining")
                assert httpx.get(f"{base}/health").json() == {"status": "draining"}
                refused = httpx.post(f"{base}/v1/chat/completions", json={**body, "stream": False})
                raw_short += list(short_chunks)
                raw_long += list(long_chunks)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
        finished = _sse_events(b"".join(raw_short))
        assert finished[-1]["choices"][0]["finish_reason"] == "length"
        cut = _sse_events(b"".join(raw_long))
        assert cut[-1]["error"]["code"] == "shutting_down" and cut[-1]["error"]["type"] == "server_error"
        assert proc.wait(15) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert "draining" in text and "Traceback" not in text


def _start(model_dir: Path, log: Path, *args: str) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    cmd = [sys.executable, "-m", "serve.main", str(model_dir), "--port", str(port), "--threads", "1",
           "--model-name", MODEL, "--max-batch", "2", *args]
    cmd += split_mode_args(*cmd[4:])
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    wait_for(lambda: _ready(base, proc), timeout=60, what="server ready")
    return proc, base


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_second_signal_cuts_the_drain_short_and_exits_0(sig, long_tiny_dir, tmp_path):
    """A second signal ends running requests now (a final `shutting_down` error event + [DONE])
    instead of after --drain-timeout, and the server still stops in order: exit 0, no
    traceback. Sent while idle-draining (nothing to wait for) it is as quiet."""
    log = tmp_path / "server.log"
    proc, base = _start(long_tiny_dir, log, "--drain-timeout", "60")
    try:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream": True,
                "ignore_eos": True, "max_tokens": 4000}
        with httpx.Client(timeout=30) as http, http.stream("POST", f"{base}/v1/chat/completions", json=body) as r:
            chunks = r.iter_raw()
            raw = [next(chunks)]
            proc.send_signal(sig)
            wait_for(lambda: httpx.get(f"{base}/health").status_code == 503, timeout=5, what="draining")
            t0 = time.monotonic()
            proc.send_signal(sig)
            raw += list(chunks)
        assert time.monotonic() - t0 < 10  # not the 60 s drain
        assert _sse_events(b"".join(raw))[-1]["error"]["code"] == "shutting_down"
        assert proc.wait(15) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert "again: ending running requests now" in text and "Traceback" not in text, text

    proc, _ = _start(long_tiny_dir, log)  # idle: the first signal's drain is over at once
    proc.send_signal(sig)
    time.sleep(0.05)
    proc.send_signal(sig)
    assert proc.wait(15) == 0, log.read_text()
    assert "Traceback" not in log.read_text(), log.read_text()


def test_third_signal_exits_at_once_with_128_plus_the_signal(long_tiny_dir, tmp_path):
    log = tmp_path / "server.log"
    proc, base = _start(long_tiny_dir, log, "--drain-timeout", "60")
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream": True,
            "ignore_eos": True, "max_tokens": 4000}
    with httpx.Client(timeout=30) as http, http.stream("POST", f"{base}/v1/chat/completions", json=body) as r:
        chunks = r.iter_raw()  # kept: a dropped iterator closes the connection when
        next(chunks)  # collected, and the stream would end before the test wants it to
        for _ in range(3):
            proc.send_signal(signal.SIGINT)
            time.sleep(0.05)
        assert proc.wait(10) == 128 + signal.SIGINT, log.read_text()
    text = log.read_text()
    assert "a third time: " in text and "Traceback" not in text, text


def _ready(base: str, proc: subprocess.Popen) -> bool:
    assert proc.poll() is None, "server exited"
    try:
        return httpx.get(f"{base}/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


# ----------------------------------------------------------------- observability


def test_metrics_move_and_log_lines(server, tok):
    base, log = server
    before = metrics(base)
    messages = [{"role": "user", "content": "a secret prompt about the lighthouse"}]

    async def scenario():
        async with aclient(base) as client:
            return await asyncio.gather(
                chat_text(client, messages, stream=True, temperature=0, max_tokens=12,
                          extra_body={"ignore_eos": True}),
                chat_text(client, messages, stream=False, temperature=0, max_tokens=7,
                          extra_body={"ignore_eos": True}))

    (_, u1), (_, u2) = run(scenario())
    after = metrics(base)

    def moved(name, labels=M):
        return after[(name, labels)] - before.get((name, labels), 0)

    chat_ok = (("endpoint", "/v1/chat/completions"), ("status", "200"))
    assert moved("llorch_requests_total", chat_ok) == 2
    assert moved("llorch_prompt_tokens_total") == u1.prompt_tokens + u2.prompt_tokens
    assert moved("llorch_generation_tokens_total") == 19
    assert moved("llorch_time_to_first_token_seconds_count") == 2
    assert moved("llorch_inter_token_latency_seconds_count") == 11 + 6
    assert moved("llorch_request_tokens_per_second_count") == 2
    assert moved("llorch_engine_requests_total", (("model", MODEL), ("outcome", "ok"))) == 2
    assert after[("llorch_slots", M)] == 8 and after[("llorch_slots_in_use", M)] == 0
    assert after[("llorch_kv_cache_bytes", M)] == 8 * CONTEXT * 2 * 2 * 2 * 16 * 4
    assert 0 < after[("llorch_kv_cache_bytes_in_use", M)] <= after[("llorch_kv_cache_bytes", M)]
    assert after[("process_resident_memory_bytes", ())] > 10 * 2**20
    assert ("llorch_generation_tokens_per_second", M) in after
    lines = [line for line in log.read_text().splitlines() if "serve.engine" in line and " ok: " in line]
    assert any(f"{u1.prompt_tokens} prompt tokens" in line and "12 completion tokens" in line
               and "TTFT" in line and "tok/s" in line and "finish length" in line for line in lines)
    assert "secret prompt" not in log.read_text()  # no prompt text without --log-prompts


def test_tokenize_and_detokenize(server, tok):
    base, _ = server
    text = "Hello world, 1234 tokens!"
    r = httpx.post(f"{base}/tokenize", json={"model": MODEL, "prompt": text}).json()
    assert r == {"tokens": tok.encode(text), "count": len(tok.encode(text)), "max_model_len": CONTEXT}
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]
    r = httpx.post(f"{base}/tokenize", json={"messages": messages}).json()
    assert r["tokens"] == prompt_ids(tok, messages) and r["count"] == len(r["tokens"])
    bare = httpx.post(f"{base}/tokenize", json={"messages": messages, "add_generation_prompt": False}).json()
    assert bare["count"] < r["count"] and r["tokens"][: bare["count"]] == bare["tokens"]
    back = httpx.post(f"{base}/detokenize", json={"model": MODEL, "tokens": r["tokens"]}).json()
    text = tok.apply_chat_template(messages, add_generation_prompt=True)
    assert back == {"content": text, "prompt": text}  # llama-server's key and vLLM's
    for path, payload, param in [("/detokenize", {"tokens": [10**9]}, "tokens"),
                                 ("/detokenize", {"tokens": "abc"}, "tokens"),
                                 ("/tokenize", {"prompt": 5}, "prompt")]:
        err = httpx.post(f"{base}{path}", json=payload)
        assert err.status_code == 400 and err.json()["error"]["param"] == param
    assert httpx.post(f"{base}/tokenize", json={"model": "gpt-4", "prompt": "x"}).status_code == 404


# ------------------------------------------------------------------ the default model


@pytest.fixture(scope="module")
def default_server(default_model_dir, tmp_path_factory) -> Iterator[str]:
    ctx, _ = _serve(default_model_dir, tmp_path_factory, "default-batch-server", "--max-batch", "8",
                    "--max-length", "2048", "--batch-invariant")
    with ctx as base:
        yield base


@pytest.mark.slow
def test_default_model_batched_greedy_equals_solo(default_server):
    """With --batch-invariant every step runs on the export's row-invariant W8A8 graph;
    without it a lone decode runs on the int4 graph, whose one-row MatMulNBits rounds
    differently, and most of these texts drift apart after a few dozen tokens."""
    topics = ["bees", "the moon", "copper", "jazz", "owls", "bread", "chess", "rain"]
    cases = [([{"role": "user", "content": f"Write a short essay about {t}."}], n)
             for t, n in zip(topics, [40, 24, 40, 16, 40, 32, 40, 8], strict=True)]

    async def scenario():
        async with aclient(default_server) as client:
            alone = [await chat_text(client, m, stream=False, temperature=0, max_tokens=n)
                     for m, n in cases]
            together = await asyncio.gather(*(
                chat_text(client, m, stream=i % 2 == 1, delay=0.05 * i, temperature=0, max_tokens=n)
                for i, (m, n) in enumerate(cases)))
            return alone, together

    alone, together = run(scenario(), timeout=300)
    assert [t for t, _ in together] == [t for t, _ in alone]
    assert all(u.completion_tokens <= n for (_, n), (_, u) in zip(cases, together, strict=True))


@pytest.mark.slow
def test_default_model_prefix_cache_gives_identical_text(default_server, default_model_dir):
    """Real text: the second request with the same long system prompt reuses its KV and says
    exactly the same; a different question after it reuses the system prompt."""
    system = [{"role": "system", "content": SYSTEM}]
    q1 = system + [{"role": "user", "content": "What is the capital of France?"}]
    q2 = system + [{"role": "user", "content": "Name three tidal phenomena."}]
    kw = dict(temperature=0, max_tokens=32)

    async def scenario(base: str):
        async with aclient(base) as client:
            return [await chat_text(client, q, stream=stream, **kw)
                    for q, stream in ((q1, False), (q1, True), (q2, False))]

    (t1, u1), (t2, u2), (_, u3) = run(scenario(default_server), timeout=300)
    assert "Paris" in t1 and t2 == t1
    assert u2.prompt_tokens_details.cached_tokens == u1.prompt_tokens - 2
    smol = Tokenizer.from_dir(default_model_dir)
    ids1, ids2 = prompt_ids(smol, q1), prompt_ids(smol, q2)
    shared = next(i for i, (a, b) in enumerate(zip(ids1, ids2, strict=False)) if a != b)
    assert u3.prompt_tokens_details.cached_tokens == shared > 250
