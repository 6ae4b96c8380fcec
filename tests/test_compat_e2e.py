"""The Responses API and the Anthropic Messages API through the real server, with the
official clients: `openai` (`responses.*`), `anthropic` (`messages.*`) and the
openai-agents SDK on its default (Responses) model. The default model, greedy, so the
text is real and streamed text can be compared with non-streamed text.

Tool round trips, `responses.parse` and an agent with a function tool need the tool-call
parsers and grammars of the tool/structured-output branch: they skip until
`serve.parsers.REAL` is true.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import anthropic
import httpx
import openai
import pytest
from openai import OpenAI
from pydantic import BaseModel

from serve import parsers
from serve.model_dir import load_model_info
from tests.test_server_e2e import running_server

KEY = "sk-compat-test"
Q = "What is the capital of France?"
# The placeholder parser sets REAL = False; the real package has no such flag.
needs_tools = pytest.mark.skipif(not getattr(parsers, "REAL", True), reason="needs wt11 tool parsers")


@pytest.fixture(scope="module")
def server(default_model_dir, tmp_path_factory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("compat-server") / "server.log"
    with running_server(default_model_dir, "--max-batch", "2", "--api-key", KEY, "--responses-store-size", "3",
                        log_path=log) as base:
        yield base


@pytest.fixture(scope="module")
def model(default_model_dir) -> str:
    return load_model_info(default_model_dir).name


@pytest.fixture
def oai(server) -> Iterator[OpenAI]:
    with OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture
def claude(server) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=server, api_key=KEY, max_retries=0, timeout=120) as c:
        yield c


def count(server: str, messages: list[dict]) -> int:
    """Prompt tokens of chat `messages` by the server's own /tokenize."""
    r = httpx.post(f"{server}/tokenize", json={"messages": messages}, headers={"Authorization": f"Bearer {KEY}"})
    r.raise_for_status()
    return r.json()["count"]


def create(oai: OpenAI, model: str, **kw):
    kw.setdefault("temperature", 0)
    kw.setdefault("max_output_tokens", 40)
    return oai.responses.create(model=model, **kw)


# --------------------------------------------------------------------- /v1/responses


def test_create_text(oai, model, server):
    r = create(oai, model, input=Q)
    assert r.object == "response" and r.id.startswith("resp_") and r.model == model
    assert r.status == "completed" and r.incomplete_details is None and r.error is None
    (item,) = r.output
    assert item.type == "message" and item.role == "assistant" and item.status == "completed"
    assert "Paris" in r.output_text
    assert r.usage.input_tokens == count(server, [{"role": "user", "content": Q}])
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.usage.output_tokens_details.reasoning_tokens == 0
    assert r.usage.input_tokens_details.cached_tokens <= r.usage.input_tokens
    assert (r.temperature, r.max_output_tokens, r.store) == (0, 40, True)


def test_instructions_and_multi_turn_input(oai, model, server):
    turns = [{"role": "user", "content": "My name is Ada."},
             {"role": "assistant", "content": [{"type": "output_text", "text": "Hello Ada!"}]},
             {"role": "user", "content": [{"type": "input_text", "text": "What is my name?"}]}]
    r = create(oai, model, instructions="You are a terse assistant.", input=turns)
    assert r.instructions == "You are a terse assistant."
    messages = [{"role": "system", "content": "You are a terse assistant."},
                {"role": "user", "content": "My name is Ada."}, {"role": "assistant", "content": "Hello Ada!"},
                {"role": "user", "content": "What is my name?"}]
    assert r.usage.input_tokens == count(server, messages)
    # the same prompt through the chat route: the same greedy text (one engine, one path)
    chat = oai.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=40)
    assert r.output_text == chat.choices[0].message.content


def test_previous_response_id_continues_the_conversation(oai, model, server):
    first = create(oai, model, input=Q)
    second = create(oai, model, input="And of Germany?", previous_response_id=first.id)
    assert second.previous_response_id == first.id
    history = [{"role": "user", "content": Q}, {"role": "assistant", "content": first.output_text},
               {"role": "user", "content": "And of Germany?"}]
    assert second.usage.input_tokens == count(server, history)
    assert "Berlin" in second.output_text
    # the same as sending the whole conversation
    explicit = create(oai, model, input=history)
    assert explicit.output_text == second.output_text


def test_stream_event_order_and_text(oai, model):
    whole = create(oai, model, input=Q)
    with oai.responses.stream(model=model, input=Q, temperature=0, max_output_tokens=40) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    n = kinds.count("response.output_text.delta")
    assert n >= 2
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added", *["response.output_text.delta"] * n,
                     "response.output_text.done", "response.content_part.done", "response.output_item.done",
                     "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == whole.output_text == final.output_text
    assert final.status == "completed" and final.usage.output_tokens == whole.usage.output_tokens
    assert events[0].response.status == "in_progress"


