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

Two vLLM extensions change that:

- ``include_stop``: the stop string is part of the output (``include_stop_str_in_output``);
  text is then emitted as it comes (nothing needs holding back), the last few characters
  kept as context so that a stop straddling pieces is still found.
- ``feed(text, match=False)``: the text cannot end a stop (``min_tokens``: a stop string
  only counts once the output has more than that many tokens, as vLLM's detokenizer checks
  only the text of the tokens past it). A match counts only where it ends in text fed with
  ``match=True``, though it may begin earlier.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopMatcher:
    """Feeds text pieces through a set of stop strings (empty strings are ignored).

    Args:
        stops: the stop strings.
        include_stop: a match's stop string is part of the text returned (vLLM's
            ``include_stop_str_in_output``); otherwise the text ends before it.
    """

    def __init__(self, stops: Sequence[str], *, include_stop: bool = False) -> None:
        self._stops = tuple(sorted({s for s in stops if s}, key=len))
        self._include = include_stop
        # The tail that may begin a stop: `_held[:_sent]` was already returned (include_stop
        # only: context for a match that straddles pieces), the rest was not.
        self._held = ""
        self._sent = 0
        self._hidden: list[tuple[int, int]] = []  # [start, end) spans of _held never emitted
        self.stopped = False
        self.matched: str | None = None  # the stop string that matched
        # Absolute positions in everything fed (hidden pieces included): `fed` characters came
        # in; input before `kept` is settled as output (or hidden); after a match, `kept` is
        # where the output ends and nothing from it on is output.
        self.fed = 0
        self.kept = 0

    def feed(self, text: str, *, visible: bool = True, match: bool = True) -> tuple[str, bool]:
        """Adds a piece; returns (text safe to emit, whether a stop string matched).

        A piece fed with ``visible=False`` is matched against but never part of the text
        returned; one fed with ``match=False`` can be the start of a match but not its end.
        After a match every call returns ("", True).
        """
        if self.stopped:
            return "", True
        base = self.fed - len(self._held)  # where `self._held` (the buffer below) begins
        self.fed += len(text)
        if not self._stops:
            self.kept = self.fed
            return (text if visible else ""), False
        held = len(self._held)
        if not visible and text:
            self._hidden.append((held, held + len(text)))
        buf = self._held + text
        if match:
            # A match must end in the new text: the held tail alone holds none (it would have
            # matched when it came, or came with match=False).
            found = min(((i + len(s), i, s) for s in self._stops
                         if (i := buf.find(s, max(0, held - len(s) + 1))) >= 0), default=None)
            if found is not None:
                end, start, self.matched = found
                self.stopped = True
                out = self._visible(buf, self._sent, end if self._include else start)
                self.kept = base + (end if self._include else start)
                self._held, self._sent, self._hidden = "", 0, []
                return out, True
        keep = self._partial_match_len(buf)
        cut = len(buf) - keep
        if self._include:  # everything goes out now; the tail stays as context
            out = self._visible(buf, self._sent, len(buf))
            self._sent = keep
        else:
            out = self._visible(buf, self._sent, cut)
            self._sent = 0
        self._held = buf[cut:]
        self._hidden = [(max(a - cut, 0), b - cut) for a, b in self._hidden if b > cut]
        self.kept = self.fed - (len(self._held) - self._sent)
        return out, False

    def _visible(self, buf: str, start: int, end: int) -> str:
        """``buf[start:end]`` without the hidden spans."""
        if not self._hidden:
            return buf[start:end]
        out, pos = [], start
        for a, b in self._hidden:
            out.append(buf[pos:max(pos, min(a, end))])
            pos = max(pos, b)
        out.append(buf[pos:end])
        return "".join(out)

    def flush(self) -> str:
        """Text held back as a possible stop start, once generation ends otherwise."""
        held = self._visible(self._held, self._sent, len(self._held))
        self._held, self._sent, self._hidden = "", 0, []
        if self.stopped:
            return ""
        self.kept = self.fed
        return held

    def _partial_match_len(self, buf: str) -> int:
        """Length of the longest suffix of ``buf`` that is a proper prefix of a stop."""
        best = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(buf)), best, -1):
                if buf.endswith(stop[:k]):
                    best = k
                    break
        return best
