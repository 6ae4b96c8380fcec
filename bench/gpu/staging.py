"""One stage of a GPU run: time it, record its result or its error (with the traceback) in
the report, save the report, and go on either way (bench_cuda.py, serve_e2e.py)."""

from __future__ import annotations

import sys
import time
import traceback


def run_stage(report, name: str, fn, *args, **kwargs):
    """``report.data[name] = fn(*args, **kwargs)``, or the error; returns the result or None."""
    t0 = time.perf_counter()
    try:
        out = report.data[name] = fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - recorded with its traceback, the run goes on
        out = None
        report.data[name] = {"error": f"{type(e).__name__}: {e}"[:1000],
                             "traceback": traceback.format_exc()[-2000:]}
    print(f"[{name}] {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    report.save()
    return out
