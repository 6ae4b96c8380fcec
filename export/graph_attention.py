"""Self-attention from standard ONNX ops, with a growing KV cache.

ONNX Runtime's CPU GroupQueryAttention only takes head sizes that are multiples of 16; for the
others (tiny test models, some small checkpoints) the decoder uses this path. Its contract is
the one optimum-cli exports have: a ``position_ids`` input and past K/V
``[batch, kv_heads, past_len, head_dim]`` that come back one step longer as ``present``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import TensorProto

from export.config import LlamaConfig, cos_sin_cache
from export.onnx_builder import GraphBuilder

NEG_INF = float(np.finfo(np.float32).min)


@dataclass(frozen=True)
class StandardAttentionInputs:
    cos: str  # [batch, 1, seq, head_dim] for the new positions
    sin: str
    mask: str  # additive [batch, 1, 1, seq, total]: 0 where allowed, -inf-ish elsewhere


def attention_inputs(g: GraphBuilder, cfg: LlamaConfig, max_length: int, input_ids: str,
                     mask: str, position_ids: str) -> StandardAttentionInputs:
    """
      position_ids ─► Gather(cos/sin table) ─► [cos|cos] ─► Unsqueeze(1)
      attention_mask ─┬─► key padding ──────┐
      positions ──────┴─► causal (k ≤ q) ───And─► Where(0, -inf) ─► [B,1,1,S,T]
    """
    n = "/model/rotary"
    cos, sin = cos_sin_cache(cfg, max_length)
    tables = []
    for name, table in (("cos", cos), ("sin", sin)):
        t = g.op("Gather", [g.initializer(f"{name}_cache", table), position_ids],
                 name=f"{n}/{name}/Gather")  # [B, S, hd/2]
        t = g.op("Concat", [t, t], name=f"{n}/{name}/Concat", axis=-1)
        tables.append(g.op("Unsqueeze", [t, g.const(f"{n}/{name}/axes", [1])],
                           name=f"{n}/{name}/Unsqueeze"))

    m = "/model/attn_mask"
    total = g.op("Shape", [mask], name=f"{m}/total/Shape", start=1, end=2)
    seq = g.op("Shape", [input_ids], name=f"{m}/seq/Shape", start=1, end=2)
    past = g.op("Sub", [total, seq], name=f"{m}/past/Sub")
    zero, one = g.const(f"{m}/zero", 0), g.const(f"{m}/one", 1)
    total_s = g.op("Squeeze", [total], name=f"{m}/total/Squeeze")
    past_s = g.op("Squeeze", [past], name=f"{m}/past/Squeeze")
    k_pos = g.op("Range", [zero, total_s, one], name=f"{m}/k_pos/Range")  # [T]
    q_pos = g.op("Range", [past_s, total_s, one], name=f"{m}/q_pos/Range")  # [S]
    q_col = g.op("Unsqueeze", [q_pos, g.const(f"{m}/q_axes", [1])], name=f"{m}/q/Unsqueeze")
    causal = g.op("LessOrEqual", [k_pos, q_col], name=f"{m}/causal/LessOrEqual")  # [S, T]
    if cfg.sliding_window:  # and within the window: k > q - window
        start = g.op("Sub", [q_col, g.const(f"{m}/window", cfg.sliding_window)],
                     name=f"{m}/window/Sub")
        inside = g.op("Greater", [k_pos, start], name=f"{m}/window/Greater")
        causal = g.op("And", [causal, inside], name=f"{m}/window/And")
    keys = g.op("Cast", [mask], name=f"{m}/keys/Cast", to=TensorProto.BOOL)
    keys = g.op("Unsqueeze", [keys, g.const(f"{m}/keys_axes", [1])], name=f"{m}/keys/Unsqueeze")
    allowed = g.op("And", [causal, keys], name=f"{m}/And")  # [B, S, T]
    add = g.op("Where", [allowed, g.const(f"{m}/open", 0.0, np.float32),
                         g.const(f"{m}/closed", NEG_INF, np.float32)], name=f"{m}/Where")
    add = g.op("Unsqueeze", [add, g.const(f"{m}/add_axes", [1, 2])], name=f"{m}/Unsqueeze")
    return StandardAttentionInputs(tables[0], tables[1], add)


def rotary(g: GraphBuilder, x: str, cos: str, sin: str, hd: int, *, node: str,
           signed_sin: bool = False) -> str:
    """HF's rotate-half rotary: x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1].

    Args:
        x: ``[B, heads, S, hd]``; cos, sin: ``[B, 1, S, hd]`` rows for the positions.
        signed_sin: ``sin`` holds ``[-sin, sin]``, so ``[x2, x1]`` needs no Neg (the CoreML
            target's op set has none).
    Returns:
        The rotated ``x``, same shape and dtype.
    """
    half = g.const(f"{node}/split", [hd // 2, hd // 2])
    x1, x2 = g.node("Split", [x, half], 2, name=f"{node}/Split", axis=-1)
    first = x2 if signed_sin else g.op("Neg", [x2], name=f"{node}/Neg")
    rot = g.op("Concat", [first, x1], name=f"{node}/Concat", axis=-1)
    a = g.op("Mul", [x, cos], name=f"{node}/Mul_cos")
    b = g.op("Mul", [rot, sin], name=f"{node}/Mul_sin")
    return g.op("Add", [a, b], name=f"{node}/Add")


def split_heads(g: GraphBuilder, x: str, shape: list[int], *, node: str) -> str:
    """``[B, S, heads·hd]`` ─► Reshape(``shape`` = [B, S, heads, hd]) ─► ``[B, heads, S, hd]``
    (0 in ``shape`` keeps that dimension of ``x``)."""
    x = g.op("Reshape", [x, g.const(f"{node}/shape", shape)], name=f"{node}/Reshape")
    return g.op("Transpose", [x], name=f"{node}/Transpose", perm=[0, 2, 1, 3])


def standard_attention(g: GraphBuilder, qkv: str, layer: int, cfg: LlamaConfig,
                       att: StandardAttentionInputs) -> tuple[str, str, str]:
    """
      qkv ─► Split ─► q [B,nh,S,hd] ─► rotary ─► [B,kvh,rep,S,hd] ─┐
                   ├► k [B,kvh,S,hd] ─► rotary ─► Concat(past) ─► present.k ─► QKᵀ·scale+mask
                   └► v ─────────────────────────► Concat(past) ─► present.v ─► Softmax·V
    Returns (attention output [B,S,nh*hd], present_key, present_value).
    """
    n = f"/model/layers.{layer}/self_attn"
    nh, kvh, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    rep = nh // kvh
    q, k, v = g.node("Split", [qkv, g.const(f"{n}/qkv_split", [nh * hd, kvh * hd, kvh * hd])],
                     3, name=f"{n}/qkv/Split", axis=-1)

    def heads(x: str, count: int, tag: str) -> str:
        return split_heads(g, x, [0, 0, count, hd], node=f"{n}/{tag}")

    q = rotary(g, heads(q, nh, "q"), att.cos, att.sin, hd, node=f"{n}/q_rotary")
    k = rotary(g, heads(k, kvh, "k"), att.cos, att.sin, hd, node=f"{n}/k_rotary")
    v = heads(v, kvh, "v")
    present_k = g.op("Concat", [f"past_key_values.{layer}.key", k], name=f"{n}/k/Concat", axis=2)
    present_v = g.op("Concat", [f"past_key_values.{layer}.value", v], name=f"{n}/v/Concat",
                     axis=2)
    g.node("Identity", [present_k], [f"present.{layer}.key"], name=f"{n}/present_key/Identity")
    g.node("Identity", [present_v], [f"present.{layer}.value"],
           name=f"{n}/present_value/Identity")

    # group the query heads under their kv head: [B, kvh, rep, S, hd] against [B, kvh, 1, T, hd]
    q5 = g.op("Reshape", [q, g.const(f"{n}/q5_shape", [0, kvh, rep, -1, hd])],
              name=f"{n}/q/Reshape5")
    k5 = g.op("Unsqueeze", [present_k, g.const(f"{n}/k5_axes", [2])], name=f"{n}/k/Unsqueeze")
    v5 = g.op("Unsqueeze", [present_v, g.const(f"{n}/v5_axes", [2])], name=f"{n}/v/Unsqueeze")
    kt = g.op("Transpose", [k5], name=f"{n}/k/Transpose5", perm=[0, 1, 2, 4, 3])
    scores = g.op("MatMul", [q5, kt], name=f"{n}/scores/MatMul")
    scores = g.op("Mul", [scores, g.const(f"{n}/scale", hd**-0.5, np.float32)],
                  name=f"{n}/scores/Mul")
    scores = g.op("Add", [scores, att.mask], name=f"{n}/scores/Add")
    probs = g.op("Softmax", [scores], name=f"{n}/Softmax", axis=-1)
    out = g.op("MatMul", [probs, v5], name=f"{n}/out/MatMul")  # [B, kvh, rep, S, hd]
    out = g.op("Reshape", [out, g.const(f"{n}/out4_shape", [0, nh, -1, hd])],
               name=f"{n}/out/Reshape4")
    out = g.op("Transpose", [out], name=f"{n}/out/Transpose", perm=[0, 2, 1, 3])
    out = g.op("Reshape", [out, g.const(f"{n}/out_shape", [0, 0, nh * hd])],
               name=f"{n}/out/Reshape")
    return out, f"present.{layer}.key", f"present.{layer}.value"
