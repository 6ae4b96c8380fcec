"""The Anthropic Messages API (`POST /v1/messages`, `/v1/messages/count_tokens`) as an
adapter over the chat path.

```
request JSON ─► MessagesRequest ─► chat_body() ─► ChatCompletionRequest ─► engine
engine Events ─► ChoiceParser deltas ─► MessagesOutput ─► `message` object | Anthropic SSE events
```

`system` becomes a system message; `text` blocks message text, assistant `tool_use` blocks
`tool_calls` (the `input` object as JSON arguments), user `tool_result` blocks
`role: "tool"` messages; `tools` (`name`, `description`, `input_schema`) chat function
tools; `tool_choice` auto/any/tool/none chat's auto/required/function/none;
`stop_sequences` chat's `stop`; `output_config.format` (or the older top-level `output_format`; a JSON schema) chat's
`response_format`. `temperature`, `top_p` and `top_k` are honoured although the newest
SDKs no longer send them (pass them in `extra_body`). Errors on these routes use Anthropic's body
`{"type": "error", "error": {"type", "message"}}` (`anthropic_errors`).

Threads (the `message-threads` beta the SDK's `tool_runner` uses by default): a request with
`thread: {"type": "create"}` has its conversation kept (`serve.response_store.StoredThread`,
under the reply's id) and one with `{"type": "continue", "previous_message_id"}` sends only
the new messages: `resume_thread` puts the thread's `system`, `tools` and history back
before it is translated, `thread_after` records the reply.

Wire truth: anthropic-sdk-python's `anthropic/types/*.py` (`Message`, `Usage`,
`RawMessageStreamEvent`, the `*Param` request types) and its stream accumulator
(`anthropic/lib/streaming/_messages.py`).
"""

from __future__ import annotations

import functools
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from serve.errors import (
    GENERIC_SERVER_ERROR,
    APIError,
    InvalidRequestError,
    NotFoundError,
    ServerError,
)
from serve.events import Event, Usage
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
from serve.protocol import MAX_STOPS
from serve.response_store import StoredThread
from serve.responses import Output, TokenText
from serve.sse import sse
from serve.text_parts import join_text_parts
from serve.tool_flags import check_hosted_tool_fields, flag

log = logging.getLogger("serve.api_messages")

PING_INTERVAL_S = 10.0  # a `ping` event after this long without another event

# Anthropic's error `type` per HTTP status (https://docs.anthropic.com/en/api/errors).
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 413: "request_too_large",
               429: "rate_limit_error", 503: "overloaded_error", 529: "overloaded_error"}


# Anthropic's `error.details.error_code` values this server sends (the SDK branches on them:
# a thread it cannot continue is replayed in full under `thread: {"type": "create"}`).
DETAIL_CODES = frozenset({"thread_not_found", "thread_already_continued", "thread_fingerprint_mismatch"})


def new_message_id() -> str:
    return f"msg_{uuid.uuid4().hex}"


# ----------------------------------------------------------------------------- errors


def error_body(exc: APIError, request: Request | None = None) -> dict[str, Any]:
    """`{"type": "error", "error": {"type", "message"}, "request_id"}` for an `APIError`;
    `request_id` (the response's `request-id` header, as Anthropic's bodies carry it) where
    `request` is given and `serve.request_id`'s middleware named it."""
    kind = ERROR_TYPES.get(exc.status_code, "api_error" if exc.status_code >= 500 else "invalid_request_error")
    message = exc.message
    if exc.param and exc.param not in message:  # Anthropic's bodies have no `param`: "where: what"
        message = f"{exc.param}: {message}"
    body: dict[str, Any] = {"type": "error", "error": {"type": kind, "message": message}}
    if exc.code in DETAIL_CODES:
        body["error"]["details"] = {"error_code": exc.code}
    rid = getattr(request.state, "request_id", None) if request is not None else None
    if rid is not None:
        body["request_id"] = rid
    return body


Handler = Callable[[Request, Any], Awaitable[Response]]


