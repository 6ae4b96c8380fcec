"""`run(options)`: check the provider, build the app, serve it with uvicorn.

The default (first) model loads on a background thread (see `create_app`), so `/health`
answers 503 at once and 200 when ready; with one model, if loading fails the server shuts down
and `run` raises `StartupError`; with several, a model that fails answers its requests with the
error and the others serve (serve.models loads them on demand).
SIGTERM / SIGINT drain first (`serve.app.drain`: 503 for new requests, running ones get
`--drain-timeout` seconds), then uvicorn stops and `run` returns; a second signal cuts the
drain short (still an orderly stop, exit 0), a third exits at once (status 128 + signal).
`python -m serve.main DIR[=alias] [DIR…] [flags]` runs it without the `llorch` CLI; `add_arguments` /
`options_from_args` are the flag ↔ `ServeOptions` mapping for CLIs to reuse.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

import uvicorn
from starlette.applications import Starlette

from serve.app import create_app, drain
from serve.draft_model import check_draft_model
from serve.engine import CPU_PREFILL_CHUNK, GPU_PREFILL_CHUNK, Engine
from serve.errors import EngineCrashed, StartupError
from serve.events import EngineObserver
from serve.metrics import Metrics
from serve.model_dir import ModelDirError, load_model_info
from serve.models import ModelEntry, build_entries, model_specs
from serve.options import ServeOptions, add_arguments, options_from_args
from serve.runtime import ProviderError, RuntimeOptions, open_runtime
from serve.runtime.session import resolve_providers
from serve.tokenizer import Tokenizer

log = logging.getLogger("serve.main")

def check_provider(provider: str) -> None:
    """Refuse a provider this onnxruntime build lacks: never a silent CPU fallback."""
    try:
        resolve_providers(provider)
    except ProviderError as exc:
        raise StartupError(f"{exc}; pass --provider auto to use the best available one") from None


def log_invariance(options: ServeOptions, engine: Engine) -> None:
    """One startup line on whether a request's tokens may depend on what else runs (README
    "Determinism"), with the reason where the default could not make it so. Reads what the
    engine and runtime resolved at load (`decodes_apart`), as `system_fingerprint` does."""
    pad = getattr(engine.runtime, "attention_pad", False)
    flag = "--speculative" if engine.speculator is not None else "--attention-pad"
    if engine.speculator is not None and not pad:
        log.info("not batch-invariant: a request's tokens may depend on what else runs "
                 "(--speculative without the attention pad: a verify call computes several "
                 "positions in other kernels than a one-token step)")
    elif pad and engine.batch_invariant:
        drafts = ", with or without drafts" if engine.speculator is not None else ""
        log.info("batch-invariant: the same request gives the same tokens whatever else runs%s "
                 "(attention pad with --batch-invariant: a decode step of several sequences "
                 "runs one call each)", drafts)
    elif pad and options.batch_invariant is False:
        log.info("not batch-invariant: a request's tokens may depend on what else runs "
                 "(%s with --no-batch-invariant)", flag)
    elif pad:  # auto: invariance under the pad would cost batching
        drafts = ("; a lone stream's drafts change no number" if engine.speculator is not None
                  else "")
        log.info("not batch-invariant: a request's tokens may depend on what else runs (%s: "
                 "the attention pad pads a lone decode step, a step of 2+ sequences runs as one "
                 "unpadded call%s; --batch-invariant runs one call a sequence)", flag, drafts)
    elif engine.batch_invariant:
        rt = engine.runtime
        w8a8 = getattr(rt, "w8a8", "off")  # the mode the runtime resolved
        how = ("a lone decode padded to two rows" if not rt.batch_invariant
               else "every step on the row-invariant W8A8 graph" if w8a8 == "all"
               else "every decode step on the row-invariant main graph, prefills on the "
               + ("W8A8" if w8a8 == "prefill" else "main") + " graph")
        log.info("batch-invariant: the same request gives the same tokens whatever else runs "
                 "(%s)", how)
    elif options.batch_invariant is None:
        graph = engine.runtime.info.graph
        if graph.get("w8a8") and not graph.get("w8a8_row_invariant"):
            why = ("its W8A8 graph is not row-invariant: re-export it with this llorch (down_proj "
                   "at accuracy level 4), or pass --batch-invariant to pad lone decodes")
        elif graph.get("w8a8_row_invariant"):
            why = f"--w8a8 {getattr(engine.runtime, 'w8a8', options.w8a8)} keeps decode steps off its W8A8 graph"
        else:
            why = "these graphs or this provider have no row-invariant path"
        log.info("not batch-invariant: a request's tokens may depend on what else runs (%s)", why)
    else:
        log.info("not batch-invariant: a request's tokens may depend on what else runs "
                 "(--no-batch-invariant)")


def load_engine(options: ServeOptions, metrics: EngineObserver | None = None) -> Engine:
    """Build the Tokenizer and Runtime and start the engine thread (slow: runs off the loop).
    Errors name the file at fault (a bad tokenizer.json, a truncated weights file)."""
    tokenizer = Tokenizer.from_dir(options.model_dir)  # first: cheap, and fails fast
    try:
        runtime = open_runtime(options.model_dir, RuntimeOptions(
            provider=options.provider, threads=options.threads, max_batch=options.max_batch,
            max_length=options.max_length, w8a8=options.w8a8, cuda_graph=options.cuda_graph,
            batch_invariant=options.batch_invariant,
            device_sampling=options.runtime_device_sampling, spin=target_spin(options),
            attention_pad=options.attention_pad_in_effect()))
    except Exception as exc:
        raise _name_weights_file(options.model_dir, exc) from exc
    chunk = options.prefill_chunk or (
        CPU_PREFILL_CHUNK if runtime.providers[0] == "CPUExecutionProvider"
        else GPU_PREFILL_CHUNK)
    draft = None if options.draft_model is None else open_draft(options, runtime)
    engine = Engine(runtime, tokenizer, prefill_chunk=chunk,
                    max_queue=options.max_queue, queue_timeout=options.queue_timeout,
                    prefix_cache_tokens=options.prefix_cache_size, observer=metrics,
                    batch_invariant=options.batch_invariant,
                    speculative=options.speculative_config(), draft=draft)
    log_invariance(options, engine)
    if hasattr(runtime, "captured_sizes"):  # CudaRuntime
        sizes = runtime.captured_sizes
        log.info("CUDA graphs: %s", (
            f"on (decode steps captured at {len(sizes)} batch sizes, {sizes[0]}..{sizes[-1]})"
            if sizes else
            "off (--no-cuda-graph)" if options.cuda_graph is False else
            "off (the export has no static decode graph: llorch export --target cuda)"))
    kv = runtime.kv_bytes()
    log.info("KV cache: %d slots x %d tokens = %.1f MiB (%.1f MiB a slot); prefix cache: %s",
             runtime.n_slots, runtime.info.max_length, kv / 2**20, kv / runtime.n_slots / 2**20,
             "off" if options.prefix_cache_size == 0 else
             f"up to {engine.slots.cache.capacity} tokens in idle slots")
    if engine.speculator is not None:
        spec = engine.speculator.config
        source = (f"n-grams {spec.prompt_lookup_max}..{spec.prompt_lookup_min}" if draft is None
                  else f"draft model {options.draft_model} ({draft.n_slots} slots, "
                       f"{draft.kv_bytes() / 2**20:.1f} MiB KV)")
        n = spec.disable_by_batch_size
        log.info("speculative decoding: %s, %d draft tokens a call, %s, while at most %d %s",
                 options.speculative, spec.num_speculative_tokens, source, n,
                 "sequence decodes" if n == 1 else "sequences decode")
    engine.start()
    return engine


# Whether ORT's intra-op threads spin between ops (`RuntimeOptions.spin`) with a draft model:
# the target's and the draft's sessions take turns on the same cores, and a spinning pool
# steals them from the other one (bench.spec_ab measured it).
DRAFT_SPIN = False


def target_spin(options: ServeOptions) -> bool:
    """`RuntimeOptions.spin` for the target model's runtime."""
    return options.draft_model is None or DRAFT_SPIN


