"""`llorch export --int4-symmetric`: symmetric int4/int8 blocks, MatMulNBits without zero points.

The blocks equal ONNX Runtime's own symmetric quantizer's bit for bit; ORT's kernel (no
zero_points input: 2^(bits-1)) computes x @ dequantize(W).T; a tiny model exported so loads,
runs, keeps every MatMulNBits at accuracy level 4 without a zero-point input, and stays within
a rounding step of its float weights; GGUF Q4_0 blocks pass through exactly, GGUF types that
would be rounded twice are refused naming the flag.
"""

from __future__ import annotations

import json
import subprocess
import sys

import gguf
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from _gguf_tiny import random_state, spm_vocab, tiny_config, write_gguf
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from onnx import TensorProto, helper, numpy_helper

from export.api import export_model
from export.config import ExportError
from export.gguf_reader import GGUFCheckpoint
from export.quant import (
    QuantizedWeight,
    dequantize_blocks,
    from_gguf_blocks,
    quantize_blocks_symmetric,
    unpack_nibbles,
    without_zero_points,
)
from export.safetensors_reader import SafeTensorsCheckpoint
from export.verify import onnx_logits

weights = arrays(np.float32, st.tuples(st.integers(1, 6), st.integers(1, 100)),
                 elements=st.floats(-1e4, 1e4, width=32, allow_subnormal=False))


def _steps(qw: QuantizedWeight) -> np.ndarray:
    return np.abs(np.repeat(qw.scales.reshape(qw.n, -1), qw.block_size, axis=1)[:, : qw.k])


@settings(max_examples=60, deadline=None)
@given(w=weights, bits=st.sampled_from([4, 8]), block_size=st.sampled_from([16, 32, 64]))
def test_symmetric_round_trip(w, bits, block_size):
    """Round to nearest on a grid of 2^bits levels: half a step, except the clamped top level
    (a value near -m, m the block's largest-magnitude value) which may miss by one step; m
    itself is exact."""
    qw = quantize_blocks_symmetric(w, bits=bits, block_size=block_size)
    assert qw.zero_points is None and qw.symmetric
    assert (qw.n, qw.k, qw.bits, qw.block_size) == (*w.shape, bits, block_size)
    back = dequantize_blocks(qw)
    step = _steps(qw)
    slack = 1e-6 * np.abs(w) + 1e-30
    err = np.abs(back - w)
    assert (err <= step * (1 + 1e-5) + slack).all()
    q = (unpack_nibbles(qw.packed) if bits == 4 else qw.packed).reshape(qw.n, -1)[:, : qw.k]
    inner = q < (1 << bits) - 1  # not on the clamped top level
    assert (err[inner] <= step[inner] / 2 * (1 + 1e-5) + slack[inner]).all()
    blocks = np.pad(w, ((0, 0), (0, -w.shape[1] % block_size))).reshape(w.shape[0], -1,
                                                                         block_size)
    at = np.abs(blocks).argmax(-1)
    rows, cols = np.nonzero(np.ones(at.shape, bool))
    k = cols * block_size + at[rows, cols]
    keep = k < w.shape[1]
    np.testing.assert_allclose(back[rows[keep], k[keep]], w[rows[keep], k[keep]], rtol=1e-6)


@pytest.mark.parametrize("bits", [4, 8])
def test_blocks_equal_onnxruntimes_symmetric_quantizer(bits):
    """The very blocks ORT's MatMulNBitsQuantizer(is_symmetric=True) writes (what ORT GenAI's
    builder emits), scales and packed values bit for bit."""
    from onnxruntime.capi import _pybind_state as C

    n, k, bs = 24, 96, 32
    w = np.random.default_rng(bits).standard_normal((n, k)).astype(np.float32)
    w[3, :32] = 0.0  # a block of zeros
    kb = k // bs
    packed = np.zeros((n, kb, bs * bits // 8), np.uint8)
    scales = np.zeros(n * kb, np.float32)
    zp = np.zeros(n * kb, np.uint8)
    quantize = C.quantize_matmul_4bits if bits == 4 else C.quantize_matmul_8bits
    quantize(packed, np.ascontiguousarray(w.T), scales, zp, bs, n, k, True)
    ours = quantize_blocks_symmetric(w, bits=bits, block_size=bs)
    np.testing.assert_array_equal(ours.packed, packed)
    np.testing.assert_array_equal(ours.scales.reshape(-1), scales)


def _matmul_nbits_no_zp(x: np.ndarray, qw: QuantizedWeight, accuracy_level: int) -> np.ndarray:
    node = helper.make_node("MatMulNBits", ["A", "B", "scales"], ["Y"], domain="com.microsoft",
                            K=qw.k, N=qw.n, bits=qw.bits, block_size=qw.block_size,
                            accuracy_level=accuracy_level)
    graph = helper.make_graph(
        [node], "sym", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, qw.k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, qw.n])],
        [numpy_helper.from_array(qw.packed, "B"),
         numpy_helper.from_array(qw.scales.reshape(-1), "scales")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid("com.microsoft", 1)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"A": x})[0]


