"""The Llama decoder as an ONNX graph, one builder per Hugging Face module.

Node names mirror HF modules (``/model/layers.3/self_attn/o_proj/MatMul``); initializers keep
HF tensor names where one tensor maps to one initializer (packed ones say ``qkv_proj`` /
``gate_up_proj``). The target and precision are parameters of the builders, not forks: the
linear variants live in export/linear.py, the spec and the per-layer context in export/spec.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from onnx import TensorProto

from export.config import ExportError, LlamaConfig, cos_sin_cache
from export.graph_attention import (
    StandardAttentionInputs,
    attention_inputs,
    standard_attention,
)
from export.linear import linear
from export.onnx_builder import GraphBuilder
from export.spec import GraphContext, GraphSpec, Weights

INT64_MAX = np.iinfo(np.int64).max


# -- one builder per HF module ----------------------------------------------------------------


def embed_tokens(ctx: GraphContext, input_ids: str) -> str:
    """Rows of ``model.embed_tokens.weight`` for ``input_ids``.

    Args:
        ctx: the graph being built.
        input_ids: int64 ``[batch, seq]``.
    Returns:
        ``[batch, seq, hidden]`` in ``io_dtype`` (the table is stored fp16 for fp16 exports,
        widened by a Cast where the graph computes in fp32).
    """
    g, spec = ctx.g, ctx.spec
    table = ctx.w.load("model.embed_tokens.weight")
    dtype = np.float16 if spec.precision == "fp16" or spec.io_dtype == np.float16 else np.float32
    t = g.initializer("model.embed_tokens.weight", table.astype(dtype))
    x = g.op("Gather", [t, input_ids], name="/model/embed_tokens/Gather")
    if dtype != spec.io_dtype:
        x = g.op("Cast", [x], name="/model/embed_tokens/Cast", to=spec.io_type)
    return x


def add_rms_norm(ctx: GraphContext, x: str | None, residual: str, module: str
                 ) -> tuple[str, str]:
    """
        x ──┐
            Add ──► residual (x + residual) ──► RMSNorm(γ) ──► normed
 residual ──┘
    The residual stream's step before each norm (``module``: ``input_layernorm``,
    ``post_attention_layernorm``, or ``norm`` outside the layers, γ its HF weight). ``x``
    None (the first layer's input_layernorm): RMSNorm(residual) alone. One fused node either
    way, accumulating in fp32 for fp16 inputs too.

    Returns:
        (normed, residual) ``[batch, seq, hidden]`` in ``io_dtype``.
    """
    g, node, eps = ctx.g, f"{ctx.node}/{module}", ctx.cfg.rms_norm_eps
    weight = f"{ctx.hf}.{module}.weight"
    gamma = g.initializer(weight, ctx.w.load(weight).astype(ctx.spec.io_dtype))
    if x is None:
        normed = g.op("SimplifiedLayerNormalization", [residual, gamma],
                      name=f"{node}/SimplifiedLayerNorm", axis=-1, epsilon=eps, stash_type=1)
        return normed, residual
    out = g.node("SkipSimplifiedLayerNormalization", [x, residual, gamma],
                 [f"{node}/output_0", "", "", f"{node}/output_3"],
                 name=f"{node}/SkipLayerNorm", domain="com.microsoft", epsilon=eps)
    return out[0], out[3]


@dataclass(frozen=True)
class AttentionInputs:
    """Per-step tensors every layer's attention shares."""

    seqlens_k: str  # int32 [batch]: index of each sequence's last token
    total_seq_len: str  # int32 scalar: attention_mask width
    cos_cache: str
    sin_cache: str
    # The attention pad (`GraphSpec.attention_pad`): int64 [1] tensors S - pad and S (S =
    # the call's tokens), or None where the graph has no pad
    pad_start: str | None = None
    seq_len: str | None = None


# constants the attention pad's Slice nodes share (`_attention_pad` adds them)
_PAD_AXIS, _PAD_ZERO = "/model/attn_pad/axis", "/model/attn_pad/zero"


def uses_gqa(cfg: LlamaConfig, spec: GraphSpec) -> bool:
    """GroupQueryAttention (shared KV buffers) unless asked otherwise or the head size is one
    ORT's CPU kernel rejects (not a multiple of 16): then standard ops with a growing cache."""
    if spec.attention == "auto":
        return cfg.head_dim % 16 == 0
    return spec.attention == "gqa"


def self_attn(ctx: GraphContext, h: str, att: AttentionInputs | StandardAttentionInputs
              ) -> str:
    """
      h ─► qkv_proj (packed q|k|v) ─► GroupQueryAttention ─► o_proj ─► out
                       past k/v ──────────┘    └──► present k/v (same buffers)
    Rotary is applied inside GroupQueryAttention from the cos/sin caches; with
    `StandardAttentionInputs`, standard ops do it all (export.graph_attention).
    Writes the graph outputs ``present.{layer}.key/value``.

    Returns:
        The attention output after o_proj, ``[batch, seq, hidden]``.
    """
    g, cfg, layer = ctx.g, ctx.cfg, ctx.layer
    p, n = f"{ctx.hf}.self_attn", f"{ctx.node}/self_attn"
    qkv = linear(ctx, h, [f"{p}.q_proj.weight", f"{p}.k_proj.weight", f"{p}.v_proj.weight"],
                 node=f"{n}/qkv_proj", init=f"{p}.qkv_proj",
                 bias=[f"{p}.q_proj.bias", f"{p}.k_proj.bias", f"{p}.v_proj.bias"]
                 if cfg.attention_bias else ())
    if isinstance(att, StandardAttentionInputs):
        out = standard_attention(g, qkv, layer, cfg, att)[0]
    else:
        if att.pad_start is not None:  # attention pad: the last token's q|k|v once more
            last = g.op("Slice", [qkv, att.pad_start, att.seq_len, _PAD_AXIS],
                        name=f"{n}/pad/Slice")
            qkv = g.op("Concat", [qkv, last], name=f"{n}/pad/Concat", axis=1)
        out = g.node(
            "GroupQueryAttention",
            [qkv, "", "", f"past_key_values.{layer}.key", f"past_key_values.{layer}.value",
             att.seqlens_k, att.total_seq_len, att.cos_cache, att.sin_cache],
            [f"{n}/attn/output_0", f"present.{layer}.key", f"present.{layer}.value"],
            name=f"{n}/GroupQueryAttention", domain="com.microsoft",
            num_heads=cfg.num_attention_heads, kv_num_heads=cfg.num_key_value_heads,
            scale=float(cfg.head_dim**-0.5), do_rotary=1, rotary_interleaved=0,
            local_window_size=cfg.sliding_window or -1,
        )[0]
        if att.pad_start is not None:  # the pad row's output is dropped
            out = g.op("Slice", [out, _PAD_ZERO, att.seq_len, _PAD_AXIS], name=f"{n}/pad/Unpad")
    return linear(ctx, out, [f"{p}.o_proj.weight"], node=f"{n}/o_proj", init=f"{p}.o_proj")


def mlp(ctx: GraphContext, h: str) -> str:
    """
      h ─► gate_up_proj ─► Split ─┬─ gate ─► SiLU ─┐
                                  └─ up ──────────Mul ─► down_proj ─► out
    Standard ops only besides `linear`, so the CoreML graphs (export/graph_coreml.py) take it
    too, with gate_proj and up_proj apart: packed, they could pass CoreML's 16384 limit on a
    dimension.

    Returns:
        ``[batch, seq, hidden]`` in ``io_dtype``.
    """
    g, p, n = ctx.g, f"{ctx.hf}.mlp", f"{ctx.node}/mlp"
    if ctx.spec.target == "coreml":
        gate, up = (linear(ctx, h, [f"{p}.{t}.weight"], node=f"{n}/{t}", init=f"{p}.{t}")
                    for t in ("gate_proj", "up_proj"))
    else:
        gu = linear(ctx, h, [f"{p}.gate_proj.weight", f"{p}.up_proj.weight"],
                    node=f"{n}/gate_up_proj", init=f"{p}.gate_up_proj")
        i = ctx.cfg.intermediate_size
        gate, up = g.node("Split", [gu, g.const(f"{n}/split_sizes", [i, i])], 2,
                          name=f"{n}/Split", axis=-1)
    sig = g.op("Sigmoid", [gate], name=f"{n}/act_fn/Sigmoid")
    act = g.op("Mul", [gate, sig], name=f"{n}/act_fn/Mul")
    prod = g.op("Mul", [act, up], name=f"{n}/Mul")
    # down_proj's input (SiLU(gate) * up) carries the activation outliers that int8
    # quantization distorts most (default model: up to 3,065 in layer 11 against a median of
    # 0.06); it gets its own accuracy level. The W8A8 graph keeps it as MatMulNBits at that
    # level (per-token int8 is what hurts it most, smoothed or not: smoothed int8 down_proj
    # doubled the graph's KL to fp32, 0.0055 → 0.0117). At level 0 a one-row call runs a
    # kernel of its own, the only op of the W8A8 graph whose rows depend on their batch
    # mates (measured op by op); at level 4 (the default) the W8A8 graph is row-invariant
    # (graph.w8a8_row_invariant). Default model, KL to fp32 over 768 tokens, level 0 → 4:
    # int4 graph 0.0029 → 0.0034, W8A8 graph 0.0047 → 0.0053; perplexity 14.85 → 14.89 (fp32
    # 14.74). Greedy answers that flip (the "capital of France" with a system prompt starts
    # "L'..." instead of "The ...") sit on fp32 margins of 0.08-0.1 logit.
    level = ctx.spec.down_proj_accuracy_level
    return linear(ctx, prod, [f"{p}.down_proj.weight"], node=f"{n}/down_proj",
                  init=f"{p}.down_proj", accuracy_level=level, w8a8=False)


def lm_head(ctx: GraphContext, h: str, keep: str | None) -> str:
    """Logits for the last ``keep`` positions (0 = every position, HF's logits_to_keep);
    ``keep`` None: every position, no slice.

    Returns:
        float32 ``[batch, seq or keep, vocab]``.
    """
    g, cfg, spec = ctx.g, ctx.cfg, ctx.spec
    if keep is not None:
        start = g.op("Neg", [keep], name="/lm_head/Neg")
        h = g.op("Slice", [h, start, g.const("/lm_head/ends", [INT64_MAX]),
                           g.const("/lm_head/axes", [1])], name="/lm_head/Slice")
    name = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
    bits = (spec.lm_head_bits if spec.precision == "int4" else 0)
    # W8A8 graph: kept as the main graph's (per-token int8 here measured +1.4% perplexity).
    logits = linear(ctx, h, [name], node="/lm_head", init="lm_head", bits=bits, w8a8=False)
    if spec.io_dtype != np.float32:
        # fp32 logits for the sampler: softmax/top-p in numpy need the range, not the bytes.
        logits = g.op("Cast", [logits], name="/lm_head/Cast", to=TensorProto.FLOAT)
    return logits


def model(ctx: GraphContext, input_ids: str, keep: str | None, att,
          on_layer: Callable[[int], None]) -> str:
    """embed_tokens → layers (input_layernorm, self_attn, post_attention_layernorm, mlp, each
    added to the residual stream) → norm → lm_head. Returns the logits."""
    residual, x = embed_tokens(ctx, input_ids), None
    for i in range(ctx.cfg.num_hidden_layers):
        layer = ctx.at(i)
        h, residual = add_rms_norm(layer, x, residual, "input_layernorm")
        h, residual = add_rms_norm(layer, self_attn(layer, h, att), residual,
                                   "post_attention_layernorm")
        x = mlp(layer, h)
        on_layer(i)
    h, _ = add_rms_norm(ctx, x, residual, "norm")
    return lm_head(ctx, h, keep)


# -- the whole decoder ------------------------------------------------------------------------


def build_decoder(g: GraphBuilder, cfg: LlamaConfig, w: Weights, spec: GraphSpec,
                  on_layer: Callable[[int], None] = lambda i: None) -> None:
    """The decoder graph into ``g``: inputs and outputs follow ONNX Runtime GenAI's decoder
    contract (docs/architecture.md): shared past/present with GroupQueryAttention, or
    (standard attention) position_ids and a growing past.

    Args:
        g: the builder (its data file receives the weights).
        cfg, w: the model's config and weights.
        spec: target, precision and graph variant (W8A8, static CUDA decode).
        on_layer: called with each layer's index once it is built (progress).
    Raises:
        ExportError: the spec asks for what this model cannot have (a CoreML spec, CUDA or the
            static decode graph without GroupQueryAttention).
    """
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
        att = _gqa_inputs(g, cfg, spec, mask, input_ids)
    logits = model(GraphContext(g, cfg, w, spec), input_ids, keep, att, on_layer)
    g.node("Identity", [logits], ["logits"], name="/logits/Identity")
    present_shape = kv_shape if gqa else ["batch_size", cfg.num_key_value_heads,
                                          "total_sequence_length", cfg.head_dim]
    g.output("logits", TensorProto.FLOAT, ["batch_size", seq, cfg.vocab_size])
    for i in range(cfg.num_hidden_layers):
        g.output(f"present.{i}.key", spec.io_type, present_shape)
        g.output(f"present.{i}.value", spec.io_type, present_shape)


def _gqa_inputs(g: GraphBuilder, cfg: LlamaConfig, spec: GraphSpec, mask: str,
                input_ids: str) -> AttentionInputs:
    # seqlens_k = tokens per sequence - 1, total = mask width (what GQA wants as int32)
    pad = spec.attention_pad and not spec.static_decode
    # the pad row sits one position past the call's last token: the caches cover it
    cos, sin = cos_sin_cache(cfg, spec.max_length + pad)
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
    if not pad:
        return AttentionInputs(seqlens, width, cos, sin)
    return _attention_pad(g, input_ids, AttentionInputs(seqlens, width, cos, sin))


def _attention_pad(g: GraphBuilder, input_ids: str, att: AttentionInputs) -> AttentionInputs:
    """The attention pad's shared tensors (`GraphSpec.attention_pad`)::

      attention_pad [1] (overridable, default 0) ─► seqlens_k + pad, total + pad
      S = Shape(input_ids)[1] ─► S - pad: where each layer's copy of the last row starts

    With pad 1 each GroupQueryAttention gets S + 1 query rows (the last token's q|k|v twice;
    `self_attn` slices the extra output row off) and writes one more K/V position, at the
    call's total length, which the next call overwrites before anything reads it (causal).
    ORT's CPU kernel multiplies each (sequence, head)'s probs by V with a one-row GEMM kernel
    of its own when the call has one query row (MLAS's M == 1 path, no FMA) and with the
    general one otherwise (whose per-row result does not depend on the row count): with the
    pad a one-token decode step, a verify call and every prefill chunk compute a position the
    same, bit for bit. ORT refuses S > 1 rows with past context for 2+ sequences, so a decode
    step of several sequences cannot take it (the runtime runs those one call each, or
    unpadded). Pad 0 runs the graph as without it.
    """
    m = "/model/attn_pad"
    g.const(_PAD_AXIS, [1])
    g.const(_PAD_ZERO, [0])
    pad = g.input("attention_pad", TensorProto.INT64, [1])
    g.const("attention_pad", [0])
    pad32 = g.op("Cast", [pad], name=f"{m}/Cast", to=TensorProto.INT32)  # [1]
    seqlens = g.op("Add", [att.seqlens_k, pad32], name=f"{m}/seqlens_k/Add")
    total = g.op("Add", [att.total_seq_len, g.op("Squeeze", [pad32], name=f"{m}/Squeeze")],
                 name=f"{m}/total_seq_len/Add")
    seq = g.op("Shape", [input_ids], name=f"{m}/seq/Shape", start=1, end=2)
    start = g.op("Sub", [seq, pad], name=f"{m}/start/Sub")
    return AttentionInputs(seqlens, total, att.cos_cache, att.sin_cache, start, seq)
