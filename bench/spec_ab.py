"""`python -m bench.spec_ab [--rounds 2] [--model-dir DIR] [--draft-dir DIR]`: llorch batch-1
decode with and without speculation, interleaved in one process so both meet the same
machine load.

The prompts of `bench/spec_prompts.py` (6 input-grounded, 3 open-ended) go alternately through
a plain engine and a speculative one (serve's defaults: `--speculative ngram`, or with
``--draft-dir`` `--speculative draft --draft-model DIR`), the order alternating per prompt and
round; each set's tok/s = its tokens after the first / the time from first to last token,
summed. Run it under the machine's benchmark lock; ~5 min at 2 rounds on 2 cores.

``--draft-dir`` with ``--model-dir`` the default model's fp32 export and ``--draft-dir`` its
int4 export is the pairing README "Speculative decoding" measures; ``--spin`` lets ORT's
threads spin with a draft model too (`serve.main.DRAFT_SPIN`), ``--plain-no-spin`` adds a
plain engine whose threads do not spin, ``--quick`` takes 2 prompts a set, ``--pad-ab`` adds a
plain engine with the attention pad (what the pad costs plain decoding) and a speculative one
without it (speculation before the pad).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.peers.spec import SPEC_NEW_TOKENS, LlorchSpec, interleaved, prompt_sets


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model-dir", type=Path, default=None,
                    help="the target export (default: the default model's int4)")
    ap.add_argument("--draft-dir", type=Path, default=None,
                    help="--speculative draft with this export as the draft model")
    ap.add_argument("--spin", action="store_true", help="ORT threads spin with a draft model")
    ap.add_argument("--plain-no-spin", action="store_true",
                    help="a third engine: plain decoding with ORT's spinning off")
    ap.add_argument("--quick", action="store_true", help="2 prompts a set")
    ap.add_argument("--pad-ab", action="store_true",
                    help="add off-pad (plain, attention pad on) and <mode>-no-pad engines")
    ap.add_argument("--new-tokens", type=int, default=SPEC_NEW_TOKENS)
    args = ap.parse_args(argv)
    model = args.model_dir
    if model is None:
        from export.default_model import ensure_default_model

        model = ensure_default_model(variants=("int4",), progress=False)["int4"]
    if args.spin:
        import serve.main

        serve.main.DRAFT_SPIN = True
    sets = prompt_sets(model, quick=args.quick)
    mode = "draft" if args.draft_dir else "ngram"
    peers = {"off": LlorchSpec(model, args.threads, False),
             mode: LlorchSpec(model, args.threads, True, args.draft_dir)}
    if args.plain_no_spin:
        peers["off-no-spin"] = LlorchSpec(model, args.threads, False, spin=False)
    if args.pad_ab:
        peers["off-pad"] = LlorchSpec(model, args.threads, False, attention_pad=True)
        peers[f"{mode}-no-pad"] = LlorchSpec(model, args.threads, True, args.draft_dir,
                                             attention_pad=False)
    try:
        total = interleaved(peers, sets, args.rounds, args.new_tokens)
        for s in sets:
            off = total["off", s]["tokens"] / total["off", s]["wall"]
            print(f"{s:9s}", "   ".join(
                f"{k} {total[k, s]['tokens'] / total[k, s]['wall']:6.1f} tok/s "
                f"({total[k, s]['tokens'] / total[k, s]['wall'] / off:.2f}x)" for k in peers))
        print("drafts:", {k: p.extra() for k, p in peers.items() if k.startswith(mode)})
    finally:
        for p in peers.values():
            p.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
