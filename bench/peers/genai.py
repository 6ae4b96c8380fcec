"""ONNX Runtime GenAI (`onnxruntime_genai`) on a model directory: ours as is, or one built by
its model builder. On our export it runs the very same graph as llorch, so the difference is
the generation loop around ORT."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

from bench.peers.base import Skip, StreamRun, config_of, prompts_of, require, single_stream, timed


class GenAIPeer:
    def __init__(self, model_dir: Path, *, threads: int) -> None:
        self.og = require("onnxruntime_genai", "pip install onnxruntime-genai")
        config = self.og.Config(str(model_dir))
        # our thread count, without editing the directory's genai_config.json
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
        self.model = self.og.Model(config)

    def generate(self, ids: list[int], new_tokens: int) -> StreamRun:
        return timed(self._tokens(ids, new_tokens))

    def _tokens(self, ids: list[int], new_tokens: int) -> Iterator[int]:
        og = self.og
        params = og.GeneratorParams(self.model)
        total = len(ids) + new_tokens
        # min_length = max_length: EOS is masked until the end (EOS ignored)
        params.set_search_options(do_sample=False, max_length=total, min_length=total)
        gen = og.Generator(self.model, params)
        gen.append_tokens(ids)  # the prefill runs here
        for _ in range(new_tokens):
            gen.generate_next_token()
            yield int(gen.get_next_tokens()[0])


    def batch(self, prompts: list[list[int]], new_tokens: int) -> dict:
        """One static batch: every prompt (all the same length) prefilled together, then
        `new_tokens` greedy steps for all rows. GenAI has no continuous batching: a batch starts
        and ends together.

        Returns:
            {"wall": seconds incl. prefill, "first": seconds to the first step's tokens,
             "tokens": all rows' tokens}.
        """
        import numpy as np

        og = self.og
        params = og.GeneratorParams(self.model)
        total = len(prompts[0]) + new_tokens
        params.set_search_options(do_sample=False, max_length=total, min_length=total,
                                  batch_size=len(prompts))
        t0 = time.perf_counter()
        gen = og.Generator(self.model, params)
        gen.append_tokens(np.asarray(prompts, dtype=np.int32))
        first = None
        for _ in range(new_tokens):
            gen.generate_next_token()
            gen.get_next_tokens()
            first = first or time.perf_counter() - t0
        return {"wall": time.perf_counter() - t0, "first": first,
                "tokens": new_tokens * len(prompts)}


def batch_figures(rounds: list[dict], streams: int) -> dict:
    """Aggregate tokens/s of static batches (median over rounds), in the shape of
    llorch_http.concurrency_figures where it applies: prefill included, like llorch's."""
    from bench.stats import summarize

    agg = [r["tokens"] / r["wall"] for r in rounds]
    # after the first step: decode only (every row gets a token per step)
    step = [(r["tokens"] - streams) / (r["wall"] - r["first"]) for r in rounds]
    return {"aggregate_tps": summarize(agg), "decode_only_tps": summarize(step),
            "ttft_p50_s": sorted(r["first"] for r in rounds)[len(rounds) // 2],
            "tokens_per_stream": rounds[0]["tokens"] // streams}


def _batch(peer: GenAIPeer, job: dict) -> dict:
    cfg = config_of(job)
    rounds_prompts = job["stream_prompts"]  # [round][stream], warm-up rounds first
    out: dict = {"concurrency": {}}
    for n in cfg.concurrency:
        for prompts in rounds_prompts[: cfg.warmup]:
            peer.batch(prompts[:n], cfg.stream_tokens)
        rounds = [peer.batch(prompts[:n], cfg.stream_tokens)
                  for prompts in rounds_prompts[cfg.warmup : cfg.warmup + cfg.stream_rounds]]
        out["concurrency"][str(n)] = figures = batch_figures(rounds, n)
        print(f"  batch of {n}: {figures['aggregate_tps']['median']:.1f} tok/s", flush=True)
    return out


def run(job: dict) -> dict:
    model_dir = Path(job["args"]["model_dir"])
    if job["args"].get("skip_reason"):
        raise Skip(job["args"]["skip_reason"])
    if not (model_dir / "genai_config.json").is_file():
        raise Skip(f"no GenAI model directory at {model_dir}")
    cfg = config_of(job)
    t0 = time.perf_counter()
    peer = GenAIPeer(model_dir, threads=cfg.threads)
    load_s = time.perf_counter() - t0
    from importlib import metadata

    figures = (_batch(peer, job) if job["args"].get("mode") == "batch"
               else single_stream(peer, cfg, prompts_of(job)))
    return {**figures, "load_s": load_s,
            "version": metadata.version("onnxruntime-genai")}
