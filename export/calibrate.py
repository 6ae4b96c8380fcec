"""Activation sizes for the W8A8 graph's smoothing, measured on the export's own main graph.

Smoothing needs, for every linear layer, how large each input channel's activations run.
The outlier channels belong to the model, not to the text (on the default model, 64 or 268
tokens of this text, or 512 of it repeated, smoothed equally well: KL to fp32 0.0100 ±0.0002
in a torch simulation of the graph),
so a short built-in text is enough. It goes through the exported tokenizer; exports without a
tokenizer.json use fixed pseudo-random ids.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from export.config import LlamaConfig

CALIBRATION_TOKENS = 256
CALIBRATION_TEXT = """\
<|im_start|>system
You are a helpful assistant.<|im_end|>
<|im_start|>user
Can you explain how a refrigerator keeps food cold, and then write a short poem about winter?<|im_end|>
<|im_start|>assistant
A refrigerator moves heat out of the box rather than making cold. A refrigerant is \
compressed, which heats it; it releases that heat through the coils at the back, expands \
through a small valve, and becomes cold enough to absorb heat from the inside again.

Snow on the rooftops, silence in the street,
the lamps burn early and the frost is sweet.

The history of the region goes back to 1204, when the first charter was signed; by 1850 \
the population had reached 23,000 people, and the railway arrived eleven years later.

def merge(a, b):
    out = []
    while a and b:
        out.append(a.pop(0) if a[0] < b[0] else b.pop(0))
    return out + a + b

1. Preheat the oven to 200 °C.
2. Mix 250 g of flour, 2 eggs and a pinch of salt.
3. Bake for 25 minutes — until golden!
"""


def calibration_ids(model_dir: Path, vocab_size: int, n: int = CALIBRATION_TOKENS) -> list[int]:
    """``n`` token ids of CALIBRATION_TEXT (repeated as needed) through ``model_dir``'s
    tokenizer.json, ids ≥ ``vocab_size`` dropped; seeded pseudo-random ids when there is no
    tokenizer.json or it yields fewer than 16."""
    path = Path(model_dir) / "tokenizer.json"
    if path.is_file():
        from tokenizers import Tokenizer

        ids = Tokenizer.from_file(str(path)).encode(CALIBRATION_TEXT, add_special_tokens=False).ids
        ids = [i for i in ids if i < vocab_size]
        if len(ids) >= 16:  # repeated up to n tokens if short
            return (ids * (n // len(ids) + 1))[:n]
    return np.random.default_rng(0).integers(0, vocab_size, n).tolist()


def linear_inputs(model: onnx.ModelProto) -> dict[str, str]:
    """Each linear layer of a graph written by export.linear, keyed by its initializer prefix
    (``model.layers.0.self_attn.qkv_proj``), and the tensor it multiplies: the first input of
    every MatMulNBits (weights ``{prefix}.qweight``) and every MatMul whose weights are
    ``{prefix}.weight`` (through a Cast where fp16 weights are widened)."""
    made_by = {o: n for n in model.graph.node for o in n.output}
    out = {}
    for n in model.graph.node:
        if n.op_type not in ("MatMul", "MatMulNBits"):
            continue
        weight = n.input[1]
        src = made_by.get(weight)
        if src is not None and src.op_type == "Cast":
            weight = src.input[0]
        suffix = ".qweight" if n.op_type == "MatMulNBits" else ".weight"
        if weight.endswith(suffix) and weight not in made_by:
            out[weight.removesuffix(suffix)] = n.input[0]
    return out


def activation_means(model_dir: Path, graph: str, inputs: Mapping[str, str],
                      cfg: LlamaConfig, ids: list[int]) -> dict[str, np.ndarray]:
    """Run ``graph`` (a GroupQueryAttention decoder in ``model_dir``, fp32 I/O) on ``ids`` in
    one prefill on ONNX Runtime's CPU provider.

    Args:
        inputs: linear layer name → the tensor it multiplies (`linear_inputs`).
        cfg: the model's config (layers, KV heads, head size for the empty past).
        ids: token ids (`calibration_ids`).
    Returns:
        For each key of ``inputs``: float32 ``[K]``, the mean over positions of |input| per
        input channel.
    """
    import onnxruntime as ort

    model_dir = Path(model_dir)
    model = onnx.load(str(model_dir / graph), load_external_data=False)
    tensors = sorted(set(inputs.values()))
    del model.graph.output[:]
    model.graph.output.extend(helper.make_tensor_value_info(t, TensorProto.FLOAT, None)
                              for t in tensors)
    probe = model_dir / f".calibrate-{graph}"  # beside the data file it points into
    onnx.save_model(model, str(probe))
    try:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        sess = ort.InferenceSession(str(probe), so, providers=["CPUExecutionProvider"])
    finally:
        probe.unlink(missing_ok=True)
    s = len(ids)
    kv_type = {i.name: i.type for i in sess.get_inputs()}["past_key_values.0.key"]
    kv = np.zeros((1, cfg.num_key_value_heads, s, cfg.head_dim),
                  np.int8 if kv_type == "tensor(int8)" else np.float32)  # --kv-dtype int8
    feed = {"input_ids": np.asarray([ids], np.int64),
            "attention_mask": np.ones((1, s), np.int64),
            "num_logits_to_keep": np.asarray([1], np.int64)}
    for i in range(cfg.num_hidden_layers):
        feed[f"past_key_values.{i}.key"] = kv
        feed[f"past_key_values.{i}.value"] = kv
    values = dict(zip(tensors, sess.run(tensors, feed), strict=True))
    return {name: np.abs(values[t]).reshape(-1, values[t].shape[-1]).mean(axis=0)
            for name, t in inputs.items()}
