"""What every graph builder is given: `GraphSpec` (target, precision, knobs), the `Weights` it
reads, and `GraphContext`, the frozen bundle of both with the builder and the layer index."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np
from onnx import TensorProto

from export.config import ExportError, LlamaConfig
from export.onnx_builder import GraphBuilder
from export.quant import QuantizedWeight

PRECISIONS = ("fp32", "fp16", "int4")
TARGETS = ("cpu", "cuda", "coreml")
# What each target can build: CUDA has no fp32 GroupQueryAttention kernel; the CoreML graph
# (graph_coreml.py) is float only, since MatMulNBits is a contrib op.
TARGET_PRECISIONS = {"cpu": PRECISIONS, "cuda": ("fp16", "int4"), "coreml": ("fp32", "fp16")}


class Weights(Protocol):
    def load(self, name: str) -> np.ndarray:
        """float32 tensor in HF layout ([out, in] for linears)."""

    def quantized(self, name: str) -> QuantizedWeight | None:
        """The tensor already in MatMulNBits form (GGUF blocks), or None."""


@dataclass(frozen=True)
class GraphSpec:
    target: str = "cpu"
    precision: str = "fp32"
    max_length: int = 4096  # KV buffer length and rotary cache size
    block_size: int = 32
    accuracy_level: int = 4
    down_proj_accuracy_level: int | None = 0  # None = same as accuracy_level
    lm_head_bits: int = 8  # int4 exports: lm_head as 8-bit MatMulNBits (0 = keep float)
    # --int4-symmetric: every MatMulNBits symmetric, without a zero_points input (ORT's implicit
    # 2^(bits-1); quant.quantize_blocks_symmetric), as ORT GenAI's builder writes them
    # (int4_is_symmetric). Else HF sources get affine blocks (float zero points: an integer
    # part plus a correction MatMul, linear.nbits_linear) and 8-bit layers integer ones.
    int4_symmetric: bool = False
    attention: str = "auto"  # gqa | standard | auto (gqa where ORT's kernel takes the head size)
    # The W8A8 companion graph (build_decoder with w8a8=True): int8 weights per output
    # channel, activations quantized per token, for the runs with many rows (prefill chunks,
    # batched decode) where int8 GEMMs (AMX/VNNI) beat MatMulNBits and fp32 several times.
    w8a8: bool = False
    # Per-input-channel mean |activation| of each linear (keyed by its initializer prefix, e.g.
    # ``model.layers.0.self_attn.qkv_proj``), measured on the main graph (export.calibrate):
    # the W8A8 graph smooths with it (export.linear.w8a8_linear).
    act_mean: Mapping[str, np.ndarray] | None = field(default=None, compare=False, repr=False)
    # The CUDA-graph decode graph (--target cuda): one token per sequence, attention_mask
    # spanning the KV buffer, total_sequence_length a host input fixed per session, no logits
    # slice, so that every node runs on the GPU and ONNX Runtime can capture a step.
    static_decode: bool = False
    # The attention pad (cpu GroupQueryAttention graphs, export.graph.self_attn): an
    # overridable ``attention_pad`` input (default 0) that, set to 1, gives every
    # GroupQueryAttention one more query row than the call has tokens, so that no real row
    # is computed by ORT's one-row GEMM kernel. The rotary caches get one more position.
    attention_pad: bool = False

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ExportError(f"--precision {self.precision!r}: choose one of {PRECISIONS}")
        if self.target not in TARGETS:
            raise ExportError(f"--target {self.target!r}: choose one of {TARGETS}")
        if self.precision not in TARGET_PRECISIONS[self.target]:
            raise ExportError(
                f"--precision {self.precision} is not available for --target {self.target} "
                f"(choose one of {TARGET_PRECISIONS[self.target]})")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ExportError(f"--block-size {self.block_size}: must be a power of two >= 16")
        if self.int4_symmetric and self.precision != "int4":
            raise ExportError(f"--int4-symmetric is for --precision int4, not {self.precision}")
        for flag, level in (("--accuracy-level", self.accuracy_level),
                            ("--down-proj-accuracy-level", self.down_proj_accuracy_level)):
            if level is not None and level not in (0, 1, 2, 3, 4):
                raise ExportError(f"{flag} {level}: must be 0..4")

    @property
    def io_dtype(self) -> type[np.floating]:
        """Activations, KV cache and norm weights: fp16 on CUDA (GQA has no fp32 kernel there),
        fp32 on CPU, the precision itself on CoreML."""
        if self.target == "cuda" or (self.target == "coreml" and self.precision == "fp16"):
            return np.float16
        return np.float32

    @property
    def io_type(self) -> int:
        return TensorProto.FLOAT16 if self.io_dtype == np.float16 else TensorProto.FLOAT


@dataclass(frozen=True)
class GraphContext:
    """One graph being built: the builder, the model's config and weights, the spec, and —
    inside a decoder layer — which layer (``at(i)``), so a builder's HF names follow."""

    g: GraphBuilder
    cfg: LlamaConfig
    w: Weights
    spec: GraphSpec
    layer: int | None = None

    def at(self, layer: int) -> GraphContext:
        return replace(self, layer=layer)

    @property
    def hf(self) -> str:
        """HF tensor-name prefix: ``model.layers.3`` (``model`` outside the layers)."""
        return "model" if self.layer is None else f"model.layers.{self.layer}"

    @property
    def node(self) -> str:
        """Node-name prefix: ``/model/layers.3`` (``/model`` outside the layers)."""
        return "/model" if self.layer is None else f"/model/layers.{self.layer}"
