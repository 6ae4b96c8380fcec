"""The W8A8 companion graph (`model_w8a8.onnx`): int8 weights per output channel, int8
activations per token smoothed with ranges calibrated on the main graph, the main graph's
data file, and how the Runtime routes runs to it.

Quality on the real model: test_default_model.py (perplexity); here: the answer to a real
question and top-1 agreement with the int4 graph, row independence inside a batch, the export
layout and flags.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest

from export.api import export_model
from export.config import ExportError
from export.linear import SMOOTH_ALPHA
from serve.runtime import RuntimeOptions, open_runtime
from serve.tokenizer import Tokenizer


def _external(model: onnx.ModelProto) -> dict[str, dict[str, str]]:
    return {t.name: {e.key: e.value for e in t.external_data}
            for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}


@pytest.fixture(scope="module")
def tiny_int4(tiny_hf_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("w8a8") / "tiny-int4"
    export_model(tiny_hf_dir, out, precision="int4", progress=False)
    return out


def test_int4_cpu_export_writes_the_w8a8_graph_into_the_same_data_file(tiny_int4):
    files = sorted(p.name for p in tiny_int4.iterdir())
    assert "model_w8a8.onnx" in files and "model_w8a8.onnx.data" not in files
    graph = json.loads((tiny_int4 / "llorch.json").read_text())["graph"]
    assert graph["w8a8"] == "model_w8a8.onnx"
    assert graph["w8a8_smoothing"]["alpha"] == SMOOTH_ALPHA
    main = onnx.load(tiny_int4 / "model.onnx", load_external_data=False)
    w8 = onnx.load(tiny_int4 / "model_w8a8.onnx", load_external_data=False)
    main_ext, w8_ext = _external(main), _external(w8)
    assert {e["location"] for e in w8_ext.values()} == {"model.onnx.data"}
    shared = set(main_ext) & set(w8_ext)
    # the embedding, norms, rotary caches, down_proj and lm_head are written once
    assert "model.embed_tokens.weight" in shared and "lm_head.qweight" in shared
    for name in shared:
        assert main_ext[name] == w8_ext[name], name
    ops = {n.op_type for n in w8.graph.node}
    assert "MatMulIntegerToFloat" in ops and "MatMulNBits" in ops  # down_proj, lm_head
    # the int8 weights are new tensors, appended after the main graph's
    int8 = [n for n in w8_ext if n.endswith(".weight_int8")]
    assert len(int8) == 3 * 2  # qkv, o, gate_up per layer
    smooth = [n for n in w8.graph.node if n.name.endswith("/w8a8/Smooth")]
    assert len(smooth) == len(int8)  # every int8 GEMM's input is smoothed first
    assert not any(n.name.startswith(".calibrate") for n in tiny_int4.iterdir())
    end_of_main = max(int(e["offset"]) + int(e["length"]) for e in main_ext.values())
    assert all(int(w8_ext[n]["offset"]) >= end_of_main for n in int8)


def test_flags_and_targets(tiny_hf_dir, tmp_path):
    off = export_model(tiny_hf_dir, tmp_path / "off", precision="int4", w8a8_graph=False,
                       progress=False).out
    assert not (off / "model_w8a8.onnx").exists()
    assert json.loads((off / "llorch.json").read_text())["graph"]["w8a8"] is None
    assert open_runtime(off, RuntimeOptions(w8a8=True)).w8a8_session is None
    fp32 = export_model(tiny_hf_dir, tmp_path / "fp32", precision="fp32", progress=False).out
    assert not (fp32 / "model_w8a8.onnx").exists()  # opt-in for float exports
    with pytest.raises(ExportError, match="--w8a8-graph is for --target cpu"):
        export_model(tiny_hf_dir, tmp_path / "cuda", precision="fp16", target="cuda",
                     w8a8_graph=True, progress=False)
    assert not (tmp_path / "cuda").exists()


def test_runtime_routes_runs_to_the_w8a8_graph(tiny_int4, tiny_hf_dir, tmp_path):
    """Runtime's own default is off (parity tests compare the main graph); `llorch serve`
    defaults to auto. all/auto: every prefill and every decode step on an export whose W8A8
    graph is row-invariant (the default: down_proj at accuracy level 4,
    graph.w8a8_row_invariant), unless batch_invariant is False; on a level-0 export, or with
    batch_invariant False, a lone sequence decodes on the int4 graph; prefill: prefill only
    (one token too, so a prefix-cache hit sees the KV a full prefill makes), batch-invariant
    where the main graph is row-invariant itself (graph.row_invariant: no float-zero-point
    correction, `--int4-symmetric`), as off is there."""
    from serve.fingerprint import batch_invariance
    from serve.options import ServeOptions

    def graph(d):
        return json.loads((d / "llorch.json").read_text())["graph"]

    assert open_runtime(tiny_int4, RuntimeOptions(max_batch=2)).w8a8_session is None
    corr = tiny_int4  # affine blocks: the main graph has the correction MatMul
    assert graph(corr)["w8a8_row_invariant"] and graph(corr)["row_invariant"] is False
    sym = tmp_path / "symmetric"
    export_model(tiny_hf_dir, sym, precision="int4", int4_symmetric=True, progress=False)
    assert graph(sym)["w8a8_row_invariant"] and graph(sym)["row_invariant"] is True
    level0 = tmp_path / "down-proj-level-0"
    export_model(tiny_hf_dir, level0, precision="int4", down_proj_accuracy_level=0, progress=False)
    assert not graph(level0)["w8a8_row_invariant"] and not graph(level0)["row_invariant"]
    for invariant in (corr, sym):
        for mode in (True, "all", "auto"):
            for kw in ({}, {"batch_invariant": None}, {"batch_invariant": True}):
                rt = open_runtime(invariant, RuntimeOptions(max_batch=2, w8a8=mode, **kw))
                assert rt.w8a8 == "all" and rt.w8a8_session is not None and rt.batch_invariant
                assert rt._session_for(1) is rt.w8a8_session
    for mode in (True, "all", "auto"):
        # a level-0 down_proj, or batch invariance turned off: a lone sequence decodes on int4
        for d, kw in ((level0, {"batch_invariant": True}), (level0, {}),
                      (corr, {"batch_invariant": False}), (sym, {"batch_invariant": False})):
            rt = open_runtime(d, RuntimeOptions(max_batch=2, w8a8=mode, **kw))
            assert rt._session_for(1) is rt.session and not rt.batch_invariant
        assert rt._session_for(1, prefill=True) is rt.w8a8_session
        assert rt._session_for(2) is rt.w8a8_session and rt._session_for(512) is rt.w8a8_session
    old = tmp_path / "older-export"  # before graph.w8a8_row_invariant and graph.row_invariant
    shutil.copytree(sym, old)
    meta = json.loads((old / "llorch.json").read_text())
    del meta["graph"]["w8a8_row_invariant"], meta["graph"]["row_invariant"]
    (old / "llorch.json").write_text(json.dumps(meta))
    rt = open_runtime(old, RuntimeOptions(max_batch=2, w8a8="auto", batch_invariant=True))
    assert rt._session_for(1) is rt.session and not rt.batch_invariant
    assert rt._session_for(2) is rt.w8a8_session
    # prefill: the W8A8 graph prefills, every decode step runs on the main graph, which is
    # batch-invariant where that graph is row-invariant; off: the main graph only
    for d in (corr, sym):
        rt = open_runtime(d, RuntimeOptions(max_batch=2, w8a8="prefill"))
        assert rt._session_for(1, prefill=True) is rt.w8a8_session
        assert rt._session_for(2) is rt.session and rt._session_for(16) is rt.session
        assert rt.batch_invariant is (d == sym)
        rt = open_runtime(d, RuntimeOptions(max_batch=2, w8a8="off"))
        assert rt.w8a8_session is None and rt.batch_invariant is (d == sym)
        assert not open_runtime(d, RuntimeOptions(max_batch=2, w8a8="prefill",
                                                  batch_invariant=False)).batch_invariant
    no_w8a8 = tmp_path / "symmetric-no-w8a8"
    export_model(tiny_hf_dir, no_w8a8, precision="int4", int4_symmetric=True, w8a8_graph=False,
                 progress=False)
    for mode in ("auto", "all", "off"):
        assert open_runtime(no_w8a8, RuntimeOptions(max_batch=2, w8a8=mode)).batch_invariant
    # the fingerprint's mode follows what the runtime does
    for w8a8 in ("off", "prefill", "all", "auto"):
        assert batch_invariance(ServeOptions(sym, w8a8=w8a8)) == "rows"
        assert batch_invariance(ServeOptions(no_w8a8, w8a8=w8a8)) == "rows"
        assert batch_invariance(ServeOptions(corr, w8a8=w8a8)) == (
            "rows" if w8a8 in ("all", "auto") else "off")
    assert batch_invariance(ServeOptions(sym, batch_invariant=False)) == "off"
    with pytest.raises(ValueError, match="w8a8 must be one of"):
        open_runtime(tiny_int4, RuntimeOptions(w8a8="yes"))


def test_smoothing_changes_the_quantization_not_the_math(tiny_int4):
    """x/s @ (s·W) = x @ W: smoothing only moves the activations' outliers into the weights,
    and calibration measured every linear's input, one mean |x| per input channel."""
    from export.calibrate import activation_means, calibration_ids
    from export.linear import smoothing_scales

    cfg = json.loads((tiny_int4 / "config.json").read_text())
    from export.config import LlamaConfig

    cfg = LlamaConfig.from_hf(cfg)
    main = onnx.load(tiny_int4 / "model.onnx", load_external_data=False)
    inputs = {n.name.rsplit("/", 1)[0]: n.input[0] for n in main.graph.node
              if n.op_type == "MatMulNBits" and "/lm_head" not in n.name}
    ids = calibration_ids(tiny_int4, cfg.vocab_size, n=32)
    assert len(ids) == 32 and max(ids) < cfg.vocab_size
    means = activation_means(tiny_int4, "model.onnx", inputs, cfg, ids)
    assert set(means) == set(inputs) and len(means) == 4 * cfg.num_hidden_layers
    qkv = means["/model/layers.0/self_attn/qkv_proj"]
    assert qkv.shape == (cfg.hidden_size,) and (qkv > 0).all()
    rng = np.random.default_rng(1)
    act = np.abs(rng.standard_normal(64)) * np.where(np.arange(64) % 9 == 0, 50, 1)
    wt = rng.standard_normal((64, 16)).astype(np.float32)
    s = smoothing_scales(act, wt)
    x = rng.standard_normal((3, 64)).astype(np.float32) * act
    np.testing.assert_allclose((x / s) @ (wt * s[:, None]), x @ wt, rtol=1e-4, atol=1e-4)
    # the outlier channels shrink relative to the others
    assert (x / s)[:, ::9].std() / (x / s).std() < x[:, ::9].std() / x.std()


