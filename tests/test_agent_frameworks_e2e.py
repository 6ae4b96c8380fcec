"""Agent frameworks' wire habits through the real server, with the official clients: what
session 11's QA found a framework sending that the routes did not take.

- The `anthropic` SDK's `beta.messages.tool_runner` runs on the threads beta by default:
  its first request says `thread: {"type": "create"}`, each later one `{"type": "continue",
  "previous_message_id"}` with only the new `tool_result` message and no `tools` or `system`.
  The server ignored `thread`, so the second turn was a 400 (a `tool_result` for no
  `tool_use`) and the runner failed on its first tool call.

The default model, greedy where the SDK lets us say so; `tool_choice: any` makes the calls
certain whatever the model would write.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import anthropic
import httpx
import openai
import pytest

from serve.model_dir import load_model_info
from tests.test_server_e2e import running_server

WEATHER = {"name": "get_weather", "description": "The weather in a city.",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


@pytest.fixture(scope="module")
def server(default_model_dir, tmp_path_factory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("agent-frameworks") / "server.log"
    with running_server(default_model_dir, "--max-batch", "2", log_path=log) as base:
        yield base


@pytest.fixture(scope="module")
def model(default_model_dir) -> str:
    return load_model_info(default_model_dir).name


@pytest.fixture
def claude(server) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=server, api_key="unused", max_retries=0, timeout=120) as c:
        yield c


@pytest.mark.parametrize("stream", [False, True])
def test_anthropic_tool_runner_continues_its_thread(claude, model, stream):
    calls = []

    @anthropic.beta_tool
    def get_weather(city: str) -> str:
        """The weather in a city.

        Args:
            city: the city
        """
        calls.append(city)
        return "sunny, 21 C"

    runner = claude.beta.messages.tool_runner(
        model=model, max_tokens=60, tools=[get_weather], tool_choice={"type": "any"}, max_iterations=2,
        messages=[{"role": "user", "content": "What is the weather in Paris?"}], extra_body={"temperature": 0},
        stream=stream)
    replies = []
    for turn in runner:
        if stream:
            for _ in turn:
                pass
            turn = turn.get_final_message()
        replies.append(turn)
    # two turns: the second continued the thread (only its tool_result sent) and called again
    assert [m.stop_reason for m in replies] == ["tool_use", "tool_use"]
    assert len(calls) == 2 and all(isinstance(c, str) for c in calls)
    assert replies[0].id != replies[1].id


def post(server: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server}/v1/messages", json=body, timeout=120)


def test_thread_continue_takes_system_tools_and_history(server, model):
    first = {"model": model, "max_tokens": 40, "temperature": 0, "system": "Use the tools.", "tools": [WEATHER],
             "tool_choice": {"type": "any"}, "messages": [{"role": "user", "content": "Weather in Rome?"}]}
    r1 = post(server, {**first, "thread": {"type": "create"}})
    assert r1.status_code == 200, r1.text
    reply = r1.json()
    (use,) = [b for b in reply["content"] if b["type"] == "tool_use"]
    result = {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use["id"], "content": "rain"}]}
    thread = {"type": "continue", "previous_message_id": reply["id"]}
    # the prompt of the continue is the whole conversation's: count_tokens agrees
    whole = {**first, "messages": [*first["messages"], {"role": "assistant", "content": reply["content"]}, result]}
    counted = httpx.post(f"{server}/v1/messages/count_tokens", json=whole, timeout=60).json()["input_tokens"]
    short = {"model": model, "max_tokens": 40, "temperature": 0, "messages": [result], "thread": thread,
             "tool_choice": {"type": "any"}}
    assert httpx.post(f"{server}/v1/messages/count_tokens", json=short,
                      timeout=60).json()["input_tokens"] == counted
    # the thread's tools are in force: tool_choice any still calls get_weather
    r2 = post(server, short)
    assert r2.status_code == 200, r2.text
    second = r2.json()
    assert second["stop_reason"] == "tool_use" and second["content"][-1]["name"] == "get_weather"
    assert second["usage"]["input_tokens"] + second["usage"]["cache_read_input_tokens"] == counted
    # and the same text as the whole conversation sent without a thread
    r3 = post(server, whole)
    assert [b.get("input") for b in r3.json()["content"]] == [b.get("input") for b in second["content"]]

    # each reply is continued once, as at Anthropic; the SDK then replays the whole conversation
    again = post(server, short)
    assert again.status_code == 400
    assert again.json()["error"]["details"] == {"error_code": "thread_already_continued"}
    # the newest reply continues, and its thread's create-only fields may only be repeated unchanged
    later = {**short, "thread": {"type": "continue", "previous_message_id": second["id"]},
             "messages": [{"role": "user", "content": [
                 {"type": "tool_result", "tool_use_id": second["content"][-1]["id"], "content": "sun"}]}]}
    changed = post(server, {**later, "system": "Something else."})
    assert changed.status_code == 400
    body = changed.json()["error"]
    assert body["details"] == {"error_code": "thread_fingerprint_mismatch"} and "system" in body["message"]
    assert post(server, {**later, "system": "Use the tools.", "tools": [WEATHER]}).status_code == 200


def test_a_reply_is_continued_by_one_request_at_a_time(server, model):
    # the check was only at the start: two continuations of one reply in flight together both
    # ran, and the thread forked. The first accepted holds it; one that fails hands it back
    first = {"model": model, "max_tokens": 40, "temperature": 0, "tools": [WEATHER], "tool_choice": {"type": "any"},
             "messages": [{"role": "user", "content": "Weather in Oslo?"}], "thread": {"type": "create"}}
    reply = post(server, first).json()
    (use,) = [b for b in reply["content"] if b["type"] == "tool_use"]
    thread = {"type": "continue", "previous_message_id": reply["id"]}
    result = {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use["id"], "content": "snow"}]}
    cont = {"model": model, "max_tokens": 40, "temperature": 0, "messages": [result], "thread": thread}

    # a continuation that fails before replying (a tool_result for no tool_use) frees it again
    bad = {**cont, "messages": [{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "toolu_nope", "content": "x"}]}]}
    assert post(server, bad).status_code == 400
    # so does a stream its client leaves before the reply ends
    with httpx.stream("POST", f"{server}/v1/messages", json={**cont, "stream": True}, timeout=120) as left:
        assert left.status_code == 200
        next(left.iter_lines())
    # (its server side notices the leaving a moment later)
    with httpx.Client(base_url=server, timeout=120) as client:
        for _ in range(50):
            held = client.send(client.build_request("POST", "/v1/messages", json={**cont, "stream": True}),
                               stream=True)
            if held.status_code == 200:
                break
            held.read()
            held.close()
            time.sleep(0.1)
        # while that stream continues the reply, a second continuation is refused
        assert held.status_code == 200
        lines = held.iter_lines()
        next(lines)
        second = post(server, cont)
        assert second.status_code == 400, second.text
        assert second.json()["error"]["details"] == {"error_code": "thread_already_continued"}
        body = "\n".join(lines)
        held.close()
    assert "message_stop" in body
    # and once it has replied, the reply stays continued
    assert post(server, cont).json()["error"]["details"] == {"error_code": "thread_already_continued"}


def test_unknown_thread_is_thread_not_found(claude, model):
    with pytest.raises(anthropic.NotFoundError) as caught:
        claude.messages.create(model=model, max_tokens=5, messages=[{"role": "user", "content": "hi"}],
                               extra_body={"thread": {"type": "continue", "previous_message_id": "msg_nope"}})
    assert caught.value.error_code == "thread_not_found"  # the SDK's cue to replay in full
    with pytest.raises(anthropic.BadRequestError) as caught:
        claude.messages.create(model=model, max_tokens=5, messages=[{"role": "user", "content": "hi"}],
                               extra_body={"thread": {"type": "fork"}})
    assert "thread.type" in caught.value.message


# ---------------------------------------------- newer fields that change what comes back


@pytest.fixture
def oai(server) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


FUNCTION = {"type": "function", "name": "f", "parameters": {"type": "object"}, "strict": False}


@pytest.mark.parametrize("route, extra, param", [
    ("chat", {"moderation": {"model": "omni-moderation-latest"}}, "moderation"),
    ("responses", {"moderation": {"model": "omni-moderation-latest", "policy": {"output": {"mode": "block"}}}},
     "moderation"),
    ("responses", {"context_management": [{"type": "compaction", "compact_threshold": 1000}]},
     "context_management"),
    ("responses", {"tools": [{"type": "function", "name": "f", "parameters": {"type": "object"},
                              "strict": False, "defer_loading": True}]}, "tools[0].defer_loading"),
    # openai 3.57's FunctionTool: a function only a program may call (programmatic tool
    # calling, which this server has not) was offered to the model; `async` was dropped; a
    # string "false" read as true
    ("responses", {"tools": [{**FUNCTION, "allowed_callers": ["programmatic"]}]}, "tools[0].allowed_callers"),
    ("responses", {"tools": [{**FUNCTION, "allowed_callers": []}]}, "tools[0].allowed_callers"),
    ("responses", {"tools": [{**FUNCTION, "allowed_callers": "direct"}]}, "tools[0].allowed_callers"),
    ("responses", {"tools": [{**FUNCTION, "async": True}]}, "tools[0].async"),
    ("responses", {"tools": [{**FUNCTION, "defer_loading": "false"}]}, "tools[0].defer_loading"),
])
def test_openai_fields_that_would_be_ignored_are_400s(oai, model, route, extra, param):
    with pytest.raises(openai.BadRequestError) as caught:
        if route == "chat":
            oai.chat.completions.create(model=model, max_tokens=5, messages=[{"role": "user", "content": "hi"}],
                                        extra_body=extra)
        else:
            oai.responses.create(model=model, max_output_tokens=5, input="hi", extra_body=extra)
    assert caught.value.body["param"] == param


@pytest.mark.parametrize("route", ["chat", "completions"])
def test_vllm_continuous_usage_stats_is_refused(oai, model, route):
    """vLLM's `stream_options.continuous_usage_stats` (usage in every chunk) was ignored."""
    extra = {"stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    with pytest.raises(openai.BadRequestError) as caught:
        if route == "chat":
            oai.chat.completions.create(model=model, max_tokens=5, messages=[{"role": "user", "content": "hi"}],
                                        stream=True, extra_body=extra)
        else:
            oai.completions.create(model=model, max_tokens=5, prompt="hi", stream=True, extra_body=extra)
    assert caught.value.body["param"] == "stream_options.continuous_usage_stats"
    chunks = list(oai.chat.completions.create(
        model=model, max_tokens=3, messages=[{"role": "user", "content": "hi"}], stream=True,
        stream_options={"include_usage": True}, extra_body={"stream_options": {
            "include_usage": True, "continuous_usage_stats": False}}))
    assert chunks[-1].usage.completion_tokens == 3


@pytest.mark.parametrize("extra, where", [
    ({"compaction": {"type": "summarize"}}, "compaction"),
    ({"context_management": {"edits": [{"type": "clear_tool_uses_20250919"}]}}, "context_management"),
    ({"tools": [{**WEATHER, "defer_loading": True}]}, "tools.[0].defer_loading"),
    ({"tools": [{**WEATHER, "input_examples": {"city": "Rome"}}]}, "tools.[0].input_examples"),
    # anthropic 2.14's ToolParam: a tool only code execution may call was offered to the model
    ({"tools": [{**WEATHER, "allowed_callers": ["code_execution_20250825"]}]}, "tools.[0].allowed_callers"),
    ({"tools": [{**WEATHER, "defer_loading": "false"}]}, "tools.[0].defer_loading"),
    ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, "thinking"),
])
def test_anthropic_fields_that_would_be_ignored_are_400s(claude, model, extra, where):
    with pytest.raises(anthropic.BadRequestError) as caught:
        claude.messages.create(model=model, max_tokens=5, messages=[{"role": "user", "content": "hi"}],
                               extra_body=extra)
    message = caught.value.body["error"]["message"]
    assert message.startswith((f"{where}:", f"'{where}'")), message  # Anthropic's "field: what" style


