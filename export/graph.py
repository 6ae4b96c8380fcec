"""The Llama decoder as an ONNX graph, one builder per Hugging Face module.

Node names mirror HF modules (``/model/layers.3/self_attn/o_proj/MatMul``); initializers keep
HF tensor names where one tensor maps to one initializer (packed ones say ``qkv_proj`` /
``gate_up_proj``). The target and precision are parameters of the builders, not forks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from onnx import TensorProto

from export.config import ExportError, LlamaConfig, cos_sin_cache
from export.graph_attention import (
    StandardAttentionInputs,
    attention_inputs,
    standard_attention,
)
from export.onnx_builder import GraphBuilder
from export.quant import (
    QuantizedWeight,
    dequantize_blocks,
    quantize_blocks,
    quantize_blocks_affine,
    split_zero_points,
)

PRECISIONS = ("fp32", "fp16", "int4")
TARGETS = ("cpu", "cuda", "coreml")
# What each target can build: CUDA has no fp32 GroupQueryAttention kernel; the CoreML graph
# (graph_coreml.py) is float only, since MatMulNBits is a contrib op.
TARGET_PRECISIONS = {"cpu": PRECISIONS, "cuda": ("fp16", "int4"), "coreml": ("fp32", "fp16")}
INT64_MAX = np.iinfo(np.int64).max


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
    attention: str = "auto"  # gqa | standard | auto (gqa where ORT's kernel takes the head size)
    # The W8A8 companion graph (build_decoder with w8a8=True): int8 weights per output
    # channel, activations quantized per token, for the runs with many rows (prefill chunks,
    # batched decode) where int8 GEMMs (AMX/VNNI) beat MatMulNBits and fp32 several times.
    w8a8: bool = False
    # Per-input-channel mean |activation| of each linear (keyed by its initializer prefix, e.g.
    # ``model.layers.0.self_attn.qkv_proj``), measured on the main graph (export.calibrate):
    # the W8A8 graph smooths with it (w8a8_linear).
    act_mean: Mapping[str, np.ndarray] | None = field(default=None, compare=False, repr=False)
    # The CUDA-graph decode graph (--target cuda): one token per sequence, attention_mask
    # spanning the KV buffer, total_sequence_length a host input fixed per session, no logits
    # slice, so that every node runs on the GPU and ONNX Runtime can capture a step.
    static_decode: bool = False

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


# -- linear layers ----------------------------------------------------------------------------


def _concat_quantized(parts: list[QuantizedWeight]) -> QuantizedWeight | None:
    """Stack quantized weights along N when their layouts agree (else None)."""
    first = parts[0]
    if any(p.bits != first.bits or p.block_size != first.block_size or p.k != first.k
           for p in parts):
        return None
    if len({p.zero_points.dtype for p in parts}) > 1:
        return None
    return QuantizedWeight(
        np.concatenate([p.packed for p in parts]),
        np.concatenate([p.scales for p in parts]),
        np.concatenate([p.zero_points for p in parts]),
        first.bits, first.block_size, first.k, sum(p.n for p in parts),
    )


def quantized_linear(w: Weights, names: Sequence[str], bits: int, block_size: int
                      ) -> QuantizedWeight:
    """Pre-quantized blocks when every part has them in one layout; else quantize the floats."""
    pre = [w.quantized(n) for n in names]
    if all(p is not None for p in pre) and all(p.block_size == block_size for p in pre):
        packed = _concat_quantized(pre)  # type: ignore[arg-type]
        if packed is not None and (bits == 8 or packed.bits == 4):
            return packed
    mats = [dequantize_blocks(p) if p is not None else w.load(n) for p, n in zip(pre, names, strict=True)]
    if bits == 4:
        return quantize_blocks_affine(np.concatenate(mats), block_size=block_size)
    return quantize_blocks(np.concatenate(mats), bits=bits, block_size=block_size)


def block_sums(g: GraphBuilder, x: str, k: int, block_size: int, *, node: str) -> str:
    """Sum of x over each block of ``block_size`` along the last axis: [.., K] → [.., K/bs]."""
    pad = -k % block_size
    if pad:
        x = g.op("Pad", [x, g.const(f"{node}/pads", [0, 0, 0, 0, 0, pad])], name=f"{node}/Pad")
    n_blocks = (k + pad) // block_size
    r = g.op("Reshape", [x, g.const(f"{node}/shape", [0, 0, n_blocks, block_size])],
             name=f"{node}/Reshape")
    return g.op("ReduceSum", [r, g.const(f"{node}/axes", [-1])], name=f"{node}/ReduceSum",
                keepdims=0)


SMOOTH_ALPHA = 0.6  # SmoothQuant's migration strength (its paper: 0.5; here see smoothing_scales)


def smoothing_scales(act_mean: np.ndarray, wt: np.ndarray, alpha: float = SMOOTH_ALPHA
                     ) -> np.ndarray:
    """SmoothQuant (Xiao et al. 2023) per input channel k: s_k = a_k^α / w_k^(1-α), with
    w_k = max_n |wt[k, n]| and a_k the calibrated size of x_k — its mean |x_k| rather than
    SmoothQuant's max, which measured better and steadier across calibration texts (KL to
    fp32, default model, torch simulation: 0.0098 vs 0.0119; 0.0208 unsmoothed). x/s has no
    outlier channels left for a per-token scale to be ruined by; wt·s absorbs them, quantized
    per output channel. Channels silent in calibration are floored at 1% of the mean.

    α: the exported W8A8 graph's KL to fp32 over 2048 tokens was 0.0066 / 0.0053 / 0.0055 /
    0.0087 at α 0.4 / 0.5 / 0.6 / 0.75 (int4 graph 0.0030, unsmoothed 0.0235). 0.6 over 0.5
    is a tie-break between equals: 0.5 flipped "What is the capital of France?" (a 0.08-logit
    near-tie in fp32) to a first token that derails the answer; 0.6 flips the Italy one,
    into an English answer. Both: 39/40 first answer tokens as fp32's, as int4."""
    a = np.maximum(act_mean.astype(np.float64), 0.01 * float(act_mean.mean()) + 1e-12)
    w = np.maximum(np.abs(wt).max(axis=1).astype(np.float64), 1e-8)
    return (a**alpha / w ** (1.0 - alpha)).astype(np.float32)


