"""The OpenAI Responses API (`POST /v1/responses`) as an adapter over the chat path.

```
request JSON ─► ResponsesRequest ─► chat_body(history) ─► ChatCompletionRequest ─► engine
engine Events ─► ChoiceParser deltas ─► ResponsesOutput ─► `response` object | typed SSE events
```

The request becomes an OpenAI chat-completions body: `instructions` a system message,
`input` items messages (`function_call` items an assistant message's `tool_calls`,
`function_call_output` items `role: "tool"` messages), function `tools`, `tool_choice`,
`text.format` as `response_format`, `max_output_tokens` as `max_completion_tokens`.
Output items come from the choice parser's deltas: text → a `message` with one
`output_text` part, reasoning → a `reasoning` item, each tool call → a `function_call` item.

Wire truth: openai-python's `openai/types/responses/*.py` (`Response`, `ResponseUsage`,
`ResponseStreamEvent`, the input item params) and its stream accumulator
(`openai/lib/streaming/responses/_responses.py`).
"""

from __future__ import annotations

import copy
import json
import time
import uuid
from collections.abc import Callable
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from serve.errors import APIError, InvalidRequestError
from serve.events import Event
from serve.param_names import CALL_ORIGINS, ORIGIN, Renamer
from serve.parsers import (
    ChoiceParser,
    Delta,
    ReasoningDelta,
    TextDelta,
    ToolCallArgs,
    ToolCallStart,
    partial_json_object,
)
from serve.protocol import MAX_TOP_LOGPROBS, parse_request
from serve.responses import Output, TokenText, chat_logprobs_content
from serve.sse import sse
from serve.text_parts import join_text_parts
from serve.token_bytes import TokenBytes
from serve.tool_flags import check_hosted_tool_fields

R = TypeVar("R", bound=BaseModel)
LOGPROBS_INCLUDE = "message.output_text.logprobs"
# `include` values that change nothing here: we never encrypt reasoning, and a text-only
# server has no image URLs, search sources or code outputs to add.
HARMLESS_INCLUDES = frozenset({
    "reasoning.encrypted_content", "message.input_image.image_url", "file_search_call.results",
    "web_search_call.results", "web_search_call.action.sources", "code_interpreter_call.outputs",
    "computer_call_output.output.image_url",
})
# Content part types read as text → the field holding it (an assistant's `refusal` is text it said).
TEXT_FIELDS = {"input_text": "text", "output_text": "text", "text": "text", "refusal": "refusal"}
MESSAGE_ROLES = ("user", "system", "developer", "assistant")


def new_item_id(prefix: str) -> str:
    """OpenAI's id style: `resp_…`, `msg_…`, `fc_…`, `rs_…`."""
    return f"{prefix}_{uuid.uuid4().hex}"


