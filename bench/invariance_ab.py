"""What batch invariance by default costs (issue 15, part 2): the engine as `llorch serve` runs
it (no HTTP), one stream and 16 concurrent streams, three configurations interleaved in one
process so that a shared machine's slow spells hit each about equally.

    python -m bench.invariance_ab [--rounds 5] [--new 64] [--prompt 64] [--streams 16] \
        [--threads 2] [--gap 0.5] [--out FILE.json]

  before   the int4 export as llorch made it before (`--down-proj-accuracy-level 0`, built once
           into bench/.cache by bench.prepare), serve's defaults: a lone sequence decodes on
           the int4 graph, batches on the W8A8 graph — not batch-invariant
  default  the default int4 export (down_proj at accuracy level 4), serve's defaults: every
           step on its row-invariant W8A8 graph — batch-invariant
  off      the default int4 export with `--no-batch-invariant` (a lone decode on the int4 graph)

Per round and configuration: one greedy stream (`--prompt` random token ids, `--new` tokens,
`ignore_eos`), decode tok/s = (tokens − 1) / (time of the last token − time of the first);
then `--streams` such requests submitted together, aggregate tok/s = all their tokens / wall
time from submission to the last token. Each round starts one configuration further along and
waits `--gap` seconds before each turn (the previous engine's spinning ORT threads go idle).
Prints medians, the ratio of each to `before`, and whether each configuration gave every
stream the same tokens alone and in the batch (greedy).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

import numpy as np


def _engine(model_dir: Path, threads: int, slots: int, max_length: int,
            batch_invariant: bool | None):
    from serve.engine import Engine
    from serve.runtime import RuntimeOptions, open_runtime
    from serve.tokenizer import Tokenizer

    rt = open_runtime(model_dir, RuntimeOptions(threads=threads, max_batch=slots,
                                                max_length=max_length, w8a8="auto",
                                                batch_invariant=batch_invariant))
    engine = Engine(rt, Tokenizer.from_dir(model_dir), prefix_cache_tokens=0,
                    batch_invariant=batch_invariant)
    engine.start()
    return engine


async def _stream(engine, ids: list[int], new: int) -> tuple[list[float], list[int]]:
    from serve.events import GenerationRequest
    from serve.sampling import SamplingParams

    params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    times, out = [], []
    async for event in engine.submit(GenerationRequest(tuple(ids), params)):
        if event.error:
            raise RuntimeError(event.error)
        for c in event.choices:
            for t in c.token_ids:
                times.append(time.perf_counter())
                out.append(t)
    return times, out


async def _turn(engine, prompts: list[list[int]], new: int) -> dict:
    times, alone = await _stream(engine, prompts[0], new)
    single = (len(times) - 1) / (times[-1] - times[0])
    t0 = time.perf_counter()
    runs = await asyncio.gather(*(_stream(engine, p, new) for p in prompts))
    wall = max(t[-1] for t, _ in runs) - t0
    return {"single_tok_s": single, "aggregate_tok_s": sum(len(o) for _, o in runs) / wall,
            "same_alone_and_batched": runs[0][1] == alone}


def run(dirs: dict[str, tuple[Path, bool | None]], *, rounds: int, new: int, prompt: int,
        streams: int, threads: int, gap: float) -> dict:
    rng = np.random.default_rng(0)
    prompts = [[int(t) for t in rng.integers(200, 40000, prompt)] for _ in range(streams)]
    engines = {name: _engine(d, threads, streams, prompt + new + 8, bi)
               for name, (d, bi) in dirs.items()}
    names = list(engines)
    per: dict[str, list[dict]] = {n: [] for n in names}
    loop = asyncio.new_event_loop()
    try:
        for name in names:  # warm-up turn each
            loop.run_until_complete(_turn(engines[name], prompts[:2], 8))
        for r in range(rounds):
            for k in range(len(names)):
                name = names[(r + k) % len(names)]
                time.sleep(gap)
                per[name].append(loop.run_until_complete(_turn(engines[name], prompts, new)))
    finally:
        for e in engines.values():
            e.stop()
        loop.close()
    summary = {}
    for name, rows in per.items():
        summary[name] = {
            "single_tok_s": statistics.median(x["single_tok_s"] for x in rows),
            "aggregate_tok_s": statistics.median(x["aggregate_tok_s"] for x in rows),
            "same_alone_and_batched": all(x["same_alone_and_batched"] for x in rows),
        }
    base = summary[names[0]]
    for s in summary.values():
        s["single_over_before"] = s["single_tok_s"] / base["single_tok_s"]
        s["aggregate_over_before"] = s["aggregate_tok_s"] / base["aggregate_tok_s"]
    return {"summary": summary, "rounds": per,
            "config": {"rounds": rounds, "new": new, "prompt": prompt, "streams": streams,
                       "threads": threads, "gap": gap}}


def main(argv: list[str] | None = None) -> int:
    from bench.prepare import default_model_paths, ensure_int4_down_proj_level0

    p = argparse.ArgumentParser(prog="python -m bench.invariance_ab", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--gap", type=float, default=0.5)
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    paths = default_model_paths()
    before, _ = ensure_int4_down_proj_level0(paths["hf"])
    dirs = {"before": (before, None), "default": (paths["int4"], None),
            "off": (paths["int4"], False)}
    res = run(dirs, rounds=a.rounds, new=a.new, prompt=a.prompt, streams=a.streams,
              threads=a.threads, gap=a.gap)
    print(f"| configuration | 1 stream tok/s | ÷ before | {a.streams} streams tok/s | ÷ before "
          f"| same tokens alone and batched |")
    print("|---|---|---|---|---|---|")
    for name, s in res["summary"].items():
        print(f"| {name} | {s['single_tok_s']:.1f} | {s['single_over_before']:.2f} | "
              f"{s['aggregate_tok_s']:.1f} | {s['aggregate_over_before']:.2f} | "
              f"{'yes' if s['same_alone_and_batched'] else 'no'} |")
    if a.out:
        a.out.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
