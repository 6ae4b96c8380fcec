"""Scale-out on the GPU: `llorch serve MODEL --replicas N --provider cuda` (Ray Serve) for each N,
aggregate decode tok/s over HTTP at --streams concurrent chat streams (issue #17's proof).

    python bench/gpu/scale_e2e.py --model-dir /root/work/cuda-fp16 \\
        [--gguf model.gguf] --replicas 1,2,0 --streams 64 --out scale.json

For each entry of --replicas (0: the single process without Ray, for reference) the server is
started as `python -m serve.main MODEL --replicas N --gpus-per-replica 1 --provider cuda
--max-batch 64 …` in a subprocess on a free port (its log: `OUT-STEM-replicas_N[_ROUTING].log` beside --out) and
waited for until `/health` reports N ready replicas. Then:
  greedy     one greedy chat "What is the capital of France?" (the answer is recorded)
  warm-up    --streams streams of 8 tokens (every replica meets the batch sizes)
  load       --repeats timed runs of --streams chat streams (greedy, ignore_eos, --max-tokens
             each, distinct prompts), driven by --clients client processes (the official openai
             client; one Python client process tops out near 5k SSE chunks/s), all started at
             one instant; aggregate tok/s = completion tokens / (last stream's end − first
             stream's start); the best run and all runs are kept
  gpus       nvidia-smi sampled every 0.5 s during the timed runs: each GPU's peak utilization
             and memory, so the JSON shows which GPUs did the work
  crossings  the replicas' `/metrics` counters over the timed runs: chunks sent through Ray,
             the app's body messages (SSE events) and tokens generated, so `chunks_per_token`
             shows what the coalescing (`--stream-chunk-rate`) saved; N:ROUTING:RATE runs a
             config with that `--stream-chunk-rate` (0: one chunk per event, as before it)
then SIGTERM (drain) and, for N > 0, `ray stop --force` so no Ray process holds a GPU for the
next server. The JSON (rewritten after every stage) ends with `scale`: tok/s per N and the
ratio of each N to N = 1.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_e2e import (  # noqa: E402
    PARIS_Q,
    Report,
    Server,
    _client_part,
    _nvidia_smi,
    environment,
    http_get,
    inprocess_engine,
    load,
    prepare_model,
    repeated,
)


def wait_replicas(server: Server, n: int, timeout: float) -> dict:
    """Poll `/health` until it reports `n` ready replicas (any 200 for the plain server)."""
    t0 = time.monotonic()
    server.wait_ready(timeout)
    while True:
        code, body = http_get(f"{server.base}/health", 5)
        health = json.loads(body) if body.startswith("{") else {"raw": body[:500]}
        if code == 200 and (n == 0 or health.get("ready_replicas") == n):
            return {"ready_s": round(time.monotonic() - t0, 1), "health": health}
        if server.proc.poll() is not None or time.monotonic() - t0 > timeout:
            raise RuntimeError(f"{n} replicas not ready after {time.monotonic() - t0:.0f} s "
                               f"(last /health {code}: {body[:500]}): {server.log_tail()}")
        time.sleep(0.5)


class GpuSampler:
    """nvidia-smi every 0.5 s in a thread: per GPU index the peak utilization (%) and memory
    used (MiB) while running; and each process's CPU use (% of one core, mean over
    the sampling and its peak 0.5 s), the busiest 12 in `cpu_top` (Ray names its processes
    `ray::ProxyActor`, `ray::ServeReplica:APP:DEPLOYMENT`, so the hop that saturates shows)."""

    def __init__(self):
        self.peak: dict[str, dict] = {}
        self._procs: dict = {}
        self._cpu: dict[int, dict] = {}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        while not self._stop.is_set():
            for line in _nvidia_smi("--query-gpu=index,utilization.gpu,memory.used").splitlines():
                try:  # "0, 45 %, 3012 MiB"
                    i, u, m = (x.strip().split()[0] for x in line.split(","))
                    u, m = int(u), int(m)
                except (ValueError, IndexError):
                    continue
                p = self.peak.setdefault(i, {"util_pct": 0, "mem_mib": 0})
                p["util_pct"], p["mem_mib"] = max(p["util_pct"], u), max(p["mem_mib"], m)
            self._sample_cpu()
            self._stop.wait(0.5)

    def _sample_cpu(self):
        """CPU % of one core of every process since the last sample, from /proc/PID/stat."""
        now, tick = time.monotonic(), os.sysconf("SC_CLK_TCK")
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                f = (d / "stat").read_text().rsplit(")", 1)[1].split()
                cpu = (int(f[11]) + int(f[12])) / tick  # utime + stime, seconds
            except (OSError, IndexError, ValueError):
                continue
            pid = int(d.name)
            last = self._procs.get(pid)
            self._procs[pid] = (now, cpu)
            if last is None or now <= last[0]:
                continue
            if pid not in self._cpu:
                try:
                    name = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                except OSError:
                    name = "?"
                self._cpu[pid] = {"name": name.strip()[:90], "samples": []}
            self._cpu[pid]["samples"].append(100 * (cpu - last[1]) / (now - last[0]))

    def cpu_top(self) -> list[dict]:
        rows = [{"pid": pid, "name": c["name"],
                 "mean_pct": round(sum(c["samples"]) / len(c["samples"]), 1),
                 "peak_pct": round(max(c["samples"]), 1)}
                for pid, c in self._cpu.items() if c["samples"]]
        return sorted(rows, key=lambda r: -r["mean_pct"])[:12]

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join(5)


def ray_counters(base: str) -> dict:
    """Sums over replicas of the Ray crossing counters and generated tokens (`/metrics`)."""
    sums = {"llorch_ray_chunks_total": 0.0, "llorch_ray_body_messages_total": 0.0,
            "llorch_generation_tokens_total": 0.0}
    for line in (http_get(f"{base}/metrics", 10)[1] or "").splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in sums:
            sums[name] += float(line.rsplit(" ", 1)[1])
    return sums


def tokens_by_replica(base: str) -> dict:
    """`llorch_generation_tokens_total` per replica label (`/metrics`), to show the split."""
    out: dict = {}
    for line in (http_get(f"{base}/metrics", 10)[1] or "").splitlines():
        if line.startswith("llorch_generation_tokens_total{"):
            labels = line.split("{", 1)[1].split("}", 1)[0]
            out[labels] = out.get(labels, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


SERVER_HISTOGRAMS = ("llorch_time_to_first_token_seconds", "llorch_request_queue_seconds")


def histograms(base: str, names: tuple[str, ...] = SERVER_HISTOGRAMS) -> dict:
    """The servers' own latency histograms (`/metrics`): {name: {replica label (or ""):
    {"le": {upper bound: cumulative count}, "sum": s, "count": n}}}."""
    out: dict = {}
    for line in (http_get(f"{base}/metrics", 10)[1] or "").splitlines():
        head, _, value = line.rpartition(" ")
        name = head.split("{", 1)[0]
        base_name = next((n for n in names if name in (n + "_bucket", n + "_sum", n + "_count")),
                         None)
        if base_name is None:
            continue
        labels = head.split("{", 1)[1].rstrip("}") if "{" in head else ""
        parts = dict(p.split("=", 1) for p in labels.split(",") if "=" in p)
        rep = parts.get("replica", "").strip('"')
        h = out.setdefault(base_name, {}).setdefault(rep, {"le": {}, "sum": 0.0, "count": 0.0})
        if name.endswith("_bucket"):
            le = parts["le"].strip('"')
            h["le"][le] = h["le"].get(le, 0.0) + float(value)
        else:
            h[name.rsplit("_", 1)[1]] += float(value)
    return out


def histogram_delta(before: dict, after: dict) -> dict:
    """Per histogram and replica, what a timed run added: count, mean, and p50/p95 as the
    upper bound of the bucket that holds them (seconds → ms)."""
    out: dict = {}
    for name, reps in after.items():
        for rep, h in reps.items():
            b = before.get(name, {}).get(rep, {"le": {}, "sum": 0.0, "count": 0.0})
            n = h["count"] - b["count"]
            if n <= 0:
                continue
            cum = sorted(((float("inf") if le == "+Inf" else float(le)),
                          c - b["le"].get(le, 0.0)) for le, c in h["le"].items())
            out.setdefault(name.removeprefix("llorch_"), {})[rep or "server"] = {
                "count": int(n), "mean_ms": round(1000 * (h["sum"] - b["sum"]) / n, 1),
                "p50_le_ms": _bucket_ms(cum, 0.5 * n), "p95_le_ms": _bucket_ms(cum, 0.95 * n)}
    return out


def _bucket_ms(cum: list[tuple[float, float]], rank: float) -> float | None:
    """The upper bound (ms) of the first cumulative bucket holding `rank` samples."""
    ub = next((u for u, c in cum if c >= rank), None)
    return None if ub is None or ub == float("inf") else round(1000 * ub, 1)


def crossings(before: dict, after: dict) -> dict:
    """What crossed Ray per token between two `ray_counters` readings."""
    d = {k: after[k] - before[k] for k in after}
    tokens = d["llorch_generation_tokens_total"]
    return {"chunks": d["llorch_ray_chunks_total"], "body_messages": d["llorch_ray_body_messages_total"],
            "tokens": tokens,
            "chunks_per_token": round(d["llorch_ray_chunks_total"] / tokens, 3) if tokens else None,
            "messages_per_chunk": round(d["llorch_ray_body_messages_total"]
                                        / d["llorch_ray_chunks_total"], 2)
            if d["llorch_ray_chunks_total"] else None}


def ray_stop() -> str:
    p = subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "stop", "--force"],
                       capture_output=True, text=True, timeout=120)
    return (p.stdout + p.stderr)[-500:]


def one_config(args, n: int, routing: str | None, key: str, model: str, pool,
               chunk_rate: str | None = None) -> dict:
    flags = ["--provider", args.provider, "--max-batch", str(args.max_batch), "--max-queue",
             "1024", "--max-length", str(args.max_length), "--prefill-chunk", "512",
             "--log-level", "info", *args.server_args.split()]
    if n:
        flags += ["--replicas", str(n), "--gpus-per-replica", str(args.gpus_per_replica)]
    if routing:
        flags += ["--routing", routing]
    if chunk_rate:
        flags += ["--stream-chunk-rate", chunk_rate]
    log = args.out.parent / f"{args.out.stem}-{key}.log"
    server = Server(args.model_dir, flags, log, "plain")
    streams = args.streams_per_replica * max(n, 1) if args.streams_per_replica else args.streams
    out: dict = {"replicas": n, "routing": routing, "streams": streams, "cmd": server.cmd,
                 "log": str(log)}
    try:
        out.update(wait_replicas(server, n, args.ready_timeout))
        print(f"[r{n}] ready in {out['ready_s']} s", file=sys.stderr, flush=True)
        from openai import OpenAI

        with OpenAI(base_url=f"{server.base}/v1", api_key="x", max_retries=0,
                    timeout=120) as c:
            r = c.chat.completions.create(model=model, messages=PARIS_Q, temperature=0,
                                          max_tokens=32)
            out["greedy"] = r.choices[0].message.content
        pool.starmap(_client_part, [(server.base, model, list(range(1000 + k, 1000 + streams,
                                                                     args.clients)), 8, 0.0)
                                    for k in range(args.clients)])
        runs = []
        if n:  # replicas report every second: the warm-up's last counts first
            time.sleep(2.5)
        counted = ray_counters(server.base) if n else None
        with GpuSampler() as gpus:
            for k in range(args.repeats):
                before = tokens_by_replica(server.base) if n > 1 else {}
                hist0 = histograms(server.base)
                runs.append(load(pool, server.base, model, streams, args.clients,
                                 args.max_tokens, offset=k * streams))
                if n:  # replicas report every second
                    time.sleep(1.5)
                if n > 1:
                    after = tokens_by_replica(server.base)
                    runs[-1]["tokens_by_replica"] = {k: after[k] - before.get(k, 0.0)
                                                     for k in after}
                # the engines' own TTFT and queue time beside the clients' TTFT: what the
                # route, HAProxy/Ray and HTTP add is the difference
                runs[-1]["server_latency"] = histogram_delta(hist0, histograms(server.base))
                print(f"[r{n}] {streams} streams: {runs[-1]['tok_s']} tok/s",
                      file=sys.stderr, flush=True)
        best = max(runs, key=lambda x: x["tok_s"])
        out.update({"best": best, "median": repeated(runs), "all_tok_s": [x["tok_s"] for x in runs],
                    "gpus": gpus.peak, "cpu_top": gpus.cpu_top()})
        if n:  # replicas report every second: let the last timed run's counts arrive
            time.sleep(2.5)
            out["crossings"] = crossings(counted, ray_counters(server.base))
        out["health_after"] = json.loads(http_get(f"{server.base}/health", 5)[1] or "{}")
    finally:
        out["exit_code"] = server.stop()
        if n:
            out["ray_stop"] = ray_stop()
        out["gpu_processes_after"] = _nvidia_smi("--query-compute-apps=pid,used_memory")
    return out


def inprocess_one_gpu(args, counts: list[int]) -> dict:
    """The server's engine on one GPU without HTTP (`serve_e2e.inprocess_engine` in a child
    process) at `counts` streams, `--repeats` runs each, the servers' own flags."""
    flags = ["--provider", args.provider, "--max-batch", str(max(counts + [args.max_batch])),
             "--max-length", str(args.max_length), "--prefill-chunk", "512",
             *[f for f in args.server_args.split()
               if f not in ("--engine-process", "--no-engine-process")]]
    while "--ray-ingress" in flags:  # a Ray flag: the engine does not take it
        i = flags.index("--ray-ingress")
        del flags[i:i + 2]
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(inprocess_engine, (str(args.model_dir), flags, counts,
                                             args.max_tokens, args.repeats))


