"""The Responses API's `store` and the Messages API's threads: finished responses kept in
memory, least recently used out.

A Responses entry (`StoredResponse`, id `resp_…`) is the response body (what
`GET /v1/responses/{id}` returns) and the conversation it ends, as OpenAI chat-shaped
messages without its `instructions` (what a later request's `previous_response_id`
continues; OpenAI does not carry instructions over). A Messages entry (`StoredThread`, id
`msg_…`) is what a `thread: {"type": "continue", "previous_message_id"}` request resumes.
Both kinds share one store and its capacity; a route looks only at its own kind. The store
lives in the server process: a restart forgets it and several server processes do not
share it. The event loop is its only user, so it needs no lock.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class StoredResponse:
    """`body`: the `response` object (JSON-ready dict); `conversation`: chat messages
    (dicts with `role`, `content`, maybe `tool_calls` / `tool_call_id`), input then output;
    `input_items`: what `GET /v1/responses/{id}/input_items` lists."""

    body: dict[str, Any]
    conversation: tuple[dict[str, Any], ...]
    input_items: tuple[dict[str, Any], ...] = ()  # the request's `input` as items with ids (`input_items`)


@dataclass(frozen=True)
class StoredThread:
    """An Anthropic Messages thread after one of its replies: what a request continuing it
    (`thread.previous_message_id`) takes over. `model`, `system` and `tools` as the thread's
    first request sent them (Anthropic's create-only fields: `system`, `tools`); `messages`
    the Anthropic message params so far, the reply last (an assistant message with its
    content blocks). `continued`: a later request already continued this reply (each reply
    may be continued once, as at Anthropic); its `messages` are then dropped (that request's
    own entry holds them)."""

    model: str
    system: Any
    tools: tuple[dict[str, Any], ...] | None
    messages: tuple[dict[str, Any], ...]
    continued: bool = False


class ResponseStore:
    """A bounded LRU map from response id to `StoredResponse` (or message id to `StoredThread`).

    Args:
        capacity: the most responses kept (>= 0; 0 keeps none, so `store` has no effect and
            every `previous_response_id` is unknown).
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self._items: OrderedDict[str, StoredResponse | StoredThread] = OrderedDict()
        self._continuing: set[str] = set()  # thread replies a request in flight continues

    def __len__(self) -> int:
        return len(self._items)

    def put(self, response_id: str, stored: StoredResponse | StoredThread) -> None:
        """Keep `stored` as the newest entry, evicting the least recently used past capacity."""
        if self.capacity == 0:
            return
        self._items[response_id] = stored
        self._items.move_to_end(response_id)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def get(self, response_id: str) -> StoredResponse | StoredThread | None:
        """The entry (now the most recently used), or None if unknown or evicted."""
        stored = self._items.get(response_id)
        if stored is not None:
            self._items.move_to_end(response_id)
        return stored

    def delete(self, response_id: str) -> bool:
        """Forget an entry; False if there was none."""
        return self._items.pop(response_id, None) is not None

    def reserve(self, message_id: str) -> bool:
        """Mark the thread reply `message_id` as being continued by a request accepted now; False
        (and nothing changes) when another request in flight holds it. One call, so atomic here
        and through the API workers' `RemoteResponseStore`. `release` ends it, whether that
        request replied (its entry then says `continued`) or failed first (the reply may then
        be continued again)."""
        if message_id in self._continuing:
            return False
        self._continuing.add(message_id)
        return True

    def release(self, message_id: str) -> None:
        """End `reserve` (a no-op if not reserved)."""
        self._continuing.discard(message_id)