def test_stream_bytes(server, model):
    """What `curl -N` sees: `event:` + `data:` pairs, no `[DONE]`."""
    body = {"model": model, "input": "Hi", "stream": True, "max_output_tokens": 3, "temperature": 0}
    with httpx.stream("POST", f"{server}/v1/responses", json=body, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    blocks = raw.strip().split("\n\n")
    for block in blocks:
        head, data = block.split("\n")
        assert head == f"event: {json.loads(data.removeprefix('data: '))['type']}"
    assert "[DONE]" not in raw
    assert blocks[-1].startswith("event: response.incomplete\n")


def test_logprobs_with_the_include(oai, model):
    r = create(oai, model, input=Q, max_output_tokens=6, top_logprobs=2, include=["message.output_text.logprobs"])
    part = r.output[0].content[0]
    assert len(part.logprobs) == r.usage.output_tokens == 6
    assert "".join(lp.token for lp in part.logprobs) == part.text
    assert all(len(lp.top_logprobs) == 2 and lp.top_logprobs[0].logprob >= lp.logprob - 1e-6
               for lp in part.logprobs)  # greedy: the chosen token is the top one
    assert r.top_logprobs == 2


def test_max_output_tokens_is_incomplete(oai, model):
    r = create(oai, model, input="Tell me a long story about a dragon.", max_output_tokens=5)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 5 and r.output[0].status == "incomplete"
    with oai.responses.stream(model=model, input="Tell me a long story about a dragon.",
                              max_output_tokens=5, temperature=0) as stream:
        events = list(stream)
    assert events[-1].type == "response.incomplete"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == r.output_text
    # the SDK's accumulator only accepts `response.completed` (README says how to read it instead)
    with oai.responses.stream(model=model, input="Tell me a long story about a dragon.",
                              max_output_tokens=5, temperature=0) as stream:
        final = None
        for event in stream:
            if event.type in ("response.completed", "response.incomplete", "response.failed"):
                final = event.response
        with pytest.raises(RuntimeError, match="response.completed"):
            stream.get_final_response()
    assert final.status == "incomplete" and final.output_text == r.output_text


def test_retrieve_and_delete(oai, model):
    r = create(oai, model, input=Q, max_output_tokens=8)
    got = oai.responses.retrieve(r.id)
    assert got.model_dump() == r.model_dump()
    assert oai.responses.retrieve(r.id, stream=False).model_dump() == r.model_dump()
    # re-streaming is for background responses, which this server runs none of: JSON here gave
    # the SDK an empty stream, no error
    with pytest.raises(openai.BadRequestError) as err:
        oai.responses.retrieve(r.id, stream=True)
    assert err.value.body["param"] == "stream" and "background" in err.value.body["message"]
    oai.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        oai.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError):
        oai.responses.delete(r.id)


def test_input_tokens_count_is_the_prompt_create_runs(oai, model):
    """`client.responses.input_tokens.count` was a 405 (the path read as a response id)."""
    tools = [{"type": "function", "name": "get_weather", "strict": True, "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
        "additionalProperties": False}}]
    kw = dict(input=Q, instructions="Be brief.", tools=tools, tool_choice="required")
    first = create(oai, model, max_output_tokens=60, **kw)
    assert first.output[0].type == "function_call"
    counted = oai.responses.input_tokens.count(model=model, **kw)
    assert counted.object == "response.input_tokens" and counted.input_tokens == first.usage.input_tokens
    later = create(oai, model, max_output_tokens=1, previous_response_id=first.id, input=[
        {"type": "function_call_output", "call_id": first.output[0].call_id, "output": "sunny"}])
    assert oai.responses.input_tokens.count(model=model, previous_response_id=first.id, input=[
        {"type": "function_call_output", "call_id": first.output[0].call_id, "output": "sunny"}]
    ).input_tokens == later.usage.input_tokens
    assert 0 < oai.responses.input_tokens.count(model=model, instructions="Be brief.").input_tokens < 20
    with pytest.raises(openai.NotFoundError):
        oai.responses.input_tokens.count(model=model, input="Hi", previous_response_id="resp_nope")
    with pytest.raises(openai.BadRequestError) as err:
        oai.responses.input_tokens.count(model=model)
    assert err.value.body["param"] == "input"
    with pytest.raises(openai.BadRequestError) as err:  # was a 405 "allowed: HEAD, GET"
        oai.responses.compact(model=model, input="Hi")
    assert "Compacting" in err.value.body["message"]