class ResponsesRequest(BaseModel):
    """`POST /v1/responses` body: the subset served, in the order of OpenAI's reference.

    Fields that would change the output but cannot be honoured here are refused by
    `check()` (400 naming them); unknown fields are ignored like everywhere else.
    """

    # Strict, as the chat route: "0.5" is no number, "true" / "no" no boolean.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, strict=True)
    # chat's and Anthropic's fields → this route's (`serve.foreign_fields`: others are 400)
    FOREIGN_ALIASES: ClassVar[dict[str, str] | None] = {
        "max_tokens": "'max_output_tokens'", "max_completion_tokens": "'max_output_tokens'",
        "response_format": "'text.format'", "output_config": "'text.format'", "output_format": "'text.format'",
        "system": "'instructions'", "messages": "'input'", "reasoning_effort": "'reasoning.effort'",
        "logprobs": "include: ['message.output_text.logprobs']"}

    model: str | None = None
    input: str | list[dict[str, Any]]
    background: bool | None = None
    conversation: Any = None
    include: list[str] | None = None
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    max_tool_calls: int | None = None
    metadata: dict[str, str] | None = None
    parallel_tool_calls: bool | None = None
    previous_response_id: str | None = None
    prompt: Any = None
    reasoning: dict[str, Any] | None = None
    store: bool | None = True
    stream: bool | None = False
    temperature: float | None = Field(None, ge=0, le=2)
    text: dict[str, Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    top_p: float | None = Field(None, ge=0, le=1)
    truncation: Literal["auto", "disabled"] | None = None
    user: str | None = None
    # extras (as on the chat route)
    seed: int | None = None
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    ignore_eos: bool | None = None
    _renamer: Renamer = PrivateAttr(default_factory=Renamer)

    def check(self) -> None:
        """Refuse what this server cannot do (400 naming the field)."""
        if self.background:
            raise InvalidRequestError("Background responses are not supported by this server.",
                                      param="background")
        if self.conversation is not None:
            raise InvalidRequestError("Conversations are not supported by this server; use "
                                      "'previous_response_id' to continue a stored response.",
                                      param="conversation")
        if self.prompt is not None:
            raise InvalidRequestError("Prompt templates are not supported by this server.", param="prompt")
        if self.max_tool_calls is not None:
            raise InvalidRequestError("'max_tool_calls' is not supported by this server.",
                                      param="max_tool_calls")
        if self.truncation == "auto":
            raise InvalidRequestError("Truncation 'auto' is not supported: an input that does not "
                                      "fit the context is refused with 400.", param="truncation")
        for value in self.include or ():
            if value != LOGPROBS_INCLUDE and value not in HARMLESS_INCLUDES:
                raise InvalidRequestError(f"include '{value}' is not supported by this server.",
                                          param="include")
        verbosity = (self.text or {}).get("verbosity")
        if verbosity not in (None, "medium"):
            raise InvalidRequestError(f"text.verbosity '{verbosity}' is not supported; only 'medium'.",
                                      param="text.verbosity")

    @property
    def logprobs(self) -> bool:
        return LOGPROBS_INCLUDE in (self.include or ())

    def input_messages(self) -> list[dict[str, Any]]:
        """`input` as chat messages (without `instructions`)."""
        return input_messages(self.input)

    @property
    def renamer(self) -> Renamer:
        """Chat params → this route's (after `chat_body`)."""
        return self._renamer

    def chat_body(self, history: list[dict[str, Any]]) -> dict[str, Any]:
        """The equivalent chat-completions request body; `history` (chat messages of the
        `previous_response_id` conversation) goes between `instructions` and `input`."""
        messages = []
        if self.instructions:
            messages.append({"role": "system", "content": self.instructions, ORIGIN: "instructions"})
        messages += [{**m, ORIGIN: "previous_response_id"} for m in history]
        first_input = len(messages)
        messages += _marked_input_messages(self.input)
        if not messages:
            raise InvalidRequestError("The input is empty: send at least one message.", param="input")
        renamer = Renamer(_RENAMES)
        renamer.take_origins(messages, fields={"content": "content", "tool_call_id": "call_id"},
                             calls={"function.arguments": "arguments", "function.name": "name", "function": "",
                                    "id": "call_id"}, default="input")
        calls: set[Any] = set()  # call ids made so far (this input's and the stored history's)
        pending: dict[Any, str] = {}  # call id → its param, while no output has answered it
        for k, m in enumerate(messages):  # a tool result's text is its item's `output`
            if m["role"] == "tool":
                renamer.add(f"messages.[{k}].content", renamer(f"messages.[{k}]") + ".output")
                if m.get("tool_call_id") not in calls:  # as OpenAI: an output answers a call
                    raise InvalidRequestError(
                        f"No tool call found for function call output with call_id "
                        f"'{m.get('tool_call_id')}'.", param=renamer(f"messages.[{k}].tool_call_id"))
                pending.pop(m.get("tool_call_id"), None)
                continue
            _no_missing_outputs(pending)
            made = [c for c in m.get("tool_calls") or () if isinstance(c, dict)]
            calls.update(c.get("id") for c in made)
            # a stored response's call is answered in this request's `input`: name that
            pending = {c.get("id"): "input" if k < first_input else renamer(f"messages.[{k}].tool_calls.[{j}].id")
                       for j, c in enumerate(made)}
        _no_missing_outputs(pending)
        for j in range(len(self.tools or ())):
            renamer.add(f"tools.[{j}].function", f"tools[{j}]")  # OpenAI's Responses spelling
        self._renamer = renamer
        body: dict[str, Any] = {"model": self.model, "messages": messages, "stream": bool(self.stream)}
        if self.tools:
            body["tools"] = chat_tools(self.tools)
        if self.tool_choice is not None:
            body["tool_choice"] = chat_tool_choice(self.tool_choice)
        if self.parallel_tool_calls is not None:
            body["parallel_tool_calls"] = self.parallel_tool_calls
        response_format = chat_response_format((self.text or {}).get("format"))
        if response_format is not None:
            body["response_format"] = response_format
        effort = (self.reasoning or {}).get("effort")
        if effort is not None:
            # chat's `reasoning_effort`: honoured where the chat template reads it, else 400
            body["reasoning_effort"] = effort
        if self.max_output_tokens is not None:
            body["max_completion_tokens"] = self.max_output_tokens
        if self.logprobs:
            body["logprobs"] = True
            body["top_logprobs"] = self.top_logprobs or 0
        for name in ("temperature", "top_p", "user", "seed", "top_k", "min_p", "ignore_eos"):
            if getattr(self, name) is not None:
                body[name] = getattr(self, name)
        return body

    def echo(self) -> dict[str, Any]:
        """The request's settings as the `response` object repeats them."""
        return {
            "instructions": self.instructions,
            "max_output_tokens": self.max_output_tokens,
            "metadata": dict(self.metadata or {}),
            # several calls per turn only when asked for, as on the chat route (OpenAI's default is true)
            "parallel_tool_calls": self.parallel_tool_calls is True,
            "previous_response_id": self.previous_response_id,
            "reasoning": {"effort": (self.reasoning or {}).get("effort"),
                          "summary": (self.reasoning or {}).get("summary")},
            "store": self.store is not False,
            "temperature": 1.0 if self.temperature is None else self.temperature,
            "text": {"format": (self.text or {}).get("format") or {"type": "text"}, "verbosity": "medium"},
            "tool_choice": "auto" if self.tool_choice is None else self.tool_choice,
            "tools": list(self.tools or []),
            "top_logprobs": self.top_logprobs if self.logprobs else None,
            "top_p": 1.0 if self.top_p is None else self.top_p,
            "truncation": "disabled",
            "user": self.user,
        }


def parse_body(model: type[R], body: dict[str, Any]) -> R:
    """`parse_request` for this route's bodies, its errors spelled as OpenAI's Responses API
    spells params (`input[0]`, `tools[1].name`), not chat's `input.[0]`.

    Raises:
        InvalidRequestError: as `serve.protocol.parse_request`.
    """
    try:
        return parse_request(model, body)
    except APIError as exc:
        if exc.param and ".[" in exc.param:
            old, exc.param = exc.param, exc.param.replace(".[", "[")
            exc.message = exc.message.replace(f"'{old}", f"'{exc.param}")
        raise


class InputTokensRequest(ResponsesRequest):
    """`POST /v1/responses/input_tokens` (openai-python's `responses.input_tokens.count`): a
    Responses request whose prompt is counted, not answered. `input` may be left out
    (`instructions` or the `previous_response_id` history alone); a `responses.create` body
    counts as it is (its generation fields change no prompt)."""

    FOREIGN_ALIASES: ClassVar[dict[str, str] | None] = None  # a create() body counts as it is
    input: str | list[dict[str, Any]] = Field(default_factory=list)


# ------------------------------------------------------------------ request translation


# chat field → Responses field, for errors found after translation (`Renamer`)
_RENAMES = (
    ("response_format", "text.format"), ("response_format.json_schema", "text.format"),
    ("max_completion_tokens", "max_output_tokens"), ("reasoning_effort", "reasoning.effort"),
    ("chat_template_kwargs", "reasoning.effort"), ("logprobs", "include"), ("tool_choice.function", "tool_choice"),
)


def _no_missing_outputs(pending: dict[Any, str]) -> None:
    """OpenAI's 400 for `function_call` items no `function_call_output` answers before the
    conversation goes on (`pending`: call id → the call's param), naming the first."""
    if pending:
        call_id, param = next(iter(pending.items()))
        raise InvalidRequestError(f"No tool output found for function call {call_id}.", param=param)


def input_messages(items: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Responses `input` → OpenAI chat messages (see `_marked_input_messages`)."""
    return [{k: v for k, v in m.items() if k not in (ORIGIN, CALL_ORIGINS)} for m in _marked_input_messages(items)]


def _marked_input_messages(items: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Responses `input` → OpenAI chat messages.

    A string is one user message. Items: messages (`type` "message" or absent; roles
    user/system/developer/assistant; content a string or `input_text`/`output_text`
    parts), `function_call` (→ `tool_calls` on an assistant message, joining the one
    before it; one with `status: "incomplete"`, a call `max_output_tokens` cut, with the
    object its arguments hold so far, as `output_messages` replays it),
    `function_call_output` (→ a `role: "tool"` message), `reasoning` (dropped: chat
    templates do not replay earlier reasoning). Anything else is a 400 naming it.
    Each message carries its origin (`serve.param_names`: `input[i]`, OpenAI's Responses spelling).
    """
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    messages: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        param = f"input[{i}]"
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            messages.append(_message(item, param))
        elif kind == "function_call":
            arguments = _string(item, "arguments", param)
            if item.get("status") == "incomplete":  # cut by max_output_tokens: what it holds so far
                arguments = json.dumps(partial_json_object(arguments), ensure_ascii=False)
            call = {"id": _string(item, "call_id", param), "type": "function",
                    "function": {"name": _string(item, "name", param), "arguments": arguments}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
                last.setdefault(CALL_ORIGINS, []).append(param)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call], ORIGIN: param,
                                 CALL_ORIGINS: [param]})
        elif kind == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": _string(item, "call_id", param),
                             "content": _text(item.get("output"), f"{param}.output"), ORIGIN: param})
        elif kind == "reasoning":
            continue
        elif kind is None:
            raise InvalidRequestError("Each input item needs a 'type' (or a 'role' for a message).",
                                      param=f"{param}.type")
        else:
            raise InvalidRequestError(f"Input items of type '{kind}' are not supported by this server; "
                                      "only messages, 'function_call' and 'function_call_output'.",
                                      param=f"{param}.type")
    return messages


