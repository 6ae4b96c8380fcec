"""A validated chat request → everything generation needs: the prompt (the model's chat
template rendered with tools and tool turns), the output grammar, and a parser factory for
the model's tool-call and reasoning syntax. Every wire format that translates into a
`ChatCompletionRequest` (chat completions, Responses, Anthropic Messages) calls
`prepare_chat` and so gets tools, reasoning and structured outputs the same way.

```
req ─► render ─► prompt text ─► ids
    │    template renders `tools`?  yes: HF semantics (tools=[{"type": "function", …}],
    │                                    assistant tool_calls with dict arguments, tool turns)
    │                               no:  the generic format (GENERIC_* below)
    ├─► grammar: tool_choice required / named / auto (serve.tool_grammar)
    │            else response_format & co. (serve.constraints), behind `</think>` if any
    └─► make_parser(): ChoiceParser(family, reasoning)
```

The generic format, for templates without tool support (the default model's ChatML): the
tool list and the call syntax go into the system turn (appended to the client's system
message, or as a new first one); the model calls as Hermes does,
`<tool_call>\\n{"name": …, "arguments": {…}}\\n</tool_call>`; earlier assistant calls are
rendered that way in their turn, and tool results as a user turn of
`<tool_response>\\n…\\n</tool_response>` blocks (a turn every template accepts).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from serve.chat_template import ChatTemplateError, template_variables
from serve.constraints import (
    Constraint,
    check_numbers,
    compiled,
    grammar_for_lark,
    require_compiled,
)
from serve.errors import InvalidRequestError
from serve.parsers import ChoiceParser, detect_reasoning_parser, detect_tool_parser
from serve.protocol import ChatCompletionRequest, check_fits
from serve.tool_grammar import (
    PYTHON_TAG,
    TOOL_CALLS,
    after_reasoning,
    arguments_grammar,
    tool_grammar,
)

# Template variables a client may not set through chat_template_kwargs.
_RESERVED = frozenset({"messages", "tools", "documents", "add_generation_prompt"})

GENERIC_TOOLS_HEADER = (
    "# Tools\n\n"
    "You can call the following functions. Their parameters are given as JSON schemas:\n"
)
GENERIC_CALL_FORMATS = {
    "hermes": '<tool_call>\n{"name": "<function name>", "arguments": {<arguments as JSON>}}\n</tool_call>',
    "generic": '<tool_call>\n{"name": "<function name>", "arguments": {<arguments as JSON>}}\n</tool_call>',
    "llama3_json": '{"name": "<function name>", "parameters": {<arguments as JSON>}}',
    "mistral": '[{"name": "<function name>", "arguments": {<arguments as JSON>}}]',
    "pythonic": "[function_name(argument1=value1, argument2=value2)]",
}
GENERIC_MODES = {
    "auto": "Call a function only when it helps to answer; otherwise answer in plain text.",
    "required": "You must call at least one function now.",
    "named": "You must call the function `{name}` now.",
    "none": "Do not call any function now; answer in plain text.",
}


@dataclass(frozen=True)
class PreparedChat:
    """What one chat request generates from.

    Attributes:
        prompt_text: the rendered chat template (for logs and `/tokenize`).
        prompt_ids: its token ids (the template wrote any BOS).
        grammar: the llguidance grammar every choice follows (compiled and cached by
            `prepare_chat` already), or None.
        tool_parser: the family whose calls are parsed, or None (no tools, or "none").
        reasoning: split a `<think>` block off.
        start_in_reasoning: the prompt opened the block.
        calls_only: tool_choice "required" or named: the answer is nothing but calls.
        grammar_prefix: token ids the grammar reads before the first generated token: the
            prefill (`continue_final_message`) under a response format, so the reply
            completes the document the prefill began instead of starting another.
    """

    prompt_text: str
    prompt_ids: list[int]
    grammar: str | None = None
    tool_parser: str | None = None
    reasoning: bool = False
    start_in_reasoning: bool = False
    calls_only: bool = False
    grammar_prefix: tuple[int, ...] = ()

    def make_parser(self) -> ChoiceParser:
        """A fresh parser for one choice."""
        return ChoiceParser(tool_parser=self.tool_parser, reasoning=self.reasoning,
                            start_in_reasoning=self.start_in_reasoning, calls_only=self.calls_only)


def prepare_chat(tokenizer: Any, req: ChatCompletionRequest, options: Any,
                 max_length: int | None = None) -> PreparedChat:
    """Renders, tokenizes and constrains one chat request (blocking: run it in a thread pool).

    Args:
        tokenizer: a `serve.tokenizer.Tokenizer`.
        req: the validated request.
        options: `ServeOptions` (its `tool_call_parser` and `reasoning_parser`, "auto" to
            detect from the template; `allow_special_in_content`).
        max_length: the context in tokens; messages whose text cannot fit are refused
            before anything is tokenized (None: no such check).

    Raises:
        InvalidRequestError: the template rejects the messages (param "messages"), a tool's
            parameters schema cannot be enforced (`tools.[i].function.parameters`), a
            malformed or unenforceable response_format (or vLLM / llama.cpp equivalent).
    """
    template = tokenizer.chat_template
    native = _renders_tools(template)
    family = getattr(options, "tool_call_parser", "auto")
    if family == "auto":
        family = detect_tool_parser(template, renders_tools=native)
    reasoning_opt = getattr(options, "reasoning_parser", "auto")
    reasoning = detect_reasoning_parser(template) if reasoning_opt == "auto" else (
        None if reasoning_opt == "none" else reasoning_opt)
    mode, name = req.tool_mode()
    found = req.constraint()  # validated whatever the mode (raises on a malformed one)

    if max_length is not None:
        check_fits(tokenizer, "".join(m.content or "" for m in req.messages), max_length,
                   what="messages", param="messages")
    text, ids = encode_chat(tokenizer, req, options, native=native, family=family)
    tail = text.rstrip()
    if reasoning is not None and tail.endswith("</think>"):
        reasoning = None  # the template closed the block itself (Qwen3 enable_thinking=False)
    start_inside = reasoning is not None and tail.endswith("<think>")
    think = None if reasoning is None else ("inside" if start_inside else "open")

    grammar, prefix = None, ()
    if mode in ("required", "named", "auto"):
        _check_schemas(tokenizer, req)
        # With tools, a response_format shapes the text answer; under "required" or a
        # named choice the call is the whole output, so only "auto" combines the two.
        if mode != "auto":
            found = None
        if found is not None:
            _compile(tokenizer, found[0], found[1])
        functions = [(t.function.name, t.function.parameters) for t in req.tools or ()]
        if mode == "named":
            functions = [f for f in functions if f[0] == name]
        allowed = req.allowed_tools()
        if allowed is not None:  # allowed_tools: the grammar offers only these
            functions = [f for f in functions if f[0] in allowed]
        grammar = tool_grammar(family, functions, mode=mode, parallel=req.parallel_tool_calls is True,
                               reasoning=think, answer=found[0] if found else None,
                               special=special_markers(tokenizer))
        if found is None:
            grammar = grammar_for_lark(grammar, param="tools")
        _compile(tokenizer, grammar, "tools")
    else:
        if found is not None:
            grammar, param = found
            _compile(tokenizer, grammar, param)  # the unwrapped one names its own errors
            if think is not None:
                grammar = after_reasoning(grammar, think)
                _compile(tokenizer, grammar, param)
            elif req.continue_final_message:
                prefix = _grammar_prefix(tokenizer, grammar, req.messages[-1].content or "",
                                         param)
    return PreparedChat(text, ids, grammar, family if mode != "none" else None,
                        reasoning is not None, start_inside, calls_only=mode in ("required", "named"),
                        grammar_prefix=prefix)


def _grammar_prefix(tokenizer: Any, grammar: str, prefill: str, param: str) -> tuple[int, ...]:
    """The prefill's token ids, checked against `grammar`: a response format applies to the
    whole reply, prefill included (Anthropic's "prefill `{`" pattern), so the grammar reads
    the prefill before the model writes on.

    Raises:
        InvalidRequestError: the prefill is not a beginning the format allows (`param`).
    """
    prefix = tuple(tokenizer.encode(prefill, add_special_tokens=False))
    if prefix and not Constraint.new(grammar, tokenizer).matcher.consume_tokens(list(prefix)):
        raise InvalidRequestError(
            f"The final assistant message (the prefill, {prefill[:40]!r}) is not a beginning "
            f"that '{param}' allows: the format applies to the whole reply.", param=param)
    return prefix


def special_markers(tokenizer: Any) -> dict[str, int]:
    """`{marker: id}` for the tool-call markers (`[TOOL_CALLS]`, `<|python_tag|>`) that this
    tokenizer encodes as one special token."""
    out = {}
    special = getattr(tokenizer, "special_ids", frozenset())
    for marker in (TOOL_CALLS, PYTHON_TAG):
        ids = tokenizer.encode(marker, add_special_tokens=False)
        if len(ids) == 1 and ids[0] in special:
            out[marker] = ids[0]
    return out


def _renders_tools(template: str) -> bool:
    try:
        return "tools" in template_variables(template)
    except ChatTemplateError as exc:
        raise InvalidRequestError(f"The model's chat template is broken: {exc}", param="messages") from None


def _compile(tokenizer: Any, grammar: str, param: str) -> None:
    require_compiled(grammar, tokenizer, param=param)  # we are in the thread pool already


def _check_schemas(tokenizer: Any, req: ChatCompletionRequest) -> None:
    """Each function's parameters compile on their own, so a bad one is named."""
    for i, tool in enumerate(req.tools or ()):
        params = tool.function.parameters
        param = f"tools.[{i}].function.parameters"
        if params is not None and params.get("type", "object") != "object":
            raise InvalidRequestError(f"Invalid '{param}': the parameters must be a JSON schema "
                                      "of type 'object'.", param=param)
        try:
            check_numbers(params, param=param)
        except RecursionError:
            raise InvalidRequestError(f"Invalid '{param}': the JSON schema is nested too deeply.",
                                      param=param) from None
        item = compiled(grammar_for_lark(arguments_grammar(params), param=param), tokenizer)
        if isinstance(item, str):
            raise InvalidRequestError(f"Invalid '{param}': the JSON schema cannot be enforced: {item}",
                                      param=param)


def render_chat(tokenizer: Any, req: ChatCompletionRequest, *, native: bool | None = None,
                family: str = "generic", add_generation_prompt: bool = True) -> str:
    """The prompt text: the chat template over the request's messages and tools.

    Raises:
        InvalidRequestError: the template rejects the messages, or chat_template_kwargs
            sets a reserved variable.
    """
    messages, kwargs = _template_call(tokenizer, req, native=native, family=family)
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                             **kwargs)
    except ChatTemplateError as exc:
        raise InvalidRequestError(f"The chat template rejected the messages: {exc}", param="messages") from None


