"""Child processes: run one with its peak RSS measured, read a live one's peak RSS, free ports."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ChildResult:
    returncode: int
    wall_s: float
    peak_rss_mb: float
    timed_out: bool
    cpu_s: float = 0.0  # user + system CPU of the child and the descendants it waited for


def thread_env(threads: int, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment that caps every thread pool a peer might start (OpenMP, MKL, BLAS, torch)."""
    env = dict(os.environ if base is None else base)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                "NUMEXPR_NUM_THREADS", "VECLIB_MAXIMUM_THREADS"):
        env[var] = str(threads)
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_child(cmd: Sequence[str], *, timeout: float, env: Mapping[str, str] | None = None,
              log: Path | None = None, cwd: Path | None = None) -> ChildResult:
    """Run `cmd` to completion; its own peak RSS comes from `wait4` (not its children's).

    stdout and stderr go to `log` (or are discarded). On timeout the child's process group is
    killed.
    """
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 (closed below)
    try:
        t0 = time.perf_counter()
        proc = subprocess.Popen(list(cmd), stdout=out, stderr=subprocess.STDOUT, env=env,
                                cwd=cwd, start_new_session=True)
        deadline = t0 + timeout
        timed_out = False
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                timed_out = True
                os.killpg(proc.pid, signal.SIGKILL)
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.05)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)  # Popen must not wait4 it again
    finally:
        if log:
            out.close()
    return ChildResult(proc.returncode, wall, rss_mb(usage.ru_maxrss), timed_out,
                       usage.ru_utime + usage.ru_stime)


def rss_mb(ru_maxrss: int) -> float:
    """ru_maxrss is KiB on Linux, bytes on macOS."""
    return ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)


def peak_rss_mb(pid: int) -> float | None:
    """A live process's peak RSS (VmHWM), or None where /proc does not say."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def current_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def self_peak_rss_mb() -> float:
    import resource

    return rss_mb(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def cpu_busy_seconds() -> float | None:
    """CPU-seconds the whole machine has spent busy since boot (all CPUs; /proc/stat)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    ticks = [int(x) for x in fields]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def busy_cores(interval: float = 3.0) -> float | None:
    """How many CPUs' worth of work the machine did over the next `interval` seconds."""
    a = cpu_busy_seconds()
    time.sleep(interval)
    b = cpu_busy_seconds()
    return None if a is None or b is None else (b - a) / interval
