"""ChatOutput with output parsers, fed engine events directly: the whole message and the SSE
chunks of the same events agree, in OpenAI's shapes (reasoning_content, tool_calls deltas,
finish_reason tool_calls, the legacy function_call)."""

from __future__ import annotations

import json

import pytest

from serve.events import ChoiceOutput, Event, TokenLogprob, Usage
from serve.parsers import ChoiceParser
from serve.responses import ChatOutput

TEXT = ('<think>\nThe user wants weather.\n</think>\n\nLet me check.\n<tool_call>\n'
        '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>')


def _events(text, pieces=7, finish="stop", n=1):
    chunks = [text[i:i + pieces] for i in range(0, len(text), pieces)]
    events = []
    for j, chunk in enumerate(chunks):
        last = j == len(chunks) - 1
        events.append(Event(
            choices=tuple(ChoiceOutput(c, chunk, (j,), (TokenLogprob(j, -0.5),),
                                       finish if last else None) for c in range(n)),
            usage=Usage(10, len(chunks)) if last else None))
    return events


def _output(legacy=False, logprobs=False, n=1):
    return ChatOutput("id", "m", n, lambda t: f"<{t}>", logprobs=logprobs, include_usage=False,
                      make_parser=lambda: ChoiceParser(tool_parser="hermes", reasoning=True),
                      legacy_functions=legacy)


def _stream(out, events):
    chunks = []
    for raw in out.start(events[0]) + [c for e in events for c in out.chunks(0, e)]:
        assert raw.startswith(b"data: ")
        chunks.append(json.loads(raw[6:]))
    return chunks


def test_message_and_stream_agree():
    whole = _output()
    for e in _events(TEXT):
        whole.add(0, e)
    [choice] = whole.response()["choices"]
    message = choice["message"]
    assert choice["finish_reason"] == "tool_calls"
    assert message["reasoning_content"] == "\nThe user wants weather.\n"
    assert message["content"] == "Let me check.\n"
    [call] = message["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}

    chunks = _stream(_output(), _events(TEXT))
    reasoning = content = ""
    calls: dict[int, dict] = {}
    finishes = []
    for chunk in chunks:
        c = chunk["choices"][0]
        d = c["delta"]
        reasoning += d.get("reasoning_content", "")
        content += d.get("content") or ""
        for tc in d.get("tool_calls", ()):
            if "id" in tc:
                assert tc["type"] == "function" and tc["function"]["arguments"] == ""
                calls[tc["index"]] = {"name": tc["function"]["name"], "arguments": ""}
            else:
                assert set(tc) == {"index", "function"} and set(tc["function"]) == {"arguments"}
                calls[tc["index"]]["arguments"] += tc["function"]["arguments"]
        if c["finish_reason"]:
            finishes.append(c["finish_reason"])
    assert finishes == ["tool_calls"]
    assert reasoning == message["reasoning_content"] and content == message["content"]
    assert list(calls.values()) == [call["function"]]
    assert len([ch for ch in chunks if "tool_calls" in ch["choices"][0]["delta"]]) > 2  # fragments


def test_length_keeps_length_and_plain_text_has_no_extra_keys():
    out = _output()
    for e in _events("Just an answer.", finish="length"):
        out.add(0, e)
    [choice] = out.response()["choices"]
    assert choice["finish_reason"] == "length"
    assert choice["message"] == {"role": "assistant", "content": "Just an answer."}


def test_legacy_function_call_shape():
    out = _output(legacy=True)
    for e in _events(TEXT):
        out.add(0, e)
    [choice] = out.response()["choices"]
    assert choice["finish_reason"] == "function_call"
    assert choice["message"]["function_call"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert "tool_calls" not in choice["message"]
    deltas = [c["choices"][0]["delta"] for c in _stream(_output(legacy=True), _events(TEXT))]
    assert {"function_call": {"name": "get_weather", "arguments": ""}} in deltas


@pytest.mark.parametrize("n", [1, 2])
def test_logprobs_ride_along_and_every_choice_has_its_parser(n):
    out = _output(logprobs=True, n=n)
    chunks = _stream(out, _events(TEXT, n=n))
    lps = [c["choices"][0]["logprobs"] for c in chunks if c["choices"][0]["logprobs"]]
    assert len(lps) == n * len(_events(TEXT))  # one per event and choice, even while markup is held
    for i in range(n):
        finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["index"] == i]
        assert finish[-1] == "tool_calls"
