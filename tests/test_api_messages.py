"""The Anthropic Messages adapter without a model: request → chat-completions translation,
Anthropic error bodies, and the renderer fed hand-made parser deltas, its messages and
events validated against anthropic-sdk-python's own types and stream accumulator."""

from __future__ import annotations

import asyncio
import json

import pytest
from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types import Message, RawMessageStreamEvent
from pydantic import TypeAdapter

from serve.api_messages import MessagesOutput, MessagesRequest, chat_messages, error_body
from serve.errors import (
    AuthenticationError,
    InvalidRequestError,
    NotFoundError,
    RateLimitError,
    ServerError,
    ServiceUnavailableError,
)
from serve.events import Event
from serve.parsers import ReasoningDelta, TextDelta, ToolCallArgs, ToolCallStart
from serve.protocol import ChatCompletionRequest, parse_request
from serve.streaming import _with_heartbeat
from tests._delta_script import ScriptedParser, events, token_text

STREAM_EVENT = TypeAdapter(RawMessageStreamEvent)
USER = [{"role": "user", "content": "hi"}]


def request(**body) -> MessagesRequest:
    body.setdefault("model", "m")
    body.setdefault("messages", USER)
    body.setdefault("max_tokens", 16)
    req = parse_request(MessagesRequest, body)
    req.check()
    return req


# ------------------------------------------------------------------------ translation


def test_system_sampling_and_stops():
    body = request(system=[{"type": "text", "text": "a"}, {"type": "text", "text": "b"}], temperature=0.3,
                   top_p=0.8, top_k=5, stop_sequences=["END"], metadata={"user_id": "u1"}).chat_body()
    assert body["messages"] == [{"role": "system", "content": "a\nb"}, {"role": "user", "content": "hi"}]
    assert (body["max_tokens"], body["temperature"], body["top_p"], body["top_k"], body["stop"], body["user"]) == (
        16, 0.3, 0.8, 5, ["END"], "u1")
    chat = parse_request(ChatCompletionRequest, body)
    params = chat.to_sampling_params(chat.requested_max_tokens())
    assert (params.max_tokens, params.top_k, params.stop) == (16, 5, ("END",))


def plain(messages):
    """Chat messages without the origin markers the renamer reads (serve.param_names)."""
    return [{k: v for k, v in m.items() if not k.startswith("_")} for m in messages]


def test_blocks_become_chat_messages():
    assistant = {"role": "assistant", "content": [
        {"type": "thinking", "thinking": "hmm", "signature": "s"},
        {"type": "text", "text": "Checking."},
        {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "toolu_2", "name": "get_time", "input": {}}]}
    user = {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"},
        {"type": "tool_result", "tool_use_id": "toolu_2", "content": [{"type": "text", "text": "noon"}],
         "is_error": True},
        {"type": "text", "text": "Thanks; and?"}]}
    assert plain(chat_messages(assistant, "messages.[1]")) == [{"role": "assistant", "content": "Checking.", "tool_calls": [
        {"id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "toolu_2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]}]
    assert plain(chat_messages(user, "messages.[2]", tool_use_ids={"toolu_1", "toolu_2"})) == [
        {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "toolu_2", "content": "Error: noon"},
        {"role": "user", "content": "Thanks; and?"}]
    only_thinking = {"role": "assistant", "content": [{"type": "thinking", "thinking": "hmm", "signature": ""}]}
    assert plain(chat_messages(only_thinking, "m")) == [{"role": "assistant", "content": ""}]
    only_results = {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "x"}]}
    assert plain(chat_messages(only_results, "m", tool_use_ids={"t"})) == [{"role": "tool", "tool_call_id": "t", "content": "x"}]


