"""The OpenAI wire protocol, wire-in half: request models (the subset we serve) and their
validation; `serve.responses` builds what goes back.

Requests are validated here and converted to engine types at the boundary, once the route
has tokenized the prompt and decided the completion length (`requested_max_tokens()`, then
`to_sampling_params(max_tokens)`); the engine never sees pydantic or JSON. The sampling
fields both endpoints share are declared once (`_Sampling`), in the order of OpenAI's API
reference, then our extras (vLLM's names: `top_k`, `min_p`, `repetition_penalty`,
`ignore_eos`, `stop_token_ids`, `min_tokens`, `allowed_token_ids`,
`include_stop_str_in_output`, `skip_special_tokens`). Unknown fields are ignored (logged at
debug), like OpenAI-compatible peers, except peers' extensions that would change the output
(`_UNHONOURED`: vLLM's `prompt_logprobs`, `bad_words`, …), which are answered 400 naming the
field when set.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, TypeVar, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from serve.constraints import request_grammar
from serve.errors import InvalidRequestError
from serve.foreign_fields import check_foreign_fields
from serve.sampling import SamplingParams
from serve.tool_protocol import FunctionCall, FunctionDef, ToolCall, ToolDef, check_tool_choice

log = logging.getLogger("serve.protocol")

MAX_N = 16
MAX_STOPS = 4
MAX_TOP_LOGPROBS = 20  # chat
MAX_COMPLETION_LOGPROBS = 5  # completions


class _Request(BaseModel):
    # Strict, as OpenAI is: "3" is no integer, true no number, "yes" no boolean (an integer is
    # still a number: OpenAI takes `temperature: 1`).
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, strict=True)


class StreamOptions(_Request):
    include_usage: bool | None = False
    # vLLM's: usage in every chunk. Not honoured, so refused rather than ignored
    continuous_usage_stats: bool | None = None

    @field_validator("continuous_usage_stats")
    @classmethod
    def _continuous(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("continuous usage stats are not supported by this server; use "
                             "'include_usage' for one usage chunk at the end")
        return value


def _check_stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise ValueError("must be a string or a list of strings")
    if len(stops) > MAX_STOPS:
        raise ValueError(f"at most {MAX_STOPS} stop sequences are allowed, got {len(stops)}")
    if any(s == "" for s in stops):
        raise ValueError("stop sequences must not be empty")
    return tuple(stops)


def _check_logit_bias(value: Any) -> dict[int, float]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError("must be an object mapping token ids (as strings) to biases")
    bias: dict[int, float] = {}
    for key, b in value.items():
        # Decimal digits only: int() would also take "1_000", " 7", "+7" and "٣".
        if not (isinstance(key, str) and key.isascii() and key.isdigit() and len(key) <= 12):
            raise ValueError(f"{key!r} is not a token id (keys must be integers >= 0 as strings)")
        token = int(key)
        if isinstance(b, bool) or not isinstance(b, int | float) or not -100 <= b <= 100:
            raise ValueError(f"the bias for token {key} must be a number from -100 to 100, got {b!r}")
        bias[token] = float(b)
    return bias


class _Sampling(_Request):
    """Fields shared by both endpoints, in the order OpenAI lists them, then our extras
    (vLLM / llama.cpp names). repetition_penalty: any value > 0, as in vLLM; values that
    over- or underflow float32 (1e-40, 1e300) are handled by the sampler (non-finite scores,
    see serve.sampling), so they cannot produce a NaN.

    vLLM's `min_tokens` (EOS, `stop_token_ids` and stop strings end nothing before that many
    tokens; at most the requested completion length), `allowed_token_ids` (only these may be
    sampled; EOS too only if listed; checked against the vocabulary by the route),
    `include_stop_str_in_output` and `skip_special_tokens` (false: special tokens' text, such
    as `<|im_start|>`, is part of the output) mean what they mean there
    (`serve.sampling`, `serve.sequence.Choice`)."""

    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[int, float] | None = None
    max_tokens: int | None = Field(None, ge=1)
    n: int | None = Field(1, ge=1, le=MAX_N)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    seed: int | None = None
    stop: tuple[str, ...] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    user: str | None = None
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    ignore_eos: bool | None = False
    stop_token_ids: list[int] | None = Field(None, max_length=64)  # vLLM: stop on these ids
    min_tokens: int | None = Field(None, ge=0)
    allowed_token_ids: list[int] | None = Field(None, min_length=1)
    include_stop_str_in_output: bool | None = False
    skip_special_tokens: bool | None = True

    @field_validator("stop_token_ids", "allowed_token_ids")
    @classmethod
    def _token_ids(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and any(t < 0 for t in value):
            raise ValueError("token ids must be integers >= 0")
        return value

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, value: Any) -> tuple[str, ...]:
        return _check_stop(value)

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _logit_bias(cls, value: Any) -> dict[int, float]:
        return _check_logit_bias(value)

    def requested_max_tokens(self) -> int | None:
        """The completion length the client asked for (`max_tokens`), or None: until EOS,
        a stop or the end of the context. The route reads it once, checks it against the
        context and passes it to `to_sampling_params` (vLLM's `get_max_tokens`)."""
        return self.max_tokens

    def _sampling_kwargs(self, max_tokens: int | None) -> dict[str, Any]:
        names = (
            "n",
            "temperature",
            "top_p",
            "top_k",
            "min_p",
            "seed",
            "presence_penalty",
            "frequency_penalty",
            "repetition_penalty",
            "ignore_eos",
            "min_tokens",
            "include_stop_str_in_output",
            "skip_special_tokens",
        )
        kwargs = {k: getattr(self, k) for k in names if getattr(self, k) is not None}
        if kwargs.get("top_k") == -1:  # vLLM's spelling of "disabled"
            kwargs["top_k"] = 0
        if kwargs.get("top_p") == 0:  # OpenAI accepts 0: a nucleus of the single best token
            kwargs["top_p"], kwargs["top_k"] = 1.0, 1
        kwargs["logit_bias"] = dict(self.logit_bias or {})
        kwargs["stop"] = tuple(self.stop or ())
        kwargs["stop_token_ids"] = tuple(dict.fromkeys(self.stop_token_ids or ()))
        if self.allowed_token_ids is not None:
            kwargs["allowed_token_ids"] = tuple(dict.fromkeys(self.allowed_token_ids))
        kwargs["max_tokens"] = max_tokens
        return kwargs

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise _FieldError(
                "stream_options", "The 'stream_options' parameter is only allowed when 'stream' is enabled."
            )
        return self

    @model_validator(mode="after")
    def _min_tokens_fit(self):
        limit = self.requested_max_tokens()
        if self.min_tokens and limit is not None and self.min_tokens > limit:
            raise _FieldError(
                "min_tokens", f"Invalid 'min_tokens': {self.min_tokens} is more than the "
                f"{limit} completion tokens requested (max_tokens); min_tokens must be at most that.")
        return self


def _sampling_params(kwargs: dict[str, Any]) -> SamplingParams:
    try:
        return SamplingParams(**kwargs)
    except ValueError as exc:  # our field checks are stricter; this is a safety net
        raise InvalidRequestError(f"Invalid sampling parameters: {exc}") from None


class _Constrained(_Request):
    """Output constraints, both endpoints (`serve.constraints` turns them into a grammar):
    OpenAI `response_format`, vLLM `structured_outputs` (and its older `guided_*` fields),
    llama.cpp `json_schema` / `grammar` (GBNF). Kept as JSON here; `constraint()` validates
    them."""

    response_format: Any = None
    structured_outputs: Any = None
    json_schema: Any = None
    grammar: Any = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    guided_whitespace_pattern: Any = None

    def constraint(self) -> tuple[str, str] | None:
        """`(llguidance grammar, param naming its source)`, or None when unconstrained.

        Raises:
            InvalidRequestError: a malformed constraint, or more than one.
        """
        guided = {"json": self.guided_json, "regex": self.guided_regex, "choice": self.guided_choice,
                  "grammar": self.guided_grammar, "whitespace_pattern": self.guided_whitespace_pattern}
        return request_grammar(response_format=self.response_format,
                               structured_outputs=self.structured_outputs,
                               json_schema=self.json_schema, grammar=self.grammar, guided=guided)


class _FieldError(ValueError):
    """A cross-field check failing; carries the `param` to name."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


# ----------------------------------------------------------------------------- chat


class ChatMessage(_Request):
    role: str
    content: str | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    function_call: FunctionCall | None = None  # legacy assistant call

    @field_validator("role")
    @classmethod
    def _role(cls, role: str) -> str:
        roles = ("system", "developer", "user", "assistant", "tool", "function")
        if role not in roles:
            raise ValueError(f"'{role}' is not one of {list(roles)}")
        return role

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, content: Any, info: Any) -> Any:
        # A list of parts becomes one string; only text parts can reach a text-only model. An
        # assistant's `refusal` parts (OpenAI's types allow them) are text it said.
        if not isinstance(content, list):
            return content
        if not content:  # OpenAI's schema: every role's content array has minItems 1
            raise PydanticCustomError("too_short", "empty array")
        refusal_ok = info.data.get("role") == "assistant"
        texts = []
        for part in content:
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise ValueError("each content part must be an object with a 'type'")
            field = "refusal" if part["type"] == "refusal" and refusal_ok else "text"
            if part["type"] != field:
                raise ValueError(f"content parts of type '{part['type']}' are not supported; only 'text'"
                                 + (" and 'refusal'" if refusal_ok else ""))
            if not isinstance(part.get(field), str):
                raise ValueError(f"a '{field}' content part needs a string '{field}' field")
            texts.append(part[field])
        return "\n".join(texts)

    @model_validator(mode="after")
    def _tool_fields(self):
        if self.content is None and self.role in ("system", "developer", "user"):
            raise _FieldError("content", f"Invalid value for 'content': messages with role '{self.role}' "
                              "need a string or a list of text parts, not null.")
        if self.role == "tool" and not self.tool_call_id:
            raise _FieldError("tool_call_id", "Missing required parameter: 'tool_call_id' "
                              "(messages with role 'tool' must answer a tool call).")
        if self.role == "function" and not self.name:
            raise _FieldError("name", "Missing required parameter: 'name' (messages with role "
                              "'function' must name the function).")
        if (self.tool_calls or self.function_call) and self.role != "assistant":
            raise _FieldError("tool_calls", "Only assistant messages may carry 'tool_calls'.")
        return self

    def calls(self) -> list[ToolCall]:
        """The assistant's calls, the legacy `function_call` as one call."""
        if self.tool_calls:
            return list(self.tool_calls)
        if self.function_call is not None:
            return [ToolCall(id=f"call_{self.function_call.name}", function=self.function_call)]
        return []

    def to_template(self) -> dict[str, Any]:
        """The message as Hugging Face chat templates take it: `developer` → `system`, a
        legacy `function` message → `tool`, calls with `arguments` as an object (what
        `apply_chat_template` documents and templates `tojson`; vLLM passes them so too)."""
        role = {"developer": "system", "function": "tool"}.get(self.role, self.role)
        message: dict[str, Any] = {"role": role, "content": self.content or ""}
        if self.name is not None:
            message["name"] = self.name
        calls = self.calls()
        if calls:
            message["content"] = self.content  # templates test `content` for None here
            message["tool_calls"] = [
                {"id": c.id, "type": "function",
                 "function": {"name": c.function.name,
                              "arguments": json.loads(c.function.arguments or "{}")}}
                for c in calls
            ]
        if self.role == "tool":
            message["tool_call_id"] = self.tool_call_id
        elif self.role == "function":
            message["tool_call_id"] = f"call_{self.name}"
        return message


def _no_unanswered_calls(pending: dict[str, str]) -> None:
    """OpenAI's 400 for `tool_calls` whose ids no `tool` message answered (`pending`: id →
    param of the call), naming the first such call."""
    if pending:
        first = next(iter(pending.values()))
        raise _FieldError(first, "An assistant message with 'tool_calls' must be followed by tool messages "
                          "responding to each 'tool_call_id'. The following tool_call_ids did not have "
                          f"response messages: {', '.join(pending)}")


class _ChatHead(_Request):
    # Before the sampling fields, so a missing or empty `messages` is the error reported
    # first (pydantic validates base classes' fields first, then the class's own).
    messages: list[ChatMessage] = Field(min_length=1)
    model: str | None = None


class ChatCompletionRequest(_Sampling, _ChatHead, _Constrained):
    # the other wire formats' fields → this route's (`serve.foreign_fields`)
    FOREIGN_ALIASES: ClassVar[dict[str, str]] = {
        "max_output_tokens": "'max_completion_tokens'", "stop_sequences": "'stop'",
        "system": "a 'system' message", "instructions": "a 'system' message", "input": "'messages'",
        "text": "'response_format'", "output_config": "'response_format'",
        "output_format": "'response_format'", "reasoning": "'reasoning_effort'"}
    logprobs: bool | None = False
    max_completion_tokens: int | None = Field(None, ge=1)
    parallel_tool_calls: bool | None = None
    tool_choice: str | dict[str, Any] | None = None
    tools: list[ToolDef] | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    function_call: str | dict[str, Any] | None = None  # deprecated by OpenAI: tool_choice
    functions: list[FunctionDef] | None = None  # deprecated by OpenAI: tools
    # extras (vLLM / llama.cpp names; the sampling ones are `_Sampling`'s)
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM: extra template variables
    metadata: dict[str, str] | None = None  # no effect on the output; checked as OpenAI does
    # vLLM: render without the assistant header / continue the final assistant message (prefill)
    add_generation_prompt: bool | None = True
    continue_final_message: bool | None = False
    # OpenAI fields that change the output, honoured where the model can (else a 400):
    modalities: list[str] | None = None  # only ["text"]
    audio: Any = None  # audio output: refused
    web_search_options: Any = None  # refused: no search here
    reasoning_effort: str | None = None  # a template variable, where the template reads it
    verbosity: str | None = None  # likewise

    @field_validator("modalities")
    @classmethod
    def _modalities(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and any(m != "text" for m in value):
            raise ValueError("only the 'text' modality is supported by this server")
        return value

    @field_validator("audio", "web_search_options")
    @classmethod
    def _refused(cls, value: Any, info: Any) -> Any:
        if value is not None:
            what = {"audio": "audio output", "web_search_options": "web search"}[info.field_name]
            raise ValueError(f"{what} is not supported by this server")
        return value

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _tool_choice(cls, value: Any) -> Any:
        return check_tool_choice(value)

    @field_validator("function_call", mode="before")
    @classmethod
    def _function_call(cls, value: Any) -> Any:
        return check_tool_choice(value, legacy=True)

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise _FieldError(
                "top_logprobs", "Invalid value for 'top_logprobs': 'logprobs' must be set to true."
            )
        return self

    @model_validator(mode="after")
    def _tools(self):
        # The legacy pair maps onto tools / tool_choice.
        if self.functions is not None:
            if self.tools is not None:
                raise _FieldError("functions", "Send either 'tools' or the deprecated 'functions', not both.")
            self.tools = [ToolDef(function=f) for f in self.functions]
        if self.function_call is not None:
            if self.tool_choice is not None:
                raise _FieldError("function_call",
                                  "Send either 'tool_choice' or the deprecated 'function_call', not both.")
            self.tool_choice = self.function_call
        names = [t.function.name for t in self.tools or ()]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise _FieldError("tools", f"Invalid 'tools': the function name '{dup}' is used twice.")
        choice = self.tool_choice
        if not names and choice not in (None, "none", "auto"):
            raise _FieldError("tool_choice",
                              "Invalid value for 'tool_choice': 'tool_choice' is only allowed when "
                              "'tools' are specified.")
        for wanted in (choice.get("allowed") or [choice.get("name")]) if isinstance(choice, dict) else ():
            if wanted not in names:
                raise _FieldError("tool_choice", f"Invalid value for 'tool_choice': no function named "
                                  f"'{wanted}' in 'tools'.")
        return self

    @model_validator(mode="after")
    def _tool_results_answer_calls(self):
        # OpenAI's rule: a `tool` message answers a call of an earlier assistant message (the
        # Responses and Messages routes check their call ids the same way); a result for a call
        # never made would be rendered as if the model had made it.
        # And the converse: each of an assistant message's `tool_calls` is answered by the
        # `tool` messages right after it (a call without a result would be rendered as a turn
        # the conversation went on from as if it had one). The legacy `function_call` is not
        # held to it, as OpenAI does not.
        made: set[str] = set()
        pending: dict[str, str] = {}  # unanswered call id → its param
        for i, m in enumerate(self.messages):
            if m.role == "tool":
                if m.tool_call_id not in made:
                    raise _FieldError(f"messages.[{i}].tool_call_id",
                                      f"Invalid parameter: a message with role 'tool' must answer a "
                                      f"preceding assistant message's 'tool_calls'; no call has the "
                                      f"id '{m.tool_call_id}'.")
                pending.pop(m.tool_call_id, None)
                continue
            _no_unanswered_calls(pending)
            if m.role == "assistant":
                made.update(c.id for c in m.calls() if c.id)
                pending = {c.id: f"messages.[{i}].tool_calls.[{j}].id"
                           for j, c in enumerate(m.tool_calls or ()) if c.id}
        _no_unanswered_calls(pending)
        return self

    @model_validator(mode="after")
    def _continue_final(self):
        # vLLM's rule: continuing the last message and opening a new turn exclude each other
        if self.continue_final_message:
            if self.add_generation_prompt is not False:
                raise _FieldError("continue_final_message",
                                  "Cannot set both `continue_final_message` and `add_generation_prompt` "
                                  "to True (set 'add_generation_prompt': false).")
            last = self.messages[-1]
            if last.role != "assistant" or last.calls():
                raise _FieldError("continue_final_message",
                                  "Invalid 'continue_final_message': the last message must be an "
                                  "assistant message with text and no tool calls.")
        return self

    def tool_mode(self) -> tuple[str, str | None]:
        """`(mode, name)`: mode "none" (no tools, or tool_choice "none"), "auto",
        "required", or "named" with the function's name. OpenAI's default is "auto" when
        tools are given."""
        if not self.tools or self.tool_choice == "none":
            return "none", None
        if isinstance(self.tool_choice, dict):
            if "allowed" in self.tool_choice:  # allowed_tools: its mode, over `allowed_tools()`
                return self.tool_choice["mode"], None
            return "named", self.tool_choice["name"]
        return self.tool_choice or "auto", None

    def allowed_tools(self) -> list[str] | None:
        """The function names an `allowed_tools` tool_choice lets the model call (all of
        `tools` stay in the prompt, as at OpenAI), else None: no restriction beyond the mode."""
        choice = self.tool_choice
        return list(choice["allowed"]) if isinstance(choice, dict) and "allowed" in choice else None

    def requested_max_tokens(self) -> int | None:
        """`max_completion_tokens`, else the deprecated `max_tokens`, else None."""
        return self.max_completion_tokens or self.max_tokens

    def to_sampling_params(self, max_tokens: int | None) -> SamplingParams:
        """The engine's sampling settings for this request (`top_logprobs` per token when
        `logprobs` is true).

        Args:
            max_tokens: completion tokens per choice, as the route decided them
                (`requested_max_tokens()`, checked against the context); None: until EOS,
                a stop or the end of the context.

        Returns:
            `serve.sampling.SamplingParams`.

        Raises:
            InvalidRequestError: a combination `SamplingParams` refuses (a safety net: the
                field checks are stricter).
        """
        kwargs = self._sampling_kwargs(max_tokens)
        kwargs["logprobs"] = (self.top_logprobs or 0) if self.logprobs else None
        return _sampling_params(kwargs)

    def template_messages(self) -> list[dict[str, Any]]:
        return [m.to_template() for m in self.messages]


# ----------------------------------------------------------------------- completions


def _check_prompt(value: Any) -> list[str] | list[list[int]]:
    """str | list[str] | list[int] | list[list[int]] → a list of prompts, each str or ids."""

    def is_ids(x: Any) -> bool:
        return (
            isinstance(x, list)
            and len(x) > 0
            and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in x)
        )

    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(p, str) for p in value):
            return list(value)
        if is_ids(value):
            return [list(value)]
        if all(is_ids(p) for p in value):
            return [list(p) for p in value]
    raise ValueError(
        "must be a string, a list of strings, a non-empty list of token ids (integers >= 0), "
        "or a list of such lists"
    )


