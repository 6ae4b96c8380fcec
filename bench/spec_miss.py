"""`python -m bench.spec_miss [--rounds 2]`: what `--speculative ngram` costs a stream whose
drafts nearly all miss, against a plain default engine (no flags), interleaved in one process
as `bench.spec_ab` does.

The prompts are built to make prompt lookup draft on almost every step and be wrong: a list
of words drawn at random (fixed seed) from 40 common ones, so every bigram of the answer
occurs earlier with some continuation, and the answer is sampled (temperature 1, a fixed
seed per prompt), so it rarely continues the way the earlier occurrence did. Two contexts:
``short`` (prompts of ~100 tokens) and ``long`` (~1000 tokens), `MISS_PROMPTS` each, up to
`MISS_NEW_TOKENS` tokens (EOS ends an answer). Both engines draw the same random numbers
(a seeded request samples what plain decoding samples), so they emit the same tokens where
their logits agree.

Decode rates: tokens after the first over the wall time from the first to the last, summed
over the set, and the same over the process CPU time (every thread), which other work on a
shared machine disturbs less.

``--pad-ab`` adds a plain engine with the attention pad (`--attention-pad`): what the pad
alone costs at these contexts. Run it under the machine's benchmark lock.
"""

from __future__ import annotations

import argparse
import random

from bench.peers.spec import LlorchSpec, interleaved
from bench.spec_prompts import chat_ids

MISS_WORDS = (
    "apple river stone green table window music paper light winter garden bread chair "
    "cloud mountain silver yellow horse market candle forest orange pencil storm bottle "
    "ocean letter bridge rabbit kettle shadow violin island copper lemon tiger ladder "
    "blanket mirror thunder").split()
MISS_PROMPTS = 3
MISS_NEW_TOKENS = 160
# set name -> (kind, prompt tokens)
MISS_SETS = {"words-100": ("words", 100), "prose-100": ("prose", 100),
             "prose-1000": ("prose", 1000)}
_STORIES = ("a lighthouse keeper who finds a message in a bottle",
            "two friends who get lost in a city at night",
            "a cat that wants to learn to swim")


def miss_prompts(tokenizer, kind: str, context: int,
                 count: int = MISS_PROMPTS) -> list[list[int]]:
    """``count`` chat prompts of ``context`` tokens each (chat template included).

    kind ``words``: a request to go on with a list of words drawn at random (seeds 1000 *
    context + i) from `MISS_WORDS`; every bigram of such an answer occurs earlier, followed
    by a random word. kind ``prose``: a slice of the bench corpus (`bench.prompts`, the
    Python docs' prose; slice i) and a request for a short story about something else: the
    story's common n-grams ("of the", ", and") occur in the text with other continuations.

    Returns:
        token id lists of exactly ``context`` tokens (words: the first list that reaches it).
    Raises:
        ValueError: an unknown ``kind``.
    """
    out = []
    for i in range(count):
        if kind == "words":
            rng = random.Random(1000 * context + i)
            words: list[str] = []
            while True:
                msg = ("Continue this list of random words with more of the same words, in a "
                       "random order:\n\n" + " ".join(words))
                ids = chat_ids(tokenizer, msg)
                if len(ids) >= context:
                    break
                words.append(rng.choice(MISS_WORDS))
        elif kind == "prose":
            from bench.prompts import corpus_ids

            corpus = corpus_ids(lambda text: tokenizer.encode(text))
            ask = f"\n\nNow write a short story about {_STORIES[i % len(_STORIES)]}."
            frame = len(chat_ids(tokenizer, ask))
            start = i * context
            ids = chat_ids(tokenizer, tokenizer.decode(corpus[start: start + context - frame])
                           + ask)
        else:
            raise ValueError(f"kind is words or prose, not {kind!r}")
        out.append(ids)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--new-tokens", type=int, default=MISS_NEW_TOKENS)
    ap.add_argument("--pad-ab", action="store_true", help="add a plain --attention-pad engine")
    ap.add_argument("--always", action="store_true",
                    help="add an ngram engine with --no-speculative-adaptive")
    ap.add_argument("--sets", nargs="+", default=list(MISS_SETS), choices=list(MISS_SETS))
    args = ap.parse_args(argv)
    from export.default_model import ensure_default_model
    from serve.tokenizer import Tokenizer

    model = ensure_default_model(variants=("int4",), progress=False)["int4"]
    tok = Tokenizer.from_dir(model)
    sets = {name: miss_prompts(tok, *MISS_SETS[name]) for name in args.sets}
    peers = {"off": LlorchSpec(model, args.threads, False),
             "ngram": LlorchSpec(model, args.threads, True)}
    if args.always:
        peers["ngram-always"] = LlorchSpec(model, args.threads, True, adaptive=False)
    if args.pad_ab:
        peers["off-pad"] = LlorchSpec(model, args.threads, False, attention_pad=True)
    try:
        total = interleaved(peers, sets, args.rounds, args.new_tokens,
                            temperature=args.temperature, seeded=True)
        for s in sets:
            for clock, label in (("wall", f"{s:10s} ({len(sets[s][0])} tokens)"),
                                 ("cpu", f"{'':10s} per CPU second:")):
                off = total["off", s]["tokens"] / total["off", s][clock]
                print(label, "   ".join(
                    f"{k} {total[k, s]['tokens'] / total[k, s][clock]:6.1f} tok/s "
                    f"({total[k, s]['tokens'] / total[k, s][clock] / off:.3f}x)" for k in peers),
                    flush=True)
            for k in peers:
                if k.startswith("ngram"):
                    d, a = total[k, s]["drafted"], total[k, s]["accepted"]
                    print(f"    {k}: {d} drafts, {a} accepted ({a / d if d else 0:.0%}) over "
                          f"{total[k, s]['tokens'] + len(sets[s])} tokens", flush=True)
    finally:
        for p in peers.values():
            p.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