def test_tools_tool_choice_and_output_format():
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    body = request(tools=[{"name": "get_weather", "description": "d", "input_schema": schema,
                           "cache_control": {"type": "ephemeral"}}],
                   tool_choice={"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
                   output_config={"format": {"type": "json_schema", "schema": schema}, "effort": "high"}).chat_body()
    assert body["tools"] == [{"type": "function", "function": {"name": "get_weather", "parameters": schema,
                                                               "description": "d"}}]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert body["parallel_tool_calls"] is False
    assert body["response_format"] == {"type": "json_schema",
                                       "json_schema": {"name": "output", "schema": schema, "strict": True}}
    assert body["reasoning_effort"] == "high"  # chat's rule: honoured where the template reads it, else 400
    for kind, chat in (("auto", "auto"), ("any", "required"), ("none", "none")):
        assert request(tool_choice={"type": kind}).chat_body()["tool_choice"] == chat


@pytest.mark.parametrize("body, param", [
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, "messages.[0].content.[0].type"),
    ({"messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]},
     "messages.[0].content.[0].type"),
    ({"messages": [{"role": "system", "content": "x"}]}, "messages.[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_use", "id": "a", "name": "b", "input": {}}]}]},
     "messages.[0].content.[0].type"),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools.[0].type"),
    ({"tools": [{"type": "bash_20250124", "name": "bash"}]}, "tools.[0].type"),
    ({"tools": [{"name": "f"}]}, "tools.[0]"),
    ({"tool_choice": {"type": "sometimes"}}, "tool_choice.type"),
    # a tool the request does not offer: named in this route's words (was chat's "no function named")
    ({"tools": [{"name": "f", "input_schema": {"type": "object"}}], "tool_choice": {"type": "tool", "name": "g"}},
     "tool_choice.name"),
    # the tool flags: booleans, and callers this server has
    ({"tools": [{"name": "f", "input_schema": {"type": "object"}, "defer_loading": "false"}]},
     "tools.[0].defer_loading"),
    ({"tools": [{"name": "f", "input_schema": {"type": "object"}, "allowed_callers": ["code_execution_20260120"]}]},
     "tools.[0].allowed_callers"),
    ({"messages": [*USER, {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "f",
                                                             "input": {}}]},
                   {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "r",
                                                 "is_error": "false"}]}]},
     "messages.[2].content.[0].is_error"),
    # a tool_use the next message leaves unanswered
    ({"messages": [*USER, {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "f",
                                                             "input": {}}]},
                   {"role": "user", "content": "and?"}]}, "messages.[2].content"),
    ({"output_config": {"format": {"type": "json_object"}}}, "output_config.format"),
    ({"system": [{"type": "image"}]}, "system.[0].type"),
    # as Anthropic refuses them
    ({"messages": [{"role": "user", "content": []}]}, "messages.[0].content"),
    ({"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "a"}]}, "messages.[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": None}]}]}, "messages.[0].content.[0].text"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_x", "content": "r"}]}]},
     "messages.[0].content.[0].tool_use_id"),
    ({"messages": [*USER, {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "f",
                                                             "input": {}}]},
                   {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_2"}]}]},
     "messages.[2].content.[0].tool_use_id"),
    ({"messages": [*USER, {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f",
                                                             "input": "x"}]}]}, "messages.[1].content.[0].input"),
    ({"messages": [*USER, {"role": "assistant", "content": "a "}]}, "messages.[1].content"),
])
def test_unsupported_input_is_a_400_naming_it(body, param):
    with pytest.raises(InvalidRequestError) as err:
        request(**body).chat_body()
    assert err.value.param == param


@pytest.mark.parametrize("body, param", [
    ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, "thinking"),
    ({"mcp_servers": [{"type": "url", "url": "http://x", "name": "x"}]}, "mcp_servers"),
    ({"stop_sequences": ["a", "b", "c", "d", "e"]}, "stop_sequences"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"temperature": 1.5}, "temperature"),
    # strict types, as on the chat route
    ({"temperature": "0.5"}, "temperature"),
    ({"stream": "true"}, "stream"),
    ({"max_tokens": "5"}, "max_tokens"),
    ({"system": 5}, "system"),
])
def test_what_cannot_be_honoured_is_refused(body, param):
    with pytest.raises(InvalidRequestError) as err:
        request(**body)
    assert err.value.param == param


def test_max_tokens_is_required():
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        parse_request(MessagesRequest, {"model": "m", "messages": USER})


def test_error_bodies_are_anthropics():
    cases = [(InvalidRequestError("x"), "invalid_request_error"), (AuthenticationError("x"), "authentication_error"),
             (NotFoundError("x"), "not_found_error"), (RateLimitError("x"), "rate_limit_error"),
             (ServerError("x"), "api_error"), (ServiceUnavailableError("x"), "overloaded_error")]
    for exc, kind in cases:
        assert error_body(exc) == {"type": "error", "error": {"type": kind, "message": "x"}}


# -------------------------------------------------------------------------- rendering