def encode_chat(tokenizer: Any, req: ChatCompletionRequest, options: Any, *,
                native: bool | None = None, family: str = "generic") -> tuple[str, list[int]]:
    """`render_chat` and its token ids: special-token text inside message content is
    encoded as plain text (`Tokenizer.encode_chat`) unless `options.allow_special_in_content`.
    The request's `add_generation_prompt` (default true) opens the assistant's turn; its
    `continue_final_message` ends the prompt right after the final assistant message's text
    instead (prefill: the model continues that text; grammars and output parsers apply to
    the new text only).

    Returns:
        (prompt text, token ids); the template wrote any BOS it wants.

    Raises:
        InvalidRequestError: as `render_chat`.
    """
    add_generation_prompt = req.add_generation_prompt is not False
    cont = bool(req.continue_final_message)
    if not hasattr(tokenizer, "encode_chat"):  # a test double
        text = render_chat(tokenizer, req, native=native, family=family,
                           add_generation_prompt=add_generation_prompt)
        return text, tokenizer.encode(text, add_special_tokens=False)
    messages, kwargs = _template_call(tokenizer, req, native=native, family=family)
    try:
        return tokenizer.encode_chat(
            messages, add_generation_prompt=add_generation_prompt and not cont,
            allow_special_in_content=getattr(options, "allow_special_in_content", False),
            continue_final_message=cont, **kwargs)
    except ChatTemplateError as exc:
        raise InvalidRequestError(f"The chat template rejected the messages: {exc}", param="messages") from None


