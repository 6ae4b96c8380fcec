"""`--api-workers`: the engine in its own process, HTTP workers in front (serve.frontend),
through the real server with the official client: the same answers as the single process,
and the faults: a client that leaves, SIGTERM, a killed engine process, a killed worker.

Every other e2e file also runs split with LLORCH_TEST_API_WORKERS=2 (tests/test_server_e2e.py
`split_mode_args`); this file covers what only the split mode has.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openai import OpenAI
from test_batching_e2e import long_tiny_dir, metrics, wait_for  # noqa: F401 - a fixture
from test_server_e2e import REPO, _free_port, running_server

MODEL = "tiny"
ARGS = ("--threads", "1", "--model-name", MODEL, "--max-batch", "4")
MSG = [{"role": "user", "content": "Tell me a story about a hello world."}]
LONG = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream": True,
        "ignore_eos": True, "max_tokens": 4000}
M = (("model", MODEL),)


@contextlib.contextmanager
def split_server(model_dir: Path, *args: str, log_path: Path, workers: int = 2
                 ) -> Iterator[tuple[str, subprocess.Popen, dict[str, list[int]]]]:
    """`python -m serve.main --api-workers N`; yields (base URL, supervisor process, pids:
    {"engine": [pid], "workers": [pid, …]} from its start-up log line) once /health is 200."""
    port = _free_port()
    cmd = [sys.executable, "-m", "serve.main", str(model_dir), "--port", str(port), *args,
           "--api-workers", str(workers)]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, f"server exited with {proc.returncode}:\n{log_path.read_text()}"
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        found = re.search(r"pids: engine (\d+), workers ([\d, ]+)\)", log_path.read_text())
        assert found, log_path.read_text()
        pids = {"engine": [int(found[1])], "workers": [int(p) for p in found[2].split(", ")]}
        yield base, proc, pids
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _sse(raw: bytes) -> list[dict]:
    events = raw.split(b"\n\n")
    assert events[-1] == b"" and events[-2] == b"data: [DONE]", raw[-300:]
    return [json.loads(e[len(b"data: "):]) for e in events[:-2]]


# ------------------------------------------------------------------ the same answers


@pytest.fixture(scope="module")
def servers(tiny_model_dir, tmp_path_factory) -> Iterator[tuple[OpenAI, OpenAI, str]]:
    """(single-process client, split client, split base URL) on the same tiny model."""
    logs = tmp_path_factory.mktemp("api-workers")
    with running_server(tiny_model_dir, *ARGS, "--api-workers", "1", log_path=logs / "one.log") as one, \
         split_server(tiny_model_dir, *ARGS, log_path=logs / "split.log") as (split, _, _):
        with OpenAI(base_url=f"{one}/v1", api_key="x", max_retries=0, timeout=60) as a, \
             OpenAI(base_url=f"{split}/v1", api_key="x", max_retries=0, timeout=60) as b:
            yield a, b, split


def test_greedy_and_streaming_equal_the_single_process(servers):
    one, split, _ = servers
    for prompt in ("Tell me a story.", "What is 2 + 2?", "Name three colours."):
        kw = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": 24,
              "temperature": 0}
        want = one.chat.completions.create(**kw)
        got = split.chat.completions.create(**kw)
        assert got.choices[0].message.content == want.choices[0].message.content
        assert got.usage.completion_tokens == want.usage.completion_tokens
        streamed = "".join(c.choices[0].delta.content or "" for c in
                           split.chat.completions.create(**kw, stream=True) if c.choices)
        assert streamed == want.choices[0].message.content


def test_n_seed_logprobs_and_completions_equal_the_single_process(servers):
    one, split, _ = servers
    kw = {"model": MODEL, "messages": MSG, "max_tokens": 12, "n": 2, "seed": 7, "temperature": 0.9,
          "logprobs": True, "top_logprobs": 3}
    want, got = one.chat.completions.create(**kw), split.chat.completions.create(**kw)
    assert len(got.choices) == 2
    for a, b in zip(want.choices, got.choices, strict=True):
        assert b.message.content == a.message.content
        assert [t.token for t in b.logprobs.content] == [t.token for t in a.logprobs.content]
        assert [t.logprob for t in b.logprobs.content] == pytest.approx(
            [t.logprob for t in a.logprobs.content], abs=1e-5)
    kw = {"model": MODEL, "prompt": ["Once upon", "a time"], "max_tokens": 8, "temperature": 0,
          "echo": True, "logprobs": 2}
    want, got = one.completions.create(**kw), split.completions.create(**kw)
    assert [c.text for c in got.choices] == [c.text for c in want.choices]


def test_structured_output_equals_the_single_process(servers):
    one, split, _ = servers
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                               "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    kw = {"model": MODEL, "messages": MSG, "max_tokens": 60, "temperature": 0,
          "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": schema}}}
    want, got = one.chat.completions.create(**kw), split.chat.completions.create(**kw)
    assert got.choices[0].message.content == want.choices[0].message.content
    if got.choices[0].finish_reason == "stop":
        assert set(json.loads(got.choices[0].message.content)) == {"name", "age"}


def test_a_thread_reply_is_continued_once_across_workers(servers):
    """Messages threads live in the engine process's store: a continuation any worker accepted
    holds the reply, so a second one at the same time is refused whichever worker takes it."""
    _, _, split = servers
    first = httpx.post(f"{split}/v1/messages", timeout=60, json={
        "model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}],
        "thread": {"type": "create"}}).json()
    cont = {"model": MODEL, "max_tokens": 2000, "ignore_eos": True, "stream": True,
            "messages": [{"role": "user", "content": "go on"}],
            "thread": {"type": "continue", "previous_message_id": first["id"]}}
    with httpx.stream("POST", f"{split}/v1/messages", json=cont, timeout=60) as held:
        assert held.status_code == 200
        lines = held.iter_lines()  # one iterator: a dropped one closes the stream
        next(lines)
        refused = [httpx.post(f"{split}/v1/messages", json={**cont, "stream": False}, timeout=60)
                   for _ in range(4)]  # on either worker
        assert "message_stop" in "\n".join(lines)
    for r in refused:
        assert r.status_code == 400, r.text
        assert r.json()["error"]["details"] == {"error_code": "thread_already_continued"}


def test_metrics_come_from_the_engine_process(servers):
    _, split, base = servers
    before = metrics(base)
    split.chat.completions.create(model=MODEL, messages=MSG, max_tokens=5)
    after = metrics(base)
    key = ("llorch_engine_requests_total", (("model", MODEL), ("outcome", "ok")))
    assert after[key] == before.get(key, 0) + 1
    chat = ("llorch_requests_total", (("endpoint", "/v1/chat/completions"), ("status", "200")))
    assert after[chat] == before.get(chat, 0) + 1
    assert after[("llorch_slots", M)] == 4


def test_unload_is_refused_and_the_model_stays_loaded(servers):
    """The model lives in the engine process all workers share: an unload that only
    detached the worker that got it would say "unloaded" and free nothing, so it is a 400
    that says why (load answers the card: it is loaded)."""
    _, split, base = servers
    for _ in range(3):  # whichever worker gets it
        r = httpx.post(f"{base}/v1/models/{MODEL}/unload", timeout=30)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error" and error["code"] == "unload_not_supported"
        assert "--api-workers" in error["message"] and "engine process" in error["message"]
        assert split.models.retrieve(MODEL).model_extra["status"] == "loaded"
        assert split.chat.completions.create(model=MODEL, messages=MSG, max_tokens=3).choices
    r = httpx.post(f"{base}/v1/models/{MODEL}/load", timeout=30)
    assert r.status_code == 200 and r.json()["status"] == "loaded"
    assert httpx.get(f"{base}/health").status_code == 200


# ------------------------------------------------------------------ faults


def test_disconnect_frees_the_slot(long_tiny_dir, tmp_path):  # noqa: F811 - the fixture
    with split_server(long_tiny_dir, *ARGS, log_path=tmp_path / "s.log") as (base, _, _):
        with httpx.Client(timeout=30) as http, http.stream("POST", f"{base}/v1/chat/completions",
                                                           json=LONG) as r:
            chunks = r.iter_raw()  # held: a dropped iterator closes the response
            next(chunks)
            # the other worker hears of the step's counters a moment later
            wait_for(lambda: httpx.get(f"{base}/health").json()["slots_in_use"] == 1, 5, "slot in use")
        wait_for(lambda: httpx.get(f"{base}/health").json()["slots_in_use"] == 0, 10, "slot freed")
        m = metrics(base)
        assert m[("llorch_engine_requests_total", (("model", MODEL), ("outcome", "cancelled")))] == 1


def test_sigterm_drains_then_everyone_exits_0(long_tiny_dir, tmp_path):  # noqa: F811
    log = tmp_path / "s.log"
    with split_server(long_tiny_dir, *ARGS, "--drain-timeout", "1.5", log_path=log) as (base, proc, pids):
        body = {**LONG, "max_tokens": 100}
        with httpx.Client(timeout=30) as http, \
             http.stream("POST", f"{base}/v1/chat/completions", json=LONG) as long, \
             http.stream("POST", f"{base}/v1/chat/completions", json=body) as short:
            long_chunks, short_chunks = long.iter_raw(), short.iter_raw()
            raw_long, raw_short = [next(long_chunks)], [next(short_chunks)]
            proc.send_signal(signal.SIGTERM)
            wait_for(lambda: httpx.get(f"{base}/health").status_code == 503, 5, "draining")
            refused = httpx.post(f"{base}/v1/chat/completions", json={**body, "stream": False})
            raw_short += list(short_chunks)
            raw_long += list(long_chunks)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
        assert _sse(b"".join(raw_short))[-1]["choices"][0]["finish_reason"] == "length"
        assert _sse(b"".join(raw_long))[-1]["error"]["code"] == "shutting_down"
        assert proc.wait(30) == 0, log.read_text()
    assert not any(_alive(p) for p in pids["engine"] + pids["workers"])
    assert "Traceback" not in log.read_text()


def test_second_signal_is_quiet_and_third_kills_every_process(long_tiny_dir, tmp_path):  # noqa: F811
    """Idle: two signals stop in order (exit 0, no traceback from any process); mid-stream, a
    third kills the workers and the engine and exits 128 + SIGTERM at once."""
    log = tmp_path / "s.log"
    with split_server(long_tiny_dir, *ARGS, log_path=log) as (_, proc, pids):
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()
    assert not any(_alive(p) for p in pids["engine"] + pids["workers"])
    assert "Traceback" not in log.read_text(), log.read_text()
    with split_server(long_tiny_dir, *ARGS, "--drain-timeout", "60", log_path=log) as (base, proc, pids):
        with httpx.Client(timeout=30) as http, http.stream("POST", f"{base}/v1/chat/completions", json=LONG) as r:
            chunks = r.iter_raw()  # kept: a dropped iterator closes the connection when
            next(chunks)  # collected, and the stream would end before the test wants it to
            for _ in range(3):
                proc.send_signal(signal.SIGTERM)
                time.sleep(0.05)
            assert proc.wait(10) == 128 + signal.SIGTERM, log.read_text()
    wait_for(lambda: not any(_alive(p) for p in pids["engine"] + pids["workers"]), 5, "every process gone")
    assert "Traceback" not in log.read_text(), log.read_text()


def test_killed_engine_ends_requests_with_an_error_and_the_server_exits_1(long_tiny_dir, tmp_path):  # noqa: F811
    log = tmp_path / "s.log"
    with split_server(long_tiny_dir, *ARGS, log_path=log) as (base, proc, pids):
        with httpx.Client(timeout=30) as http, \
             http.stream("POST", f"{base}/v1/chat/completions", json=LONG) as stream:
            chunks = stream.iter_raw()
            raw = [next(chunks)]
            os.kill(pids["engine"][0], signal.SIGKILL)
            raw += list(chunks)  # must end, not hang (the client's timeout is 30 s)
        events = _sse(b"".join(raw))
        assert events[-1]["error"]["type"] == "server_error"
        assert "engine process stopped" in events[-1]["error"]["message"]
        assert proc.wait(30) == 1, log.read_text()
    assert not any(_alive(p) for p in pids["workers"])
    assert "error: the engine process died" in log.read_text()


def test_killed_engine_answers_a_waiting_request_with_a_5xx(long_tiny_dir, tmp_path):  # noqa: F811
    with split_server(long_tiny_dir, *ARGS, log_path=tmp_path / "s.log") as (base, proc, pids):
        with httpx.Client(timeout=30) as http:
            body = {**LONG, "stream": False}

            def kill_soon() -> None:
                time.sleep(0.5)
                os.kill(pids["engine"][0], signal.SIGKILL)

            import threading  # noqa: PLC0415

            threading.Thread(target=kill_soon).start()
            r = http.post(f"{base}/v1/chat/completions", json=body)
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        assert "engine process stopped" in r.json()["error"]["message"]
        assert proc.wait(30) == 1


def test_killed_worker_the_others_keep_serving(tiny_model_dir, tmp_path):
    log = tmp_path / "s.log"
    with split_server(tiny_model_dir, *ARGS, log_path=log) as (base, proc, pids):
        os.kill(pids["workers"][0], signal.SIGKILL)
        with OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=30) as client:
            for _ in range(6):  # new connections: whichever worker accepts them answers
                r = client.with_options().chat.completions.create(model=MODEL, messages=MSG, max_tokens=4)
                assert r.choices[0].message.content
        wait_for(lambda: "starting it again" in log.read_text(), 10, "the worker restarted")
        assert proc.poll() is None
        # the restarted worker serves too: it connects and its /health says ok
        try:
            wait_for(lambda: log.read_text().count("is ready") >= 4, 30, "the new worker ready")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{log.read_text()}") from None


def test_several_models_are_refused(tiny_model_dir, tmp_path):
    r = subprocess.run([sys.executable, "-m", "serve.main", f"{tiny_model_dir}=a", f"{tiny_model_dir}=b",
                        "--port", "0", "--api-workers", "2"], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2
    assert "--api-workers serves one model" in r.stderr and "--models-dir" in r.stderr


def test_idle_unload_is_refused(tiny_model_dir):
    """--idle-unload would only detach idle workers; the engine process keeps the model."""
    r = subprocess.run([sys.executable, "-m", "serve.main", str(tiny_model_dir), "--port", "0",
                        "--api-workers", "2", "--idle-unload", "60"], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "--idle-unload" in r.stderr and "--api-workers" in r.stderr, r.stderr


@pytest.mark.parametrize("early_leaves", ["serving", "exits"])
def test_the_other_workers_start_only_once_the_early_one_serves(tmp_path, early_leaves):
    """The workers share the port: had a late worker answered /health 200 while the early one
    was still connecting, the client's next connection could reach the early one and get 503
    model_loading (seen as a stream without [DONE] in test_killed_engine_… 2 runs in 20). The
    engine holds the other workers' "ready" until the early one serves, or is gone."""
    from multiprocessing.connection import Client, Listener
    from types import SimpleNamespace

    from serve.frontend.hub import EngineHub
    from serve.metrics import Metrics
    from serve.response_store import ResponseStore

    address, key = str(tmp_path / "engine.sock"), b"k" * 32
    listener = Listener(address, family="AF_UNIX", authkey=key)
    hub = EngineHub(listener, Metrics(), ResponseStore(1))
    hub.start()
    try:
        early, late = (Client(address, family="AF_UNIX", authkey=key) for _ in range(2))
        late.send(("hello", False))
        early.send(("hello", True))
        engine = SimpleNamespace(max_length=64, vocab_size=10, n_slots=2, kv_bytes=lambda: 0,
                                 on_step=None, wake=lambda: None)
        hub.ready(engine)
        assert early.poll(10) and early.recv()[0] == "ready"
        assert not late.poll(1.0)  # held while the early worker still connects
        if early_leaves == "serving":
            early.send(("serving",))
        else:  # it failed after "ready" (its tokenizer, say): the others must not wait for it
            early.close()
        assert late.poll(10) and late.recv()[0] == "ready"
        late.close()
    finally:
        listener.close()