def anthropic_errors(handler: Handler) -> Handler:
    """Wrap a route so its errors leave in Anthropic's shape (same statuses and headers);
    unexpected exceptions are logged and become a traceback-free 500."""

    @functools.wraps(handler)
    async def wrapped(request: Request, state: Any) -> Response:
        try:
            return await handler(request, state)
        except APIError as exc:
            error = exc
        except Exception:
            log.exception("error in %s %s", request.method, request.url.path)
            error = ServerError(GENERIC_SERVER_ERROR)
        return JSONResponse(error_body(error, request), status_code=error.status_code,
                            headers=error.headers or None)

    return wrapped


# ---------------------------------------------------------------------------- request


class MessagesRequest(BaseModel):
    """`POST /v1/messages` body, in the order of Anthropic's reference. Fields that would
    change the output but cannot be honoured are refused (400 naming them); unknown
    fields are ignored."""

    # Strict, as the chat route: "0.5" is no number, "true" no boolean.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, strict=True)
    # OpenAI's fields → this route's (`serve.foreign_fields`: others are 400)
    FOREIGN_ALIASES: ClassVar[dict[str, str] | None] = {
        "stop": "'stop_sequences'", "max_completion_tokens": "'max_tokens'", "max_output_tokens": "'max_tokens'",
        "response_format": "'output_config.format'", "text": "'output_config.format'",
        "instructions": "'system'", "reasoning_effort": "'output_config.effort'",
        "reasoning": "'output_config.effort'"}

    model: str
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_tokens: int = Field(ge=1)
    mcp_servers: list[Any] | None = None
    metadata: dict[str, Any] | None = None
    output_config: dict[str, Any] | None = None
    output_format: dict[str, Any] | None = None  # the structured-outputs beta's spelling
    stop_sequences: list[str] | None = None
    stream: bool | None = False
    system: str | list[dict[str, Any]] | None = None
    temperature: float | None = Field(None, ge=0, le=1)
    thinking: dict[str, Any] | None = None
    thread: dict[str, Any] | None = None  # the threads beta: {"type": "create" | "continue", …}
    tool_choice: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    top_k: int | None = Field(None, ge=0)
    top_p: float | None = Field(None, ge=0, le=1)
    ignore_eos: bool | None = None  # extra, as on the chat route
    _renamer: Renamer = PrivateAttr(default_factory=Renamer)

    def check(self) -> None:
        """Refuse what this server cannot do (400 naming the field)."""
        if self.mcp_servers:
            raise InvalidRequestError("MCP servers are not supported by this server.", param="mcp_servers")
        if self.thinking is not None and self.thinking.get("type") != "disabled":
            raise InvalidRequestError(
                "thinking: extended thinking budgets are not supported by this server; a model that reasons "
                "by its chat template returns `thinking` blocks without asking.", param="thinking")
        if self.thread is not None:
            kind = self.thread.get("type")
            if kind not in ("create", "continue"):
                raise InvalidRequestError(f"thread.type: {kind!r} is not one of 'create', 'continue'.",
                                          param="thread.type")
            if kind == "continue" and not isinstance(self.thread.get("previous_message_id"), str):
                raise InvalidRequestError("thread.previous_message_id: a string is required for 'continue'.",
                                          param="thread.previous_message_id")
        stops = self.stop_sequences or []
        if len(stops) > MAX_STOPS or any(s == "" for s in stops):
            raise InvalidRequestError(f"stop_sequences: at most {MAX_STOPS} non-empty strings are supported.",
                                      param="stop_sequences")

    def chat_body(self) -> dict[str, Any]:
        """The equivalent OpenAI chat-completions request body; `renamer` then maps the
        chat params of later errors back to this route's fields."""
        messages = []
        system = _text(self.system, "system") if self.system is not None else ""
        if system:
            messages.append({"role": "system", "content": system, ORIGIN: "system"})
        last = len(self.messages) - 1
        for i, message in enumerate(self.messages):
            previous = self.messages[i - 1] if i else None
            calls = _tool_use_ids(previous)
            turn = chat_messages(message, f"messages.[{i}]", final=i == last, tool_use_ids=calls)
            missing = sorted(calls - {m.get("tool_call_id") for m in turn if m["role"] == "tool"})
            if missing:  # Anthropic's rule: the next message answers every tool_use
                raise InvalidRequestError(
                    f"`tool_use` ids were found without `tool_result` blocks immediately after: "
                    f"{', '.join(missing)}. Each `tool_use` block must have a corresponding `tool_result` "
                    "block in the next message.", param=f"messages.[{i}].content")
            messages += turn
        renamer = Renamer(_RENAMES)
        renamer.take_origins(messages, fields={"tool_call_id": "tool_use_id"},
                             calls={"function.arguments": "input", "function.name": "name", "function": ""},
                             default="messages")
        for j in range(len(self.tools or ())):
            renamer.add(f"tools.[{j}].function.parameters", f"tools.[{j}].input_schema")
            renamer.add(f"tools.[{j}].function", f"tools.[{j}]")
        body: dict[str, Any] = {"model": self.model, "messages": messages, "max_tokens": self.max_tokens,
                                "stream": bool(self.stream)}
        if self.messages[-1].get("role") == "assistant":
            # prefill: the reply continues the final assistant message (only new text returned)
            final = messages[-1]
            where = f"messages.[{last}].content"
            if final.get("tool_calls"):
                raise InvalidRequestError("A final assistant message with tool_use blocks cannot be "
                                          "continued; answer the calls with tool_result blocks.", param=where)
            if (final.get("content") or "") != (final.get("content") or "").rstrip():
                raise InvalidRequestError("final assistant content cannot end with trailing whitespace",
                                          param=where)
            body.update(continue_final_message=True, add_generation_prompt=False)
            renamer.add("continue_final_message", f"messages.[{last}]")
        if self.tools:
            body["tools"] = chat_tools(self.tools)
        if self.tool_choice is not None:
            body.update(chat_tool_choice(self.tool_choice))
            named = self.tool_choice.get("name") if self.tool_choice.get("type") == "tool" else None
            if named is not None and named not in {t.get("name") for t in self.tools or ()}:
                raise InvalidRequestError(f"tool_choice.name: no tool named {named!r} in 'tools'.",
                                          param="tool_choice.name")
        if self.stop_sequences:
            body["stop"] = list(self.stop_sequences)
        for name in ("temperature", "top_p", "top_k", "ignore_eos"):
            if getattr(self, name) is not None:
                body[name] = getattr(self, name)
        config = self.output_config or {}
        fmt, where = config.get("format"), "output_config.format"
        if self.output_format is not None:  # the older beta field: the same format
            if fmt is not None:
                raise InvalidRequestError("Give the output format once: 'output_format' or "
                                          "'output_config.format'.", param="output_format")
            fmt, where = self.output_format, "output_format"
        if fmt is not None:
            body["response_format"] = chat_response_format(fmt, param=where)
        if config.get("effort") is not None:
            # chat's `reasoning_effort`: honoured where the chat template reads it, else 400
            body["reasoning_effort"] = config["effort"]
        if self.metadata and isinstance(self.metadata.get("user_id"), str):
            body["user"] = self.metadata["user_id"]
        self._renamer = renamer
        return body

    @property
    def renamer(self) -> Renamer:
        """Chat params → this route's (after `chat_body`)."""
        return self._renamer

    @property
    def continues(self) -> str | None:
        """The `previous_message_id` of a `thread: {"type": "continue"}` request, else None (after `check`)."""
        return self.thread["previous_message_id"] if self.thread and self.thread.get("type") == "continue" else None