def _template_call(tokenizer: Any, req: ChatCompletionRequest, *, native: bool | None,
                   family: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The messages and keyword arguments (`tools`, template variables) the chat template
    is rendered with."""
    if native is None:
        native = _renders_tools(tokenizer.chat_template)
    extra = dict(req.chat_template_kwargs or {})
    clash = sorted(_RESERVED & set(extra))
    if clash:
        raise InvalidRequestError(f"Invalid 'chat_template_kwargs': '{clash[0]}' is set by the "
                                  "request itself.", param="chat_template_kwargs")
    for name in ("reasoning_effort", "verbosity"):  # OpenAI fields some templates read (gpt-oss)
        value = getattr(req, name)
        if value is None:
            continue
        if name not in template_variables(tokenizer.chat_template):
            raise InvalidRequestError(f"'{name}' is not supported by this model: its chat template "
                                      f"does not read it.", param=name)
        extra.setdefault(name, value)
    messages = req.template_messages()
    mode, name = req.tool_mode()
    tools = [t.function.to_template() for t in req.tools or ()] or None
    if not native:
        messages = generic_messages(messages, tools, mode=mode, name=name, family=family,
                                    allowed=req.allowed_tools())
        tools = None
    return messages, {"tools": tools, **extra}


def generic_system_prompt(tools: list[dict[str, Any]], *, mode: str, name: str | None,
                          family: str = "generic", allowed: list[str] | None = None) -> str:
    """The generic format's tool block (see the module doc); `allowed`: the only functions
    that may be called now (an `allowed_tools` tool_choice), said after the mode."""
    listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    call = GENERIC_CALL_FORMATS.get(family, GENERIC_CALL_FORMATS["generic"])
    return (f"{GENERIC_TOOLS_HEADER}{listing}\n\n"
            f"To call a function, answer with one call per line in exactly this form:\n{call}\n"
            "Results come back as <tool_response></tool_response> blocks. "
            + GENERIC_MODES[mode].format(name=name)
            + (f" Only these functions may be called now: {', '.join(f'`{a}`' for a in allowed)}."
               if allowed is not None else ""))


def _calls_text(family: str, calls: list[tuple[str, dict[str, Any]]]) -> str:
    """Earlier calls written in the syntax the system turn asks for (`GENERIC_CALL_FORMATS`)."""
    if family == "llama3_json":
        return "; ".join(json.dumps({"name": n, "parameters": a}, ensure_ascii=False) for n, a in calls)
    if family == "mistral":
        return json.dumps([{"name": n, "arguments": a} for n, a in calls], ensure_ascii=False)
    if family == "pythonic":
        return "[" + ", ".join(
            f"{n}(" + ", ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in a.items()) + ")"
            for n, a in calls) + "]"
    return "\n".join("<tool_call>\n" + json.dumps({"name": n, "arguments": a}, ensure_ascii=False)
                     + "\n</tool_call>" for n, a in calls)


def generic_messages(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, *,
                     mode: str, name: str | None, family: str = "generic",
                     allowed: list[str] | None = None) -> list[dict[str, Any]]:
    """Messages for a template without tool support: the tool block in the system turn,
    assistant calls written out as text, tool results as user turns."""
    out: list[dict[str, Any]] = []
    for m in messages:
        role = m["role"]
        if role == "assistant" and m.get("tool_calls"):
            calls = _calls_text(family, [(c["function"]["name"], c["function"]["arguments"])
                                         for c in m["tool_calls"]])
            text = m.get("content") or ""
            out.append({"role": "assistant", "content": f"{text}\n{calls}" if text else calls})
        elif role == "tool":
            block = f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"
            if out and out[-1].get("_tool"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool": True})
        else:
            out.append(dict(m))
    for m in out:
        m.pop("_tool", None)
    if tools:
        block = generic_system_prompt(tools, mode=mode, name=name, family=family, allowed=allowed)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": (out[0].get("content") or "") + "\n\n" + block}
        else:
            out.insert(0, {"role": "system", "content": block})
    return out
