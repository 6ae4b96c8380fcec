"""Incremental tool-call parsers, one per output format a model family was trained on.

```
family       what the model writes                                   trigger
hermes       <tool_call>{"name": "f", "arguments": {…}}</tool_call>  "<tool_call>" anywhere
             (Hermes 2/3, Qwen2.5, Qwen3, and llorch's generic format)
llama3_json  {"name": "f", "parameters": {…}}; {…}                   "{" at the start, or
             (Llama 3.1-3.3; <|python_tag|> is a special token)       "<|python_tag|>"
mistral      [TOOL_CALLS][{"name": "f", "arguments": {…}}, …]        "[TOOL_CALLS]" anywhere,
             or [TOOL_CALLS]f[ARGS]{…} (newer tokenizers)             "[{" at the start
pythonic     [f(a=1, b="x"), g()]   (Llama 3.2 / 4, ToolACE)         "[" at the start
```

Formats as published by the families' chat templates and read by vLLM's and llama.cpp's
parsers. The engine decodes with special tokens skipped, so a special-token trigger
(`[TOOL_CALLS]`, `<|python_tag|>`) may be missing from the text: the start-of-output
triggers cover that case.

Text before a call goes out as `TextDelta`; whitespace after a call is dropped unless more
text follows. Markup never reaches the text: a trigger is held back until it is complete;
text after a trigger that is not a call (prose, broken JSON) goes out as text with its
trigger; a call cut short before its name (max_tokens, a stop string) is dropped, and so is
a trigger cut short at the end ("<tool_"; a lone "<" stays text unless calls came before or
the grammar allows only calls).
A call cut after its name is kept, with the arguments written so far, and counted in
`open_calls` (the renderers then report the cut, never a finished call). JSON calls stream their arguments while they are written; pythonic calls are
emitted when the list closes.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Callable
from typing import Any

from serve.parsers.deltas import Delta, TextDelta, ToolCallArgs, ToolCallStart
from serve.parsers.json_call import JsonCallScanner, NotACall

_WS = " \t\r\n"


class _Calls:
    """Numbers the calls of one choice and gives them ids."""

    def __init__(self, new_id: Callable[[], str]) -> None:
        self.new_id = new_id
        self.count = 0
        self.complete: set[int] = set()  # calls whose arguments were written to the end

    def start(self, name: str) -> ToolCallStart:
        self.count += 1
        return ToolCallStart(self.count - 1, self.new_id(), name)

    def close(self, index: int) -> None:
        """Call `index`'s arguments are whole (a complete JSON value)."""
        self.complete.add(index)


class _JsonCall:
    """One JSON call object → ToolCallStart as soon as the name is known, then argument
    fragments as they are written."""

    def __init__(self, calls: _Calls) -> None:
        self.calls = calls
        self.scan = JsonCallScanner()
        self.index: int | None = None
        self.sent = 0  # argument characters already emitted
        self.broken = False

    def feed(self, text: str) -> tuple[list[Delta], int]:
        """Returns the deltas and how much of `text` belonged to this object (raises
        NotACall before any delta if it is not a call)."""
        before = len(self.scan.raw)
        try:
            used = self.scan.feed(text)
        except NotACall:
            if self.scan.name is None:
                raise
            # Broken JSON after the name: the call ends where the JSON broke (not whole).
            used, self.scan.done, self.broken = len(self.scan.raw) - before, True, True
        out: list[Delta] = []
        if self.index is None and self.scan.name is not None:
            start = self.calls.start(self.scan.name)
            self.index = start.index
            out.append(start)
        if self.index is not None:
            if self.scan.args_kind == "container":
                args = self.scan.streamable_args() or ""
                out.append(ToolCallArgs(self.index, args[self.sent:]))
                self.sent = len(args)
            elif self.scan.done:
                out.append(ToolCallArgs(self.index, self.scan.final_args()))
            if self.scan.done and not self.broken:
                self.calls.close(self.index)
        if self.scan.done and self.index is None:
            raise NotACall(self.scan.raw)  # an object without a name
        return [d for d in out if not isinstance(d, ToolCallArgs) or d.fragment], used

    def finish(self) -> list[Delta]:
        """The text ended inside the object (e.g. max_tokens): a started call keeps what it
        has; a call cut before its name is dropped (it was markup, not text)."""
        return []


class _Body:
    """What follows a trigger; `feed` returns (deltas, leftover text once the body ended,
    else None)."""

    def feed(self, text: str) -> tuple[list[Delta], str | None]:
        raise NotImplementedError

    def finish(self) -> list[Delta]:
        return []


