"""Several models from one real server (issue #16): routing by `model`, load on demand, LRU
eviction, idle unload, operator load/unload, and a broken model among good ones.

The default model's int4 and fp32 exports stand for two models with real text; the tiny
random Llama for the protocol-only cases. Routing is proven by each model's own counters in
`/metrics` (labelled `model`), the `model` and `system_fingerprint` of each response, and by
greedy text that differs between the exports' weights only where the weights differ.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from openai import OpenAI
from test_metrics import samples
from test_server_e2e import API_KEY, running_server

INT4, FP32 = "smollm2-135m-instruct-int4", "smollm2-135m-instruct-fp32"
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


def chat(base: str, model: str | None, *, max_tokens: int = 24, **kw) -> dict:
    body = {"messages": QUESTION, "max_tokens": max_tokens, "temperature": 0, **kw}
    if model is not None:
        body["model"] = model
    r = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def models(base: str, **kw) -> dict[str, dict]:
    r = httpx.get(f"{base}/v1/models", timeout=10, **kw)
    assert r.status_code == 200, r.text
    return {m["id"]: m for m in r.json()["data"]}


def generated(base: str) -> dict[str, float]:
    s = samples(httpx.get(f"{base}/metrics", timeout=10).text)
    return {dict(labels)["model"]: v for (name, labels), v in s.items()
            if name == "llorch_generation_tokens_total"}


@pytest.fixture(scope="module")
def pair(default_model_dir, default_fp32_dir, tmp_path_factory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("models-pair") / "server.log"
    with running_server(default_model_dir, str(default_fp32_dir), "--max-batch", "2",
                        log_path=log) as base:
        yield base


def weight_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in model_dir.iterdir() if p.suffix in (".onnx", ".data"))


def test_both_exports_listed_with_llorch_fields(pair, default_model_dir, default_fp32_dir):
    listed = models(pair)
    assert list(listed) == [INT4, FP32]  # the order given; the first is the default
    int4, fp32 = listed[INT4], listed[FP32]
    assert int4["status"] == "loaded" and fp32["status"] == "unloaded"  # only the default at startup
    assert (int4["precision"], fp32["precision"]) == ("int4", "fp32")
    for card in (int4, fp32):
        assert card["object"] == "model" and card["owned_by"] == "llorch" and card["created"] > 0
        assert card["max_length"] > 0 and card["provider"] == "cpu"
    # files + KV cache: the engine's own KV count once loaded, the shapes' estimate before
    kv = samples(httpx.get(f"{pair}/metrics").text)[("llorch_kv_cache_bytes", (("model", INT4),))]
    assert int4["memory_bytes"] == weight_bytes(default_model_dir) + kv
    # same shapes; the int4 export's KV is int8 (1 byte a value), the fp32 export's fp32
    assert fp32["memory_bytes"] == weight_bytes(default_fp32_dir) + 4 * kv
    assert httpx.get(f"{pair}/v1/models/{FP32}").json()["id"] == FP32
    r = httpx.post(f"{pair}/v1/chat/completions", json={"model": "gpt-4", "messages": QUESTION})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert INT4 in r.json()["error"]["message"] and FP32 in r.json()["error"]["message"]


def test_requests_are_routed_by_model_concurrently(pair):
    before = generated(pair)
    health: list[int] = []
    done = threading.Event()

    def watch() -> None:  # /health stays 200 while fp32 loads on demand
        while not done.is_set():
            health.append(httpx.get(f"{pair}/health", timeout=5).status_code)
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(4) as pool:
            jobs = [pool.submit(chat, pair, m) for m in (FP32, INT4, None, FP32)]
            fp32_a, int4, default, fp32_b = (j.result() for j in jobs)
    finally:
        done.set()
        watcher.join()
    assert health and set(health) == {200}
    assert [r["model"] for r in (fp32_a, int4, default, fp32_b)] == [FP32, INT4, INT4, FP32]
    assert fp32_a["system_fingerprint"] != int4["system_fingerprint"]  # other files, other build
    assert "Paris" in fp32_a["choices"][0]["message"]["content"]
    assert "Paris" in int4["choices"][0]["message"]["content"]
    # greedy, same model: the same text whichever request it was
    assert fp32_a["choices"][0]["message"]["content"] == fp32_b["choices"][0]["message"]["content"]
    after = generated(pair)
    used = {m: (fp32_a, int4, default, fp32_b) for m in (INT4, FP32)}
    for model, responses in used.items():
        tokens = sum(r["usage"]["completion_tokens"] for r in responses if r["model"] == model)
        assert after[model] - before.get(model, 0) == tokens, model
    assert models(pair)[FP32]["status"] == "loaded"
    health_body = httpx.get(f"{pair}/health").json()
    assert health_body["models"] == {INT4: "loaded", FP32: "loaded"}
    assert health_body["slots_in_use"] == 0


def test_lru_eviction_reloads_with_the_same_greedy_text(default_model_dir, default_fp32_dir, tmp_path):
    with running_server(default_model_dir, str(default_fp32_dir), "--max-loaded-models", "1",
                        "--max-batch", "1", log_path=tmp_path / "server.log") as base:
        first = chat(base, INT4)
        assert models(base)[INT4]["status"] == "loaded"
        fp32 = chat(base, FP32)  # loads fp32: int4, idle, is stopped to make room
        listed = models(base)
        assert (listed[INT4]["status"], listed[FP32]["status"]) == ("unloaded", "loaded")
        assert fp32["model"] == FP32
        again = chat(base, INT4)  # int4 loads again, fp32 goes
        listed = models(base)
        assert (listed[INT4]["status"], listed[FP32]["status"]) == ("loaded", "unloaded")
        assert again["choices"][0]["message"]["content"] == first["choices"][0]["message"]["content"]

        # A busy model is never evicted: fp32 waits until int4's stream has ended.
        with httpx.stream("POST", f"{base}/v1/chat/completions", timeout=300, json={
                "model": INT4, "messages": QUESTION, "max_tokens": 400, "stream": True,
                "temperature": 0, "ignore_eos": True}) as stream:
            lines = stream.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            waiting = ThreadPoolExecutor(1).submit(chat, base, FP32, max_tokens=4)
            time.sleep(1.0)
            assert not waiting.done() and models(base)[INT4]["status"] == "loaded"
            assert [line for line in lines if line.startswith("data: ")][-1] == "data: [DONE]"
        assert waiting.result(timeout=300)["model"] == FP32
        assert models(base)[INT4]["status"] == "unloaded"
        log = (tmp_path / "server.log").read_text()
        assert "unloading model smollm2-135m-instruct-int4 (to make room for" in log


@pytest.fixture(scope="module")
def broken_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A copy of the tiny export whose weights file is cut in half."""
    broken = tmp_path_factory.mktemp("broken") / "broken-model"
    shutil.copytree(tiny_model_dir, broken)
    [data] = [p for p in broken.iterdir() if p.suffix == ".data"]
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    return broken