def test_pack_round_trips_every_event():
    from serve.events import ChoiceOutput, Event, TokenLogprob, Usage
    from serve.frontend.hub import pack, unpack

    events = [
        Event((ChoiceOutput(0, " hi", (42,)), ChoiceOutput(1, "", (7, 8), finish_reason="stop",
                                                           stop_sequence="\n"))),
        Event((ChoiceOutput(0, "a", (3,)),), cached_tokens=5),  # a request's first event
        Event((ChoiceOutput(0, "x", (1,), finish_reason="length"),), usage=Usage(3, 1, 2)),
        Event((ChoiceOutput(0, "y", (2,), logprobs=(TokenLogprob(2, -0.5, ((2, -0.5),)),)),)),
        Event(prompt_logprobs=(None, TokenLogprob(5, -1.0))),
        Event(error="boom", error_code="queue_full"),
    ]
    for rid, event in enumerate(events):
        assert unpack(pack(rid, event)) == (rid, event)
    assert len(pack(0, events[0])) == 4 and len(pack(0, events[3])) == 2  # plain tuples, or the event


@pytest.mark.parametrize("n", ["0", "-1", "65", "1000"])
def test_api_workers_out_of_range_is_exit_2_naming_the_flag(tiny_model_dir, n):
    r = subprocess.run([sys.executable, "-m", "serve.main", str(tiny_model_dir), "--port", "0",
                        "--api-workers", n], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--api-workers must be between 1" in r.stderr and n in r.stderr, r.stderr


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs CPU affinity")
def test_more_workers_than_cpus_is_a_warning(tiny_model_dir, tmp_path):
    """On one CPU, two workers start (it is allowed) but the log says they will compete."""
    one_cpu = min(os.sched_getaffinity(0))
    log = tmp_path / "s.log"
    port = _free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "serve.main", str(tiny_model_dir), *ARGS, "--port",
                                 str(port), "--api-workers", "2"], cwd=REPO, stdout=out,
                                stderr=subprocess.STDOUT, preexec_fn=lambda: os.sched_setaffinity(0, {one_cpu}))
    try:
        def ready() -> bool:
            assert proc.poll() is None, log.read_text()
            with contextlib.suppress(httpx.TransportError):
                return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
            return False

        wait_for(ready, 120, "server ready")
        text = log.read_text()
        assert "WARNING serve.frontend: --api-workers 2 is more than the CPUs this process may use (1)" in text, text
    finally:
        proc.terminate()
        assert proc.wait(30) == 0
