"""OpenAI response bodies and stream chunks, built from engine events (the wire-out half
of the protocol; `serve.protocol` is the wire-in half).

`ChatOutput` / `CompletionOutput` either accumulate a whole response (`add` → `response`)
or render SSE chunks as events arrive (`start`, `chunks` per event, `end`). Choice `i` of
prompt `k` has index `k * n + i` (completions may carry several prompts). Each chunk is
serialized once, compactly.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from serve.errors import APIError, ServerError
from serve.events import Event, TokenLogprob, Usage
from serve.parsers import (
    ChoiceParser,
    Delta,
    ReasoningDelta,
    TextDelta,
    ToolCallArgs,
    ToolCallStart,
    collapse,
)
from serve.sse import SSE_DONE, sse


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage_dict(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


def add_usage(a: Usage | None, b: Usage) -> Usage:
    if a is None:
        return b
    return Usage(
        prompt_tokens=a.prompt_tokens + b.prompt_tokens,
        completion_tokens=a.completion_tokens + b.completion_tokens,
        cached_tokens=a.cached_tokens + b.cached_tokens,
    )


TokenText = Callable[[int], str]
TokenBytes = Callable[[int], bytes]


def chat_logprobs_content(lps: Sequence[TokenLogprob], token_text: TokenText,
                          token_bytes: TokenBytes | None = None) -> list[dict]:
    """Chat shape: `[{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]`.

    `bytes` are the token's raw bytes (`token_bytes`; the UTF-8 of its text without one), so
    consecutive tokens' bytes join to the text's UTF-8 even across a split character."""

    def raw(i: int) -> list[int]:
        return list(token_bytes(i) if token_bytes is not None else token_text(i).encode("utf-8"))

    content = []
    for lp in lps:
        content.append(
            {
                "token": token_text(lp.token_id),
                "logprob": lp.logprob,
                "bytes": raw(lp.token_id),
                "top_logprobs": [
                    {"token": token_text(i), "logprob": p, "bytes": raw(i)} for i, p in lp.top
                ],
            }
        )
    return content


class CompletionLogprobs:
    """Completions shape, `{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`, built
    incrementally so stream chunks carry consecutive `text_offset`s.

    `top_logprobs[i]` always holds the token itself (OpenAI: up to `logprobs` + 1 entries).
    `text_offset` counts characters: a token that completes a character split over several
    tokens starts at that character, as do the tokens before it."""

    def __init__(self, token_text: TokenText, offset: int = 0, token_bytes: TokenBytes | None = None) -> None:
        self.token_text = token_text
        self.token_bytes = token_bytes
        self.offset = offset
        self._pending = b""  # bytes of a character not yet complete

    def _advance(self, token_id: int) -> None:
        raw = (self.token_bytes(token_id) if self.token_bytes is not None
               else self.token_text(token_id).encode("utf-8"))
        data = self._pending + raw
        # Hold back an incomplete character at the end (at most 3 bytes); bytes that are no
        # UTF-8 at all count as the U+FFFD each becomes in the text.
        text, self._pending = data.decode("utf-8", errors="replace"), b""
        for cut in range(len(data), max(len(data) - 4, -1), -1):
            try:
                text, self._pending = data[:cut].decode("utf-8"), data[cut:]
                break
            except UnicodeDecodeError:
                continue
        self.offset += len(text)

    def block(self, lps: Sequence[TokenLogprob | None], token_ids: Sequence[int]) -> dict:
        """`lps[i]` is None where no logprob exists (the first prompt token with echo)."""
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token_id, lp in zip(token_ids, lps, strict=True):
            out["tokens"].append(self.token_text(token_id))
            out["token_logprobs"].append(None if lp is None else lp.logprob)
            top = None
            if lp is not None:
                top = {self.token_text(i): p for i, p in lp.top}
                top.setdefault(self.token_text(token_id), lp.logprob)
            out["top_logprobs"].append(top)
            out["text_offset"].append(self.offset)
            self._advance(token_id)
        return out


def merge_completion_logprobs(blocks: Sequence[dict]) -> dict:
    merged: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for block in blocks:
        for key, values in block.items():
            merged[key].extend(values)
    return merged


class Output:
    """What both endpoints share: ids, per-choice text and finish reasons, summed usage."""

    object = ""  # of a whole response
    chunk_object = ""  # of a stream chunk

    def __init__(self, id: str, model: str, n: int, token_text: Callable[[int], str], *,
                 logprobs: bool, include_usage: bool, n_prompts: int = 1,
                 token_bytes: TokenBytes | None = None, fingerprint: str | None = None) -> None:
        self.id, self.model, self.created, self.n = id, model, now(), n
        self.token_text = token_text
        self.token_bytes = token_bytes
        self.fingerprint = fingerprint
        self.logprobs = logprobs
        self.include_usage = include_usage
        self.n_choices = n * n_prompts
        self.texts: list[list[str]] = [[] for _ in range(self.n_choices)]
        self.finish: list[str | None] = [None] * self.n_choices
        self.usage: Usage | None = None

    def _track(self, event: Event) -> None:
        if event.error is not None:
            raise ServerError(event.error)
        if event.usage is not None:
            self.usage = add_usage(self.usage, event.usage)

    def _base(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint}

    def _chunk(self, choices: list[dict]) -> bytes:
        chunk = self._base(self.chunk_object)
        chunk["choices"] = choices
        if self.include_usage:
            chunk["usage"] = None
        return sse(chunk)

    def start(self, first: Event) -> list[bytes]:
        """Chunks to send before those of `first`, the engine's first event (`chunks`
        renders it next; a renderer may read what it tells of the whole request, such as
        `cached_tokens`)."""
        return []

    def chunks(self, k: int, event: Event) -> list[bytes]:
        """SSE chunks for one event of prompt k (raises ServerError for an error event)."""
        raise NotImplementedError

    def add(self, k: int, event: Event) -> None:
        """Accumulate one event of prompt k for `response()`."""
        raise NotImplementedError

    def response(self) -> dict[str, Any]:
        raise NotImplementedError

    def end(self) -> list[bytes]:
        if not self.include_usage:
            return []
        chunk = self._base(self.chunk_object)
        chunk["choices"] = []
        chunk["usage"] = usage_dict(self.usage or Usage(0, 0))
        return [sse(chunk)]

    # The stream's framing: what ends it, what an error after the start becomes, and the
    # keep-alive sent after `heartbeat` seconds without an event (None: none). Other wire
    # formats (serve.api_responses, serve.api_messages) override these.
    heartbeat: float | None = None

    def ping(self) -> bytes:
        return b": ping\n\n"

    def fail(self, error: APIError) -> list[bytes]:
        return [error.sse(), SSE_DONE]

    def done(self) -> list[bytes]:
        return [SSE_DONE]

    def _response(self, choices: list[dict]) -> dict[str, Any]:
        body = self._base(self.object)
        body["choices"] = choices
        body["usage"] = usage_dict(self.usage or Usage(0, 0))
        return body


def delta_dict(d: Delta, *, legacy: bool = False) -> dict[str, Any] | None:
    """One parser delta as a chat stream chunk's `delta`: `content`, `reasoning_content`,
    or `tool_calls` (a call's first delta: index, id, type, name and `arguments: ""`; then
    argument fragments). `legacy`: the deprecated `function_call` shape, first call only."""
    if isinstance(d, TextDelta):
        return {"content": d.text}
    if isinstance(d, ReasoningDelta):
        return {"reasoning_content": d.text}
    if legacy:
        if d.index != 0:
            return None
        if isinstance(d, ToolCallStart):
            return {"function_call": {"name": d.name, "arguments": ""}}
        return {"function_call": {"arguments": d.fragment}}
    if isinstance(d, ToolCallStart):
        return {"tool_calls": [{"index": d.index, "id": d.id, "type": "function",
                                "function": {"name": d.name, "arguments": ""}}]}
    return {"tool_calls": [{"index": d.index, "function": {"arguments": d.fragment}}]}


class ChatOutput(Output):
    """Chat responses; each choice's text goes through its own `ChoiceParser` (reasoning,
    tool calls), so markup never reaches `content` and streamed deltas reassemble into the
    non-streamed message. A choice that called a tool and stopped ends "tool_calls"
    ("function_call" for a legacy `functions` request); one whose last call was cut (max_tokens,
    a stop string) keeps the engine's "length"/"stop", the partial call included as written."""

    object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def __init__(self, *args: Any, make_parser: Callable[[], ChoiceParser] = ChoiceParser,
                 legacy_functions: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.content: list[list[dict]] = [[] for _ in range(self.n_choices)]
        self.parsers = [make_parser() for _ in range(self.n_choices)]
        self.deltas: list[list[Delta]] = [[] for _ in range(self.n_choices)]
        self.legacy = legacy_functions

    def start(self, first: Event) -> list[bytes]:
        return [
            self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}])
            for i in range(self.n_choices)
        ]

    def _parse(self, i: int, text: str, finish_reason: str | None) -> tuple[list[Delta], str | None]:
        parser = self.parsers[i]
        deltas = parser.feed(text) if text else []
        if finish_reason is not None:
            deltas += parser.finish()
            if finish_reason == "stop" and parser.calls_finished:
                finish_reason = "function_call" if self.legacy else "tool_calls"
        return collapse(deltas), finish_reason

    def chunks(self, k: int, event: Event) -> list[bytes]:
        self._track(event)
        out = []
        for c in event.choices:
            i = k * self.n + c.index
            lp = None
            if self.logprobs and c.logprobs:
                lp = {"content": chat_logprobs_content(c.logprobs, self.token_text, self.token_bytes)}
            deltas, finish = self._parse(i, c.text, c.finish_reason)
            bodies = [b for b in (delta_dict(d, legacy=self.legacy) for d in deltas) if b is not None]
            if lp and not bodies:
                bodies = [{"content": ""}]
            for n, body in enumerate(bodies):
                out.append(self._chunk([{"index": i, "delta": body, "logprobs": lp if n == 0 else None,
                                         "finish_reason": None}]))
            if finish is not None:
                out.append(self._chunk([{"index": i, "delta": {}, "logprobs": None,
                                         "finish_reason": finish}]))
        return out

    def add(self, k: int, event: Event) -> None:
        self._track(event)
        for c in event.choices:
            i = k * self.n + c.index
            deltas, finish = self._parse(i, c.text, c.finish_reason)
            self.deltas[i] += deltas
            if self.logprobs and c.logprobs:
                self.content[i].extend(chat_logprobs_content(c.logprobs, self.token_text, self.token_bytes))
            if finish is not None:
                self.finish[i] = finish

    def message(self, i: int) -> dict[str, Any]:
        """Choice i's whole message from its deltas."""
        deltas = collapse(self.deltas[i])
        text = "".join(d.text for d in deltas if isinstance(d, TextDelta))
        reasoning = "".join(d.text for d in deltas if isinstance(d, ReasoningDelta))
        calls: dict[int, dict[str, Any]] = {}
        for d in deltas:
            if isinstance(d, ToolCallStart):
                calls[d.index] = {"id": d.id, "type": "function",
                                  "function": {"name": d.name, "arguments": ""}}
            elif isinstance(d, ToolCallArgs):
                calls[d.index]["function"]["arguments"] += d.fragment
        message: dict[str, Any] = {"role": "assistant", "content": text if text or not calls else None}
        if reasoning:
            message["reasoning_content"] = reasoning
        if calls and self.legacy:
            message["function_call"] = calls[0]["function"]
        elif calls:
            message["tool_calls"] = [calls[j] for j in sorted(calls)]
        return message

    def response(self) -> dict[str, Any]:
        return self._response([
            {
                "index": i,
                "message": self.message(i),
                "logprobs": {"content": self.content[i]} if self.logprobs else None,
                "finish_reason": self.finish[i],
            }
            for i in range(self.n_choices)
        ])


