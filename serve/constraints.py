"""Structured outputs: a request's constraint as an llguidance grammar, compiled off the engine
thread, and the per-choice matcher that masks each step's logits.

```
route:   response_format │ structured_outputs │ json_schema │ grammar    (at most one)
           └─ request_grammar() ─► llguidance grammar string ─► await check_grammar()
                                   (GenerationRequest.grammar)     thread pool: validate +
                                                                   compile, LRU by text
engine:  Choice.constraint = Constraint.new(grammar) (a copy of the compiled matcher)
         each step: fill_bitmasks(constrained rows) ─► Constraint.mask(row) ─► Sampler
                    ─► Constraint.consume(token); the choice stops when the grammar is complete
```

The currency is llguidance's grammar string (what `LLMatcher.grammar_from_json_schema`,
`grammar_from_lark` and `grammar_from_regex` return), so tool calling builds its grammars
the same way and hands them to the same engine field.

JSON schemas compile with llguidance's `lenient` option off: a keyword it cannot enforce
(`not`, `if`/`then`, `uniqueItems`, `dependentRequired`, unknown `format`s, remote `$ref`s,
look-around in `pattern`, …) is a 400 naming it, never a silently looser schema. Any
warning llguidance reports is a 400 too. An object schema that lists `properties` and says
nothing of `additionalProperties` gets no extra keys (llama.cpp's and vLLM/xgrammar's
default: the output still validates against the schema as sent, and a small model cannot
run away adding keys); `"additionalProperties": true` allows them. A `number` gets at most
`NUMBER_FRACTION_DIGITS` digits after the point and no exponent (`bound_numbers`; json_object
is a recursive any-JSON schema with the same bound): llguidance's numbers are otherwise
unbounded, and a small model can write `1.000…` until max_tokens. No object of a JSON document
repeats a key (`serve.unique_keys`: llguidance's grammar allows `{"id": 1, "id": 1}` in a map,
which `json.loads` would silently collapse).

Formats: llguidance's grammar syntax and JSON Schema coverage,
https://github.com/guidance-ai/llguidance/blob/main/docs/syntax.md and docs/json_schema.md;
GBNF (llama.cpp's grammars/README.md) is converted by `llguidance.gbnf_to_lark`.
"""

from __future__ import annotations

import json
import logging
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from llguidance import LLExecutor, LLMatcher, LLTokenizer
from llguidance.gbnf_to_lark import any_to_lark
from llguidance.numpy import (
    allocate_token_bitmask,
    fill_next_token_bitmask,
    fill_next_token_bitmask_par,
)
from starlette.concurrency import run_in_threadpool

from serve.errors import InvalidRequestError
from serve.unique_keys import UniqueKeys, key_closers

__all__ = [
    "NUMBER_FRACTION_DIGITS", "Constraint", "bound_numbers", "check_grammar", "check_numbers",
    "close_objects", "compiled", "fill_bitmasks", "grammar_for_choice",
    "grammar_for_gbnf", "grammar_for_json_schema", "grammar_for_lark", "grammar_for_regex",
    "grammar_for_response_format", "grammar_for_structured_outputs", "ll_tokenizer",
    "request_grammar", "require_compiled",
]

log = logging.getLogger("serve.constraints")

# Whitespace between JSON tokens: at most one newline plus a 20-character indent per gap
# (llama.cpp's json-schema-to-grammar bounds it the same way). Unbounded whitespace lets a
# small model loop on blank lines until max_tokens; none at all forces unnatural tokens.
JSON_WHITESPACE = r"[ \t]{0,4}|[ \t]{0,4}\n[ \t]{0,20}"
_JSON_OVERRIDES = {"lenient": False}  # after the schema's own "x-guidance": no opt-in leniency

