"""Block quantization (export/quant.py): round trips, GGUF block mappings, and ONNX Runtime's
MatMulNBits computing exactly x @ dequantize(W).T for the layouts the exporter emits."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from onnx import TensorProto, helper, numpy_helper

from export.quant import (
    QuantizedWeight,
    dequantize_blocks,
    from_gguf_blocks,
    pack_nibbles,
    quantize_blocks,
    quantize_blocks_affine,
    split_zero_points,
    unpack_nibbles,
)


def _element_scales(qw: QuantizedWeight) -> np.ndarray:
    """Each element's block step, [N, K] (a constant affine block stores its value as the
    scale, which may be negative)."""
    return np.abs(np.repeat(qw.scales.reshape(qw.n, -1), qw.block_size, axis=1)[:, : qw.k])


def _assert_within_half_step(qw: QuantizedWeight, w: np.ndarray) -> None:
    """Round-to-nearest: every element within half its block's step (+ float32 rounding)."""
    back = dequantize_blocks(qw)
    assert back.shape == w.shape and back.dtype == np.float32
    bound = _element_scales(qw) / 2 * (1 + 1e-5) + 1e-6 * np.abs(w)
    assert (np.abs(back - w) <= bound).all()


weights = arrays(
    np.float32,
    st.tuples(st.integers(1, 6), st.integers(1, 100)),
    elements=st.floats(-1e4, 1e4, width=32, allow_subnormal=False),
)


# -- quantize / dequantize ---------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(w=weights, bits=st.sampled_from([4, 8]), block_size=st.sampled_from([16, 32, 64]))
def test_round_trip_within_half_a_step(w, bits, block_size):
    qw = quantize_blocks(w, bits=bits, block_size=block_size)
    assert (qw.n, qw.k, qw.bits, qw.block_size) == (*w.shape, bits, block_size)
    assert qw.n_blocks == -(-w.shape[1] // block_size)
    _assert_within_half_step(qw, w)


@settings(max_examples=60, deadline=None)
@given(w=weights, block_size=st.sampled_from([16, 32, 64]))
def test_affine_round_trip_within_half_a_step(w, block_size):
    qw = quantize_blocks_affine(w, block_size=block_size)
    assert qw.zero_points.dtype == np.float32
    _assert_within_half_step(qw, w)


def test_round_trip_error_on_gaussian_weights():
    w = np.random.default_rng(0).standard_normal((64, 256)).astype(np.float32)
    for qw in (quantize_blocks(w, bits=4), quantize_blocks_affine(w)):
        _assert_within_half_step(qw, w)
        # the typical error is a uniform rounding error: ~ step / sqrt(12)
        err = dequantize_blocks(qw) - w
        assert np.sqrt(np.mean(err**2)) < 0.35 * _element_scales(qw).mean()
    # the affine grid spans each block's [min, max] exactly, so its step is never larger
    assert (quantize_blocks_affine(w).scales <= quantize_blocks(w, bits=4).scales + 1e-7).all()
    q8 = quantize_blocks(w, bits=8)
    assert np.abs(dequantize_blocks(q8) - w).max() < np.abs(
        dequantize_blocks(quantize_blocks(w, bits=4)) - w).max() / 10


@pytest.mark.parametrize("quantize", [
    lambda w: quantize_blocks(w, bits=4, block_size=32),
    lambda w: quantize_blocks(w, bits=8, block_size=32),
    lambda w: quantize_blocks_affine(w, block_size=32),
], ids=["int4", "int8", "int4-affine"])
@pytest.mark.parametrize("k", [1, 31, 33, 40, 95])
def test_k_not_a_multiple_of_the_block_size(quantize, k):
    w = np.random.default_rng(k).standard_normal((5, k)).astype(np.float32)
    qw = quantize(w)
    assert qw.k == k and qw.n_blocks == -(-k // 32)
    assert qw.packed.shape[:2] == (5, qw.n_blocks)
    _assert_within_half_step(qw, w)


def test_constant_blocks_are_exact():
    rows = np.array([[0.0] * 32, [0.7] * 32, [-3.25] * 32, [1e-3] * 32], np.float32)
    for qw in (quantize_blocks(rows, bits=4), quantize_blocks(rows, bits=8)):
        back = dequantize_blocks(qw)
        assert (back[0] == 0).all()  # scale 0: exactly zero, no NaN from 0/0
        np.testing.assert_allclose(back, rows, rtol=1e-6)
    back = dequantize_blocks(quantize_blocks_affine(rows))
    np.testing.assert_array_equal(back, rows)  # q = 1, zp = 0, scale = the constant


def test_zero_stays_exact_with_integer_zero_points():
    w = np.random.default_rng(1).standard_normal((8, 64)).astype(np.float32)
    w[:, ::3] = 0.0
    back = dequantize_blocks(quantize_blocks(w, bits=4))
    assert (back[:, ::3] == 0).all()


def test_chunked_quantization_equals_one_pass():
    w = np.random.default_rng(2).standard_normal((37, 70)).astype(np.float32)
    for quantize in (quantize_blocks, quantize_blocks_affine):
        a, b = quantize(w), quantize(w, rows_per_chunk=8)
        for x, y in ((a.packed, b.packed), (a.scales, b.scales), (a.zero_points, b.zero_points)):
            np.testing.assert_array_equal(x, y)


def test_int4_layout():
    """MatMulNBits' layout: element 2i in the low nibble; zero points packed the same way."""
    w = np.random.default_rng(3).standard_normal((3, 96)).astype(np.float32)  # 3 blocks: odd
    qw = quantize_blocks(w, bits=4)
    assert qw.packed.dtype == np.uint8 and qw.packed.shape == (3, 3, 16)
    assert qw.scales.shape == (3, 3)
    assert qw.zero_points.dtype == np.uint8 and qw.zero_points.shape == (3, 2)  # ceil(3 / 2)
    zp = unpack_nibbles(qw.zero_points)
    assert (zp[:, 3] == 0).all()  # the padding nibble


# -- nibbles ---------------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(q=arrays(np.uint8, st.tuples(st.integers(1, 4), st.integers(1, 20).map(lambda m: 2 * m)),
                elements=st.integers(0, 15)))
