"""The wire format as the official SDKs' own types describe it, through a real server.

Every body and stream event is validated *strictly* (`strict=True`: no coercion, so an int
where the type says str, or a float where it says int, fails) against the `openai` /
`anthropic` SDK's pydantic type, and beyond the types, the conventions the real services
keep that the SDKs read: request-id headers, id prefixes, whole-second timestamps. The tiny
random model serves: only the shapes matter here.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import anthropic
import httpx
import openai
import pytest
from anthropic.types import Message, RawMessageStreamEvent
from anthropic.types.shared import ErrorResponse
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import BaseModel, TypeAdapter

from serve.request_id import request_id, without_x_request_id
from tests.test_server_e2e import running_server

MODEL = "tiny"
WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("wire") / "server.log"
    with running_server(tiny_model_dir, "--threads", "1", "--model-name", MODEL, log_path=log) as base:
        yield base


def strict(tp, data):
    """`data` validated strictly as `tp` (raises pydantic's ValidationError)."""
    return TypeAdapter(tp).validate_python(data, strict=True)


def sse_events(base: str, path: str, body: dict) -> list[tuple[str | None, str]]:
    """(event name, data) of each SSE block of a streamed POST."""
    with httpx.stream("POST", base + path, json=body, timeout=60) as r:
        assert r.status_code == 200
        raw = r.read().decode()
    out = []
    for block in filter(None, raw.split("\n\n")):
        lines = block.split("\n")
        event = next((x[len("event: "):] for x in lines if x.startswith("event: ")), None)
        out.append((event, "\n".join(x[len("data: "):] for x in lines if x.startswith("data: "))))
    return out


def test_request_id_headers_reach_both_sdks(server):
    """OpenAI sends `x-request-id` and Anthropic `request-id` on every response (errors and
    streams included); the SDKs expose them as `_request_id` / `APIStatusError.request_id`."""
    oai = openai.OpenAI(base_url=server + "/v1", api_key="x", max_retries=0)
    completion = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert completion._request_id and completion._request_id.startswith("req_")
    with pytest.raises(openai.NotFoundError) as err:
        oai.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert err.value.request_id and err.value.request_id.startswith("req_")
    claude = anthropic.Anthropic(base_url=server, api_key="x", max_retries=0)
    message = claude.messages.create(model=MODEL, max_tokens=2, messages=[{"role": "user", "content": "hi"}])
    assert message._request_id and message._request_id.startswith("req_")
    with pytest.raises(anthropic.NotFoundError) as aerr:
        claude.messages.create(model="nope", max_tokens=2, messages=[{"role": "user", "content": "hi"}])
    assert aerr.value.request_id and aerr.value.request_id.startswith("req_")
    with httpx.stream("POST", server + "/v1/chat/completions", timeout=60,
                      json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                            "stream": True}) as r:
        assert r.headers["x-request-id"] == r.headers["request-id"]
    ids = {httpx.get(server + "/v1/models").headers["x-request-id"] for _ in range(2)}
    assert len(ids) == 2  # one per request
    # a tracing proxy's own id is kept; a header-unsafe one is replaced
    assert httpx.get(server + "/nowhere", headers={"X-Request-Id": "trace-42"}).headers["request-id"] == "trace-42"
    assert httpx.get(server + "/v1/models", headers={"X-Request-Id": "a b"}).headers["x-request-id"].startswith("req_")


def test_a_replica_answer_leaves_x_request_id_to_rays_proxy():
    """Behind `--replicas`, Ray Serve's proxy appends its own `X-Request-ID` (the id it put
    in the request, which the replica echoes): the ingress drops the replica's copy, else the
    client reads `"id, id"`; `request-id` (Anthropic's) is kept."""
    replica = [(b"content-type", b"application/json"), (b"x-request-id", b"abc"), (b"request-id", b"abc")]
    assert without_x_request_id(replica) == [(b"content-type", b"application/json"), (b"request-id", b"abc")]
    assert request_id([(b"x-request-id", b"abc")]) == b"abc"  # the proxy's id is the replica's


def test_anthropic_error_bodies_carry_the_request_id(server):
    """Anthropic's error bodies carry `request_id` (the SDK's `ErrorResponse.request_id`), the
    same id as the `request-id` header: a handler's error, a 404 model and an unknown route."""
    for method, path, body in [("POST", "/v1/messages", {"model": MODEL, "messages": [{"role": "user", "content": "x"}]}),
                               ("POST", "/v1/messages/count_tokens", {"model": "nope", "messages": []}),
                               ("GET", "/v1/messages", None)]:
        r = httpx.request(method, server + path, json=body, timeout=60)
        error = strict(ErrorResponse, r.json())
        assert r.status_code >= 400 and error.request_id == r.headers["request-id"], (path, r.text)
    claude = anthropic.Anthropic(base_url=server, api_key="x", max_retries=0)
    with pytest.raises(anthropic.NotFoundError) as err:
        claude.messages.create(model="nope", max_tokens=2, messages=[{"role": "user", "content": "hi"}])
    assert err.value.body["request_id"] == err.value.request_id


