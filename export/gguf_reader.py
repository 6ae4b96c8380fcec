"""Lazy reader over a llama.cpp GGUF file, presented the way a Hugging Face checkpoint looks.

`GGUFCheckpoint` memory-maps the file (via `gguf.GGUFReader`) and hands out one tensor at a
time under its HF name, in HF layout (`[out, in]` for linears), either dequantized to float32
(`load`) or as raw quant blocks (`load_blocks`), with llama.cpp's Q/K row permutation undone.

llama.cpp's converter interleaves the two rotary halves of every head of q_proj / k_proj
(HF rotates halves, GGML rotates adjacent pairs):

    gguf = hf.reshape(n_head, 2, head_dim // 2, in).swapaxes(1, 2).reshape(out, in)

Undoing it is a pure row permutation, so it applies to quant blocks too (blocks run along
the input dim, each row keeps its own blocks).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from export.config import ExportError

# GGUF tensor name (per-layer part after `blk.{i}.`) -> HF name (after `model.layers.{i}.`).
_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Present in Llama 3.1+ GGUFs: per-frequency llama3 rope factors (folded into hf_config()).
_ROPE_FREQS = "rope_freqs.weight"
# Arrays longer than this stay out of `metadata` (token lists, merges, scores).
_MAX_INLINE_ARRAY = 1024


class GGUFCheckpoint:
    """A llama-architecture GGUF file, read lazily.

    Args:
        path: the `.gguf` file.

    Raises:
        ExportError: the file is missing, not a GGUF, truncated, or not `llama` architecture.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise ExportError(f"{self.path}: GGUF file not found")
        with open(self.path, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise ExportError(f"{self.path}: not a GGUF file (starts with {magic!r}, not b'GGUF')")
        try:
            reader = gguf.GGUFReader(self.path, "r")
        except Exception as e:  # the gguf package raises ValueError/IndexError/KeyError/...
            raise ExportError(
                f"{self.path}: truncated or corrupt GGUF file "
                f"({self.path.stat().st_size} bytes; {type(e).__name__}: {e})"
            ) from e
        self._check_complete(reader.tensors)

        self.metadata: dict[str, Any] = {}
        # Big arrays (tokens, merges, scores) in compact form: the reader's per-element numpy
        # views cost ~1 KB each, so the reader itself is dropped once these are copied out.
        self._arrays: dict[str, list[str] | np.ndarray] = {}
        for name, field in reader.fields.items():
            if name.startswith("GGUF."):
                continue
            if field.types[0] == gguf.GGUFValueType.ARRAY and len(field.data) > _MAX_INLINE_ARRAY:
                self._arrays[name] = _compact_array(field)
            else:
                self.metadata[name] = _field_value(field)
        arch = self.metadata.get("general.architecture")
        if arch != "llama":
            raise ExportError(
                f"{self.path}: general.architecture is {arch!r}; only 'llama' GGUF files are supported"
            )

        self._tensors = {t.name: t for t in reader.tensors}
        self._hf_to_gguf: dict[str, str] = {}
        for name in self._tensors:
            hf = _hf_name(name)
            if hf is None:
                if name == _ROPE_FREQS:
                    continue
                raise ExportError(f"{self.path}: unexpected tensor {name!r} for a llama GGUF")
            self._hf_to_gguf[hf] = name
        expected = self._expected_names()
        extra = set(self._hf_to_gguf) - set(self.names())
        if extra:  # e.g. more blk.N than llama.block_count says
            names = sorted(self._hf_to_gguf[n] for n in extra)
            raise ExportError(f"{self.path}: unexpected tensors {names[:5]} for a llama GGUF")
        missing = [n for n in expected if n not in self._hf_to_gguf]
        if missing:
            raise ExportError(
                f"{self.path}: missing tensors {[self._gguf_name_guess(n) for n in missing[:5]]}"
                + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            )

    # -- metadata -------------------------------------------------------------------------

    def _check_complete(self, tensors: list[gguf.ReaderTensor]) -> None:
        """Every tensor must lie inside the file (the gguf package does not always notice)."""
        size = self.path.stat().st_size
        for t in tensors:
            if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
                raise ExportError(
                    f"{self.path}: truncated GGUF file: tensor {t.name!r} needs bytes up to "
                    f"{t.data_offset + t.n_bytes}, file has {size}"
                )

    def _arch_key(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(f"llama.{key}", default)

    def _require(self, key: str) -> Any:
        value = self.metadata.get(key)
        if value is None:
            raise ExportError(f"{self.path}: required metadata field {key} is missing")
        return value

    def array(self, key: str) -> list[Any] | None:
        """A metadata array (also the big ones kept out of `metadata`), or None if absent."""
        if key in self._arrays:
            value = self._arrays[key]
            return value.tolist() if isinstance(value, np.ndarray) else list(value)
        value = self.metadata.get(key)
        if value is not None and not isinstance(value, list):
            raise ExportError(f"{self.path}: metadata field {key} is not an array")
        return value

    def array_len(self, key: str) -> int | None:
        value = self._arrays.get(key, self.metadata.get(key))
        return None if value is None else len(value)

    def tokens(self) -> list[str]:
        tokens = self.array("tokenizer.ggml.tokens")
        if tokens is None:
            raise ExportError(f"{self.path}: metadata field tokenizer.ggml.tokens is missing")
        return tokens

    def token_types(self) -> list[int] | None:
        return self.array("tokenizer.ggml.token_type")

    def scores(self) -> list[float] | None:
        return self.array("tokenizer.ggml.scores")

    def merges(self) -> list[str] | None:
        return self.array("tokenizer.ggml.merges")

    def hf_config(self) -> dict[str, Any]:
        """A transformers `LlamaForCausalLM` config.json dict built from the llama.* metadata."""
        hidden = int(self._require("llama.embedding_length"))
        heads = int(self._require("llama.attention.head_count"))
        kv_heads = int(self._arch_key("attention.head_count_kv", heads))
        head_dim = int(self._arch_key("attention.key_length", 0) or hidden // heads)
        rot = self._arch_key("rope.dimension_count")
        if rot is not None and int(rot) != head_dim:
            raise ExportError(
                f"{self.path}: llama.rope.dimension_count is {rot} but head_dim is {head_dim}; "
                "partial rotary embeddings are not supported"
            )
        vocab = self._arch_key("vocab_size")
        if vocab is None:
            vocab = (
                self.array_len("tokenizer.ggml.tokens")
                or self.shape("model.embed_tokens.weight")[0]
            )

        cfg: dict[str, Any] = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": hidden,
            "intermediate_size": int(self._require("llama.feed_forward_length")),
            "num_hidden_layers": int(self._require("llama.block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "head_dim": head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": float(self._arch_key("attention.layer_norm_rms_epsilon", 1e-5)),
            "rope_theta": float(self._arch_key("rope.freq_base", 10000.0)),
            "max_position_embeddings": int(self._arch_key("context_length", 2048)),
            "vocab_size": int(vocab),
            "tie_word_embeddings": "output.weight" not in self._tensors,
            "attention_bias": "blk.0.attn_q.bias" in self._tensors,
            "mlp_bias": False,
            "torch_dtype": "float32",
        }
        for key, gguf_key in (
            ("bos_token_id", "tokenizer.ggml.bos_token_id"),
            ("eos_token_id", "tokenizer.ggml.eos_token_id"),
            ("pad_token_id", "tokenizer.ggml.padding_token_id"),
        ):
            if self.metadata.get(gguf_key) is not None:
                cfg[key] = int(self.metadata[gguf_key])
        rope_scaling = self._rope_scaling(cfg["rope_theta"], head_dim)
        if rope_scaling is not None:
            cfg["rope_scaling"] = rope_scaling
        return cfg

    def _rope_scaling(self, theta: float, head_dim: int) -> dict[str, Any] | None:
        kind = self._arch_key("rope.scaling.type")
        if kind not in (None, "none"):
            if kind != "linear":
                raise ExportError(
                    f"{self.path}: llama.rope.scaling.type {kind!r} is not supported "
                    "(supported: none, linear)"
                )
            factor = self._arch_key("rope.scaling.factor")
            if factor is None:
                raise ExportError(f"{self.path}: llama.rope.scaling.factor is missing")
            return {"rope_type": "linear", "factor": _clean_float(factor)}
        if _ROPE_FREQS in self._tensors:
            return self._llama3_rope_scaling(theta, head_dim)
        return None

    def _llama3_rope_scaling(self, theta: float, head_dim: int) -> dict[str, Any]:
        """Recover HF's llama3 rope_scaling from the stored per-frequency factors."""
        t = self._tensors[_ROPE_FREQS]
        factors = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float64).ravel()
        inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
        wavelen = 2 * math.pi / inv
        factor = float(factors.max())
        # llama.cpp writes rope_freqs from (factor, low, high, original ctx); try Meta's values.
        for orig in (8192, 4096, 16384, 32768, 131072):
            for low, high in ((1.0, 4.0), (1.0, 2.0), (1.0, 8.0)):
                lo_w, hi_w = orig / low, orig / high
                smooth = (orig / wavelen - low) / (high - low)
                want = np.where(
                    wavelen < hi_w,
                    1.0,
                    np.where(wavelen > lo_w, factor, 1 / ((1 - smooth) / factor + smooth)),
                )
                if len(want) == len(factors) and np.allclose(want, factors, rtol=1e-4):
                    return {
                        "rope_type": "llama3",
                        "factor": _clean_float(factor),
                        "low_freq_factor": low,
                        "high_freq_factor": high,
                        "original_max_position_embeddings": orig,
                    }
        raise ExportError(
            f"{self.path}: tensor {_ROPE_FREQS} holds rope factors that match no llama3 "
            "rope_scaling; custom rope frequencies are not supported"
        )

    # -- tensors --------------------------------------------------------------------------

    def _expected_names(self) -> list[str]:
        n_layers = int(self._require("llama.block_count"))
        names = ["model.embed_tokens.weight"]
        for i in range(n_layers):
            p = f"model.layers.{i}."
            names += [
                p + "input_layernorm.weight",
                p + "self_attn.q_proj.weight",
                p + "self_attn.k_proj.weight",
                p + "self_attn.v_proj.weight",
                p + "self_attn.o_proj.weight",
                p + "post_attention_layernorm.weight",
                p + "mlp.gate_proj.weight",
                p + "mlp.up_proj.weight",
                p + "mlp.down_proj.weight",
            ]
        return names + ["model.norm.weight"]

    @staticmethod
    def _gguf_name_guess(hf: str) -> str:
        for g, h in _GLOBAL_TENSORS.items():
            if h == hf:
                return g
        _, _, i, rest = hf.split(".", 3)
        return f"blk.{i}." + {v: k for k, v in _LAYER_TENSORS.items()}[rest]

    def names(self) -> list[str]:
        """HF tensor names, in HF module order (lm_head only when the GGUF has output.weight)."""
        names = self._expected_names()
        n_layers = int(self._require("llama.block_count"))
        for i in range(n_layers):
            for part in ("q", "k", "v"):
                bias = f"model.layers.{i}.self_attn.{part}_proj.bias"
                if bias in self._hf_to_gguf:
                    names.append(bias)
        if "lm_head.weight" in self._hf_to_gguf:
            names.append("lm_head.weight")
        return names

    def _tensor(self, hf_name: str) -> gguf.ReaderTensor:
        try:
            return self._tensors[self._hf_to_gguf[hf_name]]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor {hf_name!r}") from None

    def gguf_name(self, hf_name: str) -> str:
        return self._tensor(hf_name).name

    def qtype(self, hf_name: str) -> str:
        """The GGML storage type name: 'F32', 'F16', 'BF16', 'Q4_0', 'Q4_1', 'Q8_0', ..."""
        return self._tensor(hf_name).tensor_type.name

    def shape(self, hf_name: str) -> tuple[int, ...]:
        """HF shape (`[out, in]` for linears): GGUF stores dims innermost first."""
        return tuple(int(d) for d in reversed(self._tensor(hf_name).shape.tolist()))

    def _row_perm(self, hf_name: str, rows: int) -> np.ndarray | None:
        """hf_rows = gguf_rows[perm] for q/k projections, else None."""
        if ".self_attn.q_proj." in hf_name:
            n_head = int(self._require("llama.attention.head_count"))
        elif ".self_attn.k_proj." in hf_name:
            n_head = int(
                self._arch_key("attention.head_count_kv")
                or self._require("llama.attention.head_count")
            )
        else:
            return None
        if rows % (2 * n_head):
            raise ExportError(
                f"{self.path}: {self.gguf_name(hf_name)} has {rows} rows, "
                f"not a multiple of 2 x {n_head} heads"
            )
        return unpermute_rows(rows, n_head)

    def load(self, hf_name: str) -> np.ndarray:
        """One tensor, dequantized to float32, HF layout, Q/K rows un-permuted."""
        t = self._tensor(hf_name)
        shape = self.shape(hf_name)
        rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
        src = np.asarray(t.data).reshape(rows, -1)  # one row of elements or of quant blocks
        perm = self._row_perm(hf_name, rows)
        out = np.empty((rows, shape[-1]), dtype=np.float32)
        # Row chunks bound dequantize's temporaries to a few MB beyond the output.
        step = max(1, (4 << 20) // (4 * shape[-1]))
        for r in range(0, rows, step):
            idx = slice(r, r + step) if perm is None else perm[r : r + step]
            try:
                out[r : r + step] = gguf.quants.dequantize(src[idx], t.tensor_type)
            except NotImplementedError:
                raise ExportError(
                    f"{self.path}: tensor {t.name} has type {t.tensor_type.name}, "
                    "which the gguf package cannot dequantize"
                ) from None
        return out.reshape(shape)

    def load_blocks(self, hf_name: str) -> np.ndarray:
        """Raw storage blocks, uint8 `[rows, n_blocks, bytes_per_block]`, HF row order.

        Blocks run along the input dim (GGML's innermost), `gguf.GGML_QUANT_SIZES[type]`
        gives (elements, bytes) per block; unquantized types have 1-element blocks.
        """
        t = self._tensor(hf_name)
        shape = self.shape(hf_name)
        block, nbytes = gguf.GGML_QUANT_SIZES[t.tensor_type]
        cols = shape[-1]
        if cols % block:
            raise ExportError(
                f"{self.path}: {t.name} row length {cols} is not a multiple of block {block}"
            )
        rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
        raw = np.asarray(t.data).view(np.uint8).reshape(rows, cols // block, nbytes)
        perm = self._row_perm(hf_name, rows)
        return raw[perm] if perm is not None else np.array(raw, copy=True)


def unpermute_rows(rows: int, n_head: int) -> np.ndarray:
    """Row indices undoing llama.cpp's Q/K permute: `hf = gguf[unpermute_rows(rows, n_head)]`."""
    return np.arange(rows).reshape(n_head, rows // n_head // 2, 2).swapaxes(1, 2).reshape(-1)


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}"
    return None


def _compact_array(field: gguf.ReaderField) -> list[str] | np.ndarray:
    if field.types[-1] == gguf.GGUFValueType.STRING:
        return [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]
    return np.concatenate([field.parts[i] for i in field.data])


def _field_value(field: gguf.ReaderField) -> Any:
    value = field.contents()
    if field.types == [gguf.GGUFValueType.FLOAT32]:
        return _clean_float(value)
    return value


def _clean_float(x: float) -> float:
    """float32 metadata as the shortest decimal that round-trips (1e-05, not 9.9999997e-06)."""
    return float(np.format_float_positional(np.float32(x), unique=True, trim="-"))
