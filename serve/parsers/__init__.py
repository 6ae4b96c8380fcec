"""Output parsers: one choice's generated text → typed deltas (answer text, reasoning,
tool calls), pure and incremental, so streaming and non-streaming responses (and every
wire format: chat completions, Responses, Anthropic Messages) render the same parse.

```
text pieces ──► ReasoningSplitter ──► ReasoningDelta …          (`<think>…</think>`)
                      │ answer text
                      ▼
                ToolCallParser(family) ──► TextDelta, ToolCallStart, ToolCallArgs …
```

Feeding a text in any split and then `finish()` gives deltas that `collapse` to the same
list as feeding it whole (tested at every character boundary in tests/test_tool_parsers.py).
"""

from __future__ import annotations

import secrets
import string
import uuid
from collections.abc import Callable

from serve.parsers.deltas import (
    Delta,
    ReasoningDelta,
    TextDelta,
    ToolCallArgs,
    ToolCallStart,
    collapse,
)
from serve.parsers.json_call import partial_json_object
from serve.parsers.reasoning import ReasoningSplitter
from serve.parsers.tool_calls import TOOL_PARSERS, ToolCallParser

__all__ = [
    "REASONING_PARSERS",
    "TOOL_PARSERS",
    "ChoiceParser",
    "Delta",
    "ReasoningDelta",
    "TextDelta",
    "ToolCallArgs",
    "ToolCallStart",
    "collapse",
    "detect_reasoning_parser",
    "detect_tool_parser",
    "new_call_id",
    "partial_json_object",
]

REASONING_PARSERS = ("think",)


def new_call_id(family: str | None = None) -> str:
    """A fresh tool call id: `call_` + 24 hex digits (OpenAI's shape), or 9 alphanumerics
    for Mistral, whose chat templates refuse any other id."""
    if family == "mistral":
        alphabet = string.ascii_letters + string.digits
        return "".join(secrets.choice(alphabet) for _ in range(9))
    return f"call_{uuid.uuid4().hex[:24]}"


def detect_tool_parser(template: str, *, renders_tools: bool) -> str:
    """The tool-call family a chat template's model writes, from markers in the template.

    Args:
        template: the Jinja source.
        renders_tools: the template uses the `tools` variable; otherwise llorch's generic
            format is rendered and parsed.
    """
    if not renders_tools:
        return "generic"
    if "[TOOL_CALLS]" in template:
        return "mistral"
    if "func_name1(" in template or "<|python_start|>" in template:
        return "pythonic"
    if "<tool_call>" in template:  # before "parameters": Hermes templates spell out schemas
        return "hermes"
    if "<|python_tag|>" in template or '"parameters"' in template:
        return "llama3_json"
    return "hermes"  # <tool_call>: Hermes, Qwen2.5/3, and the most common default


def detect_reasoning_parser(template: str) -> str | None:
    """"think" when the template knows `<think>` blocks (Qwen3, DeepSeek-R1, SmolLM3)."""
    return "think" if "</think>" in template or "<think>" in template else None


class ChoiceParser:
    """Parses one choice's text as it streams.

    Args:
        tool_parser: a family of `TOOL_PARSERS`, or None to parse no calls (tool_choice
            "none", or no tools offered).
        reasoning: split a `<think>` block off first.
        start_in_reasoning: the prompt already opened the block (it ends with `<think>`).
        new_id: makes call ids (default `new_call_id(tool_parser)`).
        calls_only: the answer can only be calls (tool_choice "required" or named): a
            partial trigger left at the end is dropped, never returned as text.
    """

    def __init__(self, *, tool_parser: str | None = None, reasoning: bool = False,
                 start_in_reasoning: bool = False,
                 new_id: Callable[[], str] | None = None, calls_only: bool = False) -> None:
        self.reasoning = ReasoningSplitter(start_inside=start_in_reasoning) if reasoning else None
        family = tool_parser
        self.tools = (ToolCallParser(family, new_id or (lambda: new_call_id(family)), calls_only=calls_only)
                      if family is not None else None)

    def feed(self, text: str) -> list[Delta]:
        """Deltas for the next piece of text (possibly none while markup is held back)."""
        out: list[Delta] = []
        if self.reasoning is not None:
            out, text = self.reasoning.feed(text)
        return out + self._answer(text)

    def finish(self) -> list[Delta]:
        """Deltas for whatever was held back; call once, when the choice ends."""
        out: list[Delta] = []
        text = ""
        if self.reasoning is not None:
            out, text = self.reasoning.finish()
        out += self._answer(text)
        if self.tools is not None:
            out += self.tools.finish()
        return out

    def _answer(self, text: str) -> list[Delta]:
        if self.tools is not None:
            return self.tools.feed(text) if text else []
        return [TextDelta(text)] if text else []

    @property
    def num_calls(self) -> int:
        """Tool calls started so far."""
        return self.tools.num_calls if self.tools is not None else 0

    @property
    def calls_finished(self) -> bool:
        """Some tool call was written and every call started came to its end: the turn
        ended to call tools. Renderers report `tool_calls`/`tool_use` only when this holds
        and the engine stopped (not `length`); a call cut by max_tokens or a stop string
        keeps the engine's reason."""
        return self.tools is not None and self.tools.num_calls > 0 and self.tools.open_calls == 0

    @property
    def open_calls(self) -> int:
        """Calls started whose arguments were cut short."""
        return self.tools.open_calls if self.tools is not None else 0