def test_no_op_values_of_those_fields_pass(oai, claude, model):
    assert oai.responses.create(model=model, max_output_tokens=3, input="hi",
                                extra_body={"context_management": [], "moderation": None}).status
    assert claude.messages.create(model=model, max_tokens=3, messages=[{"role": "user", "content": "hi"}],
                                  extra_body={"context_management": {"edits": []}, "compaction": None}).id
    # the model calls tools directly, which is what these ask; a program never runs here
    for tool in ({**FUNCTION, "allowed_callers": ["direct", "programmatic"], "async": False, "defer_loading": False},
                 {**FUNCTION, "allowed_callers": None, "async": None}):
        assert oai.responses.create(model=model, max_output_tokens=3, input="hi", tools=[tool]).status
    for tool in ({**WEATHER, "allowed_callers": ["direct", "code_execution_20250825"], "defer_loading": False},
                 {**WEATHER, "allowed_callers": ["direct"], "eager_input_streaming": True}):
        assert claude.messages.create(model=model, max_tokens=3, messages=[{"role": "user", "content": "hi"}],
                                      tools=[tool]).id


def test_messages_tool_result_is_error_must_be_a_boolean(claude, model):
    """`is_error: "false"` read as true: the result went to the model as an error."""
    def turn(is_error):
        return [{"role": "user", "content": "Weather in Rome?"},
                {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                                   "input": {"city": "Rome"}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny",
                                              "is_error": is_error}]}]

    def count(is_error) -> int:
        return claude.messages.count_tokens(model=model, tools=[WEATHER], messages=turn(is_error)).input_tokens

    assert count(True) > count(False) == count(None)  # an error result is marked so
    for bad in ("false", 0, "yes"):
        with pytest.raises(anthropic.BadRequestError) as caught:
            claude.messages.create(model=model, max_tokens=3, tools=[WEATHER], messages=turn(bad))
        assert caught.value.body["error"]["message"].startswith("'messages.[2].content.[0].is_error' must be a boolean")


