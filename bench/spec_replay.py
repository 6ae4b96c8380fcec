"""`python -m bench.spec_replay [--refresh]`: drafting policies for `--speculative ngram`
scored offline, against the answers plain decoding gives, with the verify-cost table.

Speculation never changes what a stream emits (greedy: plain decoding's tokens; seeded
sampling: the same draws), so how a drafting policy would fare is a replay: walk the plain
answer token by token; at each step the policy (behind the `DraftGate`, as the engine runs
it) proposes a draft from prompt + the answer so far; a draft token is accepted iff it equals
the answer's next token, and the step emits the accepted drafts + 1 (or 1 token without a
draft). Cost: a step with d drafts is a verify call over d + 1 positions, c(d + 1) decode
steps (`serve.speculative.verify_cost`); one without is 1. Expected speedup of a set = its
tokens after each answer's first / the steps' costs, summed over the set (`bench.spec_ab`
weighs tokens the same way). An estimate: it leaves out the Python work per step and the
cost table's dependence on the context length.

The answers: every prompt of `bench.spec_prompts` (grounded, open; greedy) and of
`bench.spec_miss` (words-100, prose-100, prose-1000; temperature 1, seed = prompt index),
`SPEC_NEW_TOKENS` tokens at most, decoded ONCE by a plain engine with the attention pad (what
a speculative engine emits) on the default int4 model and cached in
``bench/.cache/spec_replay-<model digest>.json`` (``--refresh`` decodes them again).
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from serve.speculative import DRAFTS_PER_GRAM, DraftGate, propose_ngram, verify_cost

CACHE = Path(__file__).parent / ".cache"


def answers(model_dir: Path, *, refresh: bool = False, threads: int = 2) -> dict[str, list[dict]]:
    """Per set name: ``[{"prompt": ids, "answer": ids}, ...]``, the plain answers (EOS
    included where one ended the answer), from the cache or decoded now (a minute or two)."""
    meta = json.loads((model_dir / "llorch.json").read_text())
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:12]
    path = CACHE / f"spec_replay-{digest}.json"
    if path.is_file() and not refresh:
        return json.loads(path.read_text())
    from bench.peers.spec import SPEC_NEW_TOKENS, LlorchSpec, prompt_sets
    from bench.spec_miss import MISS_SETS, miss_prompts
    from serve.events import GenerationRequest
    from serve.sampling import SamplingParams
    from serve.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(model_dir)
    sets = {name: (ids, 0.0) for name, ids in prompt_sets(model_dir, quick=False).items()}
    sets |= {name: (miss_prompts(tok, *MISS_SETS[name]), 1.0) for name in MISS_SETS}
    plain = LlorchSpec(model_dir, threads, False, attention_pad=True)

    async def decode(ids: list[int], temperature: float, seed: int) -> list[int]:
        params = SamplingParams(max_tokens=SPEC_NEW_TOKENS, temperature=temperature, seed=seed)
        out: list[int] = []
        async for event in plain.engine.submit(GenerationRequest(tuple(ids), params)):
            if event.error:
                raise RuntimeError(f"engine error: {event.error}")
            out += [t for c in event.choices for t in c.token_ids]
        return out

    try:
        got = {name: [{"prompt": ids, "answer": plain.loop.run_until_complete(decode(ids, temp, i))}
                      for i, ids in enumerate(prompts)]
               for name, (prompts, temp) in sets.items()}
    finally:
        plain.close()
    CACHE.mkdir(exist_ok=True)
    path.write_text(json.dumps(got))
    return got


@dataclass
class Policy:
    """One drafting policy: what it proposes (``propose(ids int64 [length], most tokens) ->
    int64 [<= most]``), how many tokens it asks for (``k``: ``k0``, then ``grow(k, drafted,
    accepted)`` after each verify), behind which gate (``gate()``: a fresh `DraftGate` per
    answer, whose ``limit`` has the last word; None: no gate)."""

    name: str
    propose: Callable[[np.ndarray, int], np.ndarray]
    k0: int = 5
    grow: Callable[[int, int, int], int] | None = None
    gate: Callable[[], DraftGate] | None = DraftGate
    k: int = field(init=False, default=0)

    def reset(self) -> None:
        self.k = self.k0

    def on_verify(self, drafted: int, accepted: int) -> None:
        if self.grow is not None:
            self.k = self.grow(self.k, drafted, accepted)


class _Seq:
    slot = 0  # a running sequence, for DraftGate.prune


@dataclass
class Score:
    tokens: int = 0  # emitted after each answer's first
    cost: float = 0.0  # decode steps
    drafted: int = 0
    accepted: int = 0
    verifies: int = 0

    def add(self, o: Score) -> None:
        for f in ("tokens", "cost", "drafted", "accepted", "verifies"):
            setattr(self, f, getattr(self, f) + getattr(o, f))

    @property
    def speedup(self) -> float:
        return self.tokens / self.cost if self.cost else 1.0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


def replay(policy: Policy, prompt: Sequence[int], answer: Sequence[int],
           max_tokens: int = 160) -> Score:
    """One answer through ``policy`` as `serve.speculative.Speculator.drafts` and
    `verify_choice` would run it (batch 1): the gate's allows/limit, room =
    min(max_tokens - generated - 1, k), draft, accept the leading tokens equal to the answer's."""
    policy.reset()
    gate = policy.gate() if policy.gate is not None else None
    seq = _Seq()
    ids = np.asarray([*prompt, *answer], dtype=np.int64)
    p, n = len(prompt), len(answer)
    g = 1  # the first token comes from prefill
    s = Score()
    while g < n:
        draft = ids[:0]
        if gate is None or gate.allows(seq):
            k = policy.k if gate is None else gate.limit(seq, policy.k)
            room = min(max_tokens - g - 1, k)
            if room >= 1:
                draft = policy.propose(ids[: p + g], room)
        if draft.size:
            truth = ids[p + g: p + g + draft.size]
            hits = draft[: truth.size] == truth
            a = int(np.argmin(hits)) if not hits.all() else int(truth.size)
            emitted = min(a + 1, n - g)
            s.cost += verify_cost(draft.size + 1)
            s.drafted += int(draft.size)
            s.accepted += a
            s.verifies += 1
            if gate is not None:
                gate.record(seq, int(draft.size), a)
            policy.on_verify(int(draft.size), a)
        else:
            emitted = 1
            s.cost += 1.0
        g += emitted
        s.tokens += emitted
    return s