class _CompletionHead(_Request):
    # Before the sampling fields, as `_ChatHead`.
    model: str | None = None
    prompt: list[str] | list[list[int]]


class CompletionRequest(_Sampling, _CompletionHead, _Constrained):
    FOREIGN_ALIASES: ClassVar[dict[str, str]] = {
        "max_completion_tokens": "'max_tokens'", "max_output_tokens": "'max_tokens'",
        "stop_sequences": "'stop'", "messages": "'prompt' (or POST /v1/chat/completions)",
        "input": "'prompt'", "text": "'response_format'", "output_config": "'response_format'",
        "output_format": "'response_format'"}
    best_of: int | None = Field(None, ge=1)
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, value: Any) -> list[str] | list[list[int]]:
        return _check_prompt(value)
    @field_validator("suffix")
    @classmethod
    def _suffix(cls, suffix: str | None) -> str | None:
        if suffix:
            raise ValueError("suffix is not supported by this server")
        return suffix

    @model_validator(mode="after")
    def _best_of_is_n(self):
        if self.best_of is not None and self.best_of != (self.n or 1):
            raise _FieldError("best_of", "best_of is only supported when it equals n")
        return self

    def to_sampling_params(self, max_tokens: int | None) -> SamplingParams:
        """The engine's sampling settings for this request (`logprobs` alternatives per
        token).

        Args:
            max_tokens: completion tokens per choice (`requested_max_tokens()`, checked
                against the context); None: until EOS, a stop or the end of the context.

        Returns:
            `serve.sampling.SamplingParams`.

        Raises:
            InvalidRequestError: a combination `SamplingParams` refuses (a safety net).
        """
        kwargs = self._sampling_kwargs(max_tokens)
        kwargs["logprobs"] = self.logprobs
        return _sampling_params(kwargs)