# ------------------------------------- a tool call the next turn does not answer, on every route


def test_an_unanswered_tool_call_is_400_on_every_route(oai, claude, model):
    """A history whose tool call has no result (a client that dropped it, or went on with a
    user turn) was rendered as if the call had been answered and answered 200; OpenAI's chat
    and Responses APIs and Anthropic's answer 400 naming the call."""
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}
    second = {**call, "id": "call_2"}
    chat_cases = [  # (messages after the user's question, the param)
        ([{"role": "assistant", "content": None, "tool_calls": [call]}], "messages.[1].tool_calls.[0].id"),
        ([{"role": "assistant", "content": None, "tool_calls": [call]}, {"role": "user", "content": "and?"}],
         "messages.[1].tool_calls.[0].id"),
        ([{"role": "assistant", "content": None, "tool_calls": [call, second]},
          {"role": "tool", "tool_call_id": "call_2", "content": "sunny"}, {"role": "user", "content": "and?"}],
         "messages.[1].tool_calls.[0].id"),
    ]
    for rest, param in chat_cases:
        with pytest.raises(openai.BadRequestError) as caught:
            oai.chat.completions.create(model=model, max_tokens=3, tools=[_fn("get_weather", "w")],
                                        messages=[{"role": "user", "content": "Weather?"}, *rest])
        assert caught.value.body["param"] == param, rest
        assert "call_1" in caught.value.body["message"]
    answered = [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}, {"role": "user", "content": "and?"}]
    assert oai.chat.completions.create(model=model, max_tokens=3, messages=answered).choices

    function_call = {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{}"}
    for items in ([function_call], [function_call, {"role": "user", "content": "and?"}]):
        with pytest.raises(openai.BadRequestError) as caught:
            oai.responses.create(model=model, max_output_tokens=3, input=[{"role": "user", "content": "Weather?"},
                                                                          *items])
        assert caught.value.body["param"] == "input[1].call_id"
        assert caught.value.body["message"] == "No tool output found for function call call_1."
    # a stored call answered in the next request (previous_response_id) is fine; not answered, a 400
    first = oai.responses.create(model=model, max_output_tokens=60, input="Weather in Rome?", tool_choice="required",
                                 temperature=0, tools=[{"type": "function", **TWO_TOOLS[0]["function"]}])
    made = [o for o in first.output if o.type == "function_call"]
    assert made and first.status == "completed"
    with pytest.raises(openai.BadRequestError) as caught:
        oai.responses.create(model=model, max_output_tokens=3, previous_response_id=first.id, input="and?")
    assert f"function call {made[0].call_id}." in caught.value.body["message"]
    assert oai.responses.create(model=model, max_output_tokens=3, previous_response_id=first.id, input=[
        {"type": "function_call_output", "call_id": made[0].call_id, "output": "sunny"}]).status

    tool_use = {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                                  "input": {"city": "Rome"}}]}
    with pytest.raises(anthropic.BadRequestError) as caught:
        claude.messages.create(model=model, max_tokens=3, tools=[WEATHER], messages=[
            {"role": "user", "content": "Weather?"}, tool_use, {"role": "user", "content": "and?"}])
    assert caught.value.body["error"]["message"].startswith(
        "messages.[2].content: `tool_use` ids were found without `tool_result`")


