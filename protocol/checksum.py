"""Page tags: a CRC32 of the page bound to where it belongs.

A plain checksum proves the bytes are intact, not that they are the right
page: a store whose slot map points slot 0 at slot 1's page would return it
with a valid CRC. So, as T10-DIF's reference tag and ZFS's checksum in the
block pointer do, the tag covers the page's identity too. It is the CRC32 of
the page started from a seed that is itself the CRC32 of (area, slot, write
generation): `zlib.crc32(page, slot_seed(...))`. Two seeds give two different
tags for the same bytes (a CRC's initial value shifts it by an invertible
function), so a misdirected read or write, or a copy from before the last
write of that slot, fails its check and is EIO.

The writer (the agent) picks the generation: 1..255, bumped on every write of
a slot, 0 meaning "never written". The seed costs one more CRC over 9 bytes.
It is not a defence against a malicious store.

Speed: every page is tagged by the agent, checked by the store on the way in
and out and by the agent on the way back, so the CRC was the largest single cost
of a batch at the store (make bench-store, py-spy). ISA-L's CRC32 (PyPI `isal`,
PCLMULQDQ folding) gives zlib's value in 0.29 µs per 4 KiB page against zlib's
1.2 µs here; for the 9-byte seed zlib's call is cheaper (0.13 µs against 0.40).
The values are identical, so hosts with and without it interoperate.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable, Sequence

from .limits import PAGE_SIZE


def _page_crc_function() -> Callable[..., int]:
    """ISA-L's CRC32 where the CPU has PCLMULQDQ; zlib's otherwise. ISA-L without it
    falls back to a byte-at-a-time table, slower than zlib's braided loop: that is
    the case in the labs' QEMU guests (-cpu qemu64, lab/vm.py)."""
    try:
        from isal.isal_zlib import crc32
    except ImportError:  # same values, 4x slower
        return zlib.crc32
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = cpuinfo.read(1 << 16)
    except OSError:
        return crc32
    return crc32 if " pclmulqdq" in flags else zlib.crc32


_page_crc32 = _page_crc_function()

ZERO_PAGE = bytes(PAGE_SIZE)
ZERO_PAGE_CRC = zlib.crc32(ZERO_PAGE)
# Generations wrap 255 -> 1: 0 stays "never written", so an unwritten slot can never
# pass for a written one. A stale copy exactly 255 writes behind would pass the check:
# one slot must be rewritten 255 times while one replica misses every one of them.
NEVER_WRITTEN = 0
MAX_GENERATION = 255

_IDENTITY = struct.Struct("<QB")


def area_seed(area: str) -> int:
    return zlib.crc32(area.encode())


def next_generation(generation: int) -> int:
    return generation % MAX_GENERATION + 1


def slot_seed(area: int, slot: int, generation: int) -> int:
    return zlib.crc32(_IDENTITY.pack(slot, generation), area)


def page_tag(page: bytes | bytearray | memoryview, area: int, slot: int, generation: int) -> int:
    return _page_crc32(page, slot_seed(area, slot, generation))


def batch_tags(
    data: bytes | bytearray | memoryview, area: int, slots: Sequence[int], generations: bytes
) -> tuple[int, ...]:
    """One tag per PAGE_SIZE page of `data`, for slots[i] at generations[i]."""
    view, crc32, seed, pack = memoryview(data), _page_crc32, zlib.crc32, _IDENTITY.pack
    return tuple(
        crc32(view[i * PAGE_SIZE : (i + 1) * PAGE_SIZE], seed(pack(slot, generations[i]), area))
        for i, slot in enumerate(slots)
    )


def page_crc(page: bytes | bytearray | memoryview) -> int:
    """The plain CRC32, for what has no slot: whole files, index records."""
    return _page_crc32(page)
