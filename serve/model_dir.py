"""What the server needs to know about a model directory, read once at startup.

Three layouts are accepted: llorch's own exports and ONNX Runtime GenAI builder output (both
described by genai_config.json), and optimum-cli decoders (config.json + model.onnx).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from serve.jsonfile import read_json_object


class ModelDirError(Exception):
    """The model directory is unusable; the message names the file and field."""


@dataclass(frozen=True)
class ModelInfo:
    path: Path
    name: str
    onnx_file: Path
    vocab_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    max_length: int  # longest sequence (prompt + completion) the KV buffers hold
    context_length: int  # what the model was trained for
    bos_token_id: int | None
    pad_token_id: int | None
    past_key: str = "past_key_values.%d.key"
    past_value: str = "past_key_values.%d.value"
    present_key: str = "present.%d.key"
    present_value: str = "present.%d.value"
    precision: str | None = None
    source: str = "llorch"  # llorch | genai | optimum
    logits_to_keep: bool = False  # graph has the overridable `num_logits_to_keep` initializer
    shared_kv: bool = True  # past and present share one buffer (GroupQueryAttention graphs)
    # The export's W8A8 companion graph (int8 GEMMs, same inputs/outputs/KV), or None.
    w8a8_file: Path | None = None
    # --target cuda: the decode graph ONNX Runtime can capture as a CUDA graph, or None.
    cuda_graph_file: Path | None = None
    # llorch.json's "graph" section (what the export built: variant, dtypes, file names), or {}.
    graph: dict = field(default_factory=dict, compare=False)


def _companion(model_dir: Path, manifest: Path, key: str, meta: dict) -> Path | None:
    """The extra graph file llorch.json's ``graph.<key>`` names, if any."""
    filename = meta.get("graph", {}).get(key)
    if not filename:
        return None
    path = model_dir / str(filename)
    if not path.is_file():
        raise ModelDirError(f"{manifest}: graph.{key} names {filename}, which is missing")
    return path


def load_model_info(model_dir: Path | str, *, name: str | None = None) -> ModelInfo:
    """Read a model directory's JSON files (never its graphs) into a `ModelInfo`.

    Args:
        model_dir: a llorch export, ONNX Runtime GenAI builder output, or an optimum-cli
            decoder directory.
        name: the served model id; default: the directory's name without a ``-int4`` /
            ``-fp32`` suffix.
    Returns:
        The model's shapes (layers, KV heads, head size, vocabulary), token ids, graph file
        names, KV input/output name patterns and ``max_length`` (tokens, from genai_config's
        ``search.max_length``, else the context length).
    Raises:
        ModelDirError: the directory, a JSON file or a required field is missing or invalid,
            or llorch.json names a graph file that is not there.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelDirError(f"{model_dir}: model directory not found")
    name = name or model_dir.resolve().name.removesuffix("-int4").removesuffix("-fp32")
    # EOS ids are the tokenizer's (`Tokenizer.eos_ids`); this only refuses a broken file early.
    read_json_object(model_dir / "generation_config.json", ModelDirError)
    genai = model_dir / "genai_config.json"
    if genai.is_file():
        cfg = read_json_object(genai, ModelDirError)
        try:
            m = cfg["model"]
            d = m["decoder"]
            onnx_file = model_dir / d["filename"]
            manifest = model_dir / "llorch.json"
            meta = read_json_object(manifest, ModelDirError)
            precision = meta.get("precision")
            return ModelInfo(
                path=model_dir, name=name, onnx_file=onnx_file,
                vocab_size=int(m["vocab_size"]), num_layers=int(d["num_hidden_layers"]),
                num_kv_heads=int(d["num_key_value_heads"]), head_dim=int(d["head_size"]),
                max_length=int(cfg.get("search", {}).get("max_length") or m["context_length"]),
                context_length=int(m["context_length"]),
                bos_token_id=m.get("bos_token_id"), pad_token_id=m.get("pad_token_id"),
                past_key=d["inputs"].get("past_key_names", "past_key_values.%d.key"),
                past_value=d["inputs"].get("past_value_names", "past_key_values.%d.value"),
                present_key=d["outputs"].get("present_key_names", "present.%d.key"),
                present_value=d["outputs"].get("present_value_names", "present.%d.value"),
                precision=precision,
                source="llorch" if manifest.is_file() else "genai",
                logits_to_keep=bool(meta.get("graph", {}).get("logits_to_keep", False)),
                shared_kv=bool(cfg.get("search", {}).get("past_present_share_buffer", True)),
                w8a8_file=_companion(model_dir, manifest, "w8a8", meta),
                cuda_graph_file=_companion(model_dir, manifest, "cuda_graph", meta),
                graph=dict(meta.get("graph") or {}),
            )
        except KeyError as e:
            raise ModelDirError(f"{genai}: missing field {e}") from None
    hf = model_dir / "config.json"
    if not hf.is_file():
        raise ModelDirError(
            f"{model_dir}: neither genai_config.json nor config.json found (not a model directory "
            "made by llorch export, ONNX Runtime GenAI's builder or optimum-cli)")
    cfg = read_json_object(hf, ModelDirError)
    onnx_file = next((model_dir / f for f in ("model.onnx", "decoder_model_merged.onnx")
                      if (model_dir / f).is_file()), None)
    if onnx_file is None:
        raise ModelDirError(f"{model_dir}: no model.onnx")
    try:
        heads = int(cfg["num_attention_heads"])
        ctx = int(cfg.get("max_position_embeddings", 2048))
        return ModelInfo(
            path=model_dir, name=name, onnx_file=onnx_file, vocab_size=int(cfg["vocab_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads),
            max_length=ctx, context_length=ctx,
            bos_token_id=cfg.get("bos_token_id"), pad_token_id=cfg.get("pad_token_id"),
            source="optimum",
            shared_kv=False,
        )
    except KeyError as e:
        raise ModelDirError(f"{hf}: missing field {e}") from None