def test_models_list_parses_in_both_sdks(oai, claude, server, model):
    """The anthropic SDK's `models.list()` read OpenAI's cards as ModelInfo with `type`,
    `display_name`, `created_at` all None (its required fields), and behind `--api-key` its
    `x-api-key` header was a 401 on /v1/models."""
    from anthropic.types import ModelInfo
    from openai.types import Model

    page = claude.models.list()
    assert [m.id for m in page.data] == [model] and page.has_more is False and page.first_id == model
    raw = httpx.get(f"{server}/v1/models", headers={"x-api-key": KEY}).json()
    info = ModelInfo.model_validate(raw["data"][0])  # every required field, of its type
    assert info.type == "model" and info.display_name == model and info.created_at.year >= 2025
    assert info.max_input_tokens > 0
    assert claude.models.retrieve(model).id == model
    assert Model.model_validate(raw["data"][0]).owned_by == "llorch"
    assert [m.id for m in oai.models.list()] == [model]
    assert httpx.get(f"{server}/v1/models", headers={"x-api-key": "wrong"}).status_code == 401


def test_input_items_and_cancel(oai, model):
    items = [{"role": "developer", "content": "Be brief."},
             {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
             {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": Q}]
    r = create(oai, model, input=items, max_output_tokens=2)
    page = oai.responses.input_items.list(r.id)  # newest first, as OpenAI
    assert [(i.type, i.role) for i in page.data] == [("message", "user"), ("message", "assistant"),
                                                       ("message", "user"), ("message", "developer")]
    assert page.data[0].content[0].text == Q and page.data[1].content[0].type == "output_text"
    assert page.first_id == page.data[0].id and page.last_id == page.data[-1].id and not page.has_more
    first = oai.responses.input_items.list(r.id, order="asc", limit=2)
    assert [i.role for i in first.data] == ["developer", "user"] and first.has_more
    rest = oai.responses.input_items.list(r.id, order="asc", after=first.last_id)
    assert [i.role for i in rest.data] == ["assistant", "user"] and not rest.has_more
    assert [i.id for i in oai.responses.input_items.list(r.id, order="asc", limit=1)] == [i.id for i in
                                                                                           page.data[::-1]]
    one = oai.responses.input_items.list(create(oai, model, input="Hi", max_output_tokens=1).id)
    assert [(i.type, i.content[0].text) for i in one.data] == [("message", "Hi")]
    with pytest.raises(openai.BadRequestError) as err:  # only background responses can be cancelled
        oai.responses.cancel(r.id)
    assert "background" in err.value.message
    with pytest.raises(openai.NotFoundError):
        oai.responses.cancel("resp_nope")
    with pytest.raises(openai.NotFoundError):
        oai.responses.input_items.list("resp_nope")
    with pytest.raises(openai.BadRequestError):
        oai.responses.input_items.list(r.id, limit=101)


def test_unknown_ids_are_404(oai, model):
    with pytest.raises(openai.NotFoundError) as err:
        oai.responses.retrieve("resp_nope")
    assert err.value.body["param"] == "response_id"
    with pytest.raises(openai.NotFoundError) as err:
        create(oai, model, input="Hi", previous_response_id="resp_nope")
    assert err.value.body["param"] == "previous_response_id"


def test_store_false_and_the_store_bound(oai, model):
    unstored = create(oai, model, input="Hi", max_output_tokens=2, store=False)
    assert unstored.store is False
    with pytest.raises(openai.NotFoundError):
        oai.responses.retrieve(unstored.id)
    ids = [create(oai, model, input="Hi", max_output_tokens=2).id for _ in range(4)]  # --responses-store-size 3
    with pytest.raises(openai.NotFoundError):
        oai.responses.retrieve(ids[0])
    assert [oai.responses.retrieve(i).id for i in ids[1:]] == ids[1:]


@pytest.mark.parametrize("kw, param", [
    ({"tools": [{"type": "web_search_preview"}]}, "tools[0].type"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "https://x/y.png"}]}]},
     "input[0].content[0].type"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "file-1"}]}]},
     "input[0].content[0].type"),
    ({"background": True}, "background"),
    ({"input": []}, "input"),
    ({"temperature": 3}, "temperature"),
])
def test_unsupported_is_a_400_naming_it(oai, model, kw, param):
    kw.setdefault("input", "Hi")
    with pytest.raises(openai.BadRequestError) as err:
        create(oai, model, **kw)
    assert err.value.body["param"] == param


def test_api_key_is_required(server, model):
    with OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0) as bad, \
            pytest.raises(openai.AuthenticationError):
        bad.responses.create(model=model, input="Hi")


