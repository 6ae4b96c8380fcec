"""Fuzz every route's body schema through the real server: mutated valid requests (fields
replaced by other JSON values, boundary numbers, wrong types, lone surrogates, special-token
text, deep nesting; fields dropped or added; the JSON bytes cut or corrupted; other
Content-Types) get a 2xx or a 4xx, never a 5xx nor a streamed server error, and the server
is healthy afterwards with no 500 in `/metrics` and no traceback in its log.

Routes: chat, completions, /tokenize, /detokenize, and the adapters /v1/responses,
/v1/messages and /v1/messages/count_tokens (their 4xx in their own shapes).

Bounded for CI: `derandomize=True` (the same examples every run), 360 examples on the tiny
model, `max_tokens` kept small. `FUZZ_STATS` counts what was sent; the last test prints it.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.test_server_e2e import running_server

MODEL = "tiny"
EXAMPLES = 360
FUZZ_STATS: Counter[str] = Counter()
DELETE = object()

MSG = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."}]
VALID = {
    "/v1/chat/completions": {"model": MODEL, "messages": MSG, "max_tokens": 3},
    "/v1/completions": {"model": MODEL, "prompt": "hello", "max_tokens": 3},
    "/tokenize": {"model": MODEL, "prompt": "hello"},
    "/detokenize": {"model": MODEL, "tokens": [1, 2, 3]},
    "/v1/responses": {"model": MODEL, "input": "Say hi.", "instructions": "Be brief.", "max_output_tokens": 3},
    "/v1/messages": {"model": MODEL, "messages": MSG[1:], "system": "Be brief.", "max_tokens": 3},
    "/v1/messages/count_tokens": {"model": MODEL, "messages": MSG[1:]},
}
ANTHROPIC = ("/v1/messages", "/v1/messages/count_tokens")
MESSAGES_FIELDS = ["messages", "model", "system", "stop_sequences", "temperature", "top_p", "top_k", "stream",
                   "tools", "tool_choice", "output_config", "metadata", "thinking", "mcp_servers"]
SAMPLING = ["temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty", "frequency_penalty",
            "repetition_penalty", "logit_bias", "stop", "n", "ignore_eos", "stream", "stream_options",
            "user", "max_tokens"]
FIELDS = {
    "/v1/chat/completions": ["messages", "model", "logprobs", "top_logprobs", "max_completion_tokens",
                             *SAMPLING],
    "/v1/completions": ["prompt", "model", "echo", "logprobs", "best_of", "suffix", *SAMPLING],
    "/tokenize": ["prompt", "content", "messages", "model", "add_special_tokens", "add_generation_prompt"],
    "/detokenize": ["tokens", "model"],
    "/v1/responses": ["input", "model", "instructions", "max_output_tokens", "temperature", "top_p", "stream",
                      "store", "tools", "tool_choice", "text", "reasoning", "include", "top_logprobs", "metadata",
                      "previous_response_id", "parallel_tool_calls", "truncation", "user", "background"],
    "/v1/messages": [*MESSAGES_FIELDS, "max_tokens"],
    "/v1/messages/count_tokens": MESSAGES_FIELDS,
}

TRICKY_TEXT = ["", " ", "\ud83d", "\udc00x", "😀", "<|im_start|>system\nx", "<|im_end|>", "\x00", "\U000F0000",
               "中文", "a" * 300, "\n" * 20, "tiny", "gpt-4", "1_000", "NaN", "-1"]
NUMBERS = [0, 1, -1, 2, 3, 16, 17, 2**31, 2**63, -(2**63), 2**70, 10**30, 10**400, -(10**400), 0.0, 0.5, 1.0, 1.5, 2.0, 2.0000001,
           -2.0000001, 1e-40, 5e-324, 1e-300, 1e300, 1.7976931348623157e308, -1e300, 100, 100.5, -100.5]
leaf = (st.none() | st.booleans() | st.sampled_from(NUMBERS) | st.integers(-(2**70), 2**70)
        | st.floats(allow_nan=False, allow_infinity=False) | st.sampled_from(TRICKY_TEXT)
        | st.text(max_size=12))
json_value = st.recursive(leaf, lambda c: st.lists(c, max_size=4) | st.dictionaries(
    st.sampled_from(["role", "content", "type", "text", "name", "include_usage", "0", "5", "x"]) | st.text(max_size=6),
    c, max_size=4), max_leaves=12)
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "developer", "tool", "bot"])
                                 | json_value, "content": json_value | st.sampled_from(TRICKY_TEXT)})
FIELD_VALUES = {
    "messages": st.lists(message, max_size=3) | json_value,
    "prompt": st.sampled_from(["hi", ["a", "b"], [1, 2, 3], [[1, 2], [3]], [], [[]], [1, -1], [10**9], [True]])
    | json_value,
    "tokens": st.lists(st.integers(-5, 60000) | leaf, max_size=5) | json_value,
    "logit_bias": st.dictionaries(st.sampled_from(["1", "2", "1_000", " 3", "+4", "-1", "99999999", "x", "٣"]),
                                  leaf, max_size=3) | json_value,
    "stop": st.sampled_from(TRICKY_TEXT) | st.lists(st.sampled_from(TRICKY_TEXT), max_size=6) | json_value,
    "stream_options": st.fixed_dictionaries({"include_usage": leaf}) | json_value,
}
SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
block = st.fixed_dictionaries({"type": st.sampled_from(["text", "tool_use", "tool_result", "thinking", "image",
                                                        "input_text", "output_text", "refusal", "x"]) | json_value},
                              optional={"text": st.sampled_from(TRICKY_TEXT) | json_value, "id": json_value
                                        | st.just("t1"), "tool_use_id": st.just("t1") | json_value,
                                        "name": st.just("f") | json_value, "input": json_value,
                                        "content": json_value})
turn = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system"]) | json_value,
                              "content": st.sampled_from(TRICKY_TEXT) | st.lists(block, max_size=3) | json_value})
item = st.fixed_dictionaries({}, optional={
    "type": st.sampled_from(["message", "function_call", "function_call_output", "reasoning", "web_search_call"])
    | json_value, "role": st.sampled_from(["user", "assistant", "developer", "tool"]) | json_value,
    "content": st.sampled_from(TRICKY_TEXT) | st.lists(block, max_size=2) | json_value,
    "call_id": st.just("c1") | json_value, "name": st.just("f") | json_value,
    "arguments": st.sampled_from(["{}", '{"city": "x"}', "{", "[]"]) | json_value, "output": json_value})
tool = st.fixed_dictionaries({}, optional={
    "type": st.sampled_from(["function", "custom", "web_search_preview"]) | json_value,
    "name": st.sampled_from(["f", "bad name", ""]) | json_value,
    "parameters": st.just(SCHEMA) | json_value, "input_schema": st.just(SCHEMA) | json_value,
    "strict": leaf})
FIELD_VALUES |= {
    "input": st.lists(item, max_size=3) | st.sampled_from(TRICKY_TEXT) | json_value,
    "tools": st.lists(tool, max_size=2) | json_value,
    "text": st.fixed_dictionaries({"format": st.sampled_from([{"type": "json_schema", "name": "x", "schema": SCHEMA},
                                                             {"type": "json_object"}, {"type": "text"}]) | json_value})
    | json_value,
    "output_config": st.fixed_dictionaries({}, optional={"format": st.just({"type": "json_schema", "schema": SCHEMA})
                                                         | json_value, "effort": json_value}) | json_value,
    "reasoning": st.fixed_dictionaries({"effort": json_value}) | json_value,
    "tool_choice": st.sampled_from(["auto", "required", "none", {"type": "any"}, {"type": "tool", "name": "f"},
                                    {"type": "function", "name": "f"}]) | json_value,
}
MESSAGES_VALUES = {"messages": st.lists(turn, max_size=3) | json_value}


def deep(depth: int) -> str:
    return "[" * depth + "]" * depth


@st.composite
def requests(draw) -> tuple[str, bytes, str]:
    """(path, body bytes, Content-Type) from a valid body and 1-4 mutations."""
    path = draw(st.sampled_from(sorted(VALID)))
    body = json.loads(json.dumps(VALID[path]))
    for _ in range(draw(st.integers(1, 4))):
        field = draw(st.sampled_from([*FIELDS[path], "unknown_field"]))
        values = {**FIELD_VALUES, **MESSAGES_VALUES} if path in ANTHROPIC else FIELD_VALUES
        value = draw(st.just(DELETE) | values.get(field, json_value) | leaf)
        if value is DELETE:
            body.pop(field, None)
        else:
            body[field] = value
    # keep generation short: a big-but-admissible max_tokens only slows the fuzzing down
    for key in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        v = body.get(key)
        if isinstance(v, int) and not isinstance(v, bool) and 8 < v < 10**6:
            body[key] = 8
    raw = json.dumps(body).encode()  # ensure_ascii: lone surrogates travel as \\ud83d escapes
    how = draw(st.sampled_from(["json"] * 8 + ["truncate", "byte", "deep", "content-type", "not-object"]))
    content_type = "application/json"
    if how == "truncate":
        raw = raw[: draw(st.integers(0, max(len(raw) - 1, 0)))]
    elif how == "byte" and raw:
        i = draw(st.integers(0, len(raw) - 1))
        raw = raw[:i] + bytes([draw(st.integers(0, 255))]) + raw[i + 1:]
    elif how == "deep":
        raw = raw[:-1] + f', "{draw(st.sampled_from(FIELDS[path]))}": {deep(draw(st.sampled_from([70, 3000])))}}}'.encode()
    elif how == "content-type":
        content_type = draw(st.sampled_from(["text/plain", "application/x-www-form-urlencoded", "",
                                             "application/json; charset=utf-16", "application/json;charset=UTF-8"]))
    elif how == "not-object":
        raw = json.dumps([body]).encode()
    return path, raw, content_type


@pytest.fixture(scope="module")
def server_log(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "server.log"


@pytest.fixture(scope="module")
def base(tiny_model_dir, server_log) -> Iterator[str]:
    with running_server(tiny_model_dir, "--max-batch", "4", "--threads", "1", "--model-name", MODEL,
                        log_path=server_log) as url:
        yield url


@pytest.fixture(scope="module")
def http(base) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base, timeout=60) as client:
        yield client


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(request=requests())
def test_mutated_requests_get_4xx_never_5xx(http, request):
    path, raw, content_type = request
    headers = {"content-type": content_type} if content_type else {}
    with http.stream("POST", path, content=raw, headers=headers) as resp:
        body = resp.read()
    FUZZ_STATS["requests"] += 1
    FUZZ_STATS[f"{resp.status_code // 100}xx"] += 1
    assert resp.status_code < 500, (path, raw[:300], body[:300])
    text = body.decode("utf-8", "replace")
    FUZZ_STATS[path] += 1
    if resp.status_code >= 400 and path in ANTHROPIC:
        doc = json.loads(text)
        assert doc["type"] == "error" and set(doc["error"]) == {"type", "message"}, doc
        assert doc["error"]["type"] in ("invalid_request_error", "not_found_error", "request_too_large"), doc
    elif resp.status_code >= 400:
        err = json.loads(text)["error"]
        assert err["type"] == "invalid_request_error" and set(err) == {"message", "type", "param", "code"}
    elif resp.headers["content-type"].startswith("text/event-stream"):
        if path == "/v1/messages":
            assert "event: error" not in text and text.endswith('data: {"type":"message_stop"}\n\n'), text[-300:]
        elif path == "/v1/responses":
            assert "response.failed" not in text and "event: response.completed" in text \
                or "event: response.incomplete" in text, text[-300:]
        else:
            assert '"server_error"' not in text and text.endswith("data: [DONE]\n\n"), text[-300:]
    else:
        json.loads(text)  # valid JSON: no NaN / Infinity


def test_server_is_healthy_after_fuzzing(http, server_log):
    assert http.get("/health").status_code == 200
    r = http.post("/v1/chat/completions", json=VALID["/v1/chat/completions"])
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None
    metrics = http.get("/metrics").text
    assert not re.search(r'endpoint="(?!/health")[^"]*",status="5', metrics)  # /health: 503 while loading
    log = server_log.read_text()
    assert "Traceback" not in log and " ERROR " not in log
    per_route = ", ".join(f"{p} {FUZZ_STATS[p]}" for p in VALID)
    print(f"\nfuzz: {FUZZ_STATS['requests']} requests, {FUZZ_STATS['5xx']} 5xx "
          f"({FUZZ_STATS['2xx']} 2xx, {FUZZ_STATS['4xx']} 4xx; {per_route})")
    assert FUZZ_STATS["5xx"] == 0
    if FUZZ_STATS["requests"]:  # the fuzz test ran first (file order), not deselected
        assert FUZZ_STATS["requests"] >= EXAMPLES * 0.9
