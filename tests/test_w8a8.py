"""The W8A8 companion graph (`model_w8a8.onnx`): int8 weights per output channel, int8
activations per token, the main graph's data file, and how the Runtime routes runs to it.

Quality on the real model: test_default_model.py (perplexity); here: the answer to a real
question and top-1 agreement with the int4 graph, row independence inside a batch, the export
layout and flags.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from export.api import export_model
from export.config import ExportError
from serve.runtime import Runtime
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
    end_of_main = max(int(e["offset"]) + int(e["length"]) for e in main_ext.values())
    assert all(int(w8_ext[n]["offset"]) >= end_of_main for n in int8)


def test_flags_and_targets(tiny_hf_dir, tmp_path):
    off = export_model(tiny_hf_dir, tmp_path / "off", precision="int4", w8a8_graph=False,
                       progress=False).out
    assert not (off / "model_w8a8.onnx").exists()
    assert json.loads((off / "llorch.json").read_text())["graph"]["w8a8"] is None
    assert Runtime(off, w8a8=True).batch_session is None
    fp32 = export_model(tiny_hf_dir, tmp_path / "fp32", precision="fp32", progress=False).out
    assert not (fp32 / "model_w8a8.onnx").exists()  # opt-in for float exports
    with pytest.raises(ExportError, match="--w8a8-graph is for --target cpu"):
        export_model(tiny_hf_dir, tmp_path / "cuda", precision="fp16", target="cuda",
                     w8a8_graph=True, progress=False)
    assert not (tmp_path / "cuda").exists()


def test_runtime_routes_many_row_runs_to_the_w8a8_graph(tiny_int4):
    """Opt-in (`llorch serve --w8a8`): off by default, since it trades quality for speed."""
    assert Runtime(tiny_int4, max_batch=2).batch_session is None
    rt = Runtime(tiny_int4, max_batch=2, w8a8=True)
    assert rt.batch_session is not None
    assert rt._session_for(1) is rt.session
    assert rt._session_for(2) is rt.batch_session and rt._session_for(512) is rt.batch_session


def test_w8a8_rows_do_not_depend_on_their_batch_mates(tiny_int4):
    """Per-token activation scales and exact int32 accumulation: a sequence's logits in a
    batch of two equal those in a batch of three (other rows differ)."""
    rng = np.random.default_rng(0)
    prompts = [[int(t) for t in rng.integers(3, 1000, n)] for n in (5, 9, 7)]
    got = []
    for rows in (2, 3):
        rt = Runtime(tiny_int4, max_batch=3, w8a8=True)
        for j in range(rows):
            rt.prefill(j, prompts[j])
        steps = [rt.decode(list(range(rows)), [11 + j for j in range(rows)]) for _ in range(3)]
        got.append(np.stack([s[:2] for s in steps]))
    np.testing.assert_array_equal(got[0], got[1])


def test_default_model_answers_through_the_w8a8_graph(default_model_dir):
    """Prefill on the W8A8 graph, then greedy decode: batched (W8A8) and alone (int4)."""
    tok = Tokenizer.from_dir(default_model_dir)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True)
    ids = tok.encode(text)
    rt = Runtime(default_model_dir, max_batch=2, w8a8=True)
    ref = Runtime(default_model_dir, max_batch=2)
    a, b = rt.prefill(0, ids), ref.prefill(0, ids)
    cos = float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    assert cos > 0.99 and int(a.argmax()) == int(b.argmax())
    rt.copy_slot(0, 1)
    out, tokens = [], [int(a.argmax())] * 2
    for _ in range(12):
        out.append(tokens[0])
        tokens = [int(t) for t in rt.decode([0, 1], tokens).argmax(-1)]
    assert "Paris" in tok.decode(out)


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


def test_serve_flag_is_opt_in():
    import argparse
    from pathlib import Path

    from serve.options import add_arguments, options_from_args

    p = argparse.ArgumentParser()
    add_arguments(p)
    assert options_from_args(Path("m"), p.parse_args([])).w8a8 is False
    assert options_from_args(Path("m"), p.parse_args(["--w8a8"])).w8a8 is True


def test_w8a8_that_cannot_apply_says_so(tiny_hf_dir, tmp_path, caplog):
    """--w8a8 on an export without the graph is not silently ignored."""
    off = export_model(tiny_hf_dir, tmp_path / "off", precision="int4", w8a8_graph=False,
                       progress=False).out
    with caplog.at_level("WARNING", logger="llorch.runtime"):
        assert Runtime(off, w8a8=True).batch_session is None
    assert "--w8a8 has no effect here: the export has no W8A8 graph" in caplog.text
