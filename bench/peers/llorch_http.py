"""llorch over HTTP: a real `llorch serve` subprocess, streamed through the `openai` client.

Three modes (job["args"]["mode"]):
  single       batch-1 TTFT / decode, like every in-process peer (`--max-batch 1`)
  concurrency  N simultaneous streams, one server per N with `--max-batch N`: aggregate
               tokens/s, inter-token latency p50/p95, TTFT p50/p95
  rss          the server's peak RSS with `--max-batch 8 --max-length 4096` and every slot busy

Prompts go as token ids (`/v1/completions` accepts them), so the server tokenizes nothing.
Times are chunk arrivals; a chunk normally carries one token (a token whose text the
detokenizer holds back arrives with the next one), so token counts come from `usage`.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

from bench.peers.base import Skip, StreamRun, config_of, prompts_of, require, single_stream
from bench.proc import current_rss_mb, free_port, peak_rss_mb, thread_env
from bench.stats import decode_rate, gaps, percentile, summarize, ttft

EXTRA = {"ignore_eos": True}
STREAM_OPTIONS = {"include_usage": True}


class Server:
    """A `llorch serve` child process; `pid`, `url`, `model` once ready."""

    def __init__(self, model_dir: Path, *, max_batch: int, max_length: int, threads: int,
                 log: Path, extra_args: Sequence[str] = ()) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "llorch", "serve", str(model_dir), "--port", str(self.port),
               "--max-batch", str(max_batch), "--max-length", str(max_length),
               "--threads", str(threads), "--log-level", "warning", *extra_args]
        self._log = open(log, "ab")  # noqa: SIM115 (closed in stop)
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=thread_env(threads), start_new_session=True)
        self.pid = self.proc.pid
        self._wait_ready(timeout=600)
        self.load_s = time.perf_counter() - t0
        self.model = self._model_id()

    def _wait_ready(self, timeout: float) -> None:
        import httpx

        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llorch serve exited with {self.proc.returncode} "
                                   f"(see {self._log.name})")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"llorch serve not ready after {timeout:.0f} s")

    def _model_id(self) -> str:
        import httpx

        return httpx.get(self.url + "/v1/models", timeout=10).json()["data"][0]["id"]

    def memory(self) -> dict:
        return {"peak_rss_mb": peak_rss_mb(self.pid), "rss_mb": current_rss_mb(self.pid)}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@contextmanager
def serving(model_dir: Path, **kwargs):
    server = Server(model_dir, **kwargs)
    try:
        yield server
    finally:
        server.stop()


# ------------------------------------------------------------------------- single stream


class HTTPPeer:
    def __init__(self, server: Server) -> None:
        openai = require("openai", "pip install openai")
        self.server = server
        self.client = openai.OpenAI(base_url=server.url + "/v1", api_key="bench", max_retries=0)

    def generate(self, ids: list[int], new_tokens: int) -> StreamRun:
        t0 = time.perf_counter()
        stream = self.client.completions.create(
            model=self.server.model, prompt=ids, max_tokens=new_tokens, temperature=0.0,
            stream=True, stream_options=STREAM_OPTIONS, extra_body=EXTRA)
        times, tokens = [], 0
        for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                times.append(time.perf_counter() - t0)
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        return StreamRun(times, tokens)


def _single(job: dict, log_dir: Path) -> dict:
    cfg = config_of(job)
    with serving(Path(job["args"]["model_dir"]), max_batch=1, max_length=cfg.max_context,
                 threads=cfg.threads, log=log_dir / f"{job['key']}-server.log",
                 extra_args=job["args"].get("serve_args", ())) as server:
        result = single_stream(HTTPPeer(server), cfg, prompts_of(job))
        mem = server.memory()
    return {**result, "load_s": server.load_s, "peak_rss_mb": mem["peak_rss_mb"]}


# --------------------------------------------------------------------------- concurrency


async def _stream(client, model: str, ids: list[int], new_tokens: int) -> StreamRun:
    t0 = time.perf_counter()
    stream = await client.completions.create(
        model=model, prompt=ids, max_tokens=new_tokens, temperature=0.0, stream=True,
        stream_options=STREAM_OPTIONS, extra_body=EXTRA)
    times, tokens = [], 0
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            times.append(time.perf_counter() - t0)
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return StreamRun(times, tokens)


async def _round(server: Server, prompts: list[list[int]], new_tokens: int) -> dict:
    """All streams at once; returns wall time and each stream's run."""
    openai = require("openai", "pip install openai")
    import httpx

    limits = httpx.Limits(max_connections=len(prompts) + 4, max_keepalive_connections=len(prompts) + 4)
    async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="bench", max_retries=0,
                                  http_client=openai.DefaultAsyncHttpxClient(limits=limits,
                                                                             timeout=600)) as client:
        t0 = time.perf_counter()
        runs = await asyncio.gather(*(_stream(client, server.model, p, new_tokens) for p in prompts))
        wall = time.perf_counter() - t0
    return {"wall": wall, "runs": runs}


