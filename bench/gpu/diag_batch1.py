"""Where a batch-1 decode step's time goes on the GPU (issue 18: goal 1,000 tok/s in process).

One `CudaRuntime` with CUDA graphs and the default device sampling (greedy on the GPU), one
sequence of 20 prompt tokens, then per part of a step the median over 200 steps (µs):

  step            `decode_sampled` as the engine calls it (everything below)
  upload_ids      `OrtValue.update_inplace` of the [1, 1] ids (host → device, synchronous)
  upload_mask     the same for the [1, max_length] int64 mask
  replay          `run_with_iobinding` of the captured graph (ORT's Run + the graph launch + sync)
  choose          the token-choice session on the device logits (`DeviceSampler.sample`)
  host_logits     for comparison: the logits' copy into the host buffer (`_logits`)

and the engine's figure: one greedy stream of 256 tokens through `Engine.submit`, tok/s.

    python bench/gpu/diag_batch1.py --model-dir /root/work/cuda-fp16 --out batch1.json
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


def _median_us(xs: list[float]) -> float:
    return round(1e6 * statistics.median(xs), 1)


def parts(model_dir: str, steps: int) -> dict:
    import numpy as np

    from serve.runtime import RowDraw, RuntimeOptions, open_runtime

    rt = open_runtime(model_dir, RuntimeOptions(provider="cuda", max_batch=8, max_length=2048,
                                                cuda_graph=True))
    rt.prefill(0, list(range(100, 120)))
    timings: dict[str, list[float]] = {k: [] for k in
                                       ("step", "upload_ids", "upload_mask", "replay", "choose")}
    real_run, sampler = rt._run, rt._sampler

    def timed_run(call, ids, mask):
        dev_ids, dev_mask, _ = call.device
        t0 = time.perf_counter()
        dev_ids.update_inplace(ids)
        t1 = time.perf_counter()
        dev_mask.update_inplace(mask)
        t2 = time.perf_counter()
        call.session.run_with_iobinding(call.io, call.run_options)
        t3 = time.perf_counter()
        timings["upload_ids"].append(t1 - t0)
        timings["upload_mask"].append(t2 - t1)
        timings["replay"].append(t3 - t2)

    rt._run = timed_run
    if sampler is not None:
        real_sample = sampler.sample

        def timed_sample(logits, draws):
            t0 = time.perf_counter()
            out = real_sample(logits, draws)
            timings["choose"].append(time.perf_counter() - t0)
            return out

        sampler.sample = timed_sample
    token = 5
    for i in range(steps + 20):
        t0 = time.perf_counter()
        if rt.device_sampling:
            token = rt.decode_sampled([0], [token], [RowDraw(greedy=True)])[0].token
        else:
            token = int(np.argmax(rt.decode([0], [token])[0]))
        if i >= 20:
            timings["step"].append(time.perf_counter() - t0)
        if rt.length(0) > 1500:
            rt.truncate(0, 20)
    out = {k: _median_us(v[-steps:]) for k, v in timings.items() if v}
    rt._run = real_run
    host = []
    for _ in range(steps):
        call = rt._decode_step([0], [token])
        t0 = time.perf_counter()
        rt._logits(call)
        host.append(time.perf_counter() - t0)
        if rt.length(0) > 1500:
            rt.truncate(0, 20)
    out["host_logits"] = _median_us(host)
    out["device_sampling"] = bool(rt.device_sampling)
    return out


def engine_single(model_dir: str, tokens: int) -> dict:
    from serve.engine import Engine
    from serve.events import GenerationRequest
    from serve.runtime import RuntimeOptions, open_runtime
    from serve.sampling import SamplingParams
    from serve.tokenizer import Tokenizer

    rt = open_runtime(model_dir, RuntimeOptions(provider="cuda", max_batch=8, max_length=2048,
                                                cuda_graph=True))
    engine = Engine(rt, Tokenizer.from_dir(model_dir))
    engine.start()

    async def one() -> float:
        stamps = []
        params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
        async for event in engine.submit(GenerationRequest(tuple(range(100, 140)), params)):
            for c in event.choices:
                stamps += [time.perf_counter()] * len(c.token_ids)
        return (len(stamps) - 1) / (stamps[-1] - stamps[0])

    try:
        runs = [asyncio.run(one()) for _ in range(4)]
    finally:
        engine.stop()
    return {"decode_tok_s": [round(r, 1) for r in runs], "median": round(statistics.median(runs[1:]), 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--steps", type=int, default=200)
    a = ap.parse_args()
    res = {"parts_us": parts(a.model_dir, a.steps), "engine_one_stream": engine_single(a.model_dir, 256)}
    print(json.dumps(res, indent=1))
    if a.out:
        a.out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