# Digits a `number` may have after the decimal point (`bound_numbers`). llama.cpp's
# json-schema-to-grammar allows 16; llguidance reads `multipleOf` through an f64 and takes at
# most 1e-10 exactly ("too many digits" beyond), so 10 here.
NUMBER_FRACTION_DIGITS = 10
_NUMBER_BOUND = {"multipleOf": 10.0 ** -NUMBER_FRACTION_DIGITS}
# Digits of an `integer`'s (or a `number`'s integer part) without a range of its own:
# llama.cpp's json-schema-to-grammar stops integral parts at 16 digits too. A 135M model wrote
# `{"a": 2018022018020101812121…` to max_tokens for a pydantic `int` (`responses.parse`).
INTEGER_DIGITS = 16
INTEGER_LIMIT = 10**INTEGER_DIGITS - 1
# json_object: any JSON object, its numbers bounded as a schema's are (`bound_numbers`);
# llguidance's own any-JSON (`{"type": "object"}`) writes numbers of any length.
_ANY_VALUE = {"anyOf": [
    {"type": "null"}, {"type": "boolean"},
    {"type": "number", **_NUMBER_BOUND, "minimum": -INTEGER_LIMIT, "maximum": INTEGER_LIMIT},
    {"type": "string"},
    {"type": "array", "items": {"$ref": "#/$defs/value"}},
    {"type": "object", "additionalProperties": {"$ref": "#/$defs/value"}},
]}
ANY_JSON_OBJECT = {"type": "object", "additionalProperties": {"$ref": "#/$defs/value"},
                   "$defs": {"value": _ANY_VALUE}}
CACHE_SIZE = 64  # compiled grammars kept (LRU by grammar text)
# How `grammar_from_json_schema`'s output begins: a grammar of one JSON document (response_format,
# structured_outputs.json, json_object), whose objects get unique keys (`Constraint.keys`); tool
# grammars are Lark with JSON inside text, where the lexer could not tell where the JSON starts
_JSON_DOCUMENT = '{"grammars":[{"name":"json_schema","json_schema":'


# --------------------------------------------------------------------- request → grammar


def grammar_for_json_schema(schema: Any, *, param: str, whitespace: str | None = JSON_WHITESPACE) -> str:
    """The grammar of JSON documents valid under `schema` (a JSON Schema object, or its
    JSON text). Only the shape (and `_check_min_properties`) is checked here; `check_grammar`
    finds what llguidance does not support. `whitespace` is the regex allowed between JSON
    tokens (None: none at all, compact JSON).

    Raises:
        InvalidRequestError: `schema` is not a JSON object (or `true`), or needs what
            llguidance would not enforce.
    """
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as exc:
            raise InvalidRequestError(f"Invalid '{param}': the schema is not valid JSON ({exc}).",
                                      param=param) from None
    if schema is True:
        schema = {}
    if not isinstance(schema, Mapping):
        raise InvalidRequestError(f"Invalid '{param}': a JSON schema must be an object.", param=param)
    try:
        check_numbers(schema, param=param)
        closed = bound_numbers(close_objects(schema))
        _check_min_properties(closed, param)
    except RecursionError:
        raise InvalidRequestError(f"Invalid '{param}': the JSON schema is nested too deeply.",
                                  param=param) from None
    spacing = ({"whitespace_pattern": whitespace} if whitespace is not None
               else {"whitespace_flexible": False, "whitespace_pattern": None})
    return _built(LLMatcher.grammar_from_json_schema, closed, defaults=spacing, overrides=_JSON_OVERRIDES,
                  param=param, what="the JSON schema")


def _built(build: Any, *args: Any, param: str, what: str = "the grammar", **kwargs: Any) -> str:
    """`build(*args, **kwargs)` (one of llguidance's `grammar_from_*`), any exception it
    raises on the client's input (a number beyond 64 bits: "Value is not JSON serializable",
    a regex it cannot parse, a schema too deep) a 400 naming `param`.

    Raises:
        InvalidRequestError: the builder failed.
    """
    try:
        return build(*args, **kwargs)
    except InvalidRequestError:
        raise
    except Exception as exc:
        hint = " (numbers must fit in 64 bits)" if "not JSON serializable" in str(exc) else ""
        raise InvalidRequestError(f"Invalid '{param}': {what} cannot be enforced: {exc}{hint}",
                                  param=param) from None


def check_numbers(value: Any, *, param: str) -> None:
    """Every integer in a JSON schema (bounds, `enum`, `const`, `default`, …) fits in 64 bits,
    as llguidance reads them: a larger one fails its builder, or inside a Lark `%json` turns
    into an inexact float, silently another schema.

    Raises:
        InvalidRequestError: an integer outside [-2**63, 2**64), naming `param`.
        RecursionError: nested deeper than Python's recursion limit.
    """
    if isinstance(value, Mapping):
        for v in value.values():
            check_numbers(v, param=param)
    elif isinstance(value, list):
        for v in value:
            check_numbers(v, param=param)
    elif isinstance(value, int) and not isinstance(value, bool) and not -2 ** 63 <= value < 2 ** 64:
        raise InvalidRequestError(f"Invalid '{param}': the JSON schema holds the integer {value}, "
                                  "beyond 64 bits; this server enforces numbers up to 2**64.", param=param)