def test_a_broken_model_among_good_ones(tiny_model_dir, broken_dir, tmp_path):
    bad_json = tmp_path / "models" / "bad-json"
    bad_json.mkdir(parents=True)
    (bad_json / "genai_config.json").write_text("{not json")
    shutil.copytree(tiny_model_dir, tmp_path / "models" / "tiny-copy")
    (tmp_path / "models" / "tiny-link").symlink_to(tiny_model_dir)  # named already: not twice
    (tmp_path / "models" / "not-a-model").mkdir()
    with running_server(f"{tiny_model_dir}=tiny", f"{broken_dir}=broken", "--models-dir",
                        str(tmp_path / "models"), "--threads", "1",
                        log_path=tmp_path / "server.log") as base:
        listed = models(base)
        assert list(listed) == ["tiny", "broken", "bad-json", "tiny-copy"]
        assert listed["bad-json"]["status"] == "error"
        assert "genai_config.json: not valid JSON" in listed["bad-json"]["error"]
        for _ in range(2):  # the failure is remembered, not retried on every request
            r = httpx.post(f"{base}/v1/chat/completions",
                           json={"model": "broken", "messages": QUESTION, "max_tokens": 3})
            assert r.status_code == 500, r.text
            err = r.json()["error"]
            assert err["code"] == "model_load_failed" and err["param"] == "model"
            assert str(broken_dir / "model.onnx.data") in err["message"], err["message"]
        assert models(base)["broken"]["status"] == "error"
        r = httpx.post(f"{base}/v1/completions", json={"model": "bad-json", "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 500 and "not valid JSON" in r.json()["error"]["message"]
        # the good ones are unaffected, the server healthy
        assert chat(base, "tiny", max_tokens=3)["model"] == "tiny"
        assert chat(base, "tiny-copy", max_tokens=3)["model"] == "tiny-copy"
        assert httpx.get(f"{base}/health").status_code == 200


def test_operator_load_unload_and_idle_unload(tiny_model_dir, tmp_path):
    auth = {"Authorization": f"Bearer {API_KEY}"}
    with running_server(f"{tiny_model_dir}=a", f"{tiny_model_dir}=b", "--api-key", API_KEY,
                        "--idle-unload", "1.5", "--threads", "1",
                        log_path=tmp_path / "server.log") as base:
        assert httpx.post(f"{base}/v1/models/b/load").status_code == 401
        assert httpx.post(f"{base}/v1/models/b/unload").status_code == 401
        assert httpx.post(f"{base}/v1/models/zz/load", headers=auth).status_code == 404
        r = httpx.post(f"{base}/v1/models/b/load", headers=auth, timeout=60)
        assert r.status_code == 200 and r.json()["status"] == "loaded"
        r = httpx.post(f"{base}/v1/models/b/unload", headers=auth)
        assert r.status_code == 200 and r.json()["status"] == "unloaded"
        client = OpenAI(base_url=f"{base}/v1", api_key=API_KEY)
        assert client.chat.completions.create(model="b", messages=QUESTION, max_tokens=2).model == "b"
        assert models(base, headers=auth)["b"]["status"] == "loaded"
        deadline = time.monotonic() + 20
        while models(base, headers=auth)["b"]["status"] == "loaded":  # idle 1.5 s → stopped
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert models(base, headers=auth)["a"]["status"] == "unloaded"
        assert client.chat.completions.create(model="b", messages=QUESTION, max_tokens=2).model == "b"
        series = samples(httpx.get(f"{base}/metrics").text)
        assert ("llorch_slots", (("model", "b"),)) in series
        assert ("llorch_slots", (("model", "a"),)) not in series  # a is not loaded
