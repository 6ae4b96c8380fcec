"""Hand-made engine events and a scripted `ChoiceParser` for renderer unit tests: the
renderers see exactly the delta sequences a tool-call / reasoning parser would produce."""

from __future__ import annotations

import json
from collections.abc import Sequence

from serve.events import ChoiceOutput, Event, TokenLogprob, Usage
from serve.parsers import Delta, ToolCallArgs, ToolCallStart


class ScriptedParser:
    """`feed` returns the next scripted list of deltas (whatever the text); `finish` the tail.
    A scripted call is whole when its arguments joined are JSON (`calls_finished`)."""

    def __init__(self, steps: Sequence[Sequence[Delta]], tail: Sequence[Delta] = ()) -> None:
        self.steps = [list(s) for s in steps]
        self.tail = list(tail)
        self.args: dict[int, str] = {}

    def _seen(self, deltas: list[Delta]) -> list[Delta]:
        for d in deltas:
            if isinstance(d, ToolCallStart):
                self.args[d.index] = ""
            elif isinstance(d, ToolCallArgs):
                self.args[d.index] += d.fragment
        return deltas

    def feed(self, text: str) -> list[Delta]:
        return self._seen(self.steps.pop(0) if self.steps else [])

    def finish(self) -> list[Delta]:
        return self._seen(list(self.tail))

    @property
    def open_calls(self) -> int:
        def whole(args: str) -> bool:
            try:
                json.loads(args)
            except ValueError:
                return False
            return True
        return sum(not whole(a) for a in self.args.values())

    @property
    def calls_finished(self) -> bool:
        return bool(self.args) and self.open_calls == 0


USAGE = Usage(prompt_tokens=10, completion_tokens=0, cached_tokens=4)


def events(n: int, finish: str = "stop", *, stop_sequence: str | None = None, logprobs: bool = False,
           usage: Usage = USAGE) -> list[Event]:
    """`n` one-token events (token ids 100, 101, …; text "t0", "t1", …), the first one
    carrying `cached_tokens`, the last one finished with `finish` and carrying usage."""
    out = []
    for i in range(n):
        last = i == n - 1
        lps = (TokenLogprob(100 + i, -0.5, ((100 + i, -0.5), (7, -1.5))),) if logprobs else None
        choice = ChoiceOutput(0, f"t{i}", (100 + i,), lps, finish if last else None,
                              stop_sequence if last else None)
        u = Usage(usage.prompt_tokens, n, usage.cached_tokens) if last else None
        # the engine tells the prompt's cached tokens on the first event too
        out.append(Event(choices=(choice,), usage=u, cached_tokens=usage.cached_tokens if i == 0 else None))
    return out


def token_text(token_id: int) -> str:
    return f"<{token_id}>"
