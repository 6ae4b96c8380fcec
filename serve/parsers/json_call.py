"""An incremental scanner for one JSON call object, `{"name": "f", "arguments": {…}}`, as
its text arrives: it tells the function name as soon as its string closes and the span of
the arguments object while it is still being written, so argument fragments can stream.

It tracks only what it needs (nesting depth, strings and escapes, the top-level key being
read); it does not validate the JSON beyond that. Keys other than the name and argument
keys are skipped.
"""

from __future__ import annotations

import json
from typing import Any

_WS = " \t\r\n"


class NotACall(Exception):
    """The text is not the start of a call object (e.g. the model wrote prose after a
    trigger); the caller treats what it buffered as plain text."""


class JsonCallScanner:
    """Scans `{"name": …, <args key>: …}` character by character.

    Args:
        name_keys: keys holding the function name ("name").
        args_keys: keys holding the arguments ("arguments", "parameters").

    Attributes after `feed`: `name` (str once its string closed), `done` (the object
    closed), `raw` (all consumed text).
    """

    def __init__(self, *, name_keys: tuple[str, ...] = ("name",),
                 args_keys: tuple[str, ...] = ("arguments", "parameters")) -> None:
        self.name_keys, self.args_keys = name_keys, args_keys
        self.raw = ""
        self.depth = 0
        self.in_str = False
        self.esc = False
        self.expect = "open"  # open | key | colon | value | in_value | comma
        self.key: str | None = None
        self.value_start = 0
        self.value_kind = ""  # str | container | scalar
        self.name: str | None = None
        self.args_start: int | None = None  # index in raw of the arguments value
        self.args_end: int | None = None
        self.args_kind = ""
        self.done = False

    def feed(self, text: str) -> int:
        """Consumes `text` up to the end of the object; returns how many characters it used.

        Raises:
            NotACall: the first non-blank character is not `{`, or a top-level key is not
                followed by `:`.
        """
        for n, ch in enumerate(text):
            i = len(self.raw)
            self.raw += ch
            self._step(ch, i)
            if self.done:
                return n + 1
        return len(text)

    def _step(self, ch: str, i: int) -> None:
        if self.in_str:
            if self.esc:
                self.esc = False
            elif ch == "\\":
                self.esc = True
            elif ch == '"':
                self.in_str = False
                if self.depth == 1 and self.expect == "key":
                    self.key = _string(self.raw[self.value_start:i + 1], self.raw)
                    self.expect = "colon"
                elif self.depth == 1 and self.expect == "in_value" and self.value_kind == "str":
                    self._end_value(i + 1)
            return
        if self.expect == "open":
            if ch in _WS:
                return
            if ch != "{":
                raise NotACall(self.raw)
            self.depth, self.expect = 1, "key"
            return
        if ch in _WS:
            if self.depth == 1 and self.expect == "in_value" and self.value_kind == "scalar":
                self._end_value(i)
            return
        if self.depth == 1:
            if self.expect == "key":
                if ch == '"':
                    self.in_str, self.value_start = True, i
                elif ch != "}":
                    raise NotACall(self.raw)
            elif self.expect == "colon":
                if ch != ":":
                    raise NotACall(self.raw)
                self.expect = "value"
                return
            elif self.expect == "value":
                self.expect, self.value_start = "in_value", i
                self.value_kind = "str" if ch == '"' else "container" if ch in "{[" else "scalar"
                if self.key in self.args_keys:
                    self.args_start, self.args_kind = i, self.value_kind
                if ch == '"':
                    self.in_str = True
                    return
            elif ch == ",":
                if self.expect == "in_value":
                    self._end_value(i)
                self.expect = "key"
                return
        if ch == '"':
            self.in_str = True
        elif ch in "{[":
            self.depth += 1
        elif ch in "}]":
            self.depth -= 1
            if self.depth == 1 and self.expect == "in_value" and self.value_kind == "container":
                self._end_value(i + 1)
            elif self.depth == 0:
                if self.expect == "in_value":
                    self._end_value(i)
                self.done = True

    def _end_value(self, end: int) -> None:
        value = self.raw[self.value_start:end]
        if self.key in self.name_keys and self.value_kind == "str" and self.name is None:
            self.name = _string(value, self.raw)
        if self.key in self.args_keys and self.args_start == self.value_start:
            self.args_end = end
        self.expect = "comma"

    def streamable_args(self) -> str | None:
        """The arguments text written so far, while it is an object being written (so it
        can stream); None for arguments given as a JSON string or a scalar."""
        if self.args_start is None or self.args_kind != "container":
            return None
        return self.raw[self.args_start:self.args_end if self.args_end is not None else len(self.raw)]

    def final_args(self) -> str:
        """The whole arguments text once the object closed: an object's text as written, a
        JSON string's decoded content, `{}` when absent or null."""
        if self.args_start is None or self.args_end is None:
            return "{}"
        value = self.raw[self.args_start:self.args_end]
        if self.args_kind == "str":
            try:
                return json.loads(value)
            except ValueError:
                return value
        if self.args_kind == "scalar":
            return "{}" if value == "null" else value
        return value


def _string(literal: str, raw: str) -> str:
    """A JSON string literal's value; a bad escape means this is no call."""
    try:
        return json.loads(literal)
    except ValueError:
        raise NotACall(raw) from None


def partial_json_object(text: str) -> dict[str, Any]:
    """The object a (possibly cut) JSON object text holds so far, as Anthropic's SDK reads a
    streamed `input_json_delta` (jiter's `partial_mode=True`): containers still open are
    closed, and a member whose key or value is unfinished (an open string, `tr` of `true`)
    is left out. Text that is no object prefix at all gives `{}`.

    Args:
        text: a tool call's arguments as written, e.g. `{"city": "Pa` → `{}`,
            `{"a": 1, "b": [2, "x` → `{"a": 1, "b": [2]}`.
    """
    try:
        value = json.loads(text)
        return value if isinstance(value, dict) else {}
    except ValueError:
        pass
    # Positions where the text may be cut and closed: after a finished value or an opener,
    # outside strings; with the closers the open containers need there.
    stack: list[str] = []
    in_str = esc = False
    cuts: list[tuple[int, str]] = []
    for i, ch in enumerate(text):
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
                cuts.append((i + 1, "".join(reversed(stack))))
            continue
        if ch == '"':
            in_str = True
        elif ch in "{[":
            stack.append("}" if ch == "{" else "]")
            cuts.append((i + 1, "".join(reversed(stack))))
        elif ch in "}]":
            if stack:
                stack.pop()
            cuts.append((i + 1, "".join(reversed(stack))))
        elif ch.isalnum():
            cuts.append((i + 1, "".join(reversed(stack))))
    for end, closers in reversed(cuts):
        try:
            value = json.loads(text[:end] + closers)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return {}
