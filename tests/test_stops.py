"""StopMatcher: output is the text up to the earliest stop, whatever the piece boundaries."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from serve.stops import StopMatcher


def run(stops, pieces) -> tuple[list[str], bool]:
    """Feeds pieces until a stop; returns the emitted chunks (flush included) and stopped."""
    m = StopMatcher(stops)
    out = []
    for p in pieces:
        text, stopped = m.feed(p)
        out.append(text)
        if stopped:
            return out, True
    out.append(m.flush())
    return out, False


def expected(stops, text: str) -> tuple[str, bool]:
    """Reference: check after every character; the longest stop ending there wins."""
    for end in range(1, len(text) + 1):
        hits = [s for s in stops if s and text[:end].endswith(s)]
        if hits:
            return text[: end - max(map(len, hits))], True
    return text, False


def split(text: str, cuts: list[int]) -> list[str]:
    cuts = sorted({min(c, len(text)) for c in cuts})
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


ALPHABET = st.sampled_from("abc ")
STOPS = st.lists(st.text(ALPHABET, min_size=0, max_size=4), min_size=1, max_size=4)


@settings(max_examples=400, deadline=None)
@given(stops=STOPS, text=st.text(ALPHABET, max_size=30), cuts=st.lists(st.integers(0, 30)))
def test_random_splits(stops, text, cuts) -> None:
    want, want_stopped = expected(stops, text)
    out, stopped = run(stops, split(text, cuts))
    assert "".join(out) == want
    assert stopped == want_stopped


@settings(max_examples=200, deadline=None)
@given(stops=STOPS, text=st.text(ALPHABET, max_size=30), cuts=st.lists(st.integers(0, 30)))
def test_never_leaks_a_partial_match(stops, text, cuts) -> None:
    # At every step, what was emitted is a prefix of the final answer (so no stop text,
    # whole or partial, ever went out), and what is held back is shorter than any stop.
    want, _ = expected(stops, text)
    longest = max((len(s) for s in stops), default=0)
    m = StopMatcher(stops)
    emitted, consumed = "", 0
    for piece in split(text, cuts):
        out, stopped = m.feed(piece)
        emitted += out
        consumed += len(piece)
        assert want.startswith(emitted)
        if stopped:
            break
        assert consumed - len(emitted) < max(longest, 1)


@settings(max_examples=300, deadline=None)
@given(stops=STOPS, text=st.text(ALPHABET, max_size=30), cuts=st.lists(st.integers(0, 30)),
       include=st.booleans())
def test_positions_say_which_input_is_output(stops, text, cuts, include) -> None:
    # `fed` counts what came in; `kept` is where the settled output ends in it: all that was
    # emitted so far, and after a match exactly the output's end (Choice drops the logprobs
    # of tokens starting at or after it).
    m = StopMatcher(stops, include_stop=include)
    emitted, consumed = "", 0
    for piece in split(text, cuts):
        out, stopped = m.feed(piece)
        emitted += out
        consumed += len(piece)
        assert m.fed == consumed
        assert m.kept == len(emitted)
        if stopped:
            break
    else:
        emitted += m.flush()
        assert m.kept == m.fed == len(emitted)


def test_positions_count_hidden_text() -> None:
    m = StopMatcher(["ab"])
    assert m.feed("x") == ("x", False)
    assert m.feed("<s>", visible=False) == ("", False)  # a skipped special token's text
    assert (m.fed, m.kept) == (4, 4)
    assert m.feed("a") == ("", False)
    assert (m.fed, m.kept) == (5, 4)  # "a" may start the stop: held, not settled
    assert m.feed("bc") == ("", True)
    assert (m.fed, m.kept) == (7, 4)  # the output ends before "ab"


def test_stop_across_pieces() -> None:
    out, stopped = run(["</answer>"], ["The answer is 4<", "/ans", "wer> and more"])
    assert out == ["The answer is 4", "", ""]
    assert stopped


def test_partial_match_released_when_it_breaks() -> None:
    m = StopMatcher(["STOP"])
    assert m.feed("go ST") == ("go ", False)
    assert m.feed("OP") == ("", True)
    m = StopMatcher(["STOP"])
    assert m.feed("go ST") == ("go ", False)
    assert m.feed("AY") == ("STAY", False)
    assert m.flush() == ""


def test_flush_returns_held_text() -> None:
    m = StopMatcher(["\n\n"])
    assert m.feed("line\n") == ("line", False)
    assert m.flush() == "\n"


def test_multiple_stops_earliest_wins() -> None:
    assert run(["world", "lo"], ["hello world"]) == (["hel"], True)
    assert run(["xyz", "o w"], ["hell", "o", " wor", "ld"]) == (["hell", "", ""], True)


def test_first_completed_stop_wins() -> None:
    # "c" completes before "aca" does, however the text is cut.
    assert run(["c", "aca"], ["aca"]) == (["a"], True)
    assert run(["c", "aca"], ["ac", "a"]) == (["a"], True)


def test_overlapping_stops() -> None:
    # "abab" inside "aabab": a naive matcher restarting after "aba" misses it.
    assert "".join(run(["abab"], ["a", "a", "b", "a", "b", "c"])[0]) == "a"
    assert "".join(run(["ab", "abc", "b"], list("xxabc"))[0]) == "xx"


def test_stop_at_the_very_start() -> None:
    assert run(["Hi"], ["Hi there"]) == ([""], True)
    assert run(["Hi"], ["H", "i there"]) == (["", ""], True)


def test_no_or_empty_stops_pass_through() -> None:
    assert run([], ["a", "b"]) == (["a", "b", ""], False)
    assert run([""], ["a", "b"]) == (["a", "b", ""], False)


def test_after_stop_nothing_more() -> None:
    m = StopMatcher(["x"])
    assert m.feed("ax") == ("a", True)
    assert m.feed("more") == ("", True)
    assert m.flush() == ""


def test_unicode_stops() -> None:
    assert "".join(run(["。"], ["你好", "。再见"])[0]) == "你好"
    assert "".join(run(["👍🏽"], ["ok 👍", "🏽 done"])[0]) == "ok "


def test_matched_names_the_stop_that_ended_it() -> None:
    m = StopMatcher(["bc", "abcd", "zz"])
    m.feed("ab")
    assert m.matched is None
    m.feed("cd")
    assert m.matched == "bc"
    never = StopMatcher(["zz"])
    never.feed("abc")
    never.flush()
    assert never.matched is None


def expected_vllm(stops, text: str, open_at: int, include: bool) -> tuple[str, bool]:
    """Reference for `include_stop` and `match=False`: check after every character from
    ``open_at + 1`` on (the characters before it came with match=False); the longest stop
    ending there wins, the output ends after it (``include``) or before it."""
    for end in range(max(open_at, 0) + 1, len(text) + 1):
        hits = [s for s in stops if s and text[:end].endswith(s)]
        if hits:
            return text[: end if include else end - max(map(len, hits))], True
    return text, False


@settings(max_examples=400, deadline=None)
@given(stops=STOPS, text=st.text(ALPHABET, max_size=30), cuts=st.lists(st.integers(0, 30)),
       closed=st.integers(0, 4), include=st.booleans())
def test_include_stop_and_unmatched_pieces(stops, text, cuts, closed, include) -> None:
    """vLLM's include_stop_str_in_output and min_tokens: the first ``closed`` pieces cannot
    end a stop (one may still begin there), the output keeps the stop string with
    ``include_stop``; what went out is always a prefix of the answer, however the text is cut."""
    pieces = split(text, cuts)
    open_at = sum(len(p) for p in pieces[:closed])
    want, want_stopped = expected_vllm(stops, text, open_at, include)
    m = StopMatcher(stops, include_stop=include)
    out, stopped = "", False
    for k, piece in enumerate(pieces):
        emitted, stopped = m.feed(piece, match=k >= closed)
        out += emitted
        assert want.startswith(out)
        if stopped:
            break
    if not stopped:
        out += m.flush()
    assert (out, stopped) == (want, want_stopped)


def test_include_stop_keeps_the_stop_string_and_streams_at_once() -> None:
    m = StopMatcher(["</a>"], include_stop=True)
    assert m.feed("4 <") == ("4 <", False)  # out at once: nothing is ever taken back
    assert m.feed("/a> more") == ("/a>", True)
    assert m.matched == "</a>"
    hidden = StopMatcher(["<|im_start|>"], include_stop=True)
    assert hidden.feed("hi") == ("hi", False)
    assert hidden.feed("<|im_start|>", visible=False) == ("", True)  # hidden text stays hidden


def test_unmatched_piece_text_is_emitted_and_can_start_a_stop() -> None:
    m = StopMatcher(["ab", "xy"])
    assert m.feed("ab x", match=False) == ("ab ", False)  # "ab" came too early to count
    assert m.feed("y!") == ("", True)  # "xy" began in it and ends in a counted piece
    assert m.matched == "xy"