def resume_thread(req: MessagesRequest, stored: Any, *, in_flight: bool = False) -> None:
    """Make a `thread: continue` request whole, in place: the thread's `system` and `tools`
    (create-only fields: the request may repeat them only unchanged) and its messages before
    the request's own. Message params in later errors then count from the thread's first
    message (`messages.[i]` of the whole conversation).

    Args:
        req: a checked request whose `continues` is set.
        stored: what the store holds under that id (a `StoredThread`, else unknown).
        in_flight: another request accepted earlier continues that reply and has not
            ended (`ResponseStore.reserve` said so): it is continued already.

    Raises:
        NotFoundError: no thread under that id (unknown, evicted, or a restart): code
            `thread_not_found`, on which the SDK replays the conversation in full.
        InvalidRequestError: that reply was already continued, or is being continued
            (`thread_already_continued`),
            or `model`, `system` or `tools` differ from the thread's
            (`thread_fingerprint_mismatch`, naming them).
    """
    message_id = req.continues
    if not isinstance(stored, StoredThread):
        raise NotFoundError(f"No thread found for previous_message_id {message_id!r}; send the whole "
                            "conversation with thread: {'type': 'create'}.", param="thread.previous_message_id",
                            code="thread_not_found")
    if stored.continued or in_flight:
        raise InvalidRequestError(f"The message {message_id!r} has already been continued; each message can be "
                                  "continued only once. Continue from the thread's latest message id.",
                                  param="thread.previous_message_id", code="thread_already_continued")
    tools = list(stored.tools) if stored.tools is not None else None
    differ = [name for name, mine, theirs in (("model", req.model, stored.model), ("system", req.system, stored.system),
                                              ("tools", req.tools, tools))
              if mine is not None and mine != theirs]
    if differ:
        raise InvalidRequestError(f"{', '.join(differ)} must stay as the thread's first request sent "
                                  f"{'it' if len(differ) == 1 else 'them'}; leave {'it' if len(differ) == 1 else 'them'} "
                                  "out to keep the thread's, or start a new thread.", param="thread",
                                  code="thread_fingerprint_mismatch")
    req.system, req.tools = stored.system, tools
    req.messages = [*stored.messages, *req.messages]


