"""Tool calls as llguidance grammars (Lark text with inline `%json {schema}` for the
arguments), in each family's own call syntax, so a constrained call is exactly what the
family's parser reads back (`serve.parsers`).

```
tool_choice   grammar                                           what the model may write
required      start: THINK? calls                               one call (or several, with
named         start: THINK? call_f                              parallel_tool_calls), nothing else
auto          start: THINK? (TEXT-then-trigger call)* TEXT      free text; from the family's
                                                                trigger on, a valid call
auto + a      start: THINK? (calls | @answer)                   the calls, or an answer in the
response_format                                                 format's grammar
none          no grammar
```

`auto` uses llguidance's lazy lexemes (`rule[lazy]: TEXT "<tool_call>"`, its syntax.md
"tool calling" section and `llguidance.StructTag`): text is free until the trigger, then the
call is constrained. Families whose call starts the output (llama3_json `{`, mistral `[{`,
pythonic `[`) get "a call list, or text that does not start with the trigger". With a
reasoning template the constraint starts after `</think>`: `THINK` is the block, free text
inside. Special-token markers (`[TOOL_CALLS]`, `<|python_tag|>`) are grammar tokens where the
tokenizer has them (`special=`), and absent otherwise; the engine's text skips special tokens,
so the parsers read calls either way.

Pythonic calls constrain each keyword's value by its property schema (as JSON literals,
which the pythonic parser reads too) but not which properties are present.

Argument schemas are closed (`serve.constraints.close_objects`): an object that lists `properties` without
saying `additionalProperties` takes no other keys. Their numbers are bounded as response_format's
(`serve.constraints.bound_numbers`: at most 10 digits after the point, no exponent).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from llguidance import LLMatcher

from serve.constraints import JSON_WHITESPACE, bound_numbers, close_objects

TOOL_CALLS, PYTHON_TAG = "[TOOL_CALLS]", "<|python_tag|>"  # special-token markers
# Same whitespace rules and strictness as response_format schemas (serve.constraints).
_X_GUIDANCE = {"whitespace_pattern": JSON_WHITESPACE, "lenient": False}
EMPTY_PARAMETERS = {"type": "object", "properties": {}}
# Blanks after `</think>` and after a call: bounded, so that where the grammar lets the output
# end (the last allowed call written) the engine stops within two more tokens at most,
# instead of letting a small model write newlines until max_tokens.
BLANK = r"[ \t\r\n]{1,2}"


def _lit(text: str) -> str:
    return json.dumps(text)


def _json(schema: dict[str, Any] | None, *, close: bool = True) -> str:
    schema = dict(schema if schema is not None else EMPTY_PARAMETERS)
    if close:
        schema = close_objects(schema)
    schema = bound_numbers(schema)  # as response_format schemas (serve.constraints)
    schema["x-guidance"] = {**_X_GUIDANCE, **(schema.get("x-guidance") or {})}
    return "%json " + json.dumps(schema, ensure_ascii=False)


def arguments_grammar(schema: dict[str, Any] | None) -> str:
    """Lark text of one function's arguments object alone (used to check a schema)."""
    return "start: " + _json(schema) + "\n"


def _call(family: str, name: str, schema: dict[str, Any] | None) -> str:
    """One call of `name`, as the family writes it (the trigger included)."""
    if family in ("hermes", "generic"):
        return f'"<tool_call>\\n" {_lit(json.dumps({"name": name})[:-1] + ", ")} ' \
               f'"\\"arguments\\": " {_json(schema)} "}}\\n</tool_call>"'
    if family == "llama3_json":
        return f'{_lit(json.dumps({"name": name})[:-1] + ", ")} "\\"parameters\\": " {_json(schema)} "}}"'
    if family == "mistral":
        return f'{_lit(json.dumps({"name": name})[:-1] + ", ")} "\\"arguments\\": " {_json(schema)} "}}"'
    if family == "pythonic":
        props = (schema or {}).get("properties") or {}
        if not props:
            return _lit(f"{name}()")
        kws = " | ".join(f"{_lit(k + '=')} {_json(v if isinstance(v, dict) else {})}" for k, v in props.items())
        return f'{_lit(name + "(")} (({kws}) ("," " "? ({kws}))*)? ")"'
    raise ValueError(f"no call grammar for tool-call family {family!r}")


