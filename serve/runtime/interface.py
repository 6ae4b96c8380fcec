"""What the engine asks of a runtime: the `Runtime` protocol, `RuntimeOptions`, the errors.

No onnxruntime here, so `serve.options` (the CLI's flags) can import `W8A8_MODES` cheaply.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from serve.model_dir import ModelInfo

# Which runs take the export's W8A8 graph (int8 GEMMs): none; every prefill; every prefill and
# every decode step of 2+ sequences (every decode step where batch-invariant,
# `w8a8_row_invariant`); auto = all where the export has a usable one, silently.
W8A8_MODES = ("off", "prefill", "all", "auto")


def w8a8_row_invariant(graph: Mapping[str, Any], w8a8: str) -> bool:
    """Whether every step may run on the export's W8A8 graph with each row computed on its
    own: llorch.json's ``graph`` names one and says it is row-invariant
    (``graph.w8a8_row_invariant``, export.graph.mlp), and the ``w8a8`` mode ("all", or
    "auto" before a runtime resolves it) runs decode steps on it."""
    return bool(graph.get("w8a8") and graph.get("w8a8_row_invariant")) and w8a8 in ("all", "auto")


def main_row_invariant(graph: Mapping[str, Any], w8a8: str) -> bool:
    """Whether decode steps run on the export's main graph and every op of it computes a
    row the same whatever the other rows are (llorch.json ``graph.row_invariant``: cpu int4
    exports with every MatMulNBits at accuracy level 4 and no float-zero-point correction,
    export.api.main_row_invariant), the ``w8a8`` mode keeping decode steps off the W8A8 graph
    ("prefill" or "off", or any mode where the export has no W8A8 graph). Auto stays "all"
    where it has one: on the symmetric default model the main graph's lone step is 1.4x
    faster than the W8A8 graph's, but 1.1-1.2x slower at 4 and 16 rows (2 threads,
    2026-12-01), and invariance allows one decode graph only."""
    return bool(graph.get("row_invariant")) and (w8a8 in ("prefill", "off")
                                                  or not graph.get("w8a8"))


def decodes_apart(batch_invariant: bool | None, attention_pad: bool) -> bool:
    """Whether a decode step of 2+ sequences runs as one padded call a sequence (the attention
    pad on, batch invariance asked for: ``batch_invariant`` True), rather than as one unpadded
    call whose rows then compute other numbers than a lone padded step (auto, None: batch
    invariance is taken only where it is free, and under the pad it costs batching; False).
    Used by `HostRuntime` and by the `system_fingerprint`, so both read the same rule."""
    return attention_pad and batch_invariant is True


class ContextFull(Exception):
    """A slot would grow past the KV buffer length."""


class ProviderError(Exception):
    """The requested execution provider is not available in this onnxruntime build."""


def cuda_graph_in_effect(cuda_graph: bool | None, on_cuda: bool, graph: dict) -> bool:
    """Whether decode steps run as captured CUDA graphs: ``cuda_graph`` where it is set, else
    (auto) on the CUDA provider where the export has its static decode graph (llorch.json
    ``graph.cuda_graph``: `llorch export --target cuda`). Used by `open_runtime` and by the
    `system_fingerprint`, so both read the same rule."""
    if cuda_graph is not None:
        return cuda_graph
    return on_cuda and bool(graph.get("cuda_graph"))


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
        cuda_graph: CUDA only: decode on the export's static graph, captured per batch size;
            None (what `llorch serve` passes by default): where the runtime is `CudaRuntime`
            on the GPU and the export has that graph (`cuda_graph_in_effect`).
        batch_invariant: True or None (the default): run every decode step on one
            row-invariant graph — a row-invariant W8A8 graph where the export has one
            (`graph.w8a8_row_invariant`, with ``w8a8`` "all" or "auto"), or the main graph
            with ``w8a8`` "prefill" or "off" where the export says it is one (llorch.json
            `graph.row_invariant`, `main_row_invariant`) — so a sequence's tokens never
            depend on its batch mates (under ``attention_pad`` only with True: see there); False: a lone sequence decodes on the int4 graph
            (closer to fp32, default model: KL 0.0034 vs 0.0053; faster at one row).
        coreml_cache_dir: static (CoreML) exports: where compiled models are kept (None:
            `~/.cache/llorch/coreml/<export>`).
        spin: idle ORT intra-op threads spin-wait for the next op (ORT's default); False
            makes them block at once (host-KV runtimes), for sessions that take turns on the
            same cores (a draft model and its target, `serve.draft_model`).
        device_sampling: pick decode tokens on the execution provider, after the logits
            (`Runtime.decode_sampled`, `serve.runtime.device_sampling`): None = greedy rows where
            decode runs on CUDA (`CudaRuntime.samples_on_device`; sampled rows on the host,
            the device's top-p sort is slower there); True = every row, with any provider (the
            CPU provider too: how CI runs that path).
        attention_pad: host-KV runtimes of exports with the attention pad (llorch.json
            `graph.attention_pad`, export.graph._attention_pad): every call gives each
            GroupQueryAttention one extra query row, so a position computes the same, bit
            for bit, in a one-token decode step, a verify call of several positions
            (speculative decoding) and any prefill chunk. A decode step of 2+ sequences
            cannot take the pad (ORT refuses several query rows per sequence with past
            context for 2+ sequences): with ``batch_invariant`` True it runs one call a
            sequence (batch-invariant; a 4-sequence step 25.8 -> 58.8 ms), else one unpadded
            call (`decodes_apart`), whose rows then compute other numbers than a lone padded
            step: the runtime's `batch_invariant` is then False, though with None every step
            still runs on a row-invariant W8A8 graph. Costs a lone decode step attention over
            two rows (default model, 1 thread: +1% at 60 tokens of context, +10% at 300, +27%
            at 1000).

    Raises:
        ValueError: `w8a8` is not one of `W8A8_MODES`.
    """

    provider: str = "cpu"
    threads: int | None = None
    max_batch: int = 1
    max_length: int | None = None
    w8a8: str = "off"
    cuda_graph: bool | None = False
    coreml_cache_dir: Path | None = None
    batch_invariant: bool | None = None
    device_sampling: bool | None = None
    spin: bool = True
    attention_pad: bool = False

    def __post_init__(self) -> None:
        mode = "all" if self.w8a8 is True else "off" if self.w8a8 in (False, None) else self.w8a8
        if mode not in W8A8_MODES:
            raise ValueError(f"w8a8 must be one of {W8A8_MODES}, got {self.w8a8!r}")
        object.__setattr__(self, "w8a8", mode)