def render(steps, tail=(), *, n=None, finish="stop", stop_sequence=None):
    """Stream and non-stream renderings of one scripted run: (events, message, SDK snapshot)."""
    n = n or len(steps)
    out = MessagesOutput("msg_1", "m", token_text, prompt_tokens=10,
                         make_parser=lambda: ScriptedParser(steps, tail))
    evs = events(n, finish, stop_sequence=stop_sequence)
    chunks = out.start(evs[0])
    for e in evs:
        chunks += out.chunks(0, e)
    chunks += out.end()
    assert out.done() == []
    parsed, snapshot, json_bufs = [], None, {}
    for chunk in chunks:
        head, data = chunk.decode().removesuffix("\n\n").split("\n")
        payload = json.loads(data.removeprefix("data: "))
        assert head == f"event: {payload['type']}"
        parsed.append(payload)
        if payload["type"] != "ping":
            event = STREAM_EVENT.validate_python(payload)
            snapshot = accumulate_event(event=event, current_snapshot=snapshot, json_bufs=json_bufs)
    whole = MessagesOutput("msg_1", "m", token_text, prompt_tokens=10,
                           make_parser=lambda: ScriptedParser(steps, tail))
    for e in evs:
        whole.add(0, e)
    message = whole.response()
    Message.model_validate(message)
    return parsed, message, snapshot


