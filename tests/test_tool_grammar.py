"""Tool grammars checked with llguidance directly: what each family's parser reads as a
valid call is accepted, anything else is refused, for every tool_choice mode."""

from __future__ import annotations

import pytest
from llguidance import LLMatcher

from serve.constraints import ll_tokenizer
from serve.parsers import ChoiceParser, ToolCallArgs, ToolCallStart, collapse
from serve.tokenizer import Tokenizer
from serve.tool_grammar import tool_grammar

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
           "required": ["city"], "additionalProperties": False}
FUNCS = [("get_weather", WEATHER), ("ping", None)]


@pytest.fixture(scope="module")
def tok(default_model_dir):
    return Tokenizer.from_dir(default_model_dir)


def _accepts(tok, lark, text):
    ll = ll_tokenizer(tok)
    grammar = LLMatcher.grammar_from_lark(lark)
    assert LLMatcher.validate_grammar(grammar, ll) == ""
    m = LLMatcher(ll, grammar, log_level=0)
    ok = m.consume_tokens(tok.encode(text, add_special_tokens=False))
    return ok and m.is_accepting()


CASES = [
    # family, mode, parallel, text, accepted
    ("hermes", "required", True, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', True),
    ("hermes", "required", True, '<tool_call>\n{"name": "ping", "arguments": {}}\n</tool_call>\n'
                                 '<tool_call>\n{"name": "ping", "arguments": {}}\n</tool_call>', True),
    ("hermes", "required", False, '<tool_call>\n{"name": "ping", "arguments": {}}\n</tool_call>\n'
                                  '<tool_call>\n{"name": "ping", "arguments": {}}\n</tool_call>', False),
    ("hermes", "required", True, '<tool_call>\n{"name": "get_weather", "arguments": {"town": "Paris"}}\n</tool_call>', False),
    ("hermes", "required", True, '<tool_call>\n{"name": "nope", "arguments": {}}\n</tool_call>', False),
    ("hermes", "required", True, 'Sure! <tool_call>\n{"name": "ping", "arguments": {}}\n</tool_call>', False),
    ("hermes", "named", True, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "P", "days": 2}}\n</tool_call>', True),
    ("hermes", "named", True, '<tool_call>\n{"name": "ping", "arguments": {}}\n</tool_call>', False),
    ("hermes", "auto", True, "Just text, no call.", True),
    ("hermes", "auto", True, 'Checking.\n<tool_call>\n{"name": "ping", "arguments": {}}\n</tool_call>', True),
    ("hermes", "auto", True, 'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {}}\n</tool_call>', False),
    ("hermes", "auto", True, "Checking. <tool_call> oops", False),
    ("hermes", "auto", False, "Just text.", True),
    ("hermes", "auto", False, 'Checking.\n<tool_call>\n{"name": "ping", "arguments": {}}\n</tool_call>', True),
    ("hermes", "auto", False, 'Checking.\n<tool_call>\n{"name": "ping", "arguments": {}}\n</tool_call>\n'
                              '<tool_call>\n{"name": "ping", "arguments": {}}\n</tool_call>', False),
    ("hermes", "auto", False, "Checking. <tool_call> oops", False),
    ("generic", "required", True, '<tool_call>\n{"name": "ping", "arguments": {}}\n</tool_call>', True),
    ("llama3_json", "required", True, '{"name": "get_weather", "parameters": {"city": "Oslo"}}', True),
    ("llama3_json", "required", True, '{"name": "ping", "parameters": {}}; {"name": "ping", "parameters": {}}', True),
    ("llama3_json", "auto", True, "Hello there.", True),
    ("llama3_json", "auto", True, '{"name": "ping", "parameters": {}}', True),
    ("llama3_json", "auto", True, '{"name": "pong"}', False),
    ("mistral", "required", True, '[{"name": "get_weather", "arguments": {"city": "Rome"}}]', True),
    ("mistral", "auto", True, "[1] text", True),
    ("mistral", "auto", True, '[{"name": "x", "arguments": {}}]', False),
    ("pythonic", "required", True, '[get_weather(city="Rome", days=3), ping()]', True),
    ("pythonic", "required", True, '[get_weather(city=3)]', False),
    ("pythonic", "auto", True, "No call.", True),
]


@pytest.mark.parametrize("family,mode,parallel,text,accepted", CASES)
def test_grammar(tok, family, mode, parallel, text, accepted):
    lark = tool_grammar(family, FUNCS, mode=mode, parallel=parallel)
    assert _accepts(tok, lark, text) is accepted


@pytest.mark.parametrize("family,mode,parallel,text,accepted", [c for c in CASES if c[4]])
def test_accepted_text_parses_as_calls(family, mode, parallel, text, accepted):
    """What a grammar lets through is what the parser reads: calls of offered functions."""
    deltas = collapse(ChoiceParser(tool_parser=family).feed(text) + [])
    parser = ChoiceParser(tool_parser=family)
    deltas = collapse(parser.feed(text) + parser.finish())
    starts = [d for d in deltas if isinstance(d, ToolCallStart)]
    assert all(s.name in ("get_weather", "ping") for s in starts)
    assert len([d for d in deltas if isinstance(d, ToolCallArgs)]) == len(starts)
    if mode != "auto":
        assert starts and len(deltas) == 2 * len(starts)