def open_draft(options: ServeOptions, target):
    """The `--draft-model` runtime beside ``target`` (the target model's `Runtime`): the
    options' provider, threads and W8A8 mode, the target's slot count and slot length.

    Raises:
        StartupError: the draft's vocabulary is not the target's, or its export holds fewer
            tokens a slot than the target's slots (the message names the flag to change).
    """
    max_length = target.info.max_length
    try:
        check_draft_model(options.model_dir, options.draft_model)
        limit = load_model_info(options.draft_model).max_length
    except ModelDirError as exc:
        raise StartupError(str(exc)) from None
    if limit < max_length:
        raise StartupError(f"--draft-model {options.draft_model} holds {limit} tokens a sequence, "
                           f"the target {max_length}: pass --max-length {limit} or less, or "
                           "re-export the draft with a larger --max-length")
    try:
        return open_runtime(options.draft_model, RuntimeOptions(
            provider=options.provider, threads=options.threads, max_batch=target.n_slots,
            max_length=max_length, w8a8=options.w8a8, spin=DRAFT_SPIN))
    except Exception as exc:
        raise _name_weights_file(options.draft_model, exc) from exc


def _name_weights_file(model_dir: Path, exc: Exception) -> Exception:
    """ONNX Runtime reports a short external-data file by the tensor it could not read;
    say which file it is. Other errors pass through unchanged."""
    text = str(exc)
    if "External initializer" not in text and "external data" not in text.lower():
        return exc
    files = sorted(p for p in Path(model_dir).iterdir() if p.suffix == ".data" and p.is_file())
    named = ", ".join(f"{p} ({p.stat().st_size} bytes)" for p in files) or f"the weights file in {model_dir}"
    return StartupError(
        f"{named}: shorter than the graph expects or not this graph's weights (truncated download "
        f"or copy, or another export's file); export or copy it again. ONNX Runtime said: {text}")


