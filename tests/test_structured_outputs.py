"""Structured outputs through the real server and the official `openai` client, on the
default model (SmolLM2-135M-Instruct int4): `chat.completions.parse` with Pydantic models
returns a parsed object every time, streamed and with n=2; json_object always parses; vLLM's
and llama.cpp's extensions produce matching text; logprobs, seed and stop still apply;
max_tokens mid-object ends with "length"; what cannot be enforced is a named 400.

Strings and arrays in the models carry maxLength / maxItems: a 135M model at temperature 0
can otherwise repeat a string or an array for ever (a recursive schema does: see
test_recursive_schema_runs_to_length), which would end with "length", not an invalid object.
"""

from __future__ import annotations

import datetime
import enum
import json
import re
from collections.abc import Iterator
from typing import Annotated, Literal

import httpx
import jsonschema
import openai
import pytest
from openai import OpenAI
from pydantic import BaseModel, Field
from test_server_e2e import running_server

MODEL = "smollm2-135m-instruct"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def base_url(default_model_dir, tmp_path_factory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("structured-server") / "server.log"
    with running_server(default_model_dir, "--max-batch", "4", "--model-name", MODEL,
                        log_path=log) as base:
        yield base


@pytest.fixture(scope="module")
def client(base_url) -> Iterator[OpenAI]:
    with OpenAI(base_url=f"{base_url}/v1", api_key="x", max_retries=0, timeout=120) as c:
        yield c


# ------------------------------------------------------------------ the schemas


class Person(BaseModel):
    name: str = Field(max_length=40)
    age: int = Field(ge=0, le=130)
    city: str = Field(max_length=40)


class Weather(BaseModel):
    city: str = Field(max_length=40)
    unit: Literal["celsius", "fahrenheit"]
    temperatures: list[float] = Field(min_length=1, max_length=5)


class Item(BaseModel):
    sku: str = Field(pattern=r"^[A-Z]{3}-[0-9]{3}$")
    quantity: int = Field(ge=1, le=10)


class Address(BaseModel):
    street: str = Field(max_length=40)
    city: str = Field(max_length=30)


class Order(BaseModel):  # nested objects, an array of objects, $defs/$ref used twice
    order_id: int = Field(ge=1, le=99999)
    items: list[Item] = Field(min_length=1, max_length=3)
    shipping: Address
    billing: Address


class Book(BaseModel):  # optional fields: anyOf [T, null] in OpenAI's strict form
    title: str = Field(max_length=60)
    author: str = Field(max_length=40)
    year: int | None = Field(ge=1000, le=2030)
    isbn: str | None = Field(max_length=20)


class Sentiment(str, enum.Enum):
    positive = "positive"
    negative = "negative"
    neutral = "neutral"


class Review(BaseModel):
    sentiment: Sentiment
    # test_n2_sampled_choices_are_each_valid's second choice (seed 3) writes "1.000…" here with
    # int8 KV: it stops at "1.0000000000" because numbers take at most 10 fraction digits
    # (serve.constraints.bound_numbers); before that bound it ran to max_tokens.
    confidence: float = Field(ge=0, le=1)
    summary: str = Field(min_length=3, max_length=60)


class Circle(BaseModel):
    kind: Literal["circle"]
    radius: float = Field(gt=0, le=100)


class Square(BaseModel):
    kind: Literal["square"]
    side: float = Field(gt=0, le=100)


class Drawing(BaseModel):  # a union of objects told apart by a const
    shape: Circle | Square
    color: Literal["red", "green", "blue"]


class Flags(BaseModel):
    active: bool
    verified: bool
    tags: list[Annotated[str, Field(max_length=20)]] = Field(min_length=1, max_length=3)
    version: Literal["v1"]


class Score(BaseModel):  # exclusive integer bounds, a bounded number
    score: int = Field(gt=0, lt=10)
    ratio: float = Field(ge=0, le=1)
    passed: bool


class Meeting(BaseModel):  # "format": "date"
    title: str = Field(max_length=50)
    day: datetime.date
    attendees: list[Annotated[str, Field(max_length=30)]] = Field(max_length=4)


class Account(BaseModel):  # string pattern and minLength
    username: str = Field(min_length=3, max_length=12, pattern=r"^[a-z0-9_]+$")
    pin: str = Field(pattern=r"^[0-9]{4}$")
    role: Literal["admin", "user", "guest"]


CASES = [
    (Person, "Invent a person who lives in Paris."),
    (Weather, "Give a 3-day temperature forecast for Berlin."),
    (Order, "Create an example online order with two items, shipped and billed to London."),
    (Book, "Describe the novel 1984 by George Orwell."),
    (Review, "Classify the sentiment of: 'The food was wonderful and the staff friendly.'"),
    (Drawing, "Describe a red circle of radius 5."),
    (Flags, "Describe an active, unverified user account with tags."),
    (Score, "Grade a student who got 7 out of 10."),
    (Meeting, "Schedule a team meeting on 2025-03-14 with Alice and Bob."),
    (Account, "Create a guest account for the user bob."),
]
IDS = [m.__name__ for m, _ in CASES]


def _messages(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]


def _strict_schema(model: type[BaseModel]) -> dict:
    """The schema the openai client sends for `response_format=model`."""
    from openai.lib._pydantic import to_strict_json_schema

    return to_strict_json_schema(model)


# ------------------------------------------------------------------ parse()


@pytest.mark.parametrize("model, prompt", CASES, ids=IDS)
def test_parse_returns_a_valid_object(client, model, prompt):
    r = client.chat.completions.parse(model=MODEL, messages=_messages(prompt), response_format=model,
                                      max_tokens=400, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, model)
    jsonschema.validate(json.loads(choice.message.content), _strict_schema(model))


@pytest.mark.parametrize("model, prompt", CASES, ids=IDS)
def test_streamed_parse_equals_the_unstreamed_one(client, model, prompt):
    kwargs = dict(model=MODEL, messages=_messages(prompt), response_format=model, max_tokens=400,
                  temperature=0)
    with client.chat.completions.stream(**kwargs) as stream:
        for _ in stream:
            pass
        streamed = stream.get_final_completion()
    whole = client.chat.completions.parse(**kwargs)
    assert streamed.choices[0].finish_reason == "stop"
    assert isinstance(streamed.choices[0].message.parsed, model)
    assert streamed.choices[0].message.content == whole.choices[0].message.content


@pytest.mark.parametrize("model, prompt", CASES, ids=IDS)
def test_n2_sampled_choices_are_each_valid(client, model, prompt):
    r = client.chat.completions.parse(model=MODEL, messages=_messages(prompt), response_format=model,
                                      max_tokens=400, temperature=0.7, top_p=0.9, seed=3, n=2)
    assert len(r.choices) == 2
    for choice in r.choices:
        assert choice.finish_reason == "stop", choice.message.content
        assert isinstance(choice.message.parsed, model)


def test_streamed_n2_choices_are_each_valid(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=_messages(CASES[0][1]), stream=True, n=2, temperature=0.8, seed=11,
        max_tokens=400,
        response_format={"type": "json_schema",
                         "json_schema": {"name": "person", "schema": _strict_schema(Person), "strict": True}})
    texts, finish = {}, {}
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            finish[c.index] = c.finish_reason or finish.get(c.index)
    assert sorted(texts) == [0, 1] and set(finish.values()) == {"stop"}
    for text in texts.values():
        Person.model_validate_json(text)


# ------------------------------------------------------------------ json_object, extensions


@pytest.mark.parametrize("prompt", [
    "Describe a cat in JSON with keys name, color and age.",
    "List three colors.",
    "Reply in JSON: what is the capital of France?",
    "Give me a recipe for pancakes.",
])
def test_json_object_always_parses(client, prompt):
    r = client.chat.completions.create(model=MODEL, messages=_messages(prompt), max_tokens=400,
                                       temperature=0, response_format={"type": "json_object"})
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_sampled_json_objects_parse_whenever_they_end(client):
    """Any object is allowed, so the model may keep adding keys ("Describe a cat as JSON"
    does, greedily): such a choice ends with "length". Every one that ends parses."""
    r = client.chat.completions.create(model=MODEL, messages=_messages("Describe a cat as JSON."),
                                       max_tokens=150, temperature=1.0, seed=7, n=6,
                                       response_format={"type": "json_object"})
    ended = [c for c in r.choices if c.finish_reason == "stop"]
    assert ended
    for c in ended:
        assert isinstance(json.loads(c.message.content), dict)
    for c in r.choices:
        assert c.message.content.lstrip().startswith("{")


@pytest.mark.parametrize("extra, pattern", [
    ({"structured_outputs": {"regex": r"[A-Z][a-z]{2,8} [0-9]{3}"}}, r"[A-Z][a-z]{2,8} [0-9]{3}"),
    ({"structured_outputs": {"choice": ["yes", "no", "maybe"]}}, r"yes|no|maybe"),
    ({"structured_outputs": {"grammar": 'start: "The answer is " NUMBER "."\nNUMBER: /[0-9]{1,4}/'}},
     r"The answer is [0-9]{1,4}\."),
    ({"structured_outputs": {"grammar": 'root ::= "Color: " ("red" | "green" | "blue")'}},
     r"Color: (red|green|blue)"),
    ({"grammar": 'root ::= "Answer: " [0-9] [0-9]? "."'}, r"Answer: [0-9][0-9]?\."),
    ({"guided_choice": ["red", "blue"]}, r"red|blue"),  # vLLM's older spelling
    ({"json_schema": {"type": "object", "properties": {"x": {"type": "integer", "minimum": 5,
                                                             "maximum": 9}},
                      "required": ["x"], "additionalProperties": False}}, r"\{\s*\"x\"\s*:\s*[5-9]\s*\}"),
    ({"structured_outputs": {"json": {"type": "array", "items": {"type": "boolean"},
                                      "minItems": 2, "maxItems": 2}}}, r"\[\s*(true|false)\s*,\s*(true|false)\s*\]"),
])
def test_extensions_produce_matching_text(client, extra, pattern):
    for temperature in (0, 1.0):
        r = client.chat.completions.create(model=MODEL, messages=_messages("Answer the question: how many?"),
                                           max_tokens=60, temperature=temperature, seed=1, extra_body=extra)
        assert r.choices[0].finish_reason == "stop"
        assert re.fullmatch(pattern, r.choices[0].message.content), r.choices[0].message.content


def test_completions_endpoint_streamed_and_not(client):
    schema = _strict_schema(Person)
    kwargs = dict(model=MODEL, prompt="A person in JSON:", max_tokens=200, temperature=0,
                  extra_body={"response_format": {"type": "json_schema",
                                                  "json_schema": {"name": "p", "schema": schema}}})
    whole = client.completions.create(**kwargs)
    assert whole.choices[0].finish_reason == "stop"
    Person.model_validate_json(whole.choices[0].text)
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kwargs)
                       if c.choices)
    assert streamed == whole.choices[0].text
    r = client.completions.create(model=MODEL, prompt="Is the sky blue? Answer:", max_tokens=5, n=2,
                                  temperature=1.0, seed=2, extra_body={"structured_outputs": {"choice": [" yes", " no"]}})
    assert {c.text for c in r.choices} <= {" yes", " no"}


