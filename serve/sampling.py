"""Next-token sampling over one logits row, in NumPy.

Per decode step, for each request:

    logits ─► logit_bias ─► repetition_penalty ─► presence/frequency ─► token masks ─┐
       ┌─────────────────────────────────────────────────────────────────────────────┘
       └─┬─ greedy: argmax
         └─ temperature ─► top_k ─► top_p ─► min_p ─► draw

- ``repetition_penalty`` has Hugging Face semantics: over the distinct prompt + generated
  ids, positive logits are divided by it and negative ones multiplied.
- ``presence_penalty`` / ``frequency_penalty`` have OpenAI semantics over generated ids:
  ``logit -= frequency * count + presence * (count > 0)``.
- Token masks are vLLM's: ``allowed_token_ids`` puts every other id at -inf (EOS included,
  unless listed), and ``min_tokens`` puts the ids that would end the choice (EOS unless
  ``ignore_eos``, ``stop_token_ids``) at -inf until that many tokens were generated. Where a
  grammar (below) leaves no token the masks allow, the grammar wins: the row is sampled
  as the grammar masked it (so a complete grammar still ends its choice).
- Greedy (temperature 0, or top_k 1) is an argmax: no softmax over the vocabulary unless
  logprobs were asked for.
- Logprobs are the log-softmax of the raw model logits, before bias, penalties,
  temperature and truncation (vLLM's default, "raw_logprobs"): they describe the model,
  not the sampling settings; they are finite numbers (at least ``LOGPROB_FLOOR``), as JSON
  has no infinities.
- Non-finite scores never reach the draw (``finite_scores``): NaN counts as -inf, +inf (a huge
  logit divided by a tiny ``repetition_penalty``, an fp16 overflow) as the largest float32,
  and a row left with no finite score falls back to the raw logits, then to token 0.
  With a grammar (``serve.constraints``) the engine hands over logits already masked, so,
  as in vLLM (its bitmask is applied before its sampler takes raw logprobs), they are the
  model's distribution renormalised over the tokens the grammar allows. Forbidden tokens
  are left out of the top alternatives, which may then be fewer than asked (as OpenAI
  allows; vLLM lists them at -9999.0).
- Truncation keeps ties: top-k keeps every logit >= the k-th largest (as Hugging Face), top-p
  every probability >= the one at which the descending float64 cumulative sum reaches
  ``top_p``; the draw walks the kept tokens in vocabulary order with float64 sums. That rule
  (``serve.runtime.interface.RowDraw``) is also the device's (``serve.runtime.device_sampling``):
  given the same uniform number, both pick the same token up to float rounding at a boundary,
  and ``Sampler.row_draw`` hands that number over for a runtime to sample on the device.

The vocabulary is ~50k wide and this runs every step, so nothing sorts it: top-k and
top-p use ``np.argpartition`` and sort only the candidates they keep, and the logits row
is only copied when bias or penalties must change it.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from serve.runtime.interface import MAX_DEVICE_LOGPROBS, RowDraw, RowToken

# Below this temperature sampling is argmax (dividing by ~0 only adds overflow risk).
_GREEDY_TEMPERATURE = 1e-5
# The lowest logprob reported (OpenAI's own floor for "impossible" tokens).
LOGPROB_FLOOR = -9999.0


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request (the engine's type; routes build it).

    ``top_k`` <= 0 disables top-k; ``logprobs`` None returns no logprobs, k >= 0 returns
    the chosen token's logprob and the top k alternatives. ``min_tokens``,
    ``allowed_token_ids`` (None: every id), ``include_stop_str_in_output`` and
    ``skip_special_tokens`` are vLLM's (the module docstring, `serve.sequence.Choice`).

    Raises:
        ValueError: a value outside its range (routes validate first, with OpenAI errors).
    """

    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    stop: tuple[str, ...] = ()
    n: int = 1
    logprobs: int | None = None
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()
    min_tokens: int = 0
    allowed_token_ids: tuple[int, ...] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError(f"logprobs must be >= 0, got {self.logprobs}")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        if self.allowed_token_ids is not None and not self.allowed_token_ids:
            raise ValueError("allowed_token_ids must not be empty")

    def ending_ids(self, eos_ids: Collection[int]) -> set[int]:
        """The ids that end a choice: ``stop_token_ids``, and ``eos_ids`` unless ``ignore_eos``
        (what ``min_tokens`` keeps out)."""
        return {*self.stop_token_ids, *(() if self.ignore_eos else eos_ids)}

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_TEMPERATURE or self.top_k == 1