def w8a8_linear(g: GraphBuilder, x: str, wt: np.ndarray, *, node: str, init: str,
                act_mean: np.ndarray | None = None) -> str:
    """y ≈ x @ wt ([K, N] float32) with int8 weights (per output channel) and int8 activations
    (per token, symmetric), accumulated exactly in int32:

      x ─► · 1/s ─► |·| ─► ReduceMax(row) = m ─► ÷ m ─► QuantizeLinear(1/127, zp 128) ─► u8 ─┐
      wt ─► s·wt ─► round(/ c_n) int8 (c_n = max_k |s_k wt[k, n]| / 127) ─────────────────────┴► MatMulIntegerToFloat ─► · m ─► y
    s: smoothing_scales from the calibrated ``act_mean`` (none without it). Each row is
    quantized on its own, so a row's result does not depend on the other rows of the batch
    (unlike DynamicQuantizeMatMul's one scale for the whole tensor).
    """
    n = f"{node}/w8a8"
    if act_mean is not None:
        s = smoothing_scales(act_mean, wt)
        wt = wt * s[:, None]
        x = g.op("Mul", [x, g.initializer(f"{init}.smooth_inv", (1.0 / s).astype(np.float32))],
                 name=f"{n}/Smooth")
    c = np.abs(wt).max(axis=0) / 127.0
    c[c == 0] = 1.0
    wq = np.clip(np.rint(wt / c), -127, 127).astype(np.int8)
    m = g.op("ReduceMax", [g.op("Abs", [x], name=f"{n}/Abs"), g.const(f"{n}/axes", [-1])],
             name=f"{n}/ReduceMax", keepdims=1)
    m = g.op("Max", [m, g.const(f"{n}/tiny", 1e-30, np.float32)], name=f"{n}/Max")
    xn = g.op("Div", [x, m], name=f"{n}/Div")
    xq = g.op("QuantizeLinear", [xn, g.const(f"{n}/a_scale", 1.0 / 127.0, np.float32),
                                 g.const(f"{n}/a_zero_point", 128, np.uint8)],
              name=f"{n}/QuantizeLinear")
    y = g.op("MatMulIntegerToFloat",
             [xq, g.initializer(f"{init}.weight_int8", wq),
              g.const(f"{n}/a_scale_mm", 1.0 / 127.0, np.float32),
              g.initializer(f"{init}.weight_scale", c.astype(np.float32)),
              g.const(f"{n}/a_zero_point_mm", 128, np.uint8)],
             name=f"{n}/MatMulIntegerToFloat", domain="com.microsoft")
    return g.op("Mul", [y, m], name=f"{n}/Mul")