# The most top alternatives `RowDraw.logprobs` may ask for (OpenAI chat's top_logprobs limit).
MAX_DEVICE_LOGPROBS = 20


@dataclass(frozen=True)
class RowDraw:
    """How `Runtime.decode_sampled` picks one row's next token in the runtime.

    The rule is the CPU sampler's (`serve.sampling.Sampler`) for a request without logit_bias,
    penalties or grammar: greedy is the first index of the largest logit; otherwise
    ``w = exp((x - max x) * inv_temperature)`` over the tokens that survive top-k (every logit
    >= the k-th largest), top-p (every ``w`` >= the first value, in descending order, at which
    the float64 cumulative sum reaches ``top_p`` of the total) and min-p (``w >= min_p``), then
    the first token, in vocabulary order, whose float64 cumulative ``w`` exceeds ``u`` times
    the kept total. NaN logits count as -inf, +inf as the float32 maximum, and a row with no
    finite logit picks token 0.

    Attributes:
        greedy: argmax; the other fields but ``logprobs`` are ignored.
        inv_temperature: float32 ``1 / temperature``.
        top_k: keep the ``top_k`` largest logits (and ties); 0 = off.
        top_p: nucleus mass in (0, 1]; 1 = off.
        min_p: in [0, 1]; 0 = off.
        u: the uniform draw in [0, 1) (the host's seeded generator, so seeds reproduce).
        logprobs: None, or how many top alternatives (at most `MAX_DEVICE_LOGPROBS`) to return
            with the chosen token's logprob.
    """

    greedy: bool
    inv_temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    u: float = 0.0
    logprobs: int | None = None