def _calls(family: str, call_rule: str, parallel: bool, special: Mapping[str, int]) -> str:
    """The list of calls that follows the trigger: the rule `calls`. A family's special-token
    marker (`special`: its id in this tokenizer) opens the list as the model writes it."""
    if family in ("hermes", "generic"):
        more = f' ("\\n" {call_rule})*' if parallel else ""
        return f"calls: {call_rule}{more}\n"
    if family == "llama3_json":
        more = f' ("; " {call_rule})*' if parallel else ""
        tag = f"<[{special[PYTHON_TAG]}]>? " if PYTHON_TAG in special else ""
        return f"calls: {tag}{call_rule}{more}\n"
    if family == "mistral":
        more = f' (", " {call_rule})*' if parallel else ""
        tag = f"<[{special[TOOL_CALLS]}]> " if TOOL_CALLS in special else ""
        return f'calls: {tag}"[" {call_rule}{more} "]"\n'
    more = f' (", " {call_rule})*' if parallel else ""
    return f'calls: "[" {call_rule}{more} "]"\n'


# Text that does not begin a call, for families whose calls start the output.
_NOT_A_CALL_START = {
    "llama3_json": r"\s*([^{\s](.|\n)*)?",
    "mistral": r"\s*([^\[\s](.|\n)*|\[([^{](.|\n)*)?)?",
    "pythonic": r"\s*([^\[\s](.|\n)*)?",
}


def tool_grammar(
    family: str,
    functions: Sequence[tuple[str, dict[str, Any] | None]],
    *,
    mode: str,
    parallel: bool = True,
    reasoning: str | None = None,
    answer: str | None = None,
    special: Mapping[str, int] | None = None,
) -> str:
    """Lark text (feed it to `LLMatcher.grammar_from_lark`) constraining a choice's output.

    Args:
        family: a tool-call family of `serve.parsers.TOOL_PARSERS`.
        functions: `(name, parameters JSON schema)` of each function the output may call
            (for a named tool_choice, only that one).
        mode: "required" (only calls), "named" (one call of `functions[0]`), or "auto"
            (text, constrained from the trigger on).
        parallel: allow several calls (`parallel_tool_calls`).
        reasoning: None, "open" (a `<think>` block may come first), or "inside" (the prompt
            opened the block; the output starts inside it).
        answer: with mode "auto", the grammar a text answer must follow (response_format
            & co.): the output is then the calls alone, or an answer in that grammar.
        special: `{marker: token id}` for the markers this tokenizer has as special tokens
            (`TOOL_CALLS`, `PYTHON_TAG`): Mistral's calls then start with `[TOOL_CALLS]`,
            Llama's may start with `<|python_tag|>`, as the models were trained to write.

    Returns:
        Lark text; with `answer`, an llguidance grammar string (use it as it is).
        llguidance reports bad argument schemas when it compiles it.
    """
    if mode not in ("required", "named", "auto"):
        raise ValueError(f"no grammar for tool mode {mode!r}")
    if mode == "named":
        functions, parallel = functions[:1], False
    names = [f"fn_{i}" for i in range(len(functions))]
    rules = [f"{rule}: {_call(family, name, schema)}" for rule, (name, schema) in zip(names, functions, strict=True)]
    call = " | ".join(names) if len(names) > 1 else names[0]
    lines = ["%llguidance {}"]
    think = ""
    if reasoning == "inside":
        lines.append('think: think_end BLANK?')
        lines.append('think_end[lazy]: THINK_TEXT "</think>"')
        think = "think "
    elif reasoning == "open":
        lines.append('think: "<think>" think_end BLANK?')
        lines.append('think_end[lazy]: THINK_TEXT "</think>"')
        think = "think? "
    parts: list[dict[str, Any]] = []
    if mode == "auto" and answer is not None:
        parts = _grammar_parts(answer)
        schema = parts[0].get("json_schema") if len(parts) == 1 else None
        if family == "llama3_json" and isinstance(schema, dict):
            # A JSON call and a JSON answer both start with "{", and llguidance cannot
            # choose between two nested JSON grammars by what follows: one schema, anyOf
            # the calls (one call, then) and the answer.
            calls = [{"type": "object", "properties": {"name": {"const": n}, "parameters": close_objects(
                      p if p is not None else EMPTY_PARAMETERS)},
                      "required": ["name", "parameters"], "additionalProperties": False}
                     for n, p in functions]
            ref, parts = _json({"anyOf": [*calls, schema]}, close=False), []
            lines.append(f"start: {think}answer")
        else:
            ref = "@" + parts[0]["name"]
            if isinstance(schema, dict):
                ref, parts = _json(schema, close=False), []
            lines.append(f"start: {think}(calls | answer)")
            lines.append(_calls(family, "call", parallel, special or {}).rstrip())
        lines.append(f"answer: {ref}")
    elif mode != "auto":
        lines.append(f"start: {think}calls")
        lines.append(_calls(family, "call", parallel, special or {}).rstrip())
    elif family in ("hermes", "generic"):
        # Free text, then each call after its (lazy) trigger, then free text.
        lines.append(f"start: {think}text_call* TEXT" if parallel else f"start: {think}(text_call | TEXT)")
        lines.append("text_call: trigger call BLANK?")
        lines.append('trigger[lazy]: TEXT "<tool_call>"')
        rules = [r.replace('"<tool_call>\\n" ', '"\\n" ', 1) for r in rules]
    else:
        lines.append(f"start: {think}(calls | PLAIN)")
        lines.append(_calls(family, "call", parallel, special or {}).rstrip())
        lines.append(f"PLAIN: /{_NOT_A_CALL_START[family]}/")
    lines.append(f"call: {call}")
    lines += rules
    lines.append(r"TEXT: /(.|\n)*/")
    lines.append(r"THINK_TEXT: /(.|\n)*/")
    lines.append(f"BLANK: /{BLANK}/")
    lark = "\n".join(lines) + "\n"
    if answer is not None and mode == "auto" and not parts:
        return LLMatcher.grammar_from_lark(lark)
    if parts:
        return json.dumps({"grammars": [{"name": "tools", "lark_grammar": lark}, *parts]})
    return lark


