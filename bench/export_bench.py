"""`llorch export` of the default model: wall time and peak RSS of the exporting process."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from bench.proc import run_child, thread_env
from bench.stats import summarize


def export_figures(sources: dict[str, Path], cache: Path, *, repeats: int, threads: int,
                   log: Path) -> dict:
    """{name: {"wall_s": summary, "peak_rss_mb": summary, "source": path}} per source.

    Each run is a fresh `python -m llorch export SRC -o OUT --force --quiet` child process;
    its peak RSS comes from wait4 (so it is the exporter's alone).
    """
    out: dict = {}
    for name, src in sources.items():
        if not src.exists():
            out[name] = {"status": "skipped", "reason": f"{src} does not exist"}
            continue
        dst = cache / f"export-{name}"
        walls, rss, status = [], [], "ok"
        for _ in range(repeats):
            res = run_child([sys.executable, "-m", "llorch", "export", str(src), "-o", str(dst),
                             "--precision", "int4", "--force", "--quiet"],
                            timeout=1800, env=thread_env(threads), log=log)
            if res.returncode != 0:
                status = f"error: exit {res.returncode} (see {log})"
                break
            walls.append(res.wall_s)
            rss.append(res.peak_rss_mb)
        shutil.rmtree(dst, ignore_errors=True)
        out[name] = {"status": "ok" if status == "ok" else "error", "source": str(src),
                     "precision": "int4", "wall_s": summarize(walls),
                     "peak_rss_mb": summarize(rss)}
        if status != "ok":
            out[name]["reason"] = status
    return out
