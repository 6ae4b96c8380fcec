"""Where a prefill's time goes on the GPU: `CudaRuntime.prefill` per prompt length (the ORT run
and the logits download timed apart), `copy_slot`, row moves, decode steps, and the engine's
time to first token for one and for 64 concurrent chat prompts, with the engine's own stages
timed (admission, prefill, decode).

    python bench/gpu/diag_prefill.py --model-dir /root/work/cuda-fp16 --out diag.json

Runs on the CPU provider too (``--provider cpu``: host memory stands in for the GPU's), which is
how it is checked without a GPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402


def _ms(xs: list[float]) -> dict:
    if not xs:
        return {}
    return {"median_ms": round(1000 * statistics.median(xs), 3),
            "min_ms": round(1000 * min(xs), 3), "n": len(xs)}


def runtime_stage(model_dir: str, provider: str, cuda_graph: bool, reps: int) -> dict:
    from serve.runtime import RuntimeOptions, open_runtime

    rt = open_runtime(model_dir, RuntimeOptions(provider=provider, max_batch=128, max_length=2048,
                                                cuda_graph=cuda_graph))
    rng = np.random.default_rng(0)
    out: dict = {"runtime": type(rt).__name__}

    # split one prefill into the ORT run and the logits download
    run_t: list[float] = []
    get_t: list[float] = []
    orig_run, orig_logits = rt._run, rt._logits

    def timed_run(call, ids, mask):
        t = time.perf_counter()
        orig_run(call, ids, mask)
        run_t.append(time.perf_counter() - t)

    def timed_logits(call):
        t = time.perf_counter()
        x = orig_logits(call)
        get_t.append(time.perf_counter() - t)
        return x

    rt._run, rt._logits = timed_run, timed_logits
    for n in (8, 35, 128, 512):
        ids = rng.integers(100, 40000, n).tolist()
        whole = []
        run_t.clear()
        get_t.clear()
        for r in range(reps + 1):
            rt.reset(1)
            t = time.perf_counter()
            rt.prefill(1, ids)
            if r:
                whole.append(time.perf_counter() - t)
        out[f"prefill_{n}"] = {"whole": _ms(whole), "ort_run": _ms(run_t[1:]),
                               "logits_download": _ms(get_t[1:])}
    # a short suffix after a prefix already in the slot (a prefix-cache hit)
    prefix = rng.integers(100, 40000, 30).tolist()
    rt.reset(2)
    rt.prefill(2, prefix)
    whole = []
    for r in range(reps + 1):
        rt.copy_slot(2, 3, 30)
        t = time.perf_counter()
        rt.prefill(3, rng.integers(100, 40000, 6).tolist())
        if r:
            whole.append(time.perf_counter() - t)
    out["prefill_6_after_30_cached"] = _ms(whole)
    copy_t = []
    for _ in range(reps):
        t = time.perf_counter()
        rt.copy_slot(2, 4, 30)
        copy_t.append(time.perf_counter() - t)
    out["copy_slot_30"] = _ms(copy_t)
    rt._run, rt._logits = orig_run, orig_logits
    # decode steps
    for b in (1, 8, 64):
        slots = list(range(b))
        for s in slots:
            rt.reset(s)
            rt.prefill(s, rng.integers(100, 40000, 20).tolist())
        ts = []
        for r in range(reps + 3):
            t = time.perf_counter()
            rt.decode(slots, [5] * b)
            if r >= 3:
                ts.append(time.perf_counter() - t)
        out[f"decode_{b}"] = _ms(ts)
    # the rows moving between a prefill (slot s in its own row) and a decode of others
    ts = []
    for _ in range(reps):
        rt.reset(70)
        rt.prefill(70, rng.integers(100, 40000, 20).tolist())
        t = time.perf_counter()
        rt.decode([70, *range(7)], [5] * 8)
        ts.append(time.perf_counter() - t)
    out["decode_8_with_row_move"] = _ms(ts)
    return out


def engine_stage(model_dir: str, provider: str, cuda_graph: bool) -> dict:
    from serve.events import GenerationRequest
    from serve.main import load_engine
    from serve.options import add_arguments, options_from_args
    from serve.sampling import SamplingParams

    p = argparse.ArgumentParser()
    add_arguments(p)
    flags = ["--provider", provider, "--max-batch", "128", "--max-length", "4096"]
    if cuda_graph:
        flags.append("--cuda-graph")
    engine = load_engine(options_from_args([model_dir], p.parse_args(flags)))
    stages: dict[str, list[float]] = {}

    def wrap(obj, name):
        fn = getattr(obj, name)

        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                stages.setdefault(name, []).append(time.perf_counter() - t)
        setattr(obj, name, timed)

    for name in ("_admit", "_prefill", "_decode", "_flush", "_drop_cancelled"):
        wrap(engine, name)
    for name in ("prefill", "copy_slot", "decode"):
        wrap(engine.runtime, name)
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)

    def prompt(i: int):
        msgs = [{"role": "user", "content": f"Write a long essay about topic number {i}."}]
        return tuple(engine.tokenizer.encode_chat(msgs)[1])

    async def one(i: int) -> dict:
        ids = prompt(i)
        t0 = time.perf_counter()
        first = None
        async for event in engine.submit(GenerationRequest(ids, params)):
            if first is None and any(c.token_ids for c in event.choices):
                first = time.perf_counter() - t0
        return {"ttft": first, "total": time.perf_counter() - t0, "prompt": len(ids)}

    async def run(c: int, off: int) -> list[dict]:
        return await asyncio.gather(*(one(off + i) for i in range(c)))

    async def long_prompt(n: int, seed: int) -> float:
        ids = tuple(int(t) for t in np.random.default_rng(seed).integers(100, 40000, n))
        t0 = time.perf_counter()
        async for event in engine.submit(GenerationRequest(ids, SamplingParams(
                max_tokens=1, temperature=0.0, ignore_eos=True))):
            if any(c.token_ids for c in event.choices):
                return time.perf_counter() - t0
        return float("nan")

    out: dict = {}
    try:
        out["ttft_1000_ms"] = [round(1000 * asyncio.run(long_prompt(1000, k)), 2) for k in range(5)]
        out["ttft_4000_ms"] = [round(1000 * asyncio.run(long_prompt(4000, 10 + k)), 2)
                               for k in range(3)] if engine.runtime.info.max_length >= 4001 else []
        off = 0
        for c in (1, 1, 1, 64, 64):
            stages.clear()
            rows = asyncio.run(run(c, off))
            off += c
            ttft = sorted(r["ttft"] for r in rows)
            out.setdefault(str(c), []).append({
                "ttft_p50_ms": round(1000 * ttft[len(ttft) // 2], 2),
                "ttft_max_ms": round(1000 * ttft[-1], 2),
                "prompt_tokens": rows[0]["prompt"],
                "wall_ms": round(1000 * max(r["total"] for r in rows), 2),
                "stages": {k: {"calls": len(v), "sum_ms": round(1000 * sum(v), 2),
                               "median_ms": round(1000 * statistics.median(v), 3)}
                           for k, v in stages.items()}})
    finally:
        engine.stop()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--provider", default="cuda")
    ap.add_argument("--no-cuda-graph", action="store_true")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    cg = a.provider == "cuda" and not a.no_cuda_graph
    res = {"runtime": runtime_stage(a.model_dir, a.provider, cg, a.reps)}
    Path(a.out).write_text(json.dumps(res, indent=1))
    res["engine"] = engine_stage(a.model_dir, a.provider, cg)
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
