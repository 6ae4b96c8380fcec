"""Output-side parsers: a choice's generated text → text, reasoning and tool-call deltas.

PLACEHOLDER (branch wt12). The real package (tool-call parsers per model family and the
reasoning parser) is written in branch wt11; the lead replaces this module with it at merge.
The delta types and `ChoiceParser`'s interface are the agreed contract
(/work/notes/ISSUE11.md): the Responses and Anthropic Messages renderers
(`serve.api_responses`, `serve.api_messages`) are written against them.

`REAL` says whether this is the real parser; tests that need tool calls or reasoning from a
model skip while it is False.
"""

from __future__ import annotations

from dataclasses import dataclass

REAL = False  # MERGE(wt11): the real package replaces this module (no REAL: tests treat that as real)


@dataclass(frozen=True)
class TextDelta:
    """Plain answer text."""

    text: str


@dataclass(frozen=True)
class ReasoningDelta:
    """Text of the model's reasoning (a `<think>` section or its family's equivalent)."""

    text: str


@dataclass(frozen=True)
class ToolCallStart:
    """A tool call begins: its index among the choice's calls, its id, the function name."""

    index: int
    id: str
    name: str


@dataclass(frozen=True)
class ToolCallArgs:
    """The next piece of tool call `index`'s JSON arguments text."""

    index: int
    fragment: str


Delta = TextDelta | ReasoningDelta | ToolCallStart | ToolCallArgs


class ChoiceParser:
    """One choice's incremental parser; this placeholder passes all text through as text."""

    def feed(self, text: str) -> list[Delta]:
        """The deltas `text` (the choice's next piece of output) completes."""
        return [TextDelta(text)] if text else []

    def finish(self) -> list[Delta]:
        """The deltas still held back once the choice has ended."""
        return []