def test_unpack_inverts_pack(q):
    p = pack_nibbles(q)
    assert p.dtype == np.uint8 and p.shape == (*q.shape[:-1], q.shape[-1] // 2)
    np.testing.assert_array_equal(p & 0x0F, q[..., 0::2])
    np.testing.assert_array_equal(p >> 4, q[..., 1::2])
    np.testing.assert_array_equal(unpack_nibbles(p), q)


@settings(max_examples=100, deadline=None)
@given(p=arrays(np.uint8, st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 17))))
def test_pack_inverts_unpack(p):
    np.testing.assert_array_equal(pack_nibbles(unpack_nibbles(p)), p)


# -- GGUF blocks -----------------------------------------------------------------------------


def _f16_bytes(x: float) -> list[int]:
    return list(np.array([x], np.float16).view(np.uint8))


def _f16(b: np.ndarray) -> float:
    return float(np.frombuffer(bytes(b), np.float16)[0])


def _gguf_reference(qtype: str, blocks: np.ndarray) -> np.ndarray:
    """Element by element, as ggml's dequantize_row_* read a block."""
    n, n_blocks, _ = blocks.shape
    out = np.zeros((n, n_blocks * 32), np.float32)
    for r in range(n):
        for b in range(n_blocks):
            blk = blocks[r, b]
            vals = np.zeros(32, np.float32)
            d = _f16(blk[0:2])
            if qtype == "Q8_0":
                for j in range(32):
                    vals[j] = d * int(np.int8(blk[2 + j].view(np.int8)))
            elif qtype == "Q4_0":
                for j in range(16):
                    vals[j] = d * ((int(blk[2 + j]) & 0x0F) - 8)
                    vals[j + 16] = d * ((int(blk[2 + j]) >> 4) - 8)
            else:  # Q4_1
                m = _f16(blk[2:4])
                for j in range(16):
                    vals[j] = d * (int(blk[4 + j]) & 0x0F) + m
                    vals[j + 16] = d * (int(blk[4 + j]) >> 4) + m
            out[r, b * 32:(b + 1) * 32] = vals
    return out