class _TaggedJsonBody(_Body):
    """`{…}</tool_call>` after `<tool_call>`: one object (or a list of them, as SmolLM2 and
    some Hermes fine-tunes write), then the closing tag."""

    def __init__(self, calls: _Calls, end_tag: str) -> None:
        self.calls, self.end_tag = calls, end_tag
        self.inner: _JsonCall | _JsonListBody | None = None
        self.head = ""  # blanks before the first character
        self.tail: str | None = None  # text after the object, while it may be the closing tag

    def feed(self, text: str) -> tuple[list[Delta], str | None]:
        out: list[Delta] = []
        if self.inner is None:
            self.head += text
            text = self.head.lstrip(_WS)
            if not text:
                return out, None
            self.inner = _JsonListBody(self.calls, ",", "]") if text[0] == "[" else _JsonCall(self.calls)
            if text[0] == "[":
                text = text[1:]
        if self.tail is None:
            if isinstance(self.inner, _JsonCall):
                out, used = self.inner.feed(text)
                text = text[used:]
                if not self.inner.scan.done:
                    return out, None
            else:
                out, rest = self.inner.feed(text)
                if rest is None:
                    return out, None
                text = rest
            self.tail = ""
        self.tail += text
        stripped = self.tail.lstrip(_WS)
        if stripped.startswith(self.end_tag):
            return out, stripped[len(self.end_tag):]
        if self.end_tag.startswith(stripped):
            return out, None  # maybe the tag, still arriving
        return out, stripped  # no closing tag: the rest is text

    def finish(self) -> list[Delta]:
        return self.inner.finish() if self.inner is not None else []


class _JsonListBody(_Body):
    """Objects separated by `sep` (Llama's `;`, Mistral's `,`), optionally closed by `close`
    (Mistral's `]`); the body starts just before the first object."""

    def __init__(self, calls: _Calls, sep: str, close: str = "") -> None:
        self.calls, self.sep, self.close = calls, sep, close
        self.call: _JsonCall | None = _JsonCall(calls)
        self.between = ""
        self.any = False

    def feed(self, text: str) -> tuple[list[Delta], str | None]:
        out: list[Delta] = []
        while True:
            if self.call is not None:
                try:
                    deltas, used = self.call.feed(text)
                except NotACall:
                    if not self.any:
                        raise
                    return out, self.call.scan.raw  # a later item is not a call: text
                out += deltas
                text = text[used:]
                if not self.call.scan.done:
                    return out, None
                self.any, self.call = True, None
            self.between += text
            text = ""
            s = self.between.lstrip(_WS)
            if not s:
                return out, None
            if s[0] == self.sep:
                self.call, text, self.between = _JsonCall(self.calls), s[1:], ""
                continue
            if self.close and s[0] == self.close:
                return out, s[1:]
            return out, s

    def finish(self) -> list[Delta]:
        return [] if self.call is None else self.call.finish()


class _MistralBody(_Body):
    """After `[TOOL_CALLS]`: a JSON list of call objects, or `name[ARGS]{…}`."""

    def __init__(self, calls: _Calls) -> None:
        self.calls = calls
        self.inner: _Body | None = None
        self.head = ""

    def feed(self, text: str) -> tuple[list[Delta], str | None]:
        if self.inner is None:
            self.head += text
            s = self.head.lstrip(_WS)
            if not s:
                return [], None
            if s[0] == "[":
                self.inner = _JsonListBody(self.calls, ",", "]")
                return self.inner.feed(s[1:])
            if "[ARGS]" not in s:
                if re.fullmatch(r"[\w.-]*(\[(A(R(G(S)?)?)?)?)?", s):
                    return [], None  # a name, maybe followed by part of "[ARGS]"
                raise NotACall(self.head)
            name, _, rest = s.partition("[ARGS]")
            if not re.fullmatch(r"[\w.-]+", name):
                raise NotACall(self.head)
            self.inner = _ArgsBody(self.calls, name)
            return self.inner.feed(rest)
        return self.inner.feed(text)

    def finish(self) -> list[Delta]:
        # Cut inside a name (before "[ARGS]"): markup, dropped.
        return [] if self.inner is None else self.inner.finish()


class _ArgsBody(_Body):
    """A known name, then its JSON arguments value (Mistral's `[ARGS]` form)."""

    def __init__(self, calls: _Calls, name: str) -> None:
        self.calls = calls
        self.start = calls.start(name)
        self.scan = JsonCallScanner(name_keys=(), args_keys=())
        self.started = False
        self.begun = False  # the value's first character was seen

    def feed(self, text: str) -> tuple[list[Delta], str | None]:
        out: list[Delta] = [] if self.started else [self.start]
        self.started = True
        before = len(self.scan.raw)
        try:
            used = self.scan.feed(text)
        except NotACall:  # not an object: empty arguments, the rest is text
            self.calls.close(self.start.index)
            rest = self.scan.raw + text[len(self.scan.raw) - before:]
            return out + [ToolCallArgs(self.start.index, "{}")], rest.lstrip(_WS)
        fragment = text[:used]
        if not self.begun:
            fragment = fragment.lstrip(_WS)
            self.begun = bool(fragment)
        if fragment:
            out.append(ToolCallArgs(self.start.index, fragment))
        if self.scan.done:
            self.calls.close(self.start.index)
        return out, (text[used:] if self.scan.done else None)

    def finish(self) -> list[Delta]:
        if self.started:
            return []
        self.calls.close(self.start.index)
        return [self.start, ToolCallArgs(self.start.index, "{}")]