# ------------------------------------------------------------------ other parameters still apply


def test_logprobs_cover_the_constrained_tokens(client):
    r = client.chat.completions.create(model=MODEL, messages=_messages(CASES[0][1]), max_tokens=200,
                                       temperature=0, logprobs=True, top_logprobs=3,
                                       response_format={"type": "json_object"})
    content = r.choices[0].logprobs.content
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert t.logprob <= 0 and 1 <= len(t.top_logprobs) <= 3
        assert t.top_logprobs[0].logprob >= t.top_logprobs[-1].logprob
    # the first token must open the object: the grammar leaves no other choice with "{"…
    assert content[0].token.startswith("{")
    assert all(alt.token.lstrip().startswith("{") for alt in content[0].top_logprobs)


def test_seed_reproduces_a_sampled_constrained_answer(client):
    kwargs = dict(model=MODEL, messages=_messages(CASES[1][1]), max_tokens=300, temperature=1.0,
                  seed=1234, response_format=Weather)
    a = client.chat.completions.parse(**kwargs).choices[0].message.content
    b = client.chat.completions.parse(**kwargs).choices[0].message.content
    assert a == b


def test_stop_strings_cut_a_constrained_answer(client):
    r = client.chat.completions.create(model=MODEL, messages=_messages("Pick one."), max_tokens=20,
                                       stop=[" beta"], extra_body={"structured_outputs": {"choice": ["alpha beta gamma"]}})
    assert r.choices[0].message.content == "alpha" and r.choices[0].finish_reason == "stop"


