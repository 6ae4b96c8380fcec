"""``--verify`` for the static (CoreML) graphs: the host loop in its simplest form against the
NumPy reference of ``export.verify``.

The exporter may not import ``serve``, so this holds its own minimal host: a cache per layer,
prefill in padded chunks, then one decode call per token. serve/runtime/static.py is the real
one; tests check the two agree.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from export.config import ExportError, LlamaConfig
from export.verify import Loader, VerifyReport, reference_logits, verify_prompts


class StaticHost:
    """One sequence through decode.onnx / prefill.onnx on ONNX Runtime's CPU provider."""

    def __init__(self, model_dir: Path, cfg: LlamaConfig, graph: dict | None = None):
        """``graph``: llorch.json's graph section (read from the directory when None)."""
        import onnxruntime as ort

        model_dir = Path(model_dir)
        if graph is None:
            graph = json.loads((model_dir / "llorch.json").read_text())["graph"]
        self.graph = graph
        self.cfg = cfg
        self.dtype = np.dtype(self.graph["io_dtype"])
        so = ort.SessionOptions()
        so.log_severity_level = 3
        self.decode = ort.InferenceSession(str(model_dir / self.graph["decode"]), so,
                                           providers=["CPUExecutionProvider"])
        self.prefill = ort.InferenceSession(str(model_dir / self.graph["prefill"]), so,
                                            providers=["CPUExecutionProvider"])
        self.embed = (np.load(model_dir / self.graph["embed_file"], mmap_mode="r")
                      if self.graph["host_embedding"] else None)
        past = {i.name: i for i in self.decode.get_inputs()}["past_key_values.0.key"]
        self.max_length = past.shape[2]
        shape = (1, cfg.num_key_value_heads, self.max_length, cfg.head_dim)
        self.k = [np.zeros(shape, self.dtype) for _ in range(cfg.num_hidden_layers)]
        self.v = [np.zeros(shape, self.dtype) for _ in range(cfg.num_hidden_layers)]
        self.length = 0

    def step(self, ids: list[int]) -> np.ndarray:
        """Append ``ids`` (at most one chunk); float32 logits [vocab] after the last one."""
        n = len(ids)
        sess, s = (self.decode, 1) if n == 1 else (self.prefill, self.graph["chunk"])
        p, L = self.length, self.max_length
        padded = np.zeros((1, s), np.int64)
        padded[0, :n] = ids
        feed = {"position_ids": np.minimum(p + np.arange(s), L - 1)[None].astype(np.int64)}
        if self.embed is not None:
            feed["inputs_embeds"] = np.asarray(self.embed[padded[0]], self.dtype)[None]
        else:
            feed["input_ids"] = padded
        mask = np.full((1, 1, s, L + s), self.graph["mask_value"], self.dtype)
        mask[..., :p] = 0  # the cache so far
        mask[0, 0, :, L:][np.tril(np.ones((s, s), bool))] = 0  # the chunk, causally
        feed["attention_mask"] = mask
        if s > 1:
            feed["logits_index"] = np.array([[n - 1]], np.int64)
        for i in range(self.cfg.num_hidden_layers):
            feed[f"past_key_values.{i}.key"] = self.k[i]
            feed[f"past_key_values.{i}.value"] = self.v[i]
        names = [o.name for o in sess.get_outputs()]
        out = dict(zip(names, sess.run(names, feed), strict=False))
        for i in range(self.cfg.num_hidden_layers):
            self.k[i][:, :, p:p + n] = out[f"present.{i}.key"][:, :, :n]
            self.v[i][:, :, p:p + n] = out[f"present.{i}.value"][:, :, :n]
        self.length = p + n
        parts = [n for n in names if n == "logits" or n.startswith("logits.")]
        parts.sort(key=lambda n: int(n.split(".")[1]) if "." in n else 0)
        return np.concatenate([out[n][0, -1] for n in parts]).astype(np.float32)


def static_logits(model_dir: Path, cfg: LlamaConfig, ids: list[int], prefill: int,
                  graph: dict | None = None) -> np.ndarray:
    """Logits [len(ids) - prefill + 1, vocab]: after the prefill, then after each decode."""
    host = StaticHost(model_dir, cfg, graph)
    chunk = host.graph["chunk"]
    first = ids[:prefill]
    for i in range(0, len(first), chunk):
        last = host.step(first[i:i + chunk])
    out = [last]
    out += [host.step([t]) for t in ids[prefill:]]
    return np.stack(out)


def verify_static_export(model_dir: Path, cfg: LlamaConfig, load: Loader, graph: dict, *,
                         half: bool, prompts=None) -> VerifyReport:
    """The static graphs against the reference at the last prefill position and every decode
    step; fp32 within 1e-3 of the logit scale, fp16 within 2% and ≥ 90% argmax agreement."""
    diffs, rels, agree, total = [], [], 0, 0
    for ids in prompts or verify_prompts(model_dir):
        ids = [t % cfg.vocab_size for t in ids]
        prefill = max(1, len(ids) // 2)
        ref = reference_logits(cfg, load, ids)[prefill - 1:]
        got = static_logits(model_dir, cfg, ids, prefill, graph)
        d = float(np.abs(ref - got).max())
        diffs.append(d)
        rels.append(d / max(float(np.abs(ref).max()), 1e-6))
        agree += int((ref.argmax(-1) == got.argmax(-1)).sum())
        total += len(ref)
    rep = VerifyReport(max(diffs), max(rels), agree / total, total)
    tol_rel, tol_agree = (0.02, 0.90) if half else (1e-3, 1.0)
    if rep.max_rel_diff > tol_rel or rep.argmax_agreement < tol_agree:
        raise ExportError(
            f"verify failed: static graph logits differ from the NumPy reference (max |Δ| "
            f"{rep.max_abs_diff:.3g}, {rep.max_rel_diff:.2%} of the logit scale, argmax "
            f"agreement {rep.argmax_agreement:.0%}; tolerance {tol_rel:.1%} / {tol_agree:.0%})")
    return rep
