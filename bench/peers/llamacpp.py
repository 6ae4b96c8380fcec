"""llama.cpp through `llama-cpp-python` on the original Q4_1 GGUF (the weights our GGUF-block
int4 export maps exactly). Token ids in, greedy (`temp=0`), no prefix reuse between runs.
`mode: batch`: N sequences decoded together through the low-level batch API."""

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


class LlamaCppBatch:
    """N sequences decoded together through llama.cpp's own batch API (`llama_decode` of a
    `llama_batch` holding one token per sequence per step; what llama-server's parallel
    slots do), on one context with `n_seq_max` = N and a unified KV cache."""

    def __init__(self, gguf: Path, *, threads: int, streams: int, per_stream_ctx: int) -> None:
        self.L = L = require("llama_cpp", HINT)
        L.llama_backend_init()
        self.model = L.llama_model_load_from_file(str(gguf).encode(), L.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf}")
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        cp = L.llama_context_default_params()
        cp.n_ctx = streams * per_stream_ctx
        cp.n_batch = cp.n_ubatch = 512
        cp.n_seq_max = streams
        cp.kv_unified = True
        cp.n_threads = cp.n_threads_batch = threads
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create the context")
        self.n_batch = 512
        self.batch = L.llama_batch_init(self.n_batch, 0, streams)

    def close(self) -> None:
        L = self.L
        L.llama_batch_free(self.batch)
        L.llama_free(self.ctx)
        L.llama_model_free(self.model)

    def _decode(self, items: list[tuple[int, int, int, bool]]) -> list[int]:
        """items: (token, pos, seq, wants logits); returns the argmax of each flagged item."""
        import numpy as np

        L, b = self.L, self.batch
        out = []
        for start in range(0, len(items), self.n_batch):
            chunk = items[start : start + self.n_batch]
            for k, (tok, pos, seq, logits) in enumerate(chunk):
                b.token[k], b.pos[k], b.n_seq_id[k] = tok, pos, 1
                b.seq_id[k][0] = seq
                b.logits[k] = int(logits)
            b.n_tokens = len(chunk)
            rc = L.llama_decode(self.ctx, b)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc}")
            for k, item in enumerate(chunk):
                if item[3]:
                    row = np.ctypeslib.as_array(L.llama_get_logits_ith(self.ctx, k),
                                                shape=(self.n_vocab,))
                    out.append(int(row.argmax()))
        return out

    def batch_run(self, prompts: list[list[int]], new_tokens: int) -> dict:
        """Prefill every prompt (in n_batch chunks), then `new_tokens` greedy steps of all
        sequences together; the cache is cleared first. Returns {"wall", "first", "tokens"}."""
        import time

        L = self.L
        L.llama_memory_clear(L.llama_get_memory(self.ctx), True)
        t0 = time.perf_counter()
        items = [(tok, i, s, i == len(p) - 1) for s, p in enumerate(prompts) for i, tok in enumerate(p)]
        nxt = self._decode(items)
        first = time.perf_counter() - t0
        pos = [len(p) for p in prompts]
        for _ in range(new_tokens - 1):
            nxt = self._decode([(t, pos[s], s, True) for s, t in enumerate(nxt)])
            pos = [x + 1 for x in pos]
        return {"wall": time.perf_counter() - t0, "first": first,
                "tokens": new_tokens * len(prompts)}


def _batch(job: dict, gguf: Path) -> dict:
    from bench.peers.genai import batch_figures

    cfg = config_of(job)
    rounds_prompts = job["stream_prompts"]  # [round][stream], warm-up rounds first
    out: dict = {"concurrency": {}}
    for n in cfg.concurrency:
        peer = LlamaCppBatch(gguf, threads=cfg.threads, streams=n,
                             per_stream_ctx=cfg.stream_prompt + cfg.stream_tokens + 16)
        try:
            for prompts in rounds_prompts[: cfg.warmup]:
                peer.batch_run(prompts[:n], cfg.stream_tokens)
            rounds = [peer.batch_run(prompts[:n], cfg.stream_tokens)
                      for prompts in rounds_prompts[cfg.warmup : cfg.warmup + cfg.stream_rounds]]
        finally:
            peer.close()
        out["concurrency"][str(n)] = figures = batch_figures(rounds, n)
        print(f"  batch of {n}: {figures['aggregate_tps']['median']:.1f} tok/s", flush=True)
    return out


def run(job: dict) -> dict:
    gguf = Path(job["args"]["model_dir"])
    if not gguf.is_file():
        raise Skip(f"no GGUF at {gguf} (run `llorch models fetch`)")
    from importlib import metadata

    if job["args"].get("mode") == "batch":
        return {**_batch(job, gguf), "version": metadata.version("llama-cpp-python")}
    cfg = config_of(job)
    t0 = time.perf_counter()
    peer = LlamaCppPeer(gguf, threads=cfg.threads, n_ctx=cfg.max_context)
    load_s = time.perf_counter() - t0
    return {**single_stream(peer, cfg, prompts_of(job)), "load_s": load_s,
            "version": metadata.version("llama-cpp-python")}
