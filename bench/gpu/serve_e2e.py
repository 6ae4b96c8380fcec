"""The real HTTP server (`python -m serve.main`) end to end with the official `openai` client.

    python bench/gpu/serve_e2e.py --model-dir /root/work/cuda-fp16 \\
        [--gguf models/.cache/SmolLM2-135M-Instruct.Q4_1.gguf] --provider cuda --out e2e.json

`--model-dir` is served as it is when it holds an export (`llorch.json`); otherwise `--gguf` is
exported into it first (`--target cuda --precision fp16` unless told otherwise).
`bench_cuda.py --work W` leaves that export in `W/cuda-fp16`.

The server runs in a subprocess on a free port (its log: `--server-log`, default `server.log`
beside `--out`). Then, each a named check that records pass/fail and details and never stops
the run (the JSON is rewritten after every check and stage):
  models_list            GET /v1/models lists the served model
  chat_greedy            greedy chat "What is the capital of France?" mentions Paris
  chat_stream            the same request streamed: same text from the deltas, same finish
                         reason, a final usage chunk (stream_options.include_usage)
  completions_logprobs   logprobs=2: one entry per completion token, <= 2 alternatives each,
                         the greedy token's logprob the largest, tokens join to the text
  n2_seed                n=2 with a seed: two choices (same seed again: same texts, recorded)
  stop_string            a stop string cut from the greedy answer ends it there, finish "stop"
  invalid_400            temperature=-1 (chat) and max_tokens=0 (completions): BadRequestError 400
  unknown_model_404      a model that is not served: NotFoundError 404
  batched_equals_alone   8 greedy streams at once give the texts each gives alone (soft: fp16
                         kernels may round a batch row differently; recorded, not failed)
then `inprocess` (before the server starts, in a child process: the server's own `Engine`,
built by `serve.main.load_engine` with the server's flags, fed the same chat prompts through
`Engine.submit` with no HTTP: aggregate completion tok/s at each --streams, --repeats runs),
`throughput` (the same streams over HTTP, driven by --clients client processes started at one
instant: aggregate completion tok/s, TTFT and inter-token latency percentiles, --repeats runs;
`all_tok_s`, `median_tok_s`, `spread` = (max − min) / median), `http_over_inprocess` (per stream
count: median HTTP tok/s ÷ median in-process tok/s, issue 18's ratio; with
`--server-args="--api-workers 4"` the split server) and `ttft` (a prompt of
--ttft-tokens random token ids through /v1/completions, a fresh prompt each run so the prefix
cache never helps; the first run warms the shapes up).

With --provider cuda the server is started as `python -m serve.main` first; if it does not come
up, once more with `onnxruntime.preload_dlls()` run before `serve.main` (how bench_cuda.py and
smoke_cuda.py load CUDA/cuDNN from the nvidia-* wheels); `server.launch` says which served.
`--quick` shrinks everything (streams 1,4, 16 tokens, a 200-token TTFT prompt) for a CPU dry run.
Exit status: 0 when every hard check passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import importlib.util
import json
import multiprocessing
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
import traceback
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from staging import run_stage  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # serve, export (the in-process stage's child process too)
    sys.path.append(str(REPO))
PARIS_Q = [{"role": "user", "content": "What is the capital of France?"}]
QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.",
             "Explain in two sentences why the sky is blue.",
             "List three prime numbers greater than 10.", "Who wrote Hamlet?",
             "Give me a recipe for pancakes.", "What is 12 times 12?",
             "Describe a cat to someone who has never seen one."]
TOPICS = ["the ocean", "volcanoes", "bread", "the moon", "trains", "bees", "glass", "chess",
          "rain", "maps", "owls", "copper", "jazz", "deserts", "kites", "clocks"]
PACKAGES = ["openai", "httpx2", "httpx", "starlette", "uvicorn", "pydantic", "pydantic_core",
            "jinja2", "prometheus_client", "tokenizers", "numpy", "onnxruntime-gpu", "onnxruntime"]
MODULES = ["openai", "starlette", "uvicorn", "pydantic", "onnxruntime", "numpy", "tokenizers"]


# ------------------------------------------------------------------------------ the report


class Report:
    """One JSON object, rewritten after every check and stage."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict = {"command": " ".join(sys.argv), "checks": {}}

    def save(self) -> None:
        checks = self.data["checks"]
        hard = {k: c for k, c in checks.items() if c.get("hard", True)}
        self.data["summary"] = {
            "hard_passed": sum(c["pass"] is True for c in hard.values()),
            "hard_failed": sorted(k for k, c in hard.items() if c["pass"] is not True),
            "soft_failed": sorted(k for k, c in checks.items()
                                  if not c.get("hard", True) and c["pass"] is not True),
        }
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        tmp.replace(self.path)

    def check(self, name: str, fn, *args, hard: bool = True) -> dict | None:
        """fn returns (passed, details); an exception is a failure with its traceback."""
        t0 = time.perf_counter()
        entry: dict = {"hard": hard}
        try:
            passed, details = fn(*args)
            entry.update({"pass": bool(passed), "details": details})
        except Exception as e:  # noqa: BLE001 - recorded; the other checks still run
            details = None
            entry.update({"pass": False, "error": f"{type(e).__name__}: {e}"[:1000],
                          "traceback": traceback.format_exc()[-2000:]})
        entry["seconds"] = round(time.perf_counter() - t0, 3)
        self.data["checks"][name] = entry
        mark = "PASS" if entry["pass"] else ("FAIL" if hard else "SOFT-FAIL")
        print(f"[check] {name}: {mark} ({entry['seconds']:.1f} s)"
              + ("" if entry["pass"] else f" {entry.get('error') or _short(details)}"),
              file=sys.stderr, flush=True)
        self.save()
        return details

    def stage(self, name: str, fn, *args):
        return run_stage(self, name, fn, *args)