def test_max_tokens_mid_object_is_length(client):
    kwargs = dict(model=MODEL, messages=_messages(CASES[2][1]), max_tokens=8, temperature=0)
    r = client.chat.completions.create(response_format={"type": "json_object"}, **kwargs)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 8
    assert r.choices[0].message.content.startswith("{")
    with pytest.raises(json.JSONDecodeError):
        json.loads(r.choices[0].message.content)
    with pytest.raises(openai.LengthFinishReasonError):
        client.chat.completions.parse(response_format=Order, **kwargs)


def test_recursive_schema_runs_to_length(client):
    """A recursive $ref compiles and is enforced; what the small model then writes (ever
    deeper nesting) ends at max_tokens, still a valid prefix."""
    schema = {"$defs": {"node": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 10},
        "children": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2}},
        "required": ["name", "children"], "additionalProperties": False}}, "$ref": "#/$defs/node"}
    r = client.chat.completions.create(model=MODEL, messages=_messages("A category tree for fruit."),
                                       max_tokens=60, temperature=0, extra_body={"json_schema": schema})
    assert r.choices[0].finish_reason in ("stop", "length")
    if r.choices[0].finish_reason == "stop":
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)


def _keys(text: str) -> list[str]:
    """The keys of the JSON object `text` as written, repeats kept (`json.loads` keeps the last)."""
    return [k for k, _ in json.loads(text, object_pairs_hook=lambda pairs: pairs)]