def test_messages_tool_use_ids_are_toolu(server):
    """Anthropic's tool_use blocks are `toolu_…` (as Messages' ids are `msg_…`), streamed or
    not; the id round-trips as a tool_result's tool_use_id."""
    body = {"model": MODEL, "max_tokens": 40, "messages": [{"role": "user", "content": "weather in Paris?"}],
            "tools": [{"name": "get_weather", "input_schema": WEATHER}], "tool_choice": {"type": "any"}}
    message = strict(Message, httpx.post(server + "/v1/messages", json=body, timeout=60).json())
    uses = [b for b in message.content if b.type == "tool_use"]
    assert message.id.startswith("msg_") and uses and all(b.id.startswith("toolu_") for b in uses)
    events = [strict(RawMessageStreamEvent, json.loads(d)) for e, d in sse_events(server, "/v1/messages",
                                                                                   {**body, "stream": True})
              if e != "ping"]
    starts = [e.content_block for e in events if e.type == "content_block_start"]
    assert starts and all(b.id.startswith("toolu_") for b in starts if b.type == "tool_use")
    follow = {**body, "messages": [*body["messages"], {"role": "assistant", "content": [u.model_dump() for u in uses]},
                                   {"role": "user", "content": [{"type": "tool_result", "tool_use_id": uses[0].id,
                                                                 "content": "sunny"}]}]}
    follow.pop("tool_choice")
    assert httpx.post(server + "/v1/messages", json=follow, timeout=60).status_code == 200


def test_responses_timestamps_are_whole_seconds(server):
    """`created_at` / `completed_at` are integer Unix seconds, as OpenAI sends (and as chat's
    `created`), on the response object and in its stream events."""
    body = {"model": MODEL, "input": "hi", "max_output_tokens": 3}
    raw = httpx.post(server + "/v1/responses", json=body, timeout=60).json()
    strict(Response, raw)
    assert type(raw["created_at"]) is int and type(raw["completed_at"]) is int
    for _, data in sse_events(server, "/v1/responses", {**body, "stream": True}):
        event = json.loads(data)
        strict(ResponseStreamEvent, event)
        if "response" in event:
            assert type(event["response"]["created_at"]) is int


def no_extra_fields(obj, where: str = "") -> None:
    """Fail on any field the SDK type does not declare (its models allow extras silently)."""
    if isinstance(obj, BaseModel):
        assert not obj.model_extra, f"{where}: fields outside the SDK type {sorted(obj.model_extra)}"
        for name in type(obj).model_fields:
            no_extra_fields(getattr(obj, name), f"{where}.{name}")
    elif isinstance(obj, list):
        for k, x in enumerate(obj):
            no_extra_fields(x, f"{where}[{k}]")


def test_responses_logprob_events_are_the_sdk_types(server):
    """With logprobs, the `output_text.delta` / `.done` events' logprobs are OpenAI's event
    schema (`token`, `logprob`, `top_logprobs`: no `bytes`, which only the part carries)."""
    body = {"model": MODEL, "input": "hi", "max_output_tokens": 3, "top_logprobs": 2,
            "include": ["message.output_text.logprobs"], "stream": True}
    texts = [strict(ResponseStreamEvent, event) for event in
             (json.loads(d) for _, d in sse_events(server, "/v1/responses", body))
             if event["type"] in ("response.output_text.delta", "response.output_text.done")]
    assert texts and any(t.logprobs for t in texts)
    for t in texts:
        no_extra_fields(t, t.type)
    final = strict(Response, json.loads(sse_events(server, "/v1/responses", body)[-1][1])["response"])
    assert final.output[0].content[0].logprobs[0].bytes  # the part keeps them


def test_chat_bodies_and_chunks_validate_strictly(server):
    """Chat completions with n, logprobs and top_logprobs, and every streamed chunk (the usage
    chunk included), are the SDK's types without coercion; `[DONE]` ends the chat stream."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "n": 2,
            "logprobs": True, "top_logprobs": 2}
    chat = strict(ChatCompletion, httpx.post(server + "/v1/chat/completions", json=body, timeout=60).json())
    assert chat.id.startswith("chatcmpl-") and len(chat.choices) == 2
    events = sse_events(server, "/v1/chat/completions", {**body, "stream": True,
                                                         "stream_options": {"include_usage": True}})
    assert events[-1] == (None, "[DONE]")
    chunks = [strict(ChatCompletionChunk, json.loads(d)) for _, d in events[:-1]]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