def test_anthropic_tool_input_examples_reach_the_prompt(claude, model):
    messages = [{"role": "user", "content": "Weather in Rome?"}]
    plain = claude.messages.count_tokens(model=model, messages=messages, tools=[WEATHER]).input_tokens
    shown = claude.messages.count_tokens(model=model, messages=messages, tools=[
        {**WEATHER, "input_examples": [{"city": "Reykjavík"}, {"city": "Lima"}]}]).input_tokens
    assert shown > plain + 10  # "Input examples:" and two JSON lines
    assert claude.messages.count_tokens(model=model, messages=messages, tools=[
        {**WEATHER, "input_examples": []}]).input_tokens == plain


def test_disable_parallel_tool_use_false_allows_several_calls(claude, model):
    """Anthropic's default allows several calls and this server's is one; an explicit
    `disable_parallel_tool_use: false` (litellm's `parallel_tool_calls=True`) was dropped."""
    def calls(disable: bool) -> int:
        m = claude.messages.create(model=model, max_tokens=120, tools=[WEATHER],
                                   tool_choice={"type": "any", "disable_parallel_tool_use": disable},
                                   messages=[{"role": "user", "content": "Weather in Paris and in Rome?"}],
                                   extra_body={"temperature": 0})
        return sum(b.type == "tool_use" for b in m.content)

    assert calls(True) == 1
    assert calls(False) >= 2


