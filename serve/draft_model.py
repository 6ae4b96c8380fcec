"""Draft-model speculative decoding (`--speculative draft --draft-model DIR`): a smaller export
of the target's vocabulary proposes the next K tokens greedily, on a runtime of its own (one KV
slot per target slot, same index); the target checks them with `serve.speculative.verify_choice`
exactly as it checks prompt-lookup drafts.

```
 target slot s holds  prompt + generated[:-1]     (generated[-1] = next_token: sampled, not fed)
 draft  slot s holds  `_held[s]`: what it last took in, maybe another sequence's (slot reuse,
                      prefix-cache hits, steps it did not draft in) or a rejected draft's tail
 1. sync    n = common prefix of _held[s] and prompt + generated, at most all but the last
            token: truncate the draft slot to n (the roll-back to the accepted tokens), then
            prefill the tokens it lacks (1 after a rejection, 2 after K hits, a whole prompt
            the first time) → logits → d1 = argmax
 2. draft   d1 .. d(K-1) decoded one token a call, every drafting slot in one call → d2 .. dK
 3. verify  the target: verify_choice (serve.speculative), the acceptance rule unchanged
```

Drafts are the draft model's argmax: a point mass, so the target's rule (each emitted token
is its own sampler's draw; a draft is kept iff that draw equals it) is the exact rejection
rule for sampled rows too, and a seeded request draws the same numbers as without
speculation. The draft's full distribution q would allow Leviathan's min(1, p/q) rule with
drafts sampled from q (more accepted drafts at high temperature) at the price of other random
draws than plain decoding's; not done.

When the engine gives a slot back, every idle draft slot is cut to the tokens it shares with
what the target slot keeps for the prefix cache (`trim_idle`): an idle draft slot holds no
other sequence's tokens and no more than its target slot, and a prefix-cache hit in the
same slot finds the draft's KV of that prefix in place too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterable, Sequence
from pathlib import Path

import numpy as np

from serve.model_dir import ModelDirError, load_model_info
from serve.prefix_cache import as_ids, common_prefix
from serve.sequence import Choice
from serve.speculative import SpeculativeConfig, gate_of, gated

log = logging.getLogger("serve.draft_model")

_EMPTY = np.zeros(0, np.int64)
# Tokens per draft prefill call when the draft slot catches up on a whole prompt.
DRAFT_PREFILL_CHUNK = 256
# Up to this many tokens to catch up on go through `verify` (the decode graph), not prefill.
SHORT_CATCH_UP = 8


def check_draft_model(target_dir: Path | str, draft_dir: Path | str) -> None:
    """Refuse a draft export whose tokens are not the target's: the same token → id map in
    tokenizer.json (added tokens included) and the same logits width (genai_config.json
    ``model.vocab_size``). Reads JSON files only (the tokenizers library parses them).

    Raises:
        ModelDirError: a directory or file is missing or unreadable, or the vocabularies
            differ; the message names both files and the first difference.
    """
    from tokenizers import Tokenizer as HFTokenizer  # a leaf dependency of serve already

    target_dir, draft_dir = Path(target_dir), Path(draft_dir)
    t_info, d_info = load_model_info(target_dir), load_model_info(draft_dir)
    if t_info.vocab_size != d_info.vocab_size:
        raise ModelDirError(
            f"--draft-model {draft_dir}: its logits cover {d_info.vocab_size} tokens, the target "
            f"{target_dir}'s {t_info.vocab_size} (genai_config.json model.vocab_size); a draft "
            "model must share the target's tokenizer and vocabulary")
    vocabs = []
    for d in (target_dir, draft_dir):
        path = d / "tokenizer.json"
        try:
            vocabs.append(HFTokenizer.from_file(str(path)).get_vocab(with_added_tokens=True))
        except Exception as exc:  # tokenizers raises a bare Exception for bad files
            raise ModelDirError(f"{path}: not a readable tokenizer.json ({exc})") from None
    target, draft = vocabs
    if target != draft:
        differ = sorted(t for t in set(target) | set(draft) if target.get(t) != draft.get(t))
        sample = ", ".join(f"{t!r}: {target.get(t)} vs {draft.get(t)}" for t in differ[:3])
        raise ModelDirError(
            f"--draft-model {draft_dir / 'tokenizer.json'} has another vocabulary than the target's "
            f"{target_dir / 'tokenizer.json'} ({len(target)} vs {len(draft)} tokens, {len(differ)} "
            f"differ, e.g. {sample}); a draft model must share the target's tokenizer")


class DraftModelSpeculator:
    """Drafts of the running choices from a draft model's runtime (module docstring).

    Args:
        config: K (``num_speculative_tokens``) and ``disable_by_batch_size``; the
            prompt-lookup fields are unused.
        draft: the draft model's `serve.runtime.Runtime`, with at least as many slots as the
            target and slots at least as long.
        eos_ids: token ids that end a sequence: a draft stops after one.
        n_slots: the target's slots (the draft's first ``n_slots`` are used; default all).
    """

    def __init__(self, config: SpeculativeConfig, draft, eos_ids: Collection[int] = (),
                 n_slots: int | None = None) -> None:
        self.config = config
        self.draft = draft
        self.eos_ids = frozenset(eos_ids)
        self._held: list[np.ndarray] = [_EMPTY] * (draft.n_slots if n_slots is None else n_slots)
        self.gate = gate_of(config)
        verify = getattr(draft, "verify", None)
        self._verify = verify if callable(verify) else None

    def drafts(self, choices: Sequence[Choice], length: Callable[[int], int],
               max_length: int) -> dict[Choice, list[int]]:
        """Drafts for the choices that should speculate this step (as
        `serve.speculative.Speculator.drafts`: 1..K tokens each, none past
        ``disable_by_batch_size`` running choices, never more than the choice may still emit
        or its slot may hold). A choice whose draft-model call fails decodes plainly (logged;
        its draft slot is emptied)."""
        cfg = self.config
        if len(choices) > cfg.disable_by_batch_size:
            return {}
        todo: dict[Choice, int] = {}
        for c, k in gated(self.gate, choices, cfg.num_speculative_tokens):
            room = min(c.job.max_tokens - len(c.generated) - 1,  # the step emits up to k + 1
                       max_length - length(c.slot) - 1,  # verify appends k + 1
                       self.draft.info.max_length - length(c.slot) - 1,
                       k)
            if room >= 1 and not c.job.cancelled:
                todo[c] = room
        out: dict[Choice, list[int]] = {}
        for c in todo:
            first = self._sync(c)
            if first is not None:
                out[c] = [first]
        # d2 .. dK: one decode call over every slot still drafting
        for j in range(1, max(todo.values(), default=0)):
            going = [c for c, d in out.items() if todo[c] > j and d[-1] not in self.eos_ids]
            if not going:
                break
            try:
                logits = self.draft.decode([c.slot for c in going], [out[c][-1] for c in going])
            except Exception:
                log.exception("draft model decode failed; those drafts stop here")
                for c in going:
                    self._forget(c.slot)
                break
            for c, row in zip(going, logits, strict=True):
                self._held[c.slot] = np.append(self._held[c.slot], out[c][-1])
                out[c].append(int(np.argmax(row)))
        return out

    def _sync(self, c: Choice) -> int | None:
        """Bring ``c``'s draft slot to its sequence (prompt + generated) and return the draft
        model's next token (None: the draft runtime failed)."""
        slot = c.slot
        ids = np.concatenate([c.job.prompt_arr, as_ids(c.generated)])
        held = self._held[slot]
        n = min(common_prefix(held, ids), len(ids) - 1, self.draft.length(slot))
        try:
            self.draft.truncate(slot, n)
            if len(ids) - n <= SHORT_CATCH_UP and self._verify is not None:
                # the decode graph (int4): a prefill call of a token or two would take the
                # W8A8 graph, slower below ~8 tokens
                logits = self._verify(slot, ids[n:].tolist())[-1]
            else:
                for start in range(n, len(ids), DRAFT_PREFILL_CHUNK):
                    chunk = ids[start : start + DRAFT_PREFILL_CHUNK].tolist()
                    logits = self.draft.prefill(slot, chunk)
        except Exception:
            log.exception("draft model prefill failed; slot %d decodes without a draft", slot)
            self._forget(slot)
            return None
        self._held[slot] = ids
        return int(np.argmax(logits))

    def _forget(self, slot: int) -> None:
        self._held[slot] = _EMPTY
        try:
            self.draft.reset(slot)
        except Exception:
            log.exception("resetting draft slot %d failed", slot)

    def trim_idle(self, idle: Iterable[tuple[int, np.ndarray]]) -> None:
        """Cut each idle target slot's draft slot to the tokens both hold (``idle``: (slot, the
        ids the target's KV keeps there), `serve.prefix_cache.PrefixCache.idle_ids`): the
        draft keeps no other sequence's tokens and no more than the prefix cache keeps."""
        for slot, ids in idle:
            if slot >= len(self._held):
                continue
            keep = common_prefix(self._held[slot], ids)
            if keep < self.draft.length(slot):
                self.draft.truncate(slot, keep)
                self._held[slot] = self._held[slot][:keep]

    def record(self, c: Choice, drafted: int, accepted: int) -> None:
        """What ``c``'s verify did with its draft (`serve.speculative.DraftGate.record`; the
        gate weighs the verify call only, not the draft model's steps)."""
        if self.gate is not None:
            self.gate.record(c, drafted, accepted)

    def clear(self) -> None:
        """Empty every draft slot (after a failure the target's KV is not trusted either)."""
        if self.gate is not None:
            self.gate.clear()
        for slot in range(len(self._held)):
            self._forget(slot)
