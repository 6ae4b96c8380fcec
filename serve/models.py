"""The models one server serves: a registry of entries, each loaded on demand with its own engine.

```
request ──lease(id)──► ModelEntry ── loaded? ──yes──► engine (leases += 1 until the route returns)
                            │ no
                            ▼  entry.load_lock (one load per model), other models keep serving
                       make room: while loaded ≥ --max-loaded-models or over --memory-budget,
                       stop the least recently used idle model (no lease, no request in flight)
                            ▼
                       load(entry) on a worker thread ──► loaded | error (kept; POST …/load retries)
```

A model is idle when no route holds it (a route holds it from the lookup until its handler
returns, by which time its requests are submitted) and its engine has no request in flight,
so eviction never stops an engine under a request. `--idle-unload S` stops models idle for S
seconds. Memory is accounted, not measured: a model's size is its graph and weight files plus
its KV cache (estimated from the shapes before loading, the engine's own count after).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from serve.errors import APIError, InvalidRequestError, NotFoundError, ServiceUnavailableError
from serve.fingerprint import system_fingerprint
from serve.model_dir import ModelDirError, ModelInfo, load_model_info
from serve.options import ModelSpec, ServeOptions

log = logging.getLogger("serve.models")

UNLOADED, LOADING, LOADED, ERROR = "unloaded", "loading", "loaded", "error"
_WEIGHT_SUFFIXES = (".onnx", ".data", ".onnx_data", ".bin")


class ModelLoadFailed(APIError):
    """The model's files could not be loaded; the message names the file (500)."""

    status_code = 500
    type = "server_error"


class ModelBusy(APIError):
    """An operator asked to unload a model that requests are using (409)."""

    status_code = 409
    type = "invalid_request_error"


def discover(models_dir: Path) -> list[ModelSpec]:
    """Every model directory directly beneath ``models_dir``, sorted by name: one with
    genai_config.json (llorch, ONNX Runtime GenAI), or config.json beside an ONNX decoder
    (optimum-cli). A Hugging Face checkpoint (config.json, no graph) is a source, not served.

    Raises:
        ValueError: ``models_dir`` is not a directory.
    """
    if not models_dir.is_dir():
        raise ValueError(f"--models-dir {models_dir}: not a directory")

    def servable(p: Path) -> bool:
        return (p / "genai_config.json").is_file() or ((p / "config.json").is_file() and any(
            (p / f).is_file() for f in ("model.onnx", "decoder_model_merged.onnx")))

    return [ModelSpec(p) for p in sorted(models_dir.iterdir()) if p.is_dir() and servable(p)]


class ModelEntry:
    """One served model: its options (the server's, with this directory and id), what its
    JSON files say (`info`, None if they are broken), state, engine and bookkeeping."""

    def __init__(self, model_id: str, options: ServeOptions, info: ModelInfo | None,
                 error: str | None = None) -> None:
        self.id = model_id
        self.options = options
        self.info = info
        self.status = ERROR if error else UNLOADED
        self.error = error
        self.exception: BaseException | None = None  # the last failed load's
        self.engine: Any = None
        self.fingerprint = system_fingerprint(options)
        self.created = int(time.time())
        self.last_used = 0.0
        self.leases = 0
        self.load_lock = threading.Lock()
        # a draft model (--speculative draft) is loaded beside it: its files and KV count too
        draft = options.draft_model
        self.file_bytes = _file_bytes(options.model_dir) + (_file_bytes(draft) if draft else 0)
        self.kv_bytes = _kv_estimate(info, options) + (_kv_estimate(model_info_or_none(draft), options)
                                                       if draft else 0)

    @property
    def memory_bytes(self) -> int:
        """Graph and weight files plus the KV cache, bytes (the engine's count once loaded), the
        draft model's (`--draft-model`) included."""
        if self.engine is not None and hasattr(self.engine, "kv_bytes"):
            return self.file_bytes + int(self.engine.kv_bytes())
        return self.file_bytes + self.kv_bytes

    def busy(self) -> bool:
        return self.leases > 0 or bool(getattr(self.engine, "num_requests", 0))

    def card(self) -> dict[str, Any]:
        """The `/v1/models` entry: OpenAI's fields (openai-python's `Model`), Anthropic's
        (anthropic-sdk-python's `ModelInfo`: `type`, `display_name`, `created_at` RFC 3339,
        `lifecycle`, `max_input_tokens`), so either SDK's `models.list()` parses it, then llorch's."""
        info = self.info
        max_length = (self.options.max_length or info.max_length) if info else None
        card: dict[str, Any] = {
            "id": self.id, "object": "model", "created": self.created, "owned_by": "llorch",
            "type": "model", "display_name": self.id,
            "created_at": datetime.fromtimestamp(self.created, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "lifecycle": "active", "max_input_tokens": max_length,
            "status": self.status,
            "max_length": max_length,
            "precision": info.precision if info else None,
            "provider": self.options.provider,
            "memory_bytes": self.memory_bytes,
            "path": str(self.options.model_dir),
        }
        if self.error:
            card["error"] = self.error
        return card


def _file_bytes(model_dir: Path) -> int:
    if not model_dir.is_dir():
        return 0
    return sum(p.stat().st_size for p in model_dir.iterdir()
               if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES))


