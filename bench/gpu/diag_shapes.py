"""Two costs that depend on shapes, on the GPU: (1) a decode step's time against the cache
width the captured graph attends over (`max_length`: captured steps mask the whole buffer)
and against the tokens the rows actually hold; (2) a prefill's first call at a sequence length
ORT has not met before, against its second.

    python bench/gpu/diag_shapes.py --model-dir /root/work/cuda-fp16 --out shapes.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402


def _time(fn, reps: int, warm: int = 3) -> float:
    xs = []
    for r in range(warm + reps):
        t = time.perf_counter()
        fn()
        if r >= warm:
            xs.append(time.perf_counter() - t)
    return round(1000 * statistics.median(xs), 3)


def decode_widths(model_dir: str, provider: str, reps: int) -> dict:
    from serve.runtime import RuntimeOptions, open_runtime

    out: dict = {}
    rng = np.random.default_rng(0)
    for max_length in (256, 1024, 2048, 4096):
        for cuda_graph in ((True, False) if provider == "cuda" else (False,)):
            rt = open_runtime(model_dir, RuntimeOptions(provider=provider, max_batch=64,
                                                        max_length=max_length,
                                                        cuda_graph=cuda_graph))
            row: dict = {}
            for held in (20, 200):
                if held + reps + 10 >= max_length:
                    continue
                for b in (1, 8, 64):
                    slots = list(range(b))
                    for s in slots:
                        rt.reset(s)
                        rt.prefill(s, rng.integers(100, 40000, held).tolist())
                    row[f"b{b}_held{held}"] = _time(lambda rt=rt, slots=slots: rt.decode(slots, [5] * len(slots)), reps)
            out[f"max_length_{max_length}_{'graph' if cuda_graph else 'plain'}"] = row
            print(max_length, cuda_graph, row, file=sys.stderr, flush=True)
            del rt
    return out


def decode_max_batch(model_dir: str, provider: str, reps: int) -> dict:
    """A captured 64-row decode step against the slot count (the buffer's rows)."""
    from serve.runtime import RuntimeOptions, open_runtime

    out: dict = {}
    rng = np.random.default_rng(2)
    for max_batch in (64, 96, 128):
        rt = open_runtime(model_dir, RuntimeOptions(provider=provider, max_batch=max_batch,
                                                    max_length=2048,
                                                    cuda_graph=provider == "cuda"))
        slots = list(range(64))
        for s in slots:
            rt.reset(s)
            rt.prefill(s, rng.integers(100, 40000, 20).tolist())
        out[str(max_batch)] = _time(lambda rt=rt, slots=slots: rt.decode(slots, [5] * 64), reps)
        print("max_batch", max_batch, out[str(max_batch)], file=sys.stderr, flush=True)
        del rt
    return out


def first_shapes(model_dir: str, provider: str) -> dict:
    from serve.runtime import RuntimeOptions, open_runtime

    rt = open_runtime(model_dir, RuntimeOptions(provider=provider, max_batch=4, max_length=2048))
    rng = np.random.default_rng(1)
    out: dict = {}
    for n in (20, 21, 22, 23, 37, 64, 100, 300):
        times = []
        for _ in range(3):
            rt.reset(1)
            ids = rng.integers(100, 40000, n).tolist()
            t = time.perf_counter()
            rt.prefill(1, ids)
            times.append(round(1000 * (time.perf_counter() - t), 2))
        # the same length after a prefix already in the slot (past > 0)
        rt.reset(2)
        rt.prefill(2, rng.integers(100, 40000, 50).tolist())
        t = time.perf_counter()
        rt.prefill(2, rng.integers(100, 40000, n).tolist())
        after = round(1000 * (time.perf_counter() - t), 2)
        out[str(n)] = {"fresh_first_second_third_ms": times, "after_50_ms": after}
        print(n, out[str(n)], file=sys.stderr, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--provider", default="cuda")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", choices=["max-batch"])
    a = ap.parse_args()
    import onnxruntime as ort
    res: dict = {"onnxruntime": ort.__version__}
    if a.only == "max-batch":
        res["decode_max_batch"] = decode_max_batch(a.model_dir, a.provider, a.reps)
        Path(a.out).write_text(json.dumps(res, indent=1))
        return
    res["first_shapes"] = first_shapes(a.model_dir, a.provider)
    Path(a.out).write_text(json.dumps(res, indent=1))
    res["decode_widths"] = decode_widths(a.model_dir, a.provider, a.reps)
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
