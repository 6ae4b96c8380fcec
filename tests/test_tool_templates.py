"""Tool calling and reasoning on tiny models carrying the chat templates of other families
(tests/_tool_templates.py): the prompt renders exactly as transformers'
`apply_chat_template(messages, tools=...)` does, the family is detected from the template,
and through the real server a required call (constrained in the family's own syntax) is
parsed back, streams the same, and its round trip renders through the family's template.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from _tool_templates import DEEPSEEK_R1, LLAMA31, MISTRAL, QWEN3, QWEN25
from openai import OpenAI
from test_server_e2e import running_server

from serve.chat_prep import prepare_chat, render_chat
from serve.options import ServeOptions
from serve.protocol import ChatCompletionRequest, parse_request
from serve.tokenizer import Tokenizer

FAMILIES = {"qwen25": (QWEN25, "hermes"), "llama31": (LLAMA31, "llama3_json"),
            "mistral": (MISTRAL, "mistral"), "qwen3": (QWEN3, "hermes")}
PARAMS = {"type": "object",
          "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]},
                         "days": {"type": "integer", "minimum": 1, "maximum": 7}},
          "required": ["city", "days"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather forecast",
                                           "parameters": PARAMS}}]
CALL_ID = "abcDEF123"  # 9 alphanumerics: what Mistral's template insists on


def _with_template(src: Path, dst: Path, template: str, special: str | None = None) -> Path:
    """A copy of the tiny model with `template`; `special` renames the unused special token
    id 3 (`<repo_name>`), so the tokenizer has that marker as one special token."""
    if not dst.exists():
        shutil.copytree(src, dst)
        config = json.loads((dst / "tokenizer_config.json").read_text())
        config["chat_template"] = template
        if special is not None:
            config.get("added_tokens_decoder", {}).get("3", {})["content"] = special
        (dst / "tokenizer_config.json").write_text(json.dumps(config))
        if special is not None:
            tok = json.loads((dst / "tokenizer.json").read_text())
            [entry] = [t for t in tok["added_tokens"] if t["id"] == 3]
            entry["content"] = special
            vocab = tok["model"]["vocab"]
            vocab[special] = vocab.pop("<repo_name>")
            (dst / "tokenizer.json").write_text(json.dumps(tok))
    return dst


@pytest.fixture(scope="module")
def family_dirs(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    templates = {k: t for k, (t, _) in FAMILIES.items()} | {"deepseek_r1": DEEPSEEK_R1}
    specials = {"mistral": "[TOOL_CALLS]"}  # a special token in Mistral's tokenizers
    return {k: _with_template(tiny_model_dir, root / k, t, specials.get(k)) for k, t in templates.items()}


def _openai_messages():
    return [
        {"role": "developer", "content": "Be brief."},  # OpenAI's new name for system
        {"role": "user", "content": "Weather in Paris for 2 days?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": CALL_ID, "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'}}]},
        {"role": "tool", "tool_call_id": CALL_ID, "content": "sunny, 24 C"},
    ]


def _hf_messages():
    """The same conversation as transformers documents it: arguments as a dict."""
    return [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris for 2 days?"},
        {"role": "assistant", "tool_calls": [
            {"id": CALL_ID, "type": "function",
             "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}}]},
        {"role": "tool", "tool_call_id": CALL_ID, "content": "sunny, 24 C"},
    ]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_renders_like_transformers(family_dirs, family):
    from transformers import AutoTokenizer

    path = family_dirs[family]
    req = parse_request(ChatCompletionRequest, {"messages": _openai_messages(), "tools": TOOLS})
    ours = render_chat(Tokenizer.from_dir(path), req)
    theirs = AutoTokenizer.from_pretrained(path).apply_chat_template(
        _hf_messages(), tools=TOOLS, add_generation_prompt=True, tokenize=False)
    assert ours == theirs
    assert '"get_weather"' in ours and "sunny, 24 C" in ours


@pytest.mark.parametrize("family", list(FAMILIES))
def test_detects_the_family(family_dirs, family):
    tok = Tokenizer.from_dir(family_dirs[family])
    req = parse_request(ChatCompletionRequest, {"messages": _openai_messages()[:2], "tools": TOOLS})
    prepared = prepare_chat(tok, req, ServeOptions(model_dir=family_dirs[family]))
    assert prepared.tool_parser == FAMILIES[family][1]
    assert prepared.reasoning == (family == "qwen3")
    assert prepared.grammar is not None  # tool_choice "auto": constrained once a call starts
    forced = ServeOptions(model_dir=family_dirs[family], tool_call_parser="pythonic", reasoning_parser="none")
    prepared = prepare_chat(tok, req, forced)
    assert prepared.tool_parser == "pythonic" and not prepared.reasoning


def test_reasoning_detection(family_dirs):
    tok = Tokenizer.from_dir(family_dirs["deepseek_r1"])
    req = parse_request(ChatCompletionRequest, {"messages": [{"role": "user", "content": "hi"}]})
    prepared = prepare_chat(tok, req, ServeOptions(model_dir=family_dirs["deepseek_r1"]))
    assert prepared.reasoning and prepared.start_in_reasoning and prepared.tool_parser is None
    qwen3 = Tokenizer.from_dir(family_dirs["qwen3"])
    off = parse_request(ChatCompletionRequest, {"messages": [{"role": "user", "content": "hi"}],
                                                "chat_template_kwargs": {"enable_thinking": False}})
    prepared = prepare_chat(qwen3, off, ServeOptions(model_dir=family_dirs["qwen3"]))
    assert prepared.prompt_text.endswith("</think>\n\n") and not prepared.reasoning


# ------------------------------------------------------------------ through the server


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_server(request, family_dirs, tmp_path_factory) -> Iterator[tuple[str, OpenAI]]:
    log = tmp_path_factory.mktemp(f"server-{request.param}") / "server.log"
    with running_server(family_dirs[request.param], "--max-batch", "2", "--threads", "1",
                        "--model-name", "tiny", log_path=log) as base:
        with OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=120) as client:
            yield request.param, client


def _reassemble(stream):
    calls: dict[int, dict] = {}
    for chunk in stream:
        for tc in (chunk.choices[0].delta.tool_calls or ()) if chunk.choices else ():
            if tc.id:
                calls[tc.index] = {"id": tc.id, "name": tc.function.name, "arguments": ""}
            calls[tc.index]["arguments"] += tc.function.arguments or ""
    return [calls[i] for i in sorted(calls)]


def test_required_call_round_trip(family_server):
    family, client = family_server
    messages = [{"role": "user", "content": "Weather in Rome?"}]
    extra = {"chat_template_kwargs": {"enable_thinking": False}} if family == "qwen3" else {}
    kw = dict(model="tiny", tools=TOOLS, temperature=0, max_tokens=80, extra_body=extra)
    first = client.chat.completions.create(messages=messages, tool_choice="required", **kw)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather"
    args = json.loads(call.function.arguments)
    assert args["city"] in ("Paris", "Rome") and 1 <= args["days"] <= 7 and set(args) == {"city", "days"}
    if family == "mistral":
        assert len(call.id) == 9 and call.id.isalnum()
        # the call opened with the tokenizer's special [TOOL_CALLS] token, which the text skips
        lp = client.chat.completions.create(messages=messages, tool_choice="required", logprobs=True,
                                            **kw).choices[0]
        assert lp.logprobs.content[0].token == "[TOOL_CALLS]"
        assert lp.message.tool_calls[0].function.arguments == call.function.arguments
    streamed = _reassemble(client.chat.completions.create(messages=messages, tool_choice="required",
                                                          stream=True, **kw))
    assert [(c["name"], c["arguments"]) for c in streamed] == [("get_weather", call.function.arguments)]
    # the call and its result go back through the family's template
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
    second = client.chat.completions.create(messages=messages, tool_choice="none", **kw)
    assert second.choices[0].message.tool_calls is None


def test_reasoning_content_through_the_server(family_dirs, tmp_path_factory):
    log = tmp_path_factory.mktemp("server-r1") / "server.log"
    with running_server(family_dirs["deepseek_r1"], "--max-batch", "2", "--threads", "1",
                        "--model-name", "tiny", log_path=log) as base:
        with OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=120) as client:
            kw = dict(model="tiny", messages=[{"role": "user", "content": "hi"}], temperature=0,
                      max_tokens=24)
            whole = client.chat.completions.create(**kw).choices[0].message
            reasoning = whole.model_extra["reasoning_content"]
            assert reasoning and "<think>" not in reasoning
            streamed, content = "", ""
            for chunk in client.chat.completions.create(stream=True, **kw):
                delta = chunk.choices[0].delta if chunk.choices else None
                if delta is not None:
                    streamed += (delta.model_extra or {}).get("reasoning_content") or ""
                    content += delta.content or ""
            assert streamed == reasoning and content == (whole.content or "")


def test_required_call_after_reasoning(family_server):
    """Qwen3 with thinking on: a `<think>` block may come first, then the constrained call."""
    family, client = family_server
    if family != "qwen3":
        pytest.skip("a reasoning template only")
    choice = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Weather in Rome?"}], tools=TOOLS,
        tool_choice="required", temperature=0, max_tokens=120).choices[0]
    reasoning = (choice.message.model_extra or {}).get("reasoning_content") or ""
    assert "<think>" not in reasoning and "</think>" not in reasoning
    assert choice.message.content is None or "<tool_call>" not in choice.message.content
    if choice.finish_reason == "tool_calls":
        [call] = choice.message.tool_calls
        assert set(json.loads(call.function.arguments)) == {"city", "days"}
    else:  # the random model thought until max_tokens: all of it is reasoning
        assert choice.finish_reason == "length" and reasoning and not choice.message.tool_calls
