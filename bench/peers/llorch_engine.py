"""llorch in-process: `serve.engine.Engine` over `serve.runtime.open_runtime`, no HTTP.

The same scheduler thread, sampler, detokenizer and stop matcher a request meets behind
`llorch serve`, with its defaults `--w8a8 auto` and batch invariance where free; only the Starlette/SSE layer is left out
(`llorch_http` adds it back).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

from bench.peers.base import StreamRun, config_of, prompts_of, single_stream


class EnginePeer:
    def __init__(self, model_dir: Path, *, threads: int, max_length: int,
                 w8a8: str = "auto", batch_invariant: bool | None = None) -> None:
        from serve.engine import Engine
        from serve.runtime import RuntimeOptions, open_runtime
        from serve.tokenizer import Tokenizer

        runtime = open_runtime(model_dir, RuntimeOptions(threads=threads, max_length=max_length,
                                                          w8a8=w8a8, batch_invariant=batch_invariant))
        self.engine = Engine(runtime, Tokenizer.from_dir(model_dir))
        self.engine.start()
        self.loop = asyncio.new_event_loop()

    def close(self) -> None:
        self.engine.stop()
        self.loop.close()

    def generate(self, ids: list[int], new_tokens: int) -> StreamRun:
        return self.loop.run_until_complete(self._generate(ids, new_tokens))

    async def _generate(self, ids: list[int], new_tokens: int) -> StreamRun:
        t0 = time.perf_counter()
        times, out = [], []
        async for token in self._tokens(ids, new_tokens):
            times.append(time.perf_counter() - t0)
            out.append(token)
        return StreamRun(times, len(out), out)

    async def _tokens(self, ids: list[int], new_tokens: int) -> AsyncIterator[int]:
        from serve.events import GenerationRequest
        from serve.sampling import SamplingParams

        params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        async for event in self.engine.submit(GenerationRequest(tuple(ids), params)):
            if event.error:
                raise RuntimeError(f"engine error: {event.error}")
            for choice in event.choices:
                for token in choice.token_ids:
                    yield token


def run(job: dict) -> dict:
    cfg = config_of(job)
    t0 = time.perf_counter()
    peer = EnginePeer(Path(job["args"]["model_dir"]), threads=cfg.threads,
                      max_length=cfg.max_context, w8a8=job["args"].get("w8a8", "auto"),
                      batch_invariant=job["args"].get("batch_invariant"))
    load_s = time.perf_counter() - t0
    try:
        result = single_stream(peer, cfg, prompts_of(job))
    finally:
        peer.close()
    from importlib import metadata

    return {**result, "load_s": load_s, "version": metadata.version("llorch")}
