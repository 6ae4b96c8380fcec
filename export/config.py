"""Model configuration, parsed once at the edge from a Hugging Face ``config.json``."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


class ExportError(Exception):
    """User-facing export error; the message names the file and field."""


# Architectures whose math is Llama's: RMSNorm, rotate-half RoPE, SiLU-gated MLP.
# Qwen2 adds a bias on q/k/v; Mistral is Llama with (optionally) a sliding window.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeScaling:
    type: str = "default"  # default | linear | llama3
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class LlamaConfig:
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # bias on q/k/v projections (Qwen2; Llama's `attention_bias`)
    mlp_bias: bool
    sliding_window: int | None = None  # attend to the last `sliding_window` positions only
    bos_token_id: int | list[int] | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], source: str = "config.json") -> LlamaConfig:
        """Validate and normalise a HF config dict. Raises ExportError naming the field."""

        def need(key: str) -> Any:
            if key not in cfg or cfg[key] is None:
                raise ExportError(f"{source}: required field '{key}' is missing")
            return cfg[key]

        archs = cfg.get("architectures") or []
        model_type = cfg.get("model_type")
        if archs:
            unknown = [a for a in archs if a not in SUPPORTED_ARCHITECTURES]
            if unknown:
                raise ExportError(
                    f"{source}: unsupported architectures {unknown!r} "
                    f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
                )
        if model_type not in set(SUPPORTED_ARCHITECTURES.values()):
            raise ExportError(
                f"{source}: unsupported model_type {model_type!r} "
                f"(supported: {', '.join(sorted(set(SUPPORTED_ARCHITECTURES.values())))})"
            )
        act = cfg.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ExportError(f"{source}: unsupported hidden_act {act!r} (supported: silu)")

        hidden = int(need("hidden_size"))
        heads = int(need("num_attention_heads"))
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        head_dim = int(cfg.get("head_dim") or hidden // heads)
        if heads % kv_heads:
            raise ExportError(
                f"{source}: num_attention_heads ({heads}) is not a multiple of "
                f"num_key_value_heads ({kv_heads})"
            )
        if head_dim % 2:
            raise ExportError(f"{source}: head_dim {head_dim} must be even for rotary embeddings")
        if cfg.get("partial_rotary_factor", 1.0) not in (1, 1.0):
            raise ExportError(
                f"{source}: partial_rotary_factor {cfg['partial_rotary_factor']} is not supported"
            )
        # A window shorter than the context must be applied in every layer (Mistral v0.1);
        # per-layer mixes (Qwen2's max_window_layers / layer_types) are refused by name.
        window = _sliding_window(cfg, model_type)
        max_pos = int(cfg.get("max_position_embeddings", 2048))
        if window is not None and int(window) >= max_pos:
            window = None
        if window is not None and not _window_in_every_layer(cfg, model_type):
            raise ExportError(
                f"{source}: sliding_window {window} applied to only some layers "
                "(layer_types / max_window_layers) is not supported"
            )

        bias = bool(cfg.get("attention_bias", model_type == "qwen2"))
        return cls(
            model_type=model_type,
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_hidden_layers=int(need("num_hidden_layers")),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            vocab_size=int(need("vocab_size")),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(cfg.get("rope_theta", 10000.0)),
            rope_scaling=_rope_scaling(cfg, source),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            sliding_window=None if window is None else int(window),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=cfg.get("eos_token_id"),
            pad_token_id=cfg.get("pad_token_id"),
        )

    @classmethod
    def from_dir(cls, model_dir: Path) -> LlamaConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ExportError(f"{path}: config.json not found in {model_dir}")
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ExportError(f"{path}: not valid JSON ({e})") from None
        return cls.from_hf(cfg, source=str(path))

    # -- derived sizes --------------------------------------------------------------------
    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def num_params(self) -> int:
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        attn = h * (self.q_size + 2 * self.kv_size) + self.q_size * h
        layer = attn + 3 * h * i + 2 * h
        return v * h * (1 if self.tie_word_embeddings else 2) + self.num_hidden_layers * layer + h

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor name the checkpoint must hold, with its HF shape."""
        h, i = self.hidden_size, self.intermediate_size
        shapes: dict[str, tuple[int, ...]] = {
            "model.embed_tokens.weight": (self.vocab_size, h),
            "model.norm.weight": (h,),
        }
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (self.vocab_size, h)
        for n in range(self.num_hidden_layers):
            p = f"model.layers.{n}."
            shapes[p + "input_layernorm.weight"] = (h,)
            shapes[p + "post_attention_layernorm.weight"] = (h,)
            shapes[p + "self_attn.q_proj.weight"] = (self.q_size, h)
            shapes[p + "self_attn.k_proj.weight"] = (self.kv_size, h)
            shapes[p + "self_attn.v_proj.weight"] = (self.kv_size, h)
            shapes[p + "self_attn.o_proj.weight"] = (h, self.q_size)
            if self.attention_bias:
                shapes[p + "self_attn.q_proj.bias"] = (self.q_size,)
                shapes[p + "self_attn.k_proj.bias"] = (self.kv_size,)
                shapes[p + "self_attn.v_proj.bias"] = (self.kv_size,)
            shapes[p + "mlp.gate_proj.weight"] = (i, h)
            shapes[p + "mlp.up_proj.weight"] = (i, h)
            shapes[p + "mlp.down_proj.weight"] = (h, i)
        return shapes

    def to_hf(self) -> dict[str, Any]:
        """A LlamaForCausalLM config.json equivalent of this config."""
        d: dict[str, Any] = {
            "architectures": [
                next(a for a, t in SUPPORTED_ARCHITECTURES.items() if t == self.model_type)
            ],
            "model_type": self.model_type,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "hidden_act": "silu",
        }
        rs = self.rope_scaling
        if rs.type == "linear":
            d["rope_scaling"] = {"rope_type": "linear", "factor": rs.factor}
        elif rs.type == "llama3":
            d["rope_scaling"] = {
                "rope_type": "llama3",
                "factor": rs.factor,
                "low_freq_factor": rs.low_freq_factor,
                "high_freq_factor": rs.high_freq_factor,
                "original_max_position_embeddings": rs.original_max_position_embeddings,
            }
        if self.sliding_window is not None:
            d["sliding_window"] = self.sliding_window
        for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(self, k) is not None:
                d[k] = getattr(self, k)
        return d