def run_agent(server: str, agent, prompt: str, **kw):
    """`Runner.run` on the SDK's default provider and model class (Responses), with a client
    of its own, opened and closed in the test's own event loop."""
    from agents import OpenAIProvider, RunConfig, Runner

    async def run():
        async with openai.AsyncOpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0) as client:
            config = RunConfig(model_provider=OpenAIProvider(openai_client=client, use_responses=True),
                               tracing_disabled=True)
            return await Runner.run(agent, prompt, run_config=config, **kw)

    return asyncio.run(run())


def test_agents_sdk_plain_agent(server, model):
    from agents import Agent, ModelSettings

    agent = Agent(name="geo", instructions="You are a helpful assistant.", model=model,
                  model_settings=ModelSettings(temperature=0, max_tokens=40))
    result = run_agent(server, agent, Q)
    assert "Paris" in result.final_output


# -------------------------------------------------------------------- /v1/messages


def message_kw(model: str, **kw):
    kw.setdefault("max_tokens", 40)
    kw.setdefault("messages", [{"role": "user", "content": Q}])
    # The newest SDKs dropped sampling arguments from `create`; the API still takes them.
    kw.setdefault("extra_body", {"temperature": 0})
    return dict(model=model, **kw)


def test_messages_create(claude, model, server):
    m = claude.messages.create(**message_kw(model, system="You are a terse assistant."))
    assert m.type == "message" and m.role == "assistant" and m.id.startswith("msg_") and m.model == model
    (block,) = m.content
    assert block.type == "text" and "Paris" in block.text
    assert m.stop_reason == "end_turn" and m.stop_sequence is None
    prompt = count(server, [{"role": "system", "content": "You are a terse assistant."},
                            {"role": "user", "content": Q}])
    assert m.usage.input_tokens + m.usage.cache_read_input_tokens == prompt
    assert m.usage.output_tokens > 0


def test_messages_stream_text(claude, model):
    whole = claude.messages.create(**message_kw(model))
    with claude.messages.stream(**message_kw(model)) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == whole.content[0].text == final.content[0].text
    assert final.stop_reason == "end_turn" and final.usage.output_tokens == whole.usage.output_tokens


