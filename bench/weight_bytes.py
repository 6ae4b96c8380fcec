"""Bytes of weights one decode step reads, counted from an export's own files.

A batch-1 decode step of a dense model multiplies the one new token's activations by every
matrix of the model, so it reads every matrix in full, once; it reads one row of the token
embedding table (a lookup) and one row of the rotary caches. The physical limit of batch-1
decode is then memory bandwidth ÷ these bytes (KV-cache reads come on top and grow with the
context; `kv_bytes_per_token` gives them).

ONNX (llorch, ORT GenAI): the initializers of the graph file, by the op that consumes them:

    matmul   inputs of MatMulNBits / MatMul / Gemm / MatMulInteger / DynamicQuantizeMatMul /
             MatMulIntegerToFloat (int4 packed weights, scales, zero points, float weights):
             counted in full
    lookup   Gather / GatherBlockQuantized data and the cos/sin caches of
             GroupQueryAttention / RotaryEmbedding: one row (bytes ÷ first dimension)
    other    every other initializer (norm weights, small constants): counted in full

An initializer consumed by both a matmul and a lookup (a tied embedding) is counted in full.

GGUF (llama.cpp): every tensor's bytes in full, except `token_embd.weight` when the file has
an `output.weight` (then token_embd is only looked up: one row). With tied embeddings
(no `output.weight`) token_embd is the output matrix too and is counted in full.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

MATMUL_OPS = {"MatMulNBits", "MatMul", "Gemm", "MatMulInteger", "DynamicQuantizeMatMul",
              "MatMulIntegerToFloat", "QLinearMatMul"}
LOOKUP_OPS = {"Gather", "GatherBlockQuantized"}
ROTARY_OPS = {"GroupQueryAttention", "RotaryEmbedding"}

_ONNX_ELEM_BYTES = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4,
                    13: 8, 16: 2, 21: 1, 22: 1}  # TensorProto.DataType → bytes (4-bit: packed)


def _initializer_bytes(init) -> int:
    for entry in init.external_data:
        if entry.key == "length":
            return int(entry.value)
    if init.raw_data:
        return len(init.raw_data)
    n = 1
    for d in init.dims:
        n *= d
    return n * _ONNX_ELEM_BYTES.get(init.data_type, 4)


def onnx_weight_bytes(model: Path) -> dict:
    """Weight bytes a batch-1 decode step of the ONNX graph `model` reads (see module doc).

    Only the graph's own initializers (its external data is not opened). Subgraphs are not
    walked (our graphs and the GenAI builder's have none).

    Returns:
        {"total": bytes, "parts": {"matmul"|"lookup"|"other": bytes},
         "by_dtype": {"matmul <onnx dtype>": bytes}, "file": str}.
    """
    import onnx

    graph = onnx.load(str(model), load_external_data=False).graph
    inits = {i.name: i for i in graph.initializer}
    kinds: dict[str, set[str]] = defaultdict(set)
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name not in inits:
                continue
            if node.op_type in MATMUL_OPS:
                kinds[name].add("matmul")
            elif (node.op_type in LOOKUP_OPS and k in (0, 2, 3)) or node.op_type in ROTARY_OPS:
                kinds[name].add("lookup")  # GatherBlockQuantized: data 0, scales 2, zero points 3
            else:
                kinds[name].add("other")
    # a table both looked up and multiplied (tied embeddings) is read in full
    role = {name: "matmul" if "matmul" in ks else "lookup" if ks == {"lookup"} else "other"
            for name, ks in kinds.items()}
    parts: dict[str, int] = defaultdict(int)
    by_dtype: dict[str, int] = defaultdict(int)
    for name, init in inits.items():
        size = _initializer_bytes(init)
        kind = role.get(name, "other")
        if kind == "lookup":
            size //= max(1, init.dims[0] if init.dims else 1)
        else:
            by_dtype[f"{kind} {onnx.TensorProto.DataType.Name(init.data_type).lower()}"] += size
        parts[kind] += size
    return {"total": sum(parts.values()), "parts": dict(parts), "by_dtype": dict(by_dtype),
            "file": str(model)}


def gguf_weight_bytes(path: Path) -> dict:
    """Weight bytes a batch-1 decode step of the GGUF `path` reads (see module doc).

    Returns:
        {"total": bytes, "parts": {"matmul"|"lookup"|"other": bytes},
         "by_dtype": {"<ggml type>": bytes}, "file": str}.
    """
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    names = {t.name for t in reader.tensors}
    parts: dict[str, int] = defaultdict(int)
    by_dtype: dict[str, int] = defaultdict(int)
    for t in reader.tensors:
        size = int(t.n_bytes)
        if t.name == "token_embd.weight" and "output.weight" in names:
            rows = int(t.shape[-1]) if len(t.shape) > 1 else 1  # GGUF shapes are [cols, rows]
            parts["lookup"] += size // rows
            continue
        kind = "matmul" if len(t.shape) > 1 else "other"
        parts[kind] += size
        by_dtype[t.tensor_type.name] += size
    return {"total": sum(parts.values()), "parts": dict(parts), "by_dtype": dict(by_dtype),
            "file": str(path)}


def weight_bytes(model: Path) -> dict:
    """`gguf_weight_bytes` for a .gguf file, else `onnx_weight_bytes` of `model` (a .onnx
    file, or a directory's model.onnx: the graph batch-1 decode runs on)."""
    if model.suffix == ".gguf":
        return gguf_weight_bytes(model)
    return onnx_weight_bytes(model / "model.onnx" if model.is_dir() else model)


def kv_bytes_per_token(config: dict, element_bytes: int) -> int:
    """KV-cache bytes one context token adds to every later decode step's reads.

    Args:
        config: HF config dict (num_hidden_layers, num_key_value_heads, head_dim or
            hidden_size / num_attention_heads).
        element_bytes: 4 (fp32 KV), 2 (fp16), 1 (int8).
    """
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * head_dim * element_bytes
