"""Speculative decoding by prompt lookup (`--speculative ngram`): drafts from the sequence itself,
verified in one runtime call, accepted so that the output is the one plain decoding gives.

```
 sequence so far (prompt + generated)    ... the cat sat on the mat . the cat ▸ ?
 1. draft   the last n tokens (n = max .. min) found earlier, most recent match first:
            "the cat" at 0 → propose the K tokens after it (at most 3n): "sat on the mat";
            K is the sequence's own (`DraftGate`: x2 after a draft kept whole, /2 after a miss)
 2. verify  runtime.verify(slot, [next_token, d1 .. dK]) → logits [K+1, vocab], one call
 3. accept  for i = 0 .. K: t = sampler.sample(logits[i]); emit t;
            go on while t == d(i+1) (and the choice has not ended); after dK, t is a bonus
 4. roll back  runtime.truncate(slot, start + tokens emitted): the KV holds the emitted
            tokens but the last, as after plain decode steps
```

Why step 3 is exact. Each emitted token is drawn by the choice's own `Sampler` from the logits
after exactly the tokens emitted before it (the drafts it went on with are those tokens), with
the same bias, penalties, temperature, top-k/top-p/min-p, grammar mask and one random draw per
token, in order. So greedy output is plain decoding's wherever the logits are the same, and a
seeded request draws the same numbers. For sampling this is the standard rejection rule of
speculative sampling (Leviathan et al. 2023, Chen et al. 2023) for a draft distribution q that
is a point mass on d: accept d with probability min(1, p(d)/q(d)) = p(d), else sample from the
residual norm(max(0, p - q)) = p with d removed, renormalised. Drawing t ~ p and accepting iff
t == d does both at once: P(t = d) = p(d), and given t != d, t ~ p(. | t != d).

The logits of a K+1-token verify call are those of K+1 one-token decode steps bit for bit
where the runtime runs with the attention pad (`RuntimeOptions.attention_pad`, on by default
with `--speculative`): ORT's CPU GroupQueryAttention otherwise computes a one-query-row call
in a kernel of its own (measured up to 0.5 logit apart on the int4 default model, 4e-5 on its
fp32 export), and a greedy text then equals the plain one only until a near tie flips;
README "Speculative decoding".
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from serve.events import ChoiceOutput, TokenLogprob
from serve.prefix_cache import as_ids
from serve.sampling import Sample
from serve.sequence import Choice

SPECULATIVE_METHODS = ("ngram", "draft")  # draft: serve.draft_model


@dataclass(frozen=True)
class SpeculativeConfig:
    """How to speculate (`ServeOptions` maps its flags onto it; vLLM's names).

    Attributes:
        num_speculative_tokens: drafts per verify call, K >= 1 (prompt lookup with
            ``adaptive``: each sequence's K at its first draft, then its own, 2..12).
        prompt_lookup_max: the longest n-gram looked up, tried first.
        prompt_lookup_min: the shortest n-gram looked up (1 <= min <= max).
        disable_by_batch_size: draft only in steps where at most this many sequences decode
            (each drafting sequence costs a verify call of its own).
        adaptive: a sequence whose recent drafts do not pay for their verify calls stops
            drafting for a while (`DraftGate`), and with prompt lookup each sequence's K
            doubles after a draft accepted whole and halves after a miss; False: it drafts
            K tokens whenever it has a draft.

    Raises:
        ValueError: a value out of range.
    """

    num_speculative_tokens: int = 5
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 2
    disable_by_batch_size: int = 1
    adaptive: bool = True

    def __post_init__(self) -> None:
        if self.num_speculative_tokens < 1:
            raise ValueError(f"--num-speculative-tokens must be >= 1, got "
                             f"{self.num_speculative_tokens}")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ValueError(f"need 1 <= --prompt-lookup-min <= --prompt-lookup-max, got "
                             f"{self.prompt_lookup_min} and {self.prompt_lookup_max}")
        if self.disable_by_batch_size < 1:
            raise ValueError(f"--speculative-disable-by-batch-size must be >= 1, got "
                             f"{self.disable_by_batch_size}")


def propose_ngram(ids: np.ndarray, k: int, min_n: int, max_n: int,
                  per_gram: int | None = None) -> np.ndarray:
    """Prompt-lookup draft: the ``k`` tokens that followed the most recent earlier occurrence
    of the sequence's last n tokens, for the largest n in ``max_n .. min_n`` that occurs.

    Args:
        ids: int64 [length] the sequence so far (prompt + generated).
        k: most tokens to propose.
        min_n, max_n: n-gram sizes to try.
        per_gram: at most ``per_gram * n`` tokens after a match of n tokens (a short match
            predicts a short run; None: ``k``).
    Returns:
        int64 [<= k] the draft (empty: no n-gram of the tail occurs earlier).
    """
    length = ids.shape[0]
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        # match[s]: ids[s : s + n] equals the last n tokens, for every s that leaves at least
        # one token after the window (so never the tail itself)
        match = ids[: length - n] == ids[length - n]
        for j in range(1, n):
            match &= ids[j : length - n + j] == ids[length - n + j]
        hits = np.flatnonzero(match)
        if hits.size:
            s = int(hits[-1]) + n
            return ids[s : s + (k if per_gram is None else min(k, per_gram * n))]
    return ids[:0]


# An n-gram draft runs at most this many tokens per matched token (`propose_ngram`'s
# per_gram): in the replay of `bench.spec_replay`, a bigram's continuation is right for 6
# tokens or more less often than a 4-gram's, and a miss costs the whole call.
DRAFTS_PER_GRAM = 3


# c(n): a verify call over n positions (the next token + n - 1 drafts) in one-token decode
# steps, on the int4 graph at a 300-token context (README "Speculative decoding", the
# verify-cost table); linear between the measured n, and past the last one.
VERIFY_COST: tuple[tuple[int, float], ...] = (
    (1, 1.0), (2, 1.30), (3, 1.50), (4, 1.60), (5, 1.83), (6, 1.92), (7, 2.05), (9, 2.33),
    (13, 2.95))


def verify_cost(n: int) -> float:
    """c(n) of `VERIFY_COST`: what a verify call over ``n`` >= 1 positions costs, in decode
    steps (interpolated linearly; past 13 positions, extrapolated from the last two)."""
    pts = VERIFY_COST
    for (n0, c0), (n1, c1) in zip(pts, pts[1:], strict=False):
        if n <= n1:
            return c0 + (c1 - c0) * (max(n, n0) - n0) / (n1 - n0)
    (n0, c0), (n1, c1) = pts[-2], pts[-1]
    return c1 + (c1 - c0) * (n - n1) / (n1 - n0)


@dataclass
class _GateState:
    gain: float  # running mean of (tokens a verify emitted) / c(its positions)
    backoff: int  # steps to sit out at the next back-off
    skip: int = 0  # steps left to sit out now
    k: int = 0  # with growing K: the sequence's K now (0: the caller's k)


class DraftGate:
    """Adaptive drafting (`SpeculativeConfig.adaptive`): per sequence, whether to draft this
    step and, with ``grow``, how many tokens. Only whether and how much a sequence drafts is
    chosen here, never what it samples, so greedy output and the sampled distribution are
    what they are without it (a step without a draft is a plain decode step, which emits what
    a verify's first position would).

    After each verify the sequence's gain — tokens emitted (accepted drafts + 1) over the
    call's cost in decode steps, c(drafts + 1) of `verify_cost` — enters a running mean
    (weight `ALPHA`, starting from `PRIOR`). When the mean falls below 1, drafting costs more
    than it gives: the sequence sits out its next ``backoff`` steps (`FIRST_BACKOFF`, doubled
    at each further back-off up to `MAX_BACKOFF`, back to `FIRST_BACKOFF` once a verify
    leaves the mean at 1 or more), then probes with a draft of `PROBE_TOKENS` (a miss costs
    c(2) - 1 = 0.3 of a step, not c(6) - 1 = 0.92); a probe that hits lifts the mean to 1
    at least, and full drafts resume. A stream whose drafts all miss (gain 1 / c(6) = 0.52 at
    K = 5) backs off after 3 verifies and then probes once per 4, 8, 16, 32, 64, 64, ...
    steps.

    ``grow`` (prompt lookup, `Speculator`): each sequence's K starts at the caller's k
    (`--num-speculative-tokens`), doubles after a draft accepted whole, up to `MAX_TOKENS`
    (or k where k is larger), and halves after one that missed, down to `MIN_TOKENS` (or k
    where k is smaller): a sequence copying its input drafts long runs, where a verify of 13
    positions costs 2.95 steps against 1.92 for 6, and one whose drafts miss drafts short.
    Chosen by replaying the plain answers (`bench.spec_replay`: on the input-grounded
    prompts 1.85x -> 2.01x, the open-ended and miss sets no worse; README "Speculative
    decoding").
    """

    PRIOR = 1.5
    ALPHA = 0.25
    FIRST_BACKOFF = 4
    MAX_BACKOFF = 64
    PROBE_TOKENS = 1
    MIN_TOKENS = 2
    MAX_TOKENS = 12

    def __init__(self, grow: bool = False) -> None:
        self.grow = grow
        self._state: dict[Choice, _GateState] = {}

    def allows(self, c: Choice) -> bool:
        """Whether ``c`` may draft this step (call once per step it could draft in: a step it
        sits out counts down its back-off)."""
        st = self._state.get(c)
        if st is None or st.skip == 0:
            return True
        st.skip -= 1
        return False

    def limit(self, c: Choice, k: int) -> int:
        """The most tokens ``c`` may draft now, where the caller's K is ``k``: `PROBE_TOKENS`
        while its mean gain is below 1 (a probe after a back-off); else ``k``, or with
        ``grow`` the sequence's own K (``k`` at its first draft)."""
        st = self._state.get(c)
        if self.grow:
            if st is None:
                st = self._state[c] = _GateState(self.PRIOR, self.FIRST_BACKOFF)
            if st.k == 0:
                st.k = k
            lo, hi = min(k, self.MIN_TOKENS), max(k, self.MAX_TOKENS)
            st.k = min(max(st.k, lo), hi)  # the caller's k may have changed (tests)
            k = st.k
        return min(k, self.PROBE_TOKENS) if st is not None and st.gain < 1.0 else k

    def record(self, c: Choice, drafted: int, accepted: int) -> None:
        """One verify of ``c``: ``drafted`` tokens proposed, the first ``accepted`` kept."""
        st = self._state.get(c)
        if st is None:
            st = self._state[c] = _GateState(self.PRIOR, self.FIRST_BACKOFF)
        probe = st.gain < 1.0
        st.gain += self.ALPHA * ((accepted + 1) / verify_cost(drafted + 1) - st.gain)
        if probe and accepted == drafted > 0:  # the probe hit: full drafts again
            st.gain = max(st.gain, 1.0)
        if st.gain < 1.0:
            st.skip = st.backoff
            st.backoff = min(2 * st.backoff, self.MAX_BACKOFF)
        else:
            st.backoff = self.FIRST_BACKOFF
        if self.grow and st.k:
            st.k = 2 * st.k if accepted == drafted else st.k // 2  # limit() clamps it

    def prune(self) -> None:
        """Forget the sequences that have ended (their slot given back)."""
        for c in [c for c in self._state if c.slot < 0]:
            del self._state[c]

    def clear(self) -> None:
        self._state.clear()


def gate_of(config: SpeculativeConfig, grow: bool = False) -> DraftGate | None:
    """The speculator's `DraftGate` (None: ``config.adaptive`` off); ``grow``: K per sequence
    (`DraftGate`)."""
    return DraftGate(grow) if config.adaptive else None


def gated(gate: DraftGate | None, choices: Sequence[Choice], k: int) -> Iterator[tuple[Choice, int]]:
    """The choices ``gate`` lets draft this step, each with the most tokens it may draft
    (`DraftGate.limit` of ``k``; every choice with ``k`` without a gate). Ended sequences are
    forgotten first (`DraftGate.prune`)."""
    if gate is None:
        yield from ((c, k) for c in choices)
        return
    gate.prune()
    for c in choices:
        if gate.allows(c):
            yield c, gate.limit(c, k)


@dataclass
class Speculator:
    """Picks the drafts of the running choices each step (`verify_choice` checks them)."""

    config: SpeculativeConfig
    gate: DraftGate | None = None

    def __post_init__(self) -> None:
        if self.gate is None:
            self.gate = gate_of(self.config, grow=True)

    def drafts(self, choices: Sequence[Choice], length: Callable[[int], int],
               max_length: int) -> dict[Choice, list[int]]:
        """Drafts for the choices that should speculate this step (those `gate` lets draft).

        Args:
            choices: the running choices (slots >= 0).
            length: tokens a slot holds (`Runtime.length`).
            max_length: tokens a slot may hold.
        Returns:
            choice → its draft (1..K token ids); choices without a draft decode plainly. None
            past ``disable_by_batch_size`` running choices; a draft never asks for more
            tokens than the choice may still emit or its slot may hold.
        """
        cfg = self.config
        if len(choices) > cfg.disable_by_batch_size:
            return {}
        out: dict[Choice, list[int]] = {}
        for c, k in gated(self.gate, choices, cfg.num_speculative_tokens):
            job = c.job
            room = min(job.max_tokens - len(c.generated) - 1,  # the step emits up to k + 1
                       max_length - length(c.slot) - 1,  # verify appends k + 1
                       k)
            if room < 1 or job.cancelled:
                continue
            ids = np.concatenate([job.prompt_arr, as_ids(c.generated)])
            draft = propose_ngram(ids, room, cfg.prompt_lookup_min, cfg.prompt_lookup_max,
                                  DRAFTS_PER_GRAM)
            if draft.size:
                out[c] = draft.tolist()
        return out

    def record(self, c: Choice, drafted: int, accepted: int) -> None:
        """What ``c``'s verify did with its draft (`DraftGate.record`)."""
        if self.gate is not None:
            self.gate.record(c, drafted, accepted)

    def trim_idle(self, idle: Iterable[tuple[int, np.ndarray]]) -> None:
        """Nothing to do: prompt lookup keeps no state per slot (`DraftModelSpeculator` does)."""

    def clear(self) -> None:
        """Forget every sequence's drafting record."""
        if self.gate is not None:
            self.gate.clear()


@dataclass(frozen=True)
class Verified:
    """What one verify call gave a choice: its output for the step (every emitted token) and
    how many of its drafts it took."""

    output: ChoiceOutput
    drafted: int
    accepted: int


def verify_choice(runtime, c: Choice, draft: Sequence[int], *,
                  constrain: Callable[[Choice, np.ndarray], np.ndarray],
                  eos_ids: Collection[int], max_length: int, batched: bool = False) -> Verified:
    """Feed ``c.next_token`` and ``draft`` to ``c``'s slot in one `verify` call, emit tokens as
    the module docstring says, and roll the slot back to what it holds after them.

    Args:
        runtime: has ``verify(slot, ids)`` (`serve.runtime.shared_kv.HostRuntime`).
        c: a running choice (slot >= 0, its next token sampled and not yet fed).
        draft: the proposed tokens after ``c.next_token``.
        constrain: the choice's grammar mask over one logits row (identity without one).
        eos_ids, max_length: as `Choice.accept` takes them.
        batched: verify on the graph of a two-row decode step (the engine pads lone decodes).
    Returns:
        `Verified`; the choice may have ended (its output's finish_reason): the caller
        releases its slot.
    Raises:
        whatever the runtime or the choice's constraint raises (the slot's state is then
        unknown: fail the request).
    """
    start = runtime.length(c.slot)
    logits = runtime.verify(c.slot, [c.next_token, *draft], batched=batched)
    outs: list[ChoiceOutput] = []
    accepted = 0
    for i in range(len(draft) + 1):
        sample = draw(c, constrain(c, logits[i]), draft[i] if i < len(draft) else None)
        out = c.accept(sample, eos_ids=eos_ids, max_length=max_length)
        outs.append(out)
        hit = i < len(draft) and sample.token == draft[i]
        accepted += hit
        if out.finish_reason is not None or not hit:
            break
    runtime.truncate(c.slot, start + len(outs))
    return Verified(merge_outputs(outs), len(draft), accepted)


def draw(c: Choice, row: np.ndarray, proposed: int | None) -> Sample:
    """The token emitted at one position: the choice's own draw from ``row``, whatever was
    ``proposed`` there (the module docstring says why that is the rejection rule; the
    statistical test replaces this function to show that a wrong rule is caught)."""
    return c.sampler.sample(row, c.generated)


def merge_outputs(outs: Sequence[ChoiceOutput]) -> ChoiceOutput:
    """One choice's consecutive outputs as one: texts, tokens and logprobs joined, the last
    one's ending."""
    if len(outs) == 1:
        return outs[0]
    logprobs: tuple[TokenLogprob, ...] | None = None
    if any(o.logprobs is not None for o in outs):
        logprobs = tuple(lp for o in outs for lp in (o.logprobs or ()))
    last = outs[-1]
    return ChoiceOutput(last.index, "".join(o.text for o in outs),
                        tuple(t for o in outs for t in o.token_ids), logprobs,
                        last.finish_reason, last.stop_sequence)
