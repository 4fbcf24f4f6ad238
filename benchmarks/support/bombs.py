"""Decompression bombs for the serving tests and the load benchmark: gzip members that inflate to
far more than they weigh, built in well under a second."""

from __future__ import annotations

import struct
import zlib

ZERO_BLOCK = 1 << 24
"""16 MiB: the unit of zeros a bomb is built from."""


def gzip_of_zeros(head: bytes, n_zero_bytes: int) -> bytes:
    """One gzip member: ``head`` then ``n_zero_bytes`` zeros (a multiple of 16 MiB), with the true
    CRC-32 and size in its trailer. After a full flush deflate keeps no history, so each 16 MiB
    block of zeros compresses to the same bytes: compressed once, repeated (a 1 GiB bomb in < 1 s)."""
    n_blocks, rest = divmod(n_zero_bytes, ZERO_BLOCK)
    if rest:
        raise ValueError("n_zero_bytes must be a multiple of 16 MiB")
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    parts = [b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff", deflate.compress(head), deflate.flush(zlib.Z_FULL_FLUSH)]
    zeros = bytes(ZERO_BLOCK)
    block = deflate.compress(zeros) + deflate.flush(zlib.Z_FULL_FLUSH)
    parts += [block] * n_blocks + [deflate.flush(zlib.Z_FINISH)]
    crc = zlib.crc32(head)
    for _ in range(n_blocks):
        crc = zlib.crc32(zeros, crc)
    parts.append(struct.pack("<II", crc, (len(head) + n_zero_bytes) & 0xFFFFFFFF))
    return b"".join(parts)
