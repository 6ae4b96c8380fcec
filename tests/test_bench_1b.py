"""The 1B-class bench rows' logic: weight bytes per token, the triad, the counts and selection.

Never builds the 1B model and never asserts a timing.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import report  # noqa: E402
from bench.bandwidth import measure_bandwidth  # noqa: E402
from bench.config import BenchConfig  # noqa: E402
from bench.model_1b import LLAMA_3_2_1B  # noqa: E402
from bench.suite import is_1b, select  # noqa: E402
from bench.weight_bytes import gguf_weight_bytes, kv_bytes_per_token, onnx_weight_bytes  # noqa: E402


def _graph(path: Path, *, tied: bool) -> dict[str, int]:
    """embed [V, H] fp32 ─► Gather ─► SimplifiedLayerNorm(norm [H]) ─► MatMulNBits(q, scales,
    zp) ─► (tied: MatMul(embed^T)); returns each initializer's bytes."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    v, h, n, bs = 10, 64, 32, 32
    blocks = h // bs
    arrays = {
        "embed": np.zeros((v, h), np.float32),
        "norm": np.ones(h, np.float32),
        "q": np.zeros((n, blocks, bs // 2), np.uint8),
        "scales": np.ones(n * blocks, np.float32),
        "zp": np.zeros(n * ((blocks + 1) // 2), np.uint8),
        "embed_t": np.zeros((h, v), np.float32),
    }
    nodes = [
        helper.make_node("Gather", ["embed", "ids"], ["x"]),
        helper.make_node("SimplifiedLayerNormalization", ["x", "norm"], ["xn"], axis=-1,
                         epsilon=1e-5),
        helper.make_node("MatMulNBits", ["xn", "q", "scales", "zp"], ["y"], domain="com.microsoft",
                         K=h, N=n, bits=4, block_size=bs),
    ]
    if tied:  # the same table, multiplied: a tied lm_head
        nodes.append(helper.make_node("MatMul", ["xn", "embed_t"], ["logits"]))
        nodes.append(helper.make_node("MatMul", ["xn", "embed"], ["logits2"]))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(a, name) for name, a in arrays.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    onnx.save(model, str(path), save_as_external_data=True, location="g.onnx.data",
              size_threshold=0)
    return {name: a.nbytes for name, a in arrays.items()}


def test_onnx_bytes_count_matmul_inputs_in_full_and_one_row_of_a_lookup(tmp_path):
    sizes = _graph(tmp_path / "g.onnx", tied=False)
    wb = onnx_weight_bytes(tmp_path / "g.onnx")
    assert wb["parts"]["matmul"] == sizes["q"] + sizes["scales"] + sizes["zp"]
    assert wb["parts"]["lookup"] == 64 * 4  # one row of the [10, 64] fp32 embedding
    # embed_t feeds nothing here: counted with the norm as "other", in full
    assert wb["parts"]["other"] == sizes["norm"] + sizes["embed_t"]
    assert wb["total"] == sum(wb["parts"].values())


def test_onnx_bytes_count_a_tied_table_in_full(tmp_path):
    sizes = _graph(tmp_path / "g.onnx", tied=True)
    wb = onnx_weight_bytes(tmp_path / "g.onnx")
    assert "lookup" not in wb["parts"]
    assert wb["parts"]["matmul"] == sum(sizes[k] for k in ("q", "scales", "zp", "embed", "embed_t"))


def test_gguf_bytes_read_token_embd_in_full_only_when_it_is_the_output(tmp_path):
    import gguf

    def write(path: Path, *, tied: bool) -> None:
        w = gguf.GGUFWriter(str(path), "llama")
        w.add_tensor("token_embd.weight", np.zeros((10, 64), np.float32))  # [rows, cols]
        w.add_tensor("blk.0.attn_norm.weight", np.ones(64, np.float32))
        w.add_tensor("blk.0.ffn_up.weight", np.zeros((32, 64), np.float16))
        if not tied:
            w.add_tensor("output.weight", np.zeros((10, 64), np.float16))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    write(tmp_path / "tied.gguf", tied=True)
    write(tmp_path / "untied.gguf", tied=False)
    tied, untied = gguf_weight_bytes(tmp_path / "tied.gguf"), gguf_weight_bytes(tmp_path / "untied.gguf")
    assert tied["parts"] == {"matmul": 10 * 64 * 4 + 32 * 64 * 2, "other": 64 * 4}
    assert untied["parts"] == {"matmul": 32 * 64 * 2 + 10 * 64 * 2, "other": 64 * 4,
                               "lookup": 64 * 4}


def test_kv_bytes_per_token_of_the_1b_shapes():
    # 16 layers x (K + V) x 8 KV heads x 64 x 4 bytes
    assert kv_bytes_per_token(LLAMA_3_2_1B, 4) == 65536


def test_1b_shapes_are_llama_3_2_1b_with_smollm2s_vocabulary():
    c = LLAMA_3_2_1B
    h, i, layers, v = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], 49152
    kv = c["num_key_value_heads"] * c["head_dim"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    # what `llorch export` reported for the checkpoint (tied: one embedding table)
    assert v * h + layers * per_layer + h == 1_073_809_408
    assert c["tie_word_embeddings"] and c["rope_scaling"]["rope_type"] == "llama3"


def test_triad_measures_a_positive_bandwidth():
    r = measure_bandwidth(24, threads=2, repeats=1)  # 3 x 8 MB: a code path, not a figure
    assert r["triad_gbps"] > 0 and r["read_gbps"] > 0
    assert r["bytes_per_array"] == 8_000_000


def test_1b_group_selects_its_rows_with_their_own_counts():
    entries, export = select(["1b"])
    assert {e.key for e in entries} >= {"llorch-1b-int4", "genai-1b-int4", "llamacpp-1b-q4_0",
                                         "llorch-1b-concurrency"}
    assert all(is_1b(e) for e in entries) and not export
    full, quick = BenchConfig().for_1b(), BenchConfig.quick_config().for_1b()
    assert full.ttft_lengths == (1000,) and full.concurrency == (16,)
    assert full.max_context <= 2048  # the llorch export's --max-length
    assert quick.quick and quick.stream_prompt == BenchConfig.quick_config().stream_prompt


def test_1b_table_divides_bandwidth_by_bytes():
    results = {
        "config": BenchConfig().to_dict(), "config_1b": BenchConfig().for_1b().to_dict(),
        "one_b": {"bandwidth": {"triad_gbps": 10.0, "read_gbps": 12.0, "threads": 2,
                                "bytes_per_array": 1, "repeats": 5},
                  "weight_bytes": {"1b-int4": {"total": 500_000_000, "file": "x/model.onnx",
                                               "parts": {"matmul": 500_000_000}}}},
        "entries": {
            "llorch-1b-int4": {"status": "ok", "group": "1b", "model": "1b-int4", "label": "L",
                               "decode_tps": {"128": {"median": 15.0}},
                               "ttft_s": {"1000": {"median": 4.0}}, "peak_rss_mb": 900.0},
            "llorch-1b-concurrency": {"status": "ok", "group": "1b", "model": "1b-int4",
                                      "concurrency": {"16": {"aggregate_tps": {"median": 60.0}}}},
        },
    }
    (row,) = report.one_b_rows(results)
    assert row["limit_tps"] == pytest.approx(20.0)
    assert row["pct_of_limit"] == pytest.approx(75.0)
    assert row["aggregate_tps"] == 60.0 and row["streams"] == "16"
    assert "75%" in report.one_b_section(results)


def test_static_batch_figures_split_prefill_from_decode():
    from bench.peers.genai import batch_figures

    # 16 rows x 32 tokens: first step (prefill) at 10 s, the other 31 steps take 5 s more
    fig = batch_figures([{"wall": 15.0, "first": 10.0, "tokens": 512}], 16)
    assert fig["aggregate_tps"]["median"] == pytest.approx(512 / 15)
    assert fig["decode_only_tps"]["median"] == pytest.approx(16 * 31 / 5)
    assert fig["tokens_per_stream"] == 32


def test_prompts_cover_every_entrys_counts(default_model_dir):
    from bench.harness import make_prompts

    base = BenchConfig.quick_config()
    prompts = make_prompts(default_model_dir, [base, base.for_1b()])
    for c in (base, base.for_1b()):
        for n in (*c.ttft_lengths, *c.decode_lengths):
            assert len(prompts["prompts"][str(n)]) >= c.warmup + c.runs(n)
        assert len(prompts["stream_prompts"]) >= c.warmup + c.stream_rounds
        assert all(len(r) >= max(c.concurrency) for r in prompts["stream_prompts"])
