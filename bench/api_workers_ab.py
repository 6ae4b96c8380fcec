"""Single-stream decode over HTTP, one process vs `--api-workers N`, runs paired in time.

    python -m bench.api_workers_ab [--pairs 16] [--prompt 128] [--tokens 128] [--workers 2]

Both servers (`llorch serve` on the int4 default model, `--max-batch 1`, `--threads` as the bench)
stay up; each pair streams one completion (greedy, EOS ignored, a fresh prompt from the bench's
corpus) from the single process, then one from the split server, alternating which goes first,
so a busy spell of a shared machine falls on both. Prints the decode tok/s of every run, the
medians and their ratio (split ÷ single), and the median of the per-pair ratios. The
`llorch-http-int4-api-workers` row of `python -m bench` is the same measurement unpaired.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

from bench.config import BenchConfig
from bench.peers.llorch_http import HTTPPeer, serving
from bench.prompts import build_prompt, corpus_ids
from bench.stats import decode_rate
from serve.tokenizer import Tokenizer

MODEL = Path(os.environ.get("LLORCH_MODELS") or Path(__file__).resolve().parents[1] / "models") \
    / "smollm2-135m-instruct-int4"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", type=Path, default=MODEL)
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    ap.add_argument("--tokens", type=int, default=128, help="tokens generated per run")
    ap.add_argument("--workers", type=int, default=2, help="--api-workers of the split server")
    ap.add_argument("--threads", type=int, default=BenchConfig().threads)
    ap.add_argument("--out", type=Path, default=None, help="also write the figures as JSON")
    args = ap.parse_args()
    tokenizer = Tokenizer.from_dir(args.model_dir)
    ids = corpus_ids(lambda text: tokenizer.encode(text, add_special_tokens=False))
    prompts = [build_prompt(ids, args.prompt, i) for i in range(2 * args.pairs + 2)]
    common = {"max_batch": 1, "max_length": args.prompt + args.tokens + 8, "threads": args.threads}
    rates: dict[str, list[float]] = {"single": [], "split": []}
    with tempfile.TemporaryDirectory() as logs, \
         serving(args.model_dir, log=Path(logs) / "single.log", **common) as single, \
         serving(args.model_dir, log=Path(logs) / "split.log", **common,
                 extra_args=["--api-workers", str(args.workers)]) as split:
        peers = {"single": HTTPPeer(single), "split": HTTPPeer(split)}
        for name, peer in peers.items():  # warm-up
            peer.generate(prompts[-1 if name == "single" else -2], args.tokens)
        for i in range(args.pairs):
            order = ("single", "split") if i % 2 == 0 else ("split", "single")
            for k, name in enumerate(order):
                run = peers[name].generate(prompts[2 * i + k], args.tokens)
                rates[name].append(decode_rate(run.times, run.tokens))
    pairs = [b / a for a, b in zip(rates["single"], rates["split"], strict=True)]
    out = {"prompt_tokens": args.prompt, "new_tokens": args.tokens, "workers": args.workers,
           "threads": args.threads, "single_tok_s": rates["single"], "split_tok_s": rates["split"],
           "single_median": statistics.median(rates["single"]),
           "split_median": statistics.median(rates["split"]),
           "median_pair_ratio": statistics.median(pairs)}
    out["split_over_single"] = out["split_median"] / out["single_median"]
    print(json.dumps(out, indent=1))
    if args.out is not None:
        args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
