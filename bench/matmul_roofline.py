"""ONNX Runtime's `MatMulNBits` CPU kernel alone, at the 1B model's shapes: the weight bytes it
reads per second from DRAM (cold) and from cache (hot), against the STREAM triad.

    python -m bench.matmul_roofline [--rounds 3] [--threads 2] [--cold-mb 160] \
        [--shapes qkv,o,gate_up,down,lm_head] [--block-sizes 32,64,128] [--levels 0,4] \
        [--schemes asym,sym] [--json OUT]

Why: a batch-1 decode step of a dense model is almost all `MatMulNBits` at M = 1 (bench.
ort_profile: 74-93% of the step), so the kernel's own rate bounds the whole step. If a
matrix already in cache (hot) multiplies no faster than one streaming from DRAM (cold), the
kernel is compute-bound on these cores and no graph built on it reaches the bandwidth limit.

One graph per configuration (shape, block size, accuracy level, scheme): `copies` distinct
weight matrices of that configuration, each its own `MatMulNBits` node fed the same input
``x [1, K]`` fp32, each node's output a graph output. Random packed weights (speed does not
depend on their values), scales ~U(0.001, 0.01) fp32, zero points (asymmetric) random 4-bit
codes, or none (symmetric: ORT's implicit 2^(bits-1)).

    cold  every output fetched: the nodes run one after another, each streaming its own
          matrix; together they are `--cold-mb` MB (≫ the 32 MiB last-level cache), so every
          matrix comes from DRAM, as in a real decode step
    hot   only the first output fetched: ORT runs only that node, again and again; its matrix
          (when it fits in the last-level cache) is read from cache

The time of each node is ORT's own profiler's kernel time (``<node>_kernel_time``, the op
alone, no session overhead); the wall time of each cold run divided by its nodes is given
too. Bytes per matrix are what the graph holds: packed weights + fp32 scales + packed zero
points (as bench.weight_bytes counts an export). The session is llorch's
(serve.runtime.session_options: sequential, `--threads` intra-op threads, spinning on).

Configurations are measured in turns for `--rounds` rounds (each round starting one
configuration further along), one session alive at a time; the triad (bench.bandwidth) is
measured before, between rounds and after, and each configuration records the load
average and the CPU-seconds other processes used while it ran.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

# The 1B model's (Llama-3.2-1B shapes) matrices as llorch's export lays them out: q|k|v and
# gate|up packed along N (export/graph.py), the tied lm_head as its own MatMulNBits.
SHAPES: dict[str, tuple[int, int, int]] = {  # name: (K, N, per-token count in the model)
    "qkv": (2048, 3072, 16),
    "o": (2048, 2048, 16),
    "gate_up": (2048, 16384, 16),
    "down": (8192, 2048, 16),
    "lm_head": (2048, 49152, 1),
}
LLC_BYTES = 32 * 2**20  # this machine's L3 (lscpu); hot figures only for matrices ≤ half of it


@dataclass(frozen=True)
class Config:
    shape: str
    block_size: int
    accuracy_level: int
    symmetric: bool
    bits: int = 4

    @property
    def k(self) -> int:
        return SHAPES[self.shape][0]

    @property
    def n(self) -> int:
        return SHAPES[self.shape][1]

    @property
    def label(self) -> str:
        return (f"{self.shape} {self.k}x{self.n} b{self.block_size} L{self.accuracy_level} "
                f"{'sym' if self.symmetric else 'asym'}" + ("" if self.bits == 4 else f" {self.bits}-bit"))


def matrix_arrays(k: int, n: int, bits: int, block_size: int, symmetric: bool,
                  rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One weight matrix in MatMulNBits' layout (ORT contrib op docs, MatMulNBits):

    ``qweight`` uint8 ``[N, n_blocks, block_size * bits / 8]``; ``scales`` fp32
    ``[N * n_blocks]``; ``qzeros`` uint8 ``[N * ceil(n_blocks * bits / 8)]`` (asymmetric only).
    n_blocks = ceil(K / block_size).
    """
    blocks = -(-k // block_size)
    out = {"qweight": rng.integers(0, 256, (n, blocks, block_size * bits // 8), dtype=np.uint8),
           "scales": rng.uniform(0.001, 0.01, n * blocks).astype(np.float32)}
    if not symmetric:
        out["qzeros"] = rng.integers(0, 256, n * (-(-blocks * bits // 8)), dtype=np.uint8)
    return out


def matrix_bytes(k: int, n: int, bits: int, block_size: int, symmetric: bool) -> int:
    """Bytes of one matrix as the graph holds it: packed weights + fp32 scales + zero points."""
    blocks = -(-k // block_size)
    b = n * blocks * block_size * bits // 8 + n * blocks * 4
    return b if symmetric else b + n * (-(-blocks * bits // 8))


def kernel_bytes(cfg: Config) -> int:
    """Bytes the CPU kernel streams per call after ORT's prepacking, per MLAS's x64 source
    (onnxruntime/core/mlas/lib/sqnbitgemm_kernel_avx512.cpp, ORT 1.2x): at accuracy level 4
    (int8 compute, `CompInt8`) the packed 4-bit data, the fp32 scales, and a precomputed fp32
    ``-scale * zero_point`` per block ("QuantBBlkSum", also for symmetric blocks: zero point 8)
    multiplied by the activations' block sums in a second, float pass; the zero points
    themselves are folded into it. Other levels and widths: as the graph holds them."""
    if cfg.accuracy_level != 4 or cfg.bits != 4:
        return matrix_bytes(cfg.k, cfg.n, cfg.bits, cfg.block_size, cfg.symmetric)
    blocks = -(-cfg.k // cfg.block_size)
    return cfg.n * blocks * (cfg.block_size // 2 + 8)


def build_model(cfg: Config, copies: int, seed: int = 0) -> bytes:
    """Serialized ONNX model: ``copies`` MatMulNBits nodes on one input ``x [1, K]`` fp32,
    outputs ``y0 … y{copies-1}`` ``[1, N]``. Each copy's arrays differ (one random matrix,
    each copy xor-ed with its index), so no two initializers are alike."""
    from onnx import TensorProto, helper, numpy_helper

    base = matrix_arrays(cfg.k, cfg.n, cfg.bits, cfg.block_size, cfg.symmetric,
                         np.random.default_rng(seed))
    inits, nodes, outputs = [], [], []
    for c in range(copies):
        names = []
        for key, arr in base.items():
            a = arr ^ np.uint8(c) if arr.dtype == np.uint8 else arr * np.float32(1 + c / 1024)
            names.append(f"{key}{c}")
            inits.append(numpy_helper.from_array(a, names[-1]))
        nodes.append(helper.make_node(
            "MatMulNBits", ["x", *names], [f"y{c}"], name=f"mm{c}", domain="com.microsoft",
            K=cfg.k, N=cfg.n, bits=cfg.bits, block_size=cfg.block_size,
            accuracy_level=cfg.accuracy_level))
        outputs.append(helper.make_tensor_value_info(f"y{c}", TensorProto.FLOAT, [1, cfg.n]))
    graph = helper.make_graph(nodes, "matmulnbits", [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cfg.k])], outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    return model.SerializeToString()


def _kernel_times(trace: Path) -> dict[str, list[float]]:
    """Node name → kernel durations (µs) from an ORT profile trace, in order."""
    out: dict[str, list[float]] = {}
    for e in json.loads(trace.read_text()):
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            out.setdefault(e["name"][: -len("_kernel_time")], []).append(float(e["dur"]))
    return out


def _other_cpu(fn):
    """Run fn(); return (its result, CPU-seconds other processes used meanwhile, wall s)."""
    from bench.proc import cpu_busy_seconds

    b0, s0, t0 = cpu_busy_seconds(), time.process_time(), time.perf_counter()
    r = fn()
    b1, s1, t1 = cpu_busy_seconds(), time.process_time(), time.perf_counter()
    other = None if b0 is None or b1 is None else max(0.0, (b1 - b0) - (s1 - s0))
    return r, other, t1 - t0


def wait_quiet(max_wait: float, below: float = 0.3, window: float = 0.5) -> tuple[float | None, float]:
    """Wait (up to `max_wait` s) until other processes use < `below` CPUs over a `window`.

    Returns (the last window's busy CPUs, seconds waited)."""
    from bench.proc import busy_cores

    t0 = time.perf_counter()
    busy = busy_cores(window)
    while busy is not None and busy >= below and time.perf_counter() - t0 < max_wait:
        busy = busy_cores(window)
    return busy, time.perf_counter() - t0


def measure(cfg: Config, *, threads: int, cold_mb: float, cold_runs: int = 10,
            hot_calls: int = 100) -> dict:
    """Cold and hot kernel times of one configuration (see module doc).

    Returns:
        {"config", "bytes" (one matrix), "copies", "cold_us" (per-node kernel µs, every node
        of every timed run), "cold_wall_us" (per node: run wall ÷ copies), "hot_us" (kernel µs
        per call; empty when the matrix is > LLC/2), "other_cpu_s", "wall_s", "loadavg",
        "build_s"}.
    """
    import onnxruntime as ort

    from serve.runtime.session import session_options

    per = matrix_bytes(cfg.k, cfg.n, cfg.bits, cfg.block_size, cfg.symmetric)
    copies = max(2, int(np.ceil(cold_mb * 1e6 / per)))
    t0 = time.perf_counter()
    blob = build_model(cfg, copies)
    with tempfile.TemporaryDirectory(prefix="llorch-roofline-") as tmp:
        so = session_options(threads)
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tmp) / "p")
        sess = ort.InferenceSession(blob, so, providers=["CPUExecutionProvider"])
        del blob
        build_s = time.perf_counter() - t0
        x = {"x": np.random.default_rng(1).standard_normal((1, cfg.k)).astype(np.float32)}
        names = [f"y{c}" for c in range(copies)]
        hot = per <= LLC_BYTES // 2

        def work():
            sess.run(names, x)  # warm-up (first touch after prepacking)
            walls = []
            for _ in range(cold_runs):
                t = time.perf_counter()
                sess.run(names, x)
                walls.append((time.perf_counter() - t) * 1e6 / copies)
            if hot:
                for _ in range(hot_calls + 5):
                    sess.run(names[:1], x)
            return walls

        walls, other, wall_s = _other_cpu(work)
        trace = Path(sess.end_profiling())
        times = _kernel_times(trace)
    # per node: 1 warm-up + cold_runs cold calls, then (node 0 only) hot calls
    cold = [t for c in range(copies) for t in times[f"mm{c}"][1:1 + cold_runs]]
    hot_us = times["mm0"][1 + cold_runs + 5:] if hot else []
    return {"config": asdict(cfg), "label": cfg.label, "bytes": per, "copies": copies,
            "cold_us": cold, "cold_wall_us": walls, "hot_us": hot_us,
            "other_cpu_s": other, "wall_s": wall_s, "loadavg": os.getloadavg(),
            "build_s": build_s}


def configs(shapes: list[str], block_sizes: list[int], levels: list[int],
            schemes: list[str]) -> list[Config]:
    return [Config(s, b, lv, sc == "sym") for s in shapes for b in block_sizes for lv in levels
            for sc in schemes]


PAIRED_TRIAD_MB = 384  # a short triad right before each configuration (12x the LLC)
QUIET_CPUS = 0.2  # a measurement counts as quiet when other processes used fewer CPUs


def _other_cpus(r: dict) -> float:
    return (r["other_cpu_s"] or 0.0) / max(r["wall_s"], 1e-9)


def summarize(results: list[dict], triad_gbps: float) -> list[dict]:
    """Per configuration: median cold / hot kernel µs and GB/s, cold ÷ triad (the run's, and
    the median of each measurement ÷ the short triad taken just before it), over the rounds
    that ran quiet (other processes < QUIET_CPUS CPUs; all rounds when none did)."""
    by: dict[str, list[dict]] = {}
    for r in results:
        by.setdefault(r["label"], []).append(r)
    rows = []
    for label, all_rs in by.items():
        quiet = [r for r in all_rs if _other_cpus(r) < QUIET_CPUS]
        rs = quiet or all_rs
        per = rs[0]["bytes"]
        cold = statistics.median(t for r in rs for t in r["cold_us"])
        wall = statistics.median(t for r in rs for t in r["cold_wall_us"])
        hots = [t for r in rs for t in r["hot_us"]]
        hot = statistics.median(hots) if hots else None
        cfg = dict(rs[0]["config"], k=SHAPES[rs[0]["config"]["shape"]][0],
                   n=SHAPES[rs[0]["config"]["shape"]][1])
        rows.append({"label": label, "config": cfg, "bytes": per,
                     "cold_us": cold, "cold_gbps": per / cold / 1e3,
                     "cold_wall_gbps": per / wall / 1e3,
                     "cold_round_gbps": [per / statistics.median(r["cold_us"]) / 1e3 for r in rs],
                     "hot_us": hot, "hot_gbps": per / hot / 1e3 if hot else None,
                     "cold_of_triad": per / cold / 1e3 / triad_gbps,
                     # each measurement against the triad measured just before it (the host's
                     # bandwidth moves with its other tenants: triads of 18-45 GB/s in one run)
                     "cold_of_paired_triad": statistics.median(
                         per / statistics.median(r["cold_us"]) / 1e3 / r["paired_triad_gbps"]
                         for r in rs) if all("paired_triad_gbps" in r for r in rs) else None,
                     "paired_triad_gbps": statistics.median(
                         r["paired_triad_gbps"] for r in rs) if all(
                         "paired_triad_gbps" in r for r in rs) else None,
                     "other_cpus": statistics.median(_other_cpus(r) for r in rs),
                     "rounds": len(all_rs), "quiet_rounds": len(quiet),
                     "kernel_bytes": kernel_bytes(Config(**rs[0]["config"]))})
    return rows


def model_step(rows: list[dict], triad_gbps: float) -> list[dict]:
    """The 1B model's batch-1 decode step as its matrices' cold kernel times alone, for each
    (block size, level, scheme) measured at every shape: weight bytes, µs, tok/s, GB/s, and
    that as a fraction of the triad (the kernel-bound ceiling of a decode step on this kernel;
    attention, norms and per-node overhead come on top)."""
    by: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        c = r["config"]
        if c["bits"] == 4:
            by.setdefault((c["block_size"], c["accuracy_level"], c["symmetric"]), {})[c["shape"]] = r
    out = []
    for (bs, lv, sym), shp in sorted(by.items()):
        if set(shp) != set(SHAPES):
            continue
        nbytes = sum(SHAPES[s][2] * shp[s]["bytes"] for s in SHAPES)
        us = sum(SHAPES[s][2] * shp[s]["cold_us"] for s in SHAPES)
        out.append({"block_size": bs, "accuracy_level": lv, "symmetric": sym, "bytes": nbytes,
                    "us": us, "tok_s": 1e6 / us, "gbps": nbytes / us / 1e3,
                    "of_triad": nbytes / us / 1e3 / triad_gbps})
    return out


def run(cfgs: list[Config], *, rounds: int, threads: int, cold_mb: float, quiet_wait: float = 0,
        progress: bool = True) -> dict:
    """Every configuration `rounds` times in rotating order, triads between rounds; before each
    configuration up to `quiet_wait` s for the other processes to go quiet (wait_quiet)."""
    from bench.bandwidth import measure_bandwidth
    from bench.machine import machine_info

    def triad() -> dict:
        t, other, wall = _other_cpu(lambda: measure_bandwidth(threads=threads))
        return dict(t, other_cpus=(other or 0.0) / wall)

    triads = [triad()]
    results = []
    for r in range(rounds):
        order = cfgs[r % len(cfgs):] + cfgs[: r % len(cfgs)]
        for cfg in order:
            busy, waited = wait_quiet(quiet_wait) if quiet_wait > 0 else (None, 0.0)
            paired = measure_bandwidth(PAIRED_TRIAD_MB, threads=threads, repeats=3)
            res = measure(cfg, threads=threads, cold_mb=cold_mb)
            res.update(round=r, busy_before=busy, waited_s=waited,
                       paired_triad_gbps=paired["triad_gbps"], paired_read_gbps=paired["read_gbps"])
            results.append(res)
            if progress:
                med = statistics.median(res["cold_us"])
                hot = f", hot {res['bytes'] / statistics.median(res['hot_us']) / 1e3:.1f}" \
                    if res["hot_us"] else ""
                print(f"r{r} {cfg.label}: cold {res['bytes'] / med / 1e3:.1f} GB/s{hot} "
                      f"(other CPU {res['other_cpu_s'] or 0:.2f} s in {res['wall_s']:.1f} s, "
                      f"load {res['loadavg'][0]:.2f})", flush=True)
        triads.append(triad())
    return finish({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                   "machine": machine_info(), "threads": threads, "rounds": rounds,
                   "cold_mb": cold_mb, "triads": triads, "results": results})


def finish(res: dict) -> dict:
    """Add the triad (median of the runs), the per-configuration rows and the model step."""
    quiet = [t for t in res["triads"] if t.get("other_cpus", 0.0) < QUIET_CPUS]
    triad = statistics.median(t["triad_gbps"] for t in quiet or res["triads"])
    rows = summarize(res["results"], triad)
    return dict(res, triad_gbps=triad, rows=rows, model_step=model_step(rows, triad))


def merge(parts: list[dict]) -> dict:
    """Several runs' results as one (their triads and configuration results pooled)."""
    first = parts[0]
    return finish({"date": ", ".join(p["date"] for p in parts), "machine": first["machine"],
                   "threads": first["threads"], "rounds": sum(p["rounds"] for p in parts),
                   "cold_mb": first["cold_mb"],
                   "triads": [t for p in parts for t in p["triads"]],
                   "results": [r for p in parts for r in p["results"]]})


def markdown(res: dict) -> str:
    """The summary tables (per matrix; the 1B model's step from kernel times alone)."""
    tri = res["triad_gbps"]
    lines = [f"triad {tri:.1f} GB/s (median of {len(res['triads'])}: "
             f"{', '.join(format(t['triad_gbps'], '.1f') for t in res['triads'])}; read-only sum "
             f"{statistics.median(t['read_gbps'] for t in res['triads']):.1f})",
             "",
             "| matrix | K×N | block | level | scheme | MB | cold µs | cold GB/s | of triad | "
             "of paired triad | hot GB/s | hot ÷ cold | quiet rounds | other CPUs |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        c = r["config"]
        hot = f"{r['hot_gbps']:.1f}" if r["hot_gbps"] else "–"
        pt = (f"{r['cold_of_paired_triad']:.0%} of {r['paired_triad_gbps']:.1f}"
              if r.get("cold_of_paired_triad") else "–")
        ratio = f"{r['hot_gbps'] / r['cold_gbps']:.2f}" if r["hot_gbps"] else "–"
        bits = "" if c["bits"] == 4 else f" ({c['bits']}-bit)"
        lines.append(f"| {c['shape']}{bits} | "
                     f"{c['k']}×{c['n']} | {c['block_size']} | {c['accuracy_level']} | "
                     f"{'sym' if c['symmetric'] else 'asym'} | {r['bytes'] / 1e6:.2f} | "
                     f"{r['cold_us']:.0f} | {r['cold_gbps']:.1f} | {r['cold_of_triad']:.0%} | "
                     f"{pt} | {hot} | {ratio} | {r['quiet_rounds']}/{r['rounds']} | "
                     f"{r['other_cpus']:.2f} |")
    if res["model_step"]:
        lines += ["", "| 1B step, matrices only | MB / token | kernel ms | tok/s | GB/s | of triad |",
                  "|---|---|---|---|---|---|"]
        for m in res["model_step"]:
            lines.append(f"| block {m['block_size']}, level {m['accuracy_level']}, "
                         f"{'sym' if m['symmetric'] else 'asym'} | {m['bytes'] / 1e6:.0f} | "
                         f"{m['us'] / 1e3:.1f} | {m['tok_s']:.1f} | {m['gbps']:.1f} | "
                         f"{m['of_triad']:.0%} |")
    return "\n".join(lines)


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.matmul_roofline",
                                description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cold-mb", type=float, default=160,
                   help="MB of distinct matrices per cold run (default 160, 5x the LLC)")
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"of {', '.join(SHAPES)}")
    p.add_argument("--block-sizes", default="32,64,128")
    p.add_argument("--levels", default="0,4", help="MatMulNBits accuracy_level values")
    p.add_argument("--schemes", default="asym,sym", help="asym (zero points), sym (none)")
    p.add_argument("--lm-head-8bit", action="store_true",
                   help="also the lm_head as an 8-bit MatMulNBits (llorch's default) at block 32")
    p.add_argument("--quiet-wait", type=float, default=0,
                   help="before each configuration wait up to this many s for the other "
                   "processes to use < 0.3 CPUs (default 0: no wait)")
    p.add_argument("--json", type=Path, help="write the full results here")
    p.add_argument("--merge", type=Path, nargs="+",
                   help="no measuring: pool these runs' JSON files (write with --json)")
    args = p.parse_args(argv)
    if args.merge:
        res = merge([json.loads(f.read_text()) for f in args.merge])
        print(markdown(res))
        if args.json:
            args.json.write_text(json.dumps(res, indent=1))
        return 0
    shapes = args.shapes.split(",")
    for s in shapes:
        if s not in SHAPES:
            p.error(f"--shapes: unknown {s!r}")
    cfgs = configs(shapes, _ints(args.block_sizes), _ints(args.levels),
                   args.schemes.split(","))
    if args.lm_head_8bit:
        cfgs += [Config("lm_head", 32, lv, False, bits=8) for lv in _ints(args.levels)]
    res = run(cfgs, rounds=args.rounds, threads=args.threads, cold_mb=args.cold_mb,
              quiet_wait=args.quiet_wait)
    print(markdown(res))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
