"""A worker process runs one peer: `python -m bench.worker JOB.json RESULT.json`.

One process per peer keeps thread settings and peak RSS clean: the parent sets the
thread-count environment before the process starts, and `ru_maxrss` here is this peer's
alone. The result file always gets written: status `ok`, `skipped` (+ reason) or `error`.
"""

from __future__ import annotations

import importlib
import json
import sys
import time
import traceback
from pathlib import Path

from bench.peers.base import Skip
from bench.proc import self_peak_rss_mb


def run_job(job: dict) -> dict:
    result: dict = {"key": job["key"], "status": "ok"}
    t0 = time.perf_counter()
    try:
        module = importlib.import_module(f"bench.peers.{job['peer']}")
        result.update(module.run(job))
    except Skip as exc:
        result.update(status="skipped", reason=str(exc))
    except Exception as exc:
        traceback.print_exc()
        result.update(status="error", reason=f"{type(exc).__name__}: {exc}")
    result["wall_s"] = time.perf_counter() - t0
    result["worker_peak_rss_mb"] = self_peak_rss_mb()
    result.setdefault("peak_rss_mb", result["worker_peak_rss_mb"])  # HTTP peers: the server's
    return result


def main(argv: list[str]) -> int:
    job = json.loads(Path(argv[0]).read_text())
    result = run_job(job)
    Path(argv[1]).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