def linear(g: GraphBuilder, x: str, w: Weights, names: Sequence[str], *, node: str, init: str,
           spec: GraphSpec, bits: int | None = None, bias: Sequence[str] = (),
           accuracy_level: int | None = None, w8a8: bool = True) -> str:
    """y = x @ concat(W_names).T (+ bias): MatMul on float weights, MatMulNBits, or (W8A8
    graph, ``w8a8`` layers) w8a8_linear on the same weights as the main graph's.

    ``bits`` None follows the precision (int4 → 4); 0 forces a float MatMul.
    """
    if bits is None:
        bits = 4 if spec.precision == "int4" else 0
    g.linear_inputs[init] = x  # what export.calibrate measures
    if spec.w8a8 and w8a8:
        if bits == 4:  # the int4 values the main graph multiplies by (GGUF blocks: the model)
            wt = dequantize_blocks(quantized_linear(w, names, 4, spec.block_size)).T
        else:
            wt = np.concatenate([w.load(n) for n in names]).T
        y = w8a8_linear(g, x, wt, node=node, init=init,
                        act_mean=spec.act_mean.get(init) if spec.act_mean else None)
    elif bits:
        qw = quantized_linear(w, names, bits, spec.block_size)
        corr = None
        if qw.zero_points.dtype != np.uint8:
            qw, corr = split_zero_points(qw)
        inputs = [
            x,
            g.initializer(f"{init}.qweight", qw.packed),
            g.initializer(f"{init}.scales", qw.scales.reshape(-1).astype(spec.io_dtype)),
            g.initializer(f"{init}.qzeros", qw.zero_points.reshape(-1)),
        ]
        y = g.op("MatMulNBits", inputs, name=f"{node}/MatMulNBits", domain="com.microsoft",
                 K=qw.k, N=qw.n, bits=qw.bits, block_size=qw.block_size,
                 accuracy_level=accuracy_level if accuracy_level is not None
                 else spec.accuracy_level)
        if corr is not None:
            # exact float zero points: y -= blocksum(x) @ corr (see quant.split_zero_points)
            sums = block_sums(g, x, qw.k, qw.block_size, node=f"{node}/zero_point_correction")
            c = g.op("MatMul", [sums, g.initializer(f"{init}.zp_correction",
                                                    corr.astype(spec.io_dtype))],
                     name=f"{node}/zero_point_correction/MatMul")
            y = g.op("Sub", [y, c], name=f"{node}/zero_point_correction/Sub")
    else:
        wt = np.concatenate([w.load(n) for n in names]).T
        if spec.precision == "fp16" and spec.io_dtype == np.float32:
            # CPU fp16: weights stored in half precision, widened once at session load.
            wh = g.initializer(f"{init}.weight", wt.astype(np.float16))
            wf = g.op("Cast", [wh], name=f"{node}/Cast", to=TensorProto.FLOAT)
        else:
            wf = g.initializer(f"{init}.weight", wt.astype(spec.io_dtype))
        y = g.op("MatMul", [x, wf], name=f"{node}/MatMul")
    if bias:
        b = np.concatenate([w.load(n) for n in bias]).astype(spec.io_dtype)
        y = g.op("Add", [y, g.initializer(f"{init}.bias", b)], name=f"{node}/Add")
    return y


# -- one builder per HF module ----------------------------------------------------------------


def embed_tokens(g: GraphBuilder, input_ids: str, w: Weights, spec: GraphSpec) -> str:
    table = w.load("model.embed_tokens.weight")
    dtype = np.float16 if spec.precision == "fp16" or spec.io_dtype == np.float16 else np.float32
    t = g.initializer("model.embed_tokens.weight", table.astype(dtype))
    x = g.op("Gather", [t, input_ids], name="/model/embed_tokens/Gather")
    if dtype != spec.io_dtype:
        x = g.op("Cast", [x], name="/model/embed_tokens/Cast", to=spec.io_type)
    return x


def rms_norm(g: GraphBuilder, x: str, weight: str, cfg: LlamaConfig, *, node: str,
             w: Weights, spec: GraphSpec) -> str:
    """SimplifiedLayerNormalization accumulates in fp32 (stash_type 1) for fp16 inputs too."""
    gamma = g.initializer(weight, w.load(weight).astype(spec.io_dtype))
    return g.op("SimplifiedLayerNormalization", [x, gamma], name=f"{node}/SimplifiedLayerNorm",
                axis=-1, epsilon=cfg.rms_norm_eps, stash_type=1)


