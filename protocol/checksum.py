"""Per-page checksums: CRC32 (zlib), computed by the writer, kept by the store.

CRC32 is what zlib gives us in C at memory speed, detects every burst error up
to 32 bits, and is plenty for catching torn or misplaced pages; it is not a
defence against a malicious store.
"""

from __future__ import annotations

import zlib

from .limits import PAGE_SIZE

ZERO_PAGE = bytes(PAGE_SIZE)
ZERO_PAGE_CRC = zlib.crc32(ZERO_PAGE)


def page_crc(page: bytes | bytearray | memoryview) -> int:
    return zlib.crc32(page)


def batch_crcs(data: bytes | bytearray | memoryview) -> tuple[int, ...]:
    """One CRC32 per PAGE_SIZE page of `data`."""
    view = memoryview(data)
    return tuple(zlib.crc32(view[i : i + PAGE_SIZE]) for i in range(0, len(view), PAGE_SIZE))