# ------------------------------------------------------------------------ validation

R = TypeVar("R", bound=_Request)

# Request extensions of OpenAI-compatible peers (vLLM's SamplingParams and chat/completions
# extras, llama.cpp's server) that change the output and that this server does not honour:
# a 400 naming the field where a request sets one to anything but its no-op default (clients
# such as LangChain send some with the default), instead of a 200 that silently ignores it.
# Fields a request model declares are never looked up here: chat and completions declare
# (and honour) `stop_token_ids`, `min_tokens`, `allowed_token_ids`,
# `include_stop_str_in_output` and `skip_special_tokens` (`_Sampling`); the entries below
# still answer them on the routes that do not (Responses, Anthropic Messages).
_UNHONOURED: dict[str, Any] = {
    "min_tokens": lambda v: v not in (None, 0),
    "include_stop_str_in_output": lambda v: v not in (None, False),
    "prompt_logprobs": lambda v: v is not None,
    "echo": lambda v: v not in (None, False),  # chat's (completions declares its own)
    "stop_token_ids": lambda v: bool(v),
    "bad_words": lambda v: bool(v),
    "allowed_token_ids": lambda v: v is not None,
    "truncate_prompt_tokens": lambda v: v is not None,
    "use_beam_search": lambda v: v not in (None, False),
    "best_of": lambda v: v not in (None, 1),  # chat's (completions declares its own)
    "length_penalty": lambda v: v not in (None, 1, 1.0),
    "skip_special_tokens": lambda v: v is False,
    "return_tokens_as_token_ids": lambda v: v not in (None, False),
    "logits_processors": lambda v: bool(v),
    "n_probs": lambda v: v not in (None, 0),  # llama.cpp's logprobs
    # OpenAI's and Anthropic's newer fields that change what comes back and are not honoured:
    # moderation (OpenAI chat and Responses: scores or blocks input and output), server-side
    # context management (Responses' `[{"type": "compaction", …}]`, Anthropic's `{"edits": […]}`:
    # compacts or clears earlier turns) and Anthropic's `compaction` (the reply is a summary block)
    "moderation": lambda v: v is not None,
    "context_management": lambda v: bool(v) and not (isinstance(v, dict) and not v.get("edits")),
    "compaction": lambda v: v is not None,
}