def skip_rms_norm(g: GraphBuilder, x: str, skip: str, weight: str, cfg: LlamaConfig, *,
                  node: str, w: Weights, spec: GraphSpec) -> tuple[str, str]:
    """
        x ──┐
            Add ──► residual (x + skip) ──► RMSNorm(γ) ──► normed
     skip ──┘
    Returns (normed, residual). The CUDA kernel computes the fp16 case in fp32 internally.
    """
    gamma = g.initializer(weight, w.load(weight).astype(spec.io_dtype))
    out = g.node("SkipSimplifiedLayerNormalization", [x, skip, gamma],
                 [f"{node}/output_0", "", "", f"{node}/output_3"],
                 name=f"{node}/SkipLayerNorm", domain="com.microsoft", epsilon=cfg.rms_norm_eps)
    return out[0], out[3]


@dataclass(frozen=True)
class AttentionInputs:
    """Per-step tensors every layer's attention shares."""

    seqlens_k: str  # int32 [batch]: index of each sequence's last token
    total_seq_len: str  # int32 scalar: attention_mask width
    cos_cache: str
    sin_cache: str


def uses_gqa(cfg: LlamaConfig, spec: GraphSpec) -> bool:
    """GroupQueryAttention (shared KV buffers) unless asked otherwise or the head size is one
    ORT's CPU kernel rejects (not a multiple of 16): then standard ops with a growing cache."""
    if spec.attention == "auto":
        return cfg.head_dim % 16 == 0
    return spec.attention == "gqa"


def self_attn(g: GraphBuilder, h: str, layer: int, cfg: LlamaConfig, w: Weights,
              spec: GraphSpec, att: AttentionInputs | StandardAttentionInputs
              ) -> tuple[str, str, str]:
    """
      h ─► qkv_proj (packed q|k|v) ─► GroupQueryAttention ─► o_proj ─► out
                       past k/v ──────────┘    └──► present k/v (same buffers)
    Rotary is applied inside GroupQueryAttention from the cos/sin caches.
    Returns (out, present_key, present_value).
    """
    p = f"model.layers.{layer}.self_attn"
    n = f"/model/layers.{layer}/self_attn"
    qkv = linear(g, h, w, [f"{p}.q_proj.weight", f"{p}.k_proj.weight", f"{p}.v_proj.weight"],
                 node=f"{n}/qkv_proj", init=f"{p}.qkv_proj", spec=spec,
                 bias=[f"{p}.q_proj.bias", f"{p}.k_proj.bias", f"{p}.v_proj.bias"]
                 if cfg.attention_bias else ())
    if isinstance(att, StandardAttentionInputs):
        outs = standard_attention(g, qkv, layer, cfg, att)
        out = linear(g, outs[0], w, [f"{p}.o_proj.weight"], node=f"{n}/o_proj",
                     init=f"{p}.o_proj", spec=spec)
        return out, outs[1], outs[2]
    past_k, past_v = f"past_key_values.{layer}.key", f"past_key_values.{layer}.value"
    outs = g.node(
        "GroupQueryAttention",
        [qkv, "", "", past_k, past_v, att.seqlens_k, att.total_seq_len, att.cos_cache,
         att.sin_cache],
        [f"{n}/attn/output_0", f"present.{layer}.key", f"present.{layer}.value"],
        name=f"{n}/GroupQueryAttention", domain="com.microsoft",
        num_heads=cfg.num_attention_heads, kv_num_heads=cfg.num_key_value_heads,
        scale=float(cfg.head_dim**-0.5), do_rotary=1, rotary_interleaved=0,
        local_window_size=cfg.sliding_window or -1,
    )
    out = linear(g, outs[0], w, [f"{p}.o_proj.weight"], node=f"{n}/o_proj",
                 init=f"{p}.o_proj", spec=spec)
    return out, outs[1], outs[2]


