"""llama.cpp through `llama-cpp-python` on the original Q4_1 GGUF (the weights our GGUF-block
int4 export maps exactly). Token ids in, greedy (`temp=0`), no prefix reuse between runs."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

from bench.peers.base import Skip, StreamRun, config_of, prompts_of, require, single_stream, timed

HINT = ('pip install llama-cpp-python (compiles llama.cpp, ~10 min on 2 cores; '
        'CMAKE_ARGS="-DGGML_NATIVE=ON" for this CPU\'s SIMD)')


class LlamaCppPeer:
    def __init__(self, gguf: Path, *, threads: int, n_ctx: int) -> None:
        llama_cpp = require("llama_cpp", HINT)
        self.llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=n_ctx, n_threads=threads,
                                   n_threads_batch=threads, n_batch=512, verbose=False, seed=0)

    def generate(self, ids: list[int], new_tokens: int) -> StreamRun:
        return timed(self._tokens(ids, new_tokens))

    def _tokens(self, ids: list[int], new_tokens: int) -> Iterator[int]:
        self.llm.reset()  # n_tokens = 0: generate() finds no prefix to reuse, prefills it all
        for i, tok in enumerate(self.llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0,
                                                  reset=True)):
            yield tok
            if i + 1 == new_tokens:
                return


def run(job: dict) -> dict:
    gguf = Path(job["args"]["model_dir"])
    if not gguf.is_file():
        raise Skip(f"no GGUF at {gguf} (run `llorch models fetch`)")
    cfg = config_of(job)
    t0 = time.perf_counter()
    peer = LlamaCppPeer(gguf, threads=cfg.threads, n_ctx=cfg.max_context)
    load_s = time.perf_counter() - t0
    from importlib import metadata

    return {**single_stream(peer, cfg, prompts_of(job)), "load_s": load_s,
            "version": metadata.version("llama-cpp-python")}