class _PythonicBody(_Body):
    """`[f(a=1), g(b="x")]`: held until the list closes, then parsed as Python literals."""

    def __init__(self, calls: _Calls) -> None:
        self.calls = calls
        self.raw = ""
        self.depth = 0
        self.quote = ""
        self.esc = False

    def feed(self, text: str) -> tuple[list[Delta], str | None]:
        for n, ch in enumerate(text):
            self.raw += ch
            if self.quote:
                if self.esc:
                    self.esc = False
                elif ch == "\\":
                    self.esc = True
                elif ch == self.quote:
                    self.quote = ""
            elif ch in "'\"":
                self.quote = ch
            elif ch in "([{":
                self.depth += 1
            elif ch in ")]}":
                self.depth -= 1
                if self.depth == 0:
                    return self._parse(), text[n + 1:]
        return [], None

    def _parse(self) -> list[Delta]:
        try:
            tree = ast.parse(self.raw, mode="eval").body
            if not isinstance(tree, ast.List) or not tree.elts:
                raise NotACall(self.raw)
            parsed = []
            for call in tree.elts:
                if not isinstance(call, ast.Call) or call.args or any(kw.arg is None for kw in call.keywords):
                    raise NotACall(self.raw)  # positional or ** arguments: not a call we can name
                name = ast.unparse(call.func)
                if not re.fullmatch(r"[\w.-]+", name):
                    raise NotACall(self.raw)
                args = {kw.arg: _literal(kw.value) for kw in call.keywords}
                parsed.append((name, json.dumps(args, ensure_ascii=False)))
        except (SyntaxError, ValueError, TypeError, RecursionError):
            raise NotACall(self.raw) from None
        out: list[Delta] = []
        for name, args in parsed:
            start = self.calls.start(name)
            self.calls.close(start.index)
            out += [start, ToolCallArgs(start.index, args)]
        return out

    def finish(self) -> list[Delta]:
        if re.match(r"\[\s*[A-Za-z_][\w.]*\(", self.raw):
            return []  # a call list cut short: markup, dropped
        raise NotACall(self.raw)  # "[1" and the like: text


_JSON_NAMES = {"true": True, "false": False, "null": None, "True": True, "False": False, "None": None}


def _literal(node: ast.expr) -> Any:
    """A Python literal, also spelled the JSON way (`true`, `null`): what pythonic models
    and llorch's pythonic grammar write. Raises ValueError for anything else."""
    if isinstance(node, ast.Name) and node.id in _JSON_NAMES:
        return _JSON_NAMES[node.id]
    if isinstance(node, ast.List | ast.Tuple):
        return [_literal(e) for e in node.elts]
    if isinstance(node, ast.Dict):
        if any(k is None for k in node.keys):
            raise ValueError("** in a dict")
        return {_literal(k): _literal(v) for k, v in zip(node.keys, node.values, strict=True)}  # type: ignore[arg-type]
    return ast.literal_eval(node)