def mlp(g: GraphBuilder, h: str, layer: int, cfg: LlamaConfig, w: Weights,
        spec: GraphSpec) -> str:
    """
      h ─► gate_up_proj ─► Split ─┬─ gate ─► SiLU ─┐
                                  └─ up ──────────Mul ─► down_proj ─► out
    """
    p = f"model.layers.{layer}.mlp"
    n = f"/model/layers.{layer}/mlp"
    gu = linear(g, h, w, [f"{p}.gate_proj.weight", f"{p}.up_proj.weight"],
                node=f"{n}/gate_up_proj", init=f"{p}.gate_up_proj", spec=spec)
    i = cfg.intermediate_size
    gate, up = g.node("Split", [gu, g.const(f"{n}/split_sizes", [i, i])], 2, name=f"{n}/Split",
                      axis=-1)
    sig = g.op("Sigmoid", [gate], name=f"{n}/act_fn/Sigmoid")
    act = g.op("Mul", [gate, sig], name=f"{n}/act_fn/Mul")
    prod = g.op("Mul", [act, up], name=f"{n}/Mul")
    # down_proj's input (SiLU(gate) * up) carries the activation outliers that int8
    # quantization (accuracy_level 4) distorts most; it gets its own accuracy level.
    # The W8A8 graph keeps it as in the main graph: it is the linear per-token int8 hurts
    # most, smoothed or not (smoothed int8 down_proj doubled the graph's KL to fp32 on the
    # default model, 0.0055 → 0.0117).
    return linear(g, prod, w, [f"{p}.down_proj.weight"], node=f"{n}/down_proj",
                  init=f"{p}.down_proj", spec=spec,
                  accuracy_level=spec.down_proj_accuracy_level, w8a8=False)


def lm_head(g: GraphBuilder, h: str, cfg: LlamaConfig, w: Weights, spec: GraphSpec,
            keep: str | None) -> str:
    """Logits for the last ``keep`` positions (0 = every position, HF's logits_to_keep);
    ``keep`` None: every position, no slice."""
    if keep is not None:
        start = g.op("Neg", [keep], name="/lm_head/Neg")
        h = g.op("Slice", [h, start, g.const("/lm_head/ends", [INT64_MAX]),
                           g.const("/lm_head/axes", [1])], name="/lm_head/Slice")
    name = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
    bits = (spec.lm_head_bits if spec.precision == "int4" else 0)
    # W8A8 graph: kept as the main graph's (per-token int8 here measured +1.4% perplexity).
    logits = linear(g, h, w, [name], node="/lm_head", init="lm_head", spec=spec, bits=bits,
                    w8a8=False)
    if spec.io_dtype != np.float32:
        # fp32 logits for the sampler: softmax/top-p in numpy need the range, not the bytes.
        logits = g.op("Cast", [logits], name="/lm_head/Cast", to=TensorProto.FLOAT)
    return logits


# -- the whole decoder ------------------------------------------------------------------------


def build_decoder(g: GraphBuilder, cfg: LlamaConfig, w: Weights, spec: GraphSpec,
                  on_layer: Callable[[int], None] = lambda i: None) -> None:
    """Inputs/outputs follow ONNX Runtime GenAI's decoder contract: shared past/present with
    GroupQueryAttention, or (standard attention) position_ids and a growing past."""
    if spec.target == "coreml":
        raise ExportError("--target coreml graphs are built by export.graph_coreml")
    gqa = uses_gqa(cfg, spec)
    if spec.target == "cuda" and not gqa:
        raise ExportError(f"--target cuda needs GroupQueryAttention, which does not take "
                          f"head_dim {cfg.head_dim} (a multiple of 16 is required)")
    if spec.static_decode and not (gqa and spec.target == "cuda"):
        raise ExportError("the CUDA-graph decode graph is built for --target cuda only")
    kv_len = "max_sequence_length" if gqa else "past_sequence_length"
    kv_shape = ["batch_size", cfg.num_key_value_heads, kv_len, cfg.head_dim]
    seq = 1 if spec.static_decode else "sequence_length"
    input_ids = g.input("input_ids", TensorProto.INT64, ["batch_size", seq])
    mask = g.input("attention_mask", TensorProto.INT64,
                   ["batch_size", kv_len if spec.static_decode else "total_sequence_length"])
    if not gqa:
        position_ids = g.input("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"])
    for i in range(cfg.num_hidden_layers):
        g.input(f"past_key_values.{i}.key", spec.io_type, kv_shape)
        g.input(f"past_key_values.{i}.value", spec.io_type, kv_shape)
    # Overridable input (an initializer default of 0 = logits for every position): the server
    # feeds 1 so a prefill chunk pays the lm_head for its last position only.
    keep = None
    if not spec.static_decode:
        keep = g.input("num_logits_to_keep", TensorProto.INT64, [1])
        g.const("num_logits_to_keep", [0])

    if not gqa:
        att = attention_inputs(g, cfg, spec.max_length, input_ids, mask, position_ids)
    else:
        att = _gqa_inputs(g, cfg, spec, mask)
    _decoder_body(g, cfg, w, spec, input_ids, keep, att, on_layer)
    present_shape = kv_shape if gqa else ["batch_size", cfg.num_key_value_heads,
                                          "total_sequence_length", cfg.head_dim]
    g.output("logits", TensorProto.FLOAT, ["batch_size", seq, cfg.vocab_size])
    for i in range(cfg.num_hidden_layers):
        g.output(f"present.{i}.key", spec.io_type, present_shape)
        g.output(f"present.{i}.value", spec.io_type, present_shape)