def score(policy: Policy, data: dict[str, list[dict]]) -> dict[str, Score]:
    out = {}
    for name, items in data.items():
        total = Score()
        for it in items:
            total.add(replay(policy, it["prompt"], it["answer"]))
        out[name] = total
    return out


# -- drafters ---------------------------------------------------------------------------------

def ngram(min_n: int, max_n: int) -> Callable[[np.ndarray, int], np.ndarray]:
    """Today's lookup: n = max_n .. min_n, the most recent occurrence."""
    return lambda ids, k: propose_ngram(ids, k, min_n, max_n)


def longest_match(ids: np.ndarray, min_n: int, cap: int = 64) -> tuple[int, int]:
    """The earlier occurrence sharing the longest suffix with ``ids`` (the most recent of
    those): (position of the token after it, suffix length); (-1, 0) below ``min_n``."""
    length = ids.shape[0]
    ends = np.arange(1, length, dtype=np.int64)  # e: the token after a match is ids[e]
    ends = ends[ids[ends - 1] == ids[length - 1]]
    m = 0
    while ends.size:
        m += 1
        if m == cap or m == length - 1:
            break
        nxt = ends[ends - m - 1 >= 0]
        nxt = nxt[ids[nxt - m - 1] == ids[length - m - 1]]
        if not nxt.size:
            break
        ends = nxt
    if m < min_n or not ends.size:
        return -1, 0
    return int(ends[-1]), m


def longest(min_n: int, extra: Callable[[int], int] | None = None):
    """The occurrence with the longest match (n grows past 4 while one still matches);
    ``extra(m)``: the most tokens to draft after a match of m (None: k)."""
    def propose(ids: np.ndarray, k: int) -> np.ndarray:
        e, m = longest_match(ids, min_n)
        if e < 0:
            return ids[:0]
        kk = k if extra is None else min(k, extra(m))
        return ids[e: e + kk]
    return propose


