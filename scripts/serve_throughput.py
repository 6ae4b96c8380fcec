"""Aggregate decode throughput of `llorch serve` at several concurrency levels, the prefix
cache's effect on time to first token, and batch invariance of greedy text (not a test).

    python scripts/serve_throughput.py [MODEL_DIR] [--max-batch 16] [--max-tokens 128]

Starts the server in a subprocess, then for each concurrency c runs c simultaneous greedy
streams (distinct prompts, `ignore_eos`, `max_tokens` each) with AsyncOpenAI and reports
tokens / wall time, plus the decode-only rate (tokens after each stream's first, over the
time from the last first token to the last token).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
from openai import AsyncOpenAI

REPO = Path(__file__).resolve().parents[1]
TOPICS = ["the ocean", "volcanoes", "bread", "the moon", "trains", "bees", "glass", "chess",
          "rain", "maps", "owls", "copper", "jazz", "deserts", "kites", "clocks"]
SYSTEM = ("You are a meticulous assistant for a maritime research institute. Answer with care, "
          "cite the instrument a number comes from, and say so when you do not know. ") * 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def one_stream(client: AsyncOpenAI, model: str, messages, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    stamps: list[float] = []
    text = []
    stream = await client.chat.completions.create(
        model=model, messages=messages, temperature=0, max_tokens=max_tokens, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    usage = None
    async for chunk in stream:
        usage = chunk.usage or usage
        for c in chunk.choices:
            if c.delta.content:
                stamps.append(time.perf_counter())
                text.append(c.delta.content)
    return {"t0": t0, "first": stamps[0], "last": stamps[-1], "tokens": usage.completion_tokens,
            "cached": usage.prompt_tokens_details.cached_tokens, "text": "".join(text)}


def messages_for(i: int):
    return [{"role": "user", "content": f"Write a long essay about {TOPICS[i % len(TOPICS)]} (#{i})."}]


async def concurrency(client, model, c: int, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    runs = await asyncio.gather(*(one_stream(client, model, messages_for(i), max_tokens) for i in range(c)))
    end = max(r["last"] for r in runs)
    tokens = sum(r["tokens"] for r in runs)
    last_first = max(r["first"] for r in runs)
    after_first = sum(r["tokens"] - 1 for r in runs)
    return {"streams": c, "tokens": tokens, "wall_s": round(end - t0, 2),
            "tok_s": round(tokens / (end - t0), 1),
            "decode_tok_s": round(after_first / (end - last_first), 1) if end > last_first else None,
            "ttft_mean_s": round(statistics.mean(r["first"] - r["t0"] for r in runs), 3)}


async def main_async(args, base: str, model: str) -> None:
    async with AsyncOpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=600) as client:
        await one_stream(client, model, messages_for(99), 8)  # warm up
        for c in args.concurrency:  # the median of `repeats` runs, by aggregate tokens/s
            runs = [await concurrency(client, model, c, args.max_tokens) for _ in range(args.repeats)]
            print(json.dumps(sorted(runs, key=lambda r: r["tok_s"])[len(runs) // 2]), flush=True)
        # prefix cache: the same long system prompt, another question
        sys_msgs = [{"role": "system", "content": SYSTEM}]
        cold = await one_stream(client, model, sys_msgs + [{"role": "user", "content": "Q1?"}], 16)
        warm = await one_stream(client, model, sys_msgs + [{"role": "user", "content": "Q2?"}], 16)
        print(json.dumps({"prefix_cache": {"cold_ttft_s": round(cold["first"] - cold["t0"], 3),
                                           "warm_ttft_s": round(warm["first"] - warm["t0"], 3),
                                           "warm_cached_tokens": warm["cached"]}}), flush=True)
        # batch invariance: 8 prompts alone, then together
        alone = [await one_stream(client, model, messages_for(i), 48) for i in range(8)]
        together = await asyncio.gather(*(one_stream(client, model, messages_for(i), 48) for i in range(8)))
        same = [a["text"] == t["text"] for a, t in zip(alone, together, strict=True)]
        print(json.dumps({"batched_equals_alone": same}), flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model_dir", nargs="?", type=Path, default=REPO / "models/smollm2-135m-instruct-int4")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--server-args", default="", help="extra flags for the server")
    args = p.parse_args()
    port = free_port()
    cmd = [sys.executable, "-m", "serve.main", str(args.model_dir), "--port", str(port), "--max-batch",
           str(args.max_batch), "--max-length", str(args.max_length), "--log-level", "warning",
           *args.server_args.split()]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    base = f"http://127.0.0.1:{port}"
    try:
        while True:
            assert proc.poll() is None, "server exited"
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        model = httpx.get(f"{base}/v1/models").json()["data"][0]["id"]
        asyncio.run(main_async(args, base, model))
    finally:
        proc.terminate()
        proc.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