def _grammar_parts(grammar: str) -> list[dict[str, Any]]:
    """An llguidance grammar string as the list of its grammars, the first one named (so a
    Lark rule can refer to it as `@name`)."""
    try:
        inner = json.loads(grammar)
    except ValueError:
        inner = None
    if isinstance(inner, dict) and isinstance(inner.get("grammars"), list) and inner["grammars"]:
        parts = [dict(g) for g in inner["grammars"]]
    else:
        parts = [{"lark_grammar": grammar}]
    parts[0].setdefault("name", "answer")
    return parts


def after_reasoning(grammar: str, reasoning: str) -> str:
    """`grammar` (any llguidance grammar string: Lark text, or the JSON that
    `grammar_from_json_schema` / `grammar_from_regex` return) behind a `<think>` block, so
    a reasoning model thinks freely and the constraint starts after `</think>`.

    Args:
        reasoning: "open" (the block may come first) or "inside" (the output starts in it).

    Returns:
        A JSON grammar of two (or more) grammars: the Lark wrapper, which refers to the
        original by name (`@answer`, llguidance's grammar references).
    """
    parts = _grammar_parts(grammar)
    name = parts[0]["name"]
    if reasoning == "inside":
        head = 'start: think_end BLANK? @' + name
    else:
        head = 'start: ("<think>" think_end BLANK?)? @' + name
    wrapper = "\n".join([
        "%llguidance {}",
        head,
        'think_end[lazy]: THINK_TEXT "</think>"',
        r"THINK_TEXT: /(.|\n)*/",
        f"BLANK: /{BLANK}/",
    ]) + "\n"
    return json.dumps({"grammars": [{"name": "reasoning", "lark_grammar": wrapper}, *parts]})