@dataclass(frozen=True)
class Sample:
    """One sampled token; ``logprob``/``top`` are None unless logprobs were requested.

    ``top`` holds (token, logprob) pairs, most likely first.
    """

    token: int
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] | None = None


class Sampler:
    """Samples the tokens of one sequence (one choice of one request).

    Args:
        params: the request's sampling parameters.
        prompt_ids: the prompt, for ``repetition_penalty``.
        seed_offset: added to ``params.seed``, so choice i of n gets seed + i: the choices
            differ, and a fixed seed still reproduces all of them. With no seed, each
            Sampler draws fresh OS entropy.
        eos_ids: the ids that end the choice as EOS (the tokenizer's; ignored with
            ``ignore_eos``), which ``min_tokens`` keeps out, with ``stop_token_ids``.
    """

    def __init__(
        self, params: SamplingParams, *, prompt_ids: Sequence[int] = (), seed_offset: int = 0,
        eos_ids: Collection[int] = (),
    ) -> None:
        self.params = params
        # Modulo 2**64: OpenAI seeds may be negative, NumPy's may not.
        seed = None if params.seed is None else (params.seed + seed_offset) % 2**64
        self._rng = np.random.default_rng(seed)
        self._bias_ids = np.fromiter(params.logit_bias.keys(), dtype=np.int64)
        self._bias_values = np.fromiter(params.logit_bias.values(), dtype=np.float32)
        self._repetition = params.repetition_penalty != 1.0
        self._penalize = params.presence_penalty != 0.0 or params.frequency_penalty != 0.0
        # Distinct prompt + generated ids (repetition), generated counts (presence/frequency);
        # `generated` is append-only, so only its new tail is folded in each step.
        self._seen: dict[int, None] = dict.fromkeys(prompt_ids) if self._repetition else {}
        self._seen_arr: np.ndarray | None = None
        self._counts: dict[int, int] = {}
        self._n_generated = 0
        # vLLM's token masks: the only ids allowed (None: all), and the ids min_tokens keeps
        # out while fewer than params.min_tokens were generated.
        self._allowed = (None if params.allowed_token_ids is None else
                         np.unique(np.fromiter(params.allowed_token_ids, dtype=np.int64)))
        ending = params.ending_ids(eos_ids)
        self._ending = (np.fromiter(sorted(ending), dtype=np.int64, count=len(ending))
                        if params.min_tokens else np.empty(0, np.int64))
        # Greedy with nothing that changes the logits first: the token is the row's first
        # argmax, which the engine finds for a whole step's rows at once (`greedy_tokens`).
        self.plain_greedy: bool = params.greedy and not (
            self._bias_ids.size or self._repetition or self._penalize or self.masks)

    @property
    def masks(self) -> bool:
        """Whether `allowed_token_ids` or `min_tokens` masks some step's row (such rows are
        sampled on the host, where the masks are applied)."""
        return self._allowed is not None or self._ending.size > 0

    def sample(self, logits: np.ndarray, generated: Sequence[int] = ()) -> Sample:
        """Picks the next token.

        Args:
            logits: float [vocab] scores after the last token (not modified).
            generated: every token this sequence generated so far (append-only).

        Raises:
            ValueError: a logit_bias or allowed_token_ids id outside the logits row.
        """
        raw = np.asarray(logits, dtype=np.float32)
        if not np.isfinite(raw.max()):  # NaN propagates through max; -inf entries alone are fine
            raw = finite_scores(raw)
        self._update_history(generated)
        x = self._process(raw, len(generated))
        if x is not raw and not np.isfinite(x.max()):
            x = finite_scores(x, fallback=raw)
        params = self.params
        if params.greedy:
            token = int(np.argmax(x))
        else:
            token = self._draw(x)
        if params.logprobs is None:
            return Sample(token)
        return Sample(token, *token_logprobs(raw, token, params.logprobs))

    def take(self, logits: np.ndarray, token: int) -> Sample:
        """What `sample` returns for a `plain_greedy` sampler whose row's first argmax
        ``token`` is known to be finite (`greedy_tokens`): the token, with its logprobs where
        asked.

        Args:
            logits: float [vocab] scores (not modified).
            token: ``np.argmax(logits)``, with a finite logit.
        """
        k = self.params.logprobs
        if k is None:
            return Sample(token)
        return Sample(token, *token_logprobs(np.asarray(logits, dtype=np.float32), token, k))

    def _update_history(self, generated: Sequence[int]) -> None:
        if not (self._repetition or self._penalize) or len(generated) == self._n_generated:
            return
        if len(generated) < self._n_generated:  # a different sequence: start over
            self._counts.clear()
            self._n_generated = 0
        for t in generated[self._n_generated :]:
            t = int(t)
            self._counts[t] = self._counts.get(t, 0) + 1
            if self._repetition and t not in self._seen:
                self._seen[t] = None
                self._seen_arr = None
        self._n_generated = len(generated)

    def _process(self, raw: np.ndarray, n_generated: int) -> np.ndarray:
        """Logits after bias, penalties and token masks; ``raw`` itself when nothing applies.
        ``n_generated``: tokens generated before this one (for ``min_tokens``)."""
        params = self.params
        ending = self._ending.size > 0 and n_generated < params.min_tokens
        if not (self._bias_ids.size or self._repetition or (self._penalize and self._counts)
                or ending or self._allowed is not None):
            return raw
        x = raw.copy()
        if self._bias_ids.size:
            if self._bias_ids.min() < 0 or self._bias_ids.max() >= x.shape[-1]:
                raise ValueError(f"logit_bias token id out of range [0, {x.shape[-1]})")
            x[self._bias_ids] += self._bias_values
        if self._repetition and self._seen:
            if self._seen_arr is None:
                self._seen_arr = np.fromiter(self._seen, dtype=np.int64, count=len(self._seen))
            ids = self._seen_arr[self._seen_arr < x.shape[-1]]
            v = x[ids]
            p = np.float32(params.repetition_penalty)
            with np.errstate(all="ignore"):  # a tiny p (0 in float32): ±inf or NaN, see finite_scores
                x[ids] = np.where(v > 0, v / p, v * p)
        if self._penalize and self._counts:
            ids = np.fromiter(self._counts.keys(), dtype=np.int64, count=len(self._counts))
            counts = np.fromiter(self._counts.values(), dtype=np.float32, count=len(self._counts))
            keep = ids < x.shape[-1]
            x[ids[keep]] -= (
                params.frequency_penalty * counts[keep] + params.presence_penalty
            ).astype(np.float32)
        if self._allowed is not None:
            if self._allowed[0] < 0 or self._allowed[-1] >= x.shape[-1]:
                raise ValueError(f"allowed_token_ids token id out of range [0, {x.shape[-1]})")
            kept = x[self._allowed]
            x.fill(-np.inf)
            x[self._allowed] = kept
        if ending:
            x[self._ending[self._ending < x.shape[-1]]] = -np.inf
        return x

    def _draw(self, x: np.ndarray) -> int:
        """temperature → top_k → top_p → min_p → one draw from the kept candidates, in
        vocabulary order (the rule `serve.runtime.interface.RowDraw` states, which the
        device graph follows too)."""
        params = self.params
        vocab = x.shape[-1]
        # `ids` are the candidate token ids, ascending (None: the whole vocabulary) and `w`
        # their unnormalised probabilities.
        ids: np.ndarray | None = None
        if 0 < params.top_k < vocab:
            ids = _top_k_ids(x, params.top_k)
            x = x[ids]
        # Temperature only rescales; top-k's choice does not depend on it, so it runs on
        # the (few) candidates only.
        with np.errstate(over="ignore"):  # -huge - huge → -inf → exp 0: harmless
            w = x - x.max()  # a fresh array: the in-place steps below touch no caller data
        if params.temperature != 1.0:
            with np.errstate(over="ignore"):  # -huge / small temperature → -inf → exp 0
                w *= np.float32(1.0 / params.temperature)
        np.exp(w, out=w)
        if params.top_p < 1.0:
            keep = _nucleus(w, params.top_p)
            ids, w = (keep if ids is None else ids[keep]), w[keep]
        if params.min_p > 0.0:
            # Relative to the most likely token, so renormalising after top-p changes nothing.
            keep = np.flatnonzero(w >= np.float32(params.min_p) * w.max())
            ids, w = (keep if ids is None else ids[keep]), w[keep]
        i = _inverse_cdf(w, self._rng.random())
        return int(i if ids is None else ids[i])

    def row_draw(self) -> RowDraw | None:
        """This step's token as a `RowDraw` a runtime can pick on the device, or None where
        only `sample` can (logit_bias, penalties and token masks need the host). A sampled
        (not greedy) draw takes its uniform number from this sampler's generator now, as
        `sample` would."""
        p = self.params
        if (self._bias_ids.size or self._repetition or self._penalize or self.masks
                or (p.logprobs or 0) > MAX_DEVICE_LOGPROBS):
            return None
        if p.greedy:
            return RowDraw(greedy=True, logprobs=p.logprobs)
        return RowDraw(greedy=False, inv_temperature=float(np.float32(1.0 / p.temperature)),
                       top_k=p.top_k, top_p=p.top_p, min_p=p.min_p, u=self._rng.random(),
                       logprobs=p.logprobs)


