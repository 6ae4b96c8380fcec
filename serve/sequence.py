"""A request inside the engine thread (`Job`) and its choices (`Choice`): what each sampled
token goes through ([Constraint mask →] Sampler → [Constraint] → IncrementalDetokenizer →
StopMatcher) and when a choice ends.

Only the engine thread touches these (but `Job.cancelled`, a flag the event loop sets).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Collection

import numpy as np

from serve.constraints import Constraint
from serve.detokenizer import IncrementalDetokenizer
from serve.events import ChoiceOutput, Event, GenerationRequest, RequestStats, TokenLogprob
from serve.prefix_cache import as_ids
from serve.sampling import Sample, Sampler, finite_scores, token_logprobs
from serve.stops import StopMatcher


class Job:
    """One request: its prompt, its choices and where they stand, its timings."""

    def __init__(self, request: GenerationRequest, send: Callable[[Event], None], max_tokens: int):
        self.request = request
        self.prompt = list(request.prompt_ids)
        self.prompt_arr = as_ids(self.prompt)
        self.send = send
        self.max_tokens = max_tokens
        self.pending = deque(range(request.params.n))  # choices not yet on a slot
        self.slotted: list[Choice] = []  # every choice given a slot (freed ones have slot -1)
        self.running: list[Choice] = []  # choices past prefill
        self.group: list[Choice] = []  # choices whose prompt is being prefilled
        self.fed = 0  # prompt tokens in group[0].slot's KV
        self.prompt_logits: np.ndarray | None = None  # kept while choices are pending
        self.prompt_logprobs: list[TokenLogprob | None] | None = None
        self.prompt_logprobs_sent = False
        self.completion_tokens = 0
        self.cached_tokens = 0  # prompt tokens its first placement reused
        self.finished = 0
        self.finish_reasons: list[str] = []
        self.cancelled = False  # set from the event loop
        self.admitted = False  # has had a slot
        self.ended = False
        self.t_submit = time.monotonic()
        self.t_admit: float | None = None
        self.t_first: float | None = None

    @property
    def done(self) -> bool:
        return self.finished == self.request.params.n

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.request.prompt_logprobs is not None and not self.prompt_logprobs_sent

    def stats(self, outcome: str) -> RequestStats:
        now = time.monotonic()
        t0 = self.t_submit
        return RequestStats(
            request_id=self.request.request_id, outcome=outcome, prompt_tokens=len(self.prompt),
            cached_tokens=self.cached_tokens, completion_tokens=self.completion_tokens,
            queued=(self.t_admit or now) - t0, ttft=None if self.t_first is None else self.t_first - t0,
            duration=now - t0, finish_reasons=tuple(self.finish_reasons), admitted=self.admitted)


class Choice:
    """One sequence: a choice of a request, on one KV slot (-1 before and after)."""

    __slots__ = ("job", "index", "slot", "sampler", "constraint", "detok", "stops", "generated",
                 "next_token", "t_last", "special_text", "held_logprobs")

    def __init__(self, job: Job, index: int, tokenizer) -> None:
        params = job.request.params
        self.job, self.index, self.slot = job, index, -1
        self.sampler = Sampler(params, prompt_ids=job.prompt, seed_offset=index,
                               eos_ids=tokenizer.eos_ids)
        grammar = job.request.grammar
        self.constraint = (None if grammar is None else
                           Constraint.new(grammar, tokenizer, allow_eos=not params.ignore_eos))
        if self.constraint is not None and job.request.grammar_prefix:
            self.constraint.consume_prefix(job.request.grammar_prefix)
        self.detok = IncrementalDetokenizer(tokenizer, prompt_ids=job.prompt,
                                            skip_special_tokens=params.skip_special_tokens)
        self.stops = StopMatcher(params.stop, include_stop=params.include_stop_str_in_output)
        # Special tokens the detokenizer skips still count for stop strings (hidden text).
        self.special_text = tokenizer.token_text if params.stop and params.skip_special_tokens else None
        self.generated: list[int] = []
        self.next_token = -1  # sampled, not yet fed to the model
        self.t_last = 0.0  # when its latest token came
        # Logprobs of tokens whose text the stop matcher still holds back: (where the token's
        # text starts in the matcher's input, its logprob); see `_logprobs`.
        self.held_logprobs: list[tuple[int, TokenLogprob]] = []

    def held_ids(self, length: int) -> np.ndarray:
        """The first `length` ids of its sequence (prompt, then generated): what its KV holds."""
        prompt = self.job.prompt_arr
        if length <= len(prompt):
            return prompt[:length]
        return np.concatenate([prompt, as_ids(self.generated[: length - len(prompt)])])

    def accept(self, sample: Sample, *, eos_ids: Collection[int], max_length: int) -> ChoiceOutput:
        """Record a sampled token; the output has a finish_reason when the choice has ended.

        vLLM's extensions: the token that ends the choice (EOS, one of ``stop_token_ids``) adds
        its text only with ``include_stop_str_in_output`` (which keeps a stop string too,
        `StopMatcher`), and a special token's only with ``skip_special_tokens`` false;
        stop strings count only in text of the tokens past ``min_tokens`` (the sampler keeps
        EOS and ``stop_token_ids`` out until then; a complete grammar still ends the choice).
        """
        job, params, token = self.job, self.job.request.params, int(sample.token)
        self.generated.append(token)
        self.next_token = token
        job.completion_tokens += 1
        if params.logprobs is not None and sample.logprob is not None:
            top = tuple((int(i), float(p)) for i, p in (sample.top or ()))
            self.held_logprobs.append((self.stops.fed, TokenLogprob(token, float(sample.logprob), top)))
        eos = token in eos_ids and not params.ignore_eos
        # vLLM's stop_token_ids: the choice stops on one
        stop_id = not eos and token in params.stop_token_ids
        complete = False  # the grammar allows nothing more (an EOS would be all it takes)
        if self.constraint is not None:
            self.constraint.consume(token)
            complete = self.constraint.done
        counted = len(self.generated) > params.min_tokens  # may this token's text end a stop
        ends = eos or stop_id
        piece = "" if ends and not params.include_stop_str_in_output else self.detok.add(token)
        text, stopped = self.stops.feed(piece, match=counted)
        if not (ends or stopped) and self.special_text is not None and token in self.detok.skipped_ids:
            hidden, stopped = self.stops.feed(self.special_text(token), visible=False, match=counted)
            text += hidden
        finish = None
        if stopped or eos or complete or stop_id:
            finish = "stop"
        elif len(self.generated) >= job.max_tokens or len(job.prompt) + len(self.generated) >= max_length:
            finish = "length"
        if finish is None:
            return ChoiceOutput(self.index, text, (token,), self._logprobs())
        out = self.end(finish, text, stopped=stopped)
        return ChoiceOutput(self.index, out.text, (token,), out.logprobs, out.finish_reason, out.stop_sequence)

    def _logprobs(self, *, final: bool = False) -> tuple[TokenLogprob, ...] | None:
        """The held logprobs whose tokens' text is now settled as output, in token order; None
        without `logprobs`.

        A token's logprob goes out with its text, not before: while a possible stop string
        holds the text back, so does its logprob, and a token whose text starts at or after
        where a matched stop cuts the output is dropped with it (`{"stop": [" in P"]}` used to
        report ' in' and ' Python' in `logprobs.content` of a message ending before them).
        `final`: the choice has ended without a stop; everything held is settled (an EOS adds
        no text, so its logprob would otherwise wait for text that never comes).
        """
        if self.job.request.params.logprobs is None:
            return None
        kept = self.stops.fed + 1 if final else self.stops.kept
        n = 0
        while n < len(self.held_logprobs) and self.held_logprobs[n][0] < kept:
            n += 1
        out = tuple(lp for _, lp in self.held_logprobs[:n])
        self.held_logprobs = [] if self.stops.stopped else self.held_logprobs[n:]
        return out

    def end(self, reason: str, text: str = "", *, stopped: bool = False) -> ChoiceOutput:
        """The choice ends: release the text held back (it may still complete a stop string)."""
        if not stopped:
            counted = len(self.generated) > self.job.request.params.min_tokens
            tail, stopped = self.stops.feed(self.detok.flush(), match=counted)
            text += tail
            if stopped:
                reason = "stop"
            else:
                text += self.stops.flush()
        self.job.finished += 1
        self.job.finish_reasons.append(reason)
        return ChoiceOutput(self.index, text, logprobs=self._logprobs(final=not self.stops.stopped), finish_reason=reason,
                            stop_sequence=self.stops.matched)


def prompt_logprob(logits: np.ndarray, token: int, k: int) -> TokenLogprob:
    """Log-softmax of the raw logits at `token` (+ the top k), for prompt tokens; computed
    in float64 (`serve.sampling.token_logprobs`)."""
    logits = logits.astype(np.float64, copy=False)
    if not np.isfinite(logits.max()):  # NaN / inf from the model: see sampling.finite_scores
        logits = finite_scores(logits)
    return TokenLogprob(int(token), *token_logprobs(logits, token, k))
