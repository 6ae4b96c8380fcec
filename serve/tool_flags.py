"""Per-tool settings of the Responses and Messages APIs that only a hosted platform can act
on, read the same way by both adapters (`serve.api_responses`, `serve.api_messages`): each is
honoured where it asks for what this server does anyway, and a 400 naming it otherwise, so a
tool is never offered to the model in a way its client did not ask for.

Wire truth: openai-python's `openai/types/responses/function_tool.py` (`allowed_callers`:
`"direct"` | `"programmatic"`, `async`, `defer_loading`) and anthropic-sdk-python's
`anthropic/types/tool_param.py` (`allowed_callers`: `"direct"` | `"code_execution_…"`,
`defer_loading`).
"""

from __future__ import annotations

from typing import Any

from serve.errors import InvalidRequestError


def flag(obj: dict[str, Any], name: str, param: str) -> bool:
    """The boolean `obj[name]` (absent or null: False).

    Raises:
        InvalidRequestError: it is set to anything but a boolean (`"false"` would read as
            true), param `{param}.{name}`, code `invalid_type`.
    """
    value = obj.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidRequestError(f"'{param}.{name}' must be a boolean, not {type(value).__name__}.",
                                  param=f"{param}.{name}", code="invalid_type")
    return value


def check_hosted_tool_fields(tool: dict[str, Any], param: str, *, what: str = "function") -> None:
    """Refuse the tool settings this server cannot honour (400 naming them).

    - `defer_loading: true`: the tool is loaded by a tool search tool this server has not.
    - `allowed_callers` without `"direct"`: the tool may only be called from a program
      (OpenAI's programmatic tool calling, Anthropic's code execution), which this server
      does not run, and offering it to the model would let the model call it directly. A
      list holding `"direct"` is what this server does; its other callers change nothing,
      as no program runs here.
    - `async: true` (OpenAI): the model would go on without waiting for the call's output,
      which a chat template's turns cannot express.

    Args:
        tool: the tool definition (parsed JSON).
        param: where it stands (`tools[0]` on Responses, `tools.[0]` on Messages).
        what: "function" or "tool", for the messages.

    Raises:
        InvalidRequestError: as above, or any of these fields of the wrong type.
    """
    if flag(tool, "defer_loading", param):
        raise InvalidRequestError(f"Deferred {what}s are loaded by the tool search tool, which this server "
                                  f"does not have; send the {what} without 'defer_loading'.",
                                  param=f"{param}.defer_loading")
    callers = tool.get("allowed_callers")
    if callers is not None:
        if not isinstance(callers, list) or not all(isinstance(c, str) for c in callers):
            raise InvalidRequestError(f"'{param}.allowed_callers' must be a list of strings.",
                                      param=f"{param}.allowed_callers", code="invalid_type")
        if "direct" not in callers:
            raise InvalidRequestError(
                f"'{param}.allowed_callers' {callers!r} leaves out 'direct': this server runs no program "
                f"that could call the {what}, only the model calls tools; list 'direct' or leave the "
                "field out.", param=f"{param}.allowed_callers", code="invalid_value")
    if flag(tool, "async", param):
        raise InvalidRequestError(f"Asynchronous {what}s are not supported by this server: the model waits "
                                  f"for each call's output; send the {what} without 'async'.",
                                  param=f"{param}.async")