@dataclass(frozen=True)
class RowToken:
    """A token picked by `Runtime.decode_sampled`.

    ``logprob`` (the log-softmax of the raw logits at ``token``) and ``top`` ((token, logprob)
    pairs, most likely first, ``RowDraw.logprobs`` of them, -inf entries included) are None
    unless the row asked for logprobs; the engine floors them for JSON.
    """

    token: int
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] | None = None


@runtime_checkable
class Runtime(Protocol):
    """KV slots over one model: what the engine and the prefix cache call.

    A *slot* holds one sequence's KV cache; slot ids are ``0 .. n_slots - 1``. Token ids are
    ints below ``info.vocab_size``; logits are float32 over the vocabulary.

    Optional: ``verify(slot, ids, *, batched=False) -> float32 [len(ids), vocab]`` appends
    several tokens to one slot in one call and returns the logits after each (speculative
    decoding, `serve.speculative`); `HostRuntime` has it, and the engine refuses
    ``speculative`` on runtimes without it.

    Optional: ``prefill_batch(slots, seqs, *, decoding=None) -> float32 [len(slots), vocab]``
    prefills several empty slots in one call (rows right-padded to the longest;
    `SharedKVRuntime`; ``decoding``: the slots the next decode step runs ahead of these; a call
    that raises leaves every slot empty, as the engine then prefills each row alone), with
    ``prefill_padding`` (float | None) the most padded tokens per real token worth batching
    (None: padding is free next to a call's fixed cost, as on GPUs); the engine prefills one
    prompt a call on runtimes without it (`Engine._plan_prefill`).
    """

    info: ModelInfo  # max_length: the tokens one slot holds (prompt + completion)
    n_slots: int
    providers: list  # ORT providers the sessions use, the one that runs the graph first
    # True where a sequence's logits are the same bit for bit whatever the batch it decodes
    # in, the slot it sits in and how its prompt was split into prefill calls (of 2+ tokens);
    # False where a one-row step takes other kernels (the engine's `batch_invariant` then
    # pads a lone decode to two rows).
    batch_invariant: bool
    # True where `decode_sampled` picks tokens in the runtime (on the device, after the
    # logits) instead of bringing every row's logits to the host.
    device_sampling: bool

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
            float32 logits ``[len(slots), vocab]``, row ``j`` for ``slots[j]``; valid until the
            runtime's next call (captured CUDA steps return a view of one host buffer, which
            a fresh 12.6 MB array a step made 2x slower): copy it to keep it.
        Raises:
            ContextFull: a slot is full (nothing is appended then).
            ValueError: ``slots`` and ``ids`` differ in length.
        """
        ...

    def decode_sampled(self, slots: Sequence[int], ids: Sequence[int],
                       draws: Sequence[RowDraw | None]) -> list[RowToken | np.ndarray]:
        """`decode`, with the next token of row ``j`` picked in the runtime where ``draws[j]``
        says how (`RowDraw`); only the rows whose ``draws[j]`` is None bring their logits to
        the host. Only where ``device_sampling`` is True.

        Returns:
            per row, a `RowToken` or (``draws[j]`` None) float32 logits ``[vocab]``.
        Raises:
            ContextFull: as `decode` (nothing is appended then).
            ValueError: ``slots``, ``ids`` and ``draws`` differ in length.
            NotImplementedError: ``device_sampling`` is False.
        """
        ...

    def kv_bytes(self) -> int:
        """Bytes preallocated for the KV cache of all slots (0 where ORT allocates per step)."""
        ...

    def kv_bytes_in_use(self) -> int:
        """Bytes of KV cache holding tokens (every slot's length, idle slots included)."""
        ...
