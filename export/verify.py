"""``--verify``: the exported graph against a NumPy reference forward pass.

The reference is written from the HF modeling code's math (RMSNorm, rotate-half RoPE with the
config's scaling, grouped-query causal attention, SiLU-gated MLP), independently of the graph
builders. It runs the prompt in one pass; the ONNX side runs it as a prefill of the first half
and then token-by-token decode steps through the KV cache, so both paths are checked.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from export.config import ExportError, LlamaConfig, inv_freq

Loader = Callable[[str], np.ndarray]


def _rms(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    half = x.shape[-1] // 2
    rot = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rot * sin


def reference_logits(cfg: LlamaConfig, load: Loader, ids: list[int]) -> np.ndarray:
    """float32 logits [len(ids), vocab] for one sequence, no cache."""
    s, hd = len(ids), cfg.head_dim
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    x = load("model.embed_tokens.weight")[np.asarray(ids)].astype(np.float32)
    ang = np.outer(np.arange(s, dtype=np.float32), inv_freq(cfg))
    cos = np.concatenate([np.cos(ang)] * 2, axis=-1)[None]
    sin = np.concatenate([np.sin(ang)] * 2, axis=-1)[None]
    causal = np.triu(np.full((s, s), -np.inf, dtype=np.float32), 1)
    if cfg.sliding_window:  # query i sees keys j with i - window < j <= i
        causal += np.tril(np.full((s, s), -np.inf, dtype=np.float32), -cfg.sliding_window)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        h = _rms(x, load(p + "input_layernorm.weight"), cfg.rms_norm_eps)
        proj = {}
        for t in "qkv":
            y = h @ load(p + f"self_attn.{t}_proj.weight").T
            if cfg.attention_bias:
                y = y + load(p + f"self_attn.{t}_proj.bias")
            proj[t] = y
        q = proj["q"].reshape(s, nh, hd).transpose(1, 0, 2)
        k = proj["k"].reshape(s, nkv, hd).transpose(1, 0, 2)
        v = proj["v"].reshape(s, nkv, hd).transpose(1, 0, 2)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        rep = nh // nkv
        k, v = np.repeat(k, rep, axis=0), np.repeat(v, rep, axis=0)
        scores = q @ k.transpose(0, 2, 1) / np.sqrt(hd) + causal
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        attn = (scores / scores.sum(-1, keepdims=True)) @ v
        x = x + attn.transpose(1, 0, 2).reshape(s, nh * hd) @ load(p + "self_attn.o_proj.weight").T
        h = _rms(x, load(p + "post_attention_layernorm.weight"), cfg.rms_norm_eps)
        gate = h @ load(p + "mlp.gate_proj.weight").T
        up = h @ load(p + "mlp.up_proj.weight").T
        x = x + (gate / (1 + np.exp(-gate)) * up) @ load(p + "mlp.down_proj.weight").T
    x = _rms(x, load("model.norm.weight"), cfg.rms_norm_eps)
    head = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
    return (x @ load(head).T).astype(np.float32)


def onnx_logits(model_dir: Path, cfg: LlamaConfig, ids: list[int], prefill: int,
                cache_len: int = 0, graph: str = "model.onnx") -> np.ndarray:
    """Run the export's ``graph``: a prefill of ``ids[:prefill]`` then one decode step per
    remaining id.

    Returns logits [len(ids), vocab], gathered from every step.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(Path(model_dir) / graph), so,
                                providers=["CPUExecutionProvider"])
    growing = "position_ids" in {i.name for i in sess.get_inputs()}
    cache_len = 0 if growing else (cache_len or len(ids) + 8)
    shape = (1, cfg.num_key_value_heads, cache_len, cfg.head_dim)
    kv_type = {i.name: i.type for i in sess.get_inputs()}["past_key_values.0.key"]
    kv_dtype = {"tensor(float16)": np.float16, "tensor(int8)": np.int8}.get(kv_type, np.float32)
    past = {}
    for i in range(cfg.num_hidden_layers):
        past[f"past_key_values.{i}.key"] = np.zeros(shape, kv_dtype)
        past[f"past_key_values.{i}.value"] = np.zeros(shape, kv_dtype)
    out_names = [o.name for o in sess.get_outputs()]
    chunks, pos = [], 0
    steps = [ids[:prefill]] + [[t] for t in ids[prefill:]]
    for step in steps:
        feed = dict(past)
        feed["input_ids"] = np.asarray([step], np.int64)
        feed["attention_mask"] = np.ones((1, pos + len(step)), np.int64)
        if growing:
            feed["position_ids"] = np.arange(pos, pos + len(step), dtype=np.int64)[None]
        res = dict(zip(out_names, sess.run(out_names, feed), strict=False))
        chunks.append(res["logits"][0])
        for i in range(cfg.num_hidden_layers):
            past[f"past_key_values.{i}.key"] = res[f"present.{i}.key"]
            past[f"past_key_values.{i}.value"] = res[f"present.{i}.value"]
        pos += len(step)
    return np.concatenate(chunks)