class CompletionOutput(Output):
    object = "text_completion"
    chunk_object = "text_completion"

    def __init__(self, *args: Any, echo: list[tuple[str, list[int]]] | None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.echo = echo
        self.offsets = [CompletionLogprobs(self.token_text, token_bytes=self.token_bytes)
                        for _ in range(self.n_choices)]
        self.blocks: list[list[dict]] = [[] for _ in range(self.n_choices)]
        self.started = [False] * (self.n_choices // self.n)

    def _echo(self, k: int, event: Event) -> list[tuple[int, str, dict | None]]:
        """The first event of prompt k: its text (and prompt logprobs) for each of its choices."""
        if self.started[k]:
            return []
        self.started[k] = True
        if self.echo is None:
            return []
        text, ids = self.echo[k]
        echoed = []
        for i in range(k * self.n, (k + 1) * self.n):
            block = None
            if self.logprobs:
                lps = event.prompt_logprobs or (None,) * len(ids)
                block = self.offsets[i].block(lps, ids)
            echoed.append((i, text, block))
        return echoed

    def _pieces(self, k: int, event: Event) -> list[tuple[int, str, dict | None, str | None]]:
        self._track(event)
        pieces = [(i, text, block, None) for i, text, block in self._echo(k, event)]
        for c in event.choices:
            i = k * self.n + c.index
            block = None
            if self.logprobs and c.logprobs:
                # the tokens whose logprobs are settled (`Choice._logprobs`), not c.token_ids
                block = self.offsets[i].block(c.logprobs, [lp.token_id for lp in c.logprobs])
            pieces.append((i, c.text, block, c.finish_reason))
        return pieces

    def chunks(self, k: int, event: Event) -> list[bytes]:
        out = []
        for i, text, block, finish in self._pieces(k, event):
            if text or block:
                out.append(self._chunk([{"index": i, "text": text, "logprobs": block, "finish_reason": None}]))
            if finish is not None:
                out.append(self._chunk([{"index": i, "text": "", "logprobs": None, "finish_reason": finish}]))
        return out

    def add(self, k: int, event: Event) -> None:
        for i, text, block, finish in self._pieces(k, event):
            self.texts[i].append(text)
            if block is not None:
                self.blocks[i].append(block)
            if finish is not None:
                self.finish[i] = finish

    def response(self) -> dict[str, Any]:
        return self._response([
            {
                "index": i,
                "text": "".join(self.texts[i]),
                "logprobs": merge_completion_logprobs(self.blocks[i]) if self.logprobs else None,
                "finish_reason": self.finish[i],
            }
            for i in range(self.n_choices)
        ])