def _check_min_properties(schema: Any, param: str) -> None:
    """llguidance may write a key matched by `additionalProperties` or `patternProperties`
    twice and counts both toward `minProperties`, while a JSON parser keeps one: refuse a
    `minProperties` that such keys would have to make up (beyond the `required` ones)."""
    if isinstance(schema, list):
        for s in schema:
            _check_min_properties(s, param)
        return
    if not isinstance(schema, Mapping):
        return
    extra_keys = "patternProperties" in schema or schema.get("additionalProperties", True) is not False
    if isinstance(schema.get("minProperties"), int) and extra_keys and \
            schema["minProperties"] > len(set(schema.get("required") or ())):
        raise InvalidRequestError(
            f"Invalid '{param}': the JSON schema cannot be enforced: 'minProperties' "
            f"{schema['minProperties']} over keys outside 'properties' (a generated object may "
            "repeat such a key, which parsers count once); list the keys in 'properties' and "
            "set 'additionalProperties': false.", param=param)
    for key, value in schema.items():  # every subschema, and maps of them (checked alike)
        if key not in _DATA_KEYWORDS and isinstance(value, Mapping | list):
            _check_min_properties(value, param)


_DATA_KEYWORDS = ("const", "enum", "default", "examples", "required")  # values, not schemas


# Keywords whose value is a subschema, a list of them, or a map of name → subschema, where
# a closed subschema only narrows what the whole accepts. Left out on purpose: allOf, then,
# else, dependentSchemas (intersections: closing one part would forbid the others' keys) and
# not (closing inside it would widen it).
_SUBSCHEMA = ("additionalProperties", "items", "additionalItems", "contains",
              "unevaluatedItems", "unevaluatedProperties")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "prefixItems")
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_OPEN_KEYS = ("additionalProperties", "patternProperties", "unevaluatedProperties", "allOf", "$ref")


def _map_subschemas(schema: Mapping, fn: Callable[[Any], Any], more: tuple[str, ...] = (),
                    more_lists: tuple[str, ...] = (), more_maps: tuple[str, ...] = ()) -> dict:
    """A copy of `schema` with `fn` applied to each direct subschema: the values of
    `_SUBSCHEMA` (+ `more`) keys, the items of `_SUBSCHEMA_LISTS` (+ `more_lists`) lists and
    the values of `_SUBSCHEMA_MAPS` (+ `more_maps`) mappings. The walk `close_objects` and
    `bound_numbers` share."""
    out = dict(schema)
    for key in (*_SUBSCHEMA, *more):
        if key in out:
            out[key] = fn(out[key])
    for key in (*_SUBSCHEMA_LISTS, *more_lists):
        if isinstance(out.get(key), list):
            out[key] = [fn(s) for s in out[key]]
    for key in (*_SUBSCHEMA_MAPS, *more_maps):
        if isinstance(out.get(key), Mapping):
            out[key] = {name: fn(s) for name, s in out[key].items()}
    return out


def close_objects(schema: Any) -> Any:
    """A copy of `schema` where every object schema that lists `properties` and leaves extra
    keys unsaid (no `additionalProperties`, `patternProperties`, `unevaluatedProperties`,
    and not merged with `allOf` or a sibling `$ref`) has `"additionalProperties": false`.
    Stricter, never looser: whatever it accepts the original accepts."""
    if isinstance(schema, list):  # `items` in its old tuple form
        return [close_objects(s) for s in schema]
    if not isinstance(schema, Mapping):
        return schema
    out = _map_subschemas(schema, close_objects)
    if isinstance(out.get("properties"), Mapping) and not any(k in out for k in _OPEN_KEYS):
        out["additionalProperties"] = False
    return out


_RANGE_KEYS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")


