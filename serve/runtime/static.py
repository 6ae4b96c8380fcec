"""Runtime for static-shape exports (``llorch export --target coreml``): the host holds the KV.

The export has two graphs with fixed shapes (export/graph_coreml.py): ``decode`` takes one
token, ``prefill`` a chunk of ``chunk`` tokens padded on the right. Per call the host

  * gathers the rows of ``embed_tokens.npy`` for the tokens (vocabularies over 16384 keep the
    table out of the graph, since CoreML rejects larger dimensions),
  * passes the slot's whole cache ``[1, kv_heads, L, head_dim]`` per layer with an additive
    mask that opens the slot's first ``length`` columns and, causally, the chunk's own,
  * writes the chunk's new K/V (outputs ``present.{i}.key/value`` ``[1, kv_heads, S, hd]``)
    into the cache at ``length .. length + n - 1``.

Sequences run one at a time (the graphs have batch 1); the interface is
``serve.runtime.Runtime``'s.
``--provider cpu`` runs these graphs on ONNX Runtime's CPU provider (how CI tests them);
``--provider coreml`` asks for the CoreML provider in ML Program format with a model cache.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from serve.model_dir import ModelDirError, ModelInfo
from serve.runtime.interface import RuntimeOptions
from serve.runtime.session import resolve_providers, session_options, w8a8_unused
from serve.runtime.slots import SlotRuntime, with_max_length

VARIANT = "static-kv-host"


def coreml_cache_dir(model_dir: Path) -> Path:
    """Where CoreML keeps compiled models: one folder per export (path and graph bytes)."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    key = hashlib.sha256(str(Path(model_dir).resolve()).encode()).hexdigest()[:12]
    return base / "llorch" / "coreml" / f"{Path(model_dir).name}-{key}"


def static_providers(provider: str, model_dir: Path, cache_dir: Path | None = None) -> list:
    """ORT providers for the static graphs; CoreML gets ML Program format + a model cache.

    Raises ProviderError (from resolve_providers) when the build lacks the provider.
    """
    names = resolve_providers(provider)
    if names[0] != "CoreMLExecutionProvider":
        return names
    cache = Path(cache_dir) if cache_dir is not None else coreml_cache_dir(model_dir)
    cache.mkdir(parents=True, exist_ok=True)
    options = {
        "ModelFormat": "MLProgram",
        "MLComputeUnits": "ALL",
        "RequireStaticInputShapes": "1",
        "ModelCacheDirectory": str(cache),
    }
    return [("CoreMLExecutionProvider", options), *names[1:]]


class _Graph:
    """One static graph: session, persistent input/output buffers, IO binding per slot."""

    def __init__(self, session: ort.InferenceSession, seq: int, info: ModelInfo,
                 graph: dict, dtype: np.dtype, length: int):
        self.session, self.seq = session, seq
        inputs = {i.name: i for i in session.get_inputs()}
        names = set(inputs)
        self.embeds = (np.zeros((1, seq, inputs["inputs_embeds"].shape[2]), dtype)
                       if "inputs_embeds" in names else None)
        self.ids = np.zeros((1, seq), np.int64) if "input_ids" in names else None
        self.positions = np.zeros((1, seq), np.int64)
        self.mask = np.zeros((1, 1, seq, length + seq), dtype)
        self.causal = np.tril(np.ones((seq, seq), bool))
        self.index = np.zeros((1, 1), np.int64) if "logits_index" in names else None
        parts = graph["logits_parts"]
        self.logit_names = ["logits"] if len(parts) == 1 else [f"logits.{j}"
                                                               for j in range(len(parts))]
        self.logits = [np.zeros((1, 1, n), np.float32) for n in parts]
        shape = (1, info.num_kv_heads, seq, info.head_dim)
        self.new_k = [np.zeros(shape, dtype) for _ in range(info.num_layers)]
        self.new_v = [np.zeros(shape, dtype) for _ in range(info.num_layers)]
        self.bindings: dict[int, ort.IOBinding] = {}

    def binding(self, slot: int, k: list[np.ndarray], v: list[np.ndarray], info: ModelInfo
                ) -> ort.IOBinding:
        """Inputs and outputs bound once to persistent buffers (zero-copy on the CPU provider;
        other providers copy what they need per run); the slot's cache rows as past."""
        io = self.bindings.get(slot)
        if io is not None:
            return io
        io = self.session.io_binding()
        keep = []  # OrtValues over numpy memory must live as long as the binding

        def bind_in(name: str, arr: np.ndarray) -> None:
            ov = ort.OrtValue.ortvalue_from_numpy(arr)
            keep.append(ov)
            io.bind_ortvalue_input(name, ov)

        def bind_out(name: str, arr: np.ndarray) -> None:
            ov = ort.OrtValue.ortvalue_from_numpy(arr)
            keep.append(ov)
            io.bind_ortvalue_output(name, ov)

        if self.embeds is not None:
            bind_in("inputs_embeds", self.embeds)
        if self.ids is not None:
            bind_in("input_ids", self.ids)
        bind_in("position_ids", self.positions)
        bind_in("attention_mask", self.mask)
        if self.index is not None:
            bind_in("logits_index", self.index)
        for i in range(info.num_layers):
            bind_in(info.past_key % i, k[i][slot:slot + 1])
            bind_in(info.past_value % i, v[i][slot:slot + 1])
            bind_out(info.present_key % i, self.new_k[i])
            bind_out(info.present_value % i, self.new_v[i])
        for name, arr in zip(self.logit_names, self.logits, strict=False):
            bind_out(name, arr)
        io._llorch_keep = keep  # type: ignore[attr-defined]
        self.bindings[slot] = io
        return io


