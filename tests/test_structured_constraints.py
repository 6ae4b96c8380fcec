"""Structured outputs without a server: request fields → grammar, what llguidance refuses,
the per-choice mask, and the engine enforcing a grammar against a fake model.

The fake model (tests/test_engine.py) wants lowercase letters and a byte-level tokenizer
makes token id == byte, so "the output matches the grammar" is the mask's doing, and a
random-logits walk over the real SmolLM2 vocabulary checks schemas end to end: whatever the
logits, the text parses and validates.
"""

from __future__ import annotations

import asyncio
import json
import re
from types import SimpleNamespace

import jsonschema
import numpy as np
import pytest
from test_engine import TOKENIZER, FakeRuntime, collect, make_engine, req, run  # noqa: F401

from serve.constraints import (
    NUMBER_FRACTION_DIGITS,
    PARALLEL_FILL_ROWS,
    Constraint,
    bound_numbers,
    check_grammar,
    close_objects,
    compiled,
    fill_bitmasks,
    grammar_for_choice,
    grammar_for_regex,
    ll_tokenizer,
    request_grammar,
)
from serve.engine import Engine
from serve.errors import InvalidRequestError
from serve.events import GenerationRequest
from serve.sampling import Sampler, SamplingParams
from serve.tokenizer import Tokenizer


def _error(**fields) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as info:
        found = request_grammar(**fields)
        assert found is not None
        asyncio.run(check_grammar(found[0], TOKENIZER, param=found[1]))
    return info.value


# ------------------------------------------------------------------ request → grammar


def test_text_and_absent_mean_unconstrained():
    assert request_grammar() is None
    assert request_grammar(response_format={"type": "text"}) is None
    assert request_grammar(guided={"json": None, "regex": None}) is None


@pytest.mark.parametrize("fields, param", [
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}},
     "response_format"),
    ({"response_format": {"type": "json_schema", "schema": {"type": "object"}}}, "response_format"),
    ({"structured_outputs": {"json": {"type": "object"}}}, "structured_outputs.json"),
    ({"structured_outputs": {"json": '{"type": "object"}'}}, "structured_outputs.json"),
    ({"structured_outputs": {"regex": "[0-9]+"}}, "structured_outputs.regex"),
    ({"structured_outputs": {"choice": ["a", "b"]}}, "structured_outputs.choice"),
    ({"structured_outputs": {"grammar": 'start: "a"'}}, "structured_outputs.grammar"),
    ({"structured_outputs": {"grammar": 'root ::= "a"'}}, "structured_outputs.grammar"),
    ({"structured_outputs": {"json_object": True}}, "structured_outputs.json_object"),
    ({"json_schema": {"type": "object"}}, "json_schema"),
    ({"grammar": 'root ::= "a" | "b"'}, "grammar"),
    ({"guided": {"json": {"type": "object"}}}, "guided_json"),
    ({"guided": {"regex": "[0-9]+", "choice": None}}, "guided_regex"),
    ({"guided": {"choice": ["a", "b"]}}, "guided_choice"),
    ({"guided": {"grammar": 'root ::= "a"'}}, "guided_grammar"),
])
def test_every_source_gives_a_grammar_that_compiles(fields, param):
    grammar, where = request_grammar(**fields)
    assert where == param
    asyncio.run(check_grammar(grammar, TOKENIZER, param=where))


