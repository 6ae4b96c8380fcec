"""TTFT of concurrent short chat streams arriving together, and single-stream decode speed.

    python -m bench.prefill_ttft [--model-dir DIR] [--streams 16] [--tokens 16] [--rounds 3]
        [--threads 2] [--max-batch 16] [--prefill-chunk N] [--out result.json]

In process (`serve.engine.Engine` over `open_runtime`, no HTTP): a warm-up round leaves the
chat template's prefix in idle slots, as on a server that has answered before; then each
round submits ``--streams`` greedy chat requests (different short questions, ~35 tokens) at
once and records each one's time to first token (submission to the first event with a
token) and the round's aggregate tok/s; then one stream of ``--single-tokens`` tokens
alone (decode tok/s after its first token). What the engine's prefill scheduling changes
(`Engine._plan_prefill`): how many steps, and decode steps between them, the last stream
waits for. Run it through the machine's benchmark lock: `flock /work/notes/bench.lock ...`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

QUESTIONS = [
    "What is the capital of France?", "Name three primary colours.",
    "Write a haiku about the sea.", "How many legs does a spider have?",
    "What does a compiler do?", "Give me a synonym for happy.", "Why is the sky blue?",
    "Translate 'good morning' into Spanish.", "What is a prime number?",
    "Who wrote Hamlet?", "How far is the moon?", "What do bees make?",
    "Name a famous painter.", "What is photosynthesis?", "How do magnets work?",
    "What is the boiling point of water?", "Why do cats purr?", "What is an atom?",
    "Name two planets.", "What is jazz?",
]


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


async def _one(engine, request) -> tuple[float | None, int, float]:
    t0 = time.perf_counter()
    first, n = None, 0
    async for event in engine.submit(request):
        if event.error:
            raise RuntimeError(event.error)
        got = sum(len(c.token_ids) for c in event.choices)
        if got and first is None:
            first = time.perf_counter() - t0
        n += got
    return first, n, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", type=Path, default=Path("models/smollm2-135m-instruct-int4"))
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--single-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--prefill-chunk", type=int)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    from serve.engine import CPU_PREFILL_CHUNK, Engine
    from serve.events import GenerationRequest
    from serve.runtime import RuntimeOptions, open_runtime
    from serve.sampling import SamplingParams
    from serve.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(args.model_dir)
    runtime = open_runtime(args.model_dir, RuntimeOptions(max_batch=args.max_batch,
                                                          threads=args.threads,
                                                          max_length=2048))
    engine = Engine(runtime, tok, prefill_chunk=args.prefill_chunk or CPU_PREFILL_CHUNK)
    engine.start()

    def request(q: str, n: int) -> GenerationRequest:
        ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": q}],
                                                 add_generation_prompt=True),
                         add_special_tokens=False)
        return GenerationRequest(tuple(ids), SamplingParams(temperature=0.0, max_tokens=n,
                                                            ignore_eos=True))

    qs = [QUESTIONS[i % len(QUESTIONS)] + (f" ({i})" if i >= len(QUESTIONS) else "")
          for i in range(args.streams)]
    prompt_lengths = [len(request(q, 1).prompt_ids) for q in qs]

    async def burst(k: int):
        reqs = [request(q, args.tokens) for q in qs[k:] + qs[:k]]  # rotate: other slots hit
        t0 = time.perf_counter()
        out = await asyncio.gather(*(_one(engine, r) for r in reqs))
        return out, time.perf_counter() - t0

    async def run():
        await burst(0)  # warm-up: the template's prefix is cached from here on
        rounds = [await burst(k + 1) for k in range(args.rounds)]
        first, n, total = await _one(engine, request("Tell me a long story about a dragon.",
                                                     args.single_tokens))
        return rounds, (n - 1) / (total - first)

    try:
        rounds, single = asyncio.run(run())
    finally:
        engine.stop()
    ttfts = [t * 1e3 for out, _ in rounds for t, _, _ in out]
    result = {
        "model_dir": str(args.model_dir), "streams": args.streams, "tokens": args.tokens,
        "threads": args.threads, "max_batch": args.max_batch,
        "prefill_chunk": engine.prefill_chunk, "rounds": args.rounds,
        "prompt_tokens_mean": statistics.mean(prompt_lengths),
        "ttft_ms_p50": _pct(ttfts, 0.5), "ttft_ms_p95": _pct(ttfts, 0.95),
        "ttft_ms_max": max(ttfts),
        "aggregate_tok_s": [sum(n for _, n, _ in out) / wall for out, wall in rounds],
        "single_stream_decode_tok_s": single,
    }
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
