"""What the engine asks of a runtime: the `Runtime` protocol, `RuntimeOptions`, the errors.

No onnxruntime here, so `serve.options` (the CLI's flags) can import `W8A8_MODES` cheaply.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from serve.model_dir import ModelInfo

# Which runs take the export's W8A8 graph (int8 GEMMs): none; every prefill; every prefill and
# every decode step of 2+ sequences; auto = all where the export has a usable one, silently.
W8A8_MODES = ("off", "prefill", "all", "auto")


class ContextFull(Exception):
    """A slot would grow past the KV buffer length."""


class ProviderError(Exception):
    """The requested execution provider is not available in this onnxruntime build."""


@dataclass(frozen=True)
class RuntimeOptions:
    """How to open a model directory (`serve.runtime.open_runtime`); `ServeOptions` maps onto it.

    Attributes:
        provider: `cpu`, `cuda`, `coreml`, `auto` or a full ORT provider name.
        threads: ORT intra-op threads (None: the CPUs this process may use).
        max_batch: KV slots, i.e. sequences decoded together.
        max_length: tokens a slot holds, prompt + completion (None: the export's max length;
            more than that is a ValueError when the runtime opens).
        w8a8: one of `W8A8_MODES` (True means "all", False/None "off").
        cuda_graph: CUDA only: decode on the export's static graph, captured per batch size.
        batch_invariant: run every step, a lone sequence's decode included, on a row-invariant
            W8A8 graph where the export has one (llorch.json `graph.w8a8_row_invariant`), so a
            sequence's tokens never depend on its batch mates; off, a lone sequence decodes on
            the int4 graph (better answers: KL to fp32 0.0030 vs 0.0055).
        coreml_cache_dir: static (CoreML) exports: where compiled models are kept (None:
            `~/.cache/llorch/coreml/<export>`).

    Raises:
        ValueError: `w8a8` is not one of `W8A8_MODES`.
    """

    provider: str = "cpu"
    threads: int | None = None
    max_batch: int = 1
    max_length: int | None = None
    w8a8: str = "off"
    cuda_graph: bool = False
    coreml_cache_dir: Path | None = None
    batch_invariant: bool = False

    def __post_init__(self) -> None:
        mode = "all" if self.w8a8 is True else "off" if self.w8a8 in (False, None) else self.w8a8
        if mode not in W8A8_MODES:
            raise ValueError(f"w8a8 must be one of {W8A8_MODES}, got {self.w8a8!r}")
        object.__setattr__(self, "w8a8", mode)


@runtime_checkable
class Runtime(Protocol):
    """KV slots over one model: what the engine and the prefix cache call.

    A *slot* holds one sequence's KV cache; slot ids are ``0 .. n_slots - 1``. Token ids are
    ints below ``info.vocab_size``; logits are float32 over the vocabulary.

    Optional: ``verify(slot, ids, *, batched=False) -> float32 [len(ids), vocab]`` appends
    several tokens to one slot in one call and returns the logits after each (speculative
    decoding, `serve.speculative`); `HostRuntime` has it, and the engine refuses
    ``speculative`` on runtimes without it.
    """

    info: ModelInfo  # max_length: the tokens one slot holds (prompt + completion)
    n_slots: int
    providers: list  # ORT providers the sessions use, the one that runs the graph first
    # True where a sequence's logits are the same bit for bit whatever the batch it decodes
    # in, the slot it sits in and how its prompt was split into prefill calls (of 2+ tokens);
    # False where a one-row step takes other kernels (the engine's `batch_invariant` then
    # pads a lone decode to two rows).
    batch_invariant: bool

    def length(self, slot: int) -> int:
        """Tokens ``slot`` holds."""
        ...

    def reset(self, slot: int) -> None:
        """Empty ``slot``."""
        ...

    def truncate(self, slot: int, length: int) -> None:
        """Keep the first ``length`` tokens of ``slot``. Raises ValueError past its length."""
        ...

    def copy_slot(self, src: int, dst: int, length: int | None = None) -> None:
        """``dst`` gets ``src``'s KV: all of it, or its first ``length`` tokens.

        Raises:
            ValueError: ``length`` is more than ``src`` holds.
        """
        ...

    def prefill(self, slot: int, ids: Sequence[int]) -> np.ndarray:
        """Append ``ids`` (one or more) to ``slot``'s sequence.

        Returns:
            float32 logits ``[vocab]`` after the last of ``ids``.
        Raises:
            ContextFull: the slot would hold more than ``info.max_length`` tokens.
            ValueError: ``ids`` is empty.
        """
        ...

    def decode(self, slots: Sequence[int], ids: Sequence[int]) -> np.ndarray:
        """Append one token to each of ``slots`` (distinct), ``ids[j]`` to ``slots[j]``.

        Returns:
            float32 logits ``[len(slots), vocab]``, row ``j`` for ``slots[j]``.
        Raises:
            ContextFull: a slot is full (nothing is appended then).
            ValueError: ``slots`` and ``ids`` differ in length.
        """
        ...

    def kv_bytes(self) -> int:
        """Bytes preallocated for the KV cache of all slots (0 where ORT allocates per step)."""
        ...

    def kv_bytes_in_use(self) -> int:
        """Bytes of KV cache holding tokens (every slot's length, idle slots included)."""
        ...