def thread_after(req: MessagesRequest, message: dict[str, Any]) -> StoredThread:
    """The thread after `message`, the reply to `req` (whole, after `resume_thread`): its
    messages and the reply as an assistant message. A reply to a prefill (a final assistant
    message) joins it, as one turn; an empty reply (`content: []`) is left out, as Anthropic
    refuses empty assistant content before the final message."""
    history = list(req.messages)
    content = list(message["content"])
    if history and history[-1].get("role") == "assistant":
        prefill = history.pop()["content"]
        blocks = ([{"type": "text", "text": prefill}] if prefill else []) if isinstance(prefill, str) else list(prefill)
        if blocks and content and blocks[-1].get("type") == "text" and content[0].get("type") == "text":
            content[0] = {**content[0], "text": blocks.pop()["text"] + content[0]["text"]}
        content = blocks + content
    if content:
        history.append({"role": "assistant", "content": content})
    return StoredThread(req.model, req.system, tuple(req.tools) if req.tools is not None else None, tuple(history))


# chat field → Messages field, for errors found after translation (`Renamer`)
_RENAMES = (
    ("response_format", "output_config.format"), ("response_format.json_schema", "output_config.format"),
    ("stop", "stop_sequences"), ("user", "metadata.user_id"), ("reasoning_effort", "output_config.effort"),
    ("chat_template_kwargs", "output_config.effort"), ("max_completion_tokens", "max_tokens"),
    ("parallel_tool_calls", "tool_choice.disable_parallel_tool_use"), ("tool_choice.function", "tool_choice"),
)


class CountTokensRequest(MessagesRequest):
    """`POST /v1/messages/count_tokens`: a Messages request without `max_tokens`."""

    # nothing is generated: a create() body reused here (with its `max_tokens`, say) counts fine
    FOREIGN_ALIASES: ClassVar[dict[str, str] | None] = None
    max_tokens: int = 1


def _toolu_id(call_id: str) -> str:
    """A call id as Anthropic spells tool_use ids, `toolu_…` (the parsers make OpenAI's
    `call_<hex>`: that becomes `toolu_<hex>`; an id already `toolu_…` is kept)."""
    return call_id if call_id.startswith("toolu_") else "toolu_" + call_id.removeprefix("call_")