def test_w8a8_rows_do_not_depend_on_their_batch_mates(tiny_int4):
    """Per-token activation scales and exact int32 accumulation: a sequence's logits in a
    batch of two equal those in a batch of three (other rows differ)."""
    rng = np.random.default_rng(0)
    prompts = [[int(t) for t in rng.integers(3, 1000, n)] for n in (5, 9, 7)]
    got = []
    for rows in (2, 3):
        rt = open_runtime(tiny_int4, RuntimeOptions(max_batch=3, w8a8=True))
        for j in range(rows):
            rt.prefill(j, prompts[j])
        steps = [rt.decode(list(range(rows)), [11 + j for j in range(rows)]) for _ in range(3)]
        got.append(np.stack([s[:2] for s in steps]))
    np.testing.assert_array_equal(got[0], got[1])


def test_default_model_answers_through_the_w8a8_graph(default_model_dir):
    """Prefill on the W8A8 graph, then greedy decode: batched (W8A8) and alone (int4). Japan,
    not France: fp32 puts "The" 2.5 logits above the next first token here, 0.08 for France,
    a near tie the two graphs decide differently."""
    tok = Tokenizer.from_dir(default_model_dir)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of Japan?"}],
        add_generation_prompt=True)
    ids = tok.encode(text)
    rt = open_runtime(default_model_dir, RuntimeOptions(max_batch=2, w8a8=True))
    ref = open_runtime(default_model_dir, RuntimeOptions(max_batch=2))
    a, b = rt.prefill(0, ids), ref.prefill(0, ids)
    cos = float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    assert cos > 0.99 and int(a.argmax()) == int(b.argmax())
    rt.copy_slot(0, 1)
    out, tokens = [], [int(a.argmax())] * 2
    for _ in range(12):
        out.append(tokens[0])
        tokens = [int(t) for t in rt.decode([0, 1], tokens).argmax(-1)]
    assert "Tokyo" in tok.decode(out)


