"""The Responses API adapter without a model: request → chat-completions translation, and
the renderer fed hand-made parser deltas (text, reasoning, tool calls), its bodies and
events validated against openai-python's own types."""

from __future__ import annotations

import json

import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from serve.api_responses import ResponsesOutput, ResponsesRequest, input_messages, output_messages
from serve.errors import InvalidRequestError, RateLimitError, ServerError, ServiceUnavailableError
from serve.parsers import ReasoningDelta, TextDelta, ToolCallArgs, ToolCallStart
from serve.protocol import ChatCompletionRequest, parse_request
from serve.response_store import ResponseStore, StoredResponse
from tests._delta_script import ScriptedParser, events, token_text

STREAM_EVENT = TypeAdapter(ResponseStreamEvent)


def request(**body) -> ResponsesRequest:
    body.setdefault("input", "hi")
    req = parse_request(ResponsesRequest, body)
    req.check()
    return req


# ------------------------------------------------------------------------ translation


def test_string_input_instructions_and_history():
    history = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    body = request(model="m", input="c", instructions="be brief", max_output_tokens=7, temperature=0.5,
                   top_p=0.9, user="u").chat_body(history)
    assert body["messages"] == [{"role": "system", "content": "be brief"}, *history,
                                {"role": "user", "content": "c"}]
    assert body["max_completion_tokens"] == 7
    assert (body["temperature"], body["top_p"], body["user"], body["model"]) == (0.5, 0.9, "u", "m")
    chat = parse_request(ChatCompletionRequest, body)  # the chat route accepts it as is
    assert chat.to_sampling_params(chat.requested_max_tokens()).max_tokens == 7