def _tool_use_ids(message: Any) -> set[str]:
    """The ids of an assistant message's `tool_use` blocks (those a `tool_result` may answer)."""
    if not isinstance(message, dict) or message.get("role") != "assistant" or not isinstance(message.get("content"), list):
        return set()
    return {b.get("id") for b in message["content"] if isinstance(b, dict) and b.get("type") == "tool_use"}


def chat_messages(message: dict[str, Any], param: str, *, final: bool = False,
                  tool_use_ids: set[str] | None = None) -> list[dict[str, Any]]:
    """One Anthropic message → chat messages: a user message's `tool_result` blocks become
    `role: "tool"` messages (before its text), an assistant's `tool_use` blocks its
    `tool_calls`; `thinking` blocks are dropped (templates do not replay reasoning). Each
    carries its origin (`serve.param_names`).

    Args:
        message: the Anthropic message.
        param: its location (`messages.[i]`).
        final: it is the last message (an empty final assistant message is a prefill).
        tool_use_ids: the ids a `tool_result` may answer (the previous message's `tool_use`s).

    Raises:
        InvalidRequestError: as Anthropic refuses: empty content (but a final assistant
            message), a non-string `text`, a `tool_result` for no `tool_use` of the previous
            message, unsupported block types.
    """
    role = message.get("role") if isinstance(message, dict) else None
    if role not in ("user", "assistant"):
        raise InvalidRequestError(f"messages: role {role!r} is not one of ['user', 'assistant'].",
                                  param=f"{param}.role")
    content = message.get("content")
    if content in ("", []) and not (final and role == "assistant"):
        raise InvalidRequestError("all messages must have non-empty content except for the optional final "
                                  "assistant message", param=f"{param}.content")
    if isinstance(content, str):
        return [{"role": role, "content": content, ORIGIN: param}]
    if not isinstance(content, list):
        raise InvalidRequestError("messages: content must be a string or a list of content blocks.",
                                  param=f"{param}.content")
    texts: list[str] = []
    tool_calls: list[dict[str, Any]] = []
    call_origins: list[str] = []
    results: list[dict[str, Any]] = []
    for j, block in enumerate(content):
        where = f"{param}.content.[{j}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            if not isinstance(block.get("text"), str):
                raise InvalidRequestError("text must be a string", param=f"{where}.text")
            if block["text"]:  # Anthropic refuses empty text blocks; a client sending one back loses nothing
                texts.append(block["text"])
        elif kind == "tool_use" and role == "assistant":
            if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str):
                raise InvalidRequestError("tool_use blocks need a string 'id' and 'name'.", param=where)
            if block.get("input") is not None and not isinstance(block["input"], dict):
                raise InvalidRequestError("tool_use input must be an object", param=f"{where}.input")
            tool_calls.append({"id": block["id"], "type": "function",
                               "function": {"name": block["name"],
                                            "arguments": json.dumps(block.get("input") or {})}})
            call_origins.append(where)
        elif kind == "tool_result" and role == "user":
            if not isinstance(block.get("tool_use_id"), str):
                raise InvalidRequestError("tool_result blocks need a string 'tool_use_id'.",
                                          param=f"{where}.tool_use_id")
            if block["tool_use_id"] not in (tool_use_ids or ()):
                raise InvalidRequestError(
                    f"unexpected `tool_use_id` found in `tool_result` blocks: {block['tool_use_id']}. Each "
                    "`tool_result` block must have a corresponding `tool_use` block in the previous message.",
                    param=f"{where}.tool_use_id")
            text = _text(block.get("content", ""), f"{where}.content")
            if flag(block, "is_error", where):
                text = f"Error: {text}"
            results.append({"role": "tool", "tool_call_id": block["tool_use_id"], "content": text, ORIGIN: where})
        elif kind in ("thinking", "redacted_thinking") and role == "assistant":
            continue
        else:
            raise InvalidRequestError(f"Content blocks of type {kind!r} are not supported in {role} messages "
                                      "by this server (text, tool_use, tool_result; no images or documents).",
                                      param=f"{where}.type")
    out = list(results)
    if role == "assistant":  # kept even when empty (only thinking): the turns stay in order
        out.append({"role": role, "content": "\n".join(texts) if texts or not tool_calls else None,
                    **({"tool_calls": tool_calls} if tool_calls else {}), ORIGIN: param, CALL_ORIGINS: call_origins})
    elif texts or not results:
        out.append({"role": role, "content": "\n".join(texts), ORIGIN: param})
    return out


