"""`SlotRuntime`: the slot bookkeeping every runtime shares (lengths, limits, KV byte counts)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from serve.model_dir import ModelInfo
from serve.runtime.interface import ContextFull


def with_max_length(info: ModelInfo, max_length: int | None, limit: int) -> ModelInfo:
    """``info`` with ``max_length`` tokens a slot (None: ``limit``, what the export holds).

    Raises:
        ValueError: ``max_length`` is more than ``limit``.
    """
    if max_length is not None and max_length > limit:
        raise ValueError(f"--max-length {max_length} exceeds the export's max_length {limit}"
                         " (re-export with a larger --max-length)")
    return replace(info, max_length=max_length or limit)


class SlotRuntime:
    """Token counts of ``n_slots`` slots over a model whose KV holds ``kv_dtype`` values.

    Subclasses own the KV memory and the ORT sessions; see `serve.runtime.Runtime` for the
    interface they complete (prefill, decode, copy_slot).
    """

    providers: list
    # Whether a sequence's logits are the same bit for bit whatever else is in its decode
    # step or prefill chunk (`serve.runtime.Runtime.batch_invariant`); runtimes that know
    # their graphs to be say so.
    batch_invariant = False
    # Whether `decode_sampled` picks tokens in the runtime (`serve.runtime.Runtime`); runtimes
    # that can say so.
    device_sampling = False
    # Whether a position's KV and logits are the same bit for bit whichever call computed it
    # (a one-token decode step alone or beside others, a verify call, any prefill chunk):
    # `HostRuntime` with the attention pad, batch-invariant.
    positions_alike = False

    def __init__(self, info: ModelInfo, n_slots: int, kv_dtype: type) -> None:
        self.info = info
        self.n_slots = n_slots
        self.kv_dtype = kv_dtype
        self._lengths = [0] * n_slots

    def length(self, slot: int) -> int:
        return self._lengths[slot]

    def reset(self, slot: int) -> None:
        self._lengths[slot] = 0

    def truncate(self, slot: int, length: int) -> None:
        if not 0 <= length <= self._lengths[slot]:
            raise ValueError(f"cannot truncate slot {slot} of length {self._lengths[slot]} "
                             f"to {length}")
        self._lengths[slot] = length

    def decode_sampled(self, slots: Sequence[int], ids: Sequence[int], draws: Sequence) -> list:
        """Only runtimes whose ``device_sampling`` is True pick tokens (`Runtime.decode_sampled`).

        Raises:
            NotImplementedError: always, here.
        """
        raise NotImplementedError(f"{type(self).__name__} returns logits: sample on the host")

    def kv_bytes(self) -> int:
        """Bytes preallocated for the KV cache of all slots."""
        return self.n_slots * self.info.max_length * self._kv_token_bytes()

    def kv_bytes_in_use(self) -> int:
        """Bytes of KV cache holding tokens (every slot's length, idle slots included)."""
        return sum(self._lengths) * self._kv_token_bytes()

    def _kv_token_bytes(self) -> int:
        return (2 * self.info.num_layers * self.info.num_kv_heads * self.info.head_dim
                * np.dtype(self.kv_dtype).itemsize)

    def _copied_length(self, src: int, length: int | None) -> int:
        """Tokens ``copy_slot(src, dst, length)`` copies; ValueError past what src holds."""
        n = self._lengths[src] if length is None else length
        if not 0 <= n <= self._lengths[src]:
            raise ValueError(f"cannot copy {n} tokens of slot {src} of length {self._lengths[src]}")
        return n

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