@pytest.mark.parametrize("fields, param, words", [
    ({"response_format": {"type": "xml"}}, "response_format", "'xml' is not one of"),
    ({"response_format": "json"}, "response_format", "must be an object"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format",
     "json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": [1]}}}, "response_format",
     "must be an object"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}, "strict": "yes"}}},
     "response_format", "strict"),
    ({"response_format": {"type": "json_object"}, "grammar": 'root ::= "a"'}, "grammar", "one output constraint"),
    ({"json_schema": {"type": "object"}, "structured_outputs": {"regex": "a"}}, "json_schema",
     "one output constraint"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs.choice",
     "'structured_outputs.regex', 'structured_outputs.choice'"),
    ({"structured_outputs": {"json": {}, "whitespace_pattern": 3}}, "structured_outputs.whitespace_pattern",
     "string"),
    ({"structured_outputs": {"json": {}, "whitespace_pattern": " ", "disable_any_whitespace": True}},
     "structured_outputs.disable_any_whitespace", "contradict"),
    ({"structured_outputs": {"json": {}, "disable_additional_properties": True}},
     "structured_outputs.disable_additional_properties", "not supported"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs.choice", "non-empty"),
    ({"structured_outputs": {"regex": 3}}, "structured_outputs.regex", "string"),
    ({"structured_outputs": {"structural_tag": "{}"}}, "structured_outputs.structural_tag", "not supported"),
    ({"structured_outputs": {"json": "{nope"}}, "structured_outputs.json", "not valid JSON"),
    ({"grammar": "root ::= foo"}, "grammar", "foo"),
    ({"grammar": "   "}, "grammar", "non-empty"),
    ({"guided": {"regex": "a", "choice": ["a"]}}, "guided_choice", "one output constraint"),
    ({"guided": {"json": {}, "whitespace_pattern": 3}}, "guided_whitespace_pattern", "string"),
    # QA finding 8: a misspelled key or an empty object is never a silently free output
    ({"structured_outputs": {"regexp": "a"}}, "structured_outputs.regexp", "Unknown key"),
    ({"structured_outputs": {"json": {}, "whitespace": " "}}, "structured_outputs.whitespace", "Unknown key"),
    ({"structured_outputs": {}}, "structured_outputs", "must carry one of"),
    ({"structured_outputs": {"json_object": False}}, "structured_outputs", "must carry one of"),
    # QA finding 7: a constraint that can match nothing
    ({"structured_outputs": {"regex": "[^\\s\\S]"}}, "structured_outputs.regex", "match no output"),
    ({"grammar": 'root ::= [^\\x00-\\U0010FFFF]'}, "grammar", ""),
])
def test_malformed_constraints_are_400s_naming_the_field(fields, param, words):
    err = _error(**fields)
    assert err.param == param
    assert words in err.message


BIG = 10 ** 30  # beyond 64 bits: llguidance's builder raises ValueError ("not JSON serializable")


@pytest.mark.parametrize("schema", [
    {"type": "array", "maxItems": BIG}, {"type": "string", "maxLength": BIG}, {"type": "integer", "minimum": BIG},
    {"type": "number", "multipleOf": BIG}, {"enum": [BIG]}, {"const": BIG}, {"type": "integer", "default": BIG},
    {"type": "object", "properties": {"a": {"type": "integer", "maximum": -BIG}}},
])
@pytest.mark.parametrize("source, param", [
    ("response_format", "response_format"), ("structured_outputs", "structured_outputs.json"),
    ("json_schema", "json_schema"), ("guided", "guided_json"),
])
def test_huge_numbers_in_a_schema_are_400s(schema, source, param):
    """QA finding 1: any failure of llguidance's builders on client input is a 400."""
    value = {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
             "structured_outputs": {"json": schema}, "json_schema": schema, "guided": {"json": schema}}[source]
    err = _error(**{source: value})
    assert err.param == param


@pytest.mark.parametrize("fields, param", [
    ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs.regex"),
    ({"structured_outputs": {"regex": "a{99999999999999999999}"}}, "structured_outputs.regex"),
    ({"structured_outputs": {"grammar": "start: /(/"}}, "structured_outputs.grammar"),
    ({"structured_outputs": {"choice": ["\ud800"]}}, "structured_outputs.choice"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "string", "pattern": "(?=a)"}}}},
     "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "string", "minLength": 1.5}}}},
     "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "string", "maxLength": -1}}}},
     "response_format"),
])
def test_odd_values_are_400s_naming_the_field(fields, param):
    assert _error(**fields).param == param


