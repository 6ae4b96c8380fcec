"""The 1B-class bench model: Llama-3.2-1B's shapes, the default model's tokenizer, random
weights, and its three exports (llorch int4, ORT GenAI builder int4, llama.cpp GGUF Q4_0).

Speed of a dense model does not depend on its weight values (every weight is read and
multiplied each token, whatever it holds), so random weights measure what Llama-3.2-1B
would, without a 2.5 GB download. The vocabulary is SmolLM2's (49152 tokens, not Llama
3.2's 128256), so embeddings / lm_head are 100.7M parameters instead of 262.7M.

    make_checkpoint ─► <models>/bench-1b/hf/               (transformers, bf16 SafeTensors)
        ├─► llorch export --precision int4       ─► llorch-int4/   (+ model_w8a8.onnx)
        ├─► … --int4-symmetric [--lm-head-bits 4] ─► llorch-int4-sym/, llorch-int4-sym-lm4/
        ├─► onnxruntime_genai builder -p int4    ─► genai-int4/
        └─► convert_hf_to_gguf.py --outtype f16  ─► f16.gguf ─► llama_model_quantize ─► q4_0.gguf
                                                        llorch export q4_0.gguf ─► llorch-int4-q4_0/

Every step runs once (skipped when its output is complete) in a child process, so the
bench's own memory stays small; `python -m bench.model_1b` builds them all.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from bench.proc import run_child, thread_env

# meta-llama/Llama-3.2-1B config.json, minus its vocabulary (see the module docstring)
LLAMA_3_2_1B = {
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    "max_position_embeddings": 131072,
    "tie_word_embeddings": True,
    "attention_bias": False,
    "mlp_bias": False,
    "initializer_range": 0.02,
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")
SEED = 0


def bench_root(models: Path) -> Path:
    return models / "bench-1b"


def make_checkpoint(out: Path, tokenizer_dir: Path, *, seed: int = SEED) -> Path:
    """Write a random Llama with `LLAMA_3_2_1B`'s shapes and `tokenizer_dir`'s vocabulary.

    Weights: transformers' own init (normal, std 0.02; RMSNorm weights 1) under
    `torch.manual_seed(seed)`, created and saved in bf16 (2.2 GB; peak RSS ≈ 2.5 GB).

    Args:
        out: directory to create (config.json, model.safetensors, tokenizer files).
        tokenizer_dir: HF directory whose tokenizer.json / tokenizer_config.json / config.json
            (vocab_size, bos/eos ids) are reused, e.g. the default model's.

    Returns:
        `out`.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    src_cfg = json.loads((tokenizer_dir / "config.json").read_text())
    cfg = LlamaConfig(**LLAMA_3_2_1B, vocab_size=src_cfg["vocab_size"],
                      bos_token_id=src_cfg.get("bos_token_id"),
                      eos_token_id=src_cfg.get("eos_token_id"),
                      pad_token_id=src_cfg.get("pad_token_id"))
    torch.manual_seed(seed)
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(torch.float32)
    model.config.torch_dtype = "bfloat16"
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True, max_shard_size="8GB")
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, out / name)
    return out


def _step(done: Path, cmd: list[str], tmp: Path, final: Path, log: Path, threads: int,
          timeout: float = 3600) -> tuple[Path | None, str | None, float | None]:
    """Run `cmd` (which writes `tmp`), then rename `tmp` to `final`; skipped if `done` exists."""
    if done.exists():
        return final, None, None
    if tmp.is_dir():
        shutil.rmtree(tmp)
    elif tmp.exists():
        tmp.unlink()
    res = run_child(cmd, timeout=timeout, env=thread_env(threads), log=log)
    if res.returncode != 0 or not tmp.exists():
        return None, f"{cmd[2] if len(cmd) > 2 else cmd[0]} failed (exit {res.returncode}); see {log}", None
    if final.exists():
        shutil.rmtree(final) if final.is_dir() else final.unlink()
    tmp.rename(final)
    return final, None, res.wall_s


