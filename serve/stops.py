"""Stop strings over streamed text.

Text arrives in arbitrary pieces, so a stop string may straddle pieces. The matcher emits
text only once it cannot be the start of a stop string: it holds back the longest suffix
of what it has seen that is a proper prefix of some stop, and on a match emits the text
before it and nothing after (the stop string itself is not returned, as in OpenAI's API).

"The" match is the one that completes first in the stream (the earliest end; at equal
ends, the longer stop), which is what a generator checking after every character would
see. It does not depend on how the text was cut into pieces: with stops "c" and "aca",
"aca" stops after "a" whether it arrives whole or as "ac" + "a".

Hidden pieces (``feed(text, visible=False)``: the text of special tokens that
``skip_special_tokens`` keeps out of the output) take part in matching but are never
emitted, so ``stop: ["<|im_start|>"]`` fires on that token while the content never shows it.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopMatcher:
    """Feeds text pieces through a set of stop strings (empty strings are ignored)."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(sorted({s for s in stops if s}, key=len))
        self._held = ""
        self._hidden: list[tuple[int, int]] = []  # [start, end) spans of _held never emitted
        self.stopped = False
        self.matched: str | None = None  # the stop string that matched

    def feed(self, text: str, *, visible: bool = True) -> tuple[str, bool]:
        """Adds a piece; returns (text safe to emit, whether a stop string matched).

        A piece fed with ``visible=False`` is matched against but never part of the text
        returned. After a match every call returns ("", True).
        """
        if self.stopped:
            return "", True
        if not self._stops:
            return (text if visible else ""), False
        if not visible and text:
            self._hidden.append((len(self._held), len(self._held) + len(text)))
        buf = self._held + text
        match = min(((i + len(s), i, s) for s in self._stops if (i := buf.find(s)) >= 0), default=None)
        if match is not None:
            self.stopped = True
            self.matched = match[2]
            out = self._visible(buf, match[1])
            self._held, self._hidden = "", []
            return out, True
        cut = len(buf) - self._partial_match_len(buf)
        out = self._visible(buf, cut)
        self._held = buf[cut:]
        self._hidden = [(max(a - cut, 0), b - cut) for a, b in self._hidden if b > cut]
        return out, False

    def _visible(self, buf: str, end: int) -> str:
        """``buf[:end]`` without the hidden spans."""
        if not self._hidden:
            return buf[:end]
        out, pos = [], 0
        for a, b in self._hidden:
            out.append(buf[pos:min(a, end)])
            pos = max(pos, b)
        out.append(buf[pos:end])
        return "".join(out)

    def flush(self) -> str:
        """Text held back as a possible stop start, once generation ends otherwise."""
        held = self._visible(self._held, len(self._held))
        self._held, self._hidden = "", []
        return "" if self.stopped else held

    def _partial_match_len(self, buf: str) -> int:
        """Length of the longest suffix of ``buf`` that is a proper prefix of a stop."""
        best = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(buf)), best, -1):
                if buf.endswith(stop[:k]):
                    best = k
                    break
        return best
