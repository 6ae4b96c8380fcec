"""GGUF file -> Hugging Face SafeTensors directory (`llorch export --to-safetensors`).

    model.gguf ──► config.json              (GGUFCheckpoint.hf_config)
               ├─► model.safetensors        (float32, dequantized, HF names/layout, streamed)
               └─► tokenizer.json, tokenizer_config.json, generation_config.json

Everything is written into a temporary sibling directory that is renamed into place at the
end, so a failure leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import struct
import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from export.config import ExportError
from export.gguf_reader import GGUFCheckpoint
from export.gguf_tokenizer import tokenizer_files


def gguf_to_hf(
    gguf_path: Path, out_dir: Path, *, force: bool = False, progress: bool = True
) -> Path:
    """Convert a llama GGUF file into an HF SafeTensors model directory.

    Args:
        gguf_path: the `.gguf` file.
        out_dir: the directory to create.
        force: replace `out_dir` if it exists.
        progress: show a progress bar on stderr.

    Returns:
        `out_dir`.

    Raises:
        ExportError: `out_dir` exists (without force), or the GGUF is unusable.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise ExportError(f"{out_dir}: output directory exists (pass force=True / --force)")
    ckpt = GGUFCheckpoint(Path(gguf_path))
    files = {"config.json": ckpt.hf_config(), **tokenizer_files(ckpt)}

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = _make_sibling(out_dir, "tmp")
    try:
        for name, content in files.items():
            (tmp / name).write_text(
                json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
            )
        names = ckpt.names()
        write_safetensors(
            tmp / "model.safetensors",
            ((n, ckpt.shape(n)) for n in names),
            _progress((ckpt.load(n) for n in names), len(names), progress),
            metadata={"format": "pt"},
        )
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def write_safetensors(
    path: Path,
    specs: Iterable[tuple[str, tuple[int, ...]]],
    arrays: Iterable[np.ndarray],
    *,
    metadata: dict[str, str] | None = None,
) -> None:
    """Stream float32 tensors into a SafeTensors file, one tensor in memory at a time.

    Format: u64 little-endian header length, JSON header {name: {dtype, shape,
    data_offsets}}, padded with spaces to 8 bytes, then the raw little-endian data.

    Args:
        specs: (name, shape) of every tensor, in the order `arrays` yields them.
        arrays: the tensors (float32, shapes as in `specs`), produced lazily.
    """
    specs = list(specs)
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, shape in specs:
        size = 4 * int(np.prod(shape, dtype=np.int64))
        header[name] = {
            "dtype": "F32",
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        n = 0
        for (name, shape), arr in zip(specs, arrays, strict=False):
            if tuple(arr.shape) != tuple(shape):
                raise ValueError(f"{name}: shape {arr.shape} != declared {shape}")
            f.write(np.ascontiguousarray(arr, dtype="<f4").data)
            n += 1
        if n != len(specs):
            raise ValueError(f"{path}: got {n} tensors, header declares {len(specs)}")


def _progress(it: Iterable[np.ndarray], total: int, enabled: bool) -> Iterable[np.ndarray]:
    if not enabled:
        return it
    from tqdm import tqdm

    return tqdm(it, total=total, desc="gguf -> safetensors", unit="tensor", file=sys.stderr)


def _make_sibling(out_dir: Path, kind: str) -> Path:
    """A fresh hidden directory next to out_dir (mkdir honours the umask, unlike mkdtemp)."""
    while True:
        path = out_dir.parent / f".{out_dir.name}.{kind}-{secrets.token_hex(4)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    """Rename tmp to out_dir; an existing out_dir is moved aside first and removed after."""
    old = None
    if out_dir.exists():
        old = _make_sibling(out_dir, "old")
        os.replace(out_dir, old / out_dir.name)
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        if old is not None:
            os.replace(old / out_dir.name, out_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