class StaticRuntime(SlotRuntime):
    """Static decode/prefill graphs with the KV cache in host memory (module docstring).

    Raises:
        ModelDirError: a graph file llorch.json names is missing.
        ProviderError: this onnxruntime build lacks ``options.provider``.
        ValueError: ``options.max_length`` exceeds the graphs' fixed cache length.
    """

    def __init__(self, info: ModelInfo, options: RuntimeOptions) -> None:
        if options.w8a8 != "off":
            w8a8_unused(options.w8a8, "static (--target coreml) exports have no W8A8 graph")
        graph = info.graph
        decode_file, prefill_file = info.path / graph["decode"], info.path / graph["prefill"]
        for f in (decode_file, prefill_file):
            if not f.is_file():
                raise ModelDirError(f"{f}: graph file named in llorch.json is missing")
        self.providers = static_providers(options.provider, info.path, options.coreml_cache_dir)
        so = session_options(options.threads)
        decode = ort.InferenceSession(str(decode_file), so, providers=self.providers)
        prefill = ort.InferenceSession(str(prefill_file), so, providers=self.providers)
        past = {i.name: i for i in decode.get_inputs()}[info.past_key % 0]
        buffer_len = int(past.shape[2])  # the graphs' fixed cache length
        super().__init__(with_max_length(info, options.max_length, buffer_len),
                         options.max_batch, np.dtype(graph["io_dtype"]).type)
        self.chunk = int(graph["chunk"])
        self._mask_value = float(graph["mask_value"])
        self._len = buffer_len
        dtype = np.dtype(self.kv_dtype)
        self._embed = (np.load(info.path / graph["embed_file"], mmap_mode="r")
                       if graph["host_embedding"] else None)
        shape = (self.n_slots, info.num_kv_heads, buffer_len, info.head_dim)
        self._k = [np.zeros(shape, dtype) for _ in range(info.num_layers)]
        self._v = [np.zeros(shape, dtype) for _ in range(info.num_layers)]
        self._decode = _Graph(decode, 1, self.info, graph, dtype, buffer_len)
        self._prefill = _Graph(prefill, self.chunk, self.info, graph, dtype, buffer_len)

    # -- the rest of the interface (length/reset/truncate/kv_bytes: SlotRuntime) ----------
    def prefill(self, slot: int, ids: Sequence[int]) -> np.ndarray:
        """Append ``ids`` in chunks; float32 logits [vocab] after the last one."""
        self._begin_prefill(slot, ids)
        logits = None
        for start in range(0, len(ids), self.chunk):
            logits = self._step(slot, ids[start:start + self.chunk])
        return logits

    def decode(self, slots: Sequence[int], ids: Sequence[int]) -> np.ndarray:
        """One token per slot (one graph call each); float32 logits [len(slots), vocab]."""
        if len(slots) != len(ids):
            raise ValueError("decode needs one token id per slot")
        for s in slots:
            self._check_room(s, 1)
        return np.stack([self._step(s, [t]) for s, t in zip(slots, ids, strict=False)])

    def copy_slot(self, src: int, dst: int, length: int | None = None) -> None:
        """dst gets src's KV: all of it, or its first ``length`` tokens (a shared prefix)."""
        n = self._copied_length(src, length)
        if src != dst:
            for buf in (*self._k, *self._v):
                buf[dst, :, :n] = buf[src, :, :n]
        self._lengths[dst] = n

    # -- one graph call ---------------------------------------------------------------------
    def _step(self, slot: int, ids: Sequence[int]) -> np.ndarray:
        """Run ``ids`` (1 token: decode graph, else ≤ chunk: prefill graph) after the slot's
        cache, write their K/V into it, return the logits after the last one."""
        n = len(ids)
        g = self._decode if n == 1 else self._prefill
        p, L, s = self._lengths[slot], self._len, g.seq
        ids_arr = np.zeros(s, np.int64)
        ids_arr[:n] = ids
        if g.embeds is not None:
            g.embeds[0] = self._embed[ids_arr]
        else:
            g.ids[0] = ids_arr
        # padding rows get in-range positions; their outputs are never read
        g.positions[0] = np.minimum(p + np.arange(s), L - 1)
        g.mask.fill(self._mask_value)
        g.mask[..., :p] = 0.0
        g.mask[0, 0, :, L:][g.causal] = 0.0
        if g.index is not None:
            g.index[0, 0] = n - 1
        io = g.binding(slot, self._k, self._v, self.info)
        g.session.run_with_iobinding(io)
        for i in range(self.info.num_layers):
            self._k[i][slot, :, p:p + n] = g.new_k[i][0, :, :n]
            self._v[i][slot, :, p:p + n] = g.new_v[i][0, :, :n]
        self._lengths[slot] = p + n
        return np.concatenate([part[0, 0] for part in g.logits])
