"""Routes, error shapes and SSE framing, against a fake engine (no model, no ORT).

Every protocol feature also has a test through the real server in test_server_e2e.py.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from serve.app import create_app
from serve.chat_template import ChatTemplateError
from serve.events import ChoiceOutput, Event, GenerationRequest, TokenLogprob, Usage
from serve.options import ServeOptions

MODEL = "fake-model"
MSG = [{"role": "user", "content": "hi"}]


class FakeTokenizer:
    """One token per character (ids = code points < 256); 0 is EOS."""

    eos_ids = frozenset({0})
    chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) % 256 for c in text]

    def decode(self, ids, *, skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids)

    def token_text(self, token_id: int) -> str:
        return chr(token_id)

    def apply_chat_template(self, messages, *, add_generation_prompt: bool = True, tools=None) -> str:
        if any(m["content"] == "RAISE" for m in messages):
            raise ChatTemplateError("Only user and assistant roles are supported!")
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"


class FakeStream:
    def __init__(self, events: list[Event], delay: float = 0.0) -> None:
        self._events = iter(events)
        self.delay = delay
        self.cancelled = False

    def __aiter__(self):
        return self

    async def __anext__(self) -> Event:
        await asyncio.sleep(self.delay)
        if self.cancelled:
            raise StopAsyncIteration
        try:
            return next(self._events)
        except StopIteration:
            raise StopAsyncIteration from None

    def cancel(self) -> None:
        self.cancelled = True


class FakeEngine:
    """Answers every choice with `reply`, one character per event (as the real engine steps)."""

    max_length = 64
    vocab_size = 256

    def __init__(self, reply: str = "Hello world", *, fail_after: int | None = None,
                 fail_submit: bool = False, delay: float = 0.0) -> None:
        self.tokenizer = FakeTokenizer()
        self.reply = reply
        self.delay = delay
        self.streams: list[FakeStream] = []
        self.fail_after = fail_after
        self.fail_submit = fail_submit
        self.requests: list[GenerationRequest] = []
        self.stopped = False

    def stop(self) -> None:
        self.stopped = True

    def submit(self, request: GenerationRequest) -> FakeStream:
        if self.fail_submit:
            raise RuntimeError("secret internal detail")
        self.requests.append(request)
        params = request.params
        room = self.max_length - len(request.prompt_ids)
        text = self.reply[: min(params.max_tokens or room, room)]
        events: list[Event] = []
        for step, ch in enumerate(text):
            last = step == len(text) - 1
            finish = ("length" if len(text) < len(self.reply) else "stop") if last else None
            lp = None
            if params.logprobs is not None:
                lp = (TokenLogprob(ord(ch), -0.5, tuple((ord(ch) + j, -0.5 - j) for j in range(params.logprobs))),)
            choices = tuple(
                ChoiceOutput(i, ch, (ord(ch),), lp, finish) for i in range(params.n)
            )
            prompt_lps = None
            if step == 0 and request.prompt_logprobs is not None:
                prompt_lps = (None,) + tuple(TokenLogprob(t, -1.0) for t in request.prompt_ids[1:])
            events.append(Event(choices, prompt_lps))
        usage = Usage(len(request.prompt_ids), len(text) * params.n)
        events[-1] = Event(events[-1].choices, events[-1].prompt_logprobs, usage)
        if self.fail_after is not None:
            events = events[: self.fail_after] + [Event(error="engine exploded")]
        self.streams.append(FakeStream(events, self.delay))
        return self.streams[-1]


def make_client(engine=None, *, load=None, **options) -> TestClient:
    engine = engine or FakeEngine()
    app = create_app(ServeOptions(model_dir=Path("."), **options), load or (lambda: engine),
                     model_name=MODEL)
    return TestClient(app)


def wait_ready(client: TestClient) -> None:
    deadline = time.monotonic() + 5
    while client.get("/health").status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.01)


@pytest.fixture
def engine():
    return FakeEngine()


@pytest.fixture
def client(engine):
    with make_client(engine) as c:
        wait_ready(c)
        yield c


def assert_error(resp, status: int, type_: str, param=None, code=None) -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == type_ and err["param"] == param and err["code"] == code
    assert isinstance(err["message"], str) and err["message"]
    assert "Traceback" not in resp.text
    return err


def sse_events(resp) -> list:
    """Parse an SSE body strictly: every event is exactly `data: ...\\n\\n`."""
    raw = resp.content.decode()
    assert raw.endswith("data: [DONE]\n\n")
    parts = raw.split("\n\n")
    assert parts[-1] == ""
    out = []
    for part in parts[:-1]:
        assert part.startswith("data: ") and "\n" not in part, part
        payload = part[len("data: "):]
        out.append(payload if payload == "[DONE]" else json.loads(payload))
    assert out.count("[DONE]") == 1
    return out[:-1]


# ------------------------------------------------------------------ startup and health


def test_health_is_503_while_loading_then_200():
    release = threading.Event()
    engine = FakeEngine()

    def slow_load():
        release.wait(5)
        return engine

    with make_client(load=slow_load) as c:
        resp = c.get("/health")
        assert resp.status_code == 503 and resp.json() == {"status": "loading"}
        resp = c.post("/v1/chat/completions", json={"messages": MSG})
        err = assert_error(resp, 503, "server_error", code="model_loading")
        assert "loading" in err["message"] and resp.headers["retry-after"] == "1"
        assert c.get("/v1/models").status_code == 200  # the name is known before the weights
        release.set()
        wait_ready(c)
        assert c.get("/health").json() == {"status": "ok"}
    assert engine.stopped  # the lifespan stops the engine on shutdown


def test_load_failure_is_reported():
    failures = []

    def broken():
        raise FileNotFoundError("model.onnx missing")

    app = create_app(ServeOptions(model_dir=Path(".")), broken, model_name=MODEL,
                     on_load_error=failures.append)
    with TestClient(app) as c:
        deadline = time.monotonic() + 5
        while not failures:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        resp = c.get("/health")
        assert resp.status_code == 503
        assert resp.json()["status"] == "error" and "model.onnx missing" in resp.json()["message"]


# ---------------------------------------------------------------- models, 404, 405, 401


def test_models(client):
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    [card] = body["data"]
    assert card["id"] == MODEL and card["object"] == "model" and card["owned_by"] == "llorch"
    assert isinstance(card["created"], int)
    assert client.get(f"/v1/models/{MODEL}").json() == card
    assert_error(client.get("/v1/models/gpt-4"), 404, "invalid_request_error", "model", "model_not_found")


@pytest.mark.parametrize("options, flag", [
    ({"api_workers": 2}, "--api-workers"),
    ({"replicas": 2, "engine_process": True}, "--engine-process"),
    ({"replicas": 2, "provider": "cuda"}, "--engine-process"),  # on by default for CUDA replicas
])
def test_unload_is_refused_where_an_engine_process_holds_the_model(options, flag, engine):
    """A Ray Serve replica with --engine-process (as an --api-workers worker) only speaks for
    the engine process that holds the model: an unload that detached its client said
    "unloaded", freed nothing, and left the replica reporting "loading" (not ready)."""
    with make_client(engine, **options) as c:
        wait_ready(c)
        err = assert_error(c.post(f"/v1/models/{MODEL}/unload"), 400, "invalid_request_error",
                           code="unload_not_supported")
        assert flag in err["message"]
        assert c.get(f"/v1/models/{MODEL}").json()["status"] == "loaded"
        assert not engine.stopped


def test_a_replica_that_holds_its_engine_unloads(engine):
    with make_client(engine, replicas=2) as c:
        wait_ready(c)
        resp = c.post(f"/v1/models/{MODEL}/unload")
        assert resp.status_code == 200 and resp.json()["status"] == "unloaded"
        assert engine.stopped


def test_the_card_of_a_model_served_by_name_has_its_length_and_precision(engine, default_model_dir):
    """`create_app(model_name=...)` (a Ray Serve replica, an --api-workers worker) reads the
    export's llorch.json for the card, as a single process's model list does: its
    /v1/models said max_length and precision null."""
    from serve.models import load_model_info

    info = load_model_info(default_model_dir)
    app = create_app(ServeOptions(model_dir=default_model_dir), lambda: engine, model_name=MODEL)
    with TestClient(app) as c:
        wait_ready(c)
        card = c.get(f"/v1/models/{MODEL}").json()
    assert (card["max_length"], card["precision"]) == (info.max_length, info.precision)


def test_unknown_route_and_wrong_method(client):
    err = assert_error(client.get("/v1/nope"), 404, "invalid_request_error")
    assert "/v1/nope" in err["message"]
    resp = client.get("/v1/chat/completions")
    assert_error(resp, 405, "invalid_request_error")
    assert "POST" in resp.headers["allow"]
    assert_error(client.delete("/v1/models"), 405, "invalid_request_error")


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
def test_unknown_model_is_404(client, route):
    head = {"messages": MSG} if "chat" in route else {"prompt": "x"}  # the other's field is a 400
    err = assert_error(client.post(route, json={"model": "gpt-4o", **head}), 404, "invalid_request_error",
                       "model", "model_not_found")
    assert "gpt-4o" in err["message"]
    # an omitted model means the served one
    assert client.post(route, json=head).status_code == 200


def test_api_key():
    with make_client(api_key="sk-test") as c:
        wait_ready(c)
        assert c.get("/health").status_code == 200  # stays open
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic sk-test"}):
            resp = c.get("/v1/models", headers=headers)
            assert_error(resp, 401, "invalid_request_error", code="invalid_api_key")
            assert resp.headers["www-authenticate"] == "Bearer"
        assert_error(c.post("/v1/chat/completions", json={"messages": MSG}), 401, "invalid_request_error",
                     code="invalid_api_key")
        ok = {"Authorization": "Bearer sk-test"}
        assert c.get("/v1/models", headers=ok).status_code == 200
        assert c.post("/v1/chat/completions", json={"messages": MSG}, headers=ok).status_code == 200


# -------------------------------------------------------------------- request errors


def test_malformed_json_and_non_object(client):
    for body in (b"{not json", b"[1, 2]", b"", "{\"messages\": \"\xff\"}".encode("latin-1")):
        resp = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
        assert_error(resp, 400, "invalid_request_error")


def test_body_too_large():
    with make_client(max_body_bytes=1000) as c:
        wait_ready(c)
        big = {"messages": [{"role": "user", "content": "x" * 2000}]}
        err = assert_error(c.post("/v1/chat/completions", json=big), 413, "invalid_request_error")
        assert "1000" in err["message"]

        def chunks():  # no content-length: counted while reading
            yield b'{"messages": [{"role": "user", "content": "'
            for _ in range(20):
                yield b"x" * 100
            yield b'"}]}'

        resp = c.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
        assert_error(resp, 413, "invalid_request_error")


def test_compressed_bodies_are_decoded_within_the_size_limit():
    """`Content-Encoding: gzip`/`deflate` bodies are decoded (a client compressing a long
    prompt got a 400 "could not parse JSON ('utf-8' codec …)"); the limit holds for the
    decoded size (a 1 kB gzip of 900 kB of zeros is a 413, never decoded past the limit); other codings
    are a 415 naming the coding; broken data a 400."""
    import gzip
    import zlib

    body = json.dumps({"messages": MSG, "max_tokens": 1}).encode()
    with make_client(max_body_bytes=1000) as c:
        wait_ready(c)
        for coding, data in (("gzip", gzip.compress(body)), ("deflate", zlib.compress(body)),
                             ("gzip, identity", gzip.compress(body))):
            resp = c.post("/v1/chat/completions", content=data,
                          headers={"content-type": "application/json", "content-encoding": coding})
            assert resp.status_code == 200, (coding, resp.text)
        bomb = gzip.compress(b'{"messages": "' + b"0" * 900_000 + b'"}')
        assert len(bomb) < 1000
        assert_error(c.post("/v1/chat/completions", content=bomb, headers={
            "content-type": "application/json", "content-encoding": "gzip"}), 413, "invalid_request_error")
        err = assert_error(c.post("/v1/chat/completions", content=body, headers={
            "content-type": "application/json", "content-encoding": "br"}), 415, "invalid_request_error",
            code="unsupported_media_type")
        assert "'br'" in err["message"]
        assert_error(c.post("/v1/chat/completions", content=body, headers={
            "content-type": "application/json", "content-encoding": "gzip"}), 400, "invalid_request_error")


@pytest.mark.parametrize(
    "route, body, param, code",
    [
        ("/v1/chat/completions", {"messages": MSG, "temperature": 3}, "temperature", "decimal_above_max_value"),
        ("/v1/chat/completions", {"messages": MSG, "n": 0}, "n", "integer_below_min_value"),
        ("/v1/chat/completions", {"messages": []}, "messages", "empty_array"),
        ("/v1/chat/completions", {"messages": MSG, "max_tokens": 0}, "max_tokens", "integer_below_min_value"),
        ("/v1/chat/completions", {"messages": MSG, "top_logprobs": 3}, "top_logprobs", "invalid_value"),
        ("/v1/chat/completions", {"messages": MSG, "logit_bias": {"999": 1}}, "logit_bias", None),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "RAISE"}]}, "messages", None),
        ("/v1/chat/completions", {"messages": MSG, "max_tokens": 60}, "messages", "context_length_exceeded"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 70}]}, "messages",
         "context_length_exceeded"),
        ("/v1/completions", {"prompt": "x", "logprobs": 9}, "logprobs", "integer_above_max_value"),
        ("/v1/completions", {"prompt": [1, 300]}, "prompt", None),
        ("/v1/completions", {"prompt": ""}, "prompt", None),
        ("/v1/completions", {"prompt": "x" * 10, "max_tokens": 60}, "prompt", "context_length_exceeded"),
        ("/v1/completions", {"prompt": "x", "suffix": "y"}, "suffix", "invalid_value"),
    ],
)
def test_validation_errors(client, route, body, param, code):
    assert_error(client.post(route, json=body), 400, "invalid_request_error", param, code)


def test_context_error_says_the_numbers(client):
    # "<user>hi<assistant>" is 19 fake tokens; the fake model's context is 64
    err = assert_error(client.post("/v1/chat/completions", json={"messages": MSG, "max_tokens": 50}),
                       400, "invalid_request_error", "messages", "context_length_exceeded")
    assert "maximum context length is 64 tokens" in err["message"]
    assert "you requested 69 tokens (19 in the messages, 50 in the completion)" in err["message"]


def test_unexpected_errors_are_500_without_details():
    with make_client(FakeEngine(fail_submit=True)) as c:
        wait_ready(c)
        resp = c.post("/v1/chat/completions", json={"messages": MSG})
        err = assert_error(resp, 500, "server_error")
        assert "secret" not in resp.text and "RuntimeError" not in resp.text
        assert "server had an error" in err["message"]


def test_engine_error_before_the_first_token_is_a_500():
    with make_client(FakeEngine(fail_after=0)) as c:
        wait_ready(c)
        for stream in (False, True):
            resp = c.post("/v1/chat/completions", json={"messages": MSG, "stream": stream})
            assert_error(resp, 500, "server_error")


def test_engine_error_after_the_stream_started():
    with make_client(FakeEngine(fail_after=3)) as c:
        wait_ready(c)
        resp = c.post("/v1/chat/completions", json={"messages": MSG, "stream": True})
        assert resp.status_code == 200
        events = sse_events(resp)
        assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == "Hel"
        assert set(events[-1]) == {"error"}
        assert events[-1]["error"]["type"] == "server_error"
        assert set(events[-1]["error"]) == {"message", "type", "param", "code"}


# ----------------------------------------------------------------------- responses


def test_chat_response(client, engine):
    resp = client.post("/v1/chat/completions", json={"messages": MSG, "max_tokens": 5, "whatever": 1})
    assert resp.status_code == 200
    body = resp.json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert isinstance(body["created"], int) and body["model"] == MODEL
    assert "system_fingerprint" in body
    assert body["choices"] == [
        {"index": 0, "message": {"role": "assistant", "content": "Hello"}, "logprobs": None,
         "finish_reason": "length"}
    ]
    assert body["usage"] == {"prompt_tokens": 19, "completion_tokens": 5, "total_tokens": 24,
                             "prompt_tokens_details": {"cached_tokens": 0}}
    [request] = engine.requests
    assert request.prompt_ids == tuple(ord(c) for c in "<user>hi<assistant>")
    assert request.params.max_tokens == 5 and request.prompt_logprobs is None


def test_chat_n_and_logprobs(client):
    body = client.post("/v1/chat/completions", json={
        "messages": MSG, "n": 2, "logprobs": True, "top_logprobs": 2}).json()
    assert [c["index"] for c in body["choices"]] == [0, 1]
    content = body["choices"][1]["logprobs"]["content"]
    assert [t["token"] for t in content] == list("Hello world")
    assert content[0] == {"token": "H", "logprob": -0.5, "bytes": [72], "top_logprobs": [
        {"token": "H", "logprob": -0.5, "bytes": [72]}, {"token": "I", "logprob": -1.5, "bytes": [73]}]}
    assert body["usage"]["completion_tokens"] == 22


def test_chat_stream_framing(client):
    with client.stream("POST", "/v1/chat/completions", json={"messages": MSG, "stream": True, "max_tokens": 3}) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        assert resp.headers["cache-control"] == "no-cache"
        resp.read()
    chunks = sse_events(resp)
    assert len({(c["id"], c["created"], c["model"]) for c in chunks}) == 1
    assert all(c["object"] == "chat.completion.chunk" and "usage" not in c for c in chunks)
    assert [c["choices"][0]["delta"] for c in chunks] == [
        {"role": "assistant", "content": ""}, {"content": "H"}, {"content": "e"}, {"content": "l"}, {}]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, None, None, "length"]


def test_chat_stream_include_usage(client):
    resp = client.post("/v1/chat/completions", json={
        "messages": MSG, "stream": True, "max_tokens": 2, "stream_options": {"include_usage": True}})
    chunks = sse_events(resp)
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["object"] == "chat.completion.chunk"
    assert chunks[-1]["usage"]["completion_tokens"] == 2
    assert chunks[-1]["usage"]["total_tokens"] == 21


def test_chat_stream_n(client):
    chunks = sse_events(client.post("/v1/chat/completions", json={
        "messages": MSG, "stream": True, "n": 3, "logprobs": True}))
    texts = {i: "" for i in range(3)}
    roles, finishes = set(), set()
    for c in chunks:
        [choice] = c["choices"]
        delta = choice["delta"]
        if delta.get("role"):
            roles.add(choice["index"])
        texts[choice["index"]] += delta.get("content", "")
        if choice["finish_reason"]:
            finishes.add(choice["index"])
            assert delta == {}
        elif delta.get("content"):
            assert choice["logprobs"]["content"][0]["token"] == delta["content"]
    assert roles == finishes == {0, 1, 2}
    assert set(texts.values()) == {"Hello world"}


def test_completions(client, engine):
    body = client.post("/v1/completions", json={"prompt": ["ab", "cde"], "n": 2, "max_tokens": 2}).json()
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
    assert [(c["index"], c["text"], c["finish_reason"]) for c in body["choices"]] == [
        (0, "He", "length"), (1, "He", "length"), (2, "He", "length"), (3, "He", "length")]
    assert body["usage"]["prompt_tokens"] == 5 and body["usage"]["completion_tokens"] == 8
    assert [r.prompt_ids for r in engine.requests] == [(97, 98), (99, 100, 101)]


def test_completions_echo_and_logprobs(client, engine):
    body = client.post("/v1/completions", json={"prompt": "ab", "max_tokens": 2, "echo": True, "logprobs": 1}).json()
    [choice] = body["choices"]
    assert choice["text"] == "abHe"
    assert choice["logprobs"] == {
        "tokens": ["a", "b", "H", "e"],
        "token_logprobs": [None, -1.0, -0.5, -0.5],
        # the token itself is always among its top_logprobs (OpenAI: up to logprobs + 1)
        "top_logprobs": [None, {"b": -1.0}, {"H": -0.5}, {"e": -0.5}],
        "text_offset": [0, 1, 2, 3],
    }
    assert engine.requests[0].prompt_logprobs == 1
    # token-id prompts echo their decoded text
    body = client.post("/v1/completions", json={"prompt": [97, 98], "max_tokens": 1, "echo": True}).json()
    assert body["choices"][0]["text"] == "abH" and body["choices"][0]["logprobs"] is None


def test_completions_stream(client):
    chunks = sse_events(client.post("/v1/completions", json={
        "prompt": ["a", "b"], "stream": True, "max_tokens": 2, "echo": True,
        "stream_options": {"include_usage": True}}))
    assert all(c["object"] == "text_completion" for c in chunks)
    texts = {0: "", 1: ""}
    for c in chunks[:-1]:
        [choice] = c["choices"]
        texts[choice["index"]] += choice["text"]
        assert set(choice) == {"index", "text", "logprobs", "finish_reason"}
    assert texts == {0: "aHe", 1: "bHe"}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4


def test_completions_stream_logprobs_offsets(client):
    chunks = sse_events(client.post("/v1/completions", json={
        "prompt": "ab", "stream": True, "max_tokens": 3, "logprobs": 0}))
    offsets = [o for c in chunks for o in (c["choices"][0]["logprobs"] or {}).get("text_offset", [])]
    assert offsets == [0, 1, 2]


# ------------------------------------------------------------------ client disconnects


async def _disconnecting_client(app, body: dict, *, after_first_chunk: bool) -> list[dict]:
    """Drive the ASGI app by hand: the client goes away after the first body chunk or
    50 ms into the request."""
    raw = json.dumps(body).encode()
    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
        "method": "POST", "scheme": "http", "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions", "query_string": b"", "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())],
        "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000),
    }
    gone = asyncio.Event()
    sent: list[dict] = []
    body_sent = False

    async def receive():
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": raw, "more_body": False}
        if not after_first_chunk:
            await asyncio.sleep(0.05)
            gone.set()
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)
        if message["type"] == "http.response.body" and message.get("body"):
            gone.set()

    await asyncio.wait_for(app(scope, receive, send), 5)
    return sent


@pytest.mark.parametrize(
    "streaming, after_first_chunk, delay", [(True, True, 0.01), (False, False, 0.01), (True, False, 0.2)]
)
def test_client_disconnect_cancels_the_engine_request(streaming, after_first_chunk, delay, caplog):
    """Mid-stream, mid-collection, and while a stream waits for its first token."""
    engine = FakeEngine("x" * 60, delay=delay)
    app = create_app(ServeOptions(model_dir=Path(".")), lambda: engine, model_name=MODEL)
    state = app.state.llorch  # as the lifespan's loader would:
    state.models.ensure_loaded(state.models.default)
    state.started = True
    sent = asyncio.run(_disconnecting_client(
        app, {"messages": MSG, "stream": streaming}, after_first_chunk=after_first_chunk))
    [stream] = engine.streams
    assert stream.cancelled
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    assert b"[DONE]" not in body and b"xxxxxxxxxx" not in body
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
