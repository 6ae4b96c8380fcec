"""The `<think>…</think>` block of reasoning models (Qwen3, DeepSeek-R1 distills, SmolLM3,
QwQ): its text becomes `ReasoningDelta`s, what follows it goes to the answer parser.

Two ways a template starts the block: the model writes `<think>` itself (Qwen3), or the
generation prompt already ends with `<think>` and the model starts inside it
(DeepSeek-R1 distills) — then `start_inside=True`. A `<think>` is only recognised at the
start of the output; a `</think>` ends the block wherever it comes.
"""

from __future__ import annotations

from serve.parsers.deltas import Delta, ReasoningDelta

OPEN, CLOSE = "<think>", "</think>"
_WS = " \t\r\n"


class ReasoningSplitter:
    """Splits text into reasoning and the rest.

    `feed(text)` returns `(deltas, answer_text)`: ReasoningDeltas for the block, and the
    text after it (empty while inside the block). Blanks right after `</think>` are
    dropped. Tags are held back until complete, so they never reach either side.
    """

    def __init__(self, *, start_inside: bool) -> None:
        self.state = "inside" if start_inside else "start"  # start | inside | after
        self.buf = ""
        self.skip_blank = False

    def feed(self, text: str) -> tuple[list[Delta], str]:
        self.buf += text
        if self.state == "start":
            stripped = self.buf.lstrip(_WS)
            if stripped.startswith(OPEN):
                self.state, self.buf = "inside", stripped[len(OPEN):]
            elif OPEN.startswith(stripped):
                return [], ""  # blanks or part of "<think>": wait
            else:
                self.state = "after"
        if self.state == "inside":
            i = self.buf.find(CLOSE)
            if i < 0:
                keep = _partial(self.buf, CLOSE)
                out, self.buf = self.buf[:len(self.buf) - keep], self.buf[len(self.buf) - keep:]
                return ([ReasoningDelta(out)] if out else []), ""
            reasoning, self.buf = self.buf[:i], self.buf[i + len(CLOSE):]
            self.state, self.skip_blank = "after", True
            return ([ReasoningDelta(reasoning)] if reasoning else []), self._answer()
        return [], self._answer()

    def _answer(self) -> str:
        text, self.buf = self.buf, ""
        if self.skip_blank:
            text = text.lstrip(_WS)
            self.skip_blank = not text
        return text

    def finish(self) -> tuple[list[Delta], str]:
        """Flushes held text: an unclosed block's tail is reasoning; a lone partial
        `<think>` at the start is answer text."""
        text, self.buf = self.buf, ""
        if self.state == "inside":
            return ([ReasoningDelta(text)] if text else []), ""
        if self.state == "start":
            return [], text
        return [], "" if self.skip_blank else text


def _partial(text: str, tag: str) -> int:
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0
