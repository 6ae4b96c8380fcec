"""Why is a captured 64-row decode step 3x slower in some CUDA runtimes of a process than in
others (issue 18: 12.9-14.9 ms against 3.8-4.4 ms, same card, same shapes; `diag_shapes.py
--only max-batch` found the first runtime opened slow whatever its slot count)?

Each variant runs in a fresh child process (`--variant NAME`), opens two runtimes A and B
(64 slots, 2048 tokens, `cuda_graph`), warms them up as the server does (`warm_up()`),
prefills 64 rows of 20 tokens in each and times the 64-row decode step (median of 20, after 3)
in the order A, B, A, B — so a slow *first runtime* and a slow *first minutes* part ways —
with the SM clock sampled by `nvidia-smi` beside each timing. Variants:

  base        as described
  no-flash    ORT_DISABLE_FLASH_ATTENTION=1 (GroupQueryAttention's memory-efficient kernel)
  eager-A     A without CUDA graphs (B captured)
  d64-first   A's 64-row step timed before any other decode size is captured (no warm_up)
  one-sampler A opened after a throwaway CUDA session (the device sampler's graphs) exists

    python bench/gpu/diag_first_runtime.py --model-dir /root/work/cuda-fp16 --out first.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

VARIANTS = ("base", "no-flash", "eager-A", "d64-first", "one-sampler")


def _clock() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,clocks.mem,power.draw",
                               "--format=csv,noheader"], capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except Exception as exc:  # noqa: BLE001 - a diagnostic: record why
        return f"n/a ({exc})"


def _time_decode(rt, reps: int = 20, warm: int = 3) -> dict:
    slots = list(range(64))
    xs = []
    for r in range(warm + reps):
        t = time.perf_counter()
        rt.decode(slots, [5] * 64)
        if r >= warm:
            xs.append(time.perf_counter() - t)
    for s in slots:  # back to the 20 prompt tokens, so every timing sees the same widths
        rt.truncate(s, 20)
    return {"median_ms": round(1000 * statistics.median(xs), 3),
            "min_ms": round(1000 * min(xs), 3), "clock": _clock()}


def child(model_dir: str, variant: str) -> dict:
    import numpy as np

    from serve.runtime import RuntimeOptions, open_runtime

    out: dict = {"variant": variant}
    if variant == "one-sampler":
        import onnxruntime as ort
        from onnx import TensorProto, helper

        g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        s = ort.InferenceSession(m.SerializeToString(), providers=["CUDAExecutionProvider"])
        s.run(None, {"x": np.ones(1, np.float32)})
        out["throwaway"] = True

    def opened(cuda_graph: bool, warm: bool):
        t = time.perf_counter()
        rt = open_runtime(model_dir, RuntimeOptions(provider="cuda", max_batch=64,
                                                    max_length=2048, cuda_graph=cuda_graph))
        if warm and hasattr(rt, "warm_up"):
            rt.warm_up()
        rng = np.random.default_rng(0)
        for s in range(64):
            rt.prefill(s, rng.integers(100, 40000, 20).tolist())
        return rt, round(time.perf_counter() - t, 2)

    a, out["open_A_s"] = opened(variant != "eager-A", variant != "d64-first")
    out["A1"] = _time_decode(a)
    b, out["open_B_s"] = opened(True, True)
    out["B1"] = _time_decode(b)
    out["A2"] = _time_decode(a)
    out["B2"] = _time_decode(b)
    del b
    out["A3_after_B_closed"] = _time_decode(a)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--variant", choices=VARIANTS)
    ap.add_argument("--only", default=",".join(VARIANTS))
    a = ap.parse_args()
    if a.variant:
        print(json.dumps(child(a.model_dir, a.variant)), flush=True)
        return
    res: dict = {"clock_idle": _clock()}
    for v in a.only.split(","):
        env = dict(os.environ)
        if v == "no-flash":
            env["ORT_DISABLE_FLASH_ATTENTION"] = "1"
        t = time.perf_counter()
        p = subprocess.run([sys.executable, __file__, "--model-dir", a.model_dir, "--variant", v],
                           capture_output=True, text=True, env=env, timeout=400)
        line = (p.stdout.strip().splitlines() or [""])[-1]
        try:
            res[v] = json.loads(line)
        except ValueError:
            res[v] = {"rc": p.returncode, "stderr_tail": p.stderr[-2000:]}
        res[v]["wall_s"] = round(time.perf_counter() - t, 1)
        print(v, json.dumps(res[v]), file=sys.stderr, flush=True)
        if a.out:
            a.out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
