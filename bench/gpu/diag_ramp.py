"""Where the GPU's time goes (issue 18): the kernels of a step, and the engine's ramp.

Two measurements on an H200 (or any CUDA card), each printed and written to ``--out``:

``kernels``: PyTorch's profiler (CUPTI: it sees every kernel in the process, ORT's too, also
inside a CUDA-graph replay) around runtime calls of a `CudaRuntime` with CUDA graphs:
- ``decode1``: captured batch-1 decode steps (`decode_sampled`, greedy on the device);
- ``decode64``: captured 64-row steps;
- ``prefill_batch8x48``: one `prefill_batch` of 8 prompts of 48 tokens;
- ``prefill1000``: one 1000-token prefill.
Per scenario and per call: kernels launched, the sum of their durations, the span from the
first kernel's start to the last one's end (µs), copies (count, bytes, µs), and the kernels
grouped by name (count and µs per call), largest first.

``ramp``: `serve.main.load_engine` with the e2e bench's server flags (``--prefill-chunk``
512 and 2048), N chat prompts of 128 greedy tokens submitted at once (as `serve_e2e.py`'s
in-process stage), every runtime call timed: TTFT p50/p95, and until the last first token the
count and time of prefill calls, decode steps and the engine's time outside the runtime.

    python bench/gpu/diag_ramp.py --model-dir /root/work/cuda-fp16 --out diag.json
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def _trace(fn, calls: int) -> list[dict]:
    """Chrome-trace GPU events (kernels, copies, sets) of ``calls`` calls of ``fn``, in order."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.load(open(f.name))["traceEvents"]
    gpu = [e for e in events if e.get("ph") == "X" and e.get("cat") in
           ("kernel", "gpu_memcpy", "gpu_memset")]
    return sorted(gpu, key=lambda e: e["ts"])


def _summary(gpu: list[dict], calls: int) -> dict:
    kernels = [e for e in gpu if e["cat"] == "kernel"]
    copies = [e for e in gpu if e["cat"] != "kernel"]
    by_name: dict[str, list[float]] = collections.defaultdict(list)
    for e in kernels:
        by_name[e["name"][:140]].append(e["dur"])
    span = (gpu[-1]["ts"] + gpu[-1]["dur"] - gpu[0]["ts"]) if gpu else 0.0
    top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))
    return {
        "calls": calls,
        "kernels_per_call": round(len(kernels) / calls, 1),
        "kernel_us_per_call": round(sum(e["dur"] for e in kernels) / calls, 1),
        "span_us_per_call": round(span / calls, 1),
        "copies_per_call": round(len(copies) / calls, 1),
        "copy_us_per_call": round(sum(e["dur"] for e in copies) / calls, 1),
        "copy_bytes_per_call": round(sum((e.get("args") or {}).get("bytes", 0)
                                         for e in copies) / calls),
        "by_kernel": [{"name": n, "per_call": round(len(d) / calls, 2),
                       "us_per_call": round(sum(d) / calls, 2),
                       "median_us": round(statistics.median(d), 2)} for n, d in top[:40]],
    }


def kernels(model_dir: str) -> dict:
    import numpy as np

    from serve.runtime import RowDraw, RuntimeOptions, open_runtime

    rt = open_runtime(model_dir, RuntimeOptions(provider="cuda", max_batch=64, max_length=4608,
                                                cuda_graph=True))
    out: dict = {}
    rt.prefill(0, list(range(100, 140)))
    state = {"tok": 5}

    def decode1():
        state["tok"] = rt.decode_sampled([0], [state["tok"]], [RowDraw(greedy=True)])[0].token
        if rt.length(0) > 4000:
            rt.truncate(0, 40)

    out["decode1"] = _summary(_trace(decode1, 50), 50)
    for s in range(1, 64):
        rt.prefill(s, list(range(200 + s, 240 + s)))
    slots = list(range(64))

    def decode64():
        rt.decode_sampled(slots, [7] * 64, [RowDraw(greedy=True)] * 64)
        if rt.length(0) > 4000:
            for s in slots:
                rt.truncate(s, 40)

    out["decode64"] = _summary(_trace(decode64, 20), 20)
    for s in slots:
        rt.truncate(s, 0)
    rng = np.random.default_rng(0)
    seqs = [list(rng.integers(100, 30000, 48)) for _ in range(8)]

    def batch8():
        for s in range(8):
            rt.truncate(s, 0)
        rt.prefill_batch(list(range(8)), seqs)

    out["prefill_batch8x48"] = _summary(_trace(batch8, 5), 5)
    long = list(rng.integers(100, 30000, 1000))

    def one1000():
        rt.truncate(0, 0)
        rt.prefill(0, long)

    out["prefill1000"] = _summary(_trace(one1000, 3), 3)
    return out


TOPICS = ["the ocean", "mountains", "the history of Rome", "bees", "volcanoes", "jazz",
          "the moon", "trains"]


