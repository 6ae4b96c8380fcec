"""Aggregate HTTP tok/s at N concurrent chat streams against BASE, and the CPU seconds each
process under SERVER_PID (the server's whole process tree: Ray's proxy, ingress, HAProxy,
replicas) spent during the timed runs: what the data path between client and engine costs.

    python bench/ray_ingress_paths.py BASE SERVER_PID [streams=8] [max_tokens=64] [repeats=3]

Prints one JSON line (`bench/results/2026-11-30-cpu-ray-ingress-paths.json` holds two rounds
of the plain server, `--replicas 1` and `--replicas 1 --ray-ingress haproxy`).
"""
import json
import os
import sys
import threading
import time
from collections import defaultdict

import httpx

base, root = sys.argv[1], int(sys.argv[2])
streams = int(sys.argv[3]) if len(sys.argv) > 3 else 8
max_tokens = int(sys.argv[4]) if len(sys.argv) > 4 else 64
repeats = int(sys.argv[5]) if len(sys.argv) > 5 else 3
TICK = os.sysconf("SC_CLK_TCK")


def tree(pid):
    kids = defaultdict(list)
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                ppid = int(open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[1])
                kids[ppid].append(int(p))
            except OSError:
                pass
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += kids[p]
    return out


def cpu():
    usage = defaultdict(float)
    for p in tree(root):
        try:
            stat = open(f"/proc/{p}/stat").read()
            name = open(f"/proc/{p}/cmdline").read().split("\0")[0]
            if name.startswith("ray::"):
                name = name.split(":")[-1] if "ServeReplica" in name else name
            name = os.path.basename(name.split()[0])[:40]
            f = stat.rsplit(")", 1)[1].split()
            usage[name] += (int(f[11]) + int(f[12])) / TICK
        except (OSError, IndexError):
            pass
    return usage


def one(k, out):
    body = {"model": "smollm2-135m-instruct", "max_tokens": max_tokens, "ignore_eos": True,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": f"Count from {k} to a thousand, slowly."}]}
    t0 = time.monotonic()
    first, tokens = None, 0
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=300) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                d = json.loads(line[6:])
                if first is None and d.get("choices"):
                    first = time.monotonic() - t0
                if d.get("usage"):
                    tokens = d["usage"]["completion_tokens"]
    out[k] = (t0, time.monotonic(), first, tokens)


def run(n, mt):
    out = {}
    ts = [threading.Thread(target=one, args=(k, out)) for k in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    start = min(v[0] for v in out.values())
    end = max(v[1] for v in out.values())
    toks = sum(v[3] for v in out.values())
    ttft = sorted(v[2] for v in out.values())
    return toks / (end - start), toks, ttft[len(ttft) // 2]


run(streams, 8)  # warm-up
results = []
before = cpu()
t0 = time.monotonic()
for _ in range(repeats):
    results.append(run(streams, max_tokens))
wall = time.monotonic() - t0
after = cpu()
tokens = sum(r[1] for r in results)
delta = {k: round(after[k] - before.get(k, 0.0), 2) for k in after if after[k] - before.get(k, 0.0) > 0.005}
print(json.dumps({"base": base, "streams": streams, "max_tokens": max_tokens,
                  "tok_s_runs": [round(r[0], 1) for r in results],
                  "ttft_p50_s": [round(r[2], 3) for r in results],
                  "tokens": tokens, "wall_s": round(wall, 1),
                  "cpu_s_by_process": dict(sorted(delta.items(), key=lambda kv: -kv[1])),
                  "cpu_ms_per_token_total": round(1000 * sum(delta.values()) / tokens, 2)}))