@pytest.mark.parametrize("schema, keyword", [
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "uniqueItems"),
    ({"not": {"type": "string"}}, "not"),
    ({"type": "string", "if": {"minLength": 1}, "then": {"maxLength": 3}}, "if"),
    ({"type": "object", "dependentRequired": {"a": ["b"]}}, "dependentRequired"),
    ({"type": "string", "format": "hostname-of-my-own"}, "format"),
    ({"type": "string", "pattern": "(?=a)b"}, "look-around"),
    ({"$ref": "https://example.com/schema.json"}, "example.com"),
    ({"type": "nonsense"}, "nonsense"),
    # lenient mode stays off even when the schema asks for it
    ({"type": "array", "uniqueItems": True, "x-guidance": {"lenient": True}}, "uniqueItems"),
])
def test_unenforceable_schema_features_are_named(schema, keyword):
    rf = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema, "strict": True}}
    err = _error(response_format=rf)
    assert err.param == "response_format"
    assert "cannot be enforced" in err.message and keyword in err.message


@pytest.mark.parametrize("schema", [
    {"type": "object", "minProperties": 2},
    {"type": "object", "properties": {"a": {}}, "additionalProperties": True, "minProperties": 2},
    {"type": "array", "items": {"type": "object", "patternProperties": {"^x": {}}, "minProperties": 1}},
])
def test_min_properties_over_keys_outside_properties_is_refused(schema):
    """llguidance may repeat such a key and count it twice; a parser keeps one."""
    err = _error(json_schema=schema)
    assert err.param == "json_schema" and "minProperties" in err.message


def test_min_properties_with_optional_listed_keys_is_refused_by_llguidance():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
              "minProperties": 2}
    err = _error(json_schema=schema)
    assert "min/maxProperties" in err.message
    assert request_grammar(json_schema={"enum": [{"minProperties": 3}]}) is not None  # data, not a schema


@pytest.mark.parametrize("options, text, ok", [
    ({}, '{"a": 1}', True),
    ({}, '{\n  "a": 1\n}', True),
    ({}, '{\n\n"a": 1}', False),  # one newline per gap
    ({"disable_any_whitespace": True}, '{"a":1}', True),
    ({"disable_any_whitespace": True}, '{"a": 1}', False),
    ({"whitespace_pattern": "[ ]?"}, '{ "a": 1}', True),
    ({"whitespace_pattern": "[ ]?"}, '{\n"a": 1}', False),
])
def test_json_whitespace(options, text, ok):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    grammar, _ = request_grammar(structured_outputs={"json": schema, **options})
    guided, _ = request_grammar(guided={"json": schema, **options})
    for g in (grammar, guided):
        c = Constraint.new(g, TOKENIZER)
        accepted = c.matcher.consume_tokens(TOKENIZER.encode(text, add_special_tokens=False))
        assert (accepted and c.done) is ok


def test_regex_errors_name_the_grammar():
    err = _error(structured_outputs={"regex": "a(?=b)"})
    assert err.param == "structured_outputs.regex"
    assert "the grammar cannot be enforced" in err.message and "look-around" in err.message


def test_objects_listing_properties_get_no_extra_keys_unless_the_schema_allows_them():
    node = {"type": "object", "properties": {"properties": {"type": "object", "properties": {"a": {}}}}}
    schema = {
        "type": "object",
        "properties": {"n": {"$ref": "#/$defs/node"},
                       "open": {"type": "object", "properties": {"a": {}}, "additionalProperties": True},
                       "pat": {"type": "object", "properties": {"a": {}}, "patternProperties": {"^x": {}}},
                       "any": {"anyOf": [{"type": "object", "properties": {"a": {}}}, {"type": "null"}]},
                       "list": {"type": "array", "items": {"type": "object", "properties": {"b": {}}}},
                       "both": {"allOf": [{"properties": {"a": {}}}, {"properties": {"b": {}}}]},
                       "free": {"type": "object"}},
        "$defs": {"node": node},
    }
    closed = close_objects(schema)
    assert closed["additionalProperties"] is False
    p = closed["properties"]
    node = closed["$defs"]["node"]
    # a property named "properties" is a property, not a keyword
    assert node["additionalProperties"] is False and set(node["properties"]) == {"properties"}
    assert node["properties"]["properties"]["additionalProperties"] is False
    assert p["open"]["additionalProperties"] is True and "additionalProperties" not in p["pat"]
    assert p["any"]["anyOf"][0]["additionalProperties"] is False
    assert p["list"]["items"]["additionalProperties"] is False
    assert all("additionalProperties" not in part for part in p["both"]["allOf"])
    assert "additionalProperties" not in p["free"] and "additionalProperties" not in p["n"]
    assert "additionalProperties" not in schema  # the caller's schema is not modified
    doc = {"n": {"properties": {"a": 1}}, "both": {"a": 1, "b": 2}, "open": {"a": 1, "z": 2}}
    jsonschema.validate(doc, closed)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**doc, "extra": 1}, closed)
    jsonschema.validate({**doc, "extra": 1}, schema)