def test_stream_usage_splits_the_cached_prompt(claude, oai, model):
    """A prefix-cache hit is reported the same way streamed and not: Anthropic's
    `message_start` and final usage split the prompt into `input_tokens` and
    `cache_read_input_tokens` as the `message` object does; chat's final usage chunk and
    Responses' `response.completed` carry the same `cached_tokens` as their whole bodies."""
    system = "You are a terse assistant who answers in one word. " * 4
    kw = message_kw(model, system=system, max_tokens=6)
    claude.messages.create(**kw)  # the prompt's KV is cached from here on
    whole = claude.messages.create(**kw)
    assert whole.usage.cache_read_input_tokens > 0 and whole.usage.cache_creation_input_tokens == 0
    with claude.messages.stream(**kw) as stream:
        start = next(e for e in stream if e.type == "message_start")
        final = stream.get_final_message()
    assert start.message.usage.model_dump() == {**whole.usage.model_dump(), "output_tokens": 0}
    assert final.usage == whole.usage

    messages = [{"role": "system", "content": system}, {"role": "user", "content": Q}]
    chat = oai.chat.completions.create(model=model, messages=messages, max_tokens=6, temperature=0)
    cached = chat.usage.prompt_tokens_details.cached_tokens
    assert cached > 0
    chunks = list(oai.chat.completions.create(model=model, messages=messages, max_tokens=6, temperature=0,
                                              stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage == chat.usage

    r = oai.responses.create(model=model, instructions=system, input=Q, temperature=0, max_output_tokens=16)
    assert r.usage.input_tokens_details.cached_tokens > 0
    with oai.responses.stream(model=model, instructions=system, input=Q, temperature=0,
                              max_output_tokens=16) as stream:
        completed = stream.get_final_response()
    assert completed.usage == r.usage


def test_messages_stream_bytes(server, model):
    body = {"model": model, "max_tokens": 3, "stream": True, "temperature": 0,
            "messages": [{"role": "user", "content": "Hi"}]}
    with httpx.stream("POST", f"{server}/v1/messages", json=body, timeout=60,
                      headers={"x-api-key": KEY, "anthropic-version": "2023-06-01"}) as r:
        assert r.status_code == 200
        raw = r.read().decode()
    kinds = [block.split("\n")[0].removeprefix("event: ") for block in raw.strip().split("\n\n")]
    assert kinds == ["message_start", "ping", "content_block_start", *["content_block_delta"] * (len(kinds) - 6),
                     "content_block_stop", "message_delta", "message_stop"]
    assert '"stop_reason":"max_tokens"' in raw


def test_disconnected_streams_free_their_slots(server, model):
    for path, body in (("/v1/messages", {"max_tokens": 2000, "messages": [{"role": "user", "content": Q}]}),
                       ("/v1/responses", {"input": Q})):
        body = {"model": model, "stream": True, "temperature": 1.0, "ignore_eos": True, **body}
        with httpx.stream("POST", f"{server}{path}", json=body, timeout=60,
                          headers={"Authorization": f"Bearer {KEY}"}) as r:
            assert r.status_code == 200
            chunks = r.iter_raw()  # kept: a dropped iterator closes the connection
            next(chunks)
            assert httpx.get(f"{server}/health").json()["slots_in_use"] == 1  # ignore_eos: still generating
        deadline = time.monotonic() + 10
        while httpx.get(f"{server}/health").json()["slots_in_use"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert httpx.get(f"{server}/health").json()["slots_in_use"] == 0


def test_stop_sequences_and_max_tokens(claude, model):
    m = claude.messages.create(**message_kw(model, stop_sequences=["Paris"]))
    assert m.stop_reason == "stop_sequence" and m.stop_sequence == "Paris"
    assert "Paris" not in m.content[0].text
    m = claude.messages.create(**message_kw(model, max_tokens=3))
    assert m.stop_reason == "max_tokens" and m.usage.output_tokens == 3


def test_count_tokens(claude, model, server):
    n = claude.messages.count_tokens(model=model, system="Be brief.", messages=[{"role": "user", "content": Q}])
    assert n.input_tokens == count(server, [{"role": "system", "content": "Be brief."},
                                            {"role": "user", "content": Q}])


def test_errors_in_anthropics_shape(claude, model):
    with pytest.raises(anthropic.BadRequestError) as err:  # max_tokens is required, as at Anthropic
        claude.post("/v1/messages", cast_to=anthropic.types.Message,
                    body={"model": model, "messages": [{"role": "user", "content": "Hi"}]})
    assert err.value.body["type"] == "error"
    assert err.value.body["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in err.value.body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError) as err:
        claude.messages.create(**message_kw(model, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}}]}]))
    assert "image" in err.value.body["error"]["message"]
    with pytest.raises(anthropic.NotFoundError) as err:
        claude.messages.create(**message_kw("claude-sonnet-4"))
    assert err.value.body["error"]["type"] == "not_found_error"


def test_anthropic_auth(server, model):
    with anthropic.Anthropic(base_url=server, api_key="wrong", max_retries=0) as bad:
        with pytest.raises(anthropic.AuthenticationError) as err:
            bad.messages.create(**message_kw(model, max_tokens=2))
        assert err.value.body["error"]["type"] == "authentication_error"
    with anthropic.Anthropic(base_url=server, auth_token=KEY, max_retries=0) as bearer:  # Authorization: Bearer
        assert bearer.messages.create(**message_kw(model, max_tokens=2)).usage.output_tokens == 2


PREFILL = "The capital of France is"


def test_messages_prefill_is_continued(claude, oai, model, server):
    """A final assistant message is continued (Anthropic prefill); the reply holds only the
    new text. The chat route's vLLM `continue_final_message` gives the same prompt."""
    messages = [{"role": "user", "content": Q}, {"role": "assistant", "content": PREFILL}]
    m = claude.messages.create(**message_kw(model, messages=messages, max_tokens=8))
    text = m.content[0].text
    assert "Paris" in text and not text.startswith(PREFILL)
    flags = {"continue_final_message": True, "add_generation_prompt": False}
    r = httpx.post(f"{server}/tokenize", json={"messages": messages, **flags},
                   headers={"Authorization": f"Bearer {KEY}"}).json()
    prompt = r["tokens"]
    assert m.usage.input_tokens + m.usage.cache_read_input_tokens == len(prompt)
    assert count(server, messages) > len(prompt)  # the closed turn plus a new assistant header
    c = oai.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0, extra_body=flags)
    assert c.choices[0].message.content == text and c.usage.prompt_tokens == len(prompt)
    with pytest.raises(openai.BadRequestError) as err:  # both true: refused, as vLLM does
        oai.chat.completions.create(model=model, messages=messages, max_tokens=2,
                                    extra_body={"continue_final_message": True})
    assert err.value.body["param"] == "continue_final_message"
    with pytest.raises(anthropic.BadRequestError):  # as Anthropic: no trailing whitespace to continue
        claude.messages.create(**message_kw(model, messages=[messages[0], {"role": "assistant",
                                                                           "content": PREFILL + " "}]))


