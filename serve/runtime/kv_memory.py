"""Host KV buffers whose resident memory follows the tokens they hold.

A slot's KV is reserved for ``max_length`` tokens but should cost memory only for the tokens
it holds. Anonymous memory gives that for free (a page becomes resident when first written),
except where transparent huge pages are on: NumPy asks for them (``madvise(MADV_HUGEPAGE)``
on every allocation of 4 MiB or more), and one token written into a head's
``[max_length, head_dim]`` region then faults in the 2 MiB around it. For the default model
(8192 tokens × 64 × fp32 = 2 MiB a head) the first prefill of a slot made all of it resident:
+360 MB RSS per slot for a 30-token prompt (measured, /proc/self/status VmRSS around each
runtime call). So the buffers here are plain ``mmap`` pages with huge pages refused
(``MADV_NOHUGEPAGE``), and the pages past what a row keeps are handed back
(``MADV_DONTNEED``: they read as zeros again and stop counting) when a slot is emptied or cut.

Layout: one buffer ``[rows, kv_heads, max_length, head_dim]`` per layer and K/V, C order, so
each (row, head) is one contiguous region of ``max_length * head_dim`` values and a row
holding ``n`` tokens touches the first ``n * head_dim * itemsize`` bytes of each of its
``kv_heads`` regions.
"""

from __future__ import annotations

import mmap

import numpy as np

PAGE = mmap.PAGESIZE


class KVBuffers:
    """The KV buffers of every layer (K and V) over ``rows`` rows, zero-filled, lazily resident.

    Args:
        layers: decoder layers (the buffer count is ``2 * layers``).
        shape: ``(rows, kv_heads, max_length, head_dim)`` of each buffer.
        dtype: numpy dtype of the values (float32, float16 or int8).

    Attributes:
        k, v: per layer, numpy views ``shape`` of the mapped memory (bind them, slice them).
    """

    def __init__(self, layers: int, shape: tuple[int, int, int, int], dtype) -> None:
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        nbytes = int(np.prod(self.shape)) * self.dtype.itemsize
        self._maps: list[mmap.mmap] = []
        arrays = []
        for _ in range(2 * layers):
            m = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            if hasattr(mmap, "MADV_NOHUGEPAGE"):  # Linux; elsewhere pages are small anyway
                m.madvise(mmap.MADV_NOHUGEPAGE)
            self._maps.append(m)
            arrays.append(np.frombuffer(m, self.dtype, int(np.prod(self.shape))).reshape(self.shape))
        self.k, self.v = arrays[:layers], arrays[layers:]

    @property
    def all(self) -> list[np.ndarray]:
        """Every buffer, K of each layer then V of each layer."""
        return [*self.k, *self.v]

    def forget(self, row: int, keep: int) -> None:
        """Give back the pages of ``row`` past its first ``keep`` tokens (in every head of every
        buffer); they read as zeros afterwards. Pages shared with kept tokens stay.

        Raises:
            ValueError: ``row`` or ``keep`` out of range.
        """
        rows, heads, length, dim = self.shape
        if not (0 <= row < rows and 0 <= keep <= length):
            raise ValueError(f"forget(row={row}, keep={keep}) outside {self.shape}")
        if not hasattr(mmap, "MADV_DONTNEED"):
            return
        token_bytes = dim * self.dtype.itemsize
        region = length * token_bytes
        for h in range(heads):
            base = (row * heads + h) * region
            start = -(-(base + keep * token_bytes) // PAGE) * PAGE  # first whole page past keep
            end = (base + region) // PAGE * PAGE
            if end > start:
                for m in self._maps:
                    m.madvise(mmap.MADV_DONTNEED, start, end - start)
