"""`python -m bench.spec_ab [--rounds 2] [--model-dir DIR]`: llorch batch-1 decode with and
without `--speculative ngram`, interleaved in one process so both meet the same machine load.

The prompts of `bench/spec_prompts.py` (6 input-grounded, 3 open-ended) go alternately through
a plain engine and a speculative one (serve's defaults), the order alternating per prompt and
round; each set's tok/s = its tokens after the first / the time from first to last token,
summed. Run it under the machine's benchmark lock; ~5 min at 2 rounds on 2 cores.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.peers.spec import SPEC_NEW_TOKENS, LlorchSpec, prompt_sets


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model-dir", type=Path, default=None,
                    help="int4 export (default: the default model's)")
    args = ap.parse_args(argv)
    model = args.model_dir
    if model is None:
        from export.default_model import ensure_default_model

        model = ensure_default_model(variants=("int4",), progress=False)["int4"]
    sets = prompt_sets(model, quick=False)
    peers = {"off": LlorchSpec(model, args.threads, False),
             "ngram": LlorchSpec(model, args.threads, True)}
    try:
        for p in peers.values():
            p.times(sets["grounded"][0], 8)  # warm-up
        total = {(k, s): [0, 0.0] for k in peers for s in sets}
        for rnd in range(args.rounds):
            for s, prompts in sets.items():
                for i, ids in enumerate(prompts):
                    for k in (("off", "ngram") if (rnd + i) % 2 == 0 else ("ngram", "off")):
                        stamps = peers[k].times(ids, SPEC_NEW_TOKENS)
                        if len(stamps) > 1:
                            total[k, s][0] += len(stamps) - 1
                            total[k, s][1] += stamps[-1] - stamps[0]
        for s in sets:
            off, on = (total[k, s][0] / total[k, s][1] for k in ("off", "ngram"))
            print(f"{s:9s} off {off:6.1f} tok/s   ngram {on:6.1f} tok/s   {on / off:.2f}x")
        print("drafts:", peers["ngram"].extra())
    finally:
        for p in peers.values():
            p.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
