"""Error `param`s of a translated request, named as the client's own route spells them.

The Responses and Messages adapters translate their bodies into a chat-completions body,
so errors found later (validation, grammars, the chat template) name chat fields:
`response_format`, `tools.[0].function.parameters`, `messages.[3].tool_calls.[0]...`.
`Renamer` maps them back (`output_config.format`, `tools.[0].input_schema`,
`messages.[1].content.[0].input`) by longest matching prefix.

Translated messages carry their origin while the adapter builds the body: `ORIGIN` (the
route param of the message, e.g. `input.[2]` or `system`) and `CALL_ORIGINS` (one route
param per tool call); `Renamer.take_origins` removes both keys from the messages.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from serve.errors import APIError

ORIGIN = "_origin"
CALL_ORIGINS = "_call_origins"


class Renamer:
    """Chat param → route param by longest prefix (`a.b` matches `a.b` and `a.b.…`).

    Args:
        pairs: `(chat prefix, route prefix)`; the rest of a matched param is kept.
    """

    def __init__(self, pairs: Iterable[tuple[str, str]] = ()) -> None:
        self.pairs = dict(pairs)

    def add(self, chat: str, route: str) -> None:
        self.pairs[chat] = route

    def take_origins(self, messages: list[dict[str, Any]], *, fields: dict[str, str], calls: dict[str, str],
                     default: str) -> None:
        """Record the messages' origins (and remove the marker keys).

        Args:
            messages: the chat messages, in body order.
            fields: chat message field → the route's name for it under the origin
                (e.g. Responses' tool result `content` → `output`).
            calls: chat tool-call field → the route's name under the call's origin
                (e.g. `function.arguments` → `input`).
            default: the origin of a message without a marker (history, a string input).
        """
        for k, message in enumerate(messages):
            origin = message.pop(ORIGIN, default)
            call_origins = message.pop(CALL_ORIGINS, None) or []
            base = f"messages.[{k}]"
            self.add(base, origin)
            for name, route in fields.items():
                if route != name:
                    self.add(f"{base}.{name}", f"{origin}.{route}" if route else origin)
            for j, where in enumerate(call_origins):
                self.add(f"{base}.tool_calls.[{j}]", where)
                for name, route in calls.items():
                    self.add(f"{base}.tool_calls.[{j}].{name}", f"{where}.{route}" if route else where)

    def __call__(self, param: str) -> str:
        key = param
        while True:
            if key in self.pairs:
                return self.pairs[key] + param[len(key):]
            cut = key.rfind(".")
            if cut < 0:
                return param
            key = key[:cut]

    def rename(self, exc: APIError) -> APIError:
        """`exc` with its `param` (and the param's mentions in the message) renamed."""
        old = exc.param
        if old:
            new = self(old)
            if new != old:
                exc.param = new
                exc.message = exc.message.replace(f"'{old}", f"'{new}").replace(f"{old}:", f"{new}:")
        return exc