@pytest.mark.parametrize("bits,k", [(4, 64), (4, 96), (4, 40), (8, 64)])
def test_matmulnbits_without_zero_points_is_symmetric(bits, k):
    """No zero_points input: ORT dequantizes as scale * (q - 2^(bits-1)), what
    dequantize_blocks says; at accuracy level 4 (int8 activations) within ~1%."""
    w = np.random.default_rng(k).standard_normal((24, k)).astype(np.float32)
    qw = quantize_blocks_symmetric(w, bits=bits)
    x = np.random.default_rng(1).standard_normal((5, k)).astype(np.float32)
    want = x @ dequantize_blocks(qw).T
    np.testing.assert_allclose(_matmul_nbits_no_zp(x, qw, 0), want, rtol=1e-4,
                               atol=1e-4 * np.abs(want).max())
    assert np.abs(_matmul_nbits_no_zp(x, qw, 4) - want).max() <= 0.02 * np.abs(want).max()


def test_gguf_q4_0_and_q8_0_blocks_drop_their_zero_points_exactly():
    rng = np.random.default_rng(3)
    for qtype, nbytes in (("Q4_0", 18), ("Q8_0", 34)):
        blocks = rng.integers(0, 256, (4, 2, nbytes), dtype=np.uint8)
        blocks[..., :2] = np.frombuffer(np.float16([0.01] * 8).tobytes(), np.uint8).reshape(4, 2, 2)
        qw = from_gguf_blocks(qtype, blocks, k=64)
        sym = without_zero_points(qw)
        assert sym is not None and sym.zero_points is None
        np.testing.assert_array_equal(dequantize_blocks(sym), dequantize_blocks(qw))
    affine = from_gguf_blocks("Q4_1", rng.integers(0, 256, (4, 2, 20), dtype=np.uint8), k=64)
    assert without_zero_points(affine) is None


# -- a tiny model, exported ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def sym_export(tmp_path_factory, tiny_hf_dir):
    """--verify: the graphs' logits against the NumPy reference on the dequantized weights."""
    out = tmp_path_factory.mktemp("sym") / "tiny-sym"
    export_model(tiny_hf_dir, out, precision="int4", int4_symmetric=True, verify=True,
                 progress=False)
    return out


@pytest.fixture(scope="module")
def sym_lm4_export(tmp_path_factory, tiny_hf_dir):
    """With a 4-bit lm_head (--verify compares the lm_head with its float weights, and a
    random tiny model's near-tied logits then flip: checked against fp32 below instead)."""
    out = tmp_path_factory.mktemp("sym") / "tiny-sym-lm4"
    export_model(tiny_hf_dir, out, precision="int4", int4_symmetric=True, lm_head_bits=4,
                 progress=False)
    return out