def ceiling(inproc: dict | None, streams: int) -> dict | None:
    """Two GPUs at `streams` in all can do at most 2 x T(streams/2) against one GPU's
    T(streams) (T: the in-process engine's median tok/s): the strong-scaling bound of
    `--streams` over two replicas, whatever the serving path."""
    half, whole = (inproc or {}).get(str(streams // 2)), (inproc or {}).get(str(streams))
    if not isinstance(half, dict) or not isinstance(whole, dict):
        return None
    t_half, t_whole = half["median_tok_s"], whole["median_tok_s"]
    return {"streams": streams, "one_gpu_half_tok_s": t_half, "one_gpu_tok_s": t_whole,
            "two_gpu_ceiling_vs_one": round(2 * t_half / t_whole, 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", type=Path, required=True)
    ap.add_argument("--gguf", type=Path, default=None)
    ap.add_argument("--target", default="cuda")
    ap.add_argument("--precision", default="fp16")
    ap.add_argument("--provider", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--replicas", default="1,2,0",
                    help="replica counts in order, each N, N:ROUTING (--routing of the "
                    "server: prefix, least-loaded) or N:ROUTING:RATE (also --stream-chunk-rate "
                    "RATE); 0 = the single process, no Ray")
    ap.add_argument("--gpus-per-replica", type=float, default=1)
    ap.add_argument("--streams", type=int, default=64,
                    help="concurrent streams of every config (strong scaling)")
    ap.add_argument("--streams-per-replica", type=int, default=0,
                    help="K > 0: a config of N replicas gets K x N streams (the plain process "
                         "K): weak scaling, every replica at the load one replica meets alone")
    ap.add_argument("--inprocess-streams", default="",
                    help="e.g. 32,64: before the servers, the server's engine on one GPU "
                         "without HTTP at these stream counts (serve_e2e's inprocess stage); "
                         "with --streams S it gives the strong-scaling ceiling of two GPUs, "
                         "2 x T(S/2) / T(S)")
    ap.add_argument("--clients", type=int, default=4, help="client processes")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--ready-timeout", type=float, default=240)
    ap.add_argument("--server-args", default="", help="extra server flags, space separated")
    args = ap.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rep = Report(args.out)
    rep.data["args"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    rep.stage("environment", environment)
    if rep.stage("model", prepare_model, args) is None:
        return 1
    from serve.model_dir import load_model_info

    model = load_model_info(args.model_dir).name
    if args.inprocess_streams:
        counts = sorted({int(x) for x in args.inprocess_streams.split(",") if x})
        rep.stage("inprocess", inprocess_one_gpu, args, counts)
        rep.data["strong_scaling_ceiling"] = ceiling(rep.data.get("inprocess"), args.streams)
        print(json.dumps(rep.data["strong_scaling_ceiling"]), file=sys.stderr, flush=True)
    results: dict = {}
    with multiprocessing.get_context("spawn").Pool(args.clients) as pool:
        for x in (x for x in args.replicas.split(",") if x):
            n, _, routing = x.partition(":")
            routing, _, rate = routing.partition(":")
            key = f"replicas_{n}" + (f"_{routing}" if routing else "") + (f"_rate{rate}" if rate else "")
            results[key] = (int(n), routing or None,
                            rep.stage(key, one_config, args, int(n), routing or None, key, model,
                                      pool, rate or None))

    def tok_s(r):
        return (r or {}).get("best", {}).get("tok_s")

    def median(r):
        return (r or {}).get("median", {}).get("median_tok_s")

    def one_replica(routing, figure):
        """One replica with the same routing, else any one replica."""
        ones = [figure(r1) for n1, ro1, r1 in results.values() if n1 == 1 and figure(r1)]
        same = [figure(r1) for n1, ro1, r1 in results.values()
                if n1 == 1 and ro1 == routing and figure(r1)]
        return (same or ones or [None])[0]

    scale = {}
    for key, (_n, routing, r) in results.items():
        base, mbase = one_replica(routing, tok_s), one_replica(routing, median)
        scale[key] = {"streams": (r or {}).get("streams"), "tok_s": tok_s(r),
                      "vs_1_replica": round(tok_s(r) / base, 2) if base and tok_s(r) else None,
                      "median_tok_s": median(r),
                      "spread": (r or {}).get("median", {}).get("spread"),
                      "median_vs_1_replica": round(median(r) / mbase, 2)
                      if mbase and median(r) else None}
    rep.data["scale"] = scale
    rep.save()
    print(json.dumps(rep.data["scale"], indent=1))
    return 0 if all(r and "best" in r for _, _, r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