# ---------------------------------------------------------- allowed_tools tool_choice

def _fn(name: str, description: str) -> dict:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


TWO_TOOLS = [_fn("get_weather", "The weather in a city."), _fn("get_time", "The local time in a city.")]
ASK = "What is the weather in Paris?"


def test_chat_allowed_tools_restricts_the_calls(oai, model):
    """pydantic-ai sends `allowed_tools` to any OpenAI-compatible server when a run restricts
    its tools (`tool_choice=[...]`, `ToolOrOutput`): it was a 400, failing the run."""
    def called(tool_choice) -> list[str]:
        r = oai.chat.completions.create(model=model, messages=[{"role": "user", "content": ASK}], tools=TWO_TOOLS,
                                        tool_choice=tool_choice, temperature=0, max_tokens=60)
        return [c.function.name for c in r.choices[0].message.tool_calls or ()]

    assert called("required") == ["get_weather"]  # what the model picks when it may
    assert called({"type": "allowed_tools", "allowed_tools": {"mode": "required", "tools": [
        {"type": "function", "function": {"name": "get_time"}}]}}) == ["get_time"]
    with pytest.raises(openai.BadRequestError) as caught:
        called({"type": "allowed_tools", "allowed_tools": {"mode": "required", "tools": [
            {"type": "function", "function": {"name": "get_date"}}]}})
    assert caught.value.body["param"] == "tool_choice" and "get_date" in caught.value.body["message"]
    with pytest.raises(openai.BadRequestError) as caught:
        called({"type": "allowed_tools", "allowed_tools": {"mode": "sometimes", "tools": []}})
    assert caught.value.body["param"] == "tool_choice"


