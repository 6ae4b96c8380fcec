"""Golden tests of the output parsers: canned outputs of every family, fed whole, split at
every character boundary, and one character at a time, must parse the same."""

from __future__ import annotations

import itertools
import json

import pytest

from serve.parsers import (
    ChoiceParser,
    ReasoningDelta,
    TextDelta,
    ToolCallArgs,
    ToolCallStart,
    collapse,
    detect_reasoning_parser,
    detect_tool_parser,
    partial_json_object,
)


def _parser(family, reasoning=False, start_inside=False):
    counter = itertools.count()
    return ChoiceParser(tool_parser=family, reasoning=reasoning, start_in_reasoning=start_inside,
                        new_id=lambda: f"id{next(counter)}")


def _parse(pieces, **kw):
    p = _parser(**kw)
    out = []
    for piece in pieces:
        out += p.feed(piece)
    return collapse(out + p.finish())


def _all_splits_agree(text, **kw):
    whole = _parse([text], **kw)
    for i in range(len(text) + 1):
        assert _parse([text[:i], text[i:]], **kw) == whole, f"split at {i}: {text[:i]!r} | {text[i:]!r}"
    assert _parse(list(text), **kw) == whole, "one character at a time"
    return whole


def _call(i, name, args):
    return [ToolCallStart(i, f"id{i}", name), ToolCallArgs(i, args)]


W = '{"city": "Paris", "units": ["c", "f"], "q": "a \\"}\\" b"}'
GOLDEN = [
    # hermes / Qwen2.5 / Qwen3 / generic
    ("hermes", f'<tool_call>\n{{"name": "get_weather", "arguments": {W}}}\n</tool_call>',
     _call(0, "get_weather", W)),
    ("hermes", 'Let me check.\n<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>\n'
               '<tool_call>\n{"arguments": {"x": 1}, "name": "b"}\n</tool_call>\n',
     [TextDelta("Let me check.\n"), *_call(0, "a", "{}"), *_call(1, "b", '{"x": 1}')]),
    ("hermes", "No tools needed: 1 < 2 and <tool is not a tag.",
     [TextDelta("No tools needed: 1 < 2 and <tool is not a tag.")]),
    ("hermes", "<tool_call> not json </tool_call> ok",
     [TextDelta("<tool_call> not json </tool_call> ok")]),
    ("hermes", '<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>',
     _call(0, "f", '{"a": 1}')),
    ("hermes", '<tool_call>[{"name": "a", "arguments": {"x": [1]}}, {"name": "b", "arguments": {}}]</tool_call>',
     [*_call(0, "a", '{"x": [1]}'), *_call(1, "b", "{}")]),
    ("generic", '<tool_call>{"name": "f", "arguments": {"a": [1, {"b": null}]}}</tool_call>',
     _call(0, "f", '{"a": [1, {"b": null}]}')),
    # llama 3.1-3.3 JSON
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris"}}',
     _call(0, "get_weather", '{"city": "Paris"}')),
    ("llama3_json", '<|python_tag|>{"name": "a", "parameters": {}}; {"name": "b", "parameters": {"k": "v;"}}',
     [*_call(0, "a", "{}"), *_call(1, "b", '{"k": "v;"}')]),
    ("llama3_json", "The answer is {x}.", [TextDelta("The answer is {x}.")]),
    ("llama3_json", "{not a call}", [TextDelta("{not a call}")]),
    # mistral
    ("mistral", '[TOOL_CALLS][{"name": "f", "arguments": {"a": 1}}, {"name": "g", "arguments": {}}]',
     [*_call(0, "f", '{"a": 1}'), *_call(1, "g", "{}")]),
    ("mistral", '[{"name": "f", "arguments": {"a": "]"}}]', _call(0, "f", '{"a": "]"}')),
    ("mistral", '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]g[ARGS]{}',
     [*_call(0, "get_weather", '{"city": "Paris"}'), *_call(1, "g", "{}")]),
    ("mistral", "[1] is a citation.", [TextDelta("[1] is a citation.")]),
    # pythonic (Llama 3.2 / 4)
    ("pythonic", '[get_weather(city="Paris", days=3), ping()]',
     [*_call(0, "get_weather", '{"city": "Paris", "days": 3}'), *_call(1, "ping", "{}")]),
    ("pythonic", "[f(a=[1, 'x)'], b={'k': True})]", _call(0, "f", '{"a": [1, "x)"], "b": {"k": true}}')),
    ("pythonic", "[citation needed] text", [TextDelta("[citation needed] text")]),
    ("pythonic", "[f(**kw)]", [TextDelta("[f(**kw)]")]),
    ("hermes", '<tool_call>{"\\q": 1}</tool_call>', [TextDelta('<tool_call>{"\\q": 1}</tool_call>')]),
    ("llama3_json", '{"name": "a\\u12"}', [TextDelta('{"name": "a\\u12"}')]),
    ("mistral", '[TOOL_CALLS]f[ARGS]"x', [*_call(0, "f", "{}"), TextDelta('"x')]),
    ("pythonic", '[f(on=true, off=False, x=null, l=[1, {"k": None}])]',
     _call(0, "f", '{"on": true, "off": false, "x": null, "l": [1, {"k": null}]}')),
    # no tool parser
    (None, "<tool_call>{}</tool_call>", [TextDelta("<tool_call>{}</tool_call>")]),
]