def test_compiled_grammars_are_cached_by_text():
    g = grammar_for_regex("[ab]{2}", param="x")
    first = compiled(g, TOKENIZER)
    assert compiled(g, TOKENIZER) is first
    assert compiled(grammar_for_regex("[ab]{3}", param="x"), TOKENIZER) is not first


# ------------------------------------------------------------------ the mask


def _allowed(c: Constraint, width: int) -> np.ndarray:
    row = c.mask(np.zeros(width, np.float32), fill_bitmasks([c])[0])
    return np.flatnonzero(row > -np.inf)


def test_mask_allows_exactly_the_grammar_and_pads_a_wider_vocabulary():
    c = Constraint.new(grammar_for_choice(["yes", "no"], param="x"), TOKENIZER)
    assert c.vocab == 257
    assert sorted(_allowed(c, 300)) == [ord("n"), ord("y")]  # the 43 extra logits stay -inf
    c.consume(ord("y"))
    assert list(_allowed(c, 300)) == [ord("e")]
    c.consume(ord("e"))
    c.consume(ord("s"))
    assert c.done
    assert list(_allowed(c, 257)) == [256]  # only EOS after a complete grammar


def test_eos_only_where_the_grammar_accepts_and_never_with_ignore_eos():
    g = grammar_for_regex("[0-9]{1,3}", param="x")
    c = Constraint.new(g, TOKENIZER)
    assert 256 not in _allowed(c, 257)
    c.consume(ord("1"))
    assert 256 in _allowed(c, 257)
    keep_going = Constraint.new(g, TOKENIZER, allow_eos=False)
    keep_going.consume(ord("1"))
    assert 256 not in _allowed(keep_going, 257)


def test_pooled_fill_equals_row_by_row():
    g = grammar_for_regex("[0-9]{2}[a-c]", param="x")
    cs = [Constraint.new(g, TOKENIZER) for _ in range(PARALLEL_FILL_ROWS + 1)]
    for i, c in enumerate(cs):
        c.consume(ord("0") + i % 10)
    pooled = fill_bitmasks(cs)
    for i, c in enumerate(cs):
        assert np.array_equal(pooled[i], fill_bitmasks([c])[0])
    assert np.array_equal(pooled[0], pooled[1]) and list(_allowed(cs[0], 257)) == list(range(48, 58))


def test_unconstrained_rows_are_passed_through_untouched():
    free = SimpleNamespace(constraint=None)
    rows = [np.zeros(4, np.float32), None]
    assert Engine._constrain([free, free], rows) is rows


def test_a_refused_token_is_an_error():
    c = Constraint.new(grammar_for_choice(["yes"], param="x"), TOKENIZER)
    with pytest.raises(RuntimeError, match="refused"):
        c.consume(ord("n"))


def test_logprobs_leave_out_forbidden_alternatives():
    c = Constraint.new(grammar_for_choice(["ab", "ac"], param="x"), TOKENIZER)
    c.consume(ord("a"))
    logits = np.random.default_rng(0).standard_normal(257).astype(np.float32)
    row = c.mask(logits, fill_bitmasks([c])[0])
    s = Sampler(SamplingParams(temperature=0, logprobs=5)).sample(row)
    assert s.token in (ord("b"), ord("c"))
    assert sorted(t for t, _ in s.top) == [ord("b"), ord("c")]
    assert np.isclose(np.exp([p for _, p in s.top]).sum(), 1.0, atol=1e-5)


SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["a", "b", "c"]},
                                               "minItems": 2, "maxItems": 3}},
     "required": ["tags"], "additionalProperties": False},
    {"type": "object", "properties": {"kind": {"const": "point"},
                                      "xy": {"type": "array", "items": {"type": "integer", "minimum": -9,
                                                                        "maximum": 9},
                                             "minItems": 2, "maxItems": 2}},
     "required": ["kind", "xy"], "additionalProperties": False},
    {"$defs": {"node": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1,
                                                                "maximum": 99},
                                                         "code": {"type": "string",
                                                                  "pattern": "^[A-Z]{2}[0-9]$"}},
                        "required": ["id", "code"], "additionalProperties": False}},
     "type": "object", "properties": {"a": {"$ref": "#/$defs/node"},
                                      "b": {"anyOf": [{"$ref": "#/$defs/node"}, {"type": "null"}]}},
     "required": ["a", "b"], "additionalProperties": False},
    {"type": "object", "properties": {"ok": {"type": "boolean"},
                                      "note": {"type": "string", "minLength": 2, "maxLength": 5}},
     "required": ["ok"], "additionalProperties": False},
]


@pytest.fixture(scope="module")
def smollm_tokenizer(default_model_dir) -> Tokenizer:
    return Tokenizer.from_dir(default_model_dir)


@pytest.mark.parametrize("schema", SCHEMAS, ids=range(len(SCHEMAS)))
def test_random_logits_still_give_valid_json(schema, smollm_tokenizer):
    """Whatever the model says, a sampled walk through the mask ends in a valid document."""
    tok = smollm_tokenizer
    grammar, _ = request_grammar(json_schema=schema)
    asyncio.run(check_grammar(grammar, tok, param="json_schema"))
    rng = np.random.default_rng(1)
    for seed in range(3):
        c = Constraint.new(grammar, tok)
        sampler = Sampler(SamplingParams(temperature=1.0, seed=seed))
        out: list[int] = []
        for _ in range(300):
            logits = rng.standard_normal(tok.vocab_size + 64).astype(np.float32) * 3
            logits[sorted(tok.eos_ids)] += 20  # end as soon as the grammar lets it
            token = sampler.sample(c.mask(logits, fill_bitmasks([c])[0])).token
            if token in tok.eos_ids:
                break
            c.consume(token)
            out.append(token)
            if c.done:
                break
        else:
            pytest.fail(f"no end after 300 tokens: {tok.decode(out)!r}")
        jsonschema.validate(json.loads(tok.decode(out)), schema)


def test_a_key_the_object_has_cannot_be_closed_again(smollm_tokenizer):
    """`serve.unique_keys` on the real vocabulary: inside a key, the tokens that would end it
    as a key its own object already has are masked; other objects' keys are not."""
    tok = smollm_tokenizer
    grammar, _ = request_grammar(json_schema={"type": "object", "additionalProperties": True})
    asyncio.run(check_grammar(grammar, tok, param="json_schema"))

    def allowed_after(text: str) -> set[str]:
        c = Constraint.new(grammar, tok)
        c.consume_prefix(tok.encode(text))
        return {tok.decode([int(t)]) for t in _allowed(c, tok.vocab_size)}

    after_i = allowed_after('{"id": 1, "i')
    assert not any(t.startswith('d"') for t in after_i)  # `d"`, `d":` would close "id" again
    assert {'d', '"'} <= after_i  # a longer key, or "i"
    after_d = allowed_after('{"id": 1, "id')
    assert not any(t.startswith('"') for t in after_d) and after_d  # e.g. "id1", "idx"
    # a key of an inner object, a value, or the outer object after the inner closed: free
    assert '"' in allowed_after('{"a": {"id": 1}, "id')
    assert '"' in allowed_after('{"id": {"id')
    assert '"' in allowed_after('{"a": "id", "id')
    assert '"' in allowed_after('{"id": ["id')


# ------------------------------------------------------------------ the engine


def _greq(grammar: str, prompt: str = "hello", **params) -> GenerationRequest:
    params.setdefault("temperature", 0.0)
    return GenerationRequest(tuple(TOKENIZER.encode(prompt)), SamplingParams(**params), grammar=grammar)