def test_responses_allowed_tools_restricts_the_calls(oai, model):
    tools = [{"type": "function", **t["function"]} for t in TWO_TOOLS]

    def called(tool_choice) -> list[str]:
        r = oai.responses.create(model=model, input=ASK, tools=tools, tool_choice=tool_choice, temperature=0,
                                 max_output_tokens=60)
        return [o.name for o in r.output if o.type == "function_call"]

    assert called("required") == ["get_weather"]
    assert called({"type": "allowed_tools", "mode": "required",
                   "tools": [{"type": "function", "name": "get_time"}]}) == ["get_time"]
    # a wrong shape is named in the Responses' flat spelling (it was chat's nested one)
    with pytest.raises(openai.BadRequestError) as caught:
        called({"type": "allowed_tools", "mode": "required", "tools": [{"type": "function",
                                                                       "function": {"name": "get_time"}}]})
    assert caught.value.body["param"] == "tool_choice.tools[0]" and "'name'" in caught.value.body["message"]


# ------------------------------------------- max_tokens past the context (Anthropic's rule)

@pytest.fixture(scope="module")
def small_context(default_model_dir, tmp_path_factory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("agent-frameworks-512") / "server.log"
    with running_server(default_model_dir, "--max-length", "512", "--max-batch", "1", log_path=log) as base:
        yield base


def test_messages_max_tokens_past_the_context_stops_at_its_end(small_context, model):
    """pydantic-ai's AnthropicModel sends `max_tokens: 16384` unless told (Claude Code 32000):
    every such request was a 400 here. Anthropic accepts a `max_tokens` past the context left
    and stops there with stop_reason `model_context_window_exceeded`."""
    with anthropic.Anthropic(base_url=small_context, api_key="unused", max_retries=0, timeout=120) as claude:
        short = claude.messages.create(model=model, max_tokens=16384, extra_body={"temperature": 0},
                                       messages=[{"role": "user", "content": "Say hi."}])
        assert short.stop_reason == "end_turn"
        prompt = {"role": "user", "content": "Count: " + " ".join(str(i) for i in range(100))}
        used = claude.messages.count_tokens(model=model, messages=[prompt]).input_tokens
        assert 300 < used < 500
        for stream in (False, True):
            kw = dict(model=model, max_tokens=16384, messages=[prompt], extra_body={"ignore_eos": True})
            if stream:
                with claude.messages.stream(**kw) as s:
                    full = s.get_final_message()
            else:
                full = claude.messages.create(**kw)
            assert full.stop_reason == "model_context_window_exceeded"
            assert full.usage.output_tokens == 512 - used
        # a max_tokens that fits still ends as max_tokens; a prompt past the context is still a 400
        assert claude.messages.create(model=model, max_tokens=5, messages=[prompt],
                                      extra_body={"ignore_eos": True}).stop_reason == "max_tokens"
        with pytest.raises(anthropic.BadRequestError):
            claude.messages.create(model=model, max_tokens=5, messages=[{"role": "user", "content": "hi " * 600}])
    # the OpenAI routes keep OpenAI's 400 for a completion that cannot fit
    with openai.OpenAI(base_url=f"{small_context}/v1", api_key="unused", max_retries=0) as oai:
        with pytest.raises(openai.BadRequestError) as caught:
            oai.chat.completions.create(model=model, max_tokens=16384, messages=[{"role": "user", "content": "hi"}])
        assert caught.value.code == "context_length_exceeded"


# ---------------------------------------------- empty content arrays, as each service answers


@pytest.mark.parametrize("role", ["user", "system", "assistant", "tool"])
def test_chat_empty_content_array_is_400(oai, model, role):
    # OpenAI's schema gives every role's content array minItems 1 (400 empty_array); the
    # server took `[]` as an empty message and answered 200
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]
    messages.append({"role": role, "content": [], **({"tool_call_id": "call_1"} if role == "tool" else {})})
    with pytest.raises(openai.BadRequestError) as caught:
        oai.chat.completions.create(model=model, max_tokens=5, messages=messages)
    assert caught.value.body["param"] == "messages.[2].content"
    assert caught.value.code == "empty_array"