def parse_request(model: type[R], body: Mapping[str, Any]) -> R:
    """Validate a JSON body; the first problem becomes a 400 naming the field.

    Args:
        model: the request model (`ChatCompletionRequest`, `CompletionRequest`, …).
        body: the parsed JSON object (`serve.body.read_json`).

    Returns:
        The validated request.

    Raises:
        InvalidRequestError: OpenAI's message, `param` and `code` for the first problem.
    """
    unknown = sorted(set(body) - set(model.model_fields))
    for name in unknown:
        changes = _UNHONOURED.get(name)
        if changes is not None and changes(body[name]):
            raise InvalidRequestError(
                f"'{name}' is not supported by this server: it would change the output, and "
                "this server would ignore it. Leave it out (or at its default).",
                param=name, code="unsupported_parameter")
    aliases = getattr(model, "FOREIGN_ALIASES", None)
    if aliases is not None:  # another wire format's field: 400, not silently dropped
        check_foreign_fields(body, model.model_fields, aliases)
    if unknown:
        log.debug("ignoring unknown fields in %s: %s", model.__name__, ", ".join(unknown))
    try:
        return model.model_validate(dict(body))
    except ValidationError as exc:
        err = _first_error(exc.errors(include_url=False))
        field = model.model_fields.get(str(err["loc"][0])) if err["loc"] else None
        decimal = field is not None and float in (field.annotation, *get_args(field.annotation))
        raise _to_api_error(err, decimal=decimal) from None