def model_info_or_none(model_dir: Path) -> ModelInfo | None:
    """`load_model_info(model_dir)` (the export's `llorch.json`), or None where it cannot be
    read (no such directory, not an llorch export)."""
    try:
        return load_model_info(model_dir)
    except Exception:  # a broken draft is reported when it loads, not here
        return None


def _kv_estimate(info: ModelInfo | None, options: ServeOptions) -> int:
    """K and V for every layer and slot at full length, in the export's KV element type
    (llorch.json `graph.kv_dtype`: int8 1 byte, fp16 2; else fp16 graphs 2 bytes, others 4)."""
    if info is None:
        return 0
    kv_dtype = (info.graph or {}).get("kv_dtype")
    width = {"int8": 1, "float16": 2, "float32": 4}.get(kv_dtype, 2 if info.precision == "fp16" else 4)
    length = options.max_length or info.max_length
    return 2 * info.num_layers * info.num_kv_heads * info.head_dim * length * options.max_batch * width


Loader = Callable[[ModelEntry], Any]


class ModelRegistry:
    """The served models, in the order given; the first is the default (a request without
    `model` gets it, and it loads at startup).

    Args:
        entries: the models (ids unique).
        load: builds and starts an engine for an entry (slow; runs on a worker thread);
            raises for files it cannot load.
        max_loaded: most models loaded at once (None: no limit).
        memory_budget: bytes the loaded models may take together (None: no limit).
        idle_unload: seconds after which an idle model is stopped (None: never).
        wait_timeout: seconds a load may wait for a loaded model to become idle
            (None: no limit).
        on_loaded, on_unloaded: told of each engine started / stopped (metrics).
    """

    def __init__(self, entries: Iterable[ModelEntry], load: Loader, *, max_loaded: int | None = None,
                 memory_budget: int | None = None, idle_unload: float | None = None,
                 wait_timeout: float | None = None,
                 on_loaded: Callable[[ModelEntry], None] | None = None,
                 on_unloaded: Callable[[ModelEntry], None] | None = None) -> None:
        self.entries = {e.id: e for e in entries}
        if not self.entries:
            raise ValueError("no models to serve")
        self.default = next(iter(self.entries.values()))
        self._load = load
        self.max_loaded = max_loaded
        self.memory_budget = memory_budget
        self.idle_unload = idle_unload
        self.wait_timeout = wait_timeout
        self._on_loaded, self._on_unloaded = on_loaded, on_unloaded
        self._room = threading.Condition()  # guards status, engine, leases of every entry
        self._stopped = threading.Event()

    # -- lookups ------------------------------------------------------------------------
    def entry(self, model_id: Any) -> ModelEntry:
        """The entry for a request's `model` (None: the default).

        Raises:
            InvalidRequestError: `model` is not a string.
            NotFoundError: no such model.
        """
        if model_id is None:
            return self.default
        if not isinstance(model_id, str):  # /tokenize, /detokenize read it raw
            raise InvalidRequestError("Invalid type for 'model': expected a string.", param="model",
                                      code="invalid_type")
        entry = self.entries.get(model_id)
        if entry is None:
            served = ", ".join(f"`{m}`" for m in self.entries)
            raise NotFoundError(f"The model `{model_id}` does not exist; this server serves {served}.",
                                param="model", code="model_not_found")
        return entry

    def lease(self, entry: ModelEntry) -> Any:
        """Hold `entry` (it is not evicted until `release`) and return its engine, or None
        when it is not loaded (then call `ensure_loaded`, still holding it)."""
        with self._room:
            entry.leases += 1
            entry.last_used = time.monotonic()
            return entry.engine

    def release(self, entry: ModelEntry) -> None:
        with self._room:
            entry.leases -= 1
            entry.last_used = time.monotonic()
            self._room.notify_all()

    # -- loading ------------------------------------------------------------------------
    def ensure_loaded(self, entry: ModelEntry, *, retry: bool = False) -> Any:
        """The entry's engine, loading it first if needed (blocking: call from a thread).
        A failed load is remembered; `retry` tries again.

        Raises:
            ModelLoadFailed: loading failed (the message names the file).
            ServiceUnavailableError: no room (every loaded model busy for `wait_timeout`
                seconds, or the model alone is larger than the memory budget).
        """
        with entry.load_lock:
            with self._room:
                if entry.engine is not None:
                    return entry.engine
                if entry.status == ERROR and not retry:
                    raise self._failed(entry)
                self._make_room(entry)
                entry.status, entry.error = LOADING, None
            log.info("loading model %s from %s", entry.id, entry.options.model_dir)
            try:
                engine = self._load(entry)
            except BaseException as exc:
                log.error("loading model %s failed", entry.id, exc_info=exc)
                with self._room:
                    entry.status, entry.error = ERROR, f"{type(exc).__name__}: {exc}"
                    entry.exception = exc
                    self._room.notify_all()
                raise self._failed(entry) from None
            with self._room:
                entry.engine, entry.status = engine, LOADED
                entry.last_used = time.monotonic()
            if self._on_loaded is not None:
                self._on_loaded(entry)
            log.info("model %s is ready", entry.id)
            return engine

    def _failed(self, entry: ModelEntry) -> ModelLoadFailed:
        return ModelLoadFailed(f"The model `{entry.id}` failed to load: {entry.error}",
                               param="model", code="model_load_failed")

    def _make_room(self, entry: ModelEntry) -> None:
        """Under `_room`: stop least recently used idle models until `entry` fits; wait for
        one to become idle when all are busy."""
        if self.memory_budget is not None and entry.memory_bytes > self.memory_budget:
            raise ServiceUnavailableError(
                f"The model `{entry.id}` needs about {entry.memory_bytes / 2**20:.0f} MiB, more than "
                f"--memory-budget ({self.memory_budget / 2**20:.0f} MiB).", code="memory_budget")
        deadline = None if self.wait_timeout is None else time.monotonic() + self.wait_timeout
        while not self._fits(entry):
            idle = [e for e in self.entries.values()
                    if e is not entry and e.status == LOADED and not e.busy()]
            if idle:
                self._stop(min(idle, key=lambda e: e.last_used), "to make room for " + entry.id)
                continue
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise ServiceUnavailableError(
                    f"The model `{entry.id}` cannot load now: every loaded model is in use "
                    "(--max-loaded-models / --memory-budget); retry later.",
                    code="model_capacity", headers={"Retry-After": "1"})
            self._room.wait(0.1 if left is None else min(left, 0.1))

    def _fits(self, entry: ModelEntry) -> bool:
        held = [e for e in self.entries.values() if e is not entry and e.status in (LOADED, LOADING)]
        if self.max_loaded is not None and len(held) >= self.max_loaded:
            return False
        if self.memory_budget is not None:
            return sum(e.memory_bytes for e in held) + entry.memory_bytes <= self.memory_budget
        return True

    def _stop(self, entry: ModelEntry, why: str) -> None:
        """Under `_room`: stop an idle model's engine."""
        engine, entry.engine, entry.status = entry.engine, None, UNLOADED
        log.info("unloading model %s (%s)", entry.id, why)
        if self._on_unloaded is not None:
            self._on_unloaded(entry)
        engine.stop()
        self._room.notify_all()

    def unload(self, entry: ModelEntry) -> None:
        """Stop a model now (operators). Raises `ModelBusy` while requests use it."""
        with entry.load_lock, self._room:
            if entry.engine is None:
                if entry.status == ERROR:
                    entry.status, entry.error = UNLOADED, None
                return
            if entry.busy():
                raise ModelBusy(f"The model `{entry.id}` has requests in flight; unload it when "
                                "they are done.", param="model", code="model_busy")
            self._stop(entry, "asked to")

    # -- background ---------------------------------------------------------------------
    def start_idle_unloader(self) -> None:
        """With `idle_unload`, a daemon thread that stops models idle that long."""
        if self.idle_unload is None:
            return
        threading.Thread(target=self._unload_idle, name="llorch-idle-unload", daemon=True).start()

    def _unload_idle(self) -> None:
        assert self.idle_unload is not None
        period = min(1.0, self.idle_unload / 4)
        while not self._stopped.wait(period):
            now = time.monotonic()
            with self._room:
                for entry in self.entries.values():
                    if entry.status != LOADED:
                        continue
                    if entry.busy():
                        entry.last_used = now
                    elif now - entry.last_used >= self.idle_unload:
                        self._stop(entry, f"idle for {self.idle_unload:g} s")

    def loaded(self) -> list[Any]:
        """The engines running now."""
        with self._room:
            return [e.engine for e in self.entries.values() if e.engine is not None]

    def stop_all(self) -> None:
        self._stopped.set()
        with self._room:
            for entry in self.entries.values():
                if entry.engine is not None:
                    self._stop(entry, "server stopping")


