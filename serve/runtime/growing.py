"""`GrowingKVRuntime`: decoders exported by optimum-cli (standard attention, ``position_ids``).

The past grows each step: ORT concatenates it and returns the new arrays, which this runtime
keeps per slot and feeds back. Sequences run one at a time.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnxruntime as ort

from serve.model_dir import ModelInfo
from serve.runtime.interface import RuntimeOptions
from serve.runtime.session import kv_dtype, open_w8a8_session, resolve_providers, session_options
from serve.runtime.slots import SlotRuntime, with_max_length


class GrowingKVRuntime(SlotRuntime):
    """One ORT session; each slot's past is the list of arrays the last call returned."""

    def __init__(self, info: ModelInfo, options: RuntimeOptions) -> None:
        self.providers = resolve_providers(options.provider)
        so = session_options(options.threads)
        self.session = ort.InferenceSession(str(info.onnx_file), so, providers=self.providers)
        open_w8a8_session(info, options.w8a8, so, self.providers)  # says why it cannot apply
        super().__init__(with_max_length(info, options.max_length, info.max_length),
                         options.max_batch, kv_dtype(self.session, info))
        self._empty = np.zeros((1, info.num_kv_heads, 0, info.head_dim), self.kv_dtype)
        self._past: list[list[np.ndarray] | None] = [None] * self.n_slots
        self._has_pos = "position_ids" in {i.name for i in self.session.get_inputs()}
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
        if len(slots) != len(ids):
            raise ValueError("decode needs one token id per slot")
        return np.stack([self._run(s, [t]) for s, t in zip(slots, ids, strict=True)])

    def copy_slot(self, src: int, dst: int, length: int | None = None) -> None:
        self._past[dst] = None if self._past[src] is None else list(self._past[src])
        self._lengths[dst] = self._lengths[src]
        if length is not None:
            self.truncate(dst, length)