def _short(x, n: int = 300) -> str:
    return json.dumps(x, default=str)[:n]


def environment() -> dict:
    env: dict = {"python": platform.python_version(), "host": platform.node(),
                 "executable": sys.executable, "packages": {}, "modules": {}}
    for p in PACKAGES:
        try:
            env["packages"][p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            pass
    for m in MODULES:
        spec = importlib.util.find_spec(m)
        env["modules"][m] = spec.origin if spec else None
    try:
        import onnxruntime as ort

        env["onnxruntime_providers"] = ort.get_available_providers()
    except Exception as e:  # noqa: BLE001
        env["onnxruntime_providers"] = f"{type(e).__name__}: {e}"
    env["gpu"] = _nvidia_smi("--query-gpu=name,driver_version,memory.total")
    return env


def _nvidia_smi(query: str) -> str:
    try:
        return subprocess.run(["nvidia-smi", query, "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"nvidia-smi unavailable: {e}"


# ------------------------------------------------------------------------------ the model


def is_export(d: Path) -> bool:
    return (d / "llorch.json").is_file() and (d / "tokenizer.json").is_file()


def prepare_model(args) -> dict:
    if is_export(args.model_dir):
        return {"dir": str(args.model_dir), "exported_here": False,
                "llorch_json": json.loads((args.model_dir / "llorch.json").read_text())}
    if args.gguf is None:
        raise ValueError(f"{args.model_dir} holds no export (llorch.json) and no --gguf was given")
    from export.api import export_model

    s = export_model(args.gguf, args.model_dir, precision=args.precision, target=args.target,
                     force=True, progress=False)
    return {"dir": str(args.model_dir), "exported_here": True, "seconds": s.seconds,
            "mib": s.bytes_written / 2**20,
            "llorch_json": json.loads((args.model_dir / "llorch.json").read_text())}


# ------------------------------------------------------------------------------ the server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 5) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


PRELOAD = ("import runpy, sys, onnxruntime as o\n"
           "try:\n    o.preload_dlls()\nexcept Exception as e:\n"
           "    print('preload_dlls:', e, file=sys.stderr)\n"
           "runpy.run_module('serve.main', run_name='__main__', alter_sys=True)\n")


class Server:
    """`python -m serve.main MODEL --port P ...` (or the preload wrapper) until stop()."""

    def __init__(self, model_dir: Path, flags: list[str], log_path: Path, launch: str):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        head = [sys.executable, "-m", "serve.main"] if launch == "plain" else \
            [sys.executable, "-c", PRELOAD]
        self.cmd = [*head, str(model_dir), "--port", str(self.port), *flags]
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(self.cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def wait_ready(self, timeout: float) -> float:
        t0 = time.monotonic()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: "
                                   f"{self.log_tail()}")
            try:
                if http_get(f"{self.base}/health", 2)[0] == 200:
                    return time.monotonic() - t0
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() - t0 > timeout:
                raise RuntimeError(f"server not ready after {timeout:.0f} s: {self.log_tail()}")
            time.sleep(0.2)

    def log_tail(self, n: int = 1500) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_server(args, flags: list[str], rep: Report) -> Server:
    launches = [args.launch] if args.launch != "auto" else \
        (["plain", "preload"] if args.provider == "cuda" else ["plain"])
    info: dict = {"flags": flags, "attempts": []}
    rep.data["server"] = info
    for k, launch in enumerate(launches):
        log_path = args.server_log if k == len(launches) - 1 else \
            args.server_log.with_name(f"{args.server_log.stem}.{launch}{args.server_log.suffix}")
        server = Server(args.model_dir, flags, log_path, launch)
        try:
            ready = server.wait_ready(args.ready_timeout)
        except RuntimeError as e:
            server.stop()
            info["attempts"].append({"launch": launch, "cmd": server.cmd, "log": str(log_path),
                                     "error": str(e)[-2000:]})
            print(f"[server] {launch}: {str(e)[-600:]}", file=sys.stderr, flush=True)
            rep.save()
            if k == len(launches) - 1:
                raise
            continue
        info.update({"launch": launch, "cmd": server.cmd, "base": server.base,
                     "ready_s": round(ready, 2), "log": str(log_path), "pid": server.proc.pid})
        info["attempts"].append({"launch": launch, "ready_s": round(ready, 2)})
        if args.provider == "cuda":
            info["gpu_processes"] = _nvidia_smi("--query-compute-apps=pid,used_memory")
        print(f"[server] up ({launch}) in {ready:.1f} s at {server.base}", file=sys.stderr,
              flush=True)
        rep.save()
        return server
    raise AssertionError("unreachable")


# ------------------------------------------------------------------------------ the checks


class Checks:
    def __init__(self, client, model: str, expected_model: str, args):
        self.c, self.model, self.expected, self.args = client, model, expected_model, args
        self.greedy: dict | None = None  # the chat_greedy answer, reused by later checks

    def chat(self, **kw):
        kw.setdefault("messages", PARIS_Q)
        return self.c.chat.completions.create(model=self.model, **kw)

    def models_list(self):
        ids = [m.id for m in self.c.models.list().data]
        return self.expected in ids, {"ids": ids, "expected": self.expected}

    def chat_greedy(self):
        r = self.chat(temperature=0, max_tokens=self.args.answer_tokens)
        text = r.choices[0].message.content or ""
        self.greedy = {"text": text, "finish_reason": r.choices[0].finish_reason,
                       "completion_tokens": r.usage.completion_tokens,
                       "prompt_tokens": r.usage.prompt_tokens}
        return "Paris" in text, dict(self.greedy)

    def chat_stream(self):
        chunks = list(self.chat(temperature=0, max_tokens=self.args.answer_tokens, stream=True,
                                stream_options={"include_usage": True}))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and
                  c.choices[0].finish_reason]
        last = chunks[-1] if chunks else None
        usage_chunk = last is not None and not last.choices and last.usage is not None
        g = self.greedy or {}
        d = {"text": text, "finish_reason": finish, "chunks": len(chunks),
             "final_usage_chunk": usage_chunk,
             "usage": last.usage.model_dump() if usage_chunk else None,
             "same_text_as_non_stream": text == g.get("text"),
             "same_finish_as_non_stream": finish == [g.get("finish_reason")],
             "same_completion_tokens": usage_chunk and
             last.usage.completion_tokens == g.get("completion_tokens")}
        ok = (d["same_text_as_non_stream"] and d["same_finish_as_non_stream"] and usage_chunk
              and d["same_completion_tokens"])
        return ok, d

    def completions_logprobs(self):
        r = self.c.completions.create(model=self.model, prompt="The capital of France is",
                                      max_tokens=8, temperature=0, logprobs=2)
        ch = r.choices[0]
        lp = ch.logprobs
        n = r.usage.completion_tokens
        tops = lp.top_logprobs or []
        d = {"text": ch.text, "completion_tokens": n, "tokens": lp.tokens,
             "token_logprobs": lp.token_logprobs, "top_logprobs": tops,
             "text_offset": lp.text_offset}
        lengths_ok = (len(lp.tokens) == len(lp.token_logprobs) == len(tops)
                      == len(lp.text_offset) == n)
        tops_ok = all(t is not None and 1 <= len(t) <= 2 for t in tops)
        values_ok = all(x is not None and x <= 1e-6 for x in lp.token_logprobs)
        greedy_top = all(x >= max(t.values()) - 1e-3 for x, t in
                         zip(lp.token_logprobs, tops, strict=False) if t)
        joined = "".join(lp.tokens) == ch.text
        d.update({"lengths_ok": lengths_ok, "tops_ok": tops_ok, "values_ok": values_ok,
                  "greedy_token_is_top": greedy_top, "tokens_join_to_text": joined})
        return lengths_ok and tops_ok and values_ok and greedy_top and joined and n > 0, d

    def n2_seed(self):
        kw = dict(n=2, seed=1234, temperature=1.0, max_tokens=16)
        r = self.chat(**kw)
        again = self.chat(**kw)
        texts = [c.message.content for c in sorted(r.choices, key=lambda c: c.index)]
        texts2 = [c.message.content for c in sorted(again.choices, key=lambda c: c.index)]
        d = {"indices": sorted(c.index for c in r.choices), "texts": texts,
             "same_seed_same_texts": texts == texts2, "texts_again": texts2,
             "completion_tokens": r.usage.completion_tokens}
        return d["indices"] == [0, 1], d

    def stop_string(self):
        text = (self.greedy or {}).get("text") or ""
        if "Paris" in text:
            stop = "Paris"
        else:  # any 4 characters from the middle of the answer
            k = len(text) // 2
            stop = text[k:k + 4]
        if not stop.strip():
            return False, {"error": "no greedy answer to cut a stop string from", "text": text}
        want = text[:text.find(stop)]
        r = self.chat(temperature=0, max_tokens=self.args.answer_tokens, stop=[stop])
        got = r.choices[0].message.content or ""
        d = {"stop": stop, "text": got, "expected": want,
             "finish_reason": r.choices[0].finish_reason}
        return got == want and d["finish_reason"] == "stop", d

    def invalid_400(self):
        import openai

        out = {}
        for name, call in (
            ("chat_temperature_-1", lambda: self.chat(temperature=-1, max_tokens=4)),
            ("completions_max_tokens_0", lambda: self.c.completions.create(
                model=self.model, prompt="hello", max_tokens=0)),
        ):
            try:
                call()
                out[name] = {"raised": None}
            except openai.BadRequestError as e:
                out[name] = {"raised": "BadRequestError", "status": e.status_code,
                             "body": e.body}
            except openai.APIStatusError as e:
                out[name] = {"raised": type(e).__name__, "status": e.status_code, "body": e.body}
        ok = all(v["raised"] == "BadRequestError" and v["status"] == 400 for v in out.values())
        return ok, out

    def unknown_model_404(self):
        import openai

        try:
            self.c.chat.completions.create(model="no-such-model", messages=PARIS_Q, max_tokens=2)
            return False, {"raised": None}
        except openai.NotFoundError as e:
            return e.status_code == 404, {"raised": "NotFoundError", "status": e.status_code,
                                          "body": e.body}


# ------------------------------------------------------------------------------ async streams


async def one_stream(client, model: str, messages, max_tokens: int, *, ignore_eos: bool = True
                     ) -> dict:
    t0 = time.perf_counter()
    stamps: list[float] = []
    text: list[str] = []
    usage = None
    stream = await client.chat.completions.create(
        model=model, messages=messages, temperature=0, max_tokens=max_tokens, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": ignore_eos})
    async for chunk in stream:
        usage = chunk.usage or usage
        for c in chunk.choices:
            if c.delta.content:
                stamps.append(time.perf_counter())
                text.append(c.delta.content)
    end = time.perf_counter()
    return {"t0": t0, "stamps": stamps, "end": end, "text": "".join(text),
            "tokens": usage.completion_tokens if usage else None,
            "prompt_tokens": usage.prompt_tokens if usage else None}


def essay(i: int) -> list[dict]:
    return [{"role": "user",
             "content": f"Write a long essay about {TOPICS[i % len(TOPICS)]} (#{i})."}]


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def _ms(x: float | None) -> float | None:
    return None if x is None else round(1000 * x, 2)


async def batched_vs_alone(client, model: str, n: int, max_tokens: int) -> tuple[bool, dict]:
    msgs = [[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}] for i in range(n)]
    alone = [await one_stream(client, model, m, max_tokens) for m in msgs]
    together = await asyncio.gather(*(one_stream(client, model, m, max_tokens) for m in msgs))
    rows = []
    for m, a, t in zip(msgs, alone, together, strict=True):
        same = a["text"] == t["text"]
        first = next((k for k, (x, y) in enumerate(zip(a["text"], t["text"], strict=False))
                      if x != y), min(len(a["text"]), len(t["text"])))
        rows.append({"prompt": m[0]["content"], "equal": same,
                     **({} if same else {"first_diff_char": first, "alone": a["text"],
                                         "together": t["text"]})})
    return all(r["equal"] for r in rows), {"streams": n, "max_tokens": max_tokens,
                                           "mismatches": sum(not r["equal"] for r in rows),
                                           "rows": rows}


async def concurrency(client, model: str, c: int, max_tokens: int, offset: int) -> dict:
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    runs = await asyncio.gather(*(one_stream(client, model, essay(offset + i), max_tokens)
                                  for i in range(c)))
    wall = max(r["end"] for r in runs) - t0
    tokens = sum(r["tokens"] or 0 for r in runs)
    chunks = sum(len(r["stamps"]) for r in runs)
    gaps = [b - a for r in runs for a, b in zip(r["stamps"], r["stamps"][1:], strict=False)]
    ttfts = [r["stamps"][0] - r["t0"] for r in runs if r["stamps"]]
    last_first = max(r["stamps"][0] for r in runs if r["stamps"])
    last = max(r["stamps"][-1] for r in runs if r["stamps"])
    after_first = sum((r["tokens"] or 0) - 1 for r in runs)
    return {
        "streams": c, "completion_tokens": tokens, "content_chunks": chunks,
        "wall_s": round(wall, 3), "tok_s": round(tokens / wall, 1),
        "decode_tok_s": round(after_first / (last - last_first), 1) if last > last_first
        else None,
        "per_stream_tok_s": round(tokens / wall / c, 1),
        "itl_ms": {"p50": _ms(_pct(gaps, 50)), "p95": _ms(_pct(gaps, 95)),
                   "p99": _ms(_pct(gaps, 99)), "max": _ms(max(gaps) if gaps else None),
                   "mean": _ms(statistics.mean(gaps) if gaps else None), "n": len(gaps)},
        "ttft_ms": {"p50": _ms(_pct(ttfts, 50)), "p95": _ms(_pct(ttfts, 95)),
                    "max": _ms(max(ttfts) if ttfts else None)},
        "client_cpu_fraction": round((time.process_time() - cpu0) / wall, 3),
        "short_streams": sum((r["tokens"] or 0) < max_tokens for r in runs),
    }


def _client_part(base: str, model: str, idx: list[int], max_tokens: int, start_at: float
                 ) -> tuple[list[dict], float]:
    """One client process: its share of the streams (`essay(i)` for i in idx), begun at
    `start_at` (time.perf_counter: CLOCK_MONOTONIC, one clock for every process on the host);
    returns the streams and the process's CPU seconds."""
    from openai import AsyncOpenAI

    async def go():
        async with AsyncOpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0,
                               timeout=300) as client:
            await asyncio.sleep(max(0.0, start_at - time.perf_counter()))
            return await asyncio.gather(*(one_stream(client, model, essay(i), max_tokens)
                                          for i in idx))

    cpu0 = time.process_time()
    runs = asyncio.run(go())
    return runs, time.process_time() - cpu0


def aggregate(runs: list[dict], streams: int, max_tokens: int) -> dict:
    """Figures of one timed run from its streams (`one_stream` dicts)."""
    t0 = min(r["t0"] for r in runs)
    wall = max(r["end"] for r in runs) - t0
    tokens = sum(r["tokens"] or 0 for r in runs)
    gaps = [b - a for r in runs for a, b in zip(r["stamps"], r["stamps"][1:], strict=False)]
    ttfts = [r["stamps"][0] - r["t0"] for r in runs if r["stamps"]]
    last_first = max(r["stamps"][0] for r in runs if r["stamps"])
    last = max(r["stamps"][-1] for r in runs if r["stamps"])
    return {
        "streams": streams, "completion_tokens": tokens,
        "wall_s": round(wall, 3), "tok_s": round(tokens / wall, 1),
        "decode_tok_s": round(sum((r["tokens"] or 0) - 1 for r in runs) / (last - last_first), 1)
        if last > last_first else None,
        "per_stream_tok_s": round(tokens / wall / streams, 1),
        "itl_ms": {"p50": _ms(_pct(gaps, 50)), "p95": _ms(_pct(gaps, 95)),
                   "p99": _ms(_pct(gaps, 99))},
        "ttft_ms": {"p50": _ms(_pct(ttfts, 50)), "p95": _ms(_pct(ttfts, 95)),
                    "max": _ms(max(ttfts) if ttfts else None),
                    "mean": _ms(statistics.mean(ttfts) if ttfts else None)},
        "short_streams": sum((r["tokens"] or 0) < max_tokens for r in runs),
    }


def load(pool, base: str, model: str, streams: int, clients: int, max_tokens: int,
         offset: int) -> dict:
    """One timed run of `streams` HTTP streams spread over `clients` processes of `pool`."""
    start_at = time.perf_counter() + 1.0
    shares = [list(range(offset + k, offset + streams, clients)) for k in range(clients)]
    parts = pool.starmap(_client_part, [(base, model, s, max_tokens, start_at) for s in shares
                                        if s])
    out = aggregate([r for rs, _ in parts for r in rs], streams, max_tokens)
    out["clients"] = clients
    out["client_cpu_fraction"] = [round(c / out["wall_s"], 3) for _, c in parts]
    return out


def repeated(runs: list[dict]) -> dict:
    """The median run of several, with every run's tok/s and their spread."""
    tps = [r["tok_s"] for r in runs]
    median = statistics.median(tps)
    best = min(runs, key=lambda r: abs(r["tok_s"] - median))
    return {**best, "all_tok_s": tps, "median_tok_s": median,
            "spread": round((max(tps) - min(tps)) / median, 3) if median else None}


def inprocess_engine(model_dir: str, server_flags: list[str], streams: list[int],
                     max_tokens: int, repeats: int) -> dict:
    """The server's engine without HTTP (run in a child process, before the server starts):
    `serve.main.load_engine` with the server's flags, the throughput stage's chat prompts
    (chat template applied, greedy, ignore_eos) submitted at once, `repeats` timed runs per
    stream count; the same figures as over HTTP."""
    import argparse as _argparse

    from serve.events import GenerationRequest
    from serve.main import load_engine
    from serve.options import add_arguments, options_from_args
    from serve.sampling import SamplingParams

    parser = _argparse.ArgumentParser()
    add_arguments(parser)
    flags = [f for f in server_flags if not f.startswith("--api-workers=")]
    if "--api-workers" in flags:  # the engine is the same; only the server splits
        i = flags.index("--api-workers")
        del flags[i:i + 2]
    options = options_from_args([model_dir], parser.parse_args(flags))
    engine = load_engine(options)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)

    def prompt(i: int) -> tuple[int, ...]:
        return tuple(engine.tokenizer.encode_chat(essay(i))[1])

    async def one(i: int) -> dict:
        t0 = time.perf_counter()
        stamps: list[float] = []
        tokens = 0
        async for event in engine.submit(GenerationRequest(prompt(i), params)):
            now = time.perf_counter()
            for c in event.choices:
                if c.token_ids:
                    stamps.extend([now] * len(c.token_ids))
                    tokens += len(c.token_ids)
        return {"t0": t0, "stamps": stamps, "end": time.perf_counter(), "tokens": tokens}

    async def run(c: int, offset: int) -> dict:
        return aggregate(await asyncio.gather(*(one(offset + i) for i in range(c))), c,
                         max_tokens)

    out: dict = {"note": "serve.engine.Engine in one process, Engine.submit, no HTTP"}
    try:
        offset = 0
        for c in streams:
            asyncio.run(run(c, 1000))  # warm-up: ORT meets these batch sizes
            runs = []
            for _ in range(repeats):
                runs.append(asyncio.run(run(c, offset)))
                offset += c
            out[str(c)] = repeated(runs)
            print(f"[inprocess] {c} streams: {out[str(c)]['median_tok_s']} tok/s (median)",
                  file=sys.stderr, flush=True)
    finally:
        engine.stop()
    return out


