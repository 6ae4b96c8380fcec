"""The tool half of the chat request: legacy mapping, tool modes, the template shapes of
messages and tools, and the generic format's messages."""

from __future__ import annotations

import pytest

from serve.chat_prep import generic_messages
from serve.errors import InvalidRequestError
from serve.protocol import ChatCompletionRequest, parse_request

F = {"name": "f", "description": "does f", "parameters": {"type": "object", "properties": {"a": {}}}}
USER = [{"role": "user", "content": "hi"}]


def _req(**body):
    return parse_request(ChatCompletionRequest, {"messages": USER, **body})


@pytest.mark.parametrize("body,mode", [
    ({}, ("none", None)),
    ({"tools": [{"type": "function", "function": F}]}, ("auto", None)),
    ({"tools": [{"type": "function", "function": F}], "tool_choice": "none"}, ("none", None)),
    ({"tools": [{"type": "function", "function": F}], "tool_choice": "required"}, ("required", None)),
    ({"tools": [{"type": "function", "function": F}],
      "tool_choice": {"type": "function", "function": {"name": "f"}}}, ("named", "f")),
    ({"functions": [F]}, ("auto", None)),
    ({"functions": [F], "function_call": {"name": "f"}}, ("named", "f")),
    ({"functions": [F], "function_call": "none"}, ("none", None)),
    ({"tool_choice": "none"}, ("none", None)),
])
def test_tool_mode(body, mode):
    assert _req(**body).tool_mode() == mode


def test_template_shapes():
    req = _req(tools=[{"type": "function", "function": {"name": "g"}}], messages=[
        {"role": "developer", "content": "sys"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None, "function_call": {"name": "g", "arguments": '{"x": 1}'}},
        {"role": "function", "name": "g", "content": "42"},
    ])
    assert req.template_messages() == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "a\nb"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_g", "type": "function", "function": {"name": "g", "arguments": {"x": 1}}}]},
        {"role": "tool", "content": "42", "name": "g", "tool_call_id": "call_g"},
    ]
    assert req.tools[0].function.to_template() == {
        "type": "function", "function": {"name": "g", "parameters": {"type": "object", "properties": {}}}}


@pytest.mark.parametrize("body,param", [
    ({"tools": [{"type": "function", "function": F}], "function_call": "auto", "tool_choice": "auto"},
     "function_call"),
    ({"functions": [F], "function_call": {"nom": "f"}}, "function_call"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": [
        {"id": "1", "function": {"name": "f", "arguments": "{}"}}]}]}, "messages.[0].tool_calls"),
    ({"messages": [{"role": "function", "content": "x"}]}, "messages.[0].name"),
    ({"messages": [{"role": "assistant", "tool_calls": [
        {"id": "1", "function": {"name": "f", "arguments": "[1]"}}]}]},
     "messages.[0].tool_calls.[0].function.arguments"),
])
def test_errors(body, param):
    with pytest.raises(InvalidRequestError) as exc:
        _req(**body)
    assert exc.value.param == param


def test_generic_messages():
    messages = [
        {"role": "system", "content": "Be nice."},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"a": 1}}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "r1"},
        {"role": "tool", "tool_call_id": "c2", "content": "r2"},
    ]
    tools = [{"type": "function", "function": F}]
    out = generic_messages(messages, tools, mode="named", name="f")
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert out[0]["content"].startswith("Be nice.\n\n# Tools")
    assert '"name": "f"' in out[0]["content"] and "You must call the function `f` now." in out[0]["content"]
    assert out[2]["content"] == 'Checking.\n<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>'
    assert out[3]["content"] == "<tool_response>\nr1\n</tool_response>\n<tool_response>\nr2\n</tool_response>"
    assert messages[0]["content"] == "Be nice."  # not modified in place
    assert generic_messages(USER, tools, mode="auto", name=None)[0]["role"] == "system"


@pytest.mark.parametrize("body,param", [
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ({"web_search_options": {}}, "web_search_options"),
])
def test_output_changing_openai_fields_are_refused(body, param):
    with pytest.raises(InvalidRequestError) as exc:
        _req(**body)
    assert exc.value.param == param


def test_reasoning_effort_reaches_templates_that_read_it():
    from serve.chat_prep import render_chat

    class Tok:
        chat_template = "{{ reasoning_effort }}|{% for m in messages %}{{ m.content }}{% endfor %}"

        def apply_chat_template(self, messages, *, add_generation_prompt, tools, **extra):
            from serve.chat_template import render_chat_template

            return render_chat_template(self.chat_template, messages, tools=tools, **extra)

    assert render_chat(Tok(), _req(reasoning_effort="low", modalities=["text"])) == "low|hi"
    Tok.chat_template = "{% for m in messages %}{{ m.content }}{% endfor %}"
    with pytest.raises(InvalidRequestError) as exc:
        render_chat(Tok(), _req(verbosity="high"))
    assert exc.value.param == "verbosity"

