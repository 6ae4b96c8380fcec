"""IncrementalDetokenizer: streamed pieces join to decode(ids), never with broken UTF-8."""

from __future__ import annotations

import pytest
from _text_fixtures import smollm2_dir, sp_dir, sp_metaspace_dir  # noqa: F401
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serve.detokenizer import IncrementalDetokenizer
from serve.tokenizer import Tokenizer

SAMPLES = [
    "Hello world",
    " leading space",
    "  two spaces",
    "tabs\tand\nnew\n\nlines\r\n",
    "digits 0123456789 3.14159 2024",
    "😀",
    "👍🏽",  # skin tone modifier
    "👩🏽‍💻",  # ZWJ sequence with skin tone
    "👨‍👩‍👧‍👦",  # family ZWJ sequence
    "🏳️‍🌈",
    "中文字符测试",
    "日本語のテキスト",
    "한국어",
    "مرحبا بالعالم",
    "Привет, мир",
    "e\u0301",  # combining accent
    "\u200b",
    "a\ufffdb",  # a real U+FFFD in the text
]

TEXT = st.lists(
    st.one_of(st.sampled_from(SAMPLES), st.text(max_size=12)), min_size=1, max_size=8
).map("".join)

SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(scope="module", params=["smollm2", "sp", "sp_metaspace"])
def tok(request: pytest.FixtureRequest) -> Tokenizer:
    dirs = {"smollm2": "smollm2_dir", "sp": "sp_dir", "sp_metaspace": "sp_metaspace_dir"}
    return Tokenizer.from_dir(request.getfixturevalue(dirs[request.param]))


def stream(tok: Tokenizer, ids, *, skip: bool = True, prompt_ids=()) -> list[str]:
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip, prompt_ids=prompt_ids)
    pieces = [detok.add(i) for i in ids]
    pieces.append(detok.flush())
    return pieces


def check(tok: Tokenizer, ids, *, skip: bool = True) -> list[str]:
    pieces = stream(tok, ids, skip=skip)
    full = tok.decode(ids, skip_special_tokens=skip)
    assert "".join(pieces) == full
    if "\ufffd" not in full:
        assert not any("\ufffd" in p for p in pieces)
    return pieces


def byte_ids(tok: Tokenizer, data: bytes) -> tuple[list[int], bytes]:
    """Ids spelling ``data`` one byte per token (byte-level alphabet or <0xXX> tokens), and
    the bytes they spell (bytes without a token are dropped)."""
    if tok.byte_fallback_ids:
        return [tok._tk.token_to_id(f"<0x{b:02X}>") for b in data], data
    # GPT-2's bytes_to_unicode: printable bytes map to themselves, the rest to U+0100…
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table, n = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + n)
            n += 1
    # SmolLM2's vocabulary has no token for bytes that never occur in UTF-8 (0xF5…).
    kept = bytes(b for b in data if tok._tk.token_to_id(table[b]) is not None)
    return [tok._tk.token_to_id(table[b]) for b in kept], kept


@SETTINGS
@given(text=TEXT)
def test_text_roundtrip(tok: Tokenizer, text: str) -> None:
    check(tok, tok.encode(text, add_special_tokens=False))
    check(tok, tok.encode(text), skip=False)


@SETTINGS
@given(data=st.data())
def test_random_ids(tok: Tokenizer, data: st.DataObject) -> None:
    ids = data.draw(st.lists(st.integers(0, tok.vocab_size - 1), max_size=40))
    check(tok, ids)
    check(tok, ids, skip=False)


@SETTINGS
@given(data=st.binary(max_size=24), text=TEXT)
def test_random_bytes(tok: Tokenizer, data: bytes, text: str) -> None:
    ids, data = byte_ids(tok, data)
    pieces = check(tok, ids)
    if not tok.byte_fallback_ids:  # byte-level decode is UTF-8 with maximal-subpart U+FFFD
        assert "".join(pieces) == data.decode("utf-8", errors="replace")
    words = tok.encode(text, add_special_tokens=False)
    check(tok, words + ids + words)


def test_emoji_pieces_are_whole_characters(tok: Tokenizer) -> None:
    text = "Hi 👩🏽‍💻 and 👨‍👩‍👧‍👦, 中文 مرحبا 12345!"
    pieces = check(tok, tok.encode(text, add_special_tokens=False))
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_leading_spaces(tok: Tokenizer) -> None:
    ids = tok.encode("Hello world again", add_special_tokens=False)
    pieces = [p for p in stream(tok, ids) if p]
    assert pieces[0].startswith("Hello")
    assert "".join(pieces) == "Hello world again"
    assert any(p.startswith(" ") for p in pieces[1:])


def test_special_tokens_skipped(tok: Tokenizer) -> None:
    eos = min(tok.eos_ids)
    eos_text = tok.token_text(eos)
    a = tok.encode("Hello", add_special_tokens=False)
    b = tok.encode(" there", add_special_tokens=False)
    ids = [eos, *a, eos, *b, eos]
    skipped = check(tok, ids)
    assert eos_text not in "".join(skipped)
    kept = check(tok, ids, skip=False)
    assert "".join(kept).count(eos_text) == 3


def test_prompt_context_keeps_leading_space(tok: Tokenizer) -> None:
    full = tok.encode("The capital of France is Paris", add_special_tokens=False)
    prompt, gen = full[:-1], full[-1:]
    assert tok.decode(gen) in ("Paris", " Paris")
    assert "".join(stream(tok, gen, prompt_ids=prompt)) == " Paris"


def test_window_stays_small(tok: Tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    ids = tok.encode(
        "The quick brown fox 🦊 jumps over the lazy dog. " * 100, add_special_tokens=False
    )
    sizes: list[int] = []
    decode = tok.decode

    def spy(ids, **kw):
        sizes.append(len(ids))
        return decode(ids, **kw)

    monkeypatch.setattr(tok, "decode", spy)
    pieces = stream(tok, ids)
    monkeypatch.undo()
    assert "".join(pieces) == tok.decode(ids)
    assert len(ids) > 500 and max(sizes) <= 12


def test_byte_level_text_needs_no_window_decode(smollm2_dir) -> None:  # noqa: F811
    """With a ByteLevel decoder a token of whole characters after one that ended on a
    character boundary is its own text: the usual token costs no window decode, and the
    pieces still join to decode(ids)."""
    tok = Tokenizer.from_dir(smollm2_dir)
    assert tok.byte_level
    ids = tok.encode("The quick brown fox 🦊 jumps over the lazy dog. " * 20, add_special_tokens=False)
    calls = 0
    decode = tok.decode

    def spy(ids, **kw):
        nonlocal calls
        calls += 1
        return decode(ids, **kw)

    tok.decode = spy
    pieces = stream(tok, ids)
    del tok.decode
    assert "".join(pieces) == tok.decode(ids)
    assert calls < len(ids) // 2  # the emoji and the tokens around it take the window (2 a token before)