@pytest.mark.parametrize("family,text,expected", GOLDEN)
def test_golden_every_split(family, text, expected):
    assert _all_splits_agree(text, family=family) == expected


REASONING = [
    (False, "<think>\nLet me think: 1+1.\n</think>\n\nIt is 2.",
     [ReasoningDelta("\nLet me think: 1+1.\n"), TextDelta("It is 2.")]),
    (True, "I must call the tool.</think>\n\n<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call>",
     [ReasoningDelta("I must call the tool."), *_call(0, "f", "{}")]),
    (False, "No thinking here <think> inline.", [TextDelta("No thinking here <think> inline.")]),
    (True, "Truncated reasoning <thi", [ReasoningDelta("Truncated reasoning <thi")]),
    (False, "<thi", [TextDelta("<thi")]),
]


@pytest.mark.parametrize("start_inside,text,expected", REASONING)
def test_reasoning_every_split(start_inside, text, expected):
    assert _all_splits_agree(text, family="hermes", reasoning=True, start_inside=start_inside) == expected


def test_arguments_stream_in_fragments():
    p = _parser("hermes")
    deltas = []
    text = '<tool_call>{"name": "f", "arguments": {"long": "' + "x" * 40 + '"}}</tool_call>'
    for i in range(0, len(text), 5):
        deltas += p.feed(text[i:i + 5])
    deltas += p.finish()
    args = [d for d in deltas if isinstance(d, ToolCallArgs)]
    assert len(args) > 3  # fragments, not one blob at the end
    assert isinstance(deltas[0], ToolCallStart)
    assert json.loads("".join(a.fragment for a in args)) == {"long": "x" * 40}


def test_truncated_call_keeps_the_started_call():
    out = _parse(['<tool_call>{"name": "f", "arguments": {"a": 1'], family="hermes")
    assert out == [ToolCallStart(0, "id0", "f"), ToolCallArgs(0, '{"a": 1')]


@pytest.mark.parametrize("template,renders_tools,family", [
    ("{{ '<tool_call>' }}{{ tools }}", True, "hermes"),
    ("{{ '[TOOL_CALLS]' }}{{ tools }}", True, "mistral"),
    ("{{ '<|python_tag|>' }}{{ tools }}", True, "llama3_json"),
    ("{{ '\"parameters\": <tool_call>' }}{{ tools }}", True, "hermes"),
    ("{{ tools }}", True, "hermes"),
    ("[func_name1(params_name1=params_value1)] {{ tools }}", True, "pythonic"),
    ("{{ messages }}", False, "generic"),
])
def test_detect_tool_parser(template, renders_tools, family):
    assert detect_tool_parser(template, renders_tools=renders_tools) == family


def test_detect_reasoning():
    assert detect_reasoning_parser("{{ '<think>\\n' }}") == "think"
    assert detect_reasoning_parser("{{ messages }}") is None


@pytest.mark.parametrize("family,text", [
    ("hermes", 'Hi <tool_call>\n{"name": "get'),
    ("llama3_json", '{"name": "ge'),
    ("mistral", "[TOOL_CALLS]get_wea"),
    ("pythonic", "[get_weather(city='Par"),
])
def test_call_cut_before_its_name_is_dropped(family, text):
    out = _all_splits_agree(text, family=family)
    assert all(isinstance(d, TextDelta) for d in out)
    assert "".join(d.text for d in out) == text[:text.index("<")] if "<" in text else not out


@pytest.mark.parametrize("family", ["generic", "llama3_json", "mistral", "pythonic"])
def test_generic_history_reads_back_as_the_same_calls(family):
    """An earlier call rendered into a generic-format prompt is what that family's parser
    reads as the same call (so the model sees its own syntax)."""
    from serve.chat_prep import _calls_text

    calls = [("get_weather", {"city": "Paris", "ok": True, "n": None}), ("ping", {})]
    out = _parse([_calls_text(family, calls)], family=family)
    names = [d.name for d in out if isinstance(d, ToolCallStart)]
    args = [json.loads(d.fragment) for d in out if isinstance(d, ToolCallArgs)]
    assert names == ["get_weather", "ping"] and args == [c[1] for c in calls]


PIECES = ["<tool_call>", "</tool_call>", "<think>", "</think>", "[TOOL_CALLS]", "[ARGS]", "<|python_tag|>",
          '{"name": "f", "arguments": ', '{"name": ', '"parameters": ', "{", "}", "[", "]", "(", ")",
          '"', "\\", "\\q", ",", ";", ":", " ", "\n", "f(a=1)", "true", "null", "x", "é", '"\\u12"',
          '{"\\q": 1}', '"name": "\\q"', "f(**a)", '"x', "[{"]