def _layer_types(cfg: dict[str, Any], model_type: str) -> list[str] | None:
    """Per-layer attention kinds as transformers derives them (None: uniform)."""
    if cfg.get("layer_types") is not None:
        return list(cfg["layer_types"])
    if model_type == "qwen2":  # layers >= max_window_layers use the window
        n, first = int(cfg.get("num_hidden_layers", 0)), int(cfg.get("max_window_layers", 28))
        return ["sliding_attention" if i >= first else "full_attention" for i in range(n)]
    return None


def _sliding_window(cfg: dict[str, Any], model_type: str) -> int | None:
    """The attention window HF applies, or None (Qwen2 only with use_sliding_window)."""
    if model_type == "qwen2" and not cfg.get("use_sliding_window", False):
        return None
    types = _layer_types(cfg, model_type)
    if types is not None and "sliding_attention" not in types:
        return None
    return cfg.get("sliding_window")


def _window_in_every_layer(cfg: dict[str, Any], model_type: str) -> bool:
    types = _layer_types(cfg, model_type)
    return types is None or all(t == "sliding_attention" for t in types)


def _rope_scaling(cfg: dict[str, Any], source: str) -> RopeScaling:
    rs = cfg.get("rope_scaling")
    if not rs:
        return RopeScaling()
    if not isinstance(rs, dict):
        raise ExportError(f"{source}: rope_scaling must be an object, got {rs!r}")
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind not in SUPPORTED_ROPE_TYPES:
        raise ExportError(
            f"{source}: unsupported rope_scaling type {kind!r} "
            f"(field rope_scaling.rope_type; supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    if kind == "default":
        return RopeScaling()
    factor = float(rs.get("factor", 1.0))
    if kind == "linear":
        return RopeScaling(type="linear", factor=factor)
    return RopeScaling(
        type="llama3",
        factor=factor,
        low_freq_factor=float(rs.get("low_freq_factor", 1.0)),
        high_freq_factor=float(rs.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(rs.get("original_max_position_embeddings", 8192)),
    )


def inv_freq(config: LlamaConfig) -> np.ndarray:
    """RoPE inverse frequencies [head_dim/2], with rope_scaling applied (HF semantics)."""
    d = config.head_dim
    # float32 throughout, as transformers computes it, so positions far out agree too.
    exponent = np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / np.float32(d)
    inv = (1.0 / (np.float32(config.rope_theta) ** exponent)).astype(np.float32)
    rs = config.rope_scaling
    if rs.type == "linear":
        inv = inv / rs.factor
    elif rs.type == "llama3":
        low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
        high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / rs.factor, inv)
        smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
            rs.high_freq_factor - rs.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)


def cos_sin_cache(config: LlamaConfig, length: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin tables [length, head_dim/2] float32 for positions 0..length-1."""
    freqs = np.outer(np.arange(length, dtype=np.float32), inv_freq(config))
    return np.cos(freqs).astype(np.float32), np.sin(freqs).astype(np.float32)
