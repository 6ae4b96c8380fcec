"""Server-sent events, the one framer of every stream llorch writes: OpenAI's
(`data: <json>` per chunk, `data: [DONE]` last) and the named events of the Responses and
Anthropic Messages streams (`event: <type>` before the data). Format:
https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation
"""

from __future__ import annotations

import json
from typing import Any

SSE_DONE = b"data: [DONE]\n\n"


def dumps(obj: Any) -> str:
    """Compact JSON (no spaces after separators), non-ASCII written as is (UTF-8 on the wire)."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def sse(obj: Any, *, event: str | None = None) -> bytes:
    """One event: `obj` as compact JSON on one `data:` line, after an `event:` line when
    `event` names it; UTF-8 bytes ending in the blank line that dispatches it."""
    head = f"event: {event}\n" if event is not None else ""
    return f"{head}data: {dumps(obj)}\n\n".encode()