def test_no_w8a8_graph_for_growing_kv_exports(tmp_path, default_hf_dir):
    """Head sizes CPU GroupQueryAttention rejects get the standard-op graph with a growing
    cache, which the server runs one sequence at a time: no W8A8 companion by default."""
    from conftest import TINY_CONFIG, write_random_llama

    cfg = {**TINY_CONFIG, "hidden_size": 48, "num_attention_heads": 2, "num_key_value_heads": 1,
           "head_dim": 24}
    hf = write_random_llama(tmp_path / "hf", cfg, default_hf_dir)
    out = export_model(hf, tmp_path / "int4", precision="int4", progress=False).out
    graph = json.loads((out / "llorch.json").read_text())["graph"]
    assert graph["variant"] == "standard-growing-kv" and graph["w8a8"] is None
    assert not (out / "model_w8a8.onnx").exists()


def test_serve_flag():
    import argparse
    from pathlib import Path

    from serve.options import add_arguments, options_from_args

    p = argparse.ArgumentParser()
    add_arguments(p)

    def mode(*argv):
        return options_from_args(Path("m"), p.parse_args(list(argv))).w8a8

    assert mode() == "auto" and mode("--w8a8") == "all"
    assert mode("--w8a8", "off") == "off" and mode("--w8a8", "prefill") == "prefill"
    with pytest.raises(SystemExit):
        p.parse_args(["--w8a8", "sometimes"])


def test_w8a8_that_cannot_apply_says_so(tiny_hf_dir, tmp_path, caplog):
    """--w8a8 on an export without the graph is not silently ignored."""
    off = export_model(tiny_hf_dir, tmp_path / "off", precision="int4", w8a8_graph=False,
                       progress=False).out
    with caplog.at_level("WARNING", logger="llorch.runtime"):
        assert open_runtime(off, RuntimeOptions(w8a8="auto")).w8a8_session is None
        assert not caplog.text  # the default stays quiet where it cannot apply
        assert open_runtime(off, RuntimeOptions(w8a8=True)).w8a8_session is None
    assert "--w8a8 all has no effect here: the export has no W8A8 graph" in caplog.text