# A union's branch in an error location ("str", "list[dict[str,any]]", "function-after[…]", a
# model class name): no field of ours, so never shown to a client.
_UNION_TAG = re.compile(r"(str|int|float|bool|none|bytes|list|dict|tuple)|[a-z-]+\[.*\]|[A-Z]\w*", re.S)


def _first_error(errors: Sequence[Any]) -> dict[str, Any]:
    """The first pydantic error, with union branch tags dropped from its location; when every
    branch of a union refused a value for its type, one "expected X or Y" type error."""
    def strip(e: Any) -> dict[str, Any]:
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and _UNION_TAG.fullmatch(p)))
        return {**e, "loc": loc, "branched": loc != tuple(e["loc"])}

    first = strip(errors[0])
    if not first["branched"]:
        return first
    stripped = [strip(e) for e in errors]
    # a branch that got past the value's own type and failed inside it (`input: ["hi"]`: the
    # list branch at `input.[0]`) says what is wrong; "expected a string" would not
    n = len(first["loc"])
    deeper = [e for e in stripped if len(e["loc"]) > n and e["loc"][:n] == first["loc"]]
    if deeper:
        return deeper[0]
    same = [e for e in stripped if e["loc"] == first["loc"]]
    kinds = [e["type"].removesuffix("_type") for e in same if e["type"].endswith("_type")]
    if len(kinds) == len(same) > 1 and all(k in _EXPECTED for k in kinds):
        expected = " or ".join(dict.fromkeys(_EXPECTED[k] for k in kinds))
        return {**first, "type": "union_type", "expected": expected}
    return first