def test_reasoning_prefix(tok):
    call = '<tool_call>\n{"name": "ping", "arguments": {}}\n</tool_call>'
    inside = tool_grammar("hermes", FUNCS, mode="required", reasoning="inside")
    assert _accepts(tok, inside, "Let me think </tool_call> about it.\n</think>\n\n" + call)
    assert not _accepts(tok, inside, call)
    opened = tool_grammar("hermes", FUNCS, mode="required", reasoning="open")
    assert _accepts(tok, opened, "<think>\nhmm\n</think>\n\n" + call)
    assert _accepts(tok, opened, call)
    assert not _accepts(tok, opened, "<think>\nhmm\n</think>\n\nprose " + call)


def test_undeclared_arguments_are_refused(tok):
    open_schema = {"type": "object", "properties": {"city": {"type": "string"}}}
    lark = tool_grammar("hermes", [("f", open_schema)], mode="required")
    ok = '<tool_call>\n{"name": "f", "arguments": {"city": "Oslo"}}\n</tool_call>'
    assert _accepts(tok, lark, ok)
    assert not _accepts(tok, lark, ok.replace('"Oslo"', '"Oslo", "extra": 1'))


@pytest.mark.parametrize("family,call", [
    ("hermes", '<tool_call>\n{"name": "ping", "arguments": {}}\n</tool_call>'),
    ("llama3_json", '{"name": "ping", "parameters": {}}'),
])
def test_auto_with_an_answer_format(tok, family, call):
    answer = LLMatcher.grammar_from_json_schema(
        {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]})
    grammar = tool_grammar(family, FUNCS, mode="auto", answer=answer)
    ll = ll_tokenizer(tok)
    assert LLMatcher.validate_grammar(grammar, ll) == ""

    def accepts(text):
        m = LLMatcher(ll, grammar, log_level=0)
        return m.consume_tokens(tok.encode(text, add_special_tokens=False)) and m.is_accepting()

    assert accepts(call)
    assert accepts('{"n": 3}')
    assert not accepts("free text")
    assert not accepts('{"n": "x"}')


def test_special_token_markers(tok):
    """Where the tokenizer has [TOOL_CALLS] / <|python_tag|> as special tokens, calls start
    with them (id 3 stands in for the marker here)."""
    ll = ll_tokenizer(tok)
    call = tok.encode('[{"name": "ping", "arguments": {}}]', add_special_tokens=False)

    def accepts(lark, ids):
        m = LLMatcher(ll, LLMatcher.grammar_from_lark(lark), log_level=0)
        return m.consume_tokens(ids) and m.is_accepting()

    for mode in ("required", "auto"):
        lark = tool_grammar("mistral", FUNCS, mode=mode, special={"[TOOL_CALLS]": 3})
        assert accepts(lark, [3, *call])
        assert not accepts(lark, call)
    assert accepts(tool_grammar("mistral", FUNCS, mode="auto", special={"[TOOL_CALLS]": 3}),
                   tok.encode("plain text", add_special_tokens=False))
    llama = tool_grammar("llama3_json", FUNCS, mode="required", special={"<|python_tag|>": 3})
    body = tok.encode('{"name": "ping", "parameters": {}}', add_special_tokens=False)
    assert accepts(llama, [3, *body]) and accepts(llama, body)


ONE_CALL = {
    "hermes": '<tool_call>\n{"name": "ping", "arguments": {}}\n</tool_call>',
    "generic": '<tool_call>\n{"name": "ping", "arguments": {}}\n</tool_call>',
    "llama3_json": '{"name": "ping", "parameters": {}}',
    "mistral": '[{"name": "ping", "arguments": {}}]',
    "pythonic": "[ping()]",
}


@pytest.mark.parametrize("mode", ["auto", "required", "named"])
@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("family", sorted(ONE_CALL))
def test_output_ends_after_the_last_allowed_call(tok, family, mode, parallel):
    """QA finding 4: once the last call the grammar allows is written (one call without
    parallel_tool_calls, or a closed call list), EOS is allowed and at most two blanks may
    follow: never newlines until max_tokens."""
    if parallel and family in ("hermes", "generic"):
        return  # parallel hermes calls are open-ended: another call (or text, in auto) may follow
    funcs = [("ping", None), ("get_weather", WEATHER)] if mode == "named" else FUNCS
    lark = tool_grammar(family, funcs, mode=mode, parallel=parallel)
    ll = ll_tokenizer(tok)
    m = LLMatcher(ll, LLMatcher.grammar_from_lark(lark), log_level=0)
    assert m.consume_tokens(tok.encode(ONE_CALL[family], add_special_tokens=False))
    assert m.is_accepting()
    newline = tok.encode("\n", add_special_tokens=False)
    blanks = 0
    while not m.is_stopped() and m.validate_tokens(newline) == 1:
        assert m.consume_tokens(newline)
        blanks += 1
        assert blanks <= 2, "unbounded blanks after the last call"
    assert m.is_accepting()  # EOS allowed wherever the blanks end
