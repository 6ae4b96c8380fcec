"""bench.matmul_roofline's graphs and arithmetic, on a tiny shape (never a timing assertion)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import matmul_roofline as mr  # noqa: E402


def _dequantize(a: dict[str, np.ndarray], k: int, n: int, bs: int) -> np.ndarray:
    """[K, N] float from MatMulNBits' 4-bit layout (low nibble first; zero point 8 if none)."""
    blocks = k // bs
    q = a["qweight"].reshape(n, blocks, bs // 2)
    vals = np.stack([q & 0x0F, q >> 4], axis=-1).reshape(n, blocks, bs).astype(np.float32)
    if "qzeros" in a:
        z = a["qzeros"][: n * ((blocks + 1) // 2)].reshape(n, -1)
        zp = np.stack([z & 0x0F, z >> 4], axis=-1).reshape(n, -1)[:, :blocks].astype(np.float32)
    else:
        zp = np.full((n, blocks), 8.0, np.float32)
    w = (vals - zp[..., None]) * a["scales"].reshape(n, blocks)[..., None]
    return w.reshape(n, k).T


@pytest.mark.parametrize("symmetric", [False, True])
def test_graph_is_the_matrices_it_counts(monkeypatch, symmetric):
    """Each node computes x @ W of its own copy in the layout matrix_arrays documents, and the
    bytes counted are the initializers' bytes."""
    import onnx
    import onnxruntime as ort

    monkeypatch.setitem(mr.SHAPES, "tiny", (64, 48, 1))
    cfg = mr.Config("tiny", 32, 0, symmetric)
    blob = mr.build_model(cfg, copies=3, seed=5)
    model = onnx.load_from_string(blob)
    per_copy = sum(len(i.raw_data) for i in model.graph.initializer) // 3
    assert per_copy == mr.matrix_bytes(64, 48, 4, 32, symmetric)
    sess = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)
    ys = sess.run(None, {"x": x})
    base = mr.matrix_arrays(64, 48, 4, 32, symmetric, np.random.default_rng(5))
    for c, y in enumerate(ys):
        a = {k: (v ^ np.uint8(c) if v.dtype == np.uint8 else v * np.float32(1 + c / 1024))
             for k, v in base.items()}
        np.testing.assert_allclose(y, x @ _dequantize(a, 64, 48, 32), rtol=1e-4, atol=1e-4)
    assert not np.allclose(ys[0], ys[1])  # distinct copies


def test_measure_and_summary(monkeypatch):
    """One configuration end to end: kernel times from ORT's profiler, cold over every copy,
    hot for a matrix that fits the cache; the summary's GB/s are bytes ÷ median µs."""
    monkeypatch.setitem(mr.SHAPES, "tiny", (256, 128, 1))
    cfg = mr.Config("tiny", 64, 4, True)
    res = mr.measure(cfg, threads=1, cold_mb=0.05, cold_runs=2, hot_calls=3)
    assert res["copies"] >= 2 and len(res["cold_us"]) == 2 * res["copies"]
    assert len(res["hot_us"]) == 3 and all(t > 0 for t in res["hot_us"])
    res.update(paired_triad_gbps=10.0, round=0)
    (row,) = mr.summarize([res], triad_gbps=10.0)
    assert row["cold_gbps"] == pytest.approx(res["bytes"] / np.median(res["cold_us"]) / 1e3)
    assert row["cold_of_paired_triad"] == pytest.approx(row["cold_gbps"] / 10.0)


def test_kernel_bytes_counts_the_int8_paths_block_sums():
    """Level 4: 4-bit data + an fp32 scale and an fp32 block sum per block, zero points folded."""
    sym = mr.Config("o", 32, 4, True)
    assert mr.kernel_bytes(sym) == 2048 * 64 * (16 + 8)
    assert mr.kernel_bytes(mr.Config("o", 32, 4, False)) == mr.kernel_bytes(sym)
    assert mr.kernel_bytes(mr.Config("o", 32, 0, False)) == mr.matrix_bytes(2048, 2048, 4, 32,
                                                                             False)