def _param(loc: Sequence[str | int]) -> str:
    # OpenAI spells nested params like `messages.[0].content`.
    return ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in loc)


def _num(x: Any) -> str:
    text = str(int(x)) if isinstance(x, float) and x.is_integer() else str(x)
    return text if len(text) <= 24 else f"{text[:12]}…({len(text)} digits)"


# pydantic's `*_type` errors → the JSON type OpenAI's messages name.
_EXPECTED = {"int": "an integer", "float": "a number", "bool": "a boolean", "string": "a string",
             "list": "an array", "tuple": "an array", "dict": "an object", "model": "an object"}


def _json_type(value: Any) -> str:
    for t, name in ((bool, "a boolean"), (int, "an integer"), (float, "a number"), (str, "a string"),
                    (list, "an array"), (dict, "an object")):
        if isinstance(value, t):
            return name
    return "null" if value is None else type(value).__name__


def _to_api_error(err: Mapping[str, Any], *, decimal: bool = False) -> InvalidRequestError:
    """One pydantic error → OpenAI's message and `code` (`missing_required_parameter`,
    `invalid_type`, `integer_below_min_value`, `decimal_above_max_value`, `empty_array`,
    `invalid_value`)."""
    ctx = err.get("ctx") or {}
    cause = ctx.get("error")
    if isinstance(cause, _FieldError):  # nested (a message's field): prefix its location
        prefix = _param(err["loc"])
        return InvalidRequestError(str(cause), param=f"{prefix}.{cause.param}" if prefix else cause.param,
                                   code="invalid_value")
    param = _param(err["loc"]) or None
    value = err.get("input")
    kind = err["type"]
    number = "decimal" if decimal else "integer"
    if kind == "missing":
        message, code = f"Missing required parameter: '{param}'.", "missing_required_parameter"
    elif kind in ("greater_than_equal", "greater_than"):
        limit = ctx.get("ge", ctx.get("gt"))
        message = f"Invalid '{param}': {_num(value)} is less than the minimum of {_num(limit)}."
        code = f"{number}_below_min_value"
    elif kind in ("less_than_equal", "less_than"):
        limit = ctx.get("le", ctx.get("lt"))
        message = f"Invalid '{param}': {_num(value)} is greater than the maximum of {_num(limit)}."
        code = f"{number}_above_max_value"
    elif kind == "too_short":
        message = (
            f"Invalid '{param}': empty array. Expected an array with minimum length 1, "
            "but got an empty array instead."
        )
        code = "empty_array"
    elif kind == "float_type" and isinstance(value, int) and not isinstance(value, bool):
        # an integer too large for a float (1e400 written out): out of range, not a type error
        side = "above_max" if value > 0 else "below_min"
        message, code = f"Invalid '{param}': {_num(value)} is out of range.", f"decimal_{side}_value"
    elif kind == "union_type" or (kind.endswith("_type") and kind.removesuffix("_type") in _EXPECTED):
        expected = err.get("expected") or _EXPECTED[kind.removesuffix("_type")]
        message = (f"Invalid type for '{param}': expected {expected}, but got "
                   f"{_json_type(value)} instead.")
        code = "invalid_type"
    elif cause is not None:
        message, code = f"Invalid '{param}': {cause}.", "invalid_value"
    else:
        message, code = f"Invalid type or value for '{param}': {err['msg']}.", "invalid_value"
    return InvalidRequestError(message, param=param, code=code)


