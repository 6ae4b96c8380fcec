"""The KV cache's element type (``--kv-dtype``): fp32, fp16 or int8 for cpu GroupQueryAttention
graphs, set on the written graphs' past/present tensors.

ONNX Runtime's CPU GroupQueryAttention (1.32) takes a KV cache type apart from its fp32
inputs: float16 (each call widens the cache it reads to fp32), or int8 with *static* scales
(``k_scale``/``v_scale`` inputs, ``k_quant_type``/``v_quant_type`` PER_TENSOR or
PER_CHANNEL; no per-token scales on the CPU). int8 is the default of cpu int4 exports
(export.api.plan_export). Measured on the default model (int4 defaults, 768 tokens of docs
prefilled 32 at a time, so attention reads the stored cache; KL to the fp32 export; fp16 row
from an earlier export with down_proj at accuracy level 0):

    KV      bytes/token   perplexity int4 / W8A8 graph   KL to fp32 int4 / W8A8 graph
    fp32    46,080        14.756 / 14.889                0.0034 / 0.0053
    fp16    23,040        14.750 / -                     -   (decodes 2.3x slower than fp32)
    int8    11,520        14.686 / 14.708                0.0061 / 0.0085

int8 against the same weights with an fp32 cache: KL 0.0076, top-1 94.9% (int4 graph) / 96.1%
(W8A8), the decode speed of fp32 (README, "The KV cache").

int8 uses per-channel scales: max |x| of each (head, channel) over the calibration tokens
(export.calibrate), times `INT8_MARGIN` for values past what calibration saw, / 127; a key
channel and its rotary partner (``j`` and ``j + head_dim/2``, which rotary mixes) share the
larger. A constant scale instead (0.05) measured perplexity 19.2.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from export.config import ExportError, LlamaConfig

KV_DTYPES = ("fp32", "fp16", "int8")
_ONNX_TYPES = {"fp32": TensorProto.FLOAT, "fp16": TensorProto.FLOAT16, "int8": TensorProto.INT8}
INT8_MARGIN = 1.25
# GroupQueryAttention's optional inputs: k_scale, v_scale
_K_SCALE, _V_SCALE = 12, 13


def kv_ranges(model_dir: Path, graph: str, cfg: LlamaConfig, ids: list[int]
              ) -> list[tuple[np.ndarray, np.ndarray]]:
    """max |K| and max |V| per (KV head, channel) of each layer, over one prefill of ``ids``
    through ``model_dir / graph`` (fp32 KV) on ONNX Runtime's CPU provider.

    Returns:
        Per layer, (K, V) float32 ``[kv_heads, head_dim]``; K after rotary (what is cached).
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(Path(model_dir) / graph), so,
                                providers=["CPUExecutionProvider"])
    s = len(ids)
    kv = np.zeros((1, cfg.num_key_value_heads, s, cfg.head_dim), np.float32)
    feed = {"input_ids": np.asarray([ids], np.int64), "attention_mask": np.ones((1, s), np.int64),
            "num_logits_to_keep": np.asarray([1], np.int64)}
    names = []
    for i in range(cfg.num_hidden_layers):
        feed[f"past_key_values.{i}.key"] = feed[f"past_key_values.{i}.value"] = kv
        names += [f"present.{i}.key", f"present.{i}.value"]
    out = sess.run(names, feed)
    return [(np.abs(out[2 * i][0]).max(axis=1), np.abs(out[2 * i + 1][0]).max(axis=1))
            for i in range(cfg.num_hidden_layers)]


def int8_scales(ranges: list[tuple[np.ndarray, np.ndarray]], margin: float = INT8_MARGIN
                ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per-channel int8 scales ``[1, kv_heads, 1, head_dim]`` from `kv_ranges`."""
    out = []
    for k, v in ranges:
        half = k.shape[-1] // 2
        k = np.maximum(k, np.roll(k, half, axis=-1))  # rotary mixes channel j with j + half
        scale = [np.maximum(x * margin / 127, 1e-8).astype(np.float32)[None, :, None, :]
                 for x in (k, v)]
        out.append((scale[0], scale[1]))
    return out


def set_kv_dtype(model: onnx.ModelProto, kv_dtype: str,
                 scales: list[tuple[np.ndarray, np.ndarray]] | None = None) -> None:
    """Make ``model``'s past/present KV tensors ``kv_dtype`` (in place); int8 also gives each
    GroupQueryAttention node its layer's per-channel ``scales`` (`int8_scales`).

    Raises:
        ExportError: an unknown dtype, int8 without scales, or a graph without
            GroupQueryAttention.
    """
    if kv_dtype not in KV_DTYPES:
        raise ExportError(f"--kv-dtype {kv_dtype!r}: choose one of {KV_DTYPES}")
    if kv_dtype == "int8" and scales is None:
        raise ExportError("--kv-dtype int8 needs calibrated scales")
    for vi in (*model.graph.input, *model.graph.output):
        if vi.name.startswith(("past_key_values.", "present.")):
            vi.type.tensor_type.elem_type = _ONNX_TYPES[kv_dtype]
    nodes = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    if not nodes:
        raise ExportError("--kv-dtype needs a GroupQueryAttention graph")
    if kv_dtype != "int8":
        return
    for n in nodes:
        layer = int(n.output[1].split(".")[1])  # present.{layer}.key
        inputs = list(n.input) + [""] * (_V_SCALE + 1 - len(n.input))
        for idx, which, value in ((_K_SCALE, "k", scales[layer][0]),
                                  (_V_SCALE, "v", scales[layer][1])):
            name = f"model.layers.{layer}.self_attn.{which}_cache_scale"
            model.graph.initializer.append(numpy_helper.from_array(value, name))
            inputs[idx] = name
        del n.input[:]
        n.input.extend(inputs)
        n.attribute.extend([helper.make_attribute("k_quant_type", "PER_CHANNEL"),
                            helper.make_attribute("v_quant_type", "PER_CHANNEL"),
                            helper.make_attribute("kv_cache_bit_width", 8)])