def _message(item: dict[str, Any], param: str) -> dict[str, Any]:
    role = item.get("role")
    if role not in MESSAGE_ROLES:
        raise InvalidRequestError(f"Invalid value for 'role': {role!r} is not one of {list(MESSAGE_ROLES)}.",
                                  param=f"{param}.role")
    return {"role": role, "content": _text(item.get("content"), f"{param}.content"), ORIGIN: param}


def _text(content: Any, param: str) -> str:
    """A string, or text (and refusal) content parts joined by newlines."""
    return join_text_parts(content, param, fields=TEXT_FIELDS)


def _string(item: dict[str, Any], name: str, param: str) -> str:
    value = item.get(name)
    if not isinstance(value, str):
        raise InvalidRequestError(f"Missing or invalid '{name}': a string is required.", param=f"{param}.{name}")
    return value


def chat_tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Responses function tools (flat: `name`, `parameters` at the top) → chat tools
    (`{"type": "function", "function": {...}}`); other tool types are a 400 naming them."""
    out = []
    for j, tool in enumerate(tools):
        kind = tool.get("type")
        if kind != "function":
            raise InvalidRequestError(f"Tools of type {kind!r} are not supported by this server; only "
                                      "'function' tools (no built-in tools such as web search).",
                                      param=f"tools[{j}].type")
        check_hosted_tool_fields(tool, f"tools[{j}]")
        function = {"name": _string(tool, "name", f"tools[{j}]")}
        for key in ("description", "parameters", "strict"):
            if tool.get(key) is not None:
                function[key] = tool[key]
        description = _with_output_schema(function.get("description"), tool.get("output_schema"), f"tools[{j}]")
        if description is not None:
            function["description"] = description
        out.append({"type": "function", "function": function})
    return out


def _with_output_schema(description: Any, schema: Any, param: str) -> Any:
    """A function's `description` with its `output_schema` (OpenAI's JSON schema of the JSON
    value its string outputs hold) appended as one JSON line, so that the chat template shows
    the model what a `function_call_output` will hold wherever it shows the description;
    `description` as is without one. Nothing checks the outputs against it (as at OpenAI: the
    outputs come from the client).

    Raises:
        InvalidRequestError: `output_schema` not a JSON object (`{param}.output_schema`).
    """
    if schema is None:
        return description
    if not isinstance(schema, dict):
        raise InvalidRequestError("Invalid 'output_schema': a JSON schema object is required.",
                                  param=f"{param}.output_schema")
    line = json.dumps(schema, ensure_ascii=False)
    return f"{description or ''}\n\nOutput schema (the JSON its output holds):\n{line}".lstrip("\n")


def chat_tool_choice(choice: str | dict[str, Any]) -> str | dict[str, Any]:
    """`auto` / `none` / `required` as is; `{"type": "function", "name"}` → chat's
    `{"type": "function", "function": {"name"}}`; `{"type": "allowed_tools", "mode", "tools"}`
    → chat's nested `allowed_tools` (checked there); hosted-tool choices are a 400."""
    if isinstance(choice, str):
        if choice not in ("auto", "none", "required"):
            raise InvalidRequestError(f"Invalid tool_choice {choice!r}: use 'auto', 'none', 'required' "
                                      "or a function.", param="tool_choice")
        return choice
    if choice.get("type") == "function":
        if not isinstance(choice.get("name"), str):
            raise InvalidRequestError("tool_choice of type 'function' needs the function's 'name'.",
                                      param="tool_choice.name")
        return {"type": "function", "function": {"name": choice["name"]}}
    if choice.get("type") == "allowed_tools":
        # flat here (`mode`, `tools: [{"type": "function", "name"}]`), nested on chat: the
        # shape is checked here, so that errors show this route's
        if choice.get("mode") not in ("auto", "required"):
            raise InvalidRequestError(f"Invalid 'tool_choice.mode': {choice.get('mode')!r} is not one of "
                                      "'auto', 'required'.", param="tool_choice.mode")
        tools = choice.get("tools")
        if not isinstance(tools, list) or not tools:
            raise InvalidRequestError("'tool_choice.tools' must be a non-empty list of "
                                      "{'type': 'function', 'name': ...}.", param="tool_choice.tools")
        for k, t in enumerate(tools):
            if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(t.get("name"), str):
                raise InvalidRequestError(f"'tool_choice.tools[{k}]' must be {{'type': 'function', 'name': ...}} "
                                          "(function tools only).", param=f"tool_choice.tools[{k}]")
        nested = [{"type": "function", "function": {"name": t["name"]}} for t in tools]
        return {"type": "allowed_tools", "allowed_tools": {"mode": choice["mode"], "tools": nested}}
    raise InvalidRequestError(f"tool_choice of type {choice.get('type')!r} is not supported; use 'auto', "
                              "'none', 'required' or {'type': 'function', 'name': ...}.", param="tool_choice")