def check_context(
    *, prompt_tokens: int, max_tokens: int | None, max_length: int, what: str, param: str
) -> None:
    """400 if the prompt plus the requested completion does not fit the context, with numbers."""
    if prompt_tokens == 0:
        raise InvalidRequestError(f"The {what} is empty after tokenization.", param=param)
    if prompt_tokens >= max_length:
        raise InvalidRequestError(
            f"This model's maximum context length is {max_length} tokens. However, your {what} "
            f"resulted in {prompt_tokens} tokens, which leaves no room for a completion. "
            f"Please reduce the length of the {what}.",
            param=param,
            code="context_length_exceeded",
        )
    if max_tokens is not None and prompt_tokens + max_tokens > max_length:
        raise InvalidRequestError(
            f"This model's maximum context length is {max_length} tokens. However, you requested "
            f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the {what}, {max_tokens} in "
            f"the completion). Please reduce the length of the {what} or completion.",
            param=param,
            code="context_length_exceeded",
        )


def check_fits(tokenizer: Any, text: str, max_length: int, *, what: str, param: str) -> None:
    """400 (`context_length_exceeded`) for a text that cannot fit the context, decided
    from a lower bound on its token count (`Tokenizer.min_tokens`: its length, then pieces
    encoded only until the count passes the context), so a huge prompt costs little tokenizer
    time. Tokenizers without `min_tokens` (test doubles) pass."""
    min_tokens = getattr(tokenizer, "min_tokens", None)
    if min_tokens is None or len(text) < max_length:  # cheap: even 1 char a token fits
        return
    at_least = min_tokens(text, max_length)
    if at_least >= max_length:
        raise InvalidRequestError(
            f"This model's maximum context length is {max_length} tokens. However, your {what} "
            f"{'are' if what.endswith('s') else 'is'} {len(text)} characters long, which is at "
            f"least {at_least} tokens. Please reduce "
            f"the length of the {what}.",
            param=param,
            code="context_length_exceeded",
        )


def check_token_ids(ids: Sequence[int], vocab_size: int, *, param: str) -> None:
    """Raises InvalidRequestError (naming `param`) for an id outside `0 .. vocab_size - 1`."""
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise InvalidRequestError(
            f"Invalid '{param}': token id {bad[0]} is out of range; this model's vocabulary "
            f"has {vocab_size} tokens (ids 0 to {vocab_size - 1}).",
            param=param,
        )
