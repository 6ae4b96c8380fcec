"""Streaming decode: text pieces whose concatenation is exactly ``decode(all ids)``.

Decoding one token at a time is wrong twice over: a token may hold part of a UTF-8
character, and SentencePiece decoders drop the leading space of whatever token comes
first in a decode call. So each step decodes a short window — the tokens already emitted
in the previous piece (the "prefix") plus the new ones — and emits what the window adds
beyond the prefix's text (the prefix/read-offset technique of TGI and vLLM):

    ids:     … t3 t4 │ t5 t6 │ t7
                     ^prefix  ^read   new token
    emit  decode(t5..t7)[len(decode(t5 t6)):]      then prefix=read, read=end

Text is held back while the window's decode ends in U+FFFD (an incomplete character)
and, for tokenizers with a ``ByteFallback`` decoder, while the newest token is a
``<0xXX>`` byte token: that decoder renders a whole run of byte tokens as one string, or
one U+FFFD per byte if the run is not valid UTF-8, so a piece cut inside a run could
later disagree with the full decode. Work per token is bounded by the window, never the
sequence.
"""

from __future__ import annotations

from collections.abc import Sequence

from serve.tokenizer import Tokenizer

_REPLACEMENT = "\ufffd"

# Prompt tokens used as context for the first generated token (enough to cover a
# multi-token character or word before it).
_PROMPT_CONTEXT = 6


class IncrementalDetokenizer:
    """Decodes a growing sequence of token ids into newly completed text.

    Invariant: ``"".join(add(i) for i in ids) + flush() == tokenizer.decode(ids)``, and
    no piece contains U+FFFD unless the full decode has one there.

    With ``prompt_ids``, the last few prompt tokens are decoded as context only, so the
    first generated token keeps the leading space a SentencePiece decoder would drop at the
    start of a sequence; then the pieces join to ``decode(tail + ids)[len(decode(tail)):]``.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        skip_special_tokens: bool = True,
        prompt_ids: Sequence[int] = (),
    ) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        # Tokens that add no text of their own yet: byte tokens (their run may go on) and,
        # when skipped, special tokens (the decoder never sees them, so they end no run).
        self.skipped_ids = tokenizer.special_ids if skip_special_tokens else frozenset()
        self._no_text_ids = tokenizer.byte_fallback_ids | self.skipped_ids
        # byte-level decoders: see `_next_piece`
        self._byte_level = getattr(tokenizer, "byte_level", False)
        self._added_ids = getattr(tokenizer, "added_ids", frozenset())
        self._ids: list[int] = list(prompt_ids[-_PROMPT_CONTEXT:]) if prompt_ids else []
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._prefix_text = self._decode(self._ids)

    def _decode(self, ids: list[int]) -> str:
        if len(ids) == 1:  # the usual next prefix: the one token just read
            return self._tokenizer.decode_one(ids[0], skip_special_tokens=self._skip)
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip) if ids else ""

    def add(self, token_id: int) -> str:
        """Appends one token; returns the text it completes (often '', never broken UTF-8)."""
        self._ids.append(token_id)
        if token_id in self._no_text_ids:
            return ""
        if self._byte_level:
            piece = self._next_piece(token_id)
            if piece is not None:
                return piece
        return self._advance(final=False)

    def _next_piece(self, token_id: int) -> str | None:
        """`_advance`'s result without decoding the window, in the usual case of a byte-level
        decoder (None: not that case). The window is then one token read before (the prefix)
        and this one, neither an added token; the prefix's text does not end in U+FFFD, so its
        bytes end on a character boundary, and this token's bytes are whole characters: the
        window's text is the prefix's text followed by this token's own."""
        ids, start = self._ids, self._prefix_offset
        if (self._read_offset != len(ids) - 1 or self._read_offset - start != 1
                or ids[start] in self._added_ids or token_id in self._added_ids
                or self._prefix_text.endswith(_REPLACEMENT)):
            return None
        text = self._tokenizer.decode_one(token_id, skip_special_tokens=self._skip)
        if not text or _REPLACEMENT in text:
            return None
        self._prefix_offset = self._read_offset
        self._read_offset = len(ids)
        self._prefix_text = text
        return text

    def flush(self) -> str:
        """Whatever is still held back (an unfinished character comes out as U+FFFD)."""
        return self._advance(final=True)

    def _advance(self, *, final: bool) -> str:
        window = self._ids[self._prefix_offset :]
        text = self._decode(window)
        if len(text) <= len(self._prefix_text) or (not final and text.endswith(_REPLACEMENT)):
            return ""
        piece = text[len(self._prefix_text) :]
        # The span just read becomes the next prefix. Its text is decoded on its own, since
        # that is how it will appear at the start of the next window.
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._prefix_text = self._decode(self._ids[self._prefix_offset :])
        return piece