def chat_response_format(fmt: Any) -> dict[str, Any] | None:
    """`text.format` → chat `response_format` (None for plain text)."""
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        if not isinstance(fmt.get("schema"), dict):
            raise InvalidRequestError("text.format of type 'json_schema' needs a 'schema' object.",
                                      param="text.format.schema")
        schema = {"name": fmt.get("name") or "response", "schema": fmt["schema"]}
        for key in ("description", "strict"):
            if fmt.get(key) is not None:
                schema[key] = fmt[key]
        return {"type": "json_schema", "json_schema": schema}
    raise InvalidRequestError(f"text.format of type {kind!r} is not supported; use 'text', 'json_object' "
                              "or 'json_schema'.", param="text.format")


def input_items(items: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A request's `input` (already validated by `input_messages`) as the items
    `GET /v1/responses/{id}/input_items` lists (openai-python's `ResponseItem`): each with an
    `id` (the client's, else a new one) and `status`; a string or string content becomes
    `input_text` parts (`output_text` for an assistant)."""
    if isinstance(items, str):
        items = [{"role": "user", "content": items}]
    out = []
    for item in items:
        kind = item.get("type", "message")
        prefix = {"message": "msg", "reasoning": "rs", "function_call": "fc", "function_call_output": "fco"}[kind]
        entry = {**item, "id": item.get("id") or new_item_id(prefix), "type": kind}
        if kind == "message":
            part = "output_text" if item["role"] == "assistant" else "input_text"
            if isinstance(item["content"], str):
                entry["content"] = [{"type": part, "text": item["content"]}]
            if item["role"] == "assistant":
                entry["content"] = [{"annotations": [], **c} if c.get("type") == "output_text" else c
                                    for c in entry["content"]]
        if kind != "reasoning":
            entry.setdefault("status", "completed")
        out.append(entry)
    return out


def list_page(items: list[dict[str, Any]], *, order: str, limit: int, after: str | None) -> dict[str, Any]:
    """OpenAI's cursor page (`{"object": "list", "data", "first_id", "last_id", "has_more"}`)
    over `items` (oldest first): `order` "asc" or "desc", at most `limit` items, those after
    the item with id `after`.

    Raises:
        InvalidRequestError: a bad `order` / `limit`, or `after` names no item.
    """
    if order not in ("asc", "desc"):
        raise InvalidRequestError(f"Invalid 'order': {order!r} is not one of ['asc', 'desc'].", param="order")
    if not 1 <= limit <= 100:
        raise InvalidRequestError(f"Invalid 'limit': {limit} is not between 1 and 100.", param="limit")
    ordered = items if order == "asc" else items[::-1]
    if after is not None:
        ids = [item["id"] for item in ordered]
        if after not in ids:
            raise InvalidRequestError(f"Invalid 'after': no input item with id '{after}'.", param="after")
        ordered = ordered[ids.index(after) + 1:]
    data = ordered[:limit]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": len(ordered) > limit}


def output_messages(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A response's output items as chat messages (what `previous_response_id` replays).

    A `function_call` cut by `max_output_tokens` (status `incomplete`, its `arguments` JSON
    unfinished) replays with the object its arguments hold so far (`partial_json_object`,
    as Anthropic's SDK reads a cut call), so that a conversation can go on past it: the
    unfinished text would make every later request a 400 its client could not fix.
    """
    message: dict[str, Any] | None = None
    for item in items:
        if item["type"] == "message":
            text = "".join(part.get("text", "") for part in item["content"])
            message = message or {"role": "assistant", "content": None}
            message["content"] = (message["content"] or "") + text
        elif item["type"] == "function_call":
            message = message or {"role": "assistant", "content": None}
            arguments = item["arguments"]
            if item.get("status") == "incomplete":
                arguments = json.dumps(partial_json_object(arguments), ensure_ascii=False)
            message.setdefault("tool_calls", []).append(
                {"id": item["call_id"], "type": "function",
                 "function": {"name": item["name"], "arguments": arguments}})
    return [message] if message is not None else []


# -------------------------------------------------------------------------- rendering


class ResponsesOutput(Output):
    """One choice's events → a `response` object, or the typed event stream.

    Args:
        id: the response id (`resp_…`).
        model: the served model id.
        token_text: token id → its text (for logprobs).
        echo: `ResponsesRequest.echo()`, repeated in every `response` object.
        make_parser: a fresh `ChoiceParser` for the choice.
        logprobs: attach token logprobs to `output_text` parts and deltas.
        on_done: called with the final `response` object (completed or incomplete) and its
            output items, once (the route stores it).
    """

    heartbeat = None  # clients wait quietly; the engine's first event comes before the stream starts

    def __init__(self, id: str, model: str, token_text: TokenText, *, echo: dict[str, Any],
                 make_parser: Callable[[], ChoiceParser] = ChoiceParser, logprobs: bool = False,
                 on_done: Callable[[dict[str, Any]], None] | None = None,
                 token_bytes: TokenBytes | None = None) -> None:
        super().__init__(id, model, 1, token_text, logprobs=logprobs, include_usage=False,
                         token_bytes=token_bytes)
        self.created_at = int(time.time())  # whole seconds, as OpenAI's (the SDK's float accepts it)
        self.echo = echo
        self.parser = make_parser()
        self.on_done = on_done
        self.items: list[dict[str, Any]] = []
        self._open: dict[str, Any] | None = None  # the item receiving deltas
        self._calls: dict[int, dict[str, Any]] = {}  # tool-call index → its item
        self._space = ""  # whitespace-only text held back: it may only separate tool calls
        self._lps: list[dict] = []  # logprobs not yet attached to an output_text delta
        self.reasoning_tokens = 0
        self.finish_reason: str | None = None
        self._seq = 0
        self._out: list[bytes] | None = None  # None: not streaming

    # ---- the event stream's framing

    def _emit(self, kind: str, **fields: Any) -> None:
        if self._out is None:
            return
        payload = {"type": kind, "sequence_number": self._seq, **fields}
        self._seq += 1
        self._out.append(sse(payload, event=kind))

    def _flush(self) -> list[bytes]:
        out, self._out = self._out or [], []
        return out

    def start(self, first: Event) -> list[bytes]:
        self._out = []
        self._emit("response.created", response=self.body("in_progress"))
        self._emit("response.in_progress", response=self.body("in_progress"))
        return self._flush()

    def chunks(self, k: int, event: Event) -> list[bytes]:
        self._process(event)
        return self._flush()

    def add(self, k: int, event: Event) -> None:
        self._process(event)

    def end(self) -> list[bytes]:
        body = self._final()
        self._emit(f"response.{body['status']}", response=body)
        return self._flush()

    def response(self) -> dict[str, Any]:
        return self._final()

    def fail(self, error: APIError) -> list[bytes]:
        body = self.body("failed")
        # the SDK's `ResponseError.code` is a Literal of OpenAI's codes: none of ours is one
        code = "rate_limit_exceeded" if error.status_code == 429 else "server_error"
        body["error"] = {"code": code, "message": error.message}
        self._emit("response.failed", response=body)
        return self._flush()

    def done(self) -> list[bytes]:
        return []  # the Responses stream has no `[DONE]`: `response.completed` ends it

    # ---- the response object

    def body(self, status: str) -> dict[str, Any]:
        """The `response` object as it stands, with `status`."""
        usage = None
        if self.usage is not None:
            u = self.usage
            usage = {"input_tokens": u.prompt_tokens,
                     # no billing cache here: nothing is "written" beyond the KV prefix cache
                     "input_tokens_details": {"cached_tokens": u.cached_tokens, "cache_write_tokens": 0},
                     "output_tokens": u.completion_tokens,
                     "output_tokens_details": {"reasoning_tokens": min(self.reasoning_tokens,
                                                                       u.completion_tokens)},
                     "total_tokens": u.prompt_tokens + u.completion_tokens}
        body = {"id": self.id, "object": "response", "created_at": self.created_at, "status": status,
                "background": False, "error": None,
                "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
                "model": self.model, "output": copy.deepcopy(self.items), "usage": usage, **self.echo}
        if status in ("completed", "incomplete"):
            body["completed_at"] = int(time.time())
        return body

    def _final(self) -> dict[str, Any]:
        body = self.body("incomplete" if self.finish_reason == "length" else "completed")
        if self.on_done is not None:
            self.on_done(body)
            self.on_done = None
        return body

    # ---- deltas → items

    def _process(self, event: Event) -> None:
        self._track(event)  # an error event raises
        for c in event.choices:
            if self.logprobs and c.logprobs:
                self._lps.extend(chat_logprobs_content(c.logprobs, self.token_text, self.token_bytes))
            deltas = self.parser.feed(c.text)
            if deltas and all(isinstance(d, ReasoningDelta) for d in deltas):
                self.reasoning_tokens += len(c.token_ids)
            if c.finish_reason is not None:
                deltas += self.parser.finish()
            for delta in deltas:
                self._delta(delta)
            if c.finish_reason is not None:
                self.finish_reason = c.finish_reason
                if not self.items:  # an empty answer is still a message
                    self._text("")
                cut = c.finish_reason == "length" or self.parser.open_calls > 0
                self._close("incomplete" if cut else "completed")

    def _delta(self, delta: Delta) -> None:
        if isinstance(delta, TextDelta):
            if self._open is None or self._open["type"] != "message":
                if not (self._space + delta.text).strip():
                    self._space += delta.text
                    return
            self._text(delta.text)
        elif isinstance(delta, ReasoningDelta):
            self._reasoning(delta.text)
        elif isinstance(delta, ToolCallStart):
            self._close("completed")
            self._space = ""
            item = {"id": new_item_id("fc"), "type": "function_call", "status": "in_progress",
                    "arguments": "", "call_id": delta.id, "name": delta.name}
            self._calls[delta.index] = item
            self._add_item(item)
        elif isinstance(delta, ToolCallArgs):
            item = self._calls[delta.index]
            item["arguments"] += delta.fragment
            self._emit("response.function_call_arguments.delta", item_id=item["id"],
                       output_index=self.items.index(item), delta=delta.fragment)

    def _add_item(self, item: dict[str, Any]) -> None:
        self.items.append(item)
        self._open = item
        self._emit("response.output_item.added", output_index=len(self.items) - 1, item=item)

    def _text(self, text: str) -> None:
        if self._open is None or self._open["type"] != "message":
            self._close("completed")
            self._add_item({"id": new_item_id("msg"), "type": "message", "status": "in_progress",
                            "content": [], "role": "assistant"})
            self._add_part({"type": "output_text", "annotations": [], "logprobs": [], "text": ""})
            text, self._space = self._space + text, ""
        item = self._open
        assert item is not None
        part = item["content"][0]
        part["text"] += text
        lps, self._lps = self._lps, []
        part["logprobs"] += lps
        if text:
            self._emit("response.output_text.delta", item_id=item["id"], output_index=len(self.items) - 1,
                       content_index=0, delta=text, logprobs=_event_logprobs(lps))
        else:
            self._lps = lps  # wait for text to carry them

    def _reasoning(self, text: str) -> None:
        if self._open is None or self._open["type"] != "reasoning":
            self._close("completed")
            self._add_item({"id": new_item_id("rs"), "type": "reasoning", "summary": [], "content": [],
                            "status": "in_progress"})
            self._add_part({"type": "reasoning_text", "text": ""})
        item = self._open
        assert item is not None
        item["content"][0]["text"] += text
        self._emit("response.reasoning_text.delta", item_id=item["id"], output_index=len(self.items) - 1,
                   content_index=0, delta=text)

    def _add_part(self, part: dict[str, Any]) -> None:
        item = self._open
        assert item is not None
        item["content"].append(part)
        self._emit("response.content_part.added", item_id=item["id"], output_index=len(self.items) - 1,
                   content_index=0, part=part)

    def _close(self, status: str) -> None:
        """End the open item (its `.done` events); the others were ended when it opened."""
        item, self._open = self._open, None
        if item is None:
            return
        index = self.items.index(item)
        item["status"] = status
        if item["type"] == "message":
            part = item["content"][0]
            self._emit("response.output_text.done", item_id=item["id"], output_index=index, content_index=0,
                       text=part["text"], logprobs=_event_logprobs(part["logprobs"]))
            self._emit("response.content_part.done", item_id=item["id"], output_index=index,
                       content_index=0, part=part)
        elif item["type"] == "reasoning":
            part = item["content"][0]
            self._emit("response.reasoning_text.done", item_id=item["id"], output_index=index,
                       content_index=0, text=part["text"])
            self._emit("response.content_part.done", item_id=item["id"], output_index=index,
                       content_index=0, part=part)
        elif item["type"] == "function_call":
            self._emit("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                       name=item["name"], arguments=item["arguments"])
        self._emit("response.output_item.done", output_index=index, item=item)


def _event_logprobs(lps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Logprobs as the `output_text.delta` / `.done` events carry them: `token`, `logprob`,
    `top_logprobs` (`token`, `logprob`), without the `bytes` the `output_text` part has
    (OpenAI's event schema, the SDK's `ResponseTextDeltaEvent.Logprob`, has none)."""
    return [{"token": lp["token"], "logprob": lp["logprob"],
             "top_logprobs": [{"token": t["token"], "logprob": t["logprob"]} for t in lp.get("top_logprobs", [])]}
            for lp in lps]
