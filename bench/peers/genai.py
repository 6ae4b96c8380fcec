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

    return {**single_stream(peer, cfg, prompts_of(job)), "load_s": load_s,
            "version": metadata.version("onnxruntime-genai")}
