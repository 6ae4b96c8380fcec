"""What structured outputs cost: grammar compile time, and decode speed constrained vs free.

    python -m bench.structured [MODEL_DIR] [--streams 1,8] [--tokens 128] [--threads 2]
                               [--out bench/results/DATE-MACHINE-structured.json]

- **compile**: a JSON schema of 50 properties (strings with maxLength, bounded integers,
  enums, arrays of enums, a nested object) through `serve.constraints`: grammar text, then
  validation + `LLMatcher` construction (what `check_grammar` runs in the thread pool), cold
  (a new schema each time: the LRU never hits). Median of `--compiles` schemas. Also the
  one-off LLTokenizer build for the model's vocabulary.
- **decode**: `serve.engine.Engine` in process (the server's scheduler, sampler and masking;
  no HTTP), N concurrent requests of `--tokens` greedy tokens with EOS ignored, each on its
  own disjoint corpus prompt (`bench.prompts`), free vs constrained by an array of at least
  50 such objects (so the grammar is never complete before max_tokens and every token is
  masked). Per stream: (tokens − 1) / (last token − first token); the row reports the
  aggregate (sum over streams) and the median stream. Free and constrained runs alternate,
  `--rounds` times, and the medians of the rounds are kept.
- **mask cost**: the constrained run's tokens replayed through a fresh matcher, timing what
  the engine adds per constrained row and step (bitmask fill, mask, consume), in CPU time of
  the calling thread as well as wall time: on a shared machine the decode rows above swing
  by ±25%, and this is the number that says what masking itself costs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections.abc import Sequence
from datetime import date
from pathlib import Path


def schema_50(salt: int = 0) -> dict:
    """A 50-property object schema; `salt` renames one property (a cache miss each time)."""
    props: dict[str, dict] = {}
    for i in range(50):
        name = f"field_{i}" if i else f"field_{salt}_0"
        kind = i % 5
        if kind == 0:
            props[name] = {"type": "string", "maxLength": 24}
        elif kind == 1:
            props[name] = {"type": "integer", "minimum": 0, "maximum": 10_000}
        elif kind == 2:
            props[name] = {"enum": ["red", "green", "blue", "cyan"]}
        elif kind == 3:
            props[name] = {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 4}
        else:
            props[name] = {"type": "object", "properties": {"x": {"type": "number"},
                                                             "ok": {"type": "boolean"}},
                           "required": ["x", "ok"]}
    return {"type": "object", "properties": props, "required": list(props),
            "additionalProperties": False}


def measure_compile(tokenizer, count: int) -> dict:
    """Seconds: LLTokenizer build once, then per schema grammar text and validate+compile."""
    from serve.constraints import compiled, grammar_for_json_schema, ll_tokenizer

    t0 = time.perf_counter()
    ll_tokenizer(tokenizer)
    tok_s = time.perf_counter() - t0
    to_text, build = [], []
    for salt in range(1, count + 1):
        t0 = time.perf_counter()
        grammar = grammar_for_json_schema(schema_50(salt), param="bench")
        t1 = time.perf_counter()
        item = compiled(grammar, tokenizer)
        t2 = time.perf_counter()
        if isinstance(item, str):
            raise RuntimeError(f"the bench schema does not compile: {item}")
        to_text.append(t1 - t0)
        build.append(t2 - t1)
    return {"ll_tokenizer_s": tok_s, "grammar_text_s": statistics.median(to_text),
            "compile_s": statistics.median(build), "compiles": count}


async def _decode_once(engine, prompts: list[list[int]], tokens: int, grammar: str | None
                       ) -> list[tuple[float, list[int]]]:
    """(decode tok/s, token ids) of each of `prompts`, run concurrently."""
    from serve.events import GenerationRequest
    from serve.sampling import SamplingParams

    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)

    async def one(ids: list[int]) -> tuple[float, list[int]]:
        stamps, out = [], []
        async for event in engine.submit(GenerationRequest(tuple(ids), params, grammar=grammar)):
            now = time.perf_counter()
            for c in event.choices:
                stamps.extend(now for _ in c.token_ids)
                out.extend(c.token_ids)
        if len(stamps) < 2 or stamps[-1] <= stamps[0]:
            raise RuntimeError(f"only {len(stamps)} tokens")
        return (len(stamps) - 1) / (stamps[-1] - stamps[0]), out

    return list(await asyncio.gather(*(one(p) for p in prompts)))


def mask_cost(grammar: str, tokenizer, tokens: list[int], vocab: int) -> dict:
    """Per token, ms: fill + mask + consume for one row, CPU time of this thread and wall."""
    import numpy as np

    from serve.constraints import Constraint, fill_bitmasks

    c = Constraint.new(grammar, tokenizer, allow_eos=False)
    logits = np.random.default_rng(0).standard_normal(vocab).astype(np.float32)
    cpu0, wall0 = time.thread_time(), time.perf_counter()
    for t in tokens:
        c.mask(logits, fill_bitmasks([c])[0])
        c.consume(t)
    cpu, wall = time.thread_time() - cpu0, time.perf_counter() - wall0
    return {"mask_cpu_ms": 1000 * cpu / len(tokens), "mask_wall_ms": 1000 * wall / len(tokens)}


def measure_decode(model_dir: Path, streams: Sequence[int], tokens: int, threads: int,
                   rounds: int, prompt_len: int) -> list[dict]:
    from bench.prompts import PromptPool, corpus_ids
    from serve.constraints import grammar_for_json_schema, require_compiled
    from serve.engine import Engine
    from serve.runtime import Runtime
    from serve.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(model_dir)
    pool = PromptPool(corpus_ids(lambda t: tokenizer.encode(t, add_special_tokens=False)))
    grammar = grammar_for_json_schema({"type": "array", "items": schema_50(), "minItems": 50},
                                      param="bench")
    require_compiled(grammar, tokenizer, param="bench")
    rows = []
    for n in streams:
        runtime = Runtime(model_dir, threads=threads, max_batch=n,
                          max_length=prompt_len + tokens + 16)
        engine = Engine(runtime, tokenizer, prefix_cache_tokens=0)
        engine.start()
        try:
            asyncio.run(_decode_once(engine, pool.take_many(prompt_len, n), 8, None))  # warm-up
            runs: dict[str, list[list[float]]] = {"free": [], "constrained": []}
            for _ in range(rounds):
                for name, g in (("free", None), ("constrained", grammar)):
                    results = asyncio.run(_decode_once(engine, pool.take_many(prompt_len, n), tokens, g))
                    runs[name].append([rate for rate, _ in results])
                    if g is not None:
                        generated = results[0][1]
        finally:
            engine.stop()
        row = {"streams": n, "tokens": tokens, "rounds": rounds}
        for name, per_round in runs.items():
            row[f"{name}_aggregate_tok_s"] = statistics.median(sum(r) for r in per_round)
            row[f"{name}_median_stream_tok_s"] = statistics.median(statistics.median(r) for r in per_round)
        row["slowdown"] = 1 - row["constrained_aggregate_tok_s"] / row["free_aggregate_tok_s"]
        row.update(mask_cost(grammar, tokenizer, generated, runtime.info.vocab_size))
        rows.append(row)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.structured", description=__doc__.splitlines()[0])
    p.add_argument("model_dir", nargs="?", type=Path, default=None,
                   help="model directory (default: the default model, int4)")
    p.add_argument("--streams", default="1,8", help="concurrent requests per row (default 1,8)")
    p.add_argument("--tokens", type=int, default=128, help="tokens per request (default 128)")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens (default 128)")
    p.add_argument("--rounds", type=int, default=3, help="free/constrained alternations (default 3)")
    p.add_argument("--compiles", type=int, default=5, help="schemas compiled cold (default 5)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    model_dir = args.model_dir
    if model_dir is None:
        from bench.prepare import default_model_paths

        model_dir = default_model_paths()["int4"]
    from bench.machine import load_average, machine_tag
    from serve.tokenizer import Tokenizer

    result = {"date": date.today().isoformat(), "machine": machine_tag(), "load_average": load_average(),
              "model": str(model_dir),
              "compile": measure_compile(Tokenizer.from_dir(model_dir), args.compiles),
              "decode": measure_decode(model_dir, [int(s) for s in args.streams.split(",")],
                                       args.tokens, args.threads, args.rounds, args.prompt)}
    c = result["compile"]
    print(f"LLTokenizer build: {c['ll_tokenizer_s'] * 1000:.0f} ms; 50-property schema: grammar "
          f"text {c['grammar_text_s'] * 1000:.2f} ms, validate + compile {c['compile_s'] * 1000:.1f} ms "
          f"(median of {c['compiles']}, cold)")
    print("| streams | free tok/s (aggregate / median stream) | constrained | slower by "
          "| mask cost per row and step (CPU / wall) |")
    print("|---|---|---|---|---|")
    for r in result["decode"]:
        print(f"| {r['streams']} | {r['free_aggregate_tok_s']:.1f} / {r['free_median_stream_tok_s']:.1f} "
              f"| {r['constrained_aggregate_tok_s']:.1f} / {r['constrained_median_stream_tok_s']:.1f} "
              f"| {100 * r['slowdown']:.1f}% | {r['mask_cpu_ms']:.3f} / {r['mask_wall_ms']:.3f} ms |")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
