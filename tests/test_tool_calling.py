"""Tool calling through the real server and the official `openai` client, on the default
model (SmolLM2-135M-Instruct int4, whose ChatML template has no tool support, so the
generic format is rendered and parsed): required and named choices always give a valid
call of an offered function whose arguments validate; auto; streamed calls reassembled
equal the non-streamed ones; a full round trip; the legacy `functions`; named 400s.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import jsonschema
import openai
import pytest
from openai import OpenAI
from test_server_e2e import running_server

MODEL = "smollm2-135m-instruct"
pytestmark = pytest.mark.slow

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 40},
                   "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city"],
    "additionalProperties": False,
}
ADD = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
       "required": ["a", "b"], "additionalProperties": False}
SEARCH = {"type": "object",
          "properties": {"query": {"type": "string", "maxLength": 60},
                         "limit": {"type": "integer", "minimum": 1, "maximum": 10},
                         "tags": {"type": "array", "items": {"type": "string", "maxLength": 12},
                                  "maxItems": 3}},
          "required": ["query"], "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                      "parameters": WEATHER}},
    {"type": "function", "function": {"name": "add", "description": "Add two integers", "parameters": ADD}},
    {"type": "function", "function": {"name": "search", "description": "Search the web",
                                      "parameters": SEARCH, "strict": True}},
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
PROMPTS = [
    "What's the weather in Paris?",
    "What is 17 plus 25?",
    "Find recent news about solar panels.",
    "Is it raining in Tokyo right now? Use celsius.",
    "Hello! How are you today?",
]


@pytest.fixture(scope="module")
def base_url(default_model_dir, tmp_path_factory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("tools-server") / "server.log"
    with running_server(default_model_dir, "--max-batch", "4", "--model-name", MODEL,
                        log_path=log) as base:
        yield base


@pytest.fixture(scope="module")
def client(base_url) -> Iterator[OpenAI]:
    with OpenAI(base_url=f"{base_url}/v1", api_key="x", max_retries=0, timeout=120) as c:
        yield c


def _chat(client, prompt, **kw):
    kw.setdefault("temperature", 0)
    kw.setdefault("max_tokens", 120)
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                          tools=TOOLS, **kw)


def _check_call(call, names=tuple(SCHEMAS)):
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name in names
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, SCHEMAS[call.function.name])
    return args


@pytest.mark.parametrize("prompt", PROMPTS)
def test_required_always_calls_an_offered_function(client, prompt):
    choice = _chat(client, prompt, tool_choice="required").choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert len(choice.message.tool_calls) == 1  # parallel_tool_calls defaults to one call
    _check_call(choice.message.tool_calls[0])


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_named_choice_calls_that_function(client, name):
    for prompt in PROMPTS[:2]:
        choice = _chat(client, prompt, tool_choice={"type": "function", "function": {"name": name}}).choices[0]
        assert choice.finish_reason == "tool_calls"
        [call] = choice.message.tool_calls
        _check_call(call, names=(name,))


def test_sampled_required_calls_with_n(client):
    resp = _chat(client, PROMPTS[0], tool_choice="required", temperature=1.0, seed=7, n=3)
    assert len(resp.choices) == 3
    for choice in resp.choices:
        assert choice.finish_reason == "tool_calls"
        _check_call(choice.message.tool_calls[0])


def test_parallel_tool_calls_allows_several(client):
    choice = _chat(client, "Weather in Paris, and in Rome?", tool_choice="required",
                   parallel_tool_calls=True, max_tokens=200).choices[0]
    calls = choice.message.tool_calls
    assert calls, choice
    assert len({c.id for c in calls}) == len(calls)
    if choice.finish_reason == "length":  # a small model may call on and on: the last is cut
        calls = calls[:-1]
    else:
        assert choice.finish_reason == "tool_calls"
    assert calls
    for call in calls:
        _check_call(call)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_auto_is_text_or_a_valid_call(client, prompt):
    choice = _chat(client, prompt, tool_choice="auto").choices[0]
    message = choice.message
    assert "<tool_call>" not in (message.content or "")
    if message.tool_calls:
        assert choice.finish_reason == "tool_calls"
        for call in message.tool_calls:
            _check_call(call)
    else:
        assert choice.finish_reason in ("stop", "length") and message.content


@pytest.mark.parametrize("prompt", PROMPTS[:2])
def test_auto_with_response_format_is_a_call_or_a_valid_answer(client, prompt):
    schema = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 80}},
              "required": ["answer"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "Answer", "schema": schema, "strict": True}}
    choice = _chat(client, prompt, tool_choice="auto", response_format=fmt).choices[0]
    if choice.message.tool_calls:
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        _check_call(choice.message.tool_calls[0])
    else:
        jsonschema.validate(json.loads(choice.message.content), schema)


def test_none_renders_tools_and_calls_nothing(client):
    choice = _chat(client, PROMPTS[0], tool_choice="none").choices[0]
    assert choice.message.tool_calls is None and choice.message.content
    assert choice.finish_reason in ("stop", "length")


def _reassemble(stream):
    """A stream's chunks → (content, calls, finish_reason), checking OpenAI's delta shape."""
    content, calls, finish = "", {}, None
    for chunk in stream:
        if not chunk.choices:
            continue
        c = chunk.choices[0]
        delta = c.delta
        content += delta.content or ""
        for tc in delta.tool_calls or ():
            if tc.index not in calls:  # the first delta of a call: id, type, name, ""
                assert tc.id and tc.type == "function" and tc.function.name
                assert tc.function.arguments == ""
                calls[tc.index] = {"id": tc.id, "name": tc.function.name, "arguments": ""}
            else:
                assert tc.id is None and tc.function.name is None
                calls[tc.index]["arguments"] += tc.function.arguments
        finish = c.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


@pytest.mark.parametrize("tool_choice", ["required", "auto", {"type": "function", "function": {"name": "search"}}])
@pytest.mark.parametrize("prompt", PROMPTS[::2])
def test_streamed_calls_equal_non_streamed(client, prompt, tool_choice):
    whole = _chat(client, prompt, tool_choice=tool_choice).choices[0]
    content, calls, finish = _reassemble(_chat(client, prompt, tool_choice=tool_choice, stream=True))
    assert finish == whole.finish_reason
    assert (content or None) == whole.message.content
    expected = [{"name": c.function.name, "arguments": c.function.arguments}
                for c in whole.message.tool_calls or ()]
    assert [{"name": c["name"], "arguments": c["arguments"]} for c in calls] == expected


def test_raw_stream_bytes_carry_no_markup(base_url):
    body = {"model": MODEL, "messages": [{"role": "user", "content": PROMPTS[0]}], "tools": TOOLS,
            "tool_choice": "required", "temperature": 0, "max_tokens": 100, "stream": True}
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=120) as r:
        text = "".join(r.iter_text())
    assert "tool_call>" not in text and '"tool_calls"' in text and text.rstrip().endswith("[DONE]")


def test_round_trip(client, base_url):
    messages = [{"role": "user", "content": "What's the weather in Paris?"}]
    first = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                           temperature=0, max_tokens=100)
    call = first.choices[0].message.tool_calls[0]
    messages.append(first.choices[0].message.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": call.id,
                     "content": json.dumps({"temperature": 21, "sky": "sunny"})})
    second = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS,
                                            tool_choice="none", temperature=0, max_tokens=60)
    answer = second.choices[0]
    assert answer.message.tool_calls is None
    assert answer.message.content and answer.finish_reason in ("stop", "length")
    # the call and the tool result reached the prompt (generic format: a user turn)
    tokens = httpx.post(f"{base_url}/tokenize", json={"messages": messages, "tools": TOOLS},
                        timeout=30).json()["tokens"]
    prompt = httpx.post(f"{base_url}/detokenize", json={"tokens": tokens}, timeout=30).json()["prompt"]
    assert "<tool_response>" in prompt and '"sky": "sunny"' in prompt and '"name": "get_weather"' in prompt
    assert "# Tools" in prompt and '"description": "Search the web"' in prompt


def test_legacy_functions(client):
    resp = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Add 2 and 3."}],
        functions=[t["function"] for t in TOOLS], function_call={"name": "add"},
        temperature=0, max_tokens=60)
    choice = resp.choices[0]
    assert choice.finish_reason == "function_call"
    assert choice.message.function_call.name == "add"
    jsonschema.validate(json.loads(choice.message.function_call.arguments), ADD)


@pytest.mark.parametrize("body,param", [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"not": {"type": "string"}}}}}}],
      "tool_choice": "required"}, "tools.[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.[0].function.name"),
    ({"tools": [{"type": "retrieval"}]}, "tools.[0].type"),
    ({"tools": TOOLS + TOOLS[:1]}, "tools"),
    ({"tools": TOOLS, "functions": [TOOLS[0]["function"]]}, "functions"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "42"}]},
     "messages.[1].tool_call_id"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "add", "arguments": "{not json"}}]}]},
     "messages.[0].tool_calls.[0].function.arguments"),
    ({"chat_template_kwargs": {"tools": []}}, "chat_template_kwargs"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"reasoning_effort": "high"}, "reasoning_effort"),  # ChatML does not read it
    # QA finding 1: llguidance's failures on client input are 400s, never 500s
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "array", "maxItems": 10 ** 30}}}}}],
      "tool_choice": "auto"}, "tools.[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"enum": [10 ** 30]}}}}}]}, "tools.[0].function.parameters"),
    ({"tools": TOOLS, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "integer", "minimum": 10 ** 30}}}}, "response_format"),
])
def test_bad_requests_name_the_param(client, body, param):
    body = {"messages": [{"role": "user", "content": "hi"}], **body}
    extra = {k: body.pop(k) for k in ("chat_template_kwargs",) if k in body}
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=MODEL, extra_body=extra, **body)
    assert exc.value.status_code == 400
    assert exc.value.body["param"] == param, exc.value.body



# ------------------------------------------------------------ calls cut by max_tokens or a stop


def _both(client, prompt, **kw):
    """(non-streamed choice, (content, calls, finish) reassembled from the stream)."""
    whole = _chat(client, prompt, **kw).choices[0]
    return whole, _reassemble(_chat(client, prompt, stream=True, **kw))


def _json_ok(text):
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


# A prompt whose required call is get_weather by a real margin: its first name token "get" is
# 3.67 logits ahead of the best token of another tool ("search") with fp32 KV, 3.62 with the
# default int8 KV, and 3.45 / 3.16 ahead of the runner-up "g" (get_weather too) (2026-11-30). PROMPTS[0] ("What's the weather in Paris?") is a coin flip
# between get_weather and search: "g" 0.20 ahead of "s" with fp32 KV, "s" 0.24 ahead with int8.
GET_WEATHER_PROMPT = "Get the weather for Paris."


@pytest.mark.parametrize("cut", [{"stop": ["Par"]}, {"max_tokens": 17}])
@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_a_call_cut_short_keeps_the_engine_reason(client, cut, tool_choice):
    """QA finding 3: a stop string or max_tokens that cuts a call reports "stop"/"length",
    never "tool_calls"; the partial call is kept as written (as OpenAI does for length)."""
    whole, (content, calls, finish) = _both(client, GET_WEATHER_PROMPT, tool_choice=tool_choice, **cut)
    reason = "stop" if "stop" in cut else "length"
    assert whole.finish_reason == finish == reason
    (call,) = whole.message.tool_calls
    assert call.function.name == "get_weather" and not _json_ok(call.function.arguments)
    assert [(c["name"], c["arguments"]) for c in calls] == [("get_weather", call.function.arguments)]
    assert not whole.message.content and not content


def test_legacy_function_call_cut_by_a_stop_is_stop(client):
    resp = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": PROMPTS[0]}],
        functions=[t["function"] for t in TOOLS], function_call={"name": "get_weather"},
        temperature=0, max_tokens=60, stop=["Par"])
    assert resp.choices[0].finish_reason == "stop"
    assert not _json_ok(resp.choices[0].message.function_call.arguments)


def test_max_tokens_between_parallel_calls_leaks_no_markup(client):
    """QA finding 5: wherever max_tokens cuts after a whole call (in the blank, inside the
    next "<tool_call>"), content stays empty; whole calls keep valid JSON; finish is length."""
    prompt = "What's the weather in Paris and the time in Tokyo?"
    one = _chat(client, prompt, tool_choice="required", parallel_tool_calls=False)
    assert one.choices[0].finish_reason == "tool_calls"
    n = one.usage.completion_tokens  # the first call (the grammar then allows only EOS)
    for max_tokens in range(n, n + 7):
        whole, (content, calls, finish) = _both(client, prompt, tool_choice="required", parallel_tool_calls=True,
                                                max_tokens=max_tokens)
        assert not whole.message.content and not content, max_tokens
        assert finish == whole.finish_reason
        if whole.finish_reason == "length":
            first = whole.message.tool_calls[0]
            assert first.function.arguments == one.choices[0].message.tool_calls[0].function.arguments
        assert [c["arguments"] for c in calls] == [c.function.arguments for c in whole.message.tool_calls]


def test_auto_with_one_call_ends_after_it(client):
    """QA finding 4 (its repro): tool_choice auto without parallel_tool_calls ends after the
    call's closing tag instead of writing newlines until max_tokens. The bias makes the model
    write the "<tool_call>" trigger ('<' 'tool' '_' 'call' '>'): with '<' at +4, as in QA's
    repro, only 9 of seeds 0-15 (fp32 KV) and 7 (int8 KV) started a call at all, the rest
    writing text to the limit, so seed 0 tested a coin flip; with '<' at +8 all 16 started
    one on either KV and ended after it within 49 tokens (2026-11-30)."""
    resp = client.chat.completions.create(
        model=MODEL, max_tokens=300, seed=0, temperature=0.8,
        logit_bias={"44": 8, "19324": 6, "79": 6, "4350": 6, "46": 6},
        messages=[{"role": "system", "content": "You MUST answer by calling a tool using <tool_call>."},
                  {"role": "user", "content": "Call get_weather for Paris now."}],
        tools=[{"type": "function", "function": {"name": "get_weather", "parameters": {
            "type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]}}}])
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert resp.usage.completion_tokens < 60


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_a_call_cut_in_its_trigger_leaks_no_markup(client, base_url, tool_choice):
    """QA s10: tool_choice "required" with max_tokens 1 answered content "<" (the first token
    of "<tool_call>"), streamed and not, and /v1/messages a text block "<". Under a forced call
    every token is markup: a trigger cut short is dropped however short."""
    for max_tokens in (1, 2, 3):
        whole, (content, calls, finish) = _both(client, GET_WEATHER_PROMPT, tool_choice=tool_choice,
                                                max_tokens=max_tokens)
        assert not whole.message.content and not content, max_tokens
        assert whole.finish_reason == finish == "length"
    msg = httpx.post(f"{base_url}/v1/messages", timeout=60, json={
        "model": MODEL, "max_tokens": 1, "tool_choice": {"type": "any"},
        "messages": [{"role": "user", "content": GET_WEATHER_PROMPT}],
        "tools": [{"name": "get_weather", "input_schema": WEATHER}]}).json()
    assert msg["content"] == [] and msg["stop_reason"] == "max_tokens"
