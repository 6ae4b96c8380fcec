"""Batch-1 decode of several 1B exports, interleaved in one process: ratios that survive a
shared machine's slow spells.

    python -m bench.decode_ab [--rounds 8] [--steps 12] [--prompt 128] [--threads 2] \
        NAME=llorch:DIR NAME=genai:DIR NAME=llamacpp:FILE.gguf ...

Each engine is loaded once (llorch: `serve.runtime.open_runtime` with `--w8a8 off`, the
batch-1 decode graph `llorch serve` runs; GenAI: `onnxruntime_genai` with these threads;
llama.cpp: `llama-cpp-python`'s generator, greedy),
prefills the same `--prompt` random token ids, then the engines take turns, `--steps` greedy
decode steps each (`--gap` seconds idle before each turn, so the previous engine's spinning
pool threads are asleep), for `--rounds` rounds, starting each round one engine further along. A slow
spell then hits every engine about equally, and the per-engine medians compare. STREAM triad
bandwidth is measured before and after (bench.bandwidth; the better one is the limit's);
weight bytes per token come from the export's files (bench.weight_bytes).

Prints a markdown table: weight bytes / token, limit tok/s, median decode tok/s, % of limit,
ratio to the first engine; and the JSON of every round.

Caveat (2026-12-01, bench/results/2026-12-01-cpu2-1b-kv-ab.md): at 1B the engine loaded first
into the process decodes 14-23% slower than the same export loaded later (cause not found; not
the triad; not seen at 135M). List a throw-away engine first, e.g. the same export under a
second name, and compare the others.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np


class LlorchDecoder:
    def __init__(self, model_dir: Path, threads: int, max_length: int) -> None:
        from serve.runtime import RuntimeOptions, open_runtime

        self.rt = open_runtime(model_dir, RuntimeOptions(max_batch=1, max_length=max_length,
                                                          threads=threads, w8a8="off"))

    def start(self, ids: list[int]) -> None:
        self.next = int(np.argmax(self.rt.prefill(0, ids)))

    def step(self) -> None:
        self.next = int(np.argmax(self.rt.decode([0], [self.next])[0]))


class GenAIDecoder:
    def __init__(self, model_dir: Path, threads: int, max_length: int) -> None:
        from bench.peers.genai import GenAIPeer

        peer = GenAIPeer(model_dir, threads=threads)
        self.og, self.model = peer.og, peer.model
        self.max_length = max_length

    def start(self, ids: list[int]) -> None:
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, max_length=self.max_length,
                                  min_length=self.max_length)
        self.gen = self.og.Generator(self.model, params)
        self.gen.append_tokens(ids)

    def step(self) -> None:
        self.gen.generate_next_token()


class LlamaCppDecoder:
    def __init__(self, gguf: Path, threads: int, max_length: int) -> None:
        from bench.peers.llamacpp import LlamaCppPeer

        self.llm = LlamaCppPeer(gguf, threads=threads, n_ctx=max_length).llm

    def start(self, ids: list[int]) -> None:
        self.llm.reset()
        self.it = self.llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True)
        next(self.it)  # the prefill and the first token

    def step(self) -> None:
        next(self.it)


DECODERS = {"llorch": LlorchDecoder, "genai": GenAIDecoder, "llamacpp": LlamaCppDecoder}


def run(engines: dict[str, tuple[str, Path]], *, rounds: int, steps: int, prompt: int,
        threads: int, gap: float = 0.2) -> dict:
    """{"engines": {name: {"tps": [per round], "median_tps", "weight_bytes"}}, "triad_gbps"}."""
    from bench.bandwidth import measure_bandwidth
    from bench.weight_bytes import weight_bytes

    bw = [measure_bandwidth(threads=threads)["triad_gbps"]]
    max_length = prompt + rounds * steps + 16
    ids = np.random.default_rng(0).integers(100, 40000, prompt).tolist()
    dec = {}
    for name, (kind, path) in engines.items():
        dec[name] = DECODERS[kind](path, threads, max_length)
        dec[name].start(ids)
        dec[name].step()  # warm-up
    names = list(engines)
    tps: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            time.sleep(gap)  # the previous engine's spinning pool threads go to sleep first
            t0 = time.perf_counter()
            for _ in range(steps):
                dec[name].step()
            tps[name].append(steps / (time.perf_counter() - t0))
    bw.append(measure_bandwidth(threads=threads)["triad_gbps"])
    return {"triad_gbps": max(bw), "triad_runs": bw, "engines": {
        n: {"tps": tps[n], "median_tps": statistics.median(tps[n]),
            "weight_bytes": weight_bytes(engines[n][1])["total"], "kind": engines[n][0],
            "path": str(engines[n][1])} for n in names}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.decode_ab", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("engines", nargs="+", metavar="NAME=KIND:DIR")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--gap", type=float, default=0.2,
                   help="seconds idle before each engine's turn (ORT and llama.cpp pool threads "
                   "spin after a call; default 0.2)")
    args = p.parse_args(argv)
    engines = {}
    for spec in args.engines:
        name, rest = spec.split("=", 1)
        kind, path = rest.split(":", 1)
        if kind not in DECODERS:
            p.error(f"{spec}: KIND is one of {', '.join(DECODERS)}")
        engines[name] = (kind, Path(path))
    res = run(engines, rounds=args.rounds, steps=args.steps, prompt=args.prompt,
              threads=args.threads, gap=args.gap)
    bw = res["triad_gbps"]
    first = next(iter(res["engines"].values()))["median_tps"]
    print(f"triad {bw:.1f} GB/s (runs {', '.join(f'{b:.1f}' for b in res['triad_runs'])}); "
          f"{args.rounds} rounds x {args.steps} steps after a {args.prompt}-token prompt")
    print("| engine | weights read / token | limit tok/s | decode tok/s, batch 1 (median) | "
          "% of limit | vs first |")
    print("|---|---|---|---|---|---|")
    for name, e in res["engines"].items():
        limit = bw * 1e9 / e["weight_bytes"]
        print(f"| {name} | {e['weight_bytes'] / 1e6:.0f} MB | {limit:.1f} | "
              f"{e['median_tps']:.1f} | {e['median_tps'] / limit:.0%} | "
              f"{e['median_tps'] / first:.2f}x |")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
