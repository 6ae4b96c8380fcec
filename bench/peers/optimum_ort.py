"""optimum `ORTModelForCausalLM` (fp32, exported once by optimum into bench/.cache), through
transformers' `generate()` with a streamer."""

from __future__ import annotations

import time
from pathlib import Path

from bench.peers.base import Skip, StreamRun, config_of, prompts_of, require, single_stream, timed
from bench.peers.torch_hf import generate_with_streamer


def export(hf_dir: Path, out: Path) -> None:
    """optimum's own ONNX export of the HF directory (text-generation-with-past)."""
    ort_models = require("optimum.onnxruntime", "pip install optimum-onnx")
    model = ort_models.ORTModelForCausalLM.from_pretrained(str(hf_dir), export=True, use_cache=True)
    model.save_pretrained(str(out))
    transformers = require("transformers", "pip install transformers")
    transformers.AutoTokenizer.from_pretrained(str(hf_dir)).save_pretrained(str(out))


class OptimumPeer:
    def __init__(self, model_dir: Path, *, threads: int) -> None:
        self.torch = require("torch", "pip install torch")
        ort_models = require("optimum.onnxruntime", "pip install optimum-onnx")
        import onnxruntime as ort

        self.torch.set_num_threads(threads)
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        self.model = ort_models.ORTModelForCausalLM.from_pretrained(
            str(model_dir), session_options=so, provider="CPUExecutionProvider", use_cache=True)

    def generate(self, ids: list[int], new_tokens: int) -> StreamRun:
        return timed(generate_with_streamer(self.model, self.torch, ids, new_tokens))


def run(job: dict) -> dict:
    if job["args"].get("skip_reason"):
        raise Skip(job["args"]["skip_reason"])
    model_dir = Path(job["args"]["model_dir"])
    if not any(model_dir.glob("*.onnx")):
        raise Skip(f"no optimum export at {model_dir}")
    cfg = config_of(job)
    t0 = time.perf_counter()
    peer = OptimumPeer(model_dir, threads=cfg.threads)
    load_s = time.perf_counter() - t0
    from importlib import metadata

    return {**single_stream(peer, cfg, prompts_of(job)), "load_s": load_s,
            "version": f"optimum-onnx {metadata.version('optimum-onnx')}, "
                       f"onnxruntime {metadata.version('onnxruntime')}"}
