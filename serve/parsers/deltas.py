"""What the output parsers emit: typed pieces of one choice's text (re-exported by
`serve.parsers`, where the wire renderers import them from)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class TextDelta:
    """Answer text (`content`)."""

    text: str


@dataclass(frozen=True)
class ReasoningDelta:
    """Text inside the model's `<think>…</think>` block (`reasoning_content`)."""

    text: str


@dataclass(frozen=True)
class ToolCallStart:
    """A tool call begins: its 0-based `index` in this choice, a fresh `id`, the function `name`."""

    index: int
    id: str
    name: str


@dataclass(frozen=True)
class ToolCallArgs:
    """A fragment of call `index`'s arguments, a JSON object text; a call's fragments joined
    are its whole `arguments` string."""

    index: int
    fragment: str


Delta = TextDelta | ReasoningDelta | ToolCallStart | ToolCallArgs


def collapse(deltas: Iterable[Delta]) -> list[Delta]:
    """Joins neighbouring deltas of the same kind (and the same call), dropping empty ones:
    a stream fed in any split collapses to the same list as the unsplit parse."""
    out: list[Delta] = []
    for d in deltas:
        if isinstance(d, TextDelta | ReasoningDelta | ToolCallArgs):
            text = d.fragment if isinstance(d, ToolCallArgs) else d.text
            if not text:
                continue
            last = out[-1] if out else None
            if type(last) is type(d) and (not isinstance(d, ToolCallArgs) or last.index == d.index):
                if isinstance(d, ToolCallArgs):
                    out[-1] = ToolCallArgs(d.index, last.fragment + text)  # type: ignore[union-attr]
                else:
                    out[-1] = type(d)(last.text + text)  # type: ignore[union-attr]
                continue
        out.append(d)
    return out