def test_a_prefill_under_a_json_format_is_completed_not_restarted(claude, oai, model):
    """Anthropic's "prefill `{`" pattern with a JSON format: the format covers the whole reply,
    prefill included, so the model completes the object the prefill began (before: the grammar
    applied to the new text alone and the reply read `{"city": "{ "city": …`). A prefill the
    format cannot begin with is a 400 naming the format."""
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
              "required": ["city"], "additionalProperties": False}
    prefill = '{"city": "'
    messages = [{"role": "user", "content": Q}, {"role": "assistant", "content": prefill}]
    m = claude.messages.create(**message_kw(model, messages=messages, max_tokens=24, extra_body={
        "temperature": 0, "output_config": {"format": {"type": "json_schema", "schema": schema}}}))
    assert json.loads(prefill + m.content[0].text)["city"]
    c = oai.chat.completions.create(
        model=model, messages=messages, max_tokens=24, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}},
        extra_body={"continue_final_message": True, "add_generation_prompt": False})
    assert c.choices[0].message.content == m.content[0].text
    with pytest.raises(openai.BadRequestError) as err:
        oai.chat.completions.create(
            model=model, messages=[messages[0], {"role": "assistant", "content": "Sure: ["}],
            max_tokens=8, response_format={"type": "json_object"},
            extra_body={"continue_final_message": True, "add_generation_prompt": False})
    assert err.value.body["param"] == "response_format" and "prefill" in err.value.body["message"]


BAD_SCHEMA = {"type": "object", "properties": {"a": {"type": "nonsense"}}}


def test_errors_name_the_routes_own_fields(claude, oai, model):
    """Errors found after translation name the client's fields, never chat's."""
    def anthropic_message(**kw):
        with pytest.raises(anthropic.BadRequestError) as err:
            claude.messages.create(**message_kw(model, max_tokens=2, **kw))
        assert err.value.body["type"] == "error"
        return err.value.body["error"]["message"]

    msg = anthropic_message(tools=[{"name": "f", "input_schema": BAD_SCHEMA}])
    assert "tools.[0].input_schema" in msg and "function" not in msg
    msg = anthropic_message(tools=[{"name": "bad name!", "input_schema": {"type": "object"}}])
    assert "tools.[0].name" in msg
    msg = anthropic_message(extra_body={"output_config": {"format": {"type": "json_schema", "schema": BAD_SCHEMA}}})
    assert "output_config.format" in msg and "response_format" not in msg
    msg = anthropic_message(messages=[{"role": "user", "content": Q}, {"role": "assistant", "content": [
        {"type": "tool_use", "id": "toolu_1", "name": "f", "input": "x"}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "x"}]}])
    assert msg.startswith("messages.[1].content.[0].input") and "tool_calls" not in msg
    msg = anthropic_message(messages=[{"role": "user", "content": [{"type": "text", "text": None}]}])
    assert msg == "messages.[0].content.[0].text: text must be a string"
    msg = anthropic_message(system=5)
    assert ".str" not in msg and "system" in msg

    def responses_param(**kw):
        with pytest.raises(openai.BadRequestError) as err:
            create(oai, model, max_output_tokens=2, **kw)
        return err.value.body["param"]

    assert responses_param(input="x", text={"format": {"type": "json_schema", "name": "x", "schema": BAD_SCHEMA}}) \
        .startswith("text.format")
    assert responses_param(input=[{"role": "user", "content": "x"}, {"type": "function_call", "call_id": "c",
                                                                      "name": "f", "arguments": "{"},
                                  {"type": "function_call_output", "call_id": "c", "output": "ok"}]) \
        == "input[1].arguments"
    assert responses_param(input="x", tools=[{"type": "function", "name": "bad name!"}]) == "tools[0].name"
    assert responses_param(input=5) == "input"
    # an item of the wrong type: named where it stands, in this route's spelling (it was
    # "input: expected a string, but got an array", chat's `tools.[0]`)
    assert responses_param(input=["hi"]) == "input[0]"
    assert responses_param(input="x", tools=["get_weather"]) == "tools[0]"
    assert responses_param(input="x", metadata={"a": 1}) == "metadata.a"
    assert responses_param(input="x", reasoning={"effort": "high"}) == "reasoning.effort"  # ChatML does not read it


