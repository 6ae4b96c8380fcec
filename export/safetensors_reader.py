"""Lazy reader over a HF SafeTensors checkpoint (one file or index-sharded).

The header is parsed here rather than through ``safetensors.safe_open`` because its numpy
API cannot read bf16; each tensor is read on its own and converted to float32 one at a time,
so peak memory stays around the largest single tensor.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from export.config import ExportError

_DTYPES = {
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.uint16,  # widened to float32 by shifting into the high half
    "F64": np.float64,
    "I64": np.int64,
    "I32": np.int32,
    "I8": np.int8,
    "U8": np.uint8,
}


class _File:
    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        try:
            with open(path, "rb") as f:
                raw = f.read(8)
                if len(raw) < 8:
                    raise ExportError(f"{path}: truncated safetensors file (no header)")
                (n,) = struct.unpack("<Q", raw)
                if n > size - 8 or n > 100 * 2**20:
                    raise ExportError(f"{path}: corrupt safetensors header (length {n})")
                header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ExportError(f"{path}: corrupt safetensors header ({e})") from None
        header.pop("__metadata__", None)
        self.base = 8 + n
        self.entries: dict[str, dict] = header
        end = max((e["data_offsets"][1] for e in header.values()), default=0)
        if self.base + end > size:
            raise ExportError(
                f"{path}: truncated safetensors file ({size} bytes, header needs {self.base + end})"
            )

    def tensor(self, name: str) -> np.ndarray:
        e = self.entries[name]
        dtype = _DTYPES.get(e["dtype"])
        if dtype is None:
            raise ExportError(f"{self.path}: tensor '{name}' has unsupported dtype {e['dtype']}")
        start, stop = e["data_offsets"]
        # A positioned read, not a memmap: the bytes are freed with the array, so resident
        # memory stays around one tensor instead of growing with every page touched.
        count = (stop - start) // np.dtype(dtype).itemsize
        arr = np.fromfile(self.path, dtype=dtype, count=count, offset=self.base + start)
        arr = arr.reshape(e["shape"])
        if e["dtype"] == "BF16":
            return (arr.astype(np.uint32) << 16).view(np.float32)
        return arr


class SafeTensorsCheckpoint:
    """Tensors by HF name across ``model.safetensors`` or its shards, read lazily."""

    def __init__(self, model_dir: Path):
        model_dir = Path(model_dir)
        index = model_dir / "model.safetensors.index.json"
        single = model_dir / "model.safetensors"
        self._where: dict[str, _File] = {}
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ExportError(f"{index}: not a valid safetensors index ({e})") from None
            files: dict[str, _File] = {}
            for name, shard in weight_map.items():
                if shard not in files:
                    p = model_dir / shard
                    if not p.is_file():
                        raise ExportError(f"{index}: shard {shard} (tensor '{name}') not found")
                    files[shard] = _File(p)
                if name not in files[shard].entries:
                    raise ExportError(f"{model_dir / shard}: tensor '{name}' listed in {index.name} is missing")
                self._where[name] = files[shard]
        elif single.is_file():
            f = _File(single)
            self._where = {name: f for name in f.entries}
        else:
            found = sorted(p.name for p in model_dir.glob("*.safetensors"))
            if len(found) == 1:
                f = _File(model_dir / found[0])
                self._where = {name: f for name in f.entries}
            else:
                raise ExportError(
                    f"{model_dir}: no model.safetensors or model.safetensors.index.json"
                    + (f" (found {found})" if found else "")
                )

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._where[name].entries[name]["shape"])

    def path_of(self, name: str) -> Path:
        return self._where[name].path

    def load(self, name: str) -> np.ndarray:
        """The tensor as float32 (a fresh array; the memmap is not kept alive by it)."""
        if name not in self._where:
            raise ExportError(f"missing tensor '{name}' in the checkpoint")
        return np.asarray(self._where[name].tensor(name), dtype=np.float32)
