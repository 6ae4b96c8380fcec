"""`ServeOptions`: everything `llorch serve` is told, built once at the edge (CLI or tests)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

PROVIDERS = ("cpu", "cuda", "coreml", "auto")


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
            the other streams.
        api_key: when set, `/v1/*` requires `Authorization: Bearer <api_key>`.
        log_level: Python / uvicorn log level name.
        max_body_bytes: larger request bodies are refused with 413.
    """

    model_dir: Path
    model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    provider: str = "cpu"
    threads: int | None = None
    max_length: int | None = None
    max_batch: int = 1
    prefill_chunk: int = 512
    api_key: str | None = None
    log_level: str = "info"
    max_body_bytes: int = 8 * 1024 * 1024

    def __post_init__(self) -> None:
        object.__setattr__(self, "model_dir", Path(self.model_dir))
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {self.max_batch}")
        if self.prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be at least 1, got {self.prefill_chunk}")
