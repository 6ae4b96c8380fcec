"""The Responses API's `store`: finished responses kept in memory, least recently used out.

Each entry is the response body (what `GET /v1/responses/{id}` returns) and the
conversation it ends, as OpenAI chat-shaped messages without its `instructions` (what a
later request's `previous_response_id` continues; OpenAI does not carry instructions
over). The store lives in the server process: a restart forgets it and several server
processes do not share it. The event loop is its only user, so it needs no lock.
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


class ResponseStore:
    """A bounded LRU map from response id to `StoredResponse`.

    Args:
        capacity: the most responses kept (>= 0; 0 keeps none, so `store` has no effect and
            every `previous_response_id` is unknown).
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self._items: OrderedDict[str, StoredResponse] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, response_id: str, stored: StoredResponse) -> None:
        """Keep `stored` as the newest entry, evicting the least recently used past capacity."""
        if self.capacity == 0:
            return
        self._items[response_id] = stored
        self._items.move_to_end(response_id)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def get(self, response_id: str) -> StoredResponse | None:
        """The entry (now the most recently used), or None if unknown or evicted."""
        stored = self._items.get(response_id)
        if stored is not None:
            self._items.move_to_end(response_id)
        return stored

    def delete(self, response_id: str) -> bool:
        """Forget an entry; False if there was none."""
        return self._items.pop(response_id, None) is not None
