"""Inputs the peers need, each prepared once and cached under bench/.cache (git-ignored):

  default model      `llorch models fetch`: int4 + fp32 exports, the HF dir, the Q4_1 GGUF
  genai-builder-int4 ONNX Runtime GenAI's model builder on the HF dir. The builder needs
                     transformers >= 5 (and onnx_ir) while optimum-onnx pins 4.57, so it runs
                     from its own venv, `builder-venv`, which holds only those two and sees
                     every other package through a .pth file pointing at this interpreter's
                     site-packages.
  optimum-fp32       optimum's own export of the HF dir

Each `ensure_*` returns (path or None, reason or None, seconds spent building or None).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
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