def bound_numbers(schema: Any) -> Any:
    """A copy of `schema` where every `"type": "number"` schema (or a type list naming it)
    that has no `multipleOf`, `enum` or `const` gets `"multipleOf": 1e-10`: llguidance then
    lets a number have at most `NUMBER_FRACTION_DIGITS` digits after the point, and no
    exponent (its number regex, `-?(0|[1-9][0-9]*)(\\.[0-9]+)?([eE][+-]?[0-9]+)?`, has no digit
    bound and no option for one; a 135M model sampled `"confidence": 1.000…` to max_tokens).
    Left alone where a range bound has more fraction digits than that (the bound could leave
    no value). Every `number` or `integer` schema without `enum`/`const` also gets
    `minimum: -INTEGER_LIMIT` and `maximum: INTEGER_LIMIT` on each side its own range leaves
    open (at most `INTEGER_DIGITS` digits before the point). Stricter, never looser: whatever
    it accepts the original accepts."""
    if isinstance(schema, list):  # `items` in its old tuple form
        return [bound_numbers(s) for s in schema]
    if not isinstance(schema, Mapping):
        return schema
    out = _map_subschemas(schema, bound_numbers, ("then", "else"), ("allOf",),
                          ("dependentSchemas",))
    kind = out.get("type")
    kinds = kind if isinstance(kind, list) else [kind]
    number = "number" in kinds
    ranges_fit = all(_fits_fraction_digits(out[k]) for k in _RANGE_KEYS if k in out)
    if number and ranges_fit and not any(k in out for k in ("multipleOf", "enum", "const")):
        out.update(_NUMBER_BOUND)
    if (number or "integer" in kinds) and not any(k in out for k in ("enum", "const")):
        _bound_integer_part(out)
    return out


def _bound_integer_part(schema: dict) -> None:
    """Give a numeric schema the range ±`INTEGER_LIMIT` on each side it leaves open, unless
    its other bound lies beyond that (the range would then be empty)."""
    def numeric(key: str) -> float | None:
        v = schema.get(key)
        return v if isinstance(v, int | float) and not isinstance(v, bool) else None

    lows = [v for v in (numeric("minimum"), numeric("exclusiveMinimum")) if v is not None]
    highs = [v for v in (numeric("maximum"), numeric("exclusiveMaximum")) if v is not None]
    if not lows and "minimum" not in schema and all(h > -INTEGER_LIMIT for h in highs):
        schema["minimum"] = -INTEGER_LIMIT
    if not highs and "maximum" not in schema and all(lo < INTEGER_LIMIT for lo in lows):
        schema["maximum"] = INTEGER_LIMIT