def hf_grow(k_min: int, k_max: int, up: int = 2, down: int = 1):
    """transformers' assistant heuristic: +up after a fully accepted draft, -down otherwise."""
    return lambda k, d, a: min(k + up, k_max) if a == d else max(k - down, k_min)


def mult_grow(k_min: int, k_max: int):
    """x2 after a fully accepted draft, /2 otherwise (what `DraftGate` ``grow`` does)."""
    return lambda k, d, a: min(2 * k, k_max) if a == d else max(k // 2, k_min)


def capped(min_n: int, max_n: int, per_gram: int):
    """Today's lookup, at most ``per_gram`` * n tokens after an n-gram match."""
    return lambda ids, k: propose_ngram(ids, k, min_n, max_n, per_gram)


def policies() -> list[Policy]:
    """What was tried (README "Speculative decoding" has the numbers): today's lookup
    (K = 5, n 4..2, the most recent occurrence, the back-off gate) and its variants; the
    last one is what `serve.speculative.Speculator` runs now."""
    out = [Policy("K5 n4..2 (before)", ngram(2, 4)),
           Policy("K5 n4..2 no gate", ngram(2, 4), gate=None)]
    out += [Policy(f"K{k} n4..2", ngram(2, 4), k0=k) for k in (3, 8, 12, 16)]
    out += [Policy("K5 n4 only", ngram(4, 4)), Policy("K5 n3..2", ngram(2, 3)),
            Policy("K5 n4..3", ngram(3, 4)), Policy("K5 longest match", longest(2)),
            Policy("K12 longest, <= 3m", longest(2, lambda m: 3 * m), k0=12)]
    for k0, kmax in ((5, 8), (5, 12), (5, 16), (8, 16)):
        for up, down in ((2, 1), (2, 2)):
            out.append(Policy(f"+{up}/-{down} K {k0}..{kmax} n4..2", ngram(2, 4), k0=k0,
                              grow=hf_grow(1, kmax, up, down)))
    out.append(Policy("+2/-1 K 5..16 longest, <= 3m", longest(2, lambda m: 3 * m), k0=5,
                      grow=hf_grow(1, 16)))
    for k0, kmin, kmax in ((5, 1, 12), (5, 2, 10), (5, 2, 12), (5, 2, 16), (5, 3, 12),
                           (8, 2, 12), (12, 2, 12)):
        out.append(Policy(f"x2//2 K {k0}, {kmin}..{kmax} n4..2", ngram(2, 4), k0=k0,
                          grow=mult_grow(kmin, kmax)))
    out.append(Policy("x2//2 K 5, 2..12 longest, <= 3m", longest(2, lambda m: 3 * m), k0=5,
                      grow=mult_grow(2, 12)))
    out.append(Policy("x2//2 K 5, 2..12 n4..2, <= 3n", capped(2, 4, 3), k0=5,
                      grow=mult_grow(2, 12)))
    out.append(Policy("shipped (DraftGate grow, <= 3n)", capped(2, 4, DRAFTS_PER_GRAM), k0=5,
                      gate=lambda: DraftGate(grow=True)))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--refresh", action="store_true", help="decode the answers again")
    ap.add_argument("--model-dir", type=Path, default=None)
    ap.add_argument("--only", default=None, help="policies whose name contains this")
    args = ap.parse_args(argv)
    model = args.model_dir
    if model is None:
        from export.default_model import ensure_default_model

        model = ensure_default_model(variants=("int4",), progress=False)["int4"]
    data = answers(model, refresh=args.refresh)
    names = list(data)
    print(f"{'policy (speedup, acceptance, drafts)':40s}" + "".join(f"{n:>22s}" for n in names))
    for pol in policies():
        if args.only and args.only not in pol.name:
            continue
        sc = score(pol, data)
        print(f"{pol.name:40s}" + "".join(
            f"{sc[n].speedup:8.3f}x {100 * sc[n].acceptance:4.0f}% {sc[n].drafted:5d}" for n in names),
            flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
