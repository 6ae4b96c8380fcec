"""Checkpoint sources behind one interface: config + tensors by HF name.

A source is a HF SafeTensors directory or a llama.cpp GGUF file. ``validate()`` checks every
tensor the config implies exists with its expected shape before anything is written.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from export.config import ExportError, LlamaConfig
from export.quant import GGUF_BLOCK_BYTES, QuantizedWeight, from_gguf_blocks
from export.safetensors_reader import SafeTensorsCheckpoint

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)


class HFSource:
    kind = "safetensors"

    def __init__(self, model_dir: Path):
        self.path = Path(model_dir)
        self.config = LlamaConfig.from_dir(self.path)
        if not (self.path / "tokenizer.json").is_file():
            raise ExportError(
                f"{self.path}: tokenizer.json not found (a Hugging Face 'fast' tokenizer file is "
                "required; convert slow tokenizers with transformers' save_pretrained first)"
            )
        self.ckpt = SafeTensorsCheckpoint(self.path)
        self.files = [self.path / "config.json"] + list(
            dict.fromkeys(self.ckpt.path_of(n) for n in self.ckpt.names()))

    def shape(self, name: str) -> tuple[int, ...] | None:
        return self.ckpt.shape(name) if name in set(self.ckpt.names()) else None

    def load(self, name: str) -> np.ndarray:
        return self.ckpt.load(name)

    def quantized(self, name: str) -> QuantizedWeight | None:
        return None

    def dtype_summary(self) -> str:
        return "safetensors"

    def tokenizer_files(self) -> dict[str, bytes]:
        return {n: (self.path / n).read_bytes() for n in TOKENIZER_FILES
                if (self.path / n).is_file()}


class GGUFSource:
    kind = "gguf"

    def __init__(self, path: Path):
        from export.gguf_reader import GGUFCheckpoint

        self.path = Path(path)
        self.ckpt = GGUFCheckpoint(self.path)
        self.config = LlamaConfig.from_hf(self.ckpt.hf_config(), source=f"{self.path} (metadata)")
        self.files = [self.path]
        self._names = set(self.ckpt.names())

    def shape(self, name: str) -> tuple[int, ...] | None:
        if name not in self._names:
            return None
        return tuple(self.ckpt.shape(name))

    def load(self, name: str) -> np.ndarray:
        return np.asarray(self.ckpt.load(name), dtype=np.float32)

    def quantized(self, name: str) -> QuantizedWeight | None:
        qtype = self.ckpt.qtype(name)
        if qtype not in GGUF_BLOCK_BYTES:
            return None
        blocks = self.ckpt.load_blocks(name)
        k = self.shape(name)[-1]
        return from_gguf_blocks(qtype, blocks, k)

    def tokenizer_files(self) -> dict[str, bytes]:
        import json

        from export.gguf_tokenizer import tokenizer_files

        out = {}
        for fname, content in tokenizer_files(self.ckpt).items():
            out[fname] = (content if isinstance(content, str)
                          else json.dumps(content, indent=2, ensure_ascii=False)).encode()
        return out


def open_source(src: Path) -> HFSource | GGUFSource:
    src = Path(src)
    if not src.exists():
        raise ExportError(f"{src}: no such file or directory")
    if src.is_file():
        if src.suffix.lower() == ".gguf" or _is_gguf(src):
            return GGUFSource(src)
        raise ExportError(f"{src}: not a GGUF file or a Hugging Face model directory")
    if not (src / "config.json").is_file():
        raise ExportError(f"{src}: config.json not found (expected a Hugging Face model directory)")
    return HFSource(src)


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def validate(source: HFSource | GGUFSource) -> None:
    """Every tensor the config implies must exist with the expected shape."""
    cfg = source.config
    where = str(source.path)
    for name, expected in cfg.expected_shapes().items():
        found = source.shape(name)
        if found is None:
            raise ExportError(f"{where}: missing tensor '{name}' (expected shape {list(expected)})")
        if tuple(found) != tuple(expected):
            raise ExportError(
                f"{where}: tensor '{name}' has shape {list(found)}, expected {list(expected)} "
                "from config.json"
            )