class DrainingServer(uvicorn.Server):
    """uvicorn, but SIGTERM/SIGINT drain the engine before the server stops, and the process
    then exits normally (uvicorn would re-raise a SIGTERM, i.e. die by it).

    1st signal: drain (`--drain-timeout` for running requests), then uvicorn's orderly stop.
    2nd signal: the drain is cut short (running requests end now with `shutting_down`); the
    stop stays orderly (responses written, engines stopped) and the exit status stays 0, as
    uvicorn's after a second Ctrl-C. uvicorn itself would `force_exit` here, skipping the app's
    shutdown, whose task is then cancelled at loop close (a traceback in the log).
    3rd signal: exit at once, status 128 + the signal's number (130 for SIGINT, 143 for SIGTERM:
    what a shell reports for a program a signal ended), nothing flushed but the log.
    """

    def __init__(self, config: uvicorn.Config, app: Starlette, drain_timeout: float) -> None:
        super().__init__(config)
        self._app, self._drain_timeout = app, drain_timeout
        self._signals = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drains: set[asyncio.Future] = set()  # referenced until done

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._signals += 1
        name = signal.Signals(sig).name
        if self._signals >= 3:
            log.warning("%s a third time: exiting now (status %d)", name, 128 + sig)
            logging.shutdown()
            os._exit(128 + sig)
        timeout = self._drain_timeout if self._signals == 1 else 0.0
        if self._signals == 1:
            log.info("%s: draining (%g s for running requests)", name, timeout)
        else:
            log.info("%s again: ending running requests now, then stopping (a third signal exits at once)", name)
        try:
            if self._loop is None:
                raise RuntimeError("not serving yet")
            self._loop.call_soon_threadsafe(self._start_drain, timeout)
        except RuntimeError:  # no loop (yet, or any more): nothing to drain
            self.should_exit = True

    def _start_drain(self, timeout: float) -> None:
        async def drain_then_exit() -> None:
            try:
                await drain(self._app, timeout)
            finally:
                self.should_exit = True

        task = asyncio.ensure_future(drain_then_exit())
        self._drains.add(task)
        task.add_done_callback(self._drains.discard)


