"""Zero the GPU code for every architecture but one in a CUDA shared library's fatbinary.

onnxruntime-gpu's CUDA provider (284 MB) carries cubins for sm_75/80/86/89/90/120; the device
tool moves at most 64 MiB per call. Keeping only the H100's sm_90 entries (headers intact,
payloads of the others zeroed, so the file layout and offsets do not change) lets the
compressed library travel in two calls instead of five. The CUDA driver picks the sm_90 cubin
by its header and never reads the zeroed ones; on any other GPU this pruned library fails.

    python bench/gpu/prune_fatbin.py libonnxruntime_providers_cuda.so OUT.so [--keep 90]
"""

from __future__ import annotations

import argparse
import struct
from collections import Counter

FATBIN_MAGIC = 0xBA55ED50


def fatbin_section(data: bytes) -> tuple[int, int]:
    """(offset, size) of the ELF64 section .nv_fatbin."""
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize)
                for i in range(shnum)]
    strtab = sections[shstrndx][4]
    for name, _, _, _, offset, size, *_ in sections:
        if data[strtab + name:data.index(b"\0", strtab + name)] == b".nv_fatbin":
            return offset, size
    raise ValueError("no .nv_fatbin section")


def prune(data: bytearray, keep: int) -> Counter:
    """Zero payloads of entries whose SM version is not ``keep``; returns bytes per (sm, kept)."""
    offset, size = fatbin_section(data)
    stats: Counter = Counter()
    pos, end = offset, offset + size
    while pos < end:
        magic, _, header, fat_size = struct.unpack_from("<IHHQ", data, pos)
        if magic != FATBIN_MAGIC:  # alignment padding between containers
            pos += 8
            continue
        entry, stop = pos + header, pos + header + fat_size
        while entry < stop:
            _, _, entry_header, payload = struct.unpack_from("<HHIQ", data, entry)
            sm = struct.unpack_from("<I", data, entry + 28)[0]
            if sm != keep:
                data[entry + entry_header:entry + entry_header + payload] = bytes(payload)
            stats[(sm, sm == keep)] += payload
            entry += entry_header + payload
        pos = stop
    return stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--keep", type=int, default=90)
    args = ap.parse_args()
    data = bytearray(open(args.src, "rb").read())
    stats = prune(data, args.keep)
    with open(args.dst, "wb") as f:
        f.write(data)
    for (sm, kept), n in sorted(stats.items()):
        print(f"sm_{sm}: {n / 1e6:.1f} MB {'kept' if kept else 'zeroed'}")


if __name__ == "__main__":
    main()
