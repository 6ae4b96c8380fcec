"""The CoreML target: static-shape decoder graphs from standard ONNX ops only.

CoreML's ML Program compiler needs every shape known ahead, takes no ONNX Runtime contrib ops
(no GroupQueryAttention, MatMulNBits, SkipSimplifiedLayerNormalization) and rejects any tensor
dimension above 16384. So the export holds two graphs with the same weights:

    decode.onnx    S = 1           one token per call
    prefill.onnx   S = chunk (64)  a prompt chunk, right-padded by the host

and the host (``serve/runtime/static.py``) keeps the KV cache:

    inputs   inputs_embeds  io [1, S, hidden]   rows of embed_tokens.npy (vocab > 16384), or
             input_ids      int64 [1, S]        (vocab ≤ 16384: the table stays in the graph)
             position_ids   int64 [1, S]        picks the rotary rows from cos/sin tables
             attention_mask io [1, 1, S, L + S] additive: 0 attends, MASK_VALUE does not;
                                                 columns 0..L-1 are the cache, L.. the chunk
             past_key_values.{i}.key/value  io [1, kv_heads, L, head_dim]
             logits_index   int64 [1, 1]        prefill only: the chunk row whose logits return
    outputs  logits (fp32) [1, 1, vocab], or logits.{j}: column blocks of ≤ 16384
             present.{i}.key/value  io [1, kv_heads, S, head_dim]: the chunk's K (rotated) and V,
                                    which the host writes into its cache after the call

Every op is in ``COREML_MLPROGRAM_OPS`` (docs/coreml_ops.md has the list and its source).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from export.config import ExportError, LlamaConfig, cos_sin_cache
from export.graph import mlp
from export.graph_attention import rotary, split_heads
from export.linear import linear
from export.onnx_builder import GraphBuilder
from export.spec import GraphContext, GraphSpec, Weights

OPSET = 17  # ≤ 20, which the CoreML EP takes; ReduceMean keeps `axes` as an attribute here
MAX_DIM = 16384  # CoreML fails to load a model with any larger input dimension
DEFAULT_CHUNK = 64
DEFAULT_MAX_LENGTH = 2048  # every step attends over the whole buffer: keep it modest
MASK_VALUE = -30000.0  # finite in fp16, so a fully masked padding row cannot turn into NaN
INLINE_LIMIT = 2 * 10**9  # protobuf's 2 GB: below it the weights live inside each .onnx
EMBED_FILE = "embed_tokens.npy"

# ONNX Runtime's CoreML EP, ML Program format: the ops it converts (onnxruntime 1.32.0,
# onnxruntime/tools/mobile_helpers/coreml_supported_mlprogram_ops.md; see docs/coreml_ops.md).
COREML_MLPROGRAM_OPS = frozenset({
    "Add", "And", "ArgMax", "AveragePool", "Cast", "Clip", "Concat", "Conv", "ConvTranspose",
    "Cos", "DepthToSpace", "Ceil", "Div", "Elu", "Erf", "Exp", "GatherND", "Gemm", "Gelu",
    "GlobalAveragePool", "GlobalMaxPool", "GridSample", "GroupNormalization", "HardSigmoid",
    "Identity", "InstanceNormalization", "LayerNormalization", "LeakyRelu", "MatMul", "MaxPool",
    "Max", "Mul", "Pow", "PRelu", "Reciprocal", "ReduceSum", "ReduceMean", "ReduceMax", "Relu",
    "Reshape", "Resize", "Round", "Shape", "Sin", "Slice", "Softplus", "Split", "Sub", "Sigmoid",
    "Softmax", "Sqrt", "Squeeze", "Tanh", "Tile", "Transpose", "Unsqueeze", "Where",
})


@dataclass(frozen=True)
class StaticGraphs:
    """What the host needs to drive the two graphs (written to llorch.json)."""

    decode: str
    prefill: str
    chunk: int
    max_length: int
    host_embedding: bool
    logits_parts: tuple[int, ...]  # column counts of logits.{j}; one part is named `logits`
    io_dtype: str  # float32 | float16
    inline: bool

    def manifest(self) -> dict:
        return {
            "variant": "static-kv-host",
            "decode": self.decode,
            "prefill": self.prefill,
            "chunk": self.chunk,
            "host_embedding": self.host_embedding,
            "embed_file": EMBED_FILE if self.host_embedding else None,
            "logits_parts": list(self.logits_parts),
            "mask_value": MASK_VALUE,
            "io_dtype": self.io_dtype,
            "kv_dtype": self.io_dtype,
            "inline_weights": self.inline,
            "opset": OPSET,
        }


def check_static_limits(cfg: LlamaConfig, max_length: int, chunk: int) -> None:
    """Refuse what CoreML cannot load: any dimension above 16384 (the vocabulary is split)."""
    if chunk < 2 or chunk > 1024:
        raise ExportError(f"prefill chunk {chunk}: must be between 2 and 1024")
    if max_length + chunk > MAX_DIM:
        raise ExportError(
            f"--max-length {max_length}: the CoreML graph attends over max_length + chunk "
            f"({max_length + chunk}) columns, above CoreML's limit of {MAX_DIM}; use "
            f"--max-length {MAX_DIM - chunk} or less")
    for field in ("hidden_size", "intermediate_size", "q_size", "kv_size"):
        if getattr(cfg, field) > MAX_DIM:
            raise ExportError(f"{field} {getattr(cfg, field)} exceeds CoreML's dimension limit "
                              f"of {MAX_DIM}; this model cannot be exported for --target coreml")


def logits_parts(vocab: int) -> tuple[int, ...]:
    n = -(-vocab // MAX_DIM)
    return tuple(min(MAX_DIM, vocab - j * MAX_DIM) for j in range(n))


# -- builders, one per HF module (the MLP is graph.py's; rotary and head reshapes are shared
# -- with graph_attention.py) --------------------------------------------------------------


def rms_norm(ctx: GraphContext, x: str, module: str) -> str:
    """
      x ─► [Cast fp32] ─► Mul(x, x) ─► ReduceMean ─► Add(eps) ─► Sqrt ─┐
          └──────────────────────────────────────────────────────► Div ─► [Cast] ─► Mul(γ)
    fp16 graphs normalise in fp32, as HF's LlamaRMSNorm does: x² overflows fp16 past |x| 256.
    Standard ops, since CoreML takes no SimplifiedLayerNormalization.
    """
    g, spec, node = ctx.g, ctx.spec, f"{ctx.node}/{module}"
    h = x
    if spec.io_dtype == np.float16:
        h = g.op("Cast", [x], name=f"{node}/Cast", to=TensorProto.FLOAT)
    sq = g.op("Mul", [h, h], name=f"{node}/Mul")
    ms = g.op("ReduceMean", [sq], name=f"{node}/ReduceMean", axes=[-1], keepdims=1)
    ms = g.op("Add", [ms, g.const(f"{node}/eps", ctx.cfg.rms_norm_eps, np.float32)],
              name=f"{node}/Add")
    y = g.op("Div", [h, g.op("Sqrt", [ms], name=f"{node}/Sqrt")], name=f"{node}/Div")
    if spec.io_dtype == np.float16:
        y = g.op("Cast", [y], name=f"{node}/Cast_1", to=TensorProto.FLOAT16)
    weight = f"{ctx.hf}.{module}.weight"
    gamma = g.initializer(weight, ctx.w.load(weight).astype(spec.io_dtype))
    return g.op("Mul", [y, gamma], name=f"{node}/Mul_1")


@dataclass(frozen=True)
class StepInputs:
    """Tensors every layer shares within one call."""

    cos: str  # [1, 1, S, head_dim]
    sin: str  # [1, 1, S, head_dim], first half negated (rotary's signed_sin)
    mask: str  # [1, 1, rep * S, L + S]: the additive mask tiled over a kv head's query heads
    seq: int


def step_inputs(g: GraphBuilder, cfg: LlamaConfig, spec: GraphSpec, seq: int) -> StepInputs:
    """
      position_ids ─► Unsqueeze ─► GatherND(cos table) ─► Unsqueeze(1)   (and the sin table)
      attention_mask ─► Tile(1, 1, rep, 1)
    """
    n = "/model/rotary"
    pos = g.input("position_ids", TensorProto.INT64, [1, seq])
    idx = g.op("Unsqueeze", [pos, g.const(f"{n}/index_axes", [-1])], name=f"{n}/Unsqueeze")
    cos, sin = cos_sin_cache(cfg, spec.max_length)
    # rotate_half(x) * sin == [x2, x1] * [-sin, sin]: the sign lives in the table (no Neg op)
    tables = {"cos": np.concatenate([cos, cos], -1), "sin": np.concatenate([-sin, sin], -1)}
    rows = {}
    for key, table in tables.items():
        t = g.op("GatherND", [g.initializer(f"{key}_table", table.astype(spec.io_dtype)), idx],
                 name=f"{n}/{key}/GatherND")  # [1, S, head_dim]
        rows[key] = g.op("Unsqueeze", [t, g.const(f"{n}/{key}/axes", [1])],
                         name=f"{n}/{key}/Unsqueeze")
    total = spec.max_length + seq
    mask = g.input("attention_mask", spec.io_type, [1, 1, seq, total])
    rep = cfg.num_attention_heads // cfg.num_key_value_heads
    if rep > 1:
        mask = g.op("Tile", [mask, g.const("/model/attn_mask/repeats", [1, 1, rep, 1])],
                    name="/model/attn_mask/Tile")
    return StepInputs(rows["cos"], rows["sin"], mask, seq)


def self_attn(ctx: GraphContext, h: str, att: StepInputs) -> str:
    """
      h ─► q_proj ─► heads ─► rotary ─► ×scale ─► [1, kv, rep·S, hd] ─┐
      h ─► k_proj ─► heads ─► rotary ─► present.k ─► Concat(past_k) ─► Kᵀ ─► MatMul ─► + mask
      h ─► v_proj ─► heads ─────────► present.v ─► Concat(past_v) ─┐        Softmax ◄─┘
                                                                   └─ MatMul ◄─┘ ─► o_proj
    Query heads are grouped under their kv head by a reshape (head h = g·rep + r uses kv head
    g), so K/V are never repeated and every tensor stays rank 4. q, k and v stay separate
    projections: a packed one could pass CoreML's 16384 dimension limit.
    """
    g, cfg, layer = ctx.g, ctx.cfg, ctx.layer
    p, n = f"{ctx.hf}.self_attn", f"{ctx.node}/self_attn"
    nh, kvh, hd, s = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, att.seq
    rep = nh // kvh

    def proj(t: str) -> str:
        return linear(ctx, h, [f"{p}.{t}_proj.weight"], node=f"{n}/{t}_proj",
                      init=f"{p}.{t}_proj",
                      bias=[f"{p}.{t}_proj.bias"] if cfg.attention_bias else ())

    def heads(x: str, count: int, tag: str) -> str:
        return split_heads(g, x, [1, s, count, hd], node=f"{n}/{tag}")

    q = rotary(g, heads(proj("q"), nh, "q"), att.cos, att.sin, hd, node=f"{n}/q_rotary",
               signed_sin=True)
    q = g.op("Mul", [q, g.const(f"{n}/scale", hd**-0.5, ctx.spec.io_dtype)],
             name=f"{n}/q/Mul")
    q = g.op("Reshape", [q, g.const(f"{n}/q/group_shape", [1, kvh, rep * s, hd])],
             name=f"{n}/q/Reshape_1")
    k = rotary(g, heads(proj("k"), kvh, "k"), att.cos, att.sin, hd, node=f"{n}/k_rotary",
               signed_sin=True)
    g.node("Identity", [k], [f"present.{layer}.key"], name=f"{n}/present_key/Identity")
    v = heads(proj("v"), kvh, "v")
    g.node("Identity", [v], [f"present.{layer}.value"], name=f"{n}/present_value/Identity")
    keys = g.op("Concat", [f"past_key_values.{layer}.key", k], name=f"{n}/k/Concat", axis=2)
    values = g.op("Concat", [f"past_key_values.{layer}.value", v], name=f"{n}/v/Concat", axis=2)
    kt = g.op("Transpose", [keys], name=f"{n}/k/Transpose_1", perm=[0, 1, 3, 2])
    scores = g.op("MatMul", [q, kt], name=f"{n}/scores/MatMul")  # [1, kv, rep·S, L + S]
    scores = g.op("Add", [scores, att.mask], name=f"{n}/scores/Add")
    probs = g.op("Softmax", [scores], name=f"{n}/Softmax", axis=-1)
    out = g.op("MatMul", [probs, values], name=f"{n}/out/MatMul")  # [1, kv, rep·S, hd]
    out = g.op("Reshape", [out, g.const(f"{n}/out/heads_shape", [1, nh, s, hd])],
               name=f"{n}/out/Reshape")
    out = g.op("Transpose", [out], name=f"{n}/out/Transpose", perm=[0, 2, 1, 3])
    out = g.op("Reshape", [out, g.const(f"{n}/out/shape", [1, s, nh * hd])],
               name=f"{n}/out/Reshape_1")
    return linear(ctx, out, [f"{p}.o_proj.weight"], node=f"{n}/o_proj", init=f"{p}.o_proj")


def embed_tokens(ctx: GraphContext, seq: int, host: bool) -> str:
    """[1, S, hidden]: an input (the host gathers rows) or a GatherND over the table."""
    g, spec = ctx.g, ctx.spec
    if host:
        return g.input("inputs_embeds", spec.io_type, [1, seq, ctx.cfg.hidden_size])
    ids = g.input("input_ids", TensorProto.INT64, [1, seq])
    n = "/model/embed_tokens"
    idx = g.op("Unsqueeze", [ids, g.const(f"{n}/axes", [-1])], name=f"{n}/Unsqueeze")
    table = ctx.w.load("model.embed_tokens.weight").astype(spec.io_dtype)
    return g.op("GatherND", [g.initializer("model.embed_tokens.weight", table), idx],
                name=f"{n}/GatherND")


def lm_head(ctx: GraphContext, h: str, seq: int) -> list[str]:
    """Logits of one row ([1, 1, vocab] in blocks of ≤ 16384 columns), cast to fp32."""
    g, cfg, spec = ctx.g, ctx.cfg, ctx.spec
    if seq > 1:  # prefill: only the row the host asks for (its last real token)
        index = g.input("logits_index", TensorProto.INT64, [1, 1])
        rows = g.op("Reshape", [h, g.const("/lm_head/rows_shape", [seq, cfg.hidden_size])],
                    name="/lm_head/Reshape")
        h = g.op("GatherND", [rows, index], name="/lm_head/GatherND")  # [1, hidden]
        h = g.op("Reshape", [h, g.const("/lm_head/row_shape", [1, 1, cfg.hidden_size])],
                 name="/lm_head/Reshape_1")
    name = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
    table = ctx.w.load(name)
    parts = logits_parts(cfg.vocab_size)
    outs, start = [], 0
    for j, cols in enumerate(parts):
        out = "logits" if len(parts) == 1 else f"logits.{j}"
        node = "/lm_head" if len(parts) == 1 else f"/lm_head/part_{j}"
        wt = table[start:start + cols].T.astype(spec.io_dtype)
        y = g.op("MatMul", [h, g.initializer(f"lm_head.weight.{j}", wt)], name=f"{node}/MatMul")
        g.node("Cast", [y], [out], name=f"{node}/Cast", to=TensorProto.FLOAT)
        g.output(out, TensorProto.FLOAT, [1, 1, cols])
        outs.append(out)
        start += cols
    return outs


def build_static_decoder(g: GraphBuilder, cfg: LlamaConfig, w: Weights, spec: GraphSpec, *,
                         seq: int, host_embedding: bool,
                         on_layer: Callable[[int], None] = lambda i: None) -> None:
    """One static graph (S = ``seq``): decode with seq 1, prefill with the chunk size."""
    ctx = GraphContext(g, cfg, w, spec)
    kv_shape = [1, cfg.num_key_value_heads, spec.max_length, cfg.head_dim]
    new_shape = [1, cfg.num_key_value_heads, seq, cfg.head_dim]
    x = embed_tokens(ctx, seq, host_embedding)
    att = step_inputs(g, cfg, spec, seq)
    for i in range(cfg.num_hidden_layers):
        g.input(f"past_key_values.{i}.key", spec.io_type, kv_shape)
        g.input(f"past_key_values.{i}.value", spec.io_type, kv_shape)
    for i in range(cfg.num_hidden_layers):
        layer = ctx.at(i)
        h = rms_norm(layer, x, "input_layernorm")
        x = g.op("Add", [x, self_attn(layer, h, att)], name=f"{layer.node}/residual/Add")
        h = rms_norm(layer, x, "post_attention_layernorm")
        x = g.op("Add", [x, mlp(layer, h)], name=f"{layer.node}/residual/Add_1")
        on_layer(i)
    h = rms_norm(ctx, x, "norm")
    lm_head(ctx, h, seq)
    for i in range(cfg.num_hidden_layers):
        g.output(f"present.{i}.key", spec.io_type, new_shape)
        g.output(f"present.{i}.value", spec.io_type, new_shape)


# -- the model directory's graph files ---------------------------------------------------------


def write_static_graphs(out: Path, cfg: LlamaConfig, w: Weights, spec: GraphSpec, *,
                        chunk: int = DEFAULT_CHUNK,
                        on_layer: Callable[[int], None] = lambda i: None) -> StaticGraphs:
    """decode.onnx + prefill.onnx (+ embed_tokens.npy) into ``out``.

    Weights are written once, to ``decode.onnx.data``, which the prefill graph points into
    (``GraphBuilder(share_with=)``); when they total under 2 GB each graph takes its own
    inline copy instead and the data file goes away.
    """
    check_static_limits(cfg, spec.max_length, chunk)
    host = cfg.vocab_size > MAX_DIM
    if host:
        np.save(out / EMBED_FILE, w.load("model.embed_tokens.weight").astype(spec.io_dtype))
    graphs: dict[str, onnx.ModelProto] = {}
    data = out / "decode.onnx.data"
    g, total = None, 0
    for fname, seq in (("decode.onnx", 1), ("prefill.onnx", chunk)):
        g = GraphBuilder(data, share_with=g)  # prefill points at decode's copy of each weight
        try:
            build_static_decoder(g, cfg, w, spec, seq=seq, host_embedding=host,
                                 on_layer=on_layer if seq == 1 else lambda i: None)
        finally:
            g.close()
        total = max(total, g.weight_bytes)
        graphs[fname] = g.model("llorch-llama-coreml", opset=OPSET)
    inline = total < INLINE_LIMIT
    for fname, model in graphs.items():
        _drop_contrib_import(model)
        if inline:
            onnx.load_external_data_for_model(model, str(out))
        onnx.save_model(model, str(out / fname))
    if inline:
        data.unlink()
    return StaticGraphs("decode.onnx", "prefill.onnx", chunk, spec.max_length, host,
                        logits_parts(cfg.vocab_size), np.dtype(spec.io_dtype).name, inline)


def _drop_contrib_import(model: onnx.ModelProto) -> None:
    keep = [o for o in model.opset_import if o.domain in ("", "ai.onnx")]
    del model.opset_import[:]
    model.opset_import.extend(keep)


def coreml_violations(model: onnx.ModelProto) -> list[str]:
    """What would keep a graph (or part of it) off CoreML's ML Program: ops outside the list,
    contrib domains, opset > 20, dynamic or > 16384 dimensions, rank > 5. Empty = none."""
    out = []
    for o in model.opset_import:
        if o.domain not in ("", "ai.onnx"):
            out.append(f"opset import of domain {o.domain!r}")
        elif o.version > 20:
            out.append(f"opset {o.version} > 20")
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            out.append(f"{node.name}: {node.domain}.{node.op_type} is a contrib op")
        elif node.op_type not in COREML_MLPROGRAM_OPS:
            out.append(f"{node.name}: {node.op_type} is not in CoreML's ML Program op list")
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    values = (list(inferred.graph.input) + list(inferred.graph.output)
              + list(inferred.graph.value_info))
    for v in values:
        dims = v.type.tensor_type.shape.dim
        if any(not d.HasField("dim_value") for d in dims):
            out.append(f"{v.name}: dynamic shape")
        elif any(d.dim_value > MAX_DIM for d in dims):
            out.append(f"{v.name}: shape {[d.dim_value for d in dims]} has a dim > {MAX_DIM}")
        if len(dims) > 5:
            out.append(f"{v.name}: rank {len(dims)} > 5")
    for t in model.graph.initializer:
        if any(d > MAX_DIM for d in t.dims):
            out.append(f"initializer {t.name}: shape {list(t.dims)} has a dim > {MAX_DIM}")
    return out
