"""This machine's memory bandwidth: a STREAM-style triad (and a read-only sum) in C via ctypes.

Why C and not NumPy: NumPy has no fused `a = b + s*c`; `np.multiply(c, s, out=a); a += b`
makes two passes over memory (5 array streams instead of 3), so counting 24 bytes per
element would understate the bandwidth by ~40%, and NumPy's ufuncs run on one thread. The
kernel below is STREAM's triad, split over `threads` OpenMP threads, each first-touching the
part it later streams; it is compiled once with the system C compiler into bench/.cache.

Counted as STREAM counts: triad 24 bytes per element (read b, read c, write a; the
write-allocate read of `a` is not counted), sum 8 bytes per element (read only, like decode
reading weights). Best of `repeats` runs, as STREAM reports.

    python -m bench.bandwidth [--mb 1024] [--threads 2]
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import shutil
import subprocess
from pathlib import Path

CACHE = Path(__file__).resolve().parent / ".cache"

SOURCE = r"""
#include <stdlib.h>
#include <omp.h>

/* best seconds of `repeats` runs of each kernel over n doubles per array */
int stream(long n, int threads, int repeats, double *triad_s, double *sum_s, double *check) {
    double *a = malloc(n * sizeof(double)), *b = malloc(n * sizeof(double)),
           *c = malloc(n * sizeof(double));
    if (!a || !b || !c) { free(a); free(b); free(c); return 1; }
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (long i = 0; i < n; i++) { a[i] = 0.0; b[i] = 1.0; c[i] = 2.0; }
    double best_t = 1e30, best_s = 1e30, acc = 0.0;
    for (int r = 0; r < repeats; r++) {
        double t0 = omp_get_wtime();
        #pragma omp parallel for num_threads(threads) schedule(static)
        for (long i = 0; i < n; i++) a[i] = b[i] + 3.0 * c[i];
        double t1 = omp_get_wtime();
        double s = 0.0;
        /* simd: lets the compiler keep several partial sums (else one add chain per
           thread bounds it by FP-add latency, not by memory) */
        #pragma omp parallel for simd num_threads(threads) schedule(static) reduction(+:s)
        for (long i = 0; i < n; i++) s += a[i];
        double t2 = omp_get_wtime();
        if (t1 - t0 < best_t) best_t = t1 - t0;
        if (t2 - t1 < best_s) best_s = t2 - t1;
        acc += s;
    }
    *triad_s = best_t; *sum_s = best_s; *check = acc / repeats / n;  /* 7.0 */
    free(a); free(b); free(c);
    return 0;
}
"""


class BandwidthError(RuntimeError):
    """No C compiler, or the kernel failed (allocation)."""


def _library() -> ctypes.CDLL:
    digest = hashlib.sha256(SOURCE.encode()).hexdigest()[:12]
    lib = CACHE / f"stream-{digest}.so"
    if not lib.is_file():
        cc = shutil.which("cc") or shutil.which("gcc")
        if cc is None:
            raise BandwidthError("no C compiler (cc/gcc) on PATH to build the triad kernel")
        CACHE.mkdir(parents=True, exist_ok=True)
        src = lib.with_suffix(".c")
        src.write_text(SOURCE)
        tmp = lib.with_suffix(".so.tmp")
        res = subprocess.run([cc, "-O2", "-march=native", "-fopenmp", "-shared", "-fPIC",
                              str(src), "-o", str(tmp)], capture_output=True, text=True)
        if res.returncode != 0:
            raise BandwidthError(f"compiling the triad kernel failed: {res.stderr.strip()[-500:]}")
        tmp.replace(lib)
    dll = ctypes.CDLL(str(lib))
    dll.stream.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_int,
                           ctypes.POINTER(ctypes.c_double), ctypes.POINTER(ctypes.c_double),
                           ctypes.POINTER(ctypes.c_double)]
    dll.stream.restype = ctypes.c_int
    return dll


def measure_bandwidth(total_mb: float = 1024, threads: int = 2, repeats: int = 5) -> dict:
    """STREAM triad and read-only sum bandwidth over three arrays of `total_mb` MB together.

    Args:
        total_mb: size of the three float64 arrays together, MB (10**6 bytes); ≫ the caches.
        threads: OpenMP threads.
        repeats: runs of each kernel; the fastest counts.

    Returns:
        {"triad_gbps", "read_gbps" (GB/s, 10**9 bytes/s), "bytes_per_array", "threads",
         "repeats", "method"}.

    Raises:
        BandwidthError: no C compiler, or the arrays could not be allocated.
    """
    n = int(total_mb * 1e6 / 3 / 8)
    triad_s, sum_s, check = ctypes.c_double(), ctypes.c_double(), ctypes.c_double()
    rc = _library().stream(n, threads, repeats, ctypes.byref(triad_s), ctypes.byref(sum_s),
                           ctypes.byref(check))
    if rc != 0:
        raise BandwidthError(f"could not allocate 3 x {n * 8 / 1e6:.0f} MB")
    if abs(check.value - 7.0) > 1e-9:
        raise BandwidthError(f"triad kernel computed {check.value}, expected 7.0")
    return {"triad_gbps": 24 * n / triad_s.value / 1e9, "read_gbps": 8 * n / sum_s.value / 1e9,
            "bytes_per_array": 8 * n, "threads": threads, "repeats": repeats,
            "method": "C triad a[i] = b[i] + 3.0*c[i] and sum(a) via ctypes, OpenMP"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bandwidth", description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=float, default=1024, help="three arrays together, MB (default 1024)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    r = measure_bandwidth(args.mb, args.threads, args.repeats)
    print(f"triad {r['triad_gbps']:.1f} GB/s, read {r['read_gbps']:.1f} GB/s "
          f"({args.threads} threads, 3 x {r['bytes_per_array'] / 1e6:.0f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