def test_engine_enforces_the_grammar_per_choice(make_engine):  # noqa: F811
    engine = make_engine(FakeRuntime(n_slots=3))
    g = grammar_for_regex("[0-9]{3}-[a-z]{2}", param="x")
    texts, finish, _ = run(collect(engine, _greq(g, n=3, temperature=1.0, seed=5)))
    assert len(texts) == 3
    for i in range(3):
        assert re.fullmatch("[0-9]{3}-[a-z]{2}", texts[i]), texts[i]
        assert finish[i] == "stop"


def test_engine_length_mid_grammar_and_free_requests_alongside(make_engine):  # noqa: F811
    engine = make_engine(FakeRuntime(n_slots=2))
    g = grammar_for_regex("[0-9]{20}", param="x")

    async def both():
        return await asyncio.gather(collect(engine, _greq(g, max_tokens=5)),
                                    collect(engine, req(max_tokens=6)))

    (texts, finish, _), (free, free_finish, _) = run(both())
    assert re.fullmatch("[0-9]{5}", texts[0]) and finish[0] == "length"
    assert re.fullmatch("[a-z]{6}", free[0]) and free_finish[0] == "length"


def test_engine_ignore_eos_runs_to_max_tokens_inside_the_grammar(make_engine):  # noqa: F811
    engine = make_engine(FakeRuntime(n_slots=1, eos_logit=50.0))
    g = grammar_for_regex("[a-z]+", param="x")
    texts, finish, _ = run(collect(engine, _greq(g, max_tokens=7)))
    assert len(texts[0]) == 1 and finish[0] == "stop"  # EOS wins as soon as it is allowed
    texts, finish, _ = run(collect(engine, _greq(g, max_tokens=7, ignore_eos=True)))
    assert re.fullmatch("[a-z]{7}", texts[0]) and finish[0] == "length"


def test_engine_stop_strings_still_apply(make_engine):  # noqa: F811
    engine = make_engine(FakeRuntime(n_slots=1))
    g = grammar_for_choice(["abcXdef"], param="x")
    texts, finish, _ = run(collect(engine, _greq(g, stop=["X"])))
    assert texts[0] == "abc" and finish[0] == "stop"


def test_ll_tokenizer_is_built_once():
    assert ll_tokenizer(TOKENIZER) is ll_tokenizer(TOKENIZER)


# ------------------------------------------------------------------ bounded numbers


def test_numbers_get_at_most_ten_fraction_digits_and_no_exponent():
    """A small model can sample `1.000…` until max_tokens (llguidance's numbers have no digit
    bound): every `number` schema is bounded to NUMBER_FRACTION_DIGITS after the point."""
    schema = {"type": "object", "properties": {"x": {"type": "number", "minimum": 0, "maximum": 1}},
              "required": ["x"]}
    grammar, _ = request_grammar(json_schema=schema)
    for text, ok in [('{"x": 0.5}', True), ('{"x": 1.0000000000}', True),
                     ('{"x": 0.1234567891}', True), ('{"x": 1.00000000000}', False),
                     ('{"x": 0.12345678912}', False), ('{"x": 1e-1}', False)]:
        c = Constraint.new(grammar, TOKENIZER)
        accepted = c.matcher.consume_tokens(TOKENIZER.encode(text, add_special_tokens=False))
        assert (accepted and c.done) is ok, text


@pytest.mark.parametrize("prop, text, ok", [
    ({"type": "integer"}, "9999999999999999", True),  # 16 digits, llama.cpp's bound
    ({"type": "integer"}, "12345678901234567", False),
    ({"type": "integer"}, "-9999999999999999", True),
    ({"type": "integer"}, "-12345678901234567", False),
    ({"type": "number"}, "1234567890123456.25", True),
    ({"type": "number"}, "12345678901234567.5", False),
    ({"type": ["integer", "null"]}, "12345678901234567", False),
    ({"type": "integer", "minimum": 5}, "99999999999999999", False),
    ({"type": "integer", "minimum": 5}, "4", False),  # its own side kept
    ({"type": "integer", "maximum": 10**18}, "-12345678901234567", False),
    ({"type": "integer", "maximum": 10**18}, "123456789012345678", True),  # its own range
    ({"type": "integer", "maximum": -10**17}, "-100000000000000000", True),  # would be empty
    ({"type": "integer", "exclusiveMinimum": 3}, "3", False),
    ({"type": "integer", "multipleOf": 5}, "1234567890123455", True),
    ({"type": "integer", "multipleOf": 5}, "12345678901234565", False),
    ({"type": "integer", "enum": [2**54]}, str(2**54), True),  # 17 digits: its own
])
def test_integer_parts_get_at_most_sixteen_digits(prop, text, ok):
    """A pydantic `int` field (`responses.parse`) was written `2018022018020101812121…` to
    max_tokens by the default model: a numeric schema's open sides get ±(10^16 - 1)
    (`INTEGER_LIMIT`, llama.cpp's 16 digits), never past a bound of the schema's own."""
    schema = {"type": "object", "properties": {"a": prop}, "required": ["a"]}
    grammar, _ = request_grammar(json_schema=schema)
    c = Constraint.new(grammar, TOKENIZER)
    accepted = c.matcher.consume_tokens(TOKENIZER.encode('{"a": ' + text + "}",
                                                         add_special_tokens=False))
    assert (accepted and c.done) is ok


