"""`ServeOptions`: everything `llorch serve` is told, built once at the edge (CLI or tests)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from serve.parsers import REASONING_PARSERS, TOOL_PARSERS

PROVIDERS = ("cpu", "cuda", "coreml", "auto")
# Which runs take the export's W8A8 graph (int8 GEMMs): none; every prefill; every prefill and
# every decode step of 2+ sequences; auto = all where the export has a usable one, silently.
W8A8_MODES = ("off", "prefill", "all", "auto")


@dataclass(frozen=True)
class ServeOptions:
    """Options of one server process; every CLI flag maps onto one field.

    Attributes:
        model_dir: the exported model directory to serve.
        model_name: the id in `/v1/models` and the only accepted `model`; default: the
            directory's name without a `-int4`/`-fp32` suffix (`serve.model_dir`).
        host, port: where uvicorn listens (127.0.0.1 unless asked otherwise).
        provider: `cpu`, `cuda`, `coreml` or `auto` (or a full ORT provider name). Anything
            but `auto` must be available in this onnxruntime build; no silent fallback.
        threads: ORT intra-op threads (None: ORT's default).
        max_length: context length to allocate per KV slot (None: the model's).
        max_batch: KV slots, i.e. sequences decoded together.
        prefill_chunk: prompt tokens per prefill call, so a long prompt does not stall
            the other streams (None: 256 on CPU, where a chunk's attention to itself is
            the quadratic part — 1000 tokens in 0.92-1.00 s at 256 vs 1.05-1.28 s at 512 —
            and 512 on GPUs).
        api_key: when set, `/v1/*`, `/tokenize` and `/detokenize` require
            `Authorization: Bearer <api_key>`.
        log_level: Python / uvicorn log level name.
        max_body_bytes: larger request bodies are refused with 413.
        max_queue: the most requests that may wait for a slot; past it, 429 + Retry-After.
        queue_timeout: seconds a request may wait for a slot before it gets 503 (None: no limit).
        prefix_cache_size: the most tokens idle slots keep as a prefix cache (LRU eviction;
            None: all they hold; 0: off). KV memory is preallocated per slot, so this bounds
            the reusable (and the reported in-use) KV, not the allocation.
        cors_origins: origins allowed by CORS (`*` for any); empty: CORS off.
        log_prompts: log each request's prompt text (never logged otherwise).
        drain_timeout: after SIGTERM/SIGINT, seconds running requests get to finish before
            they end with an error; new requests get 503 meanwhile.
        batch_invariant: decode a lone sequence as a batch of two (a padding row), so greedy
            text never depends on what else runs (int4 CPU kernels round one row differently);
            costs about a third of single-stream speed on int4.
        w8a8: which runs take the export's W8A8 graph (int8 weights, smoothed per-token int8
            activations: AMX/VNNI GEMMs): "all" = prefill and decode steps of 2+ sequences
            (a lone sequence's decode stays on the int4 graph, faster at one row), "prefill",
            "off"; "auto" (default) = "all" where the export has one (cpu int4), else off.
            Quality on the default model: KL to fp32 0.0055 vs int4's 0.0030, perplexity
            14.85 vs 14.72.
        cuda_graph: --provider cuda: decode steps on the export's static decode graph,
            captured as a CUDA graph once per batch size (ORT's enable_cuda_graph).
        tool_call_parser: the tool-call syntax the model writes (`serve.parsers.TOOL_PARSERS`);
            "auto" detects it from the chat template (generic for templates without tools).
        reasoning_parser: "think" splits `<think>…</think>` into `reasoning_content`, "none"
            never does; "auto" when the chat template mentions `<think>`.
    """

    model_dir: Path
    model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    provider: str = "cpu"
    threads: int | None = None
    max_length: int | None = None
    max_batch: int = 4
    prefill_chunk: int | None = None
    api_key: str | None = None
    log_level: str = "info"
    max_body_bytes: int = 8 * 1024 * 1024
    max_queue: int = 256
    queue_timeout: float | None = None
    prefix_cache_size: int | None = None
    cors_origins: tuple[str, ...] = ()
    log_prompts: bool = False
    drain_timeout: float = 15.0
    batch_invariant: bool = False
    w8a8: str = "auto"
    cuda_graph: bool = False
    tool_call_parser: str = "auto"
    reasoning_parser: str = "auto"

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
        if self.tool_call_parser not in ("auto", *TOOL_PARSERS):
            raise ValueError(f"tool_call_parser must be auto or one of {', '.join(TOOL_PARSERS)}, "
                             f"not {self.tool_call_parser!r}")
        if self.reasoning_parser not in ("auto", "none", *REASONING_PARSERS):
            raise ValueError(f"reasoning_parser must be auto, none or one of "
                             f"{', '.join(REASONING_PARSERS)}, not {self.reasoning_parser!r}")
        if self.cuda_graph and self.provider not in ("cuda", "CUDAExecutionProvider"):
            raise ValueError(f"cuda_graph needs --provider cuda, not {self.provider}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The serve flags, one per `ServeOptions` field (model_dir excluded)."""
    d = ServeOptions(model_dir=Path("."))
    parser.add_argument("--model-name", default=None, help="id in /v1/models (default: directory name)")
    parser.add_argument("--host", default=d.host, help=f"bind address (default: {d.host})")
    parser.add_argument("--port", type=int, default=d.port, help=f"port (default: {d.port})")
    parser.add_argument("--provider", default=d.provider,
                        help=f"{'|'.join(PROVIDERS)} or an ORT provider name (default: {d.provider}); "
                        "a provider this onnxruntime lacks is an error; only 'auto' falls back")
    parser.add_argument("--threads", type=int, default=None, help="ORT intra-op threads (default: the CPUs this process may use)")
    parser.add_argument("--max-length", type=int, default=None, help="context per slot, prompt + completion (default: the export's max length)")
    parser.add_argument("--max-batch", type=int, default=d.max_batch, help=f"KV slots: sequences decoded together (default: {d.max_batch})")
    parser.add_argument("--prefill-chunk", type=int, default=d.prefill_chunk,
                        help="prompt tokens per prefill step (default: 256 on CPU, 512 on GPUs)")
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1")
    parser.add_argument("--log-level", default=d.log_level,
                        choices=["critical", "error", "warning", "info", "debug"])
    parser.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes,
                        help=f"larger request bodies get 413 (default: {d.max_body_bytes})")
    parser.add_argument("--max-queue", type=int, default=d.max_queue,
                        help=f"requests that may wait for a slot; more get 429 (default: {d.max_queue})")
    parser.add_argument("--queue-timeout", type=float, default=None,
                        help="seconds a request may wait for a slot before it gets 503 (default: no limit)")
    parser.add_argument("--prefix-cache-size", type=int, default=None,
                        help="tokens idle slots keep for reuse by prompts with the same prefix, "
                        "LRU (default: all they hold; 0: off)")
    parser.add_argument("--cors-origins", type=_origins, default=(),
                        help="comma-separated origins allowed by CORS, or '*' (default: CORS off)")
    parser.add_argument("--log-prompts", action="store_true",
                        help="log each request's prompt text (off: prompts are never logged)")
    parser.add_argument("--drain-timeout", type=float, default=d.drain_timeout,
                        help="after SIGTERM/SIGINT, seconds running requests get to finish "
                        f"(default: {d.drain_timeout:g})")
    parser.add_argument("--batch-invariant", action="store_true",
                        help="decode a lone sequence as a batch of two, so its greedy text is the "
                        "same as in any batch (int4: about a third slower for one stream)")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="--provider cuda: capture decode steps as CUDA graphs (one per batch "
                        "size) on the export's static decode graph")
    parser.add_argument("--w8a8", nargs="?", const="all", default=d.w8a8, choices=W8A8_MODES,
                        help="runs on the export's W8A8 graph (int8 GEMMs, smoothed activations): "
                        "all = prefill + decode steps of 2+ sequences, prefill, off; auto = all "
                        "where the export has one (default: %(default)s; bare --w8a8: all)")
    parser.add_argument("--tool-call-parser", default=d.tool_call_parser, choices=("auto", *TOOL_PARSERS),
                        help="the tool-call syntax the model writes; auto: detected from the chat "
                        "template, 'generic' for templates without tool support (default: auto)")
    parser.add_argument("--reasoning-parser", default=d.reasoning_parser,
                        choices=("auto", "none", *REASONING_PARSERS),
                        help="split <think>…</think> into reasoning_content: think, none, or auto "
                        "(when the chat template mentions <think>; default)")


def _origins(value: str) -> tuple[str, ...]:
    return tuple(o.strip() for o in value.split(",") if o.strip())


def options_from_args(model_dir: Path, args: argparse.Namespace) -> ServeOptions:
    return ServeOptions(
        model_dir=model_dir,
        model_name=args.model_name,
        host=args.host,
        port=args.port,
        provider=args.provider,
        threads=args.threads,
        max_length=args.max_length,
        max_batch=args.max_batch,
        prefill_chunk=args.prefill_chunk,
        api_key=args.api_key,
        log_level=args.log_level,
        max_body_bytes=args.max_body_bytes,
        max_queue=args.max_queue,
        queue_timeout=args.queue_timeout,
        prefix_cache_size=args.prefix_cache_size,
        cors_origins=args.cors_origins,
        log_prompts=args.log_prompts,
        drain_timeout=args.drain_timeout,
        batch_invariant=args.batch_invariant,
        w8a8=args.w8a8,
        cuda_graph=args.cuda_graph,
        tool_call_parser=args.tool_call_parser,
        reasoning_parser=args.reasoning_parser,
    )
