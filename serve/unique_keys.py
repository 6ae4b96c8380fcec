"""Unique object keys in constrained JSON: the tokens that would close a key an object already has.

llguidance's JSON grammar is context-free, so a map (`additionalProperties` /
`patternProperties`) may repeat a key, `{"id": 1, "id": 1}`, which RFC 8259 (§4: names
SHOULD be unique) leaves to parsers, and which `json.loads` collapses to its last value without
a word: the client would read another object than the one generated. llguidance 1.9 has no
option for unique keys (its `JsonCompileOptions`: separators, whitespace, `coerce_one_of`,
`lenient`, escapes), and no context-free grammar can say "a key not seen before" over an open
set of keys, so the engine keeps track itself:

```
consume(token) ─► UniqueKeys.feed(its bytes): a small JSON lexer (objects and arrays nested,
                  which string is a key, the keys each open object has)
mask step      ─► inside a key whose text so far is P, for each key K of that object starting
                  with P: ban the tokens that write K[len(P):] and then the closing quote
                  (`KeyClosers`: token bytes up to their first unescaped `"`, built once per
                  tokenizer)
```

Keys compare as their raw JSON text (a key spelled once plainly and once with `\\u` escapes is
not caught). Where the grammar leaves nothing but a repeated key (an `enum` of names and a
`minProperties` beyond it), the ban is lifted rather than leave no token at all.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

__all__ = ["KeyClosers", "UniqueKeys", "key_closers"]

_QUOTE, _BACKSLASH = 0x22, 0x5C


class KeyClosers:
    """The tokens that end a JSON string: `prefix bytes → token ids` whose bytes are that prefix
    (no unescaped quote in it) then an unescaped `"`, read from inside a string.

    Args:
        token_bytes: each token id's bytes (index = id); kept as `token_bytes`.
    """

    def __init__(self, token_bytes: list[bytes]) -> None:
        self.token_bytes = token_bytes
        self.by_prefix: dict[bytes, list[int]] = {}
        for token, data in enumerate(token_bytes):
            if _QUOTE not in data:
                continue
            end = _closing_quote(data)
            if end is not None:
                self.by_prefix.setdefault(data[:end], []).append(token)


def _closing_quote(data: bytes) -> int | None:
    """Where the first unescaped quote of `data` (read from inside a string) stands, or None."""
    escaped = False
    for i, b in enumerate(data):
        if escaped:
            escaped = False
        elif b == _BACKSLASH:
            escaped = True
        elif b == _QUOTE:
            return i
    return None


_closers: weakref.WeakKeyDictionary[Any, KeyClosers] = weakref.WeakKeyDictionary()
_closers_lock = threading.Lock()


def key_closers(tokenizer: Any, ll_tokenizer: Any) -> KeyClosers:
    """`KeyClosers` of a tokenizer (`serve.tokenizer.Tokenizer`, the cache key) from its
    llguidance `LLTokenizer` (`decode_bytes` per id), built once per tokenizer."""
    with _closers_lock:
        closers = _closers.get(tokenizer)
        if closers is None:
            closers = KeyClosers([ll_tokenizer.decode_bytes([t]) for t in range(ll_tokenizer.vocab_size)])
            _closers[tokenizer] = closers
        return closers


class UniqueKeys:
    """One choice's JSON as generated so far, read for its object keys.

    The input is a prefix of one JSON value (the grammar sees to that), fed as token bytes.
    Frames: an open object is the `set` of its keys, an open array None.
    """

    __slots__ = ("closers", "frames", "expect_key", "in_string", "is_key", "escaped", "text")

    def __init__(self, closers: KeyClosers) -> None:
        self.closers = closers
        self.frames: list[set[bytes] | None] = []
        self.expect_key = False  # in an object, where a key may come (after `{` or `,`)
        self.in_string = self.is_key = self.escaped = False
        self.text = bytearray()  # the open string's raw bytes so far

    def feed(self, token: int) -> None:
        """Read the next token's bytes."""
        for b in self.closers.token_bytes[token]:
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif b == _BACKSLASH:
                    self.escaped = True
                elif b == _QUOTE:
                    self.in_string = False
                    if self.is_key and self.frames and self.frames[-1] is not None:
                        self.frames[-1].add(bytes(self.text))
                        self.expect_key = False
                    continue
                self.text.append(b)
            elif b == 0x7B:  # {
                self.frames.append(set())
                self.expect_key = True
            elif b == 0x5B:  # [
                self.frames.append(None)
                self.expect_key = False
            elif b in (0x7D, 0x5D):  # } ]
                if self.frames:
                    self.frames.pop()
                self.expect_key = False
            elif b == 0x2C:  # ,
                self.expect_key = bool(self.frames) and self.frames[-1] is not None
            elif b == _QUOTE:
                self.in_string, self.escaped = True, False
                self.is_key = self.expect_key and bool(self.frames) and self.frames[-1] is not None
                self.text.clear()

    def banned(self) -> list[int]:
        """The token ids that would close the open key as one its object already has ([] outside
        a key)."""
        if not (self.in_string and self.is_key) or self.escaped or not self.frames or self.frames[-1] is None:
            return []
        typed = bytes(self.text)
        out: list[int] = []
        for key in self.frames[-1]:
            if key.startswith(typed):
                out.extend(self.closers.by_prefix.get(key[len(typed):], ()))
        return out
