"""Page tags: a CRC32 of the page bound to where it belongs.

A plain checksum proves the bytes are intact, not that they are the right
page: a store whose slot map points slot 0 at slot 1's page would return it
with a valid CRC. So, as T10-DIF's reference tag and ZFS's checksum in the
block pointer do, the tag covers the page's identity too. It is the CRC32 of
the page started from a seed that is itself the CRC32 of (area, slot, write
generation): `crc32(page, slot_seed(...))`. Two seeds give two different tags
for the same bytes (a CRC's initial value shifts it by an invertible
function), so a misdirected read or write, or a copy from before the last
write of that slot, fails its check and is EIO.

A page travels as a payload (limits.py: the page, or what the agent made of it);
the tag is over the payload's bytes, whatever their length (tags_of_sized).

The writer (the agent) picks the generation, a 64-bit number (limits.py): 0
means "never written". The seed costs one more CRC over 16 bytes. It is not a
defence against a malicious store: that is the seal's job (encrypted pages).

Speed: every page is tagged by the agent, checked by the store on the way out
and by the agent on the way back. ISA-L's CRC32 (PyPI `isal`, PCLMULQDQ
folding) gives zlib's value in 0.29 µs per 4 KiB page against zlib's 1.2 µs
here; for the 16-byte seed zlib's call is cheaper. The values are identical,
so hosts with and without it interoperate.
"""

from __future__ import annotations

import struct
import zlib
from array import array
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
NEVER_WRITTEN = 0

_IDENTITY = struct.Struct("<QQ")


def area_seed(area: str) -> int:
    return zlib.crc32(area.encode())


def slot_seed(area: int, slot: int, generation: int) -> int:
    return zlib.crc32(_IDENTITY.pack(slot, generation), area)


def page_tag(page: bytes | bytearray | memoryview, area: int, slot: int, generation: int) -> int:
    return _page_crc32(page, slot_seed(area, slot, generation))


def tags_of(
    data: bytes | bytearray | memoryview,
    area: int,
    slots: Sequence[int],
    generations: Sequence[int],
) -> array[int]:
    """One tag per PAGE_SIZE page of `data`, for slots[i] at generations[i]."""
    view, crc32, seed, pack = memoryview(data), _page_crc32, zlib.crc32, _IDENTITY.pack
    out = array("I", bytes(4 * len(slots)))
    at = 0
    for i, slot in enumerate(slots):
        out[i] = crc32(view[at : at + PAGE_SIZE], seed(pack(slot, generations[i]), area))
        at += PAGE_SIZE
    return out


def tags_of_sized(
    data: bytes | bytearray | memoryview,
    lengths: Sequence[int],
    area: int,
    slots: Sequence[int],
    generations: Sequence[int],
) -> array[int]:
    """One tag per payload of `data`, payloads back to back of lengths[i] bytes each:
    the tag covers the payload as stored (compressed, sealed), not the page it stands
    for. For payloads all PAGE_SIZE long tags_of gives the same tags, a little faster."""
    view, crc32, seed, pack = memoryview(data), _page_crc32, zlib.crc32, _IDENTITY.pack
    out = array("I", bytes(4 * len(slots)))
    at = 0
    for i, slot in enumerate(slots):
        end = at + lengths[i]
        out[i] = crc32(view[at:end], seed(pack(slot, generations[i]), area))
        at = end
    return out


def page_crc(page: bytes | bytearray | memoryview) -> int:
    """The plain CRC32, for what has no slot: whole files, index records."""
    return _page_crc32(page)
