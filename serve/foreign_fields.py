"""Fields of the *other* wire formats sent to a route: refused, not silently dropped.

The four generating routes (chat completions, completions, Responses, Anthropic Messages)
share one engine but not one vocabulary: `stop` is chat's, `stop_sequences` Anthropic's;
`max_tokens` is chat's and Anthropic's, `max_output_tokens` the Responses API's. A client that
sends one route's field to another (the `openai` SDK's `extra_body={"stop": [...]}` on
`responses.create`, an Anthropic-style `system` on chat) used to get a 200 with the field
ignored: no stop, no length limit (8,161 tokens, the whole context, for `max_tokens: 2` on
/v1/responses), no grammar. OpenAI and Anthropic answer such a body 400 ("Unknown
parameter" / "Extra inputs are not permitted"); here a 400 names the field, and says what
this route calls it where it has an equivalent.

`FOREIGN` lists each such field with a test for "set to something that would change the
output" (a no-op default such as `n: 1` or `stop: []` still passes, as clients send those),
and only fields a route does not declare are looked up (`parse_request`), so each route
refuses exactly the others' fields it cannot honour. Unknown fields that are nobody's stay
ignored (logged at debug), as before.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from serve.errors import InvalidRequestError


def _set(value: Any) -> bool:
    return value is not None


def _truthy(value: Any) -> bool:
    return bool(value)


def _not_zero(value: Any) -> bool:
    return value not in (None, 0, False)


def _thinking(value: Any) -> bool:
    return value is not None and not (isinstance(value, dict) and value.get("type") == "disabled")


# field → whether its value would change the output (False for the no-op defaults).
FOREIGN: dict[str, Callable[[Any], bool]] = {
    # chat completions' / completions' sampling and length fields
    "n": lambda v: v not in (None, 1),
    "stop": _truthy,
    "max_tokens": _set,
    "max_completion_tokens": _set,
    "logit_bias": _truthy,
    "frequency_penalty": _not_zero,
    "presence_penalty": _not_zero,
    "repetition_penalty": lambda v: v not in (None, 1),
    "min_p": _not_zero,
    "seed": _set,
    "logprobs": _not_zero,
    "top_logprobs": _not_zero,
    # chat's constraints and tools
    "response_format": lambda v: v is not None and v != {"type": "text"},
    "structured_outputs": _set,
    "guided_json": _set,
    "guided_regex": _set,
    "guided_choice": _set,
    "guided_grammar": _set,
    "guided_whitespace_pattern": _set,
    "json_schema": _set,
    "grammar": _set,
    "tools": _truthy,
    "tool_choice": lambda v: v not in (None, "none", "auto"),
    "functions": _truthy,
    "function_call": lambda v: v not in (None, "none", "auto"),
    # chat's prompt fields
    "messages": _truthy,
    "chat_template_kwargs": _truthy,
    "add_generation_prompt": lambda v: v is False,
    "continue_final_message": lambda v: v is True,
    "reasoning_effort": _set,
    "verbosity": lambda v: v not in (None, "medium"),
    # the Responses API's
    "input": _set,
    "instructions": _truthy,
    "max_output_tokens": _set,
    "text": _truthy,
    "reasoning": _truthy,
    # Anthropic's
    "system": _truthy,
    "stop_sequences": _truthy,
    "output_config": _truthy,
    "output_format": _set,
    "thinking": _thinking,
}


def check_foreign_fields(body: Mapping[str, Any], declared: Mapping[str, Any], aliases: Mapping[str, str]) -> None:
    """Refuse another wire format's field that this route would otherwise ignore.

    Args:
        body: the request's JSON object.
        declared: the route model's fields (never refused here: the route reads them).
        aliases: foreign field → what this route calls it (named in the message), if anything.

    Raises:
        InvalidRequestError: 400 `unsupported_parameter` naming the first such field set to
            something that would change the output.
    """
    for name in body:
        if name in declared:
            continue
        changes = FOREIGN.get(name)
        if changes is None or not changes(body[name]):
            continue
        hint = f" Use {aliases[name]} instead." if name in aliases else ""
        raise InvalidRequestError(
            f"'{name}' is not a field of this API (it belongs to another wire format this server "
            f"speaks); it would change the output and would be ignored here.{hint}",
            param=name, code="unsupported_parameter")
