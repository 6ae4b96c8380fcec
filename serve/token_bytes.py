"""Each token's raw bytes, for logprobs: the bytes of consecutive tokens concatenate to the
exact UTF-8 of the text they decode to, even where a token holds part of a character (an
emoji, CJK), as OpenAI's `bytes` field promises.

How a token's vocabulary string maps to bytes depends on tokenizer.json's decoder:

- ``ByteLevel`` (GPT-2 / Llama 3 / SmolLM byte-level BPE): each character of the token
  string stands for one byte through GPT-2's printable byte table (``bytes_to_unicode`` in
  openai/gpt-2 ``encoder.py``), e.g. ``Ġ`` → 0x20;
- SentencePiece style (``Metaspace``, or ``Replace`` of ``▁``): ``▁`` is a space, the rest is
  UTF-8, and ``<0xXX>`` tokens (``ByteFallback``) are the single byte 0xXX;
- added tokens (``<|im_end|>``) are their content in UTF-8, whatever the decoder.

The token *string* is best effort: the bytes as text where they are valid UTF-8, otherwise
OpenAI's spelling for a partial character, ``bytes:\\xf0\\x9f``.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping
from typing import Any

from tokenizers import Tokenizer as HFTokenizer

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte table inverted: printable character → the byte it stands for."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return {c: b for b, c in table.items()}


def _decoder_types(node: Any) -> set[str]:
    if not isinstance(node, Mapping):
        return set()
    types = {node.get("type")} if isinstance(node.get("type"), str) else set()
    for child in node.get("decoders") or ():
        types |= _decoder_types(child)
    return types


class TokenBytes:
    """``tb(id)`` → the token's raw bytes; ``tb.string(id)`` → its best-effort text.

    Args:
        tokenizer: the loaded tokenizer.json pipeline.
        fallback: text of a token for decoders this module does not know (WordPiece, …);
            its UTF-8 is used as the bytes.
        decoder: tokenizer.json's ``decoder`` object, if the caller has parsed it already.
    """

    def __init__(self, tokenizer: HFTokenizer, fallback: Any, *, decoder: Any = None) -> None:
        self._tk = tokenizer
        self._fallback = fallback
        if decoder is None:
            decoder = json.loads(tokenizer.to_str()).get("decoder")
        types = _decoder_types(decoder)
        self._byte_level = "ByteLevel" in types
        self._spm = not self._byte_level and ("Metaspace" in types or "Replace" in types)
        self._byte_fallback = "ByteFallback" in types
        self._added = {i: t.content for i, t in tokenizer.get_added_tokens_decoder().items()}
        self._cache: dict[int, bytes] = {}

    def __call__(self, token_id: int) -> bytes:
        raw = self._cache.get(token_id)
        if raw is None:
            raw = self._cache[token_id] = self._bytes(token_id)
        return raw

    def _bytes(self, token_id: int) -> bytes:
        if token_id in self._added:
            return self._added[token_id].encode("utf-8")
        piece = self._tk.id_to_token(token_id)
        if piece is None:
            return b""
        if self._byte_level:
            table = _byte_decoder()
            if all(c in table for c in piece):
                return bytes(table[c] for c in piece)
        elif self._spm:
            if self._byte_fallback and (m := _BYTE_TOKEN.fullmatch(piece)):
                return bytes([int(m.group(1), 16)])
            return piece.replace("\u2581", " ").encode("utf-8")
        return str(self._fallback(token_id)).encode("utf-8")

    def string(self, token_id: int) -> str:
        """The token as text; ``bytes:\\xNN…`` when its bytes are not valid UTF-8 alone."""
        raw = self(token_id)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)

    def max_len(self) -> int:
        """The most bytes one token stands for (over the whole vocabulary, added tokens
        included): a text of B UTF-8 bytes needs at least B / max_len() tokens."""
        n = self._tk.get_vocab_size(with_added_tokens=True)
        return max((len(self(i)) for i in range(n)), default=1) or 1