def _text(content: Any, param: str) -> str:
    """A string, or `text` blocks joined by newlines (`system`, `tool_result` content)."""
    return join_text_parts(content, param, fields={"text": "text"}, part_path="{param}.[{j}]")


def chat_tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Anthropic client tools → chat function tools; server tools (web search, bash, text
    editor, computer use …) are a 400 naming their type."""
    out = []
    for j, tool in enumerate(tools):
        kind = tool.get("type", "custom")
        if kind != "custom":
            raise InvalidRequestError(f"Tools of type {kind!r} are not supported by this server; only client "
                                      "tools with 'name', 'description' and 'input_schema'.",
                                      param=f"tools.[{j}].type")
        if not isinstance(tool.get("name"), str) or not isinstance(tool.get("input_schema"), dict):
            raise InvalidRequestError("Each tool needs a string 'name' and an 'input_schema' object.",
                                      param=f"tools.[{j}]")
        check_hosted_tool_fields(tool, f"tools.[{j}]", what="tool")
        function = {"name": tool["name"], "parameters": tool["input_schema"]}
        description = _with_examples(tool.get("description"), tool.get("input_examples"), f"tools.[{j}]")
        if description is not None:
            function["description"] = description
        if tool.get("strict") is not None:
            function["strict"] = tool["strict"]
        out.append({"type": "function", "function": function})
    return out


def _with_examples(description: Any, examples: Any, param: str) -> Any:
    """A tool's `description` with its `input_examples` (Anthropic's advanced tool use: example
    `input` objects shown to the model) appended as JSON lines, so that the chat template
    renders them wherever it renders the description; `description` as is without examples.

    Raises:
        InvalidRequestError: `input_examples` not a list of objects (`{param}.input_examples`).
    """
    if examples is None:
        return description
    if not isinstance(examples, list) or not all(isinstance(e, dict) for e in examples):
        raise InvalidRequestError("input_examples must be a list of objects.", param=f"{param}.input_examples")
    if not examples:
        return description
    lines = "\n".join(json.dumps(e, ensure_ascii=False) for e in examples)
    return f"{description or ''}\n\nInput examples:\n{lines}".lstrip("\n")


def chat_response_format(fmt: Any, *, param: str = "output_config.format") -> dict[str, Any]:
    """`output_config.format` or the older top-level `output_format` (`param`; both
    `{"type": "json_schema", "schema"}`) → chat `response_format`."""
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
        raise InvalidRequestError(f"{param} must be {{'type': 'json_schema', 'schema': {{...}}}}.",
                                  param=param)
    return {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt["schema"], "strict": True}}


def chat_tool_choice(choice: dict[str, Any]) -> dict[str, Any]:
    """`{"type": auto|any|tool|none, "name"?, "disable_parallel_tool_use"?}` → the chat
    body's `tool_choice` (and `parallel_tool_calls`)."""
    kind = choice.get("type")
    if kind == "tool":
        if not isinstance(choice.get("name"), str):
            raise InvalidRequestError("tool_choice of type 'tool' needs a 'name'.", param="tool_choice.name")
        out: dict[str, Any] = {"tool_choice": {"type": "function", "function": {"name": choice["name"]}}}
    elif kind in ("auto", "any", "none"):
        out = {"tool_choice": {"auto": "auto", "any": "required", "none": "none"}[kind]}
    else:
        raise InvalidRequestError(f"tool_choice type {kind!r} is not one of 'auto', 'any', 'tool', 'none'.",
                                  param="tool_choice.type")
    disable = choice.get("disable_parallel_tool_use")
    if disable is not None:
        # Anthropic's default allows several calls; this server's (as chat's) is one, so an
        # explicit `false` (litellm sends it for `parallel_tool_calls=True`) asks for several
        if not isinstance(disable, bool):
            raise InvalidRequestError("tool_choice.disable_parallel_tool_use must be a boolean.",
                                      param="tool_choice.disable_parallel_tool_use")
        out["parallel_tool_calls"] = not disable
    return out