def inprocess(args, flags: list[str]) -> dict:
    """`inprocess_engine` in a child process (the GPU is free again when it ends)."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(inprocess_engine, (str(args.model_dir), flags, args.streams,
                                             args.max_tokens, args.repeats))


def http_over_inprocess(http: dict | None, inproc: dict | None) -> dict:
    """Per stream count: median HTTP tok/s ÷ median in-process tok/s, with both spreads."""
    out = {}
    for key, h in (http or {}).items():
        i = (inproc or {}).get(key)
        if not isinstance(h, dict) or not isinstance(i, dict) or "median_tok_s" not in h \
                or "median_tok_s" not in i:
            continue
        out[key] = {"http_tok_s": h["median_tok_s"], "inprocess_tok_s": i["median_tok_s"],
                    "http_over_inprocess": round(h["median_tok_s"] / i["median_tok_s"], 3),
                    "http_spread": h["spread"], "inprocess_spread": i["spread"]}
    return out


def throughput_clients(base: str, model: str, args) -> dict:
    """Each --streams count over HTTP from --clients client processes, --repeats timed runs."""
    out: dict = {"max_tokens": args.max_tokens, "repeats": args.repeats, "clients": args.clients,
                 "note": "chat streams, greedy, ignore_eos, distinct prompts, from --clients "
                 "processes; the median run is kept, all_tok_s lists every run"}
    offset = 0
    with multiprocessing.get_context("spawn").Pool(args.clients) as pool:
        for c in args.streams:
            try:
                clients = max(1, min(args.clients, c))
                load(pool, base, model, c, clients, 8, 1000)  # warm-up at this concurrency
                runs = []
                for _ in range(args.repeats):
                    runs.append(load(pool, base, model, c, clients, args.max_tokens, offset))
                    offset += c
                out[str(c)] = repeated(runs)
                print(f"[throughput] {c} streams: {out[str(c)]['all_tok_s']} tok/s, ITL p50 "
                      f"{out[str(c)]['itl_ms']['p50']} ms", file=sys.stderr, flush=True)
            except Exception as e:  # noqa: BLE001 - one concurrency failing keeps the others
                out[str(c)] = {"error": f"{type(e).__name__}: {e}"[:1000]}
    return out


async def throughput(base: str, model: str, args) -> dict:
    from openai import AsyncOpenAI

    out: dict = {"max_tokens": args.max_tokens, "repeats": args.repeats, "note":
                 "chat streams, greedy, ignore_eos, distinct prompts; ITL = gaps between "
                 "content chunks (one token each unless content_chunks < completion_tokens)"}
    async with AsyncOpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0,
                           timeout=180) as client:
        offset = 0
        for c in args.streams:
            try:
                # warm-up at this concurrency: ORT meets these batch sizes before the timing
                await asyncio.gather(*(one_stream(client, model, essay(1000 + i), 8)
                                       for i in range(c)))
                runs = []
                for _ in range(args.repeats):
                    runs.append(await concurrency(client, model, c, args.max_tokens, offset))
                    offset += c
                best = max(runs, key=lambda r: r["tok_s"])
                best["all_tok_s"] = [r["tok_s"] for r in runs]
                out[str(c)] = best
                print(f"[throughput] {c} streams: {best['tok_s']} tok/s, ITL p50 "
                      f"{best['itl_ms']['p50']} ms p95 {best['itl_ms']['p95']} ms",
                      file=sys.stderr, flush=True)
            except Exception as e:  # noqa: BLE001 - one concurrency failing keeps the others
                out[str(c)] = {"error": f"{type(e).__name__}: {e}"[:1000]}
    return out


async def ttft(base: str, model: str, args, vocab: int) -> dict:
    import random

    from openai import AsyncOpenAI

    rng = random.Random(0)
    out: dict = {"note": "completions stream, prompt = random token ids (a fresh prompt each run: "
                 "no prefix-cache hit), max_tokens 4; run 0 warms the shapes up",
                 "prefill_chunk": args.prefill_chunk}
    async with AsyncOpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0,
                           timeout=180) as client:
        for n in args.ttft_tokens:
            runs = []
            for _ in range(args.ttft_runs):
                ids = [rng.randrange(100, min(vocab, 40000)) for _ in range(n)]
                t0 = time.perf_counter()
                first = None
                usage = None
                stream = await client.completions.create(
                    model=model, prompt=ids, max_tokens=4, temperature=0, stream=True,
                    stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
                async for chunk in stream:
                    usage = chunk.usage or usage
                    if first is None and any(c.text or c.finish_reason for c in chunk.choices):
                        first = time.perf_counter()
                end = time.perf_counter()
                details = getattr(usage, "prompt_tokens_details", None) if usage else None
                runs.append({"ttft_ms": _ms(first - t0) if first else None,
                             "total_ms": _ms(end - t0),
                             "prompt_tokens": usage.prompt_tokens if usage else None,
                             "cached_tokens": getattr(details, "cached_tokens", None)})
            timed = [r["ttft_ms"] for r in runs[1:] if r["ttft_ms"] is not None]
            out[str(n)] = {"runs": runs, "ttft_ms_median_warm": statistics.median(timed)
                           if timed else None}
            print(f"[ttft] {n} tokens: {out[str(n)]['ttft_ms_median_warm']} ms (warm median)",
                  file=sys.stderr, flush=True)
    return out


# ------------------------------------------------------------------------------ main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", type=Path, required=True,
                    help="an export to serve; exported from --gguf first if it holds none")
    ap.add_argument("--gguf", type=Path, default=None)
    ap.add_argument("--target", default="cuda", help="export target when exporting --gguf")
    ap.add_argument("--precision", default="fp16", help="export precision when exporting --gguf")
    ap.add_argument("--provider", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--server-log", type=Path, default=None,
                    help="default: server.log beside --out")
    ap.add_argument("--model-name", default=None, help="--model-name for the server")
    ap.add_argument("--launch", default="auto", choices=("auto", "plain", "preload"))
    ap.add_argument("--ready-timeout", type=float, default=180)
    ap.add_argument("--quick", action="store_true",
                    help="CPU dry run sizes: streams 1,4, 16 tokens, TTFT on 200 tokens")
    ap.add_argument("--streams", default="1,8,32,64,128")
    ap.add_argument("--max-tokens", type=int, default=128, help="tokens per throughput stream")
    ap.add_argument("--repeats", type=int, default=3,
                    help="timed runs per concurrency (the median is reported, and the spread)")
    ap.add_argument("--clients", type=int, default=4,
                    help="client processes for the throughput stage (one Python client tops "
                    "out near 5k SSE chunks/s)")
    ap.add_argument("--skip-inprocess", action="store_true",
                    help="no in-process engine runs (then no http_over_inprocess)")
    ap.add_argument("--batched-streams", type=int, default=8)
    ap.add_argument("--batched-tokens", type=int, default=48)
    ap.add_argument("--answer-tokens", type=int, default=32, help="max_tokens of the checks")
    ap.add_argument("--ttft-tokens", default="1000,4000")
    ap.add_argument("--ttft-runs", type=int, default=4)
    ap.add_argument("--max-batch", type=int, default=None, help="default: the most --streams")
    ap.add_argument("--max-queue", type=int, default=1024)
    ap.add_argument("--max-length", type=int, default=None,
                    help="server context per slot (default: fits the longest TTFT prompt)")
    ap.add_argument("--prefill-chunk", type=int, default=512)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--server-args", default="", help="extra server flags, space separated")
    args = ap.parse_args()
    if args.quick:
        args.streams, args.max_tokens, args.repeats, args.clients = "1,4", 16, 2, 2
        args.batched_streams, args.batched_tokens, args.answer_tokens = 4, 16, 24
        args.ttft_tokens, args.ttft_runs = "200", 2
    args.streams = [int(x) for x in args.streams.split(",") if x]
    args.ttft_tokens = [int(x) for x in args.ttft_tokens.split(",") if x]
    args.max_batch = args.max_batch or max([*args.streams, args.batched_streams])
    need = max([*args.ttft_tokens, 1000]) + max(args.max_tokens, 64) + 64
    args.max_length = args.max_length or max(2048, -(-need // 512) * 512)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.server_log = args.server_log or args.out.parent / "server.log"

    rep = Report(args.out)
    rep.data["args"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    rep.stage("environment", environment)
    if rep.stage("model", prepare_model, args) is None:
        return 1
    from serve.model_dir import load_model_info

    info = load_model_info(args.model_dir, name=args.model_name)
    flags = ["--provider", args.provider, "--max-batch", str(args.max_batch), "--max-queue",
             str(args.max_queue), "--max-length", str(args.max_length), "--prefill-chunk",
             str(args.prefill_chunk), "--log-level", "info"]
    if args.model_name:
        flags += ["--model-name", args.model_name]
    if args.threads:
        flags += ["--threads", str(args.threads)]
    flags += args.server_args.split()
    if not args.skip_throughput and not args.skip_inprocess:
        rep.stage("inprocess", inprocess, args, flags)
    try:
        server = start_server(args, flags, rep)
    except RuntimeError:
        rep.data["checks"]["server_starts"] = {"hard": True, "pass": False,
                                               "error": "the server did not come up"}
        rep.save()
        return 1
    rep.data["checks"]["server_starts"] = {"hard": True, "pass": True,
                                           "details": {"launch": rep.data["server"]["launch"]}}
    try:
        from openai import OpenAI

        with OpenAI(base_url=f"{server.base}/v1", api_key="x", max_retries=0,
                    timeout=120) as client:
            model = info.name
            ck = Checks(client, model, info.name, args)
            for name in ("models_list", "chat_greedy", "chat_stream", "completions_logprobs",
                         "n2_seed", "stop_string", "invalid_400", "unknown_model_404"):
                rep.check(name, getattr(ck, name))

            def batched():
                return asyncio.run(_with_async(server.base, batched_vs_alone, model,
                                               args.batched_streams, args.batched_tokens))

            rep.check("batched_equals_alone", batched, hard=False)
        if not args.skip_throughput:
            rep.stage("throughput", throughput_clients, server.base, model, args)
            rep.data["http_over_inprocess"] = http_over_inprocess(rep.data.get("throughput"),
                                                                  rep.data.get("inprocess"))
            rep.save()
            print(json.dumps(rep.data["http_over_inprocess"], indent=1), file=sys.stderr,
                  flush=True)
            rep.stage("ttft", lambda: asyncio.run(ttft(server.base, model, args,
                                                       info.vocab_size)))
        code, body = http_get(f"{server.base}/metrics", 10)
        (args.out.parent / "server_metrics.txt").write_text(body)
        rep.data["server"]["alive_at_end"] = server.proc.poll() is None
    finally:
        rep.data["server"]["exit_code"] = server.stop()
        rep.save()
    print(json.dumps(rep.data["summary"], indent=1))
    return 0 if not rep.data["summary"]["hard_failed"] else 1


async def _with_async(base: str, fn, *args):
    from openai import AsyncOpenAI

    async with AsyncOpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0,
                           timeout=180) as client:
        return await fn(client, *args)


if __name__ == "__main__":
    sys.exit(main())
