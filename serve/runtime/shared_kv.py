"""Runtimes for GroupQueryAttention graphs (llorch exports, ONNX Runtime GenAI's builder).

Every layer has one preallocated KV buffer ``[rows, kv_heads, max_length, head_dim]`` bound as
both past and present through IO binding, so ORT writes new positions in place and nothing is
reallocated per step. A decode step over ``b`` sequences binds the first ``b`` rows: sequences
are moved so that the ones being decoded sit in rows ``0..b-1`` (slot ids stay stable for
callers; rows move).

`SharedKVRuntime` states prefill and decode once, over three hooks a subclass fills in:

    _bind(first_row, rows, decode) -> Call   an IO binding with those KV rows bound in place
    _run(call, ids, mask)                    feed ids [rows, seq] and mask [rows, width], run
    _logits(call) -> [rows, vocab] float32   the logits after each row's last token
    _logits_at(call, positions) -> [rows, vocab] float32
                                             row b's logits at position positions[b] (prefill)
    _logits_value(call) -> OrtValue          the same, [rows, seq, vocab], where ORT left them

`prefill_batch` prefills several empty slots in one call: their rows are moved next to each
other (after the rows the last decode step ran, where the next decode wants them) and every row
is right-padded to the longest, ``S`` tokens, with a mask of ``S`` ones. GroupQueryAttention
takes several multi-token rows only as a first prompt (ORT 1.32 refuses "batch_size must be 1
when sequence_length > 1 and past context is given", and treats every row of a first prompt as
starting at position 0), so only empty slots can share a call. The padding's KV lands after
the real tokens, where causal attention keeps them from seeing it; the slot's length counts the
real tokens only, and the next write overwrites the padding::

    row 0: a a a a a      mask: S ones
    row 1: b b _ _ _      (_ = padding, never read)
             ^ logits of row b at position n_b - 1

With the attention pad (`RuntimeOptions.attention_pad`, host KV only) every call binds the
graph's ``attention_pad`` input to 1: each GroupQueryAttention computes one extra query row
(the last token's, again) and writes its K/V one position past the call's last token — into
the buffers' spare position when the slot is full — where the next call writes first. A
decode step of 2+ sequences cannot take the pad (ORT refuses several query rows per sequence
with past context for 2+ sequences): with ``RuntimeOptions.batch_invariant`` True it runs one
call per sequence, each on its row; else (auto, or False) one unpadded call, so that the
runtime is not batch-invariant then (`decodes_apart`).

`HostRuntime` keeps the KV in host memory (numpy); `serve.runtime.cuda.CudaRuntime` on the GPU.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from serve.model_dir import ModelInfo
from serve.runtime.interface import (
    RowDraw,
    RowToken,
    RuntimeOptions,
    decodes_apart,
    main_row_invariant,
    w8a8_row_invariant,
)
from serve.runtime.kv_memory import KVBuffers
from serve.runtime.session import kv_dtype, open_w8a8_session, resolve_providers, session_options
from serve.runtime.slots import SlotRuntime, with_max_length

log = logging.getLogger("llorch.runtime")


@dataclass
class Call:
    """One cached IO binding: the session it runs and where its logits land.

    ``logits`` is a host buffer ``[rows, 1, vocab]`` when the graph's ``num_logits_to_keep``
    is bound to 1, else None (ORT allocates ``[rows, seq, vocab]`` each run, on
    ``logits_on``: (device type, id)). ``device`` holds the fixed (ids, mask, logits) device
    buffers of a captured CUDA graph.
    """

    io: ort.IOBinding
    session: ort.InferenceSession
    logits: np.ndarray | None = None
    device: tuple[ort.OrtValue, ort.OrtValue, ort.OrtValue] | None = None
    run_options: ort.RunOptions | None = None
    logits_on: tuple[str, int] = ("cpu", 0)


class SharedKVRuntime(SlotRuntime):
    """The main ORT session (and the W8A8 one), slot → row bookkeeping, prefill and decode over
    the `_bind` / `_run` / `_logits` hooks (module docstring)."""

    # With w8a8 "all", decode steps of at least this many sequences take the W8A8 graph: 2 on
    # exports whose W8A8 graph has a one-row kernel of its own (its down_proj at accuracy
    # level 0, before graph.w8a8_row_invariant), so that a lone sequence stays off it; 1 else.
    w8a8_min_rows = 2

    def __init__(self, info: ModelInfo, options: RuntimeOptions, providers: list, *,
                 pin_logits: bool) -> None:
        self.providers = providers
        so = session_options(options.threads, options.spin)
        # llorch exports have an overridable `num_logits_to_keep` (default 0 = every position);
        # binding 1 makes prefill and decode pay the lm_head for the last position only, and
        # `verify` binds 0. (Bound per call rather than pinned with add_initializer, which
        # would take the input out of the graph: measured no slower, 1 thread, 300-token KV.)
        self._pin_logits = pin_logits
        self._keep = {n: ort.OrtValue.ortvalue_from_numpy(np.full(1, n, np.int64)) for n in (0, 1)}
        self.session = ort.InferenceSession(str(info.onnx_file), so, providers=providers)
        self.w8a8, self.w8a8_session = open_w8a8_session(info, options.w8a8, so, providers)
        if options.batch_invariant is not False and w8a8_row_invariant(info.graph, self.w8a8):
            # no op of this W8A8 graph lets a row depend on the others (export.graph.mlp):
            # every step runs on it, so a sequence's tokens never depend on the batch
            self.w8a8_min_rows = 1
            self.batch_invariant = True
        elif (options.batch_invariant is not False and providers[0] == "CPUExecutionProvider"
              and main_row_invariant(info.graph, self.w8a8)):
            # --w8a8 prefill / off on an export whose main graph is row-invariant: every decode
            # step on it, every prefill on one graph (the W8A8 one with "prefill", whose rows
            # are computed apart: graph.w8a8_row_invariant; the main one with "off")
            self.batch_invariant = True
        super().__init__(with_max_length(info, options.max_length, info.max_length),
                         options.max_batch, kv_dtype(self.session, info))
        self._row = list(range(self.n_slots))  # slot -> physical row
        self._decode_rows = 0  # sequences in the last decode step (rows 0 .. it - 1)
        self.rows_swapped = 0  # KV row swaps so far (each copies two rows' tokens)
        self._calls: dict[tuple[int, int, bool], Call] = {}
        self._verify_calls: dict[tuple[int, int], Call] = {}  # (row, rows_like) -> binding
        self._full_mask = False  # decode masks span the whole cache (captured CUDA graphs)
        # RuntimeOptions.attention_pad (set by `HostRuntime`): calls bind attention_pad = 1;
        # with `_apart` (`decodes_apart`), a decode step of 2+ sequences runs one call a
        # sequence
        self.attention_pad = self._apart = False
        self._sampler = None
        if options.device_sampling if options.device_sampling is not None else self.samples_on_device:
            self._open_sampler(info, options, providers)
        # auto: only greedy rows pick on the device (sampled ones sort the vocabulary there)
        self.device_greedy_only = options.device_sampling is None

    # The most padded tokens per real token the engine lets a `prefill_batch` carry before it
    # prefills the rows one call each (None: no limit). On the CPU padding costs what real
    # tokens do: 8 prompts of 30-40 tokens in one call took 0.68-0.85x the time of 8 calls,
    # 8 of 8-60 tokens (2.6 padded tokens per real one) 1.6-1.7x (int4, 2 threads).
    prefill_padding: float | None = 1.25
    # Whether `prefill_batch` gives each row the logits it would get alone (the engine batches
    # prompts only then). Not on a W8A8 prefill graph that is not row-invariant (llorch.json
    # `graph.w8a8_row_invariant`): there a batched call changed greedy answers from their first
    # token (4 of 16 chat prompts on the default int4 export, QA), so CPU prompts are prefilled
    # a call each, several in a step; set in `HostRuntime`.
    batched_prefill = True

    # Where `RuntimeOptions.device_sampling` is None (auto): whether greedy rows' tokens are
    # picked on the device (where the logits would otherwise cross a bus).
    samples_on_device = False

    def _open_sampler(self, info: ModelInfo, options: RuntimeOptions, providers: list) -> None:
        """The token-choice graphs, built and run once now: a provider that cannot run them
        fails here, not mid-request. Asked for (``device_sampling`` True) that is an error;
        by default (auto) a warning, and tokens are picked on the host."""
        from serve.runtime.device_sampling import DeviceSampler  # imports onnx: only here

        where = self.session.get_providers()[0]
        try:
            sampler = DeviceSampler(info.vocab_size, providers, options.threads)
            sampler.check()
        except Exception as exc:
            if options.device_sampling:
                raise
            log.warning("device sampling off: the token-choice graph failed on %s (%s); "
                        "decode tokens are picked on the host", where, exc)
            return
        self._sampler, self.device_sampling = sampler, True
        log.info("device sampling: decode tokens are picked on %s, after the logits", where)

    # -- the hooks ---------------------------------------------------------------------------
    def _bind(self, first_row: int, rows: int, decode: bool) -> Call:
        raise NotImplementedError

    def _run(self, call: Call, ids: np.ndarray, mask: np.ndarray) -> None:
        if call.logits is None:
            call.io.bind_output("logits", *call.logits_on)  # ORT sizes it: [rows, seq, vocab]
        call.io.bind_cpu_input("input_ids", ids)
        call.io.bind_cpu_input("attention_mask", mask)
        call.session.run_with_iobinding(call.io)

    def _logits(self, call: Call) -> np.ndarray:
        if call.logits is not None:
            return call.logits[:, 0].copy()
        out = call.io.get_outputs()[-1].numpy()  # [rows, seq, vocab]
        return np.ascontiguousarray(out[:, -1], dtype=np.float32)

    def _logits_at(self, call: Call, positions: Sequence[int]) -> np.ndarray:
        """float32 ``[rows, vocab]``: row ``b``'s logits at ``positions[b]`` of the output's
        sequence axis (which holds only the kept positions where ``num_logits_to_keep`` is
        bound)."""
        if call.logits is not None:
            return call.logits[np.arange(len(positions)), positions].copy()
        out = call.io.get_outputs()[-1].numpy()  # [rows, seq, vocab]
        return np.ascontiguousarray(out[np.arange(len(positions)), positions], dtype=np.float32)

    def _logits_value(self, call: Call) -> ort.OrtValue:
        if call.logits is not None:
            return ort.OrtValue.ortvalue_from_numpy(call.logits)  # no copy
        return call.io.get_outputs()[-1]

    # -- prefill and decode ------------------------------------------------------------------
    def _call(self, first_row: int, rows: int, decode: bool) -> Call:
        key = (first_row, rows, decode)
        call = self._calls.get(key)
        if call is None:
            call = self._calls[key] = self._bind(first_row, rows, decode)
        return call

    def _session_for(self, rows: int, prefill: bool = False) -> ort.InferenceSession:
        """The W8A8 graph for every prefill (a prompt's KV is then the same whether a prefix
        cache hit leaves one token or a hundred to prefill) and, with w8a8 "all", for decode
        steps of many sequences (where int8 GEMMs win); else the main one."""
        if self.w8a8_session is not None and (
                prefill or self.w8a8 == "all" and rows >= self.w8a8_min_rows):
            return self.w8a8_session
        return self.session

    def prefill(self, slot: int, ids: Sequence[int]) -> np.ndarray:
        """Append ``ids`` to ``slot``'s sequence; float32 logits [vocab] after the last one."""
        n, past = self._begin_prefill(slot, ids)
        call = self._call(self._row[slot], 1, decode=False)
        self._run(call, np.asarray([ids], np.int64), np.ones((1, past + n), np.int64))
        self._lengths[slot] = past + n
        return self._logits_at(call, [0 if call.logits is not None else n - 1])[0]

    def prefill_batch(self, slots: Sequence[int], seqs: Sequence[Sequence[int]], *,
                      decoding: Sequence[int] | None = None) -> np.ndarray:
        """Prefill ``seqs[b]`` into the empty slot ``slots[b]`` for every b, in one ORT call
        (module docstring: rows right-padded to the longest).

        Args:
            slots: distinct slot ids, each holding no tokens (GroupQueryAttention batches
                multi-token rows only from position 0; prefill a slot holding a prefix alone).
            seqs: one or more token ids per slot.
            decoding: the slots the next decode step runs ahead of these (the engine's running
                sequences): the batch's rows go right after as many rows as they are, where
                that step wants them (`_place_rows`). None: after the rows the last decode step
                ran, which is stale once sequences have ended.
        Returns:
            float32 logits ``[len(slots), vocab]``, row ``b`` after the last of ``seqs[b]``.
        Raises:
            ContextFull: one of ``seqs`` is longer than ``info.max_length``; nothing is
                appended.
            ValueError: ``slots`` empty, repeated, of another length than ``seqs`` or holding
                tokens, or an empty ``seqs[b]``; nothing is appended.
        """
        ns = self._check_batch(slots, seqs)
        return self._prefill_rows(slots, seqs, ns,
                                  self._decode_rows if decoding is None else len(decoding))

    def _prefill_rows(self, slots: Sequence[int], seqs: Sequence[Sequence[int]], ns: list[int],
                      ahead: int) -> np.ndarray:
        """`prefill_batch` after its checks (``ns``: each row's token count), the rows placed
        after ``ahead`` rows (`_place_rows`)."""
        first = self._place_rows(slots, ahead)
        if len(slots) == 1:
            return self.prefill(slots[0], seqs[0])[None]
        width = self._batch_width(max(ns))
        b = len(slots)
        tokens = np.zeros((b, width), np.int64)  # padding: token 0, its KV never read
        for j, ids in enumerate(seqs):
            tokens[j, : ns[j]] = ids
        keep = width - min(ns) + 1  # positions that hold some row's last token
        call = self._call(first, b, decode=False) if keep == 1 else self._prefill_call(first, b, keep)
        self._run(call, tokens, np.ones((b, width), np.int64))
        for s, n in zip(slots, ns, strict=True):
            self._lengths[s] = n
            if n < width:  # the padding's KV: host pages it made resident go back
                self._forget(self._row[s], n)
        shift = width - keep if self._pin_logits else 0  # the output's first position
        return self._logits_at(call, [n - 1 - shift for n in ns])

    def _check_batch(self, slots: Sequence[int], seqs: Sequence[Sequence[int]]) -> list[int]:
        """`prefill_batch`'s argument checks (its Raises), before anything changes; returns
        the token count of each row."""
        if not slots or len(slots) != len(seqs) or len(set(slots)) != len(slots):
            raise ValueError("prefill_batch needs distinct slots, one token list each")
        if any(self._lengths[s] for s in slots):
            raise ValueError("prefill_batch takes empty slots only (GroupQueryAttention batches "
                             "multi-token rows from position 0); prefill the others alone")
        ns = [len(ids) for ids in seqs]
        if min(ns) == 0:
            raise ValueError("prefill needs at least one token")
        for s in slots:
            self._check_room(s, max(ns))
        return ns

    def _batch_width(self, width: int) -> int:
        """Tokens a `prefill_batch` row runs at, its longest row holding ``width`` (`CudaRuntime`
        rounds up to a few shapes)."""
        return width

    def _prefill_call(self, first_row: int, rows: int, keep: int) -> Call:
        """A prefill binding whose logits cover the last ``keep`` positions (graphs with
        ``num_logits_to_keep``; else every position, as `_call`). Not cached: ``keep`` varies."""
        if not self._pin_logits:
            return self._call(first_row, rows, decode=False)
        session = self._session_for(rows, prefill=True)
        io = self._bind_kv(session, first_row, rows)
        io.bind_ortvalue_input("num_logits_to_keep",
                               ort.OrtValue.ortvalue_from_numpy(np.full(1, keep, np.int64)))
        self._bind_pad(io, rows, decode=False)
        return Call(io, session)

    def _bind_pad(self, io: ort.IOBinding, rows: int, *, decode: bool) -> None:
        """With `attention_pad`, bind the graph's ``attention_pad`` input to 1, except for a
        decode step of 2+ rows (GroupQueryAttention takes no second query row there)."""
        if self.attention_pad and not (decode and rows > 1):
            io.bind_ortvalue_input("attention_pad", self._keep[1])

    def decode(self, slots: Sequence[int], ids: Sequence[int]) -> np.ndarray:
        """One token per slot in a single ORT call (with the attention pad and several slots,
        one call a slot: `RuntimeOptions.attention_pad`); float32 logits [len(slots), vocab]."""
        if self._apart and len(slots) > 1:
            return np.stack([self._logits(call)[0] for call in self._decode_apart(slots, ids)])
        call = self._decode_step(slots, ids)
        logits = self._logits(call)
        return logits if len(logits) == len(slots) else logits[: len(slots)]

    def _decode_apart(self, slots: Sequence[int], ids: Sequence[int]) -> Iterator[Call]:
        """A decode step as one padded call per slot, each on the slot's KV row where it is
        (no rows move); yields each call once it has run (its logits are overwritten by the
        slot's next call). Checks every slot's room first: a full one raises ContextFull
        before any call runs."""
        if len(slots) != len(ids):
            raise ValueError("decode needs one token id per slot")
        for s in slots:
            self._check_room(s, 1)
        for s, token in zip(slots, ids, strict=True):
            n = self._lengths[s]
            call = self._call(self._row[s], 1, decode=True)
            self._run(call, np.full((1, 1), token, np.int64), np.ones((1, n + 1), np.int64))
            self._lengths[s] = n + 1
            yield call

    def decode_sampled(self, slots: Sequence[int], ids: Sequence[int],
                       draws: Sequence[RowDraw | None]) -> list[RowToken | np.ndarray]:
        """`decode`, then the token-choice graph on the logits where they are
        (`serve.runtime.Runtime.decode_sampled`)."""
        if self._sampler is None:
            raise NotImplementedError("device sampling is off (RuntimeOptions.device_sampling)")
        if len(draws) != len(slots):
            raise ValueError("decode_sampled needs one draw (or None) per slot")
        if self._apart and len(slots) > 1:
            return [self._sampler.sample(self._logits_value(call), [draw])[0]
                    for call, draw in zip(self._decode_apart(slots, ids), draws, strict=True)]
        logits = self._logits_value(self._decode_step(slots, ids))
        pad = [RowDraw(greedy=True)] * (logits.shape()[0] - len(slots))  # padding rows
        return self._sampler.sample(logits, [*draws, *pad])[: len(slots)]

    def _step_rows(self, b: int) -> int:
        """Rows a decode step of ``b`` sequences runs (`CudaRuntime` pads captured steps)."""
        return b

    def _decode_step(self, slots: Sequence[int], ids: Sequence[int]) -> Call:
        """One token per slot in a single ORT call; returns the call holding the logits, one
        row per slot, then any padding rows (`_step_rows`)."""
        b = len(slots)
        if b != len(ids):
            raise ValueError("decode needs one token id per slot")
        for s in slots:
            self._check_room(s, 1)
        self._gather_rows(slots)
        self._decode_rows = b
        lengths = [self._lengths[s] for s in slots]
        rows = self._step_rows(b)
        if rows > b:
            # Padding rows are the next rows' sequences: each writes one position past its
            # length, which nothing reads (its next prefill or decode writes there first),
            # and its length stays. A full sequence has no such position: no padding then.
            owner = {r: s for s, r in enumerate(self._row)}
            pad = [self._lengths[owner[r]] for r in range(b, rows)]
            rows, lengths = (b, lengths) if max(pad) >= self.info.max_length else (rows, lengths + pad)
        width = self.info.max_length if self._full_mask else max(lengths) + 1
        mask = np.zeros((rows, width), np.int64)
        for j, n in enumerate(lengths):
            mask[j, : n + 1] = 1
        tokens = np.zeros((rows, 1), np.int64)
        tokens[:b, 0] = ids
        call = self._call(0, rows, decode=True)
        self._run(call, tokens, mask)
        for s in slots:
            self._lengths[s] += 1
        return call

    # -- emptying and moving rows -------------------------------------------------------------
    def reset(self, slot: int) -> None:
        super().reset(slot)
        self._forget(self._row[slot], 0)

    def truncate(self, slot: int, length: int) -> None:
        super().truncate(slot, length)
        self._forget(self._row[slot], length)

    def copy_slot(self, src: int, dst: int, length: int | None = None) -> None:
        """dst gets src's KV: all of it, or its first `length` tokens (a shared prefix)."""
        n = self._copied_length(src, length)
        rs, rd = self._row[src], self._row[dst]
        if rs != rd and n:
            self._copy_row(rs, rd, n)
        self._lengths[dst] = n
        self._forget(rd, n)

    def _forget(self, row: int, keep: int) -> None:
        """Memory of ``row``'s KV past its first ``keep`` tokens may be given back (host
        buffers do; device ones stay allocated)."""

    def _copy_row(self, src_row: int, dst_row: int, n: int) -> None:
        """The first ``n`` KV positions of one row into another (every layer, K and V)."""
        raise NotImplementedError

    def _swap_rows(self, a: int, b: int, n: int) -> None:
        """Exchange the first ``n`` KV positions of two rows (every layer, K and V)."""
        raise NotImplementedError

    def _place_rows(self, slots: Sequence[int], ahead: int) -> int:
        """Rows ``first .. first + len(slots) - 1`` for a prefill of ``slots``, in order; returns
        ``first``: the rows after the ``ahead`` rows of the sequences the next decode step runs
        first (which appends these to its batch and so wants them there), or the last rows
        where those do not fit. Slots already there stay; the others are swapped in.

        Placing them anywhere else costs a row swap each at the next decode step: on an H200
        (`CudaRuntime`, three whole-row copies a swap) the first step after a burst of 46
        prompts took 98-135 ms instead of 2 (bench/gpu/diag_ramp.py)."""
        first = min(ahead, self.n_slots - len(slots))
        if any(self._row[s] != first + j for j, s in enumerate(slots)):
            self._gather_rows(slots, first)
        return first

    def _gather_rows(self, slots: Sequence[int], first: int = 0) -> None:
        """Swap sequences between rows so ``slots[j]`` lives in row ``first + j``. Where one
        of the two holds no tokens (a new prompt's blank slot) the swap is one row copy, the
        other's tokens into the empty row, not three (`CudaRuntime` swaps through a scratch
        row); where neither does, no copy."""
        owner = {r: s for s, r in enumerate(self._row)}
        for j, s in enumerate(slots, first):
            r = self._row[s]
            if r == j:
                continue
            other = owner[j]
            n_s, n_other = self._lengths[s], self._lengths[other]
            if n_s and n_other:
                self._swap_rows(j, r, max(n_s, n_other))
            elif n_s:
                self._copy_row(r, j, n_s)
            elif n_other:
                self._copy_row(j, r, n_other)
            if n_s or n_other:
                self.rows_swapped += 1
                self._forget(j, n_s)
                self._forget(r, n_other)
            self._row[s], self._row[other] = j, r
            owner[j], owner[r] = s, other