def _gguf_blocks(qtype: str, n: int, n_blocks: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows = []
    for r in range(n):
        row = []
        for b in range(n_blocks):
            d = float(rng.uniform(0.001, 0.05))
            if qtype == "Q8_0":
                body = list(rng.integers(-128, 128, 32).astype(np.int8).view(np.uint8))
                row.append(_f16_bytes(d) + body)
                continue
            qs = list(rng.integers(0, 256, 16))
            if qtype == "Q4_0":
                row.append(_f16_bytes(d) + qs)
            else:
                m = float(rng.uniform(-0.4, 0.1))
                if (r, b) == (1, 0):
                    d = 0.0  # a constant block: every value is m
                row.append(_f16_bytes(d) + _f16_bytes(m) + qs)
        rows.append(row)
    return np.array(rows, np.uint8)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_from_gguf_blocks_dequantizes_like_ggml(qtype):
    blocks = _gguf_blocks(qtype, n=3, n_blocks=2, seed=4)
    qw = from_gguf_blocks(qtype, blocks, k=64)
    assert (qw.n, qw.k, qw.block_size, qw.bits) == (3, 64, 32, 8 if qtype == "Q8_0" else 4)
    want = _gguf_reference(qtype, blocks)
    got = dequantize_blocks(qw)
    if qtype == "Q4_1":  # float zero point -m/d: (q + m/d) * d rounds once more than d*q + m
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(got[1, :32], want[1, :32])  # d == 0: exactly m
    else:  # small integers times an fp16 scale: exact in float32
        np.testing.assert_array_equal(got, want)


def test_from_gguf_blocks_rejects_bad_input():
    with pytest.raises(ValueError, match="Q4_K"):
        from_gguf_blocks("Q4_K", np.zeros((1, 1, 144), np.uint8), k=256)
    with pytest.raises(ValueError, match="Q4_0 blocks must be 18 bytes, got 20"):
        from_gguf_blocks("Q4_0", np.zeros((1, 1, 20), np.uint8), k=32)


@pytest.mark.parametrize("source", ["affine", "gguf-q4_1"])
def test_split_zero_points_is_exact(source):
    if source == "affine":
        w = np.random.default_rng(5).standard_normal((6, 96)).astype(np.float32)
        qw = quantize_blocks_affine(w)
    else:
        qw = from_gguf_blocks("Q4_1", _gguf_blocks("Q4_1", n=3, n_blocks=3, seed=6), k=96)
    qi, corr = split_zero_points(qw)
    assert qi.zero_points.dtype == np.uint8 and corr.shape == (qw.n_blocks, qw.n)
    np.testing.assert_array_equal(qi.packed, qw.packed)
    # s(q - z) = s(q - zi) - s(z - zi), with corr[b, n] = s(z - zi) for block b of row n
    rebuilt = dequantize_blocks(qi) - np.repeat(corr.T, 32, axis=1)[:, : qw.k]
    np.testing.assert_allclose(rebuilt, dequantize_blocks(qw), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        split_zero_points(qi)


# -- MatMulNBits -----------------------------------------------------------------------------


def _matmul_nbits(x: np.ndarray, qw: QuantizedWeight, accuracy_level: int = 0) -> np.ndarray:
    """One MatMulNBits node, fed the initializers the way export/graph.py lays them out."""
    inits = [
        numpy_helper.from_array(qw.packed, "B"),
        numpy_helper.from_array(qw.scales.reshape(-1).astype(np.float32), "scales"),
        numpy_helper.from_array(qw.zero_points.reshape(-1), "zero_points"),
    ]
    node = helper.make_node("MatMulNBits", ["A", "B", "scales", "zero_points"], ["Y"],
                            domain="com.microsoft", K=qw.k, N=qw.n, bits=qw.bits,
                            block_size=qw.block_size, accuracy_level=accuracy_level)
    graph = helper.make_graph(
        [node], "matmulnbits",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, qw.k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, qw.n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid("com.microsoft", 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so,
                                providers=["CPUExecutionProvider"])
    return sess.run(None, {"A": x})[0]


def _layouts():
    rng = np.random.default_rng(7)

    def w(k):
        return rng.standard_normal((24, k)).astype(np.float32)

    return {
        "int4-uint8-zp": quantize_blocks(w(64), bits=4),
        "int4-uint8-zp-odd-blocks": quantize_blocks(w(96), bits=4),
        "int4-uint8-zp-k40": quantize_blocks(w(40), bits=4),
        "int8-uint8-zp": quantize_blocks(w(64), bits=8),
        "int4-float-zp": quantize_blocks_affine(w(64)),
        "gguf-q4_0": from_gguf_blocks("Q4_0", _gguf_blocks("Q4_0", 24, 2, 8), k=64),
        "gguf-q4_1-float-zp": from_gguf_blocks("Q4_1", _gguf_blocks("Q4_1", 24, 2, 9), k=64),
        "gguf-q8_0": from_gguf_blocks("Q8_0", _gguf_blocks("Q8_0", 24, 2, 10), k=64),
    }


LAYOUTS = _layouts()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_matmulnbits_computes_x_times_dequantized_w(layout):
    qw = LAYOUTS[layout]
    x = np.random.default_rng(11).standard_normal((5, qw.k)).astype(np.float32)
    want = x @ dequantize_blocks(qw).T
    got = _matmul_nbits(x, qw, accuracy_level=0)
    assert got.shape == (5, qw.n)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("layout", ["int4-uint8-zp", "int4-float-zp", "gguf-q4_1-float-zp"])
def test_matmulnbits_accuracy_level_4(layout):
    """Level 4 quantizes activations to int8 per block: ~1% of the output scale, not exact."""
    qw = LAYOUTS[layout]
    x = np.random.default_rng(12).standard_normal((5, qw.k)).astype(np.float32)
    want = x @ dequantize_blocks(qw).T
    got = _matmul_nbits(x, qw, accuracy_level=4)
    assert np.abs(got - want).max() <= 0.02 * np.abs(want).max()


def test_matmulnbits_with_split_zero_points_plus_correction():
    """What the exporter emits for float zero points: the uint8-zp kernel, then
    y -= blocksum(x) @ corr. Equal to x @ W.T for the float-zp weight."""
    qw = LAYOUTS["gguf-q4_1-float-zp"]
    qi, corr = split_zero_points(qw)
    x = np.random.default_rng(13).standard_normal((5, qw.k)).astype(np.float32)
    sums = x.reshape(5, qw.n_blocks, 32).sum(-1)
    got = _matmul_nbits(x, qi) - sums @ corr
    want = x @ dequantize_blocks(qw).T
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
