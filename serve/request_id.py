"""Request ids on every HTTP response, where the official SDKs read them.

The `openai` SDK exposes the `x-request-id` header as `response._request_id` (and logs it),
the `anthropic` SDK the `request-id` header as `message._request_id`; both services send one
on every response, errors included, for a user to quote in a bug report. This middleware sets
both headers to one id: the client's own `X-Request-Id` where it sent a sane one (a tracing
proxy's, as vLLM and nginx pass through), else `req_` + 32 hex digits. It is the outermost
layer, so 404s, 405s, 415s and the SSE streams carry it too, and it leaves the id in
`request.state.request_id` for the Messages route's error bodies (Anthropic's `request_id`).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

_CLIENT_ID = re.compile(rb"[A-Za-z0-9._:/+=-]{1,128}")  # printable, no spaces, header-safe


def request_id(headers: list[tuple[bytes, bytes]]) -> bytes:
    """The id for one request: the client's `X-Request-Id` if it is 1-128 characters of
    `[A-Za-z0-9._:/+=-]`, else a fresh `req_<32 hex>` (ASCII bytes)."""
    for name, value in headers:
        if name.lower() == b"x-request-id" and _CLIENT_ID.fullmatch(value):
            return value
    return f"req_{uuid.uuid4().hex}".encode()


def without_x_request_id(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """`headers` less `x-request-id`: for a replica's answer crossing Ray Serve's HTTP proxy,
    whose own RequestIdMiddleware appends `X-Request-ID` (the id it put in the request, which
    the replica echoed), so the client would get the header twice (`"id, id"` to a client
    that joins repeats, as httpx and so both SDKs do). `request-id` stays."""
    return [(k, v) for k, v in headers if k.lower() != b"x-request-id"]


class RequestIdMiddleware:
    """ASGI middleware adding `x-request-id` and `request-id` (the same value) to every HTTP
    response start and the id (str) to the scope's state as `request_id`; non-HTTP scopes
    pass through."""

    def __init__(self, app: Callable[..., Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = request_id(scope.get("headers") or [])
        # `request.state.request_id` for bodies that quote it (Anthropic's error bodies)
        scope = {**scope, "state": {**(scope.get("state") or {}), "request_id": rid.decode()}}

        async def send_with_id(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers") or []
                           if k.lower() not in (b"x-request-id", b"request-id")]
                message = {**message, "headers": [*headers, (b"x-request-id", rid), (b"request-id", rid)]}
            await send(message)

        await self.app(scope, receive, send_with_id)