def test_messages_empty_content_is_400_but_a_final_assistant_prefill(claude, model):
    for content in ([], ""):
        with pytest.raises(anthropic.BadRequestError) as caught:
            claude.messages.create(model=model, max_tokens=5, messages=[{"role": "user", "content": content}])
        assert "non-empty content" in caught.value.message
    reply = claude.messages.create(model=model, max_tokens=5, messages=[
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": []}])
    assert reply.type == "message"


def test_responses_empty_content_array_is_empty_text(oai, model):
    # OpenAI's Responses schema (InputMessageContentList) sets no minItems: `[]` is a message
    # with no text, the same prompt as content ""
    kw = {"model": model, "max_output_tokens": 8, "temperature": 0}
    empty = oai.responses.create(input=[{"role": "user", "content": "hi"},
                                        {"role": "assistant", "content": []}, {"role": "user", "content": "ok"}], **kw)
    blank = oai.responses.create(input=[{"role": "user", "content": "hi"},
                                        {"role": "assistant", "content": ""}, {"role": "user", "content": "ok"}], **kw)
    assert empty.usage.input_tokens == blank.usage.input_tokens and empty.output_text == blank.output_text


# ---------------------------------------------- Responses function tools' output_schema


def test_responses_output_schema_reaches_the_prompt(oai, model):
    # openai 3.57's FunctionToolParam.output_schema (the JSON a function's string outputs
    # hold) was accepted and dropped; it now follows the description, as input_examples do
    tool = {"type": "function", "name": "get_weather", "description": "The weather in a city.", "strict": False,
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
    schema = {"type": "object", "properties": {"temp_c": {"type": "number"}, "sky": {"type": "string"}}}

    def prompt_tokens(t: dict) -> int:
        return oai.responses.create(model=model, max_output_tokens=1, input="Weather in Rome?",
                                    tools=[t]).usage.input_tokens

    plain = prompt_tokens(tool)
    assert prompt_tokens({**tool, "output_schema": schema}) > plain + 15  # the header and the schema
    assert prompt_tokens({**tool, "output_schema": None}) == plain
    for bad in ("not a schema", [schema], 3):
        with pytest.raises(openai.BadRequestError) as caught:
            oai.responses.create(model=model, max_output_tokens=1, input="hi",
                                 tools=[{**tool, "output_schema": bad}])
        assert caught.value.body["param"] == "tools[0].output_schema"


def test_a_conversation_goes_on_past_a_call_max_output_tokens_cut(oai, model):
    """A function call `max_output_tokens` cut is an `incomplete` item whose arguments are
    unfinished JSON; going on from it (`previous_response_id`, or the item sent back as the
    SDK returned it) was a 400 no request could avoid, naming
    `previous_response_id.tool_calls.[0].function.arguments`. Its arguments now replay as
    the object they hold so far, and the call is answered like any other."""
    tool = {"type": "function", **TWO_TOOLS[0]["function"]}
    first = None
    for limit in range(14, 30):  # the first limit that cuts the call inside its arguments
        r = oai.responses.create(model=model, input="Weather in Paris?", tools=[tool], tool_choice="required",
                                 temperature=0, max_output_tokens=limit)
        calls = [o for o in r.output if o.type == "function_call"]
        if calls and calls[0].arguments.strip():
            first = r
            break
    assert first is not None and first.status == "incomplete"
    call = [o for o in first.output if o.type == "function_call"][0]
    assert call.status == "incomplete"
    with pytest.raises(ValueError):
        json.loads(call.arguments)
    answer = {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}
    later = oai.responses.create(model=model, max_output_tokens=3, previous_response_id=first.id, input=[answer])
    assert later.status in ("completed", "incomplete") and later.previous_response_id == first.id
    replayed = oai.responses.create(model=model, max_output_tokens=3, input=[
        {"role": "user", "content": "Weather in Paris?"}, call.model_dump(exclude_none=True), answer])
    assert replayed.output_text
    with pytest.raises(openai.BadRequestError) as caught:  # still a call: it needs its output
        oai.responses.create(model=model, max_output_tokens=3, previous_response_id=first.id, input="and?")
    assert caught.value.body["param"] == "input"
