"""Fuzz every route's body schema through the real server: mutated valid requests (fields
replaced by other JSON values, boundary numbers, wrong types, lone surrogates, special-token
text, deep nesting; fields dropped or added; the JSON bytes cut or corrupted; other
Content-Types) get a 2xx or a 4xx, never a 5xx nor a streamed server error, and the server
is healthy afterwards with no 500 in `/metrics` and no traceback in its log.

Bounded for CI: `derandomize=True` (the same examples every run), 240 examples on the tiny
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
EXAMPLES = 240
FUZZ_STATS: Counter[str] = Counter()
DELETE = object()

MSG = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."}]
VALID = {
    "/v1/chat/completions": {"model": MODEL, "messages": MSG, "max_tokens": 3},
    "/v1/completions": {"model": MODEL, "prompt": "hello", "max_tokens": 3},
    "/tokenize": {"model": MODEL, "prompt": "hello"},
    "/detokenize": {"model": MODEL, "tokens": [1, 2, 3]},
}
SAMPLING = ["temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty", "frequency_penalty",
            "repetition_penalty", "logit_bias", "stop", "n", "ignore_eos", "stream", "stream_options",
            "user", "max_tokens"]
FIELDS = {
    "/v1/chat/completions": ["messages", "model", "logprobs", "top_logprobs", "max_completion_tokens",
                             *SAMPLING],
    "/v1/completions": ["prompt", "model", "echo", "logprobs", "best_of", "suffix", *SAMPLING],
    "/tokenize": ["prompt", "content", "messages", "model", "add_special_tokens", "add_generation_prompt"],
    "/detokenize": ["tokens", "model"],
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


def deep(depth: int) -> str:
    return "[" * depth + "]" * depth


@st.composite
def requests(draw) -> tuple[str, bytes, str]:
    """(path, body bytes, Content-Type) from a valid body and 1-4 mutations."""
    path = draw(st.sampled_from(sorted(VALID)))
    body = json.loads(json.dumps(VALID[path]))
    for _ in range(draw(st.integers(1, 4))):
        field = draw(st.sampled_from([*FIELDS[path], "unknown_field"]))
        value = draw(st.just(DELETE) | FIELD_VALUES.get(field, json_value) | leaf)
        if value is DELETE:
            body.pop(field, None)
        else:
            body[field] = value
    # keep generation short: a big-but-admissible max_tokens only slows the fuzzing down
    for key in ("max_tokens", "max_completion_tokens"):
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
    if resp.status_code >= 400:
        err = json.loads(text)["error"]
        assert err["type"] == "invalid_request_error" and set(err) == {"message", "type", "param", "code"}
    elif resp.headers["content-type"].startswith("text/event-stream"):
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
    print(f"\nfuzz: {FUZZ_STATS['requests']} requests, {FUZZ_STATS['5xx']} 5xx "
          f"({FUZZ_STATS['2xx']} 2xx, {FUZZ_STATS['4xx']} 4xx)")
    assert FUZZ_STATS["5xx"] == 0
    if FUZZ_STATS["requests"]:  # the fuzz test ran first (file order), not deselected
        assert FUZZ_STATS["requests"] >= EXAMPLES * 0.9