def test_strict_types_and_what_openai_and_anthropic_refuse(server, model):
    auth = {"Authorization": f"Bearer {KEY}"}
    user = [{"role": "user", "content": "Hi"}]
    for path, body, param in (
        ("/v1/responses", {"input": "Hi", "temperature": "0.5"}, "temperature"),
        ("/v1/responses", {"input": "Hi", "stream": "true"}, "stream"),
        ("/v1/responses", {"input": "Hi", "store": "no"}, "store"),
        ("/v1/chat/completions", {"messages": user, "metadata": "x"}, "metadata"),
        ("/v1/chat/completions", {"messages": user, "tools": [{"type": "function", "function": {
            "name": "f", "strict": "yes"}}]}, "tools.[0].function.strict"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": None}]}, "messages.[0].content"),
        ("/v1/messages", {"messages": user, "max_tokens": 2, "temperature": "0.5"}, "temperature"),
        ("/v1/messages", {"messages": user, "max_tokens": 2, "stream": "true"}, "stream"),
        ("/v1/messages", {"messages": [{"role": "user", "content": []}], "max_tokens": 2}, "messages.[0].content"),
        ("/v1/messages", {"messages": [{"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_x", "content": "r"}]}], "max_tokens": 2},
         "messages.[0].content.[0].tool_use_id"),
    ):
        r = httpx.post(f"{server}{path}", json={"model": model, **body}, headers=auth)
        assert r.status_code == 400, (path, body, r.text)
        error = r.json()["error"]
        if path == "/v1/messages":  # Anthropic's body has no `param`: the message names it
            assert error["message"].startswith(f"{param}:") or f"'{param}'" in error["message"], error
        else:
            assert error["param"] == param, (path, body, error)
    # OpenAI's types allow an assistant's refusal parts: rendered as its text
    r = httpx.post(f"{server}/v1/chat/completions", headers=auth, json={
        "model": model, "max_tokens": 2, "messages": [*user, {"role": "assistant", "content": [
            {"type": "refusal", "refusal": "I cannot."}]}, {"role": "user", "content": "Why?"}]})
    assert r.status_code == 200, r.text


def test_anthropic_routes_answer_in_anthropics_shape(server):
    for method, path, status in (("GET", "/v1/messages", 405), ("POST", "/v1/messages/batches", 404),
                                 ("GET", "/v1/messages/count_tokens", 405)):
        r = httpx.request(method, f"{server}{path}", headers={"x-api-key": KEY})
        assert r.status_code == status and r.json()["type"] == "error", (path, r.text)
        assert r.json()["error"]["type"] == {404: "not_found_error", 405: "invalid_request_error"}[status]
    r = httpx.post(f"{server}/v1/messages", json={})
    assert r.status_code == 401 and "x-api-key" in r.json()["error"]["message"]


def test_empty_answer_has_no_empty_text_block(claude, model):
    # stop at once: the answer is empty, and Anthropic refuses empty text blocks sent back
    prefill = [{"role": "user", "content": Q}, {"role": "assistant", "content": PREFILL}]
    m = claude.messages.create(**message_kw(model, messages=prefill, stop_sequences=[" ", "Paris", "\n", "."]))
    assert m.stop_reason == "stop_sequence" and m.content == []


# ------------------------------------------------ needs the tool/structured-output branch

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
           "additionalProperties": False}


@needs_tools
def test_responses_function_tool_round_trip(oai, model):
    tools = [{"type": "function", "name": "get_weather", "description": "Current weather in a city.",
              "parameters": WEATHER, "strict": True}]
    r = create(oai, model, input="What's the weather in Paris?", tools=tools, tool_choice="required")
    calls = [item for item in r.output if item.type == "function_call"]
    assert calls and calls[0].name == "get_weather" and calls[0].call_id
    assert set(json.loads(calls[0].arguments)) == {"city"}
    answer = create(oai, model, previous_response_id=r.id, tools=tools, input=[
        {"type": "function_call_output", "call_id": calls[0].call_id, "output": "Sunny, 24 C"}])
    assert answer.status == "completed" and answer.output_text
    with oai.responses.stream(model=model, input="What's the weather in Paris?", tools=tools,
                              tool_choice="required", temperature=0) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_response()
    assert "response.function_call_arguments.delta" in kinds and "response.function_call_arguments.done" in kinds
    assert [i.type for i in final.output if i.type == "function_call"]


@needs_tools
def test_responses_parse(oai, model):
    class City(BaseModel):
        name: str
        country: str

    r = oai.responses.parse(model=model, input="Name the capital of France as JSON.", text_format=City,
                            temperature=0, max_output_tokens=60)
    assert isinstance(r.output_parsed, City)