@pytest.mark.parametrize("family", ["hermes", "llama3_json", "mistral", "pythonic", None])
def test_fuzzed_outputs_parse_the_same_in_any_split(family):
    """Arbitrary mixes of markup never raise, and splits never change the parse."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=400, deadline=None, derandomize=True)
    @given(parts=st.lists(st.sampled_from(PIECES), max_size=14), cuts=st.lists(st.integers(0, 200), max_size=4),
           reasoning=st.booleans())
    def check(parts, cuts, reasoning):
        text = "".join(parts)
        kw = dict(family=family, reasoning=reasoning)
        whole = _parse([text], **kw)
        bounds = sorted({min(c, len(text)) for c in cuts})
        pieces = [text[a:b] for a, b in zip([0, *bounds], [*bounds, len(text)], strict=True)]
        assert _parse(pieces, **kw) == whole
        starts = {d.index for d in whole if isinstance(d, ToolCallStart)}
        assert {d.index for d in whole if isinstance(d, ToolCallArgs)} <= starts

    check()


def _finished(text, family):
    p = _parser(family)
    p.feed(text)
    p.finish()
    return p.calls_finished, p.open_calls


@pytest.mark.parametrize("family,text,finished,open_calls", [
    ("hermes", '<tool_call>\n{"name": "f", "arguments": {"city": "Pa', False, 1),
    ("hermes", '<tool_call>\n{"name": "f", "arguments": {"city": "Paris"}}\n</tool_call>', True, 0),
    ("hermes", '<tool_call>\n{"name": "f", "arguments": {"city": "Paris"}}\n</tool_', True, 0),
    ("hermes", '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>\n<tool_call>\n{"name": "g", '
               '"arguments": {"x"', False, 1),
    ("llama3_json", '{"name": "f", "parameters": {"a": [1, 2', False, 1),
    ("llama3_json", '{"name": "f", "parameters": {"a": 1}}', True, 0),
    ("mistral", '[TOOL_CALLS]f[ARGS]{"a": ', False, 1),
    ("mistral", '[TOOL_CALLS]f[ARGS]{"a": 1}', True, 0),
    ("mistral", '[{"name": "f", "arguments": {"a": 1}}, {"name": "g", "arguments": {', False, 1),
    ("pythonic", "[f(a=1), g(b=", False, 0),
    ("pythonic", "[f(a=1)]", True, 0),
    ("hermes", "no call at all", False, 0),
])
def test_cut_calls_are_not_finished(family, text, finished, open_calls):
    """QA findings 2, 3, 5: a call cut by max_tokens or a stop string is open, and the
    renderers then report the engine's reason instead of tool_calls."""
    assert _finished(text, family) == (finished, open_calls)


@pytest.mark.parametrize("family,text,content", [
    ("hermes", '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>\n<tool_', ""),
    ("hermes", '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>\n<', ""),
    ("hermes", "Let me check. <tool_", "Let me check. "),
    ("hermes", "a <", "a <"),
    ("llama3_json", "Calling <|python", "Calling "),
])
def test_a_cut_trigger_never_reaches_content(family, text, content):
    """QA finding 5: "<tool_" at the end of a cut output is markup, not text."""
    out = _all_splits_agree(text, family=family)
    assert "".join(d.text for d in out if isinstance(d, TextDelta)) == content


@pytest.mark.parametrize("text,value", [
    ('{"city": "Paris"}', {"city": "Paris"}),
    ('{"city": "Pa', {}),
    ('{"a": 1, "b": [2, "x', {"a": 1, "b": [2]}),
    ('{"a": {"b": 1}, "c"', {"a": {"b": 1}}),
    ('{"a": tr', {}),
    ('{"a": 12', {"a": 12}),
    ("", {}),
    ("[1, 2]", {}),
])
def test_partial_json_object(text, value):
    assert partial_json_object(text) == value


@pytest.mark.parametrize(("family", "text"), [("hermes", "<"), ("generic", "\n<"), ("mistral", "["),
                                              ("pythonic", "[")])
def test_a_partial_trigger_is_markup_when_only_calls_are_allowed(family, text):
    """QA s10: tool_choice "required" with max_tokens 1 returned content "<" (the first token
    of "<tool_call>") on chat, a "<" text block on /v1/messages. Where the grammar allows only
    calls, whatever is held back at the end is markup; in "auto" a lone "<" may be text."""
    forced = ChoiceParser(tool_parser=family, calls_only=True)
    assert [d for d in forced.feed(text) + forced.finish() if isinstance(d, TextDelta) and d.text.strip()] == []
    free = ChoiceParser(tool_parser=family)
    assert "".join(d.text for d in free.feed(text) + free.finish()) == text
