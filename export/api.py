"""``export_model``: a checkpoint in, a model directory (DESIGN.md's contract) out.

One pipeline of named steps: ``plan_export`` (open, validate, settle defaults) →
``write_tokenizer_files`` → ``write_graphs`` → ``write_configs`` → ``verify_written``
(--verify) → ``write_manifest`` → ``replace_dir``. The directory is written to a temporary
sibling and renamed at the end, so a failure at any point leaves no half-written model behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx

from export import __version__
from export.calibrate import CALIBRATION_TOKENS, activation_means, calibration_ids, linear_inputs
from export.config import ExportError, LlamaConfig
from export.graph import build_decoder, uses_gqa
from export.graph_coreml import DEFAULT_CHUNK, DEFAULT_MAX_LENGTH, StaticGraphs
from export.kv_cache import INT8_MARGIN, KV_DTYPES, int8_scales, kv_ranges, set_kv_dtype
from export.linear import SMOOTH_ALPHA, quantized_linear
from export.onnx_builder import GraphBuilder
from export.quant import dequantize_blocks
from export.sources import GGUFSource, HFSource, open_source, validate
from export.spec import GraphSpec

W8A8_FILE = "model_w8a8.onnx"  # the int8-GEMM companion graph (export.linear.w8a8_linear)
CUDA_GRAPH_FILE = "model_decode_static.onnx"  # --target cuda: the capturable decode graph


@dataclass(frozen=True)
class ExportSummary:
    out: Path
    source: Path
    precision: str
    target: str
    params: int
    seconds: float
    bytes_written: int
    max_length: int
    verify: object | None = None

    def render(self) -> str:
        lines = [
            f"exported   {self.source} -> {self.out}",
            f"precision  {self.precision} ({self.target})",
            f"params     {self.params / 1e6:.1f} M",
            f"max length {self.max_length}",
            f"size       {self.bytes_written / 2**20:.1f} MiB",
            f"time       {self.seconds:.1f} s",
        ]
        if self.verify is not None:
            v = self.verify
            lines.append(
                f"verify     ok: max |Δlogits| {v.max_abs_diff:.2e} "
                f"({v.max_rel_diff:.2%} of scale), argmax agreement {v.argmax_agreement:.0%}"
            )
        return "\n".join(lines)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def genai_config(cfg: LlamaConfig, max_length: int, tok: dict, *, shared_kv: bool = True,
                 static: StaticGraphs | None = None) -> dict:
    """ONNX Runtime GenAI's genai_config.json for the decoder we build.

    CoreML exports (``static``) name their decode graph and its inputs here too, so the model
    directory reads the same way; their static contract is in llorch.json's ``graph``.
    """
    gen = tok.get("generation_config.json", {})
    eos = gen.get("eos_token_id", cfg.eos_token_id)
    bos = gen.get("bos_token_id", cfg.bos_token_id)
    pad = gen.get("pad_token_id", cfg.pad_token_id)
    if pad is None:
        pad = eos[0] if isinstance(eos, list) else eos
    return {
        "model": {
            "bos_token_id": bos,
            "context_length": cfg.max_position_embeddings,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": static.decode if static else "model.onnx",
                "head_size": cfg.head_dim,
                "hidden_size": cfg.hidden_size,
                "inputs": {
                    **({"inputs_embeds": "inputs_embeds"} if static and static.host_embedding
                       else {"input_ids": "input_ids"}),
                    "attention_mask": "attention_mask",
                    **({} if shared_kv else {"position_ids": "position_ids"}),
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": cfg.num_attention_heads,
                "num_hidden_layers": cfg.num_hidden_layers,
                "num_key_value_heads": cfg.num_key_value_heads,
            },
            "eos_token_id": eos,
            "pad_token_id": pad,
            "type": cfg.model_type,
            "vocab_size": cfg.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": max_length,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": shared_kv,
            "repetition_penalty": 1.0,
            "temperature": gen.get("temperature", 1.0),
            "top_k": gen.get("top_k", 1),
            "top_p": gen.get("top_p", 1.0),
        },
    }


def _reference_loader(source, spec: GraphSpec):
    """Weights as the graph sees them, for --verify: int4 linears go through quantize→dequantize
    (the 8-bit lm_head is compared against its float weights; its error is far below int4's)."""
    if spec.precision != "int4":
        return source.load
    projections = ("_proj.weight",)

    def load(name: str) -> np.ndarray:
        if not name.endswith(projections):
            return source.load(name)
        return dequantize_blocks(quantized_linear(source, [name], 4, spec.block_size,
                                                  symmetric=spec.int4_symmetric))

    return load


@dataclass(frozen=True)
class ExportPlan:
    """What one export will write, decided and validated before anything is.

    Attributes:
        src, out: the checkpoint (HF directory or .gguf) and the model directory to write.
        source: the opened checkpoint (config, tensors, tokenizer files).
        spec: the graphs' target, precision and knobs (``spec.max_length``: tokens a KV
            buffer holds, the rotary table's length).
        gqa: GroupQueryAttention with shared KV buffers (else a growing cache; CoreML: False).
        w8a8_graph: also write ``model_w8a8.onnx``.
        prefill_chunk: CoreML: tokens a prefill graph call takes.
        kv_dtype: the KV cache's element type, fp32/fp16/int8 (export.kv_cache; cuda: the
            graphs' fp16 whatever this says).
    """

    src: Path
    out: Path
    source: HFSource | GGUFSource
    spec: GraphSpec
    gqa: bool
    w8a8_graph: bool
    prefill_chunk: int
    kv_dtype: str = "fp32"

    @property
    def cfg(self) -> LlamaConfig:
        return self.source.config


# GGUF types a --int4-symmetric export may re-quantize into 4-bit symmetric blocks: floats,
# and types of 6+ bits (a grid 4x finer than int4's or more: their rounding is at most an
# eighth of an int4 step). Q4_0 maps exactly (quant.without_zero_points).
SYMMETRIC_FROM = ("F32", "F16", "BF16", "Q4_0", "Q8_0", "Q6_K")


def check_symmetric_source(source: HFSource | GGUFSource, lm_head_bits: int) -> None:
    """--int4-symmetric on a GGUF: refuse tensors a 4-bit layer would re-quantize from another
    4- or 5-bit grid (Q4_1, Q5_0/Q5_1, the K-quants with per-block mins, IQ types).

    Re-rounding values already on one coarse grid onto a different coarse grid compounds
    the two errors (each up to half a step; a Q4_1 block's levels fall between the symmetric
    grid's), where the default scheme takes Q4_1 blocks exactly (float zero points) and
    requantizes K-quants onto a grid with the block's own range. 8-bit layers (the lm_head by
    default) may come from any type: their grid is 16x finer than int4's.

    Raises:
        ExportError: naming the flag, the tensors and their types.
    """
    if source.kind != "gguf":
        return
    cfg = source.config
    names = [n for n in cfg.expected_shapes() if n.endswith("_proj.weight")]
    if lm_head_bits == 4:
        names.append("model.embed_tokens.weight" if cfg.tie_word_embeddings
                     else "lm_head.weight")
    bad: dict[str, list[str]] = {}
    for name in names:
        qtype = source.ckpt.qtype(name)
        if qtype not in SYMMETRIC_FROM:
            bad.setdefault(qtype, []).append(name)
    if bad:
        found = "; ".join(f"{t}: {len(v)} tensors, e.g. {v[0]}" for t, v in sorted(bad.items()))
        raise ExportError(
            f"--int4-symmetric: {source.path} stores 4-bit layers as {found}. Re-quantizing "
            f"them into symmetric int4 blocks would compound two roundings; export without "
            f"--int4-symmetric (the default scheme maps Q4_1 blocks exactly), or from a float or "
            f"{'/'.join(SYMMETRIC_FROM[3:])} source")


def plan_export(src: Path, out: Path, *, precision: str, target: str, max_length: int | None,
                block_size: int, accuracy_level: int | None, force: bool, lm_head_bits: int,
                down_proj_accuracy_level: int | None, prefill_chunk: int,
                w8a8_graph: bool | None, kv_dtype: str | None = None,
                int4_symmetric: bool = False) -> ExportPlan:
    """Open and validate the source and settle every default (``export_model``'s arguments).

    Raises:
        ExportError: ``out`` exists without ``force``, the source is unusable, or the
            options contradict each other or the model.
    """
    if out.exists() and not force:
        raise ExportError(f"{out}: output directory exists (pass --force to replace it)")
    if int4_symmetric and precision != "int4":
        raise ExportError(f"--int4-symmetric is for --precision int4, not {precision}")
    source = open_source(src)
    cfg = source.config
    validate(source)
    if int4_symmetric:
        check_symmetric_source(source, lm_head_bits)
    if accuracy_level is None:
        accuracy_level = 4 if target == "cpu" else 0
    if down_proj_accuracy_level is None:
        # every MatMulNBits at the one level, as ORT GenAI's builder sets them: on the CPU
        # that makes the W8A8 graph row-invariant, which serve's default determinism needs
        # (graph.mlp weighs the quality)
        down_proj_accuracy_level = accuracy_level
    if w8a8_graph and target != "cpu":
        raise ExportError(f"--w8a8-graph is for --target cpu (int8 GEMMs), not {target}")
    if max_length is None and target == "coreml":
        max_length = min(cfg.max_position_embeddings, DEFAULT_MAX_LENGTH)
    max_length = int(max_length or cfg.max_position_embeddings)
    if max_length < 1:
        raise ExportError(f"--max-length {max_length}: must be positive")
    spec = GraphSpec(target=target, precision=precision, max_length=max_length,
                     block_size=block_size, accuracy_level=accuracy_level,
                     down_proj_accuracy_level=down_proj_accuracy_level,
                     lm_head_bits=lm_head_bits, int4_symmetric=int4_symmetric)
    gqa = uses_gqa(cfg, spec) and target != "coreml"
    # cpu GroupQueryAttention graphs get the attention pad (export.graph._attention_pad)
    spec = replace(spec, attention_pad=target == "cpu" and gqa)
    if w8a8_graph is None:  # the server runs it over shared KV buffers: GQA graphs only
        w8a8_graph = target == "cpu" and precision == "int4" and gqa
    if kv_dtype is None:
        # int8 where ORT's CPU GroupQueryAttention takes it and the weights are int4 already:
        # a quarter of fp32's KV at the same decode speed, within int4's own quality budget
        # (export.kv_cache). fp32/fp16 exports keep their precision's cache.
        kv_dtype = "int8" if target == "cpu" and precision == "int4" and gqa else "fp32"
    if kv_dtype not in KV_DTYPES:
        raise ExportError(f"--kv-dtype {kv_dtype!r}: choose one of {KV_DTYPES}")
    if kv_dtype != "fp32" and not (target == "cpu" and gqa):
        raise ExportError(f"--kv-dtype {kv_dtype} is for --target cpu GroupQueryAttention "
                          f"graphs (target {target})")
    return ExportPlan(src, out, source, spec, gqa, w8a8_graph, prefill_chunk, kv_dtype)


def export_model(src: Path | str, out: Path | str, *, precision: str = "int4", target: str = "cpu",
                 max_length: int | None = None, block_size: int = 32,
                 accuracy_level: int | None = None, verify: bool = False, force: bool = False,
                 progress: bool = True, lm_head_bits: int = 8,
                 down_proj_accuracy_level: int | None = None,
                 prefill_chunk: int = DEFAULT_CHUNK, w8a8_graph: bool | None = None,
                 kv_dtype: str | None = None, int4_symmetric: bool = False) -> ExportSummary:
    """Export ``src`` (HF SafeTensors dir or .gguf) into the model directory ``out``.

    Args:
        precision: fp32, fp16 or int4 (MatMulNBits, ``block_size`` values a block along K,
            ``accuracy_level`` 0-4; None: 4 on cpu, else 0; ``down_proj_accuracy_level`` for
            down_proj, None: ``accuracy_level``;
            ``lm_head_bits`` 8, 4 or 0 = float).
        int4_symmetric: every MatMulNBits symmetric, no zero_points input (ORT's implicit
            2^(bits-1); export.quant.quantize_blocks_symmetric), ORT GenAI's builder's
            scheme: no float-zero-point correction MatMul, fewer bytes a step. GGUF sources:
            Q4_0 / Q8_0 blocks map exactly; 4-bit layers stored in other 4-5-bit types are
            refused (check_symmetric_source).
        target: cpu/cuda: one GroupQueryAttention graph (fp16 I/O on cuda; cuda also writes
            ``model_decode_static.onnx``, the decode graph CUDA graphs capture). coreml: the
            static decode + prefill graphs of export/graph_coreml.py, ``prefill_chunk``
            tokens a prefill call.
        max_length: tokens the KV buffers hold (None: the model's context; coreml:
            min(context, 2048)).
        verify: compare the written graphs' logits with a NumPy reference (in the summary).
        force: replace an existing ``out``.
        progress: a progress bar on stderr.
        w8a8_graph: also write ``model_w8a8.onnx``, the same decoder with int8 GEMMs for
            the runs of many rows (linear.w8a8_linear), sharing the data file (None: on for
            cpu int4 GroupQueryAttention graphs).
        kv_dtype: the KV cache's element type on cpu GroupQueryAttention graphs: fp32, fp16
            or int8 (static per-channel scales calibrated on the written graph; see
            export.kv_cache for what each costs). None: int8 for cpu int4 exports, else fp32.
    Returns:
        What was written: sizes, parameters, seconds, the verify report.
    Raises:
        ExportError: bad input (the message names the file/field); nothing is left at
            ``out`` then — the directory is written to a temporary sibling and renamed at the
            end, so a failure at any point leaves no half-written model behind.
    """
    t0 = time.perf_counter()
    plan = plan_export(Path(src), Path(out), precision=precision, target=target,
                       max_length=max_length, block_size=block_size,
                       accuracy_level=accuracy_level, force=force, lm_head_bits=lm_head_bits,
                       down_proj_accuracy_level=down_proj_accuracy_level,
                       prefill_chunk=prefill_chunk, w8a8_graph=w8a8_graph,
                       kv_dtype=kv_dtype, int4_symmetric=int4_symmetric)
    tmp = _staging_dir(plan.out)
    try:
        tok = write_tokenizer_files(tmp, plan.source)  # first: calibration tokenizes with them
        static = write_graphs(tmp, plan, progress)
        write_configs(tmp, plan, tok, static)
        report = verify_written(tmp, plan, static) if verify else None
        write_manifest(tmp, plan, static, report)
        size = sum(f.stat().st_size for f in tmp.iterdir())
        replace_dir(tmp, plan.out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportSummary(plan.out, plan.src, precision, target, plan.cfg.num_params(),
                         time.perf_counter() - t0, size, plan.spec.max_length, report)


# -- the steps ---------------------------------------------------------------------------------


def _staging_dir(out: Path) -> Path:
    """A fresh temporary sibling of ``out`` to write into."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{time.time_ns() % 10**6}"
    tmp.mkdir()
    return tmp


def write_tokenizer_files(tmp: Path, source: HFSource | GGUFSource) -> dict:
    """The source's tokenizer files into ``tmp``; returns the JSON ones parsed, by name."""
    tok = source.tokenizer_files()
    for name, data in tok.items():
        (tmp / name).write_bytes(data)
    return {k: json.loads(v) for k, v in tok.items() if k.endswith(".json")}


def write_configs(tmp: Path, plan: ExportPlan, tok: dict, static: StaticGraphs | None) -> None:
    """config.json (the HF config) and genai_config.json (DESIGN.md's model directory)."""
    (tmp / "config.json").write_text(json.dumps(plan.cfg.to_hf(), indent=2))
    (tmp / "genai_config.json").write_text(json.dumps(
        genai_config(plan.cfg, plan.spec.max_length, tok, shared_kv=plan.gqa, static=static),
        indent=2))


def verify_written(tmp: Path, plan: ExportPlan, static: StaticGraphs | None):
    """--verify: the written graphs against the NumPy reference; raises ExportError past
    tolerance, else returns the report (export.verify / export.verify_static)."""
    if static is not None:
        from export.verify_static import verify_static_export

        return verify_static_export(tmp, plan.cfg, plan.source.load, static.manifest(),
                                    half=plan.spec.io_dtype == np.float16)
    from export.verify import verify_export

    return verify_export(tmp, plan.cfg, _reference_loader(plan.source, plan.spec),
                         quantized=plan.spec.precision == "int4")


def main_row_invariant(plan: ExportPlan, main_file: Path) -> bool:
    """Whether every op of the main graph computes a row without looking at the others: a
    cpu int4 GroupQueryAttention graph whose MatMulNBits are all at accuracy level 4 (int8
    compute, activations quantized per row and block; MLAS's one-row path of level 0 rounds
    otherwise), with the lm_head quantized and no float MatMul — i.e. no float-zero-point
    correction (affine blocks, GGUF Q4_1: an SGEMM whose one-row path is not checked to round
    as its many-row one). In practice: `--int4-symmetric` exports and GGUF Q4_0/Q8_0 ones."""
    spec = plan.spec
    if not (spec.target == "cpu" and spec.precision == "int4" and plan.gqa
            and spec.accuracy_level == 4 and spec.down_proj_accuracy_level in (4, None)
            and spec.lm_head_bits != 0):
        return False
    graph = onnx.load(str(main_file), load_external_data=False).graph
    return not any(n.op_type == "MatMul" for n in graph.node)


def write_manifest(tmp: Path, plan: ExportPlan, static: StaticGraphs | None, report) -> None:
    """llorch.json: the source (files and hashes), what the graphs are, the verify report."""
    spec, int4 = plan.spec, plan.spec.precision == "int4"
    manifest = {
        "format": 1,
        "exporter": f"llorch {__version__}",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": {
            "kind": plan.source.kind,
            "path": str(plan.src.resolve()),
            "files": [{"name": f.name, "bytes": f.stat().st_size, "sha256": _sha256(f)}
                      for f in plan.source.files],
        },
        "precision": spec.precision,
        "target": spec.target,
        "graph": static.manifest() if static else {
            "variant": "gqa-shared-kv" if plan.gqa else "standard-growing-kv",
            "logits_to_keep": True,
            "io_dtype": np.dtype(spec.io_dtype).name,
            "kv_dtype": (np.dtype(spec.io_dtype).name if plan.kv_dtype == "fp32"
                         else {"fp16": "float16", "int8": "int8"}[plan.kv_dtype]),
            "kv_cache_scales": {"kind": "per-channel", "statistic": "max |x|",
                                "margin": INT8_MARGIN, "calibration_tokens": CALIBRATION_TOKENS}
            if plan.kv_dtype == "int8" else None,
            "logits_dtype": "float32",
            "block_size": spec.block_size if int4 else None,
            "accuracy_level": spec.accuracy_level if int4 else None,
            "down_proj_accuracy_level": spec.down_proj_accuracy_level if int4 else None,
            "lm_head_bits": spec.lm_head_bits if int4 else None,
            # MatMulNBits without zero_points (implicit 2^(bits-1)), --int4-symmetric
            "int4_symmetric": spec.int4_symmetric if int4 else None,
            # the main graph computes each row the same whatever the other rows are (every
            # MatMulNBits at accuracy level 4, no float MatMul): serve decodes every step on it
            "row_invariant": main_row_invariant(plan, tmp / "model.onnx"),
            "gguf_blocks": plan.source.kind == "gguf" and int4,
            "w8a8": W8A8_FILE if plan.w8a8_graph else None,
            "w8a8_smoothing": {"alpha": SMOOTH_ALPHA, "statistic": "mean |x|",
                               "calibration_tokens": CALIBRATION_TOKENS}
            if plan.w8a8_graph else None,
            # every op of the W8A8 graph computes a row the same whatever the other rows are
            # (serve decodes every step on it: batch-invariant by construction)
            # (measured with its MatMulNBits lm_head at accuracy level 4)
            "w8a8_row_invariant": plan.w8a8_graph and spec.accuracy_level == 4
            and spec.lm_head_bits != 0 and spec.down_proj_accuracy_level in (4, None),
            "w8a8_down_proj_accuracy_level": spec.down_proj_accuracy_level
            if plan.w8a8_graph else None,
            "cuda_graph": CUDA_GRAPH_FILE if spec.target == "cuda" else None,
            # an `attention_pad` input (export.graph._attention_pad): with it set, every
            # position computes the same in a decode step, a verify call and a prefill chunk
            "attention_pad": spec.attention_pad,
        },
        "max_length": spec.max_length,
        "params": plan.cfg.num_params(),
        "verify": None if report is None else report.__dict__,
    }
    (tmp / "llorch.json").write_text(json.dumps(manifest, indent=2))


def replace_dir(tmp: Path, out: Path) -> None:
    """``tmp`` becomes ``out``; an existing ``out`` (--force) is swapped out, then dropped."""
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def write_graphs(tmp: Path, plan: ExportPlan, progress: bool) -> StaticGraphs | None:
    """The graph file(s); CoreML's static pair returns its description, the others None."""
    cfg, spec = plan.cfg, plan.spec
    bar = None
    if progress:
        from tqdm import tqdm

        n_graphs = 1 + plan.w8a8_graph + (spec.target == "cuda")
        # Says what it counts: a 30-layer model with two graphs is 60 layer builds.
        desc = (f"layers ({n_graphs} graphs x {cfg.num_hidden_layers})" if n_graphs > 1
                else "layers")
        bar = tqdm(total=cfg.num_hidden_layers * n_graphs, desc=desc, unit="layer",
                   file=sys.stderr, leave=False)
    if spec.target == "coreml":
        from export.graph_coreml import write_static_graphs

        try:
            return write_static_graphs(tmp, cfg, plan.source, spec, chunk=plan.prefill_chunk,
                                       on_layer=lambda i: bar.update(1) if bar else None)
        finally:
            if bar is not None:
                bar.close()
    graphs = [("model.onnx", spec)]
    # one calibration prefill must fit the KV buffers (a --max-length below 256 failed here)
    n_calib = min(CALIBRATION_TOKENS, spec.max_length)
    if plan.w8a8_graph:
        graphs.append((W8A8_FILE, replace(spec, w8a8=True)))
    if spec.target == "cuda":
        graphs.append((CUDA_GRAPH_FILE, replace(spec, static_decode=True)))
    g = None
    try:
        for filename, graph_spec in graphs:
            if graph_spec.w8a8:  # smoothed with ranges measured on the main graph just written
                main = onnx.load(str(tmp / "model.onnx"), load_external_data=False)
                act_mean = activation_means(tmp, "model.onnx", linear_inputs(main), cfg,
                                            calibration_ids(tmp, cfg.vocab_size, n_calib))
                graph_spec = replace(graph_spec, act_mean=act_mean)
            g = GraphBuilder(tmp / "model.onnx.data", share_with=g)
            try:
                build_decoder(g, cfg, plan.source, graph_spec,
                              on_layer=lambda i: bar.update(1) if bar else None)
            finally:
                g.close()
            onnx.save_model(g.model("llorch-llama"), str(tmp / filename))
    finally:
        if bar is not None:
            bar.close()
    if plan.kv_dtype != "fp32":  # calibrated on the fp32-KV main graph, then set on each
        scales = None
        if plan.kv_dtype == "int8":
            scales = int8_scales(kv_ranges(tmp, "model.onnx", cfg,
                                           calibration_ids(tmp, cfg.vocab_size, n_calib)))
        for filename, _ in graphs:
            model = onnx.load(str(tmp / filename), load_external_data=False)
            set_kv_dtype(model, plan.kv_dtype, scales)
            onnx.save_model(model, str(tmp / filename))
    return None
