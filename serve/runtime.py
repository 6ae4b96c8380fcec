"""ONNX Runtime session + KV slots.

A *slot* holds one sequence's KV cache. For GroupQueryAttention graphs (llorch exports and
ONNX Runtime GenAI's builder) every layer has one preallocated buffer
``[n_slots, kv_heads, max_length, head_dim]`` bound as both past and present through IO
binding, so ORT writes new positions in place and nothing is reallocated per step. A decode
step over ``b`` sequences binds the first ``b`` rows: sequences are moved so that the ones
being decoded sit in rows ``0..b-1`` (slot ids stay stable for callers; rows move).

Decoders exported by optimum-cli (growing KV, ``position_ids``) run through
``_GrowingKVRuntime``: same interface, KV arrays concatenated by ORT each step.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from serve.model_dir import ModelInfo, load_model_info
from serve.options import W8A8_MODES

log = logging.getLogger("llorch.runtime")

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
}
_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class ContextFull(Exception):
    """A slot would grow past the KV buffer length."""


class ProviderError(Exception):
    """The requested execution provider is not available in this onnxruntime build."""


def resolve_providers(provider: str) -> list[str]:
    """ORT provider list for --provider; never a silent CPU fallback unless 'auto'."""
    available = ort.get_available_providers()
    if provider == "auto":
        for p in ("CUDAExecutionProvider", "CoreMLExecutionProvider"):
            if p in available:
                return [p, "CPUExecutionProvider"]
        return ["CPUExecutionProvider"]
    if provider in PROVIDERS:
        wanted = PROVIDERS[provider]
    elif provider.endswith("ExecutionProvider"):
        wanted = provider
    else:
        raise ProviderError(f"unknown provider {provider!r} (choose cpu, cuda, coreml or auto)")
    if wanted not in available:
        raise ProviderError(
            f"--provider {provider}: {wanted} is not available in this onnxruntime "
            f"{ort.__version__} build (available: {', '.join(available)})"
            + ("; install onnxruntime-gpu for CUDA" if provider == "cuda" else "")
        )
    return [wanted] if wanted == "CPUExecutionProvider" else [wanted, "CPUExecutionProvider"]


def _on_cuda(provider: str) -> bool:
    try:
        return resolve_providers(provider)[0] == "CUDAExecutionProvider"
    except ProviderError:
        return False  # __init__ raises it with the full message


def w8a8_mode(value: str | bool | None) -> str:
    """Runtime's ``w8a8`` argument as one of W8A8_MODES (True = all, False/None = off)."""
    mode = "all" if value is True else "off" if value in (False, None) else value
    if mode not in W8A8_MODES:
        raise ValueError(f"w8a8 must be one of {W8A8_MODES}, got {value!r}")
    return mode


def w8a8_unused(mode: str, reason: str) -> None:
    """An explicit --w8a8 that cannot apply says why; auto stays quiet."""
    if mode != "auto":
        log.warning("--w8a8 %s has no effect here: %s; every run uses the main graph",
                    mode, reason)


def default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS
        return max(1, os.cpu_count() or 1)


def session_options(threads: int | None) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or default_threads()
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return so