@pytest.mark.parametrize("schema", [
    {"type": "object", "additionalProperties": {"type": "integer"}, "maxProperties": 4},
    {"type": "object", "patternProperties": {"^[a-z0-9]+$": {"type": "integer"}}, "additionalProperties": False,
     "maxProperties": 4},
])
def test_map_keys_are_never_repeated(client, base_url, schema):
    """llguidance's grammar lets a map repeat a key; this prompt made the model write
    `{"id": 1, "id": 1, "id": 1, "id": 1}`, which a client's `json.loads` read as `{"id": 1}`.
    Every route's grammar now bans the tokens that would close a key the object has."""
    prompt = 'JSON with the same key repeated: {"id": 1, "id": 1, "id": 1, "id": 1}. Now write it again.'
    messages = [{"role": "user", "content": prompt}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=60, temperature=0,
                                          response_format={"type": "json_schema",
                                                           "json_schema": {"name": "m", "schema": schema}})
    responses = client.responses.create(model=MODEL, input=prompt, max_output_tokens=60, temperature=0,
                                        text={"format": {"type": "json_schema", "name": "m", "schema": schema}})
    anthropic_body = httpx.post(f"{base_url}/v1/messages", timeout=120, json={
        "model": MODEL, "max_tokens": 60, "temperature": 0, "messages": messages,
        "output_config": {"format": {"type": "json_schema", "schema": schema}}}).json()
    for text in (chat.choices[0].message.content, responses.output_text, anthropic_body["content"][0]["text"]):
        keys = _keys(text)
        assert keys[0] == "id" and len(keys) == len(set(keys)) == 4, text
        jsonschema.validate(json.loads(text), schema)


# ------------------------------------------------------------------ refusals


def test_unsupported_schema_feature_is_a_named_400(client):
    schema = {"type": "object", "properties": {"ids": {"type": "array", "items": {"type": "integer"},
                                                       "uniqueItems": True}}}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=_messages("x"), response_format={
            "type": "json_schema", "json_schema": {"name": "ids", "schema": schema, "strict": True}})
    assert info.value.body["param"] == "response_format"
    assert "uniqueItems" in info.value.body["message"]


def test_unknown_response_format_type_is_a_400(base_url):
    for endpoint, body in (("chat/completions", {"messages": _messages("x")}), ("completions", {"prompt": "x"})):
        r = httpx.post(f"{base_url}/v1/{endpoint}", json={**body, "response_format": {"type": "yaml"}})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "response_format" and "'yaml'" in err["message"]
        assert err["type"] == "invalid_request_error"


def test_two_constraints_are_a_400(base_url):
    r = httpx.post(f"{base_url}/v1/chat/completions", json={
        "messages": _messages("x"), "response_format": {"type": "json_object"},
        "structured_outputs": {"regex": "[0-9]+"}})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "structured_outputs.regex"


@pytest.mark.parametrize("extra, param", [
    # QA finding 1: llguidance's builder failing on a huge integer was a 500
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "array", "maxItems": 10 ** 30}}}}, "response_format"),
    ({"structured_outputs": {"json": {"const": 2 ** 70}}}, "structured_outputs.json"),
    # QA finding 7: a constraint that can match nothing was a 200 with empty content
    ({"structured_outputs": {"regex": "[^\\s\\S]"}}, "structured_outputs.regex"),
    # QA finding 8: a misspelled key and an empty object were silently unconstrained
    ({"structured_outputs": {"regexp": "a"}}, "structured_outputs.regexp"),
    ({"structured_outputs": {}}, "structured_outputs"),
])
@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_constraints_that_cannot_be_honoured_are_named_400s(client, extra, param, endpoint):
    with pytest.raises(openai.BadRequestError) as info:
        if endpoint == "chat":
            client.chat.completions.create(model=MODEL, messages=_messages("x"), max_tokens=3, extra_body=extra)
        else:
            client.completions.create(model=MODEL, prompt="x", max_tokens=3, extra_body=extra)
    assert info.value.body["param"] == param, info.value.body
