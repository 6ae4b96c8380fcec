"""`ServeOptions`: everything `llorch serve` is told, built once at the edge (CLI or tests)."""

from __future__ import annotations

import argparse
from dataclasses import Field, dataclass, field, fields
from pathlib import Path
from typing import Any

from serve.runtime.interface import W8A8_MODES

PROVIDERS = ("cpu", "cuda", "coreml", "auto")


def _flag(default: Any, help: str, **argparse: Any) -> Any:
    """A `ServeOptions` field that is also the `llorch serve` flag ``--field-name``: its help
    (``%(default)s`` expands) and any other `add_argument` keywords (type, action, …)."""
    return field(default=default, metadata={"help": help, **argparse})


def _origins(value: str) -> tuple[str, ...]:
    return tuple(o.strip() for o in value.split(",") if o.strip())


@dataclass(frozen=True)
class ServeOptions:
    """Options of one server process, built once at the edge (CLI or tests).

    ``model_dir`` is the exported model directory to serve; every other field is a flag of
    `llorch serve` (``--max-batch`` for ``max_batch``), documented by its help below.
    """

    model_dir: Path
    model_name: str | None = _flag(
        None, "id in /v1/models and the only accepted `model` (default: the directory's name "
        "without a -int4/-fp32 suffix)")
    host: str = _flag("127.0.0.1", "bind address (default: %(default)s)")
    port: int = _flag(8000, "port (default: %(default)s)", type=int)
    provider: str = _flag(
        "cpu", f"{'|'.join(PROVIDERS)} or an ORT provider name (default: %(default)s); a "
        "provider this onnxruntime lacks is an error; only 'auto' falls back")
    threads: int | None = _flag(
        None, "ORT intra-op threads (default: the CPUs this process may use)", type=int)
    max_length: int | None = _flag(
        None, "context per slot, prompt + completion (default: the export's max length)",
        type=int)
    max_batch: int = _flag(4, "KV slots: sequences decoded together (default: %(default)s)",
                           type=int)
    # 256 on CPU, where a chunk's attention to itself is the quadratic part: 1000 tokens in
    # 0.92-1.00 s at 256 vs 1.05-1.28 s at 512.
    prefill_chunk: int | None = _flag(
        None, "prompt tokens per prefill step, so a long prompt does not stall the other "
        "streams (default: 256 on CPU, 512 on GPUs)", type=int)
    api_key: str | None = _flag(
        None, "require 'Authorization: Bearer KEY' on /v1, /tokenize and /detokenize")
    log_level: str = _flag("info", "Python / uvicorn log level (default: %(default)s)",
                           choices=["critical", "error", "warning", "info", "debug"])
    max_body_bytes: int = _flag(8 * 1024 * 1024,
                                "larger request bodies get 413 (default: %(default)s)", type=int)
    max_queue: int = _flag(
        256, "requests that may wait for a slot; more get 429 + Retry-After "
        "(default: %(default)s)", type=int)
    queue_timeout: float | None = _flag(
        None, "seconds a request may wait for a slot before it gets 503 (default: no limit)",
        type=float)
    # KV memory is preallocated per slot: this bounds the reusable (and the reported in-use)
    # KV, not the allocation.
    prefix_cache_size: int | None = _flag(
        None, "tokens idle slots keep for reuse by prompts with the same prefix, LRU "
        "(default: all they hold; 0: off)", type=int)
    cors_origins: tuple[str, ...] = _flag(
        (), "comma-separated origins allowed by CORS, or '*' (default: CORS off)",
        type=_origins)
    log_prompts: bool = _flag(
        False, "log each request's prompt text (off: prompts are never logged)",
        action="store_true")
    drain_timeout: float = _flag(
        15.0, "after SIGTERM/SIGINT, seconds running requests get to finish before they end "
        "with an error; new requests get 503 meanwhile (default: %(default)g)", type=float)
    # Only where the graphs are not batch-invariant by themselves: int4 MatMulNBits at
    # accuracy level 0 has a one-row kernel of its own (the main graph's down_proj).
    batch_invariant: bool = _flag(
        False, "where a decode step is not batch-invariant by itself (--w8a8 off|prefill, "
        "exports before graph.w8a8_row_invariant): decode a lone sequence as a batch of two, "
        "so its text is the same as in any batch (about 12-30%% slower for one stream); "
        "default int4 exports are invariant without it", action="store_true")
    # Quality on the default model: KL to fp32 0.0055 vs int4's 0.0030, perplexity 14.85 vs
    # 14.72; a lone sequence's decode stays on the int4 graph, faster at one row.
    w8a8: str = _flag(
        "auto", "runs on the export's W8A8 graph (int8 GEMMs, smoothed activations): all = "
        "prefill + decode steps of 2+ sequences, prefill, off; auto = all where the export has "
        "one (default: %(default)s; bare --w8a8: all)", nargs="?", const="all",
        choices=W8A8_MODES)
    cuda_graph: bool = _flag(
        False, "--provider cuda: capture decode steps as CUDA graphs (one per batch size) on "
        "the export's static decode graph", action="store_true")

    def __post_init__(self) -> None:
        object.__setattr__(self, "model_dir", Path(self.model_dir))
        object.__setattr__(self, "cors_origins", tuple(self.cors_origins))
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")
        if self.queue_timeout is not None and self.queue_timeout <= 0:
            raise ValueError(f"queue_timeout must be > 0, got {self.queue_timeout}")
        if self.prefix_cache_size is not None and self.prefix_cache_size < 0:
            raise ValueError(f"prefix_cache_size must be >= 0, got {self.prefix_cache_size}")
        if self.drain_timeout < 0:
            raise ValueError(f"drain_timeout must be >= 0, got {self.drain_timeout}")
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {self.max_batch}")
        if self.prefill_chunk is not None and self.prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be at least 1, got {self.prefill_chunk}")
        if self.cuda_graph and self.provider not in ("cuda", "CUDAExecutionProvider"):
            raise ValueError(f"cuda_graph needs --provider cuda, not {self.provider}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The serve flags: one per `ServeOptions` field (model_dir excluded), as the field says."""
    for f in _flags():
        parser.add_argument(f"--{f.name.replace('_', '-')}", default=f.default, **f.metadata)


def options_from_args(model_dir: Path, args: argparse.Namespace) -> ServeOptions:
    """`ServeOptions` from flags parsed with `add_arguments`.

    Raises:
        ValueError: flags that contradict each other or are out of range.
    """
    return ServeOptions(model_dir=model_dir,
                        **{f.name: getattr(args, f.name) for f in _flags()})


def _flags() -> list[Field]:
    return [f for f in fields(ServeOptions) if f.name != "model_dir"]