def _gqa_inputs(g: GraphBuilder, cfg: LlamaConfig, spec: GraphSpec, mask: str
                ) -> AttentionInputs:
    # seqlens_k = tokens per sequence - 1, total = mask width (what GQA wants as int32)
    cos, sin = cos_sin_cache(cfg, spec.max_length)
    cos = g.initializer("cos_cache", cos.astype(spec.io_dtype))
    sin = g.initializer("sin_cache", sin.astype(spec.io_dtype))
    if spec.static_decode:
        # int32 math on the GPU; the mask spans the KV buffer, whose length (the runtime's
        # max length, fixed for a session) comes in as total_sequence_length, a host scalar
        m32 = g.op("Cast", [mask], name="/model/attn_mask/Cast", to=TensorProto.INT32)
        total = g.op("ReduceSum", [m32, g.const("/model/attn_mask/axes", [1])],
                     name="/model/attn_mask/ReduceSum", keepdims=0)
        seqlens = g.op("Sub", [total, g.const("/model/attn_mask/one", 1, np.int32)],
                       name="/model/attn_mask/Sub")
        width = g.input("total_sequence_length", TensorProto.INT32, [])
        return AttentionInputs(seqlens, width, cos, sin)
    total = g.op("ReduceSum", [mask, g.const("/model/attn_mask/axes", [1])],
                 name="/model/attn_mask/ReduceSum", keepdims=0)
    last = g.op("Sub", [total, g.const("/model/attn_mask/one", 1)], name="/model/attn_mask/Sub")
    seqlens = g.op("Cast", [last], name="/model/attn_mask/seqlens_k/Cast", to=TensorProto.INT32)
    width = g.op("Shape", [mask], name="/model/attn_mask/Shape", start=1, end=2)
    width = g.op("Squeeze", [width], name="/model/attn_mask/Squeeze")
    width = g.op("Cast", [width], name="/model/attn_mask/total_seq_len/Cast", to=TensorProto.INT32)
    return AttentionInputs(seqlens, width, cos, sin)


def _decoder_body(g: GraphBuilder, cfg: LlamaConfig, w: Weights, spec: GraphSpec,
                  input_ids: str, keep: str | None, att, on_layer: Callable[[int], None]
                  ) -> None:
    x = embed_tokens(g, input_ids, w, spec)
    residual, mlp_out = x, None
    for i in range(cfg.num_hidden_layers):
        p, n = f"model.layers.{i}", f"/model/layers.{i}"
        if mlp_out is None:
            h = rms_norm(g, x, f"{p}.input_layernorm.weight", cfg, node=f"{n}/input_layernorm",
                         w=w, spec=spec)
        else:
            h, residual = skip_rms_norm(g, mlp_out, residual, f"{p}.input_layernorm.weight", cfg,
                                        node=f"{n}/input_layernorm", w=w, spec=spec)
        attn_out, _, _ = self_attn(g, h, i, cfg, w, spec, att)
        h, residual = skip_rms_norm(g, attn_out, residual, f"{p}.post_attention_layernorm.weight",
                                    cfg, node=f"{n}/post_attention_layernorm", w=w, spec=spec)
        mlp_out = mlp(g, h, i, cfg, w, spec)
        on_layer(i)
    h, _ = skip_rms_norm(g, mlp_out, residual, "model.norm.weight", cfg, node="/model/norm", w=w,
                         spec=spec)
    logits = lm_head(g, h, cfg, w, spec, keep)
    g.nodes.append(_identity(logits, "logits"))


def _identity(src: str, dst: str):
    from onnx import helper

    return helper.make_node("Identity", [src], [dst], name="/logits/Identity")