class ToolCallParser:
    """Text → TextDelta / ToolCallStart / ToolCallArgs for one family (see the module doc).

    Args:
        family: one of `TOOL_PARSERS`.
        new_id: makes a call id (OpenAI's `call_…`; Mistral templates want 9 alphanumerics).
        calls_only: the grammar lets the output be nothing but calls (tool_choice "required"
            or named), so a trigger cut short at the end is markup however short (a lone "<").
    """

    def __init__(self, family: str, new_id: Callable[[], str], *, calls_only: bool = False) -> None:
        if family not in TOOL_PARSERS:
            raise ValueError(f"unknown tool-call parser {family!r}; choose from {', '.join(TOOL_PARSERS)}")
        self.family = family
        self.calls_only = calls_only
        self.calls = _Calls(new_id)
        self.buf = ""
        self.at_start = True  # only blanks so far: start-of-output triggers apply
        self.after_call = False  # blanks after a call are held back
        self.body: _Body | None = None
        self.trigger = ""
        self.body_text = ""  # what the body consumed, for the NotACall fallback
        triggers, starts = _TRIGGERS[family]
        self.triggers: tuple[str, ...] = triggers
        self.start_triggers: tuple[str, ...] = starts

    def _new_body(self, trigger: str) -> tuple[_Body, str]:
        """The body for `trigger` and the part of the trigger the body must see."""
        f = self.family
        if f in ("hermes", "generic"):
            return _TaggedJsonBody(self.calls, "</tool_call>"), ""
        if f == "llama3_json":
            return _JsonListBody(self.calls, ";"), "{" if trigger == "{" else ""
        if f == "mistral":
            return _MistralBody(self.calls), "[{" if trigger == "[{" else ""
        return _PythonicBody(self.calls), "[" if trigger == "[" else ""

    def feed(self, text: str) -> list[Delta]:
        """Parses the next piece of the choice's text."""
        self.buf += text
        out: list[Delta] = []
        while self.buf:
            if self.body is not None:
                chunk, self.buf = self.buf, ""
                self.body_text += chunk
                try:
                    deltas, rest = self.body.feed(chunk)
                except NotACall:
                    out += self._not_a_call()
                    continue
                out += deltas
                if rest is None:
                    return out
                self.body, self.buf, self.after_call = None, rest, True
                continue
            if not self._scan_text(out):
                return out
        return out

    def _scan_text(self, out: list[Delta]) -> bool:
        """Text mode: emit text up to a trigger (entering its body) or up to a possible
        partial trigger (held). Returns whether the buffer should be looked at again."""
        buf = self.buf
        if self.at_start or self.after_call:
            stripped = buf.lstrip(_WS)
            if not stripped:
                return False  # blanks: held until we know what follows
            if self.at_start:
                for trig in self.start_triggers:
                    if stripped.startswith(trig):
                        return self._enter(out, "", trig, stripped[len(trig):])
                    if trig.startswith(stripped):
                        return False
                self.at_start = False
            if self.after_call:
                buf = stripped
                self.after_call = False
        best = None
        for trig in self.triggers:
            i = buf.find(trig)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, trig)
        if best is not None:
            i, trig = best
            return self._enter(out, buf[:i], trig, buf[i + len(trig):])
        hold = _partial_suffix(buf, self.triggers)
        emit = buf[:len(buf) - hold]
        if emit:
            out.append(TextDelta(emit))
        self.buf = buf[len(emit):]
        return False

    def _enter(self, out: list[Delta], before: str, trigger: str, rest: str) -> bool:
        if before:
            out.append(TextDelta(before))
        self.at_start = False
        self.body, keep = self._new_body(trigger)
        self.trigger = trigger[:len(trigger) - len(keep)]
        self.body_text = ""
        self.buf = keep + rest
        return True

    def _not_a_call(self) -> list[Delta]:
        """The text after a trigger is no call: the trigger is text, and what followed it
        is scanned again as text (so a later real call is still found)."""
        self.buf = self.body_text + self.buf
        self.body, self.after_call, self.at_start = None, False, False
        return [TextDelta(self.trigger)] if self.trigger else []

    def finish(self) -> list[Delta]:
        """The choice ended: flush what was held back."""
        out: list[Delta] = []
        while self.body is not None:
            try:
                out += self.body.finish()
                self.body = None
            except NotACall:
                if self.calls_only:  # the grammar allowed nothing but a call: one cut short
                    self.body, self.buf = None, ""
                    break
                out += self._not_a_call()
                out += self.feed("")
        text = "" if self.after_call else self.buf
        hold = _partial_suffix(text, self.triggers)
        if hold >= 2 or (hold and (self.calls.count or self.calls_only)):
            text = text[:len(text) - hold]  # a trigger cut short (max_tokens, a stop string): markup
        if text:
            out.append(TextDelta(text))
        self.buf = ""
        return out

    @property
    def num_calls(self) -> int:
        return self.calls.count

    @property
    def open_calls(self) -> int:
        """Calls started whose arguments did not come to an end (the output was cut)."""
        return self.calls.count - len(self.calls.complete)


def _partial_suffix(text: str, triggers: tuple[str, ...]) -> int:
    """The length of the longest suffix of `text` that is a proper prefix of a trigger."""
    best = 0
    for trig in triggers:
        for k in range(min(len(trig) - 1, len(text)), best, -1):
            if text.endswith(trig[:k]):
                best = k
                break
    return best


# family → (triggers anywhere, triggers only at the start of the output)
_TRIGGERS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "hermes": (("<tool_call>",), ()),
    "generic": (("<tool_call>",), ()),
    "llama3_json": (("<|python_tag|>",), ("{",)),
    "mistral": (("[TOOL_CALLS]",), ("[{",)),
    "pythonic": (("<|python_start|>",), ("[",)),
}
TOOL_PARSERS = tuple(_TRIGGERS)