class Runtime:
    """One ORT session and ``max_batch`` KV slots (see the module docstring)."""

    # Pin the graph's overridable num_logits_to_keep to 1 through SessionOptions.add_initializer.
    pin_logits_to_keep = True

    def __new__(cls, model_dir: Path, **kwargs):
        if cls is Runtime:
            from serve.runtime_static import StaticRuntime, static_graph

            if static_graph(model_dir) is not None:  # --target coreml: host-side KV
                return super().__new__(StaticRuntime)
            info = load_model_info(model_dir, name=kwargs.get("name"))
            if not info.shared_kv:
                return super().__new__(_GrowingKVRuntime)
            if _on_cuda(kwargs.get("provider", "cpu")):  # KV on the GPU, IO binding by pointer
                from serve.runtime_cuda import CudaRuntime

                return super().__new__(CudaRuntime)
        return super().__new__(cls)

    # With w8a8 "all", decode steps of at least this many sequences take the W8A8 graph
    # (one row: MatMulNBits reads 4-bit weights, faster than int8 GEMMs at M=1).
    w8a8_min_rows = 2

    def __init__(self, model_dir: Path, *, provider: str = "cpu", threads: int | None = None,
                 max_batch: int = 1, max_length: int | None = None, name: str | None = None,
                 w8a8: str | bool | None = "off"):
        info = load_model_info(model_dir, name=name)
        if max_length is not None:
            if max_length > info.max_length:
                raise ValueError(
                    f"--max-length {max_length} exceeds the export's max_length {info.max_length}"
                    " (re-export with a larger --max-length)")
            info = _replace(info, max_length=max_length)
        self.info: ModelInfo = info
        self.n_slots = max_batch
        self.providers = self._with_options(resolve_providers(provider))
        self._threads = threads
        so = session_options(threads)
        # llorch exports have an overridable `num_logits_to_keep` (default 0 = every position);
        # pinning it to 1 makes prefill pay the lm_head for its last position only.
        self._has_keep = info.logits_to_keep and self.pin_logits_to_keep
        if self._has_keep:
            self._keep_ov = self._keep_value()
            so.add_initializer("num_logits_to_keep", self._keep_ov)
        self.session = ort.InferenceSession(str(info.onnx_file), so, providers=self.providers)
        # The export's W8A8 graph (int8 GEMMs) for prefill and (all) batched decode: same
        # inputs, outputs and KV buffers, so the two sessions take turns on one cache.
        self.w8a8 = w8a8_mode(w8a8)
        self.batch_session = None
        if self.w8a8 != "off":
            unusable = (
                "the export has no W8A8 graph (llorch.json graph.w8a8)" if info.w8a8_file is None
                else "its cache grows per step (not shared KV buffers)" if not info.shared_kv
                else f"it is a CPU graph, not one for {self.providers[0]}"
                if self.providers[0] != "CPUExecutionProvider" else None)
            if unusable is None:
                self.batch_session = ort.InferenceSession(str(info.w8a8_file), so,
                                                          providers=self.providers)
                if self.w8a8 == "auto":
                    self.w8a8 = "all"
            else:
                w8a8_unused(self.w8a8, unusable)
                self.w8a8 = "off"
        inputs = {i.name: i for i in self.session.get_inputs()}
        self._input_names = set(inputs)
        self.kv_dtype = _ORT_TYPES.get(inputs[info.past_key % 0].type, np.float32)
        self._lengths = [0] * self.n_slots
        self._setup()

    def _with_options(self, providers: list) -> list:
        """Provider list as ORT takes it; subclasses attach provider options."""
        return providers

    def _keep_value(self) -> ort.OrtValue:
        """num_logits_to_keep = 1, on the device ORT plans it (CPU here)."""
        return ort.OrtValue.ortvalue_from_numpy(np.ones(1, np.int64))

    # -- public interface -------------------------------------------------------------------
    def length(self, slot: int) -> int:
        return self._lengths[slot]

    def reset(self, slot: int) -> None:
        self._lengths[slot] = 0

    def truncate(self, slot: int, length: int) -> None:
        if not 0 <= length <= self._lengths[slot]:
            raise ValueError(f"cannot truncate slot {slot} of length {self._lengths[slot]} "
                             f"to {length}")
        self._lengths[slot] = length

    def kv_bytes(self) -> int:
        """Bytes preallocated for the KV cache of all slots."""
        return self.n_slots * self.info.max_length * self._kv_token_bytes()

    def kv_bytes_in_use(self) -> int:
        """Bytes of KV cache holding tokens (every slot's length, idle slots included)."""
        return sum(self._lengths) * self._kv_token_bytes()

    def _kv_token_bytes(self) -> int:
        return (2 * self.info.num_layers * self.info.num_kv_heads * self.info.head_dim
                * np.dtype(self.kv_dtype).itemsize)

    def _begin_prefill(self, slot: int, ids: Sequence[int]) -> tuple[int, int]:
        """Checks a prefill of ``ids`` into ``slot``; returns (tokens, tokens already held)."""
        n = len(ids)
        if n == 0:
            raise ValueError("prefill needs at least one token")
        self._check_room(slot, n)
        return n, self._lengths[slot]

    def _check_room(self, slot: int, n: int) -> None:
        if self._lengths[slot] + n > self.info.max_length:
            raise ContextFull(f"slot {slot}: {self._lengths[slot]} + {n} tokens exceed the "
                              f"context length {self.info.max_length}")

    # -- shared-buffer (GroupQueryAttention) implementation ---------------------------------
    def _setup(self) -> None:
        info = self.info
        shape = (self.n_slots, info.num_kv_heads, info.max_length, info.head_dim)
        self._k = [np.zeros(shape, self.kv_dtype) for _ in range(info.num_layers)]
        self._v = [np.zeros(shape, self.kv_dtype) for _ in range(info.num_layers)]
        self._row = list(range(self.n_slots))  # slot -> physical row
        self._bindings: dict[tuple, ort.IOBinding] = {}
        self._logit_bufs: dict[tuple, np.ndarray] = {}

    def _session_for(self, rows: int, prefill: bool = False) -> ort.InferenceSession:
        """The W8A8 graph for every prefill (a prompt's KV is then the same whether a prefix
        cache hit leaves one token or a hundred to prefill) and, with w8a8 "all", for decode
        steps of many sequences (where int8 GEMMs win); else the main one."""
        if self.batch_session is not None and (
                prefill or self.w8a8 == "all" and rows >= self.w8a8_min_rows):
            return self.batch_session
        return self.session

    def _binding(self, first_row: int, rows: int, session: ort.InferenceSession | None = None
                 ) -> tuple[ort.IOBinding, tuple]:
        """IO binding of ``session`` with the KV rows [first_row, first_row + rows) bound in
        place, and its cache key."""
        session = session or self.session
        key = (first_row, rows, session is self.session)
        io = self._bindings.get(key)
        if io is None:
            io = session.io_binding()
            sl = slice(first_row, first_row + rows)
            for i in range(self.info.num_layers):
                for buf, pname, oname in ((self._k[i], self.info.past_key, self.info.present_key),
                                          (self._v[i], self.info.past_value,
                                           self.info.present_value)):
                    ov = ort.OrtValue.ortvalue_from_numpy(buf[sl])
                    io.bind_ortvalue_input(pname % i, ov)
                    io.bind_ortvalue_output(oname % i, ov)
            if self._has_keep:
                out = np.empty((rows, 1, self.info.vocab_size), np.float32)
                io.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(out))
                self._logit_bufs[key] = out
            else:
                io.bind_output("logits")
            self._bindings[key] = io
        return io, key

    def _logits_out(self, io: ort.IOBinding, key: tuple) -> np.ndarray:
        if self._has_keep:
            return self._logit_bufs[key][:, 0].copy()
        out = io.get_outputs()[-1].numpy()  # [rows, seq, vocab]
        return np.ascontiguousarray(out[:, -1], dtype=np.float32)

    def prefill(self, slot: int, ids: Sequence[int]) -> np.ndarray:
        """Append ``ids`` to ``slot``'s sequence; float32 logits [vocab] after the last one."""
        n, past = self._begin_prefill(slot, ids)
        session = self._session_for(n, prefill=True)
        io, key = self._binding(self._row[slot], 1, session)
        if not self._has_keep:
            io.bind_output("logits")  # ORT sizes it: [1, n, vocab]
        io.bind_cpu_input("input_ids", np.asarray([ids], np.int64))
        io.bind_cpu_input("attention_mask", np.ones((1, past + n), np.int64))
        session.run_with_iobinding(io)
        self._lengths[slot] = past + n
        return self._logits_out(io, key)[0]

    def decode(self, slots: Sequence[int], ids: Sequence[int]) -> np.ndarray:
        """One token per slot in a single ORT call; float32 logits [len(slots), vocab]."""
        b = len(slots)
        if b != len(ids):
            raise ValueError("decode needs one token id per slot")
        for s in slots:
            self._check_room(s, 1)
        self._gather_rows(slots)
        lengths = [self._lengths[s] for s in slots]
        width = max(lengths) + 1
        mask = np.zeros((b, width), np.int64)
        for j, n in enumerate(lengths):
            mask[j, : n + 1] = 1
        session = self._session_for(b)
        io, key = self._binding(0, b, session)
        if not self._has_keep:
            io.bind_output("logits")
        io.bind_cpu_input("input_ids", np.asarray(ids, np.int64).reshape(b, 1))
        io.bind_cpu_input("attention_mask", mask)
        session.run_with_iobinding(io)
        for s in slots:
            self._lengths[s] += 1
        return self._logits_out(io, key)

    def copy_slot(self, src: int, dst: int, length: int | None = None) -> None:
        """dst gets src's KV: all of it, or its first `length` tokens (a shared prefix)."""
        n = self._lengths[src] if length is None else length
        if not 0 <= n <= self._lengths[src]:
            raise ValueError(f"cannot copy {n} tokens of slot {src} of length {self._lengths[src]}")
        rs, rd = self._row[src], self._row[dst]
        if rs != rd and n:
            self._copy_row(rs, rd, n)
        self._lengths[dst] = n

    def _copy_row(self, src_row: int, dst_row: int, n: int) -> None:
        """The first ``n`` KV positions of one row into another (every layer, K and V)."""
        for bufs in (self._k, self._v):
            for buf in bufs:
                buf[dst_row, :, :n] = buf[src_row, :, :n]

    def _swap_rows(self, a: int, b: int, n: int) -> None:
        for bufs in (self._k, self._v):
            for buf in bufs:
                tmp = buf[a, :, :n].copy()
                buf[a, :, :n] = buf[b, :, :n]
                buf[b, :, :n] = tmp

    def _gather_rows(self, slots: Sequence[int]) -> None:
        """Swap sequences between rows so ``slots[j]`` lives in row ``j``."""
        owner = {r: s for s, r in enumerate(self._row)}
        for j, s in enumerate(slots):
            r = self._row[s]
            if r == j:
                continue
            other = owner[j]
            n = max(self._lengths[s], self._lengths[other])
            if n:
                self._swap_rows(j, r, n)
            self._row[s], self._row[other] = j, r
            owner[j], owner[r] = s, other