def test_text_stream_order_and_usage():
    evs, message, snapshot = render([[TextDelta("Hel")], [TextDelta("lo")]])
    assert [e["type"] for e in evs] == ["message_start", "ping", "content_block_start", "content_block_delta",
                                        "content_block_delta", "content_block_stop", "message_delta", "message_stop"]
    assert evs[0]["message"]["content"] == []
    # message_start splits the prompt by the prefix cache as the final usage does (the first
    # event tells the cached tokens)
    assert evs[0]["message"]["usage"] == {"input_tokens": 6, "output_tokens": 0, "cache_read_input_tokens": 4,
                                          "cache_creation_input_tokens": 0}
    assert [e["delta"] for e in evs if e["type"] == "content_block_delta"] == [
        {"type": "text_delta", "text": "Hel"}, {"type": "text_delta", "text": "lo"}]
    assert evs[-2]["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert message["content"] == [{"type": "text", "text": "Hello"}]
    assert message["stop_reason"] == "end_turn"
    # Anthropic counts cached prompt tokens apart from input_tokens
    assert message["usage"] == {"input_tokens": 6, "output_tokens": 2, "cache_read_input_tokens": 4,
                                "cache_creation_input_tokens": 0}
    assert snapshot.model_dump(exclude_none=True) == Message.model_validate(message).model_dump(exclude_none=True)


def test_thinking_text_and_tool_use_blocks():
    steps = [[ReasoningDelta("let me")], [ReasoningDelta(" see")], [TextDelta("Checking.")], [TextDelta("\n")],
             [ToolCallStart(0, "toolu_a", "get_weather"), ToolCallArgs(0, '{"city": ')],
             [ToolCallArgs(0, '"Paris"}')], [TextDelta("\n\n")],
             [ToolCallStart(1, "toolu_b", "get_time")], [ToolCallArgs(1, "{}")]]
    evs, message, snapshot = render(steps)
    starts = [(e["index"], e["content_block"]["type"]) for e in evs if e["type"] == "content_block_start"]
    assert starts == [(0, "thinking"), (1, "text"), (2, "tool_use"), (3, "tool_use")]
    stops = [e["index"] for e in evs if e["type"] == "content_block_stop"]
    assert stops == [0, 1, 2, 3]
    json_deltas = [(e["index"], e["delta"]["partial_json"]) for e in evs
                   if e["type"] == "content_block_delta" and e["delta"]["type"] == "input_json_delta"]
    assert json_deltas == [(2, '{"city": '), (2, '"Paris"}'), (3, "{}")]
    assert message["content"] == [
        {"type": "thinking", "thinking": "let me see", "signature": ""},
        {"type": "text", "text": "Checking.\n"},
        {"type": "tool_use", "id": "toolu_a", "name": "get_weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "toolu_b", "name": "get_time", "input": {}}]
    assert message["stop_reason"] == "tool_use"
    assert snapshot.model_dump(exclude_none=True) == Message.model_validate(message).model_dump(exclude_none=True)


@pytest.mark.parametrize("finish, stop_sequence, reason", [
    ("length", None, "max_tokens"), ("stop", "END", "stop_sequence"), ("stop", None, "end_turn")])
def test_stop_reasons(finish, stop_sequence, reason):
    evs, message, _ = render([[TextDelta("a")]], finish=finish, stop_sequence=stop_sequence)
    assert message["stop_reason"] == reason and message["stop_sequence"] == stop_sequence
    assert evs[-2]["delta"] == {"stop_reason": reason, "stop_sequence": stop_sequence}


def test_empty_answer_has_no_blocks():
    # Anthropic refuses an empty text block sent back, so none is made
    evs, message, _ = render([[]])
    assert message["content"] == []
    assert not [e for e in evs if e["type"].startswith("content_block")]


@pytest.mark.parametrize("finish, stop_sequence, reason", [
    ("length", None, "max_tokens"), ("stop", "Par", "stop_sequence")])
@pytest.mark.parametrize("args, value", [('{"city": "', {}), ('{"city": "Paris", "days": [1', {"city": "Paris", "days": [1]})])
def test_a_cut_tool_call_keeps_the_engine_reason(finish, stop_sequence, reason, args, value):
    """QA finding 2: a tool_use cut by max_tokens or a stop sequence is never `tool_use` nor a
    500; its input is what the SDK makes of the streamed partial JSON, on both paths."""
    steps = [[ToolCallStart(0, "toolu_a", "get_weather"), ToolCallArgs(0, args)]]
    evs, message, snapshot = render(steps, finish=finish, stop_sequence=stop_sequence)
    assert message["stop_reason"] == reason and message["stop_sequence"] == stop_sequence
    assert evs[-2]["delta"] == {"stop_reason": reason, "stop_sequence": stop_sequence}
    assert message["content"] == [{"type": "tool_use", "id": "toolu_a", "name": "get_weather", "input": value}]
    assert snapshot.model_dump(exclude_none=True) == Message.model_validate(message).model_dump(exclude_none=True)


def test_whole_calls_cut_by_a_stop_sequence_are_tool_use():
    steps = [[ToolCallStart(0, "toolu_a", "get_weather"), ToolCallArgs(0, '{"city": "Paris"}')]]
    evs, message, _ = render(steps, stop_sequence="</tool_call>")
    assert message["stop_reason"] == "tool_use" and message["stop_sequence"] is None


def test_error_mid_stream_is_an_error_event():
    out = MessagesOutput("msg_1", "m", token_text, prompt_tokens=1)
    out.start(events(1)[0])
    with pytest.raises(ServerError) as err:
        out.chunks(0, Event(error="boom"))
    (chunk,) = out.fail(err.value)
    assert chunk == (b'event: error\ndata: {"type":"error","error":{"type":"api_error","message":"boom"}}\n\n')


def test_heartbeat_between_slow_events():
    class Slow:
        def __init__(self) -> None:
            self.items = [(0, "a"), (0, "b")]

        def __aiter__(self):
            return self

        async def __anext__(self):
            await asyncio.sleep(0.25)
            if not self.items:
                raise StopAsyncIteration
            return self.items.pop(0)

    async def collect(interval):
        return [item async for item in _with_heartbeat(Slow(), interval)]

    got = asyncio.run(collect(0.1))
    assert [x for x in got if x is not None] == [(0, "a"), (0, "b")]
    assert got.count(None) >= 4  # about two per gap
    assert asyncio.run(collect(None)) == [(0, "a"), (0, "b")]


def test_route_errors_leave_in_anthropics_shape(caplog):
    from starlette.requests import Request

    from serve.api_messages import anthropic_errors

    async def refuse(request, state):
        raise RateLimitError("queue full", headers={"Retry-After": "1"})

    async def crash(request, state):
        raise RuntimeError("secret detail")

    request = Request({"type": "http", "method": "POST", "path": "/v1/messages", "headers": []})
    limited = asyncio.run(anthropic_errors(refuse)(request, None))
    assert limited.status_code == 429 and limited.headers["retry-after"] == "1"
    assert json.loads(limited.body) == {"type": "error", "error": {"type": "rate_limit_error", "message": "queue full"}}
    crashed = asyncio.run(anthropic_errors(crash)(request, None))
    body = json.loads(crashed.body)
    assert crashed.status_code == 500 and body["error"]["type"] == "api_error"
    assert "secret" not in crashed.body.decode() and "secret detail" in caplog.text  # logged, not sent
