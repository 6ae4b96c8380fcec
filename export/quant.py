"""Block quantization for ``com.microsoft.MatMulNBits`` — pure functions with inverses.

MatMulNBits stores a weight W [N, K] (HF's [out, in]) as
  B            uint8 [N, n_blocks, block_size * bits / 8]  (4 bits: element 2i in the low nibble)
  scales       float [N * n_blocks]
  zero_points  uint8 [N, ceil(n_blocks * bits / 8)] packed, or float [N * n_blocks], or absent
and dequantizes block values as (q - zero_point) * scale. Without a zero_points input (the
symmetric scheme) ONNX Runtime takes 2^(bits-1) as every block's zero point: 8 for 4 bits, 128
for 8 (ContribOperators.md, com.microsoft.MatMulNBits; what ORT GenAI's builder emits with
int4_is_symmetric, its default).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class QuantizedWeight:
    """A weight in MatMulNBits layout. ``k`` and ``n`` are the logical (unpadded) sizes."""

    packed: np.ndarray  # uint8 [n, n_blocks, blob]
    scales: np.ndarray  # float32 [n, n_blocks]
    # uint8 packed [n, zp_bytes] or float32 [n, n_blocks]; None: symmetric, the implicit
    # 2^(bits-1) of a MatMulNBits without a zero_points input
    zero_points: np.ndarray | None
    bits: int
    block_size: int
    k: int
    n: int

    @property
    def n_blocks(self) -> int:
        return self.packed.shape[1]

    @property
    def symmetric(self) -> bool:
        return self.zero_points is None


def _blocks(w: np.ndarray, block_size: int) -> np.ndarray:
    """[N, K] float → [N, n_blocks, block_size], zero-padding K up to a whole block."""
    n, k = w.shape
    n_blocks = -(-k // block_size)
    if n_blocks * block_size != k:
        w = np.pad(w, ((0, 0), (0, n_blocks * block_size - k)))
    return w.reshape(n, n_blocks, block_size)


def pack_nibbles(q: np.ndarray) -> np.ndarray:
    """uint8 values 0..15 [..., 2m] → [..., m], element 2i in the low nibble."""
    q = q.astype(np.uint8)
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def unpack_nibbles(p: np.ndarray) -> np.ndarray:
    """Inverse of pack_nibbles."""
    out = np.empty(p.shape[:-1] + (p.shape[-1] * 2,), dtype=np.uint8)
    out[..., 0::2] = p & 0x0F
    out[..., 1::2] = p >> 4
    return out


def quantize_blocks(w: np.ndarray, *, bits: int = 4, block_size: int = 32,
                    rows_per_chunk: int = 4096) -> QuantizedWeight:
    """Quantize ``w`` [N, K] in chunks of rows (bounded temporaries for large matrices)."""
    if w.shape[0] <= rows_per_chunk:
        return _quantize_rows(w, bits, block_size)
    parts = [_quantize_rows(w[i:i + rows_per_chunk], bits, block_size)
             for i in range(0, w.shape[0], rows_per_chunk)]
    return QuantizedWeight(
        np.concatenate([p.packed for p in parts]), np.concatenate([p.scales for p in parts]),
        np.concatenate([p.zero_points for p in parts]), bits, block_size, w.shape[1], w.shape[0])


def _quantize_rows(w: np.ndarray, bits: int, block_size: int) -> QuantizedWeight:
    """Asymmetric round-to-nearest block quantization with integer zero points.

    The range of each block is widened to include 0 so the zero point is an integer in
    [0, 2^bits - 1] and 0.0 stays exact (what ORT's own quantizer does).
    """
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    w = np.asarray(w, dtype=np.float32)
    n, k = w.shape
    qmax = (1 << bits) - 1
    blk = _blocks(w, block_size)
    lo = np.minimum(blk.min(axis=-1), 0.0)
    hi = np.maximum(blk.max(axis=-1), 0.0)
    scale = (hi - lo) / qmax
    safe = np.where(scale == 0, 1.0, scale)
    zp = np.clip(np.round(-lo / safe), 0, qmax)
    q = np.clip(np.round(blk / safe[..., None] + zp[..., None]), 0, qmax).astype(np.uint8)
    scale = scale.astype(np.float32)
    zp = zp.astype(np.uint8)
    if bits == 4:
        packed = pack_nibbles(q)
        n_blocks = zp.shape[1]
        if n_blocks % 2:
            zp = np.pad(zp, ((0, 0), (0, 1)))
        zp_packed = pack_nibbles(zp)
        assert zp_packed.shape[1] == -(-n_blocks // 2)
    else:
        packed, zp_packed = q, zp
    return QuantizedWeight(packed, scale, zp_packed, bits, block_size, k, n)


def quantize_blocks_symmetric(w: np.ndarray, *, bits: int = 4, block_size: int = 32,
                              rows_per_chunk: int = 4096) -> QuantizedWeight:
    """Symmetric round-to-nearest blocks, no zero points: value = scale * (q - 2^(bits-1)).

    Each block's scale is its value of largest magnitude m, sign kept, over -2^(bits-1):
    scale = m / -8 at 4 bits, q = clamp(round(w / scale), -8, 7) + 8, so m itself lands on the
    end of the grid (q = 0, exact) and all 16 levels cover the block's range on m's side. This
    is ONNX Runtime's rule (MLAS `range2scale` in onnxruntime/core/mlas/lib/q4_dq.cpp, which
    `MatMulNBitsQuantizer(is_symmetric=True)` and so ORT GenAI's builder run) and llama.cpp's
    Q4_0 (`quantize_row_q4_0_ref`: d = max / -8). A value of -m (the other end) rounds to +8
    and clamps to 7: that one costs a whole step, the price of no zero point. A block of zeros
    gets scale 0.

    Args:
        w: float [N, K] (HF's [out, in]); K is zero-padded to whole blocks.
        bits: 4 or 8 (8: scale = m / -128, q in [0, 255]).
        block_size: values per block along K.
    Returns:
        A QuantizedWeight with ``zero_points`` None (MatMulNBits gets no zero_points input).
    """
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    w = np.asarray(w, dtype=np.float32)
    n, k = w.shape
    mid = 1 << (bits - 1)
    packed, scales = [], []
    for i in range(0, n, rows_per_chunk):
        blk = _blocks(w[i:i + rows_per_chunk], block_size)
        at = np.abs(blk).argmax(axis=-1)[..., None]
        m = np.take_along_axis(blk, at, axis=-1)[..., 0]
        scale = (m / -mid).astype(np.float32)
        # times the reciprocal, as MLAS does (bit for bit its blocks); a subnormal scale's
        # reciprocal overflows, so those blocks divide
        with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
            inv = np.where(scale == 0, 0.0, np.float32(1.0) / scale).astype(np.float32)
            x = np.where(np.isfinite(inv)[..., None], blk * inv[..., None],
                         blk / np.where(scale == 0, 1.0, scale)[..., None])
        q = (np.clip(np.round(x), -mid, mid - 1) + mid).astype(np.uint8)
        packed.append(pack_nibbles(q) if bits == 4 else q)
        scales.append(scale)
    return QuantizedWeight(np.concatenate(packed), np.concatenate(scales), None, bits,
                           block_size, k, n)


def without_zero_points(qw: QuantizedWeight) -> QuantizedWeight | None:
    """``qw`` as a symmetric weight (no zero points) when every zero point is 2^(bits-1)
    (GGUF Q4_0 / Q8_0 blocks), exactly; None when they differ or are floats."""
    if qw.zero_points is None:
        return qw
    if qw.zero_points.dtype != np.uint8:
        return None
    zp = unpack_nibbles(qw.zero_points) if qw.bits == 4 else qw.zero_points
    if not (zp[:, : qw.n_blocks] == 1 << (qw.bits - 1)).all():
        return None
    return QuantizedWeight(qw.packed, qw.scales, None, qw.bits, qw.block_size, qw.k, qw.n)


def dequantize_blocks(qw: QuantizedWeight) -> np.ndarray:
    """Inverse of quantize_blocks (and of the GGUF mappings): float32 [N, K]."""
    q = unpack_nibbles(qw.packed) if qw.bits == 4 else qw.packed
    q = q.astype(np.float32)
    if qw.zero_points is None:
        zp = np.full((qw.n, qw.n_blocks), 1 << (qw.bits - 1), dtype=np.float32)
    elif qw.zero_points.dtype == np.uint8:
        zp = unpack_nibbles(qw.zero_points) if qw.bits == 4 else qw.zero_points
        zp = zp[:, : qw.n_blocks].astype(np.float32)
    else:
        zp = qw.zero_points.astype(np.float32)
    w = (q - zp[..., None]) * qw.scales[..., None]
    return w.reshape(qw.n, -1)[:, : qw.k]


def quantize_blocks_affine(w: np.ndarray, *, block_size: int = 32,
                           rows_per_chunk: int = 4096) -> QuantizedWeight:
    """4-bit blocks over each block's exact [min, max] (llama.cpp's Q4_1 scheme).

    The zero point -min/scale is a float: lower error than integer zero points, whose grid
    must contain 0. ``split_zero_points`` turns it into what the fast kernel takes.
    """
    w = np.asarray(w, dtype=np.float32)
    n, k = w.shape
    packed, scales, zps = [], [], []
    for i in range(0, n, rows_per_chunk):
        blk = _blocks(w[i:i + rows_per_chunk], block_size)
        lo, hi = blk.min(axis=-1), blk.max(axis=-1)
        scale = (hi - lo) / 15.0
        flat = scale == 0
        safe = np.where(flat, 1.0, scale)
        q = np.clip(np.round((blk - lo[..., None]) / safe[..., None]), 0, 15).astype(np.uint8)
        # a constant block (scale 0) is value = lo: encode as q = 1, zp = 0, scale = lo
        q[flat] = 1
        scale = np.where(flat, lo, scale)
        zp = np.where(flat, 0.0, -lo / safe)
        packed.append(pack_nibbles(q))
        scales.append(scale.astype(np.float32))
        zps.append(zp.astype(np.float32))
    return QuantizedWeight(np.concatenate(packed), np.concatenate(scales), np.concatenate(zps),
                           4, block_size, k, n)


def split_zero_points(qw: QuantizedWeight) -> tuple[QuantizedWeight, np.ndarray]:
    """Float zero points → integer ones plus an exact per-block correction.

    ONNX Runtime's CPU MatMulNBits has fast kernels for uint8 zero points only (float ones
    measured 10-15x slower). With z = zi + δ (zi = nearest integer in range):
        x · s(q - z) = x · s(q - zi) - blocksum(x) · (s δ)
    so the graph adds one small MatMul: block sums of x [.., n_blocks] @ corr [n_blocks, N].
    Returns (weight with packed uint8 zero points, corr float32 [n_blocks, N]).
    """
    if qw.zero_points is None or qw.zero_points.dtype == np.uint8:
        raise ValueError("zero points are already integers")
    qmax = (1 << qw.bits) - 1
    zf = qw.zero_points.astype(np.float32)
    zi = np.clip(np.round(zf), 0, qmax)
    corr = (qw.scales * (zf - zi)).astype(np.float32).T.copy()
    zi = zi.astype(np.uint8)
    if qw.bits == 4:
        if zi.shape[1] % 2:
            zi = np.pad(zi, ((0, 0), (0, 1)))
        zi = pack_nibbles(zi)
    return (QuantizedWeight(qw.packed, qw.scales, zi, qw.bits, qw.block_size, qw.k, qw.n),
            corr)


# -- GGUF blocks → MatMulNBits, without a dequantize→requantize round trip --------------------
# Q4_0: fp16 d, 16 bytes: value = d * (q - 8)
# Q4_1: fp16 d, fp16 m, 16 bytes: value = d * q + m   (float zero point zp = -m / d)
# Q8_0: fp16 d, 32 int8: value = d * q               (uint8 q + 128, zero point 128)
# In GGUF 4-bit blocks, element j is the low nibble of byte j and element j+16 the high nibble.
GGUF_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}


def _gguf_nibbles(qs: np.ndarray) -> np.ndarray:
    """GGUF nibble order [..., 16] → values [..., 32]."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def from_gguf_blocks(qtype: str, blocks: np.ndarray, k: int) -> QuantizedWeight:
    """Map raw GGUF blocks uint8 [N, n_blocks, bytes] onto MatMulNBits (block 32), exactly."""
    if qtype not in GGUF_BLOCK_BYTES:
        raise ValueError(f"no direct MatMulNBits mapping for GGUF type {qtype}")
    n, n_blocks, nbytes = blocks.shape
    if nbytes != GGUF_BLOCK_BYTES[qtype]:
        raise ValueError(f"{qtype} blocks must be {GGUF_BLOCK_BYTES[qtype]} bytes, got {nbytes}")
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    if qtype == "Q8_0":
        q = (blocks[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        zp = np.full((n, n_blocks), 128, dtype=np.uint8)
        return QuantizedWeight(q, d, zp, 8, 32, k, n)
    if qtype == "Q4_0":
        q = _gguf_nibbles(blocks[..., 2:])
        zp = np.full((n, n_blocks + (n_blocks % 2)), 8, dtype=np.uint8)
        return QuantizedWeight(pack_nibbles(q), d, pack_nibbles(zp), 4, 32, k, n)
    # Q4_1
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    q = _gguf_nibbles(blocks[..., 4:])
    flat = d == 0
    if flat.any():
        # A constant block (d == 0, every value == m): encode as q=1, zp=0, scale=m.
        q = q.copy()
        q[flat] = 1
        d = np.where(flat, m, d)
        m = np.where(flat, 0.0, m)
    with np.errstate(divide="ignore", invalid="ignore"):
        zp = np.where(d == 0, 0.0, -m / d).astype(np.float32)
    return QuantizedWeight(pack_nibbles(q), d.astype(np.float32), zp, 4, 32, k, n)
