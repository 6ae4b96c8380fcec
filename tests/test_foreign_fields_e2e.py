"""Another wire format's field sent to a route is a 400 naming it, not silently dropped
(`serve.foreign_fields`), through the real server and the official SDKs.

QA s10: `client.responses.create(..., extra_body={"max_tokens": 2})` generated 8,161 tokens (the
whole context: `max_tokens` is chat's, the Responses API's is `max_output_tokens`); `stop`,
`n`, `logit_bias`, `response_format`, `structured_outputs`, the penalties were likewise
ignored on /v1/responses and /v1/messages (`seed`, `min_p` too on the latter), as were
`stop_sequences`, `system`, `max_output_tokens`, `text` on chat and `max_completion_tokens`,
`tools` on completions: all 200 with the field having no effect. OpenAI and Anthropic answer
400 to fields they do not know.
"""

from __future__ import annotations

from collections.abc import Iterator

import anthropic
import httpx
import openai
import pytest

from tests.test_server_e2e import running_server

MODEL = "tiny"
USER = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("foreign") / "server.log"
    with running_server(tiny_model_dir, "--model-name", MODEL, "--max-batch", "2", "--max-length", "256",
                        log_path=log) as base:
        yield base


@pytest.fixture
def oai(server) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{server}/v1", api_key="x", max_retries=0) as client:
        yield client


@pytest.fixture
def claude(server) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=server, api_key="x", max_retries=0) as client:
        yield client


@pytest.mark.parametrize(("extra", "alias"), [
    ({"max_tokens": 2}, "max_output_tokens"),
    ({"stop": ["a"]}, None),
    ({"n": 2}, None),
    ({"logit_bias": {"5": 100}}, None),
    ({"response_format": {"type": "json_object"}}, "text.format"),
    ({"structured_outputs": {"regex": "a+"}}, None),
    ({"frequency_penalty": 1.5}, None),
])
def test_responses_refuses_chat_fields(oai, extra, alias) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        oai.responses.create(model=MODEL, input="Hi", max_output_tokens=3, extra_body=extra)
    err = info.value.body
    (field,) = extra
    assert err["param"] == field and err["code"] == "unsupported_parameter"
    if alias:
        assert f"'{alias}'" in err["message"]


@pytest.mark.parametrize(("extra", "alias"), [
    ({"stop": ["a"]}, "stop_sequences"),
    ({"seed": 3}, None),
    ({"min_p": 0.5}, None),
    ({"n": 2}, None),
    ({"response_format": {"type": "json_object"}}, "output_config.format"),
    ({"logprobs": True}, None),
])
def test_messages_refuses_openai_fields(claude, extra, alias) -> None:
    with pytest.raises(anthropic.BadRequestError) as info:
        claude.messages.create(model=MODEL, max_tokens=3, messages=USER, extra_body=extra)
    body = info.value.body
    (field,) = extra
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert body["error"]["message"].startswith(f"'{field}'")  # Anthropic's bodies have no param
    if alias:
        assert f"'{alias}'" in body["error"]["message"]


@pytest.mark.parametrize(("route", "extra"), [
    ("/v1/chat/completions", {"max_output_tokens": 2}),
    ("/v1/chat/completions", {"stop_sequences": ["a"]}),
    ("/v1/chat/completions", {"system": "Answer in French."}),
    ("/v1/chat/completions", {"text": {"format": {"type": "json_object"}}}),
    ("/v1/completions", {"max_completion_tokens": 2}),
    ("/v1/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]}),
])
def test_chat_and_completions_refuse_the_other_formats_fields(server, route, extra) -> None:
    body = {"model": MODEL, "max_tokens": 3, **extra}
    body.update({"messages": USER} if "chat" in route else {"prompt": "Hi"})
    r = httpx.post(server + route, json=body, timeout=60)
    (field,) = extra
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field


def test_no_op_defaults_and_count_tokens_still_pass(oai, claude, server) -> None:
    """Clients send some of these at their defaults; count_tokens takes a create() body
    (with `max_tokens`, `stop`) as it is, since it generates nothing."""
    r = oai.responses.create(model=MODEL, input="Hi", max_output_tokens=2,
                             extra_body={"n": 1, "stop": [], "logprobs": False, "frequency_penalty": 0,
                                         "response_format": {"type": "text"}})
    assert r.status == "incomplete"
    m = claude.messages.create(model=MODEL, max_tokens=2, messages=USER,
                               extra_body={"n": 1, "stop": None, "seed": None})
    assert m.stop_reason == "max_tokens"
    c = oai.chat.completions.create(model=MODEL, messages=USER, max_tokens=2,
                                    extra_body={"stop_sequences": [], "system": "", "instructions": None})
    assert c.choices[0].finish_reason == "length"
    r = httpx.post(f"{server}/v1/messages/count_tokens", timeout=60,
                   json={"model": MODEL, "max_tokens": 3, "stop": ["x"], "n": 2, "messages": USER})
    assert r.status_code == 200 and r.json()["input_tokens"] > 0


def test_responses_function_call_output_must_answer_a_call(oai) -> None:
    """QA s10: a `function_call_output` whose `call_id` no `function_call` made (in `input` or
    the `previous_response_id` history) was rendered as a tool result; OpenAI answers 400
    ("No tool call found for function call output with call_id …")."""
    with pytest.raises(openai.BadRequestError) as info:
        oai.responses.create(model=MODEL, max_output_tokens=2, input=[
            {"role": "user", "content": "Hi"},
            {"type": "function_call_output", "call_id": "call_nope", "output": "sunny"}])
    assert info.value.body["param"] == "input[1].call_id" and "call_nope" in info.value.body["message"]
    tools = [{"type": "function", "name": "f", "parameters": {"type": "object", "properties": {}}}]
    first = oai.responses.create(model=MODEL, input="Hi", tools=tools, tool_choice="required", max_output_tokens=40)
    (call,) = [o for o in first.output if o.type == "function_call"]
    # answered in the same input, or through the stored history: fine
    same = oai.responses.create(model=MODEL, max_output_tokens=2, input=[
        {"role": "user", "content": "Hi"},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "ok"}])
    later = oai.responses.create(model=MODEL, max_output_tokens=2, previous_response_id=first.id, tools=tools,
                                 input=[{"type": "function_call_output", "call_id": call.call_id, "output": "ok"}])
    assert same.status == later.status == "incomplete"