def concurrency_figures(rounds: list[dict]) -> dict:
    """Aggregate tokens/s (median over rounds), ITL and TTFT percentiles pooled over streams."""
    agg = [sum(r.tokens for r in rd["runs"]) / rd["wall"] for rd in rounds]
    itl = [g for rd in rounds for r in rd["runs"] for g in gaps(r.times)]
    ttfts = [ttft(r.times) for rd in rounds for r in rd["runs"]]
    per_stream = [decode_rate(r.times, r.tokens) for rd in rounds for r in rd["runs"]
                  if len(r.times) > 1]
    return {
        "aggregate_tps": summarize(agg),
        "itl_p50_ms": 1000 * percentile(itl, 50),
        "itl_p95_ms": 1000 * percentile(itl, 95),
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p95_s": percentile(ttfts, 95),
        "stream_decode_tps_median": percentile(per_stream, 50),
        "tokens_per_stream": rounds[0]["runs"][0].tokens,
    }


def _concurrency(job: dict, log_dir: Path) -> dict:
    cfg = config_of(job)
    rounds_prompts = job["stream_prompts"]  # [round][stream], warm-up rounds first
    out: dict = {"concurrency": {}, "server_peak_rss_mb": {}}
    for n in cfg.concurrency:
        with serving(Path(job["args"]["model_dir"]), max_batch=n,
                     max_length=cfg.stream_prompt + cfg.stream_tokens + 16, threads=cfg.threads,
                     log=log_dir / f"{job['key']}-{n}-server.log",
                     extra_args=job["args"].get("serve_args", ())) as server:
            for prompts in rounds_prompts[: cfg.warmup]:
                asyncio.run(_round(server, prompts[:n], cfg.stream_tokens))
            rounds = [asyncio.run(_round(server, prompts[:n], cfg.stream_tokens))
                      for prompts in rounds_prompts[cfg.warmup : cfg.warmup + cfg.stream_rounds]]
            out["server_peak_rss_mb"][str(n)] = server.memory()["peak_rss_mb"]
        figures = concurrency_figures(rounds)
        out["concurrency"][str(n)] = figures
        print(f"  {n:>3} streams: {figures['aggregate_tps']['median']:.1f} tok/s, "
              f"itl p50 {figures['itl_p50_ms']:.1f} ms p95 {figures['itl_p95_ms']:.1f} ms",
              flush=True)
    return out


# --------------------------------------------------------------------------------- memory


def kv_bytes(model_dir: Path, slots: int, length: int) -> int:
    """Bytes of the preallocated KV buffers (`Runtime.kv_bytes`, from genai_config; the element
    size from llorch.json's graph.kv_dtype, fp32 where it does not say)."""
    d = json.loads((model_dir / "genai_config.json").read_text())["model"]["decoder"]
    manifest = model_dir / "llorch.json"
    graph = json.loads(manifest.read_text()).get("graph") or {} if manifest.is_file() else {}
    size = {"float16": 2, "int8": 1}.get(graph.get("kv_dtype"), 4)
    return (2 * d["num_hidden_layers"] * slots * d["num_key_value_heads"] * length
            * d["head_size"] * size)


def _rss(job: dict, log_dir: Path) -> dict:
    cfg = config_of(job)
    model_dir = Path(job["args"]["model_dir"])
    prompts = job["rss_prompts"]
    with serving(model_dir, max_batch=cfg.rss_slots, max_length=cfg.rss_length,
                 threads=cfg.threads, log=log_dir / f"{job['key']}-server.log") as server:
        idle = server.memory()
        rd = asyncio.run(_round(server, prompts, cfg.rss_tokens))
        busy = server.memory()
    # KV memory follows the tokens held (serve.runtime.kv_memory): what the run added to the
    # idle server, per slot and per 1000 tokens the slots hold at its end
    held = cfg.rss_slots * (cfg.rss_prompt + cfg.rss_tokens)
    grown = busy["rss_mb"] - idle["rss_mb"]
    return {
        "server_rss": {
            "tokens_held": held, "rss_per_slot_mb": grown / cfg.rss_slots,
            "rss_per_1k_tokens_mb": grown / (held / 1000),
            "slots": cfg.rss_slots, "max_length": cfg.rss_length, "prompt": cfg.rss_prompt,
            "new_tokens": cfg.rss_tokens, "idle_rss_mb": idle["rss_mb"],
            "peak_rss_mb": busy["peak_rss_mb"], "rss_after_mb": busy["rss_mb"],
            "kv_reserved_mb": kv_bytes(model_dir, cfg.rss_slots, cfg.rss_length) / 2**20,
            "kv_touched_mb": kv_bytes(model_dir, cfg.rss_slots,
                                      cfg.rss_prompt + cfg.rss_tokens) / 2**20,
            "model_data_mb": sum(f.stat().st_size for f in model_dir.glob("model.onnx*")) / 2**20,
            "load_s": server.load_s, "wall_s": rd["wall"],
        },
        "peak_rss_mb": busy["peak_rss_mb"],
    }


def run(job: dict) -> dict:
    mode = job["args"]["mode"]
    log_dir = Path(job["log_dir"])
    if not (Path(job["args"]["model_dir"]) / "model.onnx").is_file():
        raise Skip(f"no model at {job['args']['model_dir']} (run `llorch models fetch`)")
    from importlib import metadata

    version = {"version": metadata.version("llorch")}
    if mode == "single":
        return {**_single(job, log_dir), **version}
    if mode == "concurrency":
        return {**_concurrency(job, log_dir), **version}
    if mode == "rss":
        return {**_rss(job, log_dir), **version}
    raise ValueError(f"unknown mode {mode!r}")