class _GrowingKVRuntime(Runtime):
    """optimum-cli decoders: the past grows each step; sequences run one at a time."""

    def _setup(self) -> None:
        info = self.info
        empty = (1, info.num_kv_heads, 0, info.head_dim)
        self._empty = np.zeros(empty, self.kv_dtype)
        self._past: list[list[np.ndarray] | None] = [None] * self.n_slots
        self._has_pos = "position_ids" in self._input_names
        self._out_names = [o.name for o in self.session.get_outputs()]

    def reset(self, slot: int) -> None:
        super().reset(slot)
        self._past[slot] = None

    def truncate(self, slot: int, length: int) -> None:
        super().truncate(slot, length)
        if self._past[slot] is not None:
            self._past[slot] = [a[:, :, :length] for a in self._past[slot]]

    def kv_bytes(self) -> int:
        return 0  # allocated per step by ORT

    def kv_bytes_in_use(self) -> int:
        return sum(a.nbytes for past in self._past if past for a in past)

    def _run(self, slot: int, ids: Sequence[int]) -> np.ndarray:
        n = len(ids)
        self._check_room(slot, n)
        past_len = self._lengths[slot]
        past = self._past[slot]
        feed = {"input_ids": np.asarray([ids], np.int64),
                "attention_mask": np.ones((1, past_len + n), np.int64)}
        if self._has_pos:
            feed["position_ids"] = np.arange(past_len, past_len + n, dtype=np.int64)[None]
        for i in range(self.info.num_layers):
            feed[self.info.past_key % i] = past[2 * i] if past else self._empty
            feed[self.info.past_value % i] = past[2 * i + 1] if past else self._empty
        res = dict(zip(self._out_names, self.session.run(self._out_names, feed), strict=False))
        self._past[slot] = [res[(self.info.present_key if j % 2 == 0 else
                                 self.info.present_value) % (j // 2)]
                            for j in range(2 * self.info.num_layers)]
        self._lengths[slot] = past_len + n
        return np.asarray(res["logits"][0, -1], dtype=np.float32)

    def prefill(self, slot: int, ids: Sequence[int]) -> np.ndarray:
        if not ids:
            raise ValueError("prefill needs at least one token")
        return self._run(slot, ids)

    def decode(self, slots: Sequence[int], ids: Sequence[int]) -> np.ndarray:
        return np.stack([self._run(s, [t]) for s, t in zip(slots, ids, strict=False)])

    def copy_slot(self, src: int, dst: int, length: int | None = None) -> None:
        self._past[dst] = None if self._past[src] is None else list(self._past[src])
        self._lengths[dst] = self._lengths[src]
        if length is not None:
            self.truncate(dst, length)


def _replace(info: ModelInfo, **changes) -> ModelInfo:
    from dataclasses import replace

    return replace(info, **changes)
