"""Benchmark prompts: exact token counts cut from one fixed English corpus.

Every engine gets the same token ids (never re-tokenized text), so a prompt of N tokens is N
tokens for everyone. The corpus is the Python docs' topic texts shipped with the standard
library (`pydoc_data.topics`): always present, offline, and ordinary technical prose.

No two prompts of a run share a token position (`PromptPool` hands out consecutive,
disjoint slices): a prefix cache (llorch's, or any peer's) can never turn a repeated run
into a cache hit, so every TTFT is a full prefill.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


def corpus_text() -> str:
    """The pydoc topic texts, sorted by topic name, joined with blank lines."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k].strip() for k in sorted(topics))


def corpus_ids(encode: Callable[[str], Sequence[int]], text: str | None = None) -> list[int]:
    """Token ids of the corpus (no special tokens: `encode` must not add any)."""
    return list(encode(corpus_text() if text is None else text))


def build_prompt(ids: Sequence[int], length: int, index: int = 0) -> list[int]:
    """The `index`-th prompt of exactly `length` tokens: prompts of one length never overlap.

    Raises:
        ValueError: the corpus holds fewer than `(index + 1) * length` tokens.
    """
    if length < 1:
        raise ValueError(f"prompt length must be positive, got {length}")
    start = index * length
    if start + length > len(ids):
        raise ValueError(f"corpus has {len(ids)} tokens; prompt {index} of {length} tokens "
                         f"needs {start + length}")
    return list(ids[start : start + length])


class PromptPool:
    """Hands out disjoint prompts, in order, from one token sequence (deterministic)."""

    def __init__(self, ids: Sequence[int]) -> None:
        self.ids = list(ids)
        self.used = 0

    def take(self, length: int) -> list[int]:
        """The next `length` tokens. Raises ValueError when the corpus runs out."""
        if length < 1:
            raise ValueError(f"prompt length must be positive, got {length}")
        if self.used + length > len(self.ids):
            raise ValueError(f"corpus has {len(self.ids)} tokens; {self.used} are used and "
                             f"another prompt needs {length}")
        out = self.ids[self.used : self.used + length]
        self.used += length
        return out

    def take_many(self, length: int, count: int) -> list[list[int]]:
        return [self.take(length) for _ in range(count)]
