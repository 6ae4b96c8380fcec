"""Session fixtures: the default model (prepared once under models/) and tiny random Llamas.

The tiny checkpoints are written with NumPy + safetensors in the layout transformers saves
(tests that need transformers itself for a reference build theirs with torch); they borrow
SmolLM2's tokenizer and chat template, so they serve real text.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="session")
def default_model_paths() -> dict[str, Path]:
    """{"gguf", "hf", "int4", "fp32"} paths of SmolLM2-135M-Instruct, prepared on first use."""
    from export.default_model import ensure_default_model

    return ensure_default_model(variants=("int4", "fp32"), progress=False)


@pytest.fixture(scope="session")
def default_model_dir(default_model_paths) -> Path:
    return default_model_paths["int4"]


@pytest.fixture(scope="session")
def default_fp32_dir(default_model_paths) -> Path:
    return default_model_paths["fp32"]


@pytest.fixture(scope="session")
def default_hf_dir(default_model_paths) -> Path:
    return default_model_paths["hf"]


TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "torch_dtype": "float32",
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def write_random_llama(out: Path, config: dict, tokenizer_from: Path, *, seed: int = 0,
                       std: float = 0.08) -> Path:
    """A random Llama checkpoint in HF layout with a real tokenizer."""
    from safetensors.numpy import save_file

    from export.config import LlamaConfig

    out.mkdir(parents=True, exist_ok=True)
    tok_cfg = json.loads((tokenizer_from / "config.json").read_text())
    config = {**config, "vocab_size": tok_cfg["vocab_size"],
              "bos_token_id": tok_cfg.get("bos_token_id"),
              "eos_token_id": tok_cfg.get("eos_token_id")}
    cfg = LlamaConfig.from_hf(config)
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shape in cfg.expected_shapes().items():
        if name.endswith("norm.weight"):
            tensors[name] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            tensors[name] = (std * rng.standard_normal(shape)).astype(np.float32)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for f in TOKENIZER_FILES:
        shutil.copy(tokenizer_from / f, out / f)
    return out


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory, default_hf_dir) -> Path:
    return write_random_llama(tmp_path_factory.mktemp("tiny") / "hf", TINY_CONFIG, default_hf_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_hf_dir) -> Path:
    """The tiny random Llama exported fp32 (what the server tests run on)."""
    from export.api import export_model

    out = tmp_path_factory.mktemp("tiny-export") / "tiny-llama"
    export_model(tiny_hf_dir, out, precision="fp32", progress=False)
    return out


@pytest.fixture(scope="session")
def single_process_answers(default_model_dir, tmp_path_factory) -> dict[str, str]:
    """Greedy answers of one plain process (one thread, as each replica has) to
    _scale_cluster.QUESTIONS: every Ray Serve file's reference, computed once a session
    (before the first deployment starts: their `cluster` fixtures ask for it)."""
    from _scale_cluster import answers_of_a_single_process

    return answers_of_a_single_process(default_model_dir,
                                       tmp_path_factory.mktemp("single") / "server.log")


@pytest.fixture(scope="session")
def plain_routing(default_model_dir, tmp_path_factory, single_process_answers):
    """`_scale_cluster.plain_routing_then_two_signals` once a session (after the single-process
    answers, before or after any other deployment, never beside one)."""
    from _scale_cluster import plain_routing_then_two_signals

    return plain_routing_then_two_signals(default_model_dir,
                                          tmp_path_factory.mktemp("plain") / "server.log")