def _sdist_llama_cpp(log: Path) -> Path | None:
    """vendor/llama.cpp of the installed llama-cpp-python's sdist (convert_hf_to_gguf.py,
    gguf-py, conversion/), downloaded with pip and unpacked into bench/.cache once."""
    import tarfile
    from importlib import metadata

    from bench.prepare import CACHE

    version = metadata.version("llama-cpp-python")
    root = CACHE / f"llama.cpp-{version}"
    if (root / "convert_hf_to_gguf.py").is_file():
        return root
    dl = CACHE / "sdist"
    res = run_child([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                     f"llama-cpp-python=={version}", "-d", str(dl)], timeout=900, log=log)
    tars = sorted(dl.glob(f"llama_cpp_python-{version}.tar.gz"))
    if res.returncode != 0 or not tars:
        return None
    prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
    keep = ("convert_hf_to_gguf.py", "gguf-py/", "conversion/")
    tmp = root.with_suffix(".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(tars[0]) as tar:
        for m in tar.getmembers():
            rel = m.name[len(prefix):] if m.name.startswith(prefix) else None
            if rel and rel.startswith(keep) and (m.isfile() or m.isdir()):
                m.name = rel
                tar.extract(m, tmp, filter="data")
    tmp.rename(root)
    return root


SYMMETRIC_EXPORTS = {"1b-int4-sym": (), "1b-int4-sym-lm4": ("--lm-head-bits", "4")}

QUANTIZE_CODE = """
import sys, llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
p.nthread = int(sys.argv[3])
rc = llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p)
sys.exit(rc)
"""


def ensure_1b_models(models: Path, tokenizer_dir: Path, log_dir: Path, threads: int,
                     ) -> tuple[dict[str, Path | None], dict]:
    """Build (once) the checkpoint and its three exports under `bench_root(models)`.

    Returns:
        paths {"1b-hf", "1b-int4", "1b-int4-sym", "1b-int4-sym-lm4", "1b-genai", "1b-gguf",
        "1b-int4-q4_0"} (None or absent
        where a step failed or its tool is missing) and a report
        {name: {"path", "reason", "build_s"}}.
    """
    root = bench_root(models)
    root.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path | None] = {}
    report: dict = {}

    def note(name: str, result: tuple[Path | None, str | None, float | None]) -> Path | None:
        paths[name] = result[0]
        report[name] = {"path": str(result[0]) if result[0] else None, "reason": result[1],
                        "build_s": result[2]}
        return result[0]

    hf = root / "hf"
    code = ("import sys; from pathlib import Path; from bench.model_1b import make_checkpoint; "
            "make_checkpoint(Path(sys.argv[1]), Path(sys.argv[2]))")
    hf = note("1b-hf", _step(hf / "model.safetensors",
                             [sys.executable, "-c", code, str(hf.with_suffix(".tmp")),
                              str(tokenizer_dir)],
                             hf.with_suffix(".tmp"), hf, log_dir / "1b-checkpoint.log", threads))
    if hf is None:
        return {**paths, "1b-int4": None, "1b-genai": None, "1b-gguf": None,
                "1b-int4-q4_0": None, **dict.fromkeys(SYMMETRIC_EXPORTS)}, report
    # --max-length: the KV buffers and rotary caches; the default would be 131072
    out = root / "llorch-int4"
    note("1b-int4", _step(out / "llorch.json",
                          [sys.executable, "-m", "llorch", "export", str(hf), "-o",
                           str(out.with_suffix(".tmp")), "--precision", "int4", "--max-length",
                           "2048", "--quiet"], out.with_suffix(".tmp"), out,
                          log_dir / "1b-llorch-export.log", threads))
    # GenAI's scheme: symmetric blocks, no zero points, accuracy level 4 on every MatMulNBits;
    # with a 8-bit (default) and a 4-bit lm_head (GenAI's own)
    for key, extra in SYMMETRIC_EXPORTS.items():
        out = root / key.replace("1b-", "llorch-")
        note(key, _step(out / "llorch.json",
                        [sys.executable, "-m", "llorch", "export", str(hf), "-o",
                         str(out.with_suffix(".tmp")), "--precision", "int4", "--int4-symmetric",
                         *extra, "--max-length", "2048", "--quiet"], out.with_suffix(".tmp"),
                        out, log_dir / f"{key}-llorch-export.log", threads))
    out = root / "genai-int4"
    if (out / "genai_config.json").is_file():
        note("1b-genai", (out, None, None))
    else:
        from bench.prepare import _builder_venv

        try:
            python = _builder_venv(log_dir / "genai-builder.log")
        except (OSError, RuntimeError) as exc:
            note("1b-genai", (None, f"no builder venv: {exc}", None))
        else:
            note("1b-genai", _step(out / "genai_config.json",
                                   [str(python), "-m", "onnxruntime_genai.models.builder", "-i",
                                    str(hf), "-o", str(out.with_suffix(".tmp")), "-p", "int4",
                                    "-e", "cpu", "-c", str(root / ".builder-cache")],
                                   out.with_suffix(".tmp"), out, log_dir / "1b-genai-builder.log",
                                   threads))
    gguf = root / "q4_0.gguf"
    if gguf.is_file():
        note("1b-gguf", (gguf, None, None))
        _llorch_from_gguf(root, gguf, note, log_dir, threads)
        return paths, report
    try:
        import llama_cpp  # noqa: F401
    except ImportError as exc:
        note("1b-gguf", (None, f"llama-cpp-python is not importable ({exc})", None))
        return paths, report
    src = _sdist_llama_cpp(log_dir / "1b-gguf.log")
    if src is None:
        note("1b-gguf", (None, f"could not fetch llama-cpp-python's sdist; see {log_dir}", None))
        return paths, report
    f16 = root / "f16.gguf"
    made = _step(f16, [sys.executable, str(src / "convert_hf_to_gguf.py"), str(hf), "--outtype",
                       "f16", "--outfile", str(f16.with_suffix(".tmp"))],
                 f16.with_suffix(".tmp"), f16, log_dir / "1b-gguf.log", threads)
    if made[0] is None:
        note("1b-gguf", made)
        return paths, report
    made = _step(gguf, [sys.executable, "-c", QUANTIZE_CODE, str(f16), str(gguf.with_suffix(".tmp")),
                        str(threads)], gguf.with_suffix(".tmp"), gguf, log_dir / "1b-gguf.log",
                 threads)
    if made[0] is not None:
        f16.unlink()  # 2.1 GB, only the quantizer's input
    note("1b-gguf", made)
    if made[0] is not None:
        _llorch_from_gguf(root, gguf, note, log_dir, threads)
    return paths, report


def _llorch_from_gguf(root: Path, gguf: Path, note, log_dir: Path, threads: int) -> None:
    """`llorch export` of the Q4_0 GGUF: llama.cpp's own 4-bit blocks (integer zero point 8,
    no float zero-point correction), so both engines multiply the very same weights."""
    out = root / "llorch-int4-q4_0"
    note("1b-int4-q4_0", _step(out / "llorch.json",
                               [sys.executable, "-m", "llorch", "export", str(gguf), "-o",
                                str(out.with_suffix(".tmp")), "--precision", "int4",
                                "--max-length", "2048", "--quiet"], out.with_suffix(".tmp"), out,
                               log_dir / "1b-llorch-export-q4_0.log", threads))


def main() -> int:
    """Build everything (`python -m bench.model_1b`); prints the paths."""
    from bench.prepare import CACHE, default_model_paths

    log_dir = CACHE / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    from export.default_model import models_root

    paths, report = ensure_1b_models(models_root(), default_model_paths()["hf"], log_dir, 2)
    print(json.dumps(report, indent=1))
    return 0 if all(paths.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