def test_bound_numbers_narrows_only_unbounded_number_schemas():
    nested = {"type": "object", "properties": {
        "n": {"type": "number"}, "opt": {"type": ["number", "null"]}, "i": {"type": "integer"},
        "step": {"type": "number", "multipleOf": 0.5}, "e": {"type": "number", "enum": [0.123456789012]},
        "fine": {"type": "number", "minimum": 0.123456789012},
        "list": {"type": "array", "items": {"anyOf": [{"type": "number"}, {"type": "string"}]}},
        "ref": {"$ref": "#/$defs/r"}, "properties": {"allOf": [{"type": "number"}]}},
        "$defs": {"r": {"type": "number", "exclusiveMaximum": 2.5}}}
    out = bound_numbers(nested)
    p = out["properties"]
    bounded = [p["n"], p["opt"], p["list"]["items"]["anyOf"][0], out["$defs"]["r"], p["properties"]["allOf"][0]]
    assert all(s["multipleOf"] == 10.0 ** -NUMBER_FRACTION_DIGITS for s in bounded)
    assert p["step"]["multipleOf"] == 0.5  # the schema's own
    for s in (p["i"], p["e"], p["fine"], p["list"]["items"]["anyOf"][1], p["ref"]):
        assert "multipleOf" not in s
    assert "multipleOf" not in nested["properties"]["n"]  # the caller's schema is not modified
    assert request_grammar(json_schema=nested) is not None  # compiles


def test_tool_arguments_numbers_are_bounded_too():
    from serve.tool_grammar import tool_grammar

    grammar = tool_grammar("generic", [("f", {"type": "object", "properties": {"x": {"type": "number"}},
                                              "required": ["x"]})], mode="required")
    head = '<tool_call>\n{"name": "f", "arguments": {"x": '
    for number, ok in [("2.5", True), ("2.1234567891", True), ("2.12345678912", False)]:
        c = Constraint.new(grammar, TOKENIZER)
        text = head + number + "}}\n</tool_call>"
        accepted = c.matcher.consume_tokens(TOKENIZER.encode(text, add_special_tokens=False))
        assert (accepted and c.matcher.is_accepting()) is ok, number


@pytest.mark.parametrize("text, ok", [
    ('{"a": 100, "b": -3, "c": [0, 2.25, true, null], "d": {"e": "x", "f": -0.1234567891}}', True),
    ('{}', True),
    ('{"a": 1.00000000000}', False),  # 11 fraction digits
    ('{"a": [1, {"b": 0.12345678912}]}', False),
    ('{"a": 1e5}', False),
    ('{"a": 9999999999999999.5}', True),
    ('{"a": [12345678901234567]}', False),  # 17 digits before the point
])
def test_json_object_numbers_are_bounded_too(text, ok):
    for fields in ({"response_format": {"type": "json_object"}},
                   {"structured_outputs": {"json_object": True}}):
        grammar, _ = request_grammar(**fields)
        c = Constraint.new(grammar, TOKENIZER)
        accepted = c.matcher.consume_tokens(TOKENIZER.encode(text, add_special_tokens=False))
        assert (accepted and c.done) is ok, (fields, text)