@needs_tools
def test_messages_tool_round_trip(claude, model):
    tools = [{"name": "get_weather", "description": "Current weather in a city.", "input_schema": WEATHER}]
    kw = message_kw(model, tools=tools, tool_choice={"type": "tool", "name": "get_weather"},
                    messages=[{"role": "user", "content": "What's the weather in Paris?"}])
    m = claude.messages.create(**kw)
    uses = [b for b in m.content if b.type == "tool_use"]
    assert m.stop_reason == "tool_use" and uses and uses[0].name == "get_weather"
    assert set(uses[0].input) == {"city"}
    with claude.messages.stream(**kw) as stream:
        streamed = stream.get_final_message()
    assert [b.input for b in streamed.content if b.type == "tool_use"] == [u.input for u in uses]
    follow = claude.messages.create(**message_kw(model, tools=tools, messages=[
        *kw["messages"], {"role": "assistant", "content": [u.model_dump() for u in uses]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": uses[0].id, "content": "Sunny, 24 C"}]},
    ]))
    assert follow.stop_reason in ("end_turn", "tool_use") and follow.content


@needs_tools
def test_agents_sdk_with_a_function_tool(server, model):
    from agents import Agent, ModelSettings, function_tool

    calls = []

    @function_tool
    def get_weather(city: str) -> str:
        """Current weather in a city."""
        calls.append(city)
        return "Sunny, 24 C"

    agent = Agent(name="weather", instructions="Use the tool to answer.", model=model, tools=[get_weather],
                  model_settings=ModelSettings(temperature=0, tool_choice="required", max_tokens=80))
    result = run_agent(server, agent, "What's the weather in Paris?", max_turns=4)
    assert calls and result.final_output


@needs_tools
@pytest.mark.parametrize("cut, reason", [({"stop_sequences": ["Par"]}, "stop_sequence"),
                                         ({"max_tokens": 14}, "max_tokens")])
def test_messages_tool_use_cut_short_keeps_the_reason(claude, model, cut, reason):
    """QA finding 2: a stop sequence or max_tokens inside a forced tool_use is a 200 with the
    cut's stop_reason, never tool_use nor a 500, the same streamed and not."""
    tools = [{"name": "get_weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}},
                                                      "required": ["city"]}}]
    kw = message_kw(model, tools=tools, tool_choice={"type": "any"},
                    messages=[{"role": "user", "content": "Weather in Paris?"}], **{"max_tokens": 60, **cut})
    m = claude.messages.create(**kw)
    assert m.stop_reason == reason
    assert m.stop_sequence == ("Par" if reason == "stop_sequence" else None)
    with claude.messages.stream(**kw) as stream:
        streamed = stream.get_final_message()
    assert (streamed.stop_reason, streamed.stop_sequence) == (m.stop_reason, m.stop_sequence)
    assert [b.model_dump(exclude={"id"}) for b in streamed.content] == [b.model_dump(exclude={"id"}) for b in m.content]
    assert all(b.type != "text" or "<tool" not in b.text for b in m.content)


@needs_tools
def test_messages_output_format_is_honoured(claude, model):
    """QA finding 8: the structured-outputs beta's top-level `output_format` shapes the
    answer as `output_config.format` does; both at once is a 400."""
    fmt = {"type": "json_schema", "schema": {"type": "object", "properties": {"capital": {"type": "string",
                                                                                          "maxLength": 30}},
                                             "required": ["capital"], "additionalProperties": False}}
    m = claude.messages.create(**message_kw(model, max_tokens=40, extra_body={"temperature": 0, "output_format": fmt}))
    assert set(json.loads(m.content[0].text)) == {"capital"}
    with pytest.raises(anthropic.BadRequestError):
        claude.messages.create(**message_kw(model, extra_body={"output_format": fmt, "output_config": {"format": fmt}}))


@needs_tools
@pytest.mark.parametrize("route", ["messages.input_schema", "messages.output_format", "responses.text.format",
                                   "responses.tools"])
def test_huge_numbers_in_schemas_are_400s(claude, oai, model, route):
    """QA finding 1: an integer beyond 64 bits in any schema is a 400 on every route."""
    schema = {"type": "object", "properties": {"n": {"type": "integer", "maximum": 10 ** 30}}}
    if route.startswith("messages"):
        extra = ({"output_format": {"type": "json_schema", "schema": schema}} if route.endswith("output_format")
                 else {"tools": [{"name": "f", "input_schema": schema}], "tool_choice": {"type": "any"}})
        with pytest.raises(anthropic.BadRequestError):
            claude.messages.create(**message_kw(model, extra_body=extra))
        return
    kw = ({"text": {"format": {"type": "json_schema", "name": "x", "schema": schema}}} if route.endswith("format")
          else {"tools": [{"type": "function", "name": "f", "parameters": schema}], "tool_choice": "required"})
    with pytest.raises(openai.BadRequestError):
        create(oai, model, input="hi", **kw)