# Candidate sets are found by partitioning, and cumulative sums are taken block-wise: a
# cumsum (or an argsort) over the whole 50k vocabulary costs more than the rest of a
# sampling step.
_BLOCK = 1024


def _top_indices(x: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest entries of ``x``, in no particular order (ties broken
    arbitrarily; `_top_k_ids` keeps them)."""
    cand = _top_candidates(x, k)
    if cand.size > k:
        cand = cand[np.argpartition(x[cand], cand.size - k)[cand.size - k :]]
    return cand


def _top_candidates(x: np.ndarray, k: int) -> np.ndarray:
    """Ascending indices of a few entries of ``x`` that hold its ``k`` largest and every
    entry equal to the k-th largest (all of them for short rows).

    The k-th largest of a strided subsample is a threshold that at least k entries of
    ``x`` pass (the subsample's own top k do), and only ~stride * k do, so the exact
    selection runs on a short list instead of the whole vocabulary.
    """
    n = x.shape[-1]
    stride = min(16, n // (4 * k))
    if stride < 2:
        return np.arange(n)
    sample = x[::stride]
    threshold = np.partition(sample, sample.size - k)[sample.size - k]
    return np.flatnonzero(x >= threshold)


def _top_k_ids(x: np.ndarray, k: int) -> np.ndarray:
    """Ascending ids of every entry of ``x`` >= its k-th largest: the k largest, and ties
    with the last of them (as Hugging Face's TopKLogitsWarper keeps them)."""
    cand = _top_candidates(x, k)
    vals = x[cand]
    kth = np.partition(vals, vals.size - k)[vals.size - k]
    return cand[vals >= kth]


def _inverse_cdf(w: np.ndarray, u: float) -> int:
    """Index i where the float64 cumulative sum of ``w`` (>= 0, not all 0) first exceeds
    ``u * w.sum()``, for u in [0, 1): always an entry with positive weight."""
    n = w.shape[-1]
    base = 0
    if n > 2 * _BLOCK:
        # The total comes from the same block sums that are searched, so the target is
        # always inside the last block's range and lands on a block with positive mass.
        block_cdf = np.cumsum(np.add.reduceat(w, np.arange(0, n, _BLOCK), dtype=np.float64))
        target = u * block_cdf[-1]
        b = int(np.searchsorted(block_cdf, target, side="right"))
        b = min(b, block_cdf.size - 1)
        if b:
            target -= block_cdf[b - 1]
        base = b * _BLOCK
        w = w[base : base + _BLOCK]
        cdf = np.cumsum(w, dtype=np.float64)
    else:
        cdf = np.cumsum(w, dtype=np.float64)
        target = u * cdf[-1]
    i = int(np.searchsorted(cdf, target, side="right"))
    if i >= w.shape[-1] or w[i] <= 0:  # rounding: step back to the last positive entry
        i = int(np.flatnonzero(w[: min(i, w.shape[-1] - 1) + 1] > 0)[-1])
    return base + i


def _nucleus(w: np.ndarray, top_p: float) -> np.ndarray:
    """Ascending indices of every ``w`` >= the value, in descending order, at which the
    float64 cumulative sum first reaches ``top_p`` of the (float64) total: the smallest
    most-likely set of that mass, and ties with its last value.

    Tries the exact top 64, then the top 1024 (most nuclei are small); only a wider
    nucleus pays for a full sort.
    """
    n = w.shape[-1]
    target = top_p * float(w.sum(dtype=np.float64))
    for k in (64, _BLOCK):
        if k * 4 > n:
            break
        cand = _top_indices(w, k)
        desc = np.sort(w[cand])[::-1]
        j = int(np.searchsorted(np.cumsum(desc, dtype=np.float64), target))
        if j < k:
            if desc[j] == desc[-1]:  # ties with it may lie outside the candidates
                return np.flatnonzero(w >= desc[j])
            return np.sort(cand[w[cand] >= desc[j]])
    desc = np.sort(w)[::-1]
    j = min(int(np.searchsorted(np.cumsum(desc, dtype=np.float64), target)), n - 1)
    return np.flatnonzero(w >= desc[j])


def greedy_tokens(logits: np.ndarray) -> tuple[list[int], list[bool]]:
    """The first argmax of every row of a step's logits, in one NumPy call instead of one a
    row, and whether it is the token `Sampler.sample` picks for a `plain_greedy` sampler.

    Args:
        logits: float [rows, vocab].

    Returns:
        (token ids, per row whether its largest logit is finite): np.argmax takes the first
        NaN where a row has one, so a finite maximum means no NaN and no +inf in the row,
        where `finite_scores` changes nothing and `sample`'s argmax is this one. The other
        rows (NaN, +inf, all -inf) go through `Sampler.sample`.
    """
    tokens = logits.argmax(axis=1)
    ok = np.isfinite(logits[np.arange(tokens.shape[0]), tokens])
    return tokens.tolist(), ok.tolist()


def finite_scores(x: np.ndarray, fallback: np.ndarray | None = None) -> np.ndarray:
    """A scores row safe to softmax: NaN → -inf, +inf → the float32 maximum.

    Args:
        x: float32/float64 [vocab] scores holding NaN or ±inf (not modified).
        fallback: what to use when no entry of ``x`` is finite (the raw logits, when ``x``
            is them after bias and penalties); lacking a finite one, a row where token 0
            wins.

    Returns:
        A new [vocab] array of x's dtype whose max is finite: ``x - x.max()`` and ``exp``
        stay defined, and the +inf entries (now the maximum) share the mass.
    """
    big = np.finfo(np.float32).max
    x = np.nan_to_num(x, nan=-np.inf, posinf=big, neginf=-np.inf)
    if np.isfinite(x.max()):
        return x
    if fallback is not None and np.isfinite(fallback.max()):
        return fallback
    out = np.full_like(x, -np.inf)
    out[0] = 0.0
    return out


def device_sample(row: RowToken) -> Sample:
    """A token a runtime picked (`RowToken`) as a `Sample`: logprobs floored, -inf
    alternatives left out, as `token_logprobs` reports them."""
    if row.logprob is None:
        return Sample(row.token)
    top = tuple((t, floor_logprob(v)) for t, v in row.top or () if v > -np.inf)
    return Sample(row.token, floor_logprob(row.logprob), top)


def floor_logprob(value: float) -> float:
    """A logprob JSON can carry: at least ``LOGPROB_FLOOR`` (-inf and NaN become it)."""
    return value if value >= LOGPROB_FLOOR else LOGPROB_FLOOR


def token_logprobs(raw: np.ndarray, token: int, k: int) -> tuple[float, tuple[tuple[int, float], ...]]:
    """Log-softmax of one row of logits at ``token``, and its top ``k``: the one place
    llorch computes logprobs (sampled tokens here, prompt tokens in ``serve.sequence``).

    Args:
        raw: float32 or float64 [vocab] logits, finite or -inf (``finite_scores``); summed
            in their own dtype.
        token: the chosen token's id.
        k: how many of the most likely tokens to return (0: none).

    Returns:
        (the chosen token's logprob, ((token id, logprob), ...) the top ``k`` most likely
        first, equal ones by token id, -inf entries left out); every logprob at least
        ``LOGPROB_FLOOR``.
    """
    m = raw.max()
    with np.errstate(over="ignore"):  # -huge - huge → -inf → exp 0: harmless
        shifted = raw - m
    # float32 sums are pairwise: accurate to ~1e-7 here, and twice as fast as float64.
    lse = float(m) + float(np.log(np.exp(shifted, out=shifted).sum()))
    chosen = floor_logprob(float(raw[token]) - lse)
    if k == 0:
        return chosen, ()
    vocab = raw.shape[-1]
    top = _top_candidates(raw, k) if k < vocab else np.arange(vocab)  # ties at the k-th too
    top = top[np.lexsort((top, -raw[top]))][:k]  # most likely first; ties: the lower id first
    return chosen, tuple((int(t), floor_logprob(float(raw[t]) - lse)) for t in top if raw[t] > -np.inf)