@dataclass(frozen=True)
class VerifyReport:
    max_abs_diff: float
    max_rel_diff: float  # max |Δ| / max |reference logit|
    argmax_agreement: float
    positions: int


# Used when the model directory has no tokenizer.json to encode VERIFY_TEXTS with.
VERIFY_IDS = ([1, 5, 9, 2, 7, 3, 11, 4, 13, 6, 8, 10], [0, 3, 3, 3, 42, 17, 9])
VERIFY_TEXTS = (
    "The capital of France is Paris. It is known for the Eiffel Tower and",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
)


def verify_prompts(model_dir: Path) -> list[list[int]]:
    """Real text through the exported tokenizer (int8 activations are tuned for text, not for
    arbitrary runs of special tokens), plus one raw id sequence."""
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        return [list(p) for p in VERIFY_IDS]
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    return [tok.encode(t, add_special_tokens=False).ids[:24] for t in VERIFY_TEXTS]


def verify_export(model_dir: Path, cfg: LlamaConfig, load: Loader, *, quantized: bool,
                  prompts=None) -> VerifyReport:
    """Compare ONNX Runtime to the reference; raise ExportError when they disagree.

    fp32/fp16 graphs must match to 1e-3 of the logit scale. int4 graphs (reference built from
    the dequantized int4 weights, ORT quantizing activations to int8 at accuracy level 4) must
    agree on ≥ 90% of argmax tokens and within 10% of the logit scale.
    """
    diffs, rels, agree, total = [], [], 0, 0
    if prompts is None:
        prompts = verify_prompts(model_dir) if quantized else (
            verify_prompts(model_dir) + [list(p) for p in VERIFY_IDS])
    for ids in prompts:
        ids = [t % cfg.vocab_size for t in ids]
        ref = reference_logits(cfg, load, ids)
        got = onnx_logits(model_dir, cfg, ids, prefill=max(1, len(ids) // 2))
        d = float(np.abs(ref - got).max())
        diffs.append(d)
        rels.append(d / max(float(np.abs(ref).max()), 1e-6))
        agree += int((ref.argmax(-1) == got.argmax(-1)).sum())
        total += len(ids)
    rep = VerifyReport(max(diffs), max(rels), agree / total, total)
    tol_rel, tol_agree = (0.10, 0.90) if quantized else (1e-3, 1.0)
    if rep.max_rel_diff > tol_rel or rep.argmax_agreement < tol_agree:
        raise ExportError(
            f"verify failed: ONNX logits differ from the NumPy reference (max |Δ| "
            f"{rep.max_abs_diff:.3g}, {rep.max_rel_diff:.2%} of the logit scale, argmax agreement "
            f"{rep.argmax_agreement:.0%}; tolerance {tol_rel:.1%} / {tol_agree:.0%})"
        )
    return rep
