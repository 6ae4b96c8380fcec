"""Inputs the peers need, each prepared once and cached under bench/.cache (git-ignored):

  default model      `llorch models fetch`: int4 + fp32 exports, the HF dir, the Q4_1 GGUF
  genai-builder-int4 ONNX Runtime GenAI's model builder on the HF dir. The builder needs
                     transformers >= 5 (and onnx_ir) while optimum-onnx pins 4.57, so it runs
                     from its own venv, `builder-venv`, which holds only those two and sees
                     every other package through a .pth file pointing at this interpreter's
                     site-packages.
  optimum-fp32       optimum's own export of the HF dir
  int4-l0            llorch int4 with --down-proj-accuracy-level 0, the export the default was
                     before serve became batch-invariant by default (the determinism rows)
  int4-sym-lm4       llorch int4 with ORT GenAI's builder's scheme (--int4-symmetric
                     --lm-head-bits 4: its blocks bit for bit), so that llorch and GenAI run
                     the same bytes (the speculative rows)

Each `ensure_*` returns (path or None, reason or None, seconds spent building or None).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from bench.proc import run_child, thread_env

CACHE = Path(__file__).resolve().parent / ".cache"


def default_model_paths() -> dict[str, Path]:
    """{"gguf", "hf", "int4", "fp32"} of the default model, prepared if missing."""
    from export.default_model import ensure_default_model

    return ensure_default_model(variants=("int4", "fp32"), progress=False)


def _builder_venv(log: Path) -> Path:
    venv = CACHE / "builder-venv"
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        site = Path(sysconfig.get_paths(vars={"base": str(venv), "platbase": str(venv)})["purelib"])
        # later on sys.path than the venv's own site-packages: its transformers wins
        (site / "zz_parent_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    probe = subprocess.run([str(python), "-c", "import transformers, onnx_ir; "
                            "assert int(transformers.__version__.split('.')[0]) >= 5"],
                           capture_output=True)
    if probe.returncode != 0:
        with open(log, "ab") as out:
            subprocess.run([str(python), "-m", "pip", "install", "-q", "transformers>=5", "onnx_ir"],
                           stdout=out, stderr=subprocess.STDOUT, check=True)
    return python


def ensure_int4_down_proj_level0(hf_dir: Path) -> tuple[Path, float | None]:
    """The default model's int4 export as llorch made it before serve was batch-invariant by
    default (`--down-proj-accuracy-level 0`: its W8A8 graph is not row-invariant, so a lone
    sequence decodes on the int4 graph and its tokens depend on the batch), with the fp32 KV
    cache of then. Built once into the bench cache; returns (dir, export seconds or None when
    cached)."""
    from export.api import export_model

    out = CACHE / "smollm2-135m-instruct-int4-down-proj-l0"
    if (out / "llorch.json").is_file():
        return out, None
    t0 = time.perf_counter()
    export_model(hf_dir, out, precision="int4", target="cpu", down_proj_accuracy_level=0,
                 kv_dtype="fp32", force=out.exists(), progress=False)
    return out, time.perf_counter() - t0


def ensure_int4_symmetric_lm4(hf_dir: Path) -> tuple[Path, float | None]:
    """The default model exported with ORT GenAI's builder's quantization (symmetric blocks
    of 32, a 4-bit lm_head: `--int4-symmetric --lm-head-bits 4`), every other setting
    llorch's default. Built once into the bench cache; returns (dir, export seconds or None
    when cached)."""
    from export.api import export_model

    out = CACHE / "smollm2-135m-instruct-int4-sym-lm4"
    if (out / "llorch.json").is_file():
        return out, None
    t0 = time.perf_counter()
    export_model(hf_dir, out, precision="int4", target="cpu", int4_symmetric=True,
                 lm_head_bits=4, force=out.exists(), progress=False)
    return out, time.perf_counter() - t0


def ensure_builder_int4(hf_dir: Path, log: Path, threads: int) -> tuple[Path | None, str | None, float | None]:
    out = CACHE / "genai-builder-int4"
    if (out / "genai_config.json").is_file():
        return out, None, None
    try:
        python = _builder_venv(log)
    except (subprocess.CalledProcessError, OSError) as exc:
        return None, (f"could not set up the builder venv (transformers>=5, onnx_ir): {exc}; "
                      f"see {log}"), None
    tmp = CACHE / "genai-builder-int4.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    res = run_child([str(python), "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir),
                     "-o", str(tmp), "-p", "int4", "-e", "cpu", "-c", str(CACHE / "builder-hf-cache")],
                    timeout=1800, env=thread_env(threads), log=log, cwd=CACHE)
    if res.returncode != 0 or not (tmp / "genai_config.json").is_file():
        shutil.rmtree(tmp, ignore_errors=True)
        return None, f"ORT GenAI's model builder failed (exit {res.returncode}); see {log}", None
    tmp.rename(out)
    return out, None, res.wall_s


def ensure_optimum_fp32(hf_dir: Path, log: Path, threads: int) -> tuple[Path | None, str | None, float | None]:
    out = CACHE / "optimum-fp32"
    if any(out.glob("*.onnx")):
        return out, None, None
    tmp = CACHE / "optimum-fp32.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    code = ("import sys; from pathlib import Path; from bench.peers.optimum_ort import export; "
            "export(Path(sys.argv[1]), Path(sys.argv[2]))")
    res = run_child([sys.executable, "-c", code, str(hf_dir), str(tmp)], timeout=1800,
                    env=thread_env(threads), log=log, cwd=CACHE.parent.parent)
    if res.returncode != 0 or not any(tmp.glob("*.onnx")):
        shutil.rmtree(tmp, ignore_errors=True)
        return None, f"optimum export failed (exit {res.returncode}); see {log}", None
    tmp.rename(out)
    return out, None, res.wall_s