# -------------------------------------------------------------------------- rendering


def _event(kind: str, payload: dict[str, Any]) -> bytes:
    return sse({"type": kind, **payload}, event=kind)


class MessagesOutput(Output):
    """One choice's events → a `message` object, or Anthropic's event stream (a `ping`
    after `message_start` and after every `heartbeat` seconds without an event).

    Args:
        id: the message id (`msg_…`).
        model: the served model id.
        token_text: token id → its text.
        prompt_tokens: the prompt's length in tokens (`message_start` reports it).
        make_parser: a fresh `ChoiceParser` for the choice.
        on_done: called once with the final `message` object when the reply is complete
            (not after an error or a disconnect).
        context_cut: the request's `max_tokens` was cut to the context left after the
            prompt, so a reply that runs to the limit stops with `stop_reason`
            "model_context_window_exceeded" rather than "max_tokens".
    """

    heartbeat = PING_INTERVAL_S

    def __init__(self, id: str, model: str, token_text: TokenText, *, prompt_tokens: int,
                 make_parser: Callable[[], ChoiceParser] = ChoiceParser,
                 on_done: Callable[[dict[str, Any]], None] | None = None, context_cut: bool = False) -> None:
        super().__init__(id, model, 1, token_text, logprobs=False, include_usage=False)
        self.on_done = on_done
        self.context_cut = context_cut
        self.prompt_tokens = prompt_tokens
        self.parser = make_parser()
        self.blocks: list[dict[str, Any]] = []
        self._open: dict[str, Any] | None = None
        self._calls: dict[int, dict[str, Any]] = {}  # tool-call index → its block
        self._args: dict[int, str] = {}  # tool-call block index → its JSON text so far
        self._space = ""  # whitespace-only text held back: it may only separate tool calls
        self.finish_reason: str | None = None
        self.stop_sequence: str | None = None
        self.cached_tokens = 0  # of the prompt, from the first event (`start`)
        self._out: list[bytes] | None = None  # None: not streaming

    def _emit(self, kind: str, **payload: Any) -> None:
        if self._out is not None:
            self._out.append(_event(kind, payload))

    def _flush(self) -> list[bytes]:
        out, self._out = self._out or [], []
        return out

    # ---- framing

    def start(self, first: Event) -> list[bytes]:
        self._out = []
        self.cached_tokens = first.cached_tokens or 0
        message = self._message(final=False)
        self._emit("message_start", message=message)
        return [*self._flush(), self.ping()]

    def chunks(self, k: int, event: Event) -> list[bytes]:
        self._process(event)
        return self._flush()

    def add(self, k: int, event: Event) -> None:
        self._process(event)

    def end(self) -> list[bytes]:
        self._emit("message_delta", delta={"stop_reason": self.stop_reason, "stop_sequence": self.matched_stop},
                   usage=self._usage())
        self._emit("message_stop")
        self._done(self._message(final=True))
        return self._flush()

    def response(self) -> dict[str, Any]:
        return self._done(self._message(final=True))

    def _done(self, message: dict[str, Any]) -> dict[str, Any]:
        if self.on_done is not None:
            self.on_done, on_done = None, self.on_done
            on_done(message)
        return message

    def ping(self) -> bytes:
        return _event("ping", {})

    def fail(self, error: APIError) -> list[bytes]:
        return [_event("error", {"error": error_body(error)["error"]})]

    def done(self) -> list[bytes]:
        return []

    # ---- the message object

    @property
    def stop_reason(self) -> str | None:
        if self.finish_reason is None:
            return None
        if self.finish_reason == "length":
            return "model_context_window_exceeded" if self.context_cut else "max_tokens"
        if self.parser.calls_finished:
            return "tool_use"
        return "stop_sequence" if self.stop_sequence is not None else "end_turn"

    @property
    def matched_stop(self) -> str | None:
        """`stop_sequence` as reported: only beside `stop_reason: "stop_sequence"`."""
        return self.stop_sequence if self.stop_reason == "stop_sequence" else None

    def _usage(self) -> dict[str, Any]:
        # Anthropic counts cached prompt tokens apart from `input_tokens`; nothing is ever
        # "written" to a cache beyond the KV prefix cache, so cache_creation_input_tokens is 0.
        u = self.usage
        if u is None:  # message_start: the prompt, split as the first event told
            u = Usage(self.prompt_tokens, 0, self.cached_tokens)
        return {"input_tokens": u.prompt_tokens - u.cached_tokens, "output_tokens": u.completion_tokens,
                "cache_read_input_tokens": u.cached_tokens, "cache_creation_input_tokens": 0}

    def _message(self, *, final: bool) -> dict[str, Any]:
        content = [self._final_block(b) for b in self.blocks] if final else []
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": content,
                "stop_reason": self.stop_reason if final else None,
                "stop_sequence": self.matched_stop if final else None, "usage": self._usage()}

    def _final_block(self, block: dict[str, Any]) -> dict[str, Any]:
        if block["type"] != "tool_use":
            return block
        return {**block, "input": partial_json_object(self._args.get(self.blocks.index(block)) or "{}")}

    # ---- deltas → blocks

    def _process(self, event: Event) -> None:
        self._track(event)  # an error event raises
        for c in event.choices:
            deltas = self.parser.feed(c.text)
            if c.finish_reason is not None:
                deltas += self.parser.finish()
            for delta in deltas:
                self._delta(delta)
            if c.finish_reason is not None:
                self.finish_reason = c.finish_reason
                self.stop_sequence = c.stop_sequence
                # an empty answer has no blocks: Anthropic refuses empty text blocks sent back
                self._close()

    def _delta(self, delta: Delta) -> None:
        if isinstance(delta, TextDelta):
            if self._open is None or self._open["type"] != "text":
                if not (self._space + delta.text).strip():
                    self._space += delta.text
                    return
            self._text(delta.text)
        elif isinstance(delta, ReasoningDelta):
            if self._open is None or self._open["type"] != "thinking":
                self._start({"type": "thinking", "thinking": "", "signature": ""})
            assert self._open is not None
            self._open["thinking"] += delta.text
            self._emit("content_block_delta", index=len(self.blocks) - 1,
                       delta={"type": "thinking_delta", "thinking": delta.text})
        elif isinstance(delta, ToolCallStart):
            self._space = ""
            block = {"type": "tool_use", "id": _toolu_id(delta.id), "name": delta.name, "input": {}}
            self._calls[delta.index] = block
            self._start(block)
        elif isinstance(delta, ToolCallArgs):
            block = self._calls[delta.index]
            index = self.blocks.index(block)
            self._args[index] = self._args.get(index, "") + delta.fragment
            self._emit("content_block_delta", index=index,
                       delta={"type": "input_json_delta", "partial_json": delta.fragment})

    def _start(self, block: dict[str, Any]) -> None:
        self._close()
        self.blocks.append(block)
        self._open = block
        self._emit("content_block_start", index=len(self.blocks) - 1, content_block=block)

    def _text(self, text: str) -> None:
        if self._open is None or self._open["type"] != "text":
            self._start({"type": "text", "text": ""})
            text, self._space = self._space + text, ""
        assert self._open is not None
        self._open["text"] += text
        if text:
            self._emit("content_block_delta", index=len(self.blocks) - 1,
                       delta={"type": "text_delta", "text": text})

    def _close(self) -> None:
        block, self._open = self._open, None
        if block is not None:
            self._emit("content_block_stop", index=self.blocks.index(block))
