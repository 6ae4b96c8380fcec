"""Runtime on ONNX Runtime's CUDA provider: the KV cache lives on the GPU for its whole life.

Every layer has one device buffer per K and V, ``[n_slots + 1, kv_heads, max_length, hd]``
(fp16 for ``--target cuda`` exports; the extra row is scratch for swaps). A call binds rows
``[first, first + rows)`` of it by pointer as both past and present, so GroupQueryAttention
writes the new positions in place. Per decode step only the token ids and the mask go up and
only the last position's fp32 logits come down::

    host ── input_ids [b, 1], attention_mask [b, L] ──►  GPU: graph, KV rows 0..b-1 in place
    host ◄──────────── logits [b, 1, vocab] (fp32) ─────  GPU

or, with device sampling (``device_sampling`` True: ``decode_sampled``), the logits stay on the GPU
for the token-choice graph (``serve.runtime.device_sampling``) and only token ids [b] (and the
logits of rows the host must sample) come down.

Prefill calls run at a few fixed shapes (`prefill_shape`): the prompt chunk right-padded to the
next power of two (at least 16 tokens), the mask as wide as the buffer, and only the real last
position's logits brought down (below). ORT on CUDA spends 50-100 ms the first time it meets a sequence length
(3.5-7 ms after; H200, default model), and prompt lengths are all different: with buckets only
the first call at each bucket pays, and `warm_up` pays that at start-up. The padding tokens'
KV lands after the real ones (GroupQueryAttention is causal: the real tokens never see it) and
past the slot's length, where the next write goes.

A prefill (one slot, or several empty ones in one call: ``prefill_batch``, in groups of a
power of two rows, so batch sizes are few too) leaves its logits
``[rows, seq, vocab]`` on the GPU; the row after each sequence's last token is copied on the
device into a fixed ``[r, vocab]`` fp32 buffer (``_logit_rows``) and only that comes down.

Decoded sequences are moved so slot ``slots[j]`` sits in row ``j`` (as in every
``SharedKVRuntime``); moves and ``copy_slot`` are device-to-device copies through a tiny
Identity graph (``DeviceCopier``).

CUDA graph capture (``cuda_graph=True``, ORT's ``enable_cuda_graph``) needs fixed shapes and
addresses: decode masks then span the whole buffer (GroupQueryAttention reads each row's
length from the mask's sum, the width only sizes the buffer), ids, mask and logits live in
fixed device buffers per batch size, and each batch size is captured once (``gpu_graph_id``):
1, 2, 4 and multiples of 8 (``graph_sizes``); other batches run padded to the next of those.
Decode steps then run on the export's static decode graph (``model_decode_static.onnx``: no
shape arithmetic or logits slice, which ORT would place on the CPU and so refuse to capture)
in a second session; prefill runs uncaptured on the main graph, over the same KV buffers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from serve.model_dir import ModelInfo
from serve.runtime.interface import RowDraw, RuntimeOptions
from serve.runtime.session import resolve_providers, session_options
from serve.runtime.shared_kv import Call, SharedKVRuntime

_ONNX_TYPES = {np.dtype(np.float32): 1, np.dtype(np.float16): 10}


# -- the binding plan (pure: what goes where; tested on CPU) -----------------------------------


def graph_sizes(n_slots: int) -> list[int]:
    """Decode batch sizes captured as CUDA graphs: 1, 2, 4, every multiple of 8 and ``n_slots``
    (vLLM's scheme); a step of b sequences runs at the smallest size >= b, with padding rows,
    so a scheduler whose batch moves through every size captures a few graphs, not one each."""
    return sorted({s for s in (1, 2, 4) if s < n_slots} | set(range(8, n_slots, 8)) | {n_slots})


@dataclass(frozen=True)
class Bound:
    name: str
    kind: str  # "input" | "output"
    device: str  # "cuda" (stays on the GPU) | "host" (crosses the bus each call)
    shape: tuple[int, ...]
    dtype: str
    buffer: str  # which allocation: "k.{i}" / "v.{i}" (row offset applies), "ids", "mask", ...
    first_row: int = 0


def binding_plan(info, kv_dtype, first_row: int, rows: int, *, seq: int, mask_width: int,
                 device_io: bool) -> list[Bound]:
    """Every input/output of one call and where it lives.

    Past and present of a layer name the same buffer and row range (shared in place).
    ``device_io`` (CUDA graphs) keeps ids/mask/logits in fixed device buffers too; otherwise
    they are host memory that ORT copies per call.
    """
    io_dev = "cuda" if device_io else "host"
    kv = (rows, info.num_kv_heads, info.max_length, info.head_dim)
    dt = np.dtype(kv_dtype).name
    plan = [Bound("input_ids", "input", io_dev, (rows, seq), "int64", "ids"),
            Bound("attention_mask", "input", io_dev, (rows, mask_width), "int64", "mask")]
    for i in range(info.num_layers):
        for t, pname, oname in (("k", info.past_key, info.present_key),
                                ("v", info.past_value, info.present_value)):
            plan.append(Bound(pname % i, "input", "cuda", kv, dt, f"{t}.{i}", first_row))
            plan.append(Bound(oname % i, "output", "cuda", kv, dt, f"{t}.{i}", first_row))
    plan.append(Bound("logits", "output", io_dev, (rows, 1, info.vocab_size), "float32",
                      "logits"))
    return plan


# Smallest prefill shape (`prefill_shape`); below it the padding costs less than more shapes.
MIN_PREFILL_SHAPE = 16


def prefill_shape(n: int, past: int, max_length: int) -> int:
    """Sequence length a prefill of ``n`` tokens after ``past`` runs at on CUDA: the next power
    of two >= max(n, `MIN_PREFILL_SHAPE`), or what is left of the buffer where that would not
    fit (``max_length - past`` >= n, checked by the caller).

    Example: n = 37, past = 0, max_length = 2048 → 64; n = 37, past = 2000 → 48.
    """
    s = max(MIN_PREFILL_SHAPE, 1 << max(n - 1, 0).bit_length())
    return min(s, max_length - past) if past + s > max_length else s


def cuda_provider_options(*, device_id: int = 0, cuda_graph: bool = False) -> dict[str, str]:
    return {
        "device_id": str(device_id),
        # RMSNorm with the residual add in fp32, as the CPU graph computes it (older ORT
        # builds accumulate SkipSimplifiedLayerNormalization in fp16 without this)
        "enable_skip_layer_norm_strict_mode": "1",
        "enable_cuda_graph": "1" if cuda_graph else "0",
    }


# -- device-to-device copies -------------------------------------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(num: int, value: int | bytes | str) -> bytes:
    if isinstance(value, int):
        return _varint(num << 3) + _varint(value)
    data = value.encode() if isinstance(value, str) else value
    return _varint(num << 3 | 2) + _varint(len(data)) + data


def identity_model(n: int, elem_type: int) -> bytes:
    """ModelProto bytes: ``y{j} = Identity(x{j})`` for j < n, 1-D tensors of length "len".

    Written by hand (the protobuf wire format, ONNX field numbers) because serve does not
    depend on the onnx package.
    """
    def value_info(name: str) -> bytes:
        dim = _field(1, _field(2, "len"))  # Dimension.dim_param
        tensor = _field(1, elem_type) + _field(2, dim)  # TypeProto.Tensor elem_type, shape
        return _field(1, name) + _field(2, _field(1, tensor))

    graph = b"".join(_field(1, _field(1, f"x{j}") + _field(2, f"y{j}") + _field(3, f"copy{j}")
                            + _field(4, "Identity")) for j in range(n))
    graph += _field(2, "llorch-device-copy")
    graph += b"".join(_field(11, value_info(f"x{j}")) for j in range(n))
    graph += b"".join(_field(12, value_info(f"y{j}")) for j in range(n))
    opset = _field(1, "") + _field(2, 13)
    return _field(1, 8) + _field(2, "llorch") + _field(7, graph) + _field(8, opset)


class DeviceCopier:
    """Copies between device buffers by pointer: one ORT run moves up to ``n`` ranges.

    ``cache`` > 0 keeps the IO bindings of that many distinct runs (oldest dropped first):
    binding 2 x ``n`` addresses from Python costs more than the copies themselves where the
    same ranges come back (whole KV rows: a row swap was ~3 ms on an H200 without it)."""

    def __init__(self, n: int, dtype, providers: list, device: str = "cuda", device_id: int = 0,
                 cache: int = 0):
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        so.log_severity_level = 3
        self.session = ort.InferenceSession(identity_model(n, _ONNX_TYPES[np.dtype(dtype)]), so,
                                            providers=providers)
        self.n, self.dtype, self.device, self.device_id = n, np.dtype(dtype), device, device_id
        self._cache = cache
        self._bindings: dict[tuple, ort.IOBinding] = {}

    def copy(self, pairs: Sequence[tuple[int, int]], count: int) -> None:
        """For each (src, dst) address pair, copy ``count`` elements src → dst."""
        for start in range(0, len(pairs), self.n):
            chunk = pairs[start:start + self.n]
            key = (tuple(chunk), count)
            io = self._bindings.get(key)
            if io is None:
                io = self.session.io_binding()
                for j in range(self.n):  # unused slots copy a range onto itself
                    src, dst = chunk[j] if j < len(chunk) else chunk[0]
                    io.bind_input(f"x{j}", self.device, self.device_id, self.dtype, [count], src)
                    io.bind_output(f"y{j}", self.device, self.device_id, self.dtype, [count], dst)
                if self._cache:
                    if len(self._bindings) >= self._cache:
                        del self._bindings[next(iter(self._bindings))]
                    self._bindings[key] = io
            self.session.run_with_iobinding(io)
        io.synchronize_outputs()

    def to_host(self, src: int, dst: np.ndarray) -> np.ndarray:
        """Copy ``dst.size`` elements from device address ``src`` into the host array ``dst``
        (C-contiguous, this copier's dtype), in place: no host allocation. Returns ``dst``."""
        io = self.session.io_binding()
        for j in range(self.n):  # unused slots copy the range onto itself on the device
            io.bind_input(f"x{j}", self.device, self.device_id, self.dtype, [dst.size], src)
            if j:
                io.bind_output(f"y{j}", self.device, self.device_id, self.dtype, [dst.size], src)
        io.bind_output("y0", "cpu", 0, self.dtype, [dst.size], dst.ctypes.data)
        self.session.run_with_iobinding(io)
        io.synchronize_outputs()
        return dst


# -- the runtime -------------------------------------------------------------------------------


class CudaRuntime(SharedKVRuntime):
    """KV rows on the device, bound by pointer (module docstring). ``device`` "cpu" runs the
    same pointer-bound plan on host memory, which is how CI tests it without a GPU. Decode
    tokens are picked on the device only where ``options.device_sampling`` is True.

    Raises:
        ProviderError: this onnxruntime build lacks ``options.provider``.
        RuntimeError: the CUDA provider is listed but did not load (missing libraries).
        ValueError: ``options.cuda_graph`` on an export without the static decode graph.
    """

    # By default (auto) greedy rows pick their token on the GPU: on an H200 (captured steps,
    # bench/results/2026-11-30-h200-device-sampling-diag-host-logits.json) a 64-row step took
    # 1.59 ms with TopK k=1 there against 3.27 ms bringing the logits to the host for an argmax
    # (8 rows 1.35 vs 1.62, 1 row 1.25 vs 1.21). Sampled rows stay on the host under auto: the
    # top-p graph sorts the whole vocabulary, 51.8 ms a 64-row step (`device_greedy_only`).
    @property
    def samples_on_device(self) -> bool:
        return self._device == "cuda"
    # On a GPU a prefill call of a few hundred tokens is bound by its kernel launches, not by
    # its tokens: pad freely (the engine's budget, --prefill-chunk tokens a step, bounds it).
    prefill_padding = None

    def __init__(self, info: ModelInfo, options: RuntimeOptions, *, device: str = "cuda",
                 device_id: int = 0) -> None:
        self._device, self._device_id = device, device_id
        # ORT drops a CPU-side session-options initializer for a tensor it plans on the GPU,
        # and refuses a device-side one ("Buffer containing the initializer must be owned by
        # the user", onnxruntime-gpu 1.31.1 on the H100): CUDA sessions take every position's
        # logits.
        super().__init__(info, options, self._with_options(resolve_providers(options.provider)),
                         pin_logits=False)
        if device == "cuda" and self.session.get_providers()[0] != "CUDAExecutionProvider":
            raise RuntimeError(f"CUDAExecutionProvider did not load (session providers: "
                               f"{self.session.get_providers()}); check the CUDA/cuDNN libraries")
        # Decode steps run on the export's static decode graph, captured once per batch size
        # (every node on the GPU, fixed shapes: the mask spans the whole cache).
        self._cuda_graph = self._full_mask = options.cuda_graph
        self._graph_sizes = graph_sizes(self.n_slots)
        self.decode_session = self.session
        if options.cuda_graph:
            if info.cuda_graph_file is None:
                raise ValueError(f"{info.path}: no CUDA-graph decode graph (llorch.json "
                                 "graph.cuda_graph); re-export with --target cuda")
            providers = self._with_options(resolve_providers(options.provider), cuda_graph=True)
            self.decode_session = ort.InferenceSession(
                str(info.cuda_graph_file), session_options(options.threads), providers=providers)
        shape = (self.n_slots + 1, info.num_kv_heads, self.info.max_length, info.head_dim)
        self._k = [self._alloc(shape, self.kv_dtype) for _ in range(info.num_layers)]
        self._v = [self._alloc(shape, self.kv_dtype) for _ in range(info.num_layers)]
        self._row_elems = int(np.prod(shape[1:]))
        self._row_bytes = self._row_elems * np.dtype(self.kv_dtype).itemsize
        self._scratch = self.n_slots  # the extra row
        self._dev_io: dict[int, tuple[ort.OrtValue, ort.OrtValue, ort.OrtValue]] = {}
        # the copier binds new addresses every run: never a captured graph
        self._copier = DeviceCopier(2 * info.num_layers, self.kv_dtype, self.providers,
                                    self._device, self._device_id, cache=4 * (self.n_slots + 1))
        # prefill logits rows, gathered on the device before they cross the bus
        self._logit_copier = DeviceCopier(16, np.float32, self.providers, self._device,
                                          self._device_id)
        self._gathered: dict[int, ort.OrtValue] = {}
        self.rows_gathered = 0  # prefill logits rows gathered on the device so far
        # Logits cross to this host buffer, allocated once: a fresh array a step (what
        # OrtValue.numpy() of device memory makes) cost a 64-row captured decode step 11-16 ms
        # instead of 5-6 (H200: 12.6 MB of new pages to fault in, twice with the copy after),
        # depending on the allocator's state — the "slow first runtime" of issue 18.
        self._host_logits = np.zeros((0, info.vocab_size), np.float32)
        self._to_host = DeviceCopier(1, np.float32, self.providers, self._device,
                                     self._device_id)
        # the static decode graph's total_sequence_length: the mask width, fixed per session
        self._total_len = ort.OrtValue.ortvalue_from_numpy(
            np.array(self.info.max_length, np.int32))
        if device == "cuda":
            self.warm_up()

    @property
    def captured_sizes(self) -> list[int]:
        """The decode batch sizes CUDA graphs capture (`graph_sizes`); [] when decode steps
        are not captured (no ``cuda_graph``, or the export has no static decode graph)."""
        return list(self._graph_sizes) if self._cuda_graph else []

    def _with_options(self, providers: list, *, cuda_graph: bool = False) -> list:
        return [(p, cuda_provider_options(device_id=self._device_id, cuda_graph=cuda_graph))
                if p == "CUDAExecutionProvider" else p for p in providers]

    def _step_rows(self, b: int) -> int:
        """Captured decode steps run at the next captured size (`graph_sizes`)."""
        if not self._cuda_graph:
            return b
        return next(s for s in self._graph_sizes if s >= b)

    # -- buffers -----------------------------------------------------------------------------
    def _alloc(self, shape, dtype) -> ort.OrtValue:
        ov = ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, self._device,
                                                       self._device_id)
        ov.update_inplace(np.zeros(shape, dtype))  # device memory starts as garbage
        return ov

    def _ptr(self, buffer: str, row: int) -> int:
        t, i = buffer.split(".")
        return (self._k if t == "k" else self._v)[int(i)].data_ptr() + row * self._row_bytes

    def _device_inputs(self, rows: int) -> tuple[ort.OrtValue, ort.OrtValue, ort.OrtValue]:
        if rows not in self._dev_io:
            self._dev_io[rows] = (
                self._alloc((rows, 1), np.int64),
                self._alloc((rows, self.info.max_length), np.int64),
                self._alloc((rows, 1, self.info.vocab_size), np.float32))
        return self._dev_io[rows]

    # -- the SharedKVRuntime hooks -----------------------------------------------------------
    def _bind(self, first_row: int, rows: int, decode: bool) -> Call:
        """Past/present rows bound by pointer; captured decode steps also bind fixed device
        buffers for ids, mask and logits."""
        device_io = decode and self._cuda_graph
        session = self.decode_session if device_io else self.session
        io = session.io_binding()
        plan = binding_plan(self.info, self.kv_dtype, first_row, rows, seq=1,
                            mask_width=self.info.max_length, device_io=device_io)
        for b in plan:
            if b.buffer.startswith(("k.", "v.")):
                bind = io.bind_input if b.kind == "input" else io.bind_output
                bind(b.name, self._device, self._device_id, self.kv_dtype, list(b.shape),
                     self._ptr(b.buffer, b.first_row))
        if not device_io:
            # prefill logits stay on the device (`_logits_at` brings the rows it needs), and so
            # do decode logits where tokens are picked there
            on = (self._device, self._device_id) if not decode or self.device_sampling else ("cpu", 0)
            io.bind_output("logits", *on)
            return Call(io, session, logits_on=on)
        ids, mask, logits = self._device_inputs(rows)
        io.bind_ortvalue_input("input_ids", ids)
        io.bind_ortvalue_input("attention_mask", mask)
        io.bind_ortvalue_output("logits", logits)
        io.bind_ortvalue_input("total_sequence_length", self._total_len)
        opts = ort.RunOptions()
        opts.add_run_config_entry("gpu_graph_id", str(rows))  # one capture per batch size
        return Call(io, session, device=(ids, mask, logits), run_options=opts)

    def _run(self, call: Call, ids: np.ndarray, mask: np.ndarray) -> None:
        if call.device is None:
            super()._run(call, ids, mask)
            return
        dev_ids, dev_mask, _ = call.device
        dev_ids.update_inplace(ids)
        dev_mask.update_inplace(mask)
        call.session.run_with_iobinding(call.io, call.run_options)

    def _logits(self, call: Call) -> np.ndarray:
        """Captured steps: the rows' logits in the runtime's host buffer, valid until the next
        call (the engine samples them at once)."""
        if call.device is None:
            return super()._logits(call)
        logits = call.device[2]
        return self._host_rows(logits.data_ptr(), logits.shape()[0])

    def _host_rows(self, src: int, rows: int) -> np.ndarray:
        """float32 ``[rows, vocab]`` copied from the device address ``src`` into the host
        buffer (grown, never shrunk: at most `n_slots` + 1 rows)."""
        if len(self._host_logits) < rows:
            self._host_logits = np.zeros((rows, self.info.vocab_size), np.float32)
        return self._to_host.to_host(src, self._host_logits[:rows])

    def _logits_value(self, call: Call) -> ort.OrtValue:
        return super()._logits_value(call) if call.device is None else call.device[2]

    # -- prefill at bucketed shapes -----------------------------------------------------------
    def prefill(self, slot: int, ids: Sequence[int]) -> np.ndarray:
        """Append ``ids`` to ``slot``'s sequence; float32 logits [vocab] after the last one.

        Runs at `prefill_shape` (module docstring) where the export has the overridable
        ``num_logits_to_keep`` input; else at the exact length, as `SharedKVRuntime.prefill`.

        Raises:
            ContextFull: the slot would hold more than ``info.max_length`` tokens.
            ValueError: ``ids`` is empty.
        """
        if not self.info.logits_to_keep:
            return super().prefill(slot, ids)
        n, past = self._begin_prefill(slot, ids)
        s = prefill_shape(n, past, self.info.max_length)
        padded = np.zeros((1, s), np.int64)
        padded[0, :n] = ids
        logits = self._prefill_row(self._row[slot], padded, past, n)
        self._lengths[slot] = past + n
        return logits

    def prefill_batch(self, slots: Sequence[int], seqs: Sequence[Sequence[int]], *,
                      decoding: Sequence[int] | None = None) -> np.ndarray:
        """`SharedKVRuntime.prefill_batch` in groups of a power of two rows, largest first, each
        at `prefill_shape` tokens (few shapes: module docstring); same arguments, result and
        errors (checked for every row before any call). Each group's rows follow the rows of
        ``decoding`` and of the groups before it. A group's call that fails empties the slots
        of the groups before it too: a failed call appends nothing, as the base's (the engine
        then prefills each row alone, which would otherwise append those rows twice)."""
        if not self.info.logits_to_keep:
            return super().prefill_batch(slots, seqs, decoding=decoding)
        ns = self._check_batch(slots, seqs)  # every row, before the first group's call
        ahead = self._decode_rows if decoding is None else len(decoding)
        out, i = [], 0
        try:
            while i < len(slots):
                g = 1 << ((len(slots) - i).bit_length() - 1)
                out.append(self._prefill_rows(slots[i:i + g], seqs[i:i + g], ns[i:i + g],
                                              ahead + i))
                i += g
        except BaseException:
            for s in slots[:i]:
                self.reset(s)
            raise
        return np.concatenate(out)

    def _batch_width(self, width: int) -> int:
        return prefill_shape(width, 0, self.info.max_length)

    def _prefill_row(self, row: int, ids: np.ndarray, past: int, n: int) -> np.ndarray:
        """One prefill call on ``row``: ``ids`` [1, s] after ``past`` tokens, the mask spanning
        the buffer; returns the logits after the ``n``-th token ([vocab] float32).

        The logits of every position stay on the device and one row of them is copied down
        (a logits shape that followed ``n`` would be one more shape ORT meets for the first time).
        """
        call = self._call(row, 1, decode=False)
        mask = np.zeros((1, self.info.max_length), np.int64)
        mask[0, : past + ids.shape[1]] = 1
        io = call.io
        io.bind_ortvalue_input("num_logits_to_keep", self._keep[0])  # an overridable initializer
        io.bind_output("logits", *call.logits_on)  # [1, s, vocab] on the device
        io.bind_cpu_input("input_ids", ids)
        io.bind_cpu_input("attention_mask", mask)
        call.session.run_with_iobinding(io)
        return self._logits_at(call, [n - 1])[0]

    def warm_up(self, up_to: int = 2048, batch_tokens: int = 2048) -> dict[str, list]:
        """Meet every shape a request would otherwise meet first, before any request: one
        prefill at every bucketed shape up to ``min(up_to, max_length)`` on the scratch row, a
        `prefill_batch` call at every (power-of-two rows, bucketed length) of at most
        ``batch_tokens`` tokens, and with CUDA graphs one decode step at every captured batch
        size (`graph_sizes`: the capture happens at the first run). Only on an empty runtime:
        the batched and decode calls write the first positions of rows whose length stays 0.

        Returns:
            {"prefill": sequence lengths run, "batch": (rows, length) pairs run,
            "decode": batch sizes captured, each also through the logits' copy to the host
            and the greedy token-choice graph where tokens are picked on the device}.
        Raises:
            RuntimeError: a slot already holds tokens.
        """
        if any(self._lengths):
            raise RuntimeError("warm_up runs on an empty runtime only")
        done: dict[str, list] = {"prefill": [], "batch": [], "decode": []}
        s = MIN_PREFILL_SHAPE
        while s <= min(up_to, self.info.max_length) and self.info.logits_to_keep:
            self._prefill_row(self._scratch, np.zeros((1, s), np.int64), 0, 1)
            done["prefill"].append(s)
            s *= 2
        b = 2
        while b <= self.n_slots and self.info.logits_to_keep:  # batched first prompts
            s = MIN_PREFILL_SHAPE
            while b * s <= batch_tokens and s <= self.info.max_length:
                call = self._call(0, b, decode=False)
                self._run(call, np.zeros((b, s), np.int64), np.ones((b, s), np.int64))
                self._logits_at(call, [0] * b)
                done["batch"].append((b, s))
                s *= 2
            b *= 2
        for rows in self._graph_sizes if self._cuda_graph else []:
            mask = np.zeros((rows, self.info.max_length), np.int64)
            mask[:, 0] = 1
            call = self._call(0, rows, decode=True)
            self._run(call, np.zeros((rows, 1), np.int64), mask)
            # what follows a step meets the same row counts: the logits' copy to the host,
            # and the greedy token-choice graph (all rows, and with one row for the host);
            # ORT's first run at each new shape costs tens of ms on a GPU
            self._logits(call)
            if self._sampler is not None:
                for draws in ([RowDraw(greedy=True)] * rows,
                              [None, *[RowDraw(greedy=True)] * (rows - 1)]):
                    self._sampler.sample(call.device[2], draws)
            done["decode"].append(rows)
        return done

    def _logits_at(self, call: Call, positions: Sequence[int]) -> np.ndarray:
        """Row ``b``'s logits at ``positions[b]``, gathered on the device into a fixed buffer
        of ``_logit_rows`` rows, which alone crosses the bus: a 512-token prefill chunk brings
        one [vocab] row, not [512, vocab] (100 MB of fp32 for a 49k vocabulary)."""
        if call.logits_on != (self._device, self._device_id):  # not a prefill binding
            return super()._logits_at(call, positions)
        self.rows_gathered += len(positions)
        out = call.io.get_outputs()[-1]  # [rows, seq, vocab] float32, where ORT left it
        rows, seq, vocab = out.shape()
        buf = self._logit_rows(len(positions))
        row_bytes = vocab * 4
        self._logit_copier.copy(
            [(out.data_ptr() + (b * seq + p) * row_bytes, buf.data_ptr() + b * row_bytes)
             for b, p in enumerate(positions)], vocab)
        # a copy: prompt logits outlive the step (later choices of the request start from them)
        return self._host_rows(buf.data_ptr(), len(positions)).copy()

    def _logit_rows(self, b: int) -> ort.OrtValue:
        """A float32 device buffer ``[r, vocab]`` for ``b`` gathered rows: ``r`` the power of
        two at or above ``b``, so a few buffers serve every batch and at most twice the rows
        cross the bus."""
        r = 1 << (b - 1).bit_length()
        if r not in self._gathered:
            self._gathered[r] = self._alloc((r, self.info.vocab_size), np.float32)
        return self._gathered[r]

    # -- moving rows on the device ------------------------------------------------------------
    def _copy_rows(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Copy whole KV rows (every layer, K and V) src → dst for each (src, dst) row pair."""
        addrs = [(self._ptr(f"{t}.{i}", src), self._ptr(f"{t}.{i}", dst))
                 for src, dst in pairs for t in "kv" for i in range(self.info.num_layers)]
        self._copier.copy(addrs, self._row_elems)

    def _copy_row(self, src_row: int, dst_row: int, n: int) -> None:
        self._copy_rows([(src_row, dst_row)])

    def _swap_rows(self, a: int, b: int, n: int) -> None:
        """Through the scratch row: device buffers have no cheap temporary."""
        self._copy_rows([(a, self._scratch), (b, a), (self._scratch, b)])