def model_specs(options: ServeOptions) -> list[ModelSpec]:
    """The models `options` names: the default model, the other DIRs, then --models-dir's
    (a directory already named is not added twice).

    Raises:
        ValueError: --models-dir is not a directory.
    """
    specs = [] if options.model_dir is None else [ModelSpec(options.model_dir, options.model_name)]
    specs += options.more_models
    if options.models_dir is not None:
        named = {s.path.resolve() for s in specs}
        specs += [s for s in discover(options.models_dir) if s.path.resolve() not in named]
    if not specs:
        raise ValueError(f"--models-dir {options.models_dir}: no model directories in it")
    return specs


def build_entries(options: ServeOptions, specs: list[ModelSpec], *, strict: bool) -> list[ModelEntry]:
    """An entry per spec, ids from the aliases or the directory names (``-int4`` / ``-fp32``
    dropped unless two models would then share an id: those keep their full names).

    Args:
        strict: a directory whose JSON files are unusable is an error (one model); else it is
            served as a model that failed to load, so the others still serve.
    Raises:
        ModelDirError: a directory does not exist, or strict and one is unusable.
        ValueError: two models with the same id.
    """
    infos: list[tuple[ModelSpec, ModelInfo | None, str | None]] = []
    for spec in specs:
        if not spec.path.is_dir():  # a typo on the command line: never served as a broken model
            raise ModelDirError(f"{spec.path}: model directory not found")
        try:
            infos.append((spec, load_model_info(spec.path, name=spec.name), None))
        except ModelDirError as exc:
            if strict:
                raise
            log.error("model directory %s is unusable: %s", spec.path, exc)
            infos.append((spec, None, f"{type(exc).__name__}: {exc}"))
    short = [spec.name or (info.name if info else spec.path.resolve().name) for spec, info, _ in infos]
    ids = [name if spec.name or short.count(name) == 1 else spec.path.resolve().name
           for name, (spec, _, _) in zip(short, infos, strict=True)]
    seen: set[str] = set()
    for model_id in ids:
        if model_id in seen:
            raise ValueError(f"two models are named {model_id!r}; give one an alias (DIR=alias)")
        seen.add(model_id)
    return [ModelEntry(model_id, replace(options, model_dir=spec.path, model_name=model_id), info, error)
            for model_id, (spec, info, error) in zip(ids, infos, strict=True)]
