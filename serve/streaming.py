"""Engine events → HTTP: one JSON body, or SSE chunks as the events arrive.

A stream only starts once the engine's first event is in, so anything that fails before the
first token still gets a proper HTTP status (503 for a queue timeout or a shutdown, 500
otherwise); later failures become a final `data: {"error": …}` event, then `data: [DONE]`
(the renderer's `fail` / `done`: other wire formats frame these their own way, and may ask
for a keep-alive `ping` after `heartbeat` quiet seconds). A client that disconnects cancels
its engine requests, which frees their slots.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import aclosing, asynccontextmanager
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from serve.errors import (
    GENERIC_SERVER_ERROR,
    APIError,
    RateLimitError,
    ServerError,
    ServiceUnavailableError,
)
from serve.events import QUEUE_FULL, QUEUE_TIMEOUT, SHUTTING_DOWN, Event, RequestStream
from serve.responses import Output

log = logging.getLogger("serve.streaming")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_RETRY_ELSEWHERE = (QUEUE_TIMEOUT, SHUTTING_DOWN)  # error codes answered with 503
RETRY_AFTER_S = 1  # what a 429 tells clients to wait


class _Merged:
    """The events of one or more RequestStreams (one per completions prompt) as (k, event)."""

    def __init__(self, streams: Sequence[RequestStream]) -> None:
        self.streams = list(streams)
        self._queue: asyncio.Queue[tuple[int, Event | None]] = asyncio.Queue()
        self._live = len(self.streams)
        self._tasks = []
        if len(self.streams) > 1:
            self._tasks = [asyncio.create_task(self._pump(k, s)) for k, s in enumerate(self.streams)]

    async def _pump(self, k: int, stream: RequestStream) -> None:
        try:
            async for event in stream:
                self._queue.put_nowait((k, event))
        finally:
            self._queue.put_nowait((k, None))

    def __aiter__(self) -> _Merged:
        return self

    async def __anext__(self) -> tuple[int, Event]:
        if not self._tasks:
            return 0, _checked(await self.streams[0].__anext__())
        while self._live:
            k, event = await self._queue.get()
            if event is not None:
                return k, _checked(event)
            self._live -= 1
        raise StopAsyncIteration

    def close(self) -> None:
        """Synchronous, so it is safe in `finally` under cancellation."""
        for task in self._tasks:
            task.cancel()
        for stream in self.streams:
            stream.cancel()


def _checked(event: Event) -> Event:
    """Errors the client should retry later or elsewhere are 503s (a full queue: 429), not
    500s."""
    if event.error is not None and event.error_code in _RETRY_ELSEWHERE:
        raise ServiceUnavailableError(event.error, code=event.error_code)
    if event.error is not None and event.error_code == QUEUE_FULL:
        raise RateLimitError(event.error, code="rate_limit_exceeded",
                             headers={"Retry-After": str(RETRY_AFTER_S)})
    return event


@asynccontextmanager
async def _cancel_on_disconnect(request: Request, events: _Merged) -> AsyncIterator[list[bool]]:
    """While the body is being waited for, a client disconnect cancels the requests."""
    disconnected = [False]

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        disconnected[0] = True
        events.close()

    task = asyncio.create_task(watch())
    try:
        yield disconnected
    finally:
        task.cancel()


async def respond(request: Request, streams: list[RequestStream], out: Output, *, streaming: bool) -> Response:
    """Wait for the engine's events and answer with them; cancels the streams on any exit
    that leaves them unread."""
    events = _Merged(streams)
    try:
        async with _cancel_on_disconnect(request, events) as disconnected:
            if not streaming:
                async for k, event in events:
                    out.add(k, event)
            else:  # wait for the first event: errors up to here keep their HTTP status
                first = await anext(events, None)
                if first is not None:
                    head = [*out.start(first[1]), *out.chunks(*first)]
    except BaseException:
        events.close()
        raise
    if disconnected[0]:
        return Response(status_code=499)  # nobody is listening; for the access log only
    if streaming and first is None:
        raise ServerError(GENERIC_SERVER_ERROR)  # the engine ended the request without a word
    if not streaming:
        return JSONResponse(out.response())
    return _SSEResponse(_sse(out, head, events), events)


class _SSEResponse(StreamingResponse):
    """Closes the engine streams however the response ends, even when the client left
    before the body iterator ever started (then its own `finally` never runs)."""

    def __init__(self, content: AsyncIterator[bytes], events: _Merged) -> None:
        super().__init__(content, media_type="text/event-stream", headers=SSE_HEADERS)
        self._events = events
        self.on_close: list[Callable[[], None]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._events.close()
            for fn in self.on_close:
                fn()


def when_sent(response: Response, fn: Callable[[], None]) -> None:
    """Call `fn()` once `response` (what `respond` returned) is over: at once for a JSON
    answer (the generation has ended), after the last byte of an event stream, or when its
    client leaves (even before the stream started)."""
    if isinstance(response, _SSEResponse):
        response.on_close.append(fn)
    else:
        fn()


async def _sse(out: Output, head: list[bytes], events: _Merged) -> AsyncIterator[bytes]:
    error: APIError | None = None
    try:
        for chunk in head:
            yield chunk
        async with aclosing(_with_heartbeat(events, out.heartbeat)) as items:
            async for item in items:
                if item is None:
                    yield out.ping()
                    continue
                for chunk in out.chunks(*item):
                    yield chunk
        for chunk in out.end():
            yield chunk
    except APIError as exc:
        error = exc
    except Exception:
        log.exception("error while streaming %s", out.id)
        error = ServerError(GENERIC_SERVER_ERROR)
    finally:
        events.close()  # a no-op when done; frees the slots when the client went away
    for chunk in out.fail(error) if error is not None else out.done():
        yield chunk


async def _with_heartbeat(events: _Merged, interval: float | None) -> AsyncIterator[tuple[int, Event] | None]:
    """The events, with a None after every `interval` seconds without one (None: never)."""
    if interval is None:
        async for item in events:
            yield item
        return
    pending: asyncio.Future = asyncio.ensure_future(anext(events, None))
    try:
        while True:
            done, _ = await asyncio.wait({pending}, timeout=interval)
            if not done:
                yield None
                continue
            item = pending.result()
            if item is None:
                return
            yield item
            pending = asyncio.ensure_future(anext(events, None))
    finally:
        pending.cancel()