class HostRuntime(SharedKVRuntime):
    """KV buffers ``[n_slots, kv_heads, max_length, head_dim]`` per layer in host memory,
    bound to the graph in place as numpy-backed OrtValues (CPU and CoreML providers).

    The buffers are `KVBuffers`: resident memory follows the tokens the slots hold (a page is
    resident once written; a reset or cut slot gives its pages back), not ``max_length``.
    """

    def __init__(self, info: ModelInfo, options: RuntimeOptions) -> None:
        super().__init__(info, options, resolve_providers(options.provider),
                         pin_logits=info.logits_to_keep)
        if options.attention_pad:
            if not info.graph.get("attention_pad"):
                raise ValueError(f"{info.path}: the attention pad needs an export that has it "
                                 "(llorch.json graph.attention_pad: re-export with this llorch)")
            self.attention_pad = True
            self._apart = decodes_apart(options.batch_invariant, True)
            if not self._apart:
                # a step of 2+ sequences runs unpadded: its rows compute other numbers than
                # a lone padded step (the W8A8 graph still takes every step where it did)
                self.batch_invariant = False
            # and only where prefills and decode steps run on one graph (not with "prefill":
            # a prompt's positions on the W8A8 graph, a generated token's on the main one)
            self.positions_alike = self._apart and self.batch_invariant and self.w8a8 != "prefill"
        # the pad row writes one position past a call's last token: one spare position
        shape = (self.n_slots, info.num_kv_heads, self.info.max_length + self.attention_pad,
                 info.head_dim)
        self._kv = KVBuffers(info.num_layers, shape, self.kv_dtype)
        if self.w8a8_session is not None and not info.graph.get("w8a8_row_invariant"):
            self.batched_prefill = False
        self._k, self._v = self._kv.k, self._kv.v

    def _forget(self, row: int, keep: int) -> None:
        self._kv.forget(row, keep)

    def verify(self, slot: int, ids: Sequence[int], *, batched: bool = False) -> np.ndarray:
        """Append ``ids`` to ``slot``'s sequence in one call and return the logits after each
        of them (speculative decoding: ``ids`` are the next token and the drafts after it;
        `truncate` rolls back the rejected tail).

        Runs on the graph a lone sequence decodes on (`_session_for(1)`: the int4 graph, or
        the row-invariant W8A8 graph under ``batch_invariant``), or with ``batched`` on the one
        a decode step of two rows takes (the engine pads a lone decode to two rows). With the
        attention pad each row's logits are those one-token `decode` steps give, bit for bit.

        Returns:
            float32 logits ``[len(ids), vocab]``, row ``i`` after ``ids[i]``.
        Raises:
            ContextFull: the slot would hold more than ``info.max_length`` tokens.
            ValueError: ``ids`` is empty.
        """
        n, past = self._begin_prefill(slot, ids)
        key = (self._row[slot], 2 if batched else 1)
        call = self._verify_calls.get(key)
        if call is None:
            call = self._verify_calls[key] = self._bind_verify(*key)
        self._run(call, np.asarray([ids], np.int64), np.ones((1, past + n), np.int64))
        self._lengths[slot] = past + n
        out = call.io.get_outputs()[-1].numpy()  # [1, n, vocab]
        return np.ascontiguousarray(out[0], dtype=np.float32)

    def _bind(self, first_row: int, rows: int, decode: bool) -> Call:
        session = self._session_for(rows, prefill=not decode)
        io = self._bind_kv(session, first_row, rows)
        logits = None
        if self._pin_logits:
            io.bind_ortvalue_input("num_logits_to_keep", self._keep[1])
            logits = np.empty((rows, 1, self.info.vocab_size), np.float32)
            io.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(logits))
        self._bind_pad(io, rows, decode=decode)
        return Call(io, session, logits)

    def _bind_verify(self, row: int, rows_like: int) -> Call:
        """A binding of one KV row whose logits cover every position (ORT-allocated), on the
        graph a decode step of ``rows_like`` rows runs."""
        session = self._session_for(rows_like)
        io = self._bind_kv(session, row, 1)
        if self._pin_logits:
            io.bind_ortvalue_input("num_logits_to_keep", self._keep[0])
        self._bind_pad(io, 1, decode=False)
        return Call(io, session)

    def _bind_kv(self, session: ort.InferenceSession, first_row: int, rows: int) -> ort.IOBinding:
        """A binding with rows ``first_row ..`` of every layer's K and V as past and present."""
        io = session.io_binding()
        sl = slice(first_row, first_row + rows)
        for i in range(self.info.num_layers):
            for buf, pname, oname in ((self._k[i], self.info.past_key, self.info.present_key),
                                      (self._v[i], self.info.past_value, self.info.present_value)):
                ov = ort.OrtValue.ortvalue_from_numpy(buf[sl])
                io.bind_ortvalue_input(pname % i, ov)
                io.bind_ortvalue_output(oname % i, ov)
        return io

    def _copy_row(self, src_row: int, dst_row: int, n: int) -> None:
        for buf in (*self._k, *self._v):
            buf[dst_row, :, :n] = buf[src_row, :, :n]

    def _swap_rows(self, a: int, b: int, n: int) -> None:
        for buf in (*self._k, *self._v):
            tmp = buf[a, :, :n].copy()
            buf[a, :, :n] = buf[b, :, :n]
            buf[b, :, :n] = tmp