def _fits_fraction_digits(value: Any) -> bool:
    """Whether `value` (a schema's range bound) has at most NUMBER_FRACTION_DIGITS digits
    after the point (a bool, from draft 4's exclusive flags, counts as fitting)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return True
    return round(value, NUMBER_FRACTION_DIGITS) == value


def grammar_for_regex(regex: Any, *, param: str) -> str:
    """Text matching `regex` in full (Rust `regex` syntax; no look-around or backreferences)."""
    if not isinstance(regex, str):
        raise InvalidRequestError(f"Invalid '{param}': a regex must be a string.", param=param)
    return _built(LLMatcher.grammar_from_regex, regex, param=param, what="the regex")


def grammar_for_choice(choices: Any, *, param: str) -> str:
    """Exactly one of the strings in `choices` (vLLM's `choice`)."""
    if (not isinstance(choices, list) or not choices
            or not all(isinstance(c, str) and c for c in choices)):
        raise InvalidRequestError(f"Invalid '{param}': must be a non-empty list of non-empty strings.",
                                  param=param)
    return _built(LLMatcher.grammar_from_lark, "start: " + " | ".join(json.dumps(c) for c in choices),
                  param=param)


def grammar_for_lark(text: Any, *, param: str) -> str:
    """A grammar in llguidance's Lark dialect (its `start` rule generates the output)."""
    if not isinstance(text, str) or not text.strip():
        raise InvalidRequestError(f"Invalid '{param}': a grammar must be a non-empty string.", param=param)
    return _built(LLMatcher.grammar_from_lark, text, param=param)


def grammar_for_gbnf(text: Any, *, param: str) -> str:
    """A grammar in llama.cpp's GBNF (`root ::= ...`), or already in Lark syntax (what vLLM's
    `grammar` accepts too), converted by llguidance.

    Raises:
        InvalidRequestError: not a string, or GBNF the converter rejects (with its position).
    """
    if not isinstance(text, str) or not text.strip():
        raise InvalidRequestError(f"Invalid '{param}': a grammar must be a non-empty string.", param=param)
    try:
        lark = any_to_lark(text)
    except Exception as exc:  # GbnfToLarkError and the converter's internal errors alike
        raise InvalidRequestError(f"Invalid '{param}': the GBNF grammar does not parse: {exc}",
                                  param=param) from None
    return _built(LLMatcher.grammar_from_lark, lark, param=param)


def grammar_for_response_format(response_format: Any, *, param: str = "response_format") -> str | None:
    """OpenAI's `response_format` → a grammar (None for `{"type": "text"}`).

    `{"type": "json_object"}` is any JSON object (llama.cpp's `"schema"` beside it narrows it);
    `{"type": "json_schema", "json_schema": {"name", "schema", "strict", "description"}}` is
    the schema, enforced whatever `strict` says (llama.cpp's top-level `"schema"` is read too).

    Raises:
        InvalidRequestError: another type, or a malformed json_schema (param `response_format`).
    """
    if response_format is None:
        return None
    if not isinstance(response_format, Mapping):
        raise InvalidRequestError(f"Invalid '{param}': must be an object with a 'type'.", param=param)
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        schema = response_format.get("schema")
        return grammar_for_json_schema(ANY_JSON_OBJECT if schema is None else schema, param=param)
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if spec is None and "schema" in response_format:  # llama.cpp's flat spelling
            spec = {"schema": response_format["schema"]}
        if not isinstance(spec, Mapping):
            raise InvalidRequestError(f"Missing required parameter: '{param}.json_schema'.", param=param)
        for key in ("name", "description"):
            if spec.get(key) is not None and not isinstance(spec[key], str):
                raise InvalidRequestError(f"Invalid '{param}.json_schema.{key}': must be a string.",
                                          param=param)
        if spec.get("strict") is not None and not isinstance(spec["strict"], bool):
            raise InvalidRequestError(f"Invalid '{param}.json_schema.strict': must be a boolean.",
                                      param=param)
        if spec.get("schema") is None:
            raise InvalidRequestError(f"Missing required parameter: '{param}.json_schema.schema'.",
                                      param=param)
        return grammar_for_json_schema(spec["schema"], param=param)
    raise InvalidRequestError(
        f"Invalid '{param}.type': {kind!r} is not one of 'text', 'json_object', 'json_schema'.",
        param=param)


# vLLM's StructuredOutputsParams: the constraint keys, and the options we cannot honour.
_SO_KINDS = ("json", "regex", "choice", "grammar", "json_object")
_SO_UNSUPPORTED = ("structural_tag", "disable_additional_properties")
# Options: JSON whitespace, and vLLM's backend fallback (no other backend here).
_SO_OPTIONS = ("whitespace_pattern", "disable_any_whitespace", "disable_fallback")
_SO_KEYS = (*_SO_KINDS, *_SO_UNSUPPORTED, *_SO_OPTIONS)


def grammar_for_structured_outputs(spec: Any, *, param: str = "structured_outputs") -> str | None:
    """vLLM's `structured_outputs` object: one of `json` (schema), `regex`, `choice` (list of
    strings), `grammar` (Lark or GBNF), `json_object: true`; for the JSON kinds
    `whitespace_pattern` (regex between tokens) or `disable_any_whitespace: true` (none).

    Raises:
        InvalidRequestError: not an object, an unknown key, no kind or several at once, an
            option we do not honour.
    """
    found = _structured_outputs(spec, param=param)
    return None if found is None else found[0]


def _structured_outputs(spec: Any, *, param: str, sep: str = ".") -> tuple[str, str] | None:
    """`(grammar, param of the kind given)`: `structured_outputs.regex`, or with param
    "guided" and sep "_" vLLM's older `guided_regex`."""
    if spec is None:
        return None
    if not isinstance(spec, Mapping):
        raise InvalidRequestError(f"Invalid '{param}': must be an object.", param=param)
    if sep == ".":  # vLLM's object (the guided_* fields are ours to build): no unknown keys
        unknown = [k for k in spec if k not in _SO_KEYS]
        if unknown:
            raise InvalidRequestError(
                f"Unknown key '{param}.{unknown[0]}'; '{param}' takes {', '.join(_SO_KEYS)}.",
                param=f"{param}.{unknown[0]}")
    for key in _SO_UNSUPPORTED:
        if spec.get(key) not in (None, False):
            raise InvalidRequestError(f"'{param}{sep}{key}' is not supported by this server.",
                                      param=f"{param}{sep}{key}")
    kinds = [k for k in _SO_KINDS if spec.get(k) not in (None, False)]
    if len(kinds) > 1:
        names = ", ".join(f"'{param}{sep}{k}'" for k in kinds)
        raise InvalidRequestError(f"A request may carry one output constraint; got {names}.",
                                  param=f"{param}{sep}{kinds[1]}")
    if not kinds:
        if sep == ".":
            raise InvalidRequestError(f"'{param}' must carry one of {', '.join(_SO_KINDS)}.", param=param)
        return None
    kind, value, where = kinds[0], spec[kinds[0]], f"{param}{sep}{kinds[0]}"
    whitespace = _whitespace(spec, param=param, sep=sep)
    if kind == "json":
        grammar = grammar_for_json_schema(value, param=where, whitespace=whitespace)
    elif kind == "json_object":
        grammar = grammar_for_json_schema(ANY_JSON_OBJECT, param=where, whitespace=whitespace)
    elif kind == "regex":
        grammar = grammar_for_regex(value, param=where)
    elif kind == "choice":
        grammar = grammar_for_choice(value, param=where)
    else:
        grammar = grammar_for_gbnf(value, param=where)
    return grammar, where


def _whitespace(spec: Mapping[str, Any], *, param: str, sep: str) -> str | None:
    """The JSON whitespace regex a vLLM spec asks for (ours by default; None: none)."""
    pattern = spec.get("whitespace_pattern")
    if pattern is not None and not isinstance(pattern, str):
        raise InvalidRequestError(f"Invalid '{param}{sep}whitespace_pattern': must be a string.",
                                  param=f"{param}{sep}whitespace_pattern")
    if spec.get("disable_any_whitespace"):
        if pattern:
            raise InvalidRequestError(
                f"'{param}{sep}whitespace_pattern' and '{param}{sep}disable_any_whitespace' "
                "contradict each other.", param=f"{param}{sep}disable_any_whitespace")
        return None
    return pattern if pattern is not None else JSON_WHITESPACE


def request_grammar(*, response_format: Any = None, structured_outputs: Any = None,
                    json_schema: Any = None, grammar: Any = None,
                    guided: Mapping[str, Any] | None = None) -> tuple[str, str] | None:
    """The one constraint a request carries: `(grammar, param)` or None.

    Sources: OpenAI `response_format`, vLLM `structured_outputs`, llama.cpp top-level
    `json_schema` (a schema) and `grammar` (GBNF), and vLLM's older top-level fields given as
    `guided` (`{"json": …}` for `guided_json`, likewise regex, choice, grammar,
    whitespace_pattern). `param` names the source for errors (`structured_outputs.regex`).

    Raises:
        InvalidRequestError: more than one constraint, or any source's own error.
    """
    found = []
    g = grammar_for_response_format(response_format)
    if g is not None:
        found.append((g, "response_format"))
    so = _structured_outputs(structured_outputs, param="structured_outputs")
    if so is not None:
        found.append(so)
    if json_schema is not None:
        found.append((grammar_for_json_schema(json_schema, param="json_schema"), "json_schema"))
    if grammar is not None:
        found.append((grammar_for_gbnf(grammar, param="grammar"), "grammar"))
    legacy = _structured_outputs(guided, param="guided", sep="_")
    if legacy is not None:
        found.append(legacy)
    if len(found) > 1:
        names = " and ".join(f"'{p}'" for _, p in found)
        raise InvalidRequestError(f"A request may carry one output constraint; got {names}.",
                                  param=found[1][1])
    return found[0] if found else None


# --------------------------------------------------------------------- tokenizer, compile

_ll_tokenizers: weakref.WeakKeyDictionary[Any, LLTokenizer] = weakref.WeakKeyDictionary()
_ll_lock = threading.Lock()


def ll_tokenizer(tokenizer) -> LLTokenizer:
    """llguidance's view of a `serve.tokenizer.Tokenizer` (from its tokenizer.json, with every
    EOS id), built once per tokenizer (~0.3 s for a 49k vocabulary).

    Its `vocab_size` is the tokenizer's; a model's logits row may be wider (`Constraint.mask`
    forbids the extra ids).
    """
    with _ll_lock:
        ll = _ll_tokenizers.get(tokenizer)
        if ll is None:
            eos = sorted(tokenizer.eos_ids) or None
            ll = LLTokenizer(tokenizer.to_json(), n_vocab=tokenizer.vocab_size, eos_token=eos)
            _ll_tokenizers[tokenizer] = ll
        return ll


class _Cache:
    """Compiled matchers (in their start state) by grammar text, least recently used out;
    a grammar's error message is cached the same way."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[tuple[int, str], LLMatcher | str] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[int, str]) -> LLMatcher | str | None:
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
            return item

    def put(self, key: tuple[int, str], item: LLMatcher | str) -> None:
        with self._lock:
            self._items[key] = item
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)


_cache = _Cache(CACHE_SIZE)


def _compile(grammar: str, ll: LLTokenizer) -> LLMatcher | str:
    """A matcher for `grammar`, or the error/warnings llguidance reports (one message).
    A grammar whose start allows no token and is not complete (`[^\\s\\S]`, an empty
    `enum`) can match nothing: an error too, never an empty "successful" output."""
    try:
        is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar, ll)
        if is_error or messages:
            return "; ".join(m.strip() for m in messages) or "invalid grammar"
        matcher = LLMatcher(ll, grammar, log_level=0)  # drops the GIL while it builds
        if matcher.is_error():
            return matcher.get_error()
        first = allocate_token_bitmask(1, ll.vocab_size)
        fill_next_token_bitmask(matcher, first, 0)
    except Exception as exc:  # llguidance's own failures on odd input: the client's grammar
        return f"{type(exc).__name__}: {exc}"
    if matcher.is_error() or (not matcher.is_accepting() and not _any_token(first[0], ll.vocab_size, ll.eos_tokens)):
        detail = matcher.get_error() if matcher.is_error() else ""
        return "it can match no output at all" + (f" ({detail.strip()})" if detail.strip() else "")
    return matcher


def _any_token(words: np.ndarray, vocab: int, eos: Sequence[int]) -> bool:
    """Whether a bitmask row (int32 [ceil(vocab/32)]) allows any token but the EOS ids."""
    bits = np.unpackbits(words.view(np.uint8), count=vocab, bitorder="little")
    bits[[e for e in eos if e < vocab]] = 0
    return bool(bits.any())


def compiled(grammar: str, tokenizer) -> LLMatcher | str:
    """The compiled start-state matcher of `grammar` (never consume from it: `deep_copy` it),
    or the error message. Cached; compiles (synchronously) on a miss."""
    ll = ll_tokenizer(tokenizer)
    key = (id(ll), grammar)
    item = _cache.get(key)
    if item is None:
        item = _compile(grammar, ll)
        _cache.put(key, item)
    return item


def require_compiled(grammar: str, tokenizer, *, param: str) -> None:
    """`check_grammar` for callers already off the event loop (the thread pool): compiles
    `grammar` into the cache, or raises.

    Raises:
        InvalidRequestError: llguidance rejects it or warns about it, naming `param`.
    """
    item = compiled(grammar, tokenizer)
    if isinstance(item, str):
        raise InvalidRequestError(f"Invalid '{param}': {_describe(param)} cannot be enforced: {item}",
                                  param=param)
    if grammar.startswith(_JSON_DOCUMENT):  # built here once, not on the engine thread
        key_closers(tokenizer, ll_tokenizer(tokenizer))


async def check_grammar(grammar: str, tokenizer, *, param: str) -> None:
    """Validate and compile `grammar` in the thread pool (never on the engine thread, never on
    the event loop), so the engine later finds it compiled in the cache.

    Raises:
        InvalidRequestError: llguidance rejects it or warns about it, naming `param`.
    """
    await run_in_threadpool(require_compiled, grammar, tokenizer, param=param)


def _describe(param: str) -> str:
    json_params = ("response_format", "json_schema", ".json", "_json", ".json_object")
    return "the JSON schema" if param.endswith(json_params) else "the grammar"


# --------------------------------------------------------------------- per-choice matching


class Constraint:
    """One choice's grammar state: which tokens may come next, and what came.

    Args:
        matcher: its own matcher (a `deep_copy` of the compiled one).
        vocab: the tokenizer's vocabulary size (the bitmask's width in bits).
        eos_ids: the ids that end a sequence (allowed only where the grammar accepts).
        allow_eos: False keeps EOS out while the grammar can go on (`ignore_eos`).
    """

    __slots__ = ("matcher", "vocab", "eos_ids", "allow_eos", "keys")

    def __init__(self, matcher: LLMatcher, vocab: int, eos_ids: Sequence[int], *, allow_eos: bool = True,
                 keys: UniqueKeys | None = None):
        self.matcher, self.vocab, self.eos_ids, self.allow_eos = matcher, vocab, list(eos_ids), allow_eos
        self.keys = keys  # a JSON document's grammar: no object repeats a key (serve.unique_keys)

    @classmethod
    def new(cls, grammar: str, tokenizer, *, allow_eos: bool = True) -> Constraint:
        """A fresh matcher for a choice (engine thread: cheap when `check_grammar` ran first).

        Raises:
            ValueError: the grammar does not compile (the route should have refused it).
        """
        item = compiled(grammar, tokenizer)
        if isinstance(item, str):
            raise ValueError(f"grammar does not compile: {item}")
        ll = ll_tokenizer(tokenizer)
        keys = UniqueKeys(key_closers(tokenizer, ll)) if grammar.startswith(_JSON_DOCUMENT) else None
        return cls(item.deep_copy(), ll.vocab_size, sorted(tokenizer.eos_ids), allow_eos=allow_eos, keys=keys)

    @property
    def done(self) -> bool:
        """The grammar is complete: nothing but EOS may follow (or the matcher failed)."""
        return self.matcher.is_stopped()

    def mask(self, logits: np.ndarray, words: np.ndarray) -> np.ndarray:
        """A copy of `logits` (float32 [V], V may exceed `vocab`) with every token the grammar
        forbids at -inf. `words` is this choice's row of the bitmask (int32 [ceil(vocab/32)],
        bit j of word i = token 32 i + j allowed)."""
        n = min(self.vocab, logits.shape[-1])
        allowed = np.unpackbits(words.view(np.uint8), count=n, bitorder="little").view(bool)
        if not self.allow_eos and not self.done:
            allowed[[e for e in self.eos_ids if e < n]] = False
        if self.keys is not None:
            banned = [t for t in self.keys.banned() if t < n]
            if banned:
                before = allowed[banned]
                allowed[banned] = False
                if not allowed.any():  # the grammar allows nothing but a repeated key: let it
                    allowed[banned] = before
        out = np.where(allowed, logits[:n], _NEG_INF)  # one pass: 3x faster than fill + copyto
        if logits.shape[-1] > n:  # ids past the tokenizer's vocabulary: never allowed
            out = np.concatenate([out, np.full(logits.shape[-1] - n, _NEG_INF, np.float32)])
        return out

    def consume(self, token: int) -> None:
        """Advance past a sampled token.

        Raises:
            RuntimeError: the grammar refuses it (a token outside the mask: a bug).
        """
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"the grammar refused token {token}: {self.matcher.get_error()}")
        if self.keys is not None:
            self.keys.feed(token)

    def consume_prefix(self, tokens: Sequence[int]) -> None:
        """Advance past tokens the grammar reads before the first sampled one (a prefill the
        grammar covers, `GenerationRequest.grammar_prefix`)."""
        self.matcher.consume_tokens(list(tokens))
        if self.keys is not None:
            for token in tokens:
                self.keys.feed(token)


_NEG_INF = np.float32(-np.inf)
# Below this many constrained rows the masks are filled one after the other (each call drops
# the GIL too): measured on 2 busy vCPUs, llguidance's thread pool took 4.0 ms a step for 8
# rows where one thread took 1.3 ms. Many rows on many cores is what the pool is for.
PARALLEL_FILL_ROWS = 16
_executor: LLExecutor | None = None


def fill_bitmasks(constraints: Sequence[Constraint]) -> np.ndarray:
    """Every constraint's next-token bitmask, int32 [len, ceil(vocab/32)]; llguidance computes
    them with the GIL released (in its thread pool from `PARALLEL_FILL_ROWS` rows on)."""
    global _executor
    bitmask = allocate_token_bitmask(len(constraints), constraints[0].vocab)
    if len(constraints) < PARALLEL_FILL_ROWS:
        for i, c in enumerate(constraints):
            fill_next_token_bitmask(c.matcher, bitmask, i)
        return bitmask
    if _executor is None:
        _executor = LLExecutor()
    fill_next_token_bitmask_par(_executor, [(c.matcher, i) for i, c in enumerate(constraints)], bitmask)
    return bitmask