def test_input_items_become_chat_messages():
    items = [
        {"role": "developer", "content": "sys"},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "x"},
                                                         {"type": "input_text", "text": "y"}]},
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Let me look.",
                                                              "annotations": []}]},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": '{"a":1}'},
        {"type": "function_call", "call_id": "c2", "name": "g", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "one"},
        {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "two"}]},
        {"type": "function_call", "call_id": "c3", "name": "f", "arguments": "{}"},
    ]
    assert input_messages(items) == [
        {"role": "developer", "content": "sys"},
        {"role": "user", "content": "x\ny"},
        {"role": "assistant", "content": "Let me look.", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}},
            {"id": "c2", "type": "function", "function": {"name": "g", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "one"},
        {"role": "tool", "tool_call_id": "c2", "content": "two"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c3", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
    ]


@pytest.mark.parametrize("items, param", [
    ([{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}], "input[0].content[0].type"),
    ([{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}], "input[0].content[0].type"),
    ([{"type": "web_search_call", "id": "w"}], "input[0].type"),
    ([{"type": "item_reference", "id": "x"}], "input[0].type"),
    ([{"role": "tool", "content": "x"}], "input[0].role"),
    ([{"type": "function_call", "name": "f", "arguments": "{}"}], "input[0].call_id"),
    ([{"content": "x"}], "input[0].type"),
    ([{"role": "user", "content": [{"type": "input_text"}]}], "input[0].content[0].text"),  # what is wrong
])
def test_unsupported_input_is_a_400_naming_it(items, param):
    with pytest.raises(InvalidRequestError) as err:
        input_messages(items)
    assert err.value.param == param


def test_tools_tool_choice_and_text_format():
    tools = [{"type": "function", "name": "get_weather", "description": "d", "strict": True,
              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    body = request(tools=tools, tool_choice={"type": "function", "name": "get_weather"},
                   parallel_tool_calls=False, reasoning={"effort": "low"},
                   text={"format": {"type": "json_schema", "name": "A", "schema": schema, "strict": True}}
                   ).chat_body([])
    assert body["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "description": "d", "parameters": tools[0]["parameters"], "strict": True}}]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert body["parallel_tool_calls"] is False
    assert body["reasoning_effort"] == "low"  # chat's rule: honoured where the template reads it, else 400
    assert body["response_format"] == {"type": "json_schema",
                                       "json_schema": {"name": "A", "schema": schema, "strict": True}}
    assert request(text={"format": {"type": "json_object"}}).chat_body([])["response_format"] == {
        "type": "json_object"}
    assert "response_format" not in request(text={"format": {"type": "text"}}).chat_body([])
    for choice in ("auto", "none", "required"):
        assert request(tool_choice=choice).chat_body([])["tool_choice"] == choice


@pytest.mark.parametrize("body, param", [
    ({"tools": [{"type": "web_search_preview"}]}, "tools[0].type"),
    ({"tools": [{"type": "file_search", "vector_store_ids": []}]}, "tools[0].type"),
    ({"tools": [{"type": "computer_use_preview"}]}, "tools[0].type"),
    ({"tool_choice": {"type": "web_search_preview"}}, "tool_choice"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
    # the flat Responses shapes, checked in this route's spelling (not chat's nested one)
    ({"tools": [{"type": "function", "name": "f"}], "tool_choice": {"type": "function"}}, "tool_choice.name"),
    ({"tools": [{"type": "function", "name": "f"}], "tool_choice": {"type": "allowed_tools", "mode": "sometimes",
                                                                     "tools": []}}, "tool_choice.mode"),
    ({"tools": [{"type": "function", "name": "f"}], "tool_choice": {"type": "allowed_tools", "mode": "auto",
                                                                     "tools": ["f"]}}, "tool_choice.tools[0]"),
    ({"tools": [{"type": "function", "name": "f", "allowed_callers": ["programmatic"]}]}, "tools[0].allowed_callers"),
    ({"tools": [{"type": "function", "name": "f", "async": True}]}, "tools[0].async"),
    ({"tools": [{"type": "function", "name": "f", "defer_loading": 1}]}, "tools[0].defer_loading"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
    ({"text": {"format": {"type": "yaml"}}}, "text.format"),
])
def test_unsupported_tools_and_formats_are_400s(body, param):
    with pytest.raises(InvalidRequestError) as err:
        request(**body).chat_body([])
    assert err.value.param == param


@pytest.mark.parametrize("body, param", [
    ({"background": True}, "background"),
    ({"conversation": "conv_1"}, "conversation"),
    ({"prompt": {"id": "p"}}, "prompt"),
    ({"truncation": "auto"}, "truncation"),
    ({"include": ["message.output_text.annotations"]}, "include"),
    ({"text": {"verbosity": "low"}}, "text.verbosity"),
    ({"max_tool_calls": 2}, "max_tool_calls"),
    # strict types, as on the chat route; a union's branch never leaks into the param
    ({"temperature": "0.5"}, "temperature"),
    ({"stream": "true"}, "stream"),
    ({"store": "no"}, "store"),
    ({"input": 5}, "input"),
    ({"instructions": 5}, "instructions"),
    ({"tool_choice": 5}, "tool_choice"),
])
def test_what_cannot_be_honoured_is_refused(body, param):
    with pytest.raises(InvalidRequestError) as err:
        request(**body)
    assert err.value.param == param


def test_logprobs_come_with_the_include():
    assert "logprobs" not in request(top_logprobs=3).chat_body([])
    body = request(top_logprobs=3, include=["message.output_text.logprobs"]).chat_body([])
    assert (body["logprobs"], body["top_logprobs"]) == (True, 3)
    request(include=["reasoning.encrypted_content"])  # changes nothing here: accepted


def test_output_items_replay_as_chat_messages():
    items = [{"type": "reasoning", "id": "rs", "summary": []},
             {"type": "message", "content": [{"type": "output_text", "text": "ok"}]},
             {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"}]
    assert output_messages(items) == [{"role": "assistant", "content": "ok", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]


def test_a_cut_call_replays_with_what_its_arguments_hold():
    """A call `max_output_tokens` cut (status incomplete) replayed its unfinished JSON, which
    the chat request refuses: every later `previous_response_id` request was a 400 naming a
    param that does not exist (`previous_response_id.tool_calls.[0].function.arguments`)."""
    cut = {"type": "function_call", "call_id": "c", "name": "f", "arguments": '{"a": 1, "city": "Pa',
           "status": "incomplete"}
    assert output_messages([cut])[0]["tool_calls"][0]["function"]["arguments"] == '{"a": 1}'
    assert input_messages([{"role": "user", "content": "x"}, cut])[1]["tool_calls"][0]["function"] == \
        {"name": "f", "arguments": '{"a": 1}'}
    req = request(input=[{"role": "user", "content": "x"}, {**cut, "status": "completed"},
                         {"type": "function_call_output", "call_id": "c", "output": "ok"}])
    body = req.chat_body([])
    with pytest.raises(InvalidRequestError) as caught:  # a finished call's arguments are not mended
        parse_request(ChatCompletionRequest, body)
    assert req.renamer.rename(caught.value).param == "input[1].arguments"


def test_an_unanswered_call_is_named():
    call = {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"}
    for items, param in (([call], "input[1].call_id"), ([call, {"role": "user", "content": "y"}], "input[1].call_id")):
        with pytest.raises(InvalidRequestError) as caught:
            request(input=[{"role": "user", "content": "x"}, *items]).chat_body([])
        assert caught.value.param == param
    history = output_messages([call])  # a stored response's call: answered in this input
    with pytest.raises(InvalidRequestError) as caught:
        request(input="y").chat_body(history)
    assert caught.value.param == "input" and caught.value.message == "No tool output found for function call c."


# -------------------------------------------------------------------------- rendering


def render(steps, tail=(), *, n=None, finish="stop", logprobs=False, echo=None):
    """Stream and non-stream renderings of the same scripted run: (events, final body, body)."""
    n = n or len(steps)
    done = []
    bodies = []
    for streaming in (True, False):
        out = ResponsesOutput("resp_1", "m", token_text, echo=echo or request().echo(),
                              make_parser=lambda: ScriptedParser(steps, tail), logprobs=logprobs,
                              on_done=done.append)
        evs = events(n, finish, logprobs=logprobs)
        if streaming:
            chunks = out.start(evs[0])
            for e in evs:
                chunks += out.chunks(0, e)
            chunks += out.end()
            assert out.done() == []  # no `[DONE]` in this format
            parsed = []
            for chunk in chunks:
                head, data = chunk.decode().removesuffix("\n\n").split("\n")
                payload = json.loads(data.removeprefix("data: "))
                assert head == f"event: {payload['type']}"
                parsed.append(STREAM_EVENT.validate_python(payload).model_dump(mode="json", exclude_unset=True))
        else:
            for e in evs:
                out.add(0, e)
            bodies.append(out.response())
    assert len(done) == 2  # on_done once per rendering
    Response.model_validate(bodies[0])
    return parsed, done[0], bodies[0]


def same(a: dict, b: dict) -> bool:
    """Equal but for timestamps and generated item ids."""
    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k not in ("created_at", "completed_at", "id")}
        if isinstance(x, list):
            return [strip(v) for v in x]
        return x
    return strip(a) == strip(b)


def test_text_events_in_order_with_sequence_numbers():
    evs, final, body = render([[TextDelta("Hel")], [TextDelta("lo")], [TextDelta("!")]])
    assert [e["type"] for e in evs] == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.content_part.added", "response.output_text.delta", "response.output_text.delta",
        "response.output_text.delta", "response.output_text.done", "response.content_part.done",
        "response.output_item.done", "response.completed"]
    assert [e["sequence_number"] for e in evs] == list(range(len(evs)))
    assert evs[0]["response"]["status"] == "in_progress" and evs[0]["response"]["output"] == []
    assert "".join(e["delta"] for e in evs if e["type"] == "response.output_text.delta") == "Hello!"
    assert evs[7]["text"] == "Hello!"
    assert same(evs[-1]["response"], body) and same(final, body)
    assert body["status"] == "completed" and body["incomplete_details"] is None
    (item,) = body["output"]
    assert item["type"] == "message" and item["status"] == "completed" and item["role"] == "assistant"
    assert item["content"] == [{"type": "output_text", "text": "Hello!", "annotations": [], "logprobs": []}]
    assert body["usage"] == {"input_tokens": 10, "input_tokens_details": {"cached_tokens": 4, "cache_write_tokens": 0},
                             "output_tokens": 3, "output_tokens_details": {"reasoning_tokens": 0},
                             "total_tokens": 13}


def test_reasoning_then_text_then_two_tool_calls():
    steps = [[ReasoningDelta("think")], [ReasoningDelta("ing")], [TextDelta("I'll call.")],
             [ToolCallStart(0, "call_a", "f"), ToolCallArgs(0, '{"x":')], [ToolCallArgs(0, "1}")],
             [TextDelta("\n")], [ToolCallStart(1, "call_b", "g")], [ToolCallArgs(1, "{}")]]
    evs, _, body = render(steps, tail=[TextDelta("\n")])
    kinds = [e["type"] for e in evs]
    assert kinds == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added",
        "response.reasoning_text.delta", "response.reasoning_text.delta",
        "response.reasoning_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.content_part.added", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done",
        "response.completed"]
    reasoning, message, call_a, call_b = body["output"]
    assert reasoning["type"] == "reasoning" and reasoning["content"] == [{"type": "reasoning_text",
                                                                         "text": "thinking"}]
    assert message["content"][0]["text"] == "I'll call."
    assert (call_a["type"], call_a["call_id"], call_a["name"], call_a["arguments"]) == (
        "function_call", "call_a", "f", '{"x":1}')
    assert (call_b["call_id"], call_b["name"], call_b["arguments"], call_b["status"]) == (
        "call_b", "g", "{}", "completed")
    assert body["usage"]["output_tokens_details"]["reasoning_tokens"] == 2
    done = {e["item"]["id"]: e["output_index"] for e in evs if e["type"] == "response.output_item.done"}
    assert [done[item["id"]] for item in evs[-1]["response"]["output"]] == [0, 1, 2, 3]
    assert same(evs[-1]["response"], body)
    args = [e for e in evs if e["type"] == "response.function_call_arguments.done"]
    assert [(a["name"], a["arguments"], a["output_index"]) for a in args] == [("f", '{"x":1}', 2), ("g", "{}", 3)]
    # the SDK's own view of it
    assert Response.model_validate(body).output_text == "I'll call."


def test_whitespace_only_text_around_tool_calls_is_no_message():
    steps = [[TextDelta("\n")], [ToolCallStart(0, "c", "f"), ToolCallArgs(0, "{}")], [TextDelta(" \n")]]
    _, _, body = render(steps)
    assert [item["type"] for item in body["output"]] == ["function_call"]


def test_max_output_tokens_is_incomplete():
    evs, final, body = render([[TextDelta("a")], [TextDelta("b")]], finish="length")
    assert evs[-1]["type"] == "response.incomplete"
    assert body["status"] == final["status"] == "incomplete"
    assert body["incomplete_details"] == {"reason": "max_output_tokens"}
    assert body["output"][0]["status"] == "incomplete"


@pytest.mark.parametrize("finish", ["length", "stop"])
def test_a_cut_function_call_is_an_incomplete_item(finish):
    """QA findings 3, 5: a call cut by max_output_tokens (or a stop) is left `incomplete`,
    never presented as a completed call; the whole call before it stays completed."""
    steps = [[ToolCallStart(0, "call_a", "f"), ToolCallArgs(0, "{}")],
             [ToolCallStart(1, "call_b", "g"), ToolCallArgs(1, '{"city": "Pa')]]
    evs, _, body = render(steps, finish=finish)
    assert [(i["call_id"], i["status"]) for i in body["output"]] == [("call_a", "completed"), ("call_b", "incomplete")]
    assert body["status"] == ("incomplete" if finish == "length" else "completed")
    assert same(evs[-1]["response"], body)


def test_empty_answer_is_an_empty_message():
    evs, _, body = render([[]], n=1)
    assert body["output"][0]["content"][0]["text"] == ""
    assert "response.output_text.delta" not in [e["type"] for e in evs]


def test_logprobs_ride_on_text():
    evs, _, body = render([[TextDelta("a")], [], [TextDelta("b")]], logprobs=True)
    deltas = [e for e in evs if e["type"] == "response.output_text.delta"]
    assert [len(d["logprobs"]) for d in deltas] == [1, 2]  # the held-back token's with the next text
    part = body["output"][0]["content"][0]
    assert [lp["token"] for lp in part["logprobs"]] == ["<100>", "<101>", "<102>"]
    assert part["logprobs"][0]["top_logprobs"][1] == {"token": "<7>", "logprob": -1.5, "bytes": list(b"<7>")}


def test_echoed_settings():
    req = request(instructions="x", max_output_tokens=5, metadata={"k": "v"}, temperature=0.2,
                  tools=[{"type": "function", "name": "f"}], store=False, previous_response_id="resp_0")
    _, _, body = render([[TextDelta("a")]], echo=req.echo())
    assert (body["instructions"], body["max_output_tokens"], body["metadata"], body["temperature"]) == (
        "x", 5, {"k": "v"}, 0.2)
    assert body["tools"] == [{"type": "function", "name": "f"}]
    assert (body["store"], body["previous_response_id"], body["tool_choice"]) == (False, "resp_0", "auto")


def test_error_mid_stream_is_response_failed():
    out = ResponsesOutput("resp_1", "m", token_text, echo=request().echo(),
                          make_parser=lambda: ScriptedParser([[TextDelta("a")]]))
    out.start(events(2)[0])
    out.chunks(0, events(2)[0])
    with pytest.raises(ServerError) as err:
        from serve.events import Event
        out.chunks(0, Event(error="boom"))
    (chunk,) = out.fail(err.value)
    payload = json.loads(chunk.decode().split("data: ", 1)[1])
    event = STREAM_EVENT.validate_python(payload)
    assert event.type == "response.failed" and event.response.status == "failed"
    assert event.response.error.message == "boom"


@pytest.mark.parametrize("error, code", [
    (ServiceUnavailableError("draining", code="shutting_down"), "server_error"),
    (ServiceUnavailableError("waited too long", code="queue_timeout"), "server_error"),
    (RateLimitError("queue full", code="rate_limit_exceeded"), "rate_limit_exceeded"),
    (ServerError("boom"), "server_error"),
])
def test_a_failed_response_has_one_of_openais_codes(error, code):
    """`response.error.code` is a Literal in the SDK (OpenAI's codes): llorch's own codes
    (`shutting_down`, `queue_timeout`, … from a drain or a stuck queue mid-stream) become
    `server_error` (429s `rate_limit_exceeded`), the message still saying what happened."""
    out = ResponsesOutput("resp_1", "m", token_text, echo=request().echo(),
                          make_parser=lambda: ScriptedParser([[TextDelta("a")]]))
    out.start(events(2)[0])
    (chunk,) = out.fail(error)
    payload = json.loads(chunk.decode().split("data: ", 1)[1])
    event = STREAM_EVENT.validate_python(payload, strict=True)
    assert event.response.error.code == code and event.response.error.message == error.message


def test_store_is_a_bounded_lru():
    store = ResponseStore(2)
    for k in "abc":
        store.put(k, StoredResponse({"id": k}, ()))
    assert store.get("a") is None and len(store) == 2
    store.get("b")  # now the most recent
    store.put("d", StoredResponse({"id": "d"}, ()))
    assert store.get("c") is None and store.get("b") is not None
    assert store.delete("b") and not store.delete("b")
    none = ResponseStore(0)
    none.put("a", StoredResponse({}, ()))
    assert none.get("a") is None
