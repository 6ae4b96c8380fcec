"""`run(options)`: check the provider, build the app, serve it with uvicorn.

The model loads on a background thread (see `create_app`), so `/health` answers 503 at once
and 200 when ready; if loading fails the server shuts down and `run` raises `StartupError`.
`python -m serve.main MODEL_DIR [flags]` runs it without the `llorch` CLI; `add_arguments` /
`options_from_args` are the flag ↔ `ServeOptions` mapping for CLIs to reuse.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import uvicorn

from serve.app import create_app
from serve.engine import Engine
from serve.errors import StartupError
from serve.model_dir import ModelDirError, load_model_info
from serve.options import ServeOptions, add_arguments, options_from_args
from serve.runtime import ProviderError, Runtime, resolve_providers
from serve.tokenizer import Tokenizer

log = logging.getLogger("serve.main")

def check_provider(provider: str) -> None:
    """Refuse a provider this onnxruntime build lacks: never a silent CPU fallback."""
    try:
        resolve_providers(provider)
    except ProviderError as exc:
        raise StartupError(f"{exc}; pass --provider auto to use the best available one") from None


def load_engine(options: ServeOptions) -> Engine:
    """Build the Runtime and Tokenizer and start the engine thread (slow: runs off the loop)."""
    runtime = Runtime(
        options.model_dir,
        provider=options.provider,
        threads=options.threads,
        max_batch=options.max_batch,
        max_length=options.max_length,
    )
    tokenizer = Tokenizer.from_dir(options.model_dir)
    engine = Engine(runtime, tokenizer, prefill_chunk=options.prefill_chunk)
    engine.start()
    return engine


def run(options: ServeOptions) -> None:
    """Serve until interrupted. Raises `StartupError` for problems the user must fix."""
    check_provider(options.provider)
    try:  # cheap (JSON only): the served name must be known before the model loads
        model_name = load_model_info(options.model_dir, name=options.model_name).name
    except ModelDirError as exc:
        raise StartupError(str(exc)) from None
    logging.basicConfig(
        level=options.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    failures: list[BaseException] = []
    server: uvicorn.Server | None = None

    def on_load_error(exc: BaseException) -> None:
        failures.append(exc)
        if server is not None:
            server.should_exit = True

    app = create_app(
        options, partial(load_engine, options), model_name=model_name, on_load_error=on_load_error
    )
    config = uvicorn.Config(
        app, host=options.host, port=options.port, log_level=options.log_level.lower()
    )
    server = uvicorn.Server(config)
    log.info("serving %s as '%s' on http://%s:%d (loading…)", options.model_dir, model_name,
             options.host, options.port)
    server.run()
    if failures:
        raise StartupError(f"could not load {options.model_dir}: {failures[0]}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serve.main", description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        run(options_from_args(args.model_dir, args))
    except StartupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