def run(options: ServeOptions) -> None:
    """Serve until interrupted. Raises `StartupError` for problems the user must fix."""
    check_provider(options.provider)
    try:  # cheap (JSON only): the served names must be known before the models load
        specs = model_specs(options)
        entries = build_entries(options, specs, strict=len(specs) == 1)
        if options.draft_model is not None:
            check_draft_model(options.model_dir, options.draft_model)
    except (ModelDirError, ValueError) as exc:
        raise StartupError(str(exc)) from None
    logging.basicConfig(
        level=options.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if options.scale_out:
        if len(entries) > 1:
            raise StartupError("--replicas serves one model per deployment: give one model "
                               "directory (several models on Ray Serve are not supported yet)")
        return _run_on_ray(options, entries[0].id)
    if options.api_workers > 1:
        from serve.frontend.supervisor import run_split  # noqa: PLC0415 - it imports this module

        return run_split(options, entries)
    failures: list[BaseException] = []
    server: DrainingServer | None = None
    metrics = Metrics()

    def on_load_error(exc: BaseException) -> None:
        failures.append(exc)
        if server is not None:
            server.should_exit = True

    def load(entry: ModelEntry) -> Engine:
        return load_engine(entry.options, metrics.observer(entry.id))

    app = create_app(options, load, entries=entries, on_load_error=on_load_error, metrics=metrics)
    config = uvicorn.Config(
        app, host=options.host, port=options.port, log_level=options.log_level.lower(),
        timeout_graceful_shutdown=5,  # after the drain: clients that stopped reading
    )
    server = DrainingServer(config, app, options.drain_timeout)
    for entry in entries:
        log.info("model '%s': %s", entry.id, entry.options.model_dir)
    log.info("serving %d model(s) on http://%s:%d, default '%s' (loading…)", len(entries),
             options.host, options.port, entries[0].id)
    server.run()
    if failures:
        raise StartupError(f"could not load {entries[0].options.model_dir}: {failures[0]}")


def _run_on_ray(options: ServeOptions, model_name: str) -> None:
    """`--replicas`/`--max-replicas`: Ray Serve (serve.scale), imported only here."""
    if importlib.util.find_spec("ray") is None:
        raise StartupError("--replicas and --max-replicas serve on Ray Serve, which is not "
                           "installed: pip install 'llorch[ray]' (or pip install 'ray[serve]')")
    from serve.scale.environment import ray_environment  # noqa: PLC0415

    os.environ.update(ray_environment(options))  # Ray reads these when it is imported
    from serve.scale import ray_app  # noqa: PLC0415 - Ray stays out of the single-process path

    ray_app.run(options, model_name)


def run_cli(options: ServeOptions) -> int:
    """`run` for command lines: a StartupError is printed, exit status 2."""
    try:
        run(options)
    except EngineCrashed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except StartupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def serve_args(models: Path | list[Path | str], args: argparse.Namespace) -> int:
    """`run_cli` on model directories (``DIR`` or ``DIR=alias``) and parsed flags; flags that
    contradict each other are an error, exit 2."""
    try:
        options = options_from_args(models if isinstance(models, list) else [models], args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return run_cli(options)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serve.main", description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", metavar="DIR[=alias]",
                        help="model directories; the first is the default model")
    add_arguments(parser)
    args = parser.parse_intermixed_args(argv)  # DIR --flag DIR: both directories
    return serve_args(args.models, args)


if __name__ == "__main__":
    sys.exit(main())
