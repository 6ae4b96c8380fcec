"""The machine a run happened on: a short tag for file names, and the facts behind it."""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

# Highest first: the tag names the widest SIMD the CPU offers (what MatMulNBits, MLAS and
# ggml pick their kernels by).
_ISA_LADDER = (("avx512f", "avx512"), ("avx2", "avx2"), ("avx", "avx"), ("sse4_2", "sse4"),
               ("asimd", "neon"))

PACKAGES = ("llorch", "onnxruntime", "onnxruntime-genai", "llama-cpp-python", "torch",
            "transformers", "optimum-onnx", "optimum", "openai", "numpy")


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The `flags` (x86) or `Features` (arm) of the first CPU in /proc/cpuinfo."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def cpu_model(cpuinfo: str | None = None) -> str:
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return platform.processor() or platform.machine()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            return value.strip()
    return platform.processor() or platform.machine()


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def machine_tag(cpus: int | None = None, flags: set[str] | None = None) -> str:
    """`cpu<N>-<isa>`, e.g. `cpu2-avx512`: N usable CPUs, the widest SIMD they offer."""
    cpus = usable_cpus() if cpus is None else cpus
    flags = cpu_flags() if flags is None else flags
    isa = next((name for flag, name in _ISA_LADDER if flag in flags), platform.machine())
    return f"cpu{cpus}-{isa}"


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def machine_info() -> dict:
    flags = cpu_flags()
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "f16c", "fma")
    try:
        mem_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                      if line.startswith("MemTotal:"))
    except (OSError, StopIteration):
        mem_kb = 0
    return {
        "tag": machine_tag(flags=flags),
        "cpu": cpu_model(),
        "cpus": usable_cpus(),
        "simd": sorted(f for f in wanted if f in flags),
        "memory_gb": round(mem_kb / 2**20, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions(),
    }


def load_average() -> tuple[float, float, float]:
    try:
        return os.getloadavg()
    except OSError:
        return (float("nan"),) * 3


def code_state(repo: Path) -> dict:
    """Which llorch code ran: the commit, and a hash of the working tree's export/, serve/ and
    llorch/ sources (other work may change them during a run)."""
    h = hashlib.sha256()
    for path in sorted(p for d in ("export", "serve", "llorch") for p in (repo / d).rglob("*.py")):
        h.update(str(path.relative_to(repo)).encode())
        h.update(path.read_bytes())
    try:
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--", "export",
                                "serve", "llorch"], capture_output=True, text=True,
                               check=True).stdout.split("\n")
        dirty = sorted(line[3:] for line in dirty if line.strip())
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = None, []
    return {"commit": commit, "sources_sha": h.hexdigest()[:12], "uncommitted": dirty}