def ramp(model_dir: str, chunk: int, streams: int, tokens: int, provider: str = "cuda") -> dict:
    import argparse as _argparse

    from serve.events import GenerationRequest
    from serve.main import load_engine
    from serve.options import add_arguments, options_from_args
    from serve.sampling import SamplingParams

    parser = _argparse.ArgumentParser()
    add_arguments(parser)
    flags = ["--provider", provider, "--max-batch", "128", "--max-queue", "1024", "--max-length",
             "4608", "--prefill-chunk", str(chunk), "--log-level", "warning"]
    if provider == "cuda":
        flags.append("--cuda-graph")
    engine = load_engine(options_from_args([model_dir], parser.parse_args(flags)))
    rt = engine.runtime
    log: list[tuple[str, int, int, float, float]] = []

    def wrap(name: str):
        real = getattr(rt, name)

        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return real(*a, **k)
            finally:
                rows = len(a[0]) if isinstance(a[0], (list, tuple)) else 1
                toks = (sum(len(s) for s in a[1]) if name == "prefill_batch" else
                        len(a[1]) if name == "prefill" else rows)
                log.append((name, rows, toks, t0, time.perf_counter()))
        setattr(rt, name, timed)

    for name in ("prefill", "prefill_batch", "decode", "decode_sampled", "copy_slot"):
        if hasattr(rt, name):
            wrap(name)
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)

    def prompt(i: int) -> tuple[int, ...]:
        msgs = [{"role": "user", "content": f"Write a long essay about {TOPICS[i % 8]} (#{i})."}]
        return tuple(engine.tokenizer.encode_chat(msgs)[1])

    async def one(i: int, ids) -> dict:
        t0 = time.perf_counter()
        first = None
        async for event in engine.submit(GenerationRequest(ids, params)):
            if first is None and any(c.token_ids for c in event.choices):
                first = time.perf_counter()
        return {"t0": t0, "first": first, "end": time.perf_counter()}

    async def run(offset: int) -> dict:
        prompts = [prompt(offset + i) for i in range(streams)]
        log.clear()
        t0 = time.perf_counter()
        res = await asyncio.gather(*(one(offset + i, p) for i, p in enumerate(prompts)))
        t_end = time.perf_counter()
        last_first = max(r["first"] for r in res)
        ttft = sorted(1e3 * (r["first"] - r["t0"]) for r in res)
        ramp_calls = [c for c in log if c[3] < last_first]
        agg: dict[str, dict] = {}
        for name, rows, toks, a, b in ramp_calls:
            d = agg.setdefault(name, {"calls": 0, "ms": 0.0, "rows": [], "tokens": 0})
            d["calls"] += 1
            d["ms"] += 1e3 * (b - a)
            d["rows"].append(rows)
            d["tokens"] += toks
        for d in agg.values():
            d["ms"] = round(d["ms"], 1)
            d["rows"] = dict(collections.Counter(d["rows"]))
        in_rt = sum(1e3 * (b - a) for *_, a, b in ramp_calls)
        timeline = [(n, r, t, round(1e3 * (a - t0), 2), round(1e3 * (b - a), 2))
                    for n, r, t, a, b in log[:80]]
        decode_after = [1e3 * (b - a) for n, r, t, a, b in log
                        if n.startswith("decode") and a > last_first]
        return {"prompt_tokens": [len(p) for p in prompts[:4]],
                "wall_ms": round(1e3 * (t_end - t0), 1),
                "tok_s": round(streams * tokens / (t_end - t0), 1),
                "ttft_ms": {"p50": round(ttft[len(ttft) // 2], 1), "p95": round(ttft[int(0.95 * len(ttft))], 1),
                            "max": round(ttft[-1], 1), "min": round(ttft[0], 1)},
                "ramp_ms": round(1e3 * (last_first - t0), 1),
                "ramp_in_runtime_ms": round(in_rt, 1),
                "ramp_calls": agg,
                "decode_step_ms_after_ramp": round(statistics.median(decode_after), 2) if decode_after else None,
                "first_calls": timeline}

    try:
        asyncio.run(run(1000))  # warm
        runs = [asyncio.run(run(i * streams)) for i in range(2)]
    finally:
        engine.stop()
    return {"chunk": chunk, "streams": streams, "runs": runs}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--skip-kernels", action="store_true")
    ap.add_argument("--streams", type=int, nargs="+", default=[64])
    ap.add_argument("--chunks", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--provider", default="cuda", help="cpu: a dry run of the ramp stage")
    a = ap.parse_args()
    res: dict = {}

    def save():
        if a.out:
            a.out.write_text(json.dumps(res, indent=1))

    for chunk in a.chunks:
        for n in a.streams:
            key = f"ramp_{n}_chunk{chunk}"
            try:
                res[key] = ramp(a.model_dir, chunk, n, a.tokens, a.provider)
            except Exception as exc:  # keep what the other stages found
                res[key] = {"error": repr(exc)}
            print(key, json.dumps({k: v for k, v in res[key].items() if k != "runs"}),
                  json.dumps([{k: v for k, v in r.items() if k != "first_calls"}
                              for r in res[key].get("runs", [])]), flush=True)
            save()
    if not a.skip_kernels:
        try:
            res["kernels"] = kernels(a.model_dir)
        except Exception as exc:
            res["kernels"] = {"error": repr(exc)}
        print(json.dumps(res["kernels"], indent=1)[:6000], flush=True)
        save()


if __name__ == "__main__":
    main()