def _nbits_nodes(model_path):
    model = onnx.load(str(model_path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return [(n, {a.name: helper.get_attribute_value(a) for a in n.attribute}, inits)
            for n in model.graph.node if n.op_type == "MatMulNBits"]


@pytest.mark.parametrize("lm_head_bits", [8, 4])
def test_every_matmulnbits_is_symmetric_at_accuracy_level_4(sym_export, sym_lm4_export,
                                                            lm_head_bits):
    out = sym_export if lm_head_bits == 8 else sym_lm4_export
    graph = json.loads((out / "llorch.json").read_text())["graph"]
    assert graph["int4_symmetric"] is True and graph["down_proj_accuracy_level"] == 4
    assert graph["lm_head_bits"] == lm_head_bits
    for filename in ("model.onnx", "model_w8a8.onnx"):
        nodes = _nbits_nodes(out / filename)
        assert nodes
        for node, attrs, _ in nodes:
            assert len(node.input) == 3, f"{node.name} has a zero-point input"
            assert attrs["accuracy_level"] == 4, node.name
        head = [a for n, a, _ in nodes if n.name.startswith("/lm_head")]
        assert [a["bits"] for a in head] == [lm_head_bits]
    names = [n.name for n in onnx.load(str(out / "model.onnx"),
                                       load_external_data=False).graph.node]
    assert not [n for n in names if "zero_point_correction" in n]


def test_exported_weights_within_a_step_of_the_float_ones(sym_export, tiny_hf_dir):
    ckpt = SafeTensorsCheckpoint(tiny_hf_dir)
    nodes = {n.name: (n, a, i) for n, a, i in _nbits_nodes(sym_export / "model.onnx")}
    node, attrs, inits = nodes["/model/layers.0/mlp/down_proj/MatMulNBits"]
    qw = QuantizedWeight(inits[node.input[1]], inits[node.input[2]].reshape(attrs["N"], -1),
                         None, attrs["bits"], attrs["block_size"], attrs["K"], attrs["N"])
    w = ckpt.load("model.layers.0.mlp.down_proj.weight")
    back = dequantize_blocks(qw)
    assert (np.abs(back - w) <= _steps(qw) * (1 + 1e-5) + 1e-7).all()
    rms = np.sqrt(np.mean((back - w) ** 2))
    assert rms < 0.35 * _steps(qw).mean()  # a rounding error, ~ step / sqrt(12) (+ clamps)


@pytest.mark.parametrize("lm_head_bits", [8, 4])
def test_symmetric_export_runs_close_to_fp32(sym_export, sym_lm4_export, tiny_model_dir,
                                             lm_head_bits):
    """The logits through ORT stay near the fp32 export's (cosine per position)."""
    from export.config import LlamaConfig

    out = sym_export if lm_head_bits == 8 else sym_lm4_export
    cfg = LlamaConfig.from_dir(tiny_model_dir)
    ids = [5, 17, 300, 42, 7, 99, 1000, 3]
    ref = onnx_logits(tiny_model_dir, cfg, ids, prefill=len(ids))
    got = onnx_logits(out, cfg, ids, prefill=len(ids))
    cos = (ref * got).sum(-1) / np.linalg.norm(ref, axis=-1) / np.linalg.norm(got, axis=-1)
    print(f"lm_head {lm_head_bits} bits: cosine to fp32 logits min {cos.min():.4f}")
    assert cos.min() > 0.96  # the default (affine) scheme: 0.972 here, at level 0 and 4 alike


def test_symmetric_export_serves(sym_export):
    from serve.runtime import RuntimeOptions, open_runtime

    rt = open_runtime(sym_export, RuntimeOptions(max_batch=2, max_length=64))
    logits = rt.prefill(0, [5, 17, 300, 42])
    assert np.isfinite(logits).all()
    out = rt.decode([0], [int(logits.argmax())])
    assert np.isfinite(out).all()


# -- refused combinations ------------------------------------------------------------------------


def test_float_precision_refused(tmp_path, tiny_hf_dir):
    with pytest.raises(ExportError, match="--int4-symmetric is for --precision int4"):
        export_model(tiny_hf_dir, tmp_path / "x", precision="fp32", int4_symmetric=True,
                     progress=False)
    assert not (tmp_path / "x").exists()


def test_cli_names_the_flag(tmp_path, tiny_hf_dir):
    res = subprocess.run([sys.executable, "-m", "llorch", "export", str(tiny_hf_dir), "-o",
                          str(tmp_path / "x"), "--precision", "fp16", "--int4-symmetric",
                          "--quiet"], capture_output=True, text=True)
    assert res.returncode == 1 and "--int4-symmetric" in res.stderr


@pytest.fixture(scope="module")
def tiny_gguf_state():
    cfg = tiny_config(len(spm_vocab()[0]))
    return cfg, random_state(cfg, seed=2)


def test_gguf_q4_1_refused_naming_the_flag(tmp_path, tiny_gguf_state):
    cfg, state = tiny_gguf_state
    src = write_gguf(tmp_path / "q41.gguf", cfg=cfg, state=state, qtype=gguf.GGMLQuantizationType.Q4_1)
    with pytest.raises(ExportError, match=r"--int4-symmetric.*Q4_1") as exc:
        export_model(src, tmp_path / "x", precision="int4", int4_symmetric=True, progress=False)
    assert "export without --int4-symmetric" in str(exc.value)
    assert not (tmp_path / "x").exists()
    # the default scheme takes the same file (Q4_1 blocks exactly)
    export_model(src, tmp_path / "asym", precision="int4", progress=False)


def test_gguf_q4_0_blocks_pass_through_exactly(tmp_path, tiny_gguf_state):
    cfg, state = tiny_gguf_state
    src = write_gguf(tmp_path / "q40.gguf", cfg=cfg, state=state, qtype=gguf.GGMLQuantizationType.Q4_0)
    out = export_model(src, tmp_path / "sym", precision="int4", int4_symmetric=True,
                       progress=False).out
    ckpt = GGUFCheckpoint(src)
    name = "model.layers.1.mlp.down_proj.weight"
    want = ckpt.load(name)
    nodes = {n.name: (n, a, i) for n, a, i in _nbits_nodes(out / "model.onnx")}
    node, attrs, inits = nodes["/model/layers.1/mlp/down_proj/MatMulNBits"]
    assert len(node.input) == 3
    qw = QuantizedWeight(inits[node.input[1]], inits[node.input[2]].reshape(attrs["N"], -1),
                         None, attrs["bits"], attrs["block_size"], attrs["K"], attrs["N"])
    np.testing.assert_array_equal(dequantize_blocks(qw), want)
