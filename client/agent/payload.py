"""What a page becomes on its way to the stores: a payload the store never looks into (#31).

- A same-filled page -- one 8-byte word repeated, the zero page above all -- is
  FILL bytes: the word. Its swap-in needs no store (the device remembers it) and
  its store keeps a few bytes; it still goes to the stores, so that a restarted
  agent finds the page's newest generation there.
- A page lz4 compresses to at most THRESHOLD bytes with its 2-byte length header
  is that header, the lz4 block and zeros to the next GRANULE.
- Any other page goes whole: PAGE_SIZE bytes.

Why these numbers (tests/corpus/RESULTS.md, 81,920 pages of real anonymous
memory): lz4's default mode gives 2.59x raw and 0.420 bytes stored per byte
swapped under these rules (the issue's bound is 0.45) at 4.8 us to compress
and 1.3 us to decompress a page; a page above 3,072 B is stored whole (the
ratio is flat from 70 % of a page up, 0.419 at 75 %); 256-byte granules cost
3 % against exact lengths and leave the store 13 classes to learn. What the
store learns of a sealed page is its payload's length: same-filled, whole, or
which granule its compressed size falls in (`compress=off` sends every page
whole: the store learns nothing but that a page was written).

An incompressible page costs one lz4 call (its output is longer than the
threshold): no probe, which wrongly sent 0.7 % of real pages whole for 0.6 us.

The compress call is the system liblz4's (the same block format python-lz4 bundles)
through ctypes.PyDLL, which keeps the GIL for the call: python-lz4 releases it
around every page, and with the device's writers and the agent's loop waiting
for it each release is a hand-off (a futex wake and a switch, and the page's
thread waits to get it back). Measured on 128 KiB random writes at QD8, agent
CPU per page, same machine and load: 11.9 us with python-lz4 against 7.3 with
compress=off, of which lz4 itself is 1.2. It also compresses into buffers made
once (the reserve's and a scratch per thread), not a new bytes per page, and
stops at THRESHOLD (an incompressible page costs less than a full block).
Without liblz4 (another libc, a trimmed image) python-lz4's call does it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from array import array
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import lz4.block
from netswap.protocol import PAGE_SIZE

if TYPE_CHECKING:
    from .seal import Sealer

FILL = 8  # a same-filled page's payload: its word
GRANULE = 256
THRESHOLD = 3072  # 75 % of a page: above it, a page goes whole
HEADER = 2  # the lz4 block's length, little-endian
_WORDS = PAGE_SIZE // FILL
_ZEROS = bytes(GRANULE)


def _liblz4() -> Callable[[int, int, int, int], int] | None:
    """liblz4's LZ4_compress_default(src, dst, size, capacity) -> bytes (0: it does not
    fit), called with the GIL held (PyDLL); None where the library is not found."""
    name = ctypes.util.find_library("lz4")
    try:
        fn = ctypes.PyDLL(name or "liblz4.so.1").LZ4_compress_default
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int
    compress: Callable[[int, int, int, int], int] = fn
    return compress


_COMPRESS = _liblz4()
_local = threading.local()


def _scratch() -> tuple[memoryview, int]:
    """This thread's buffer for an lz4 block (made once per thread, as seal.py's)."""
    found: tuple[memoryview, int] | None = getattr(_local, "scratch", None)
    if found is None:
        buf = bytearray(THRESHOLD)
        found = _local.scratch = (memoryview(buf), ctypes.addressof(ctypes.c_char.from_buffer(buf)))
    return found


def encode(page: memoryview, out: memoryview, compress: bool = True) -> int:
    """Write page's payload into out (a writable PAGE_SIZE buffer); its length."""
    head = page[:FILL]
    if head == page[FILL : 2 * FILL] and page == bytes(head) * _WORDS:
        out[:FILL] = head
        return FILL
    if compress and _COMPRESS is not None:
        n = len(page)
        out[:n] = page  # whole unless it compresses; out is ours to read from
        scratch, at = _scratch()
        src = ctypes.addressof(ctypes.c_char.from_buffer(out))
        size: int = _COMPRESS(src, at, n, THRESHOLD - HEADER)
        if size == 0:
            return PAGE_SIZE
        length = -(-(size + HEADER) // GRANULE) * GRANULE
        out[:HEADER] = size.to_bytes(HEADER, "little")
        out[HEADER : HEADER + size] = scratch[:size]
        out[HEADER + size : length] = _ZEROS[: length - HEADER - size]
        return length
    if compress:
        packed = lz4.block.compress(page, store_size=False)
        size = len(packed)
        if size + HEADER <= THRESHOLD:
            length = -(-(size + HEADER) // GRANULE) * GRANULE
            out[:HEADER] = size.to_bytes(HEADER, "little")
            out[HEADER : HEADER + size] = packed
            out[HEADER + size : length] = _ZEROS[: length - HEADER - size]
            return length
    out[:PAGE_SIZE] = page
    return PAGE_SIZE


def decode(payload: memoryview, out: memoryview) -> bool:
    """The page of `payload` into out (PAGE_SIZE bytes); False when the payload is not
    one this module makes (a length it never writes, an lz4 block that does not give a
    page): the caller answers EIO."""
    length = len(payload)
    if length == PAGE_SIZE:
        out[:] = payload
        return True
    if length == FILL:
        out[:] = bytes(payload) * _WORDS
        return True
    if length % GRANULE or not GRANULE <= length <= THRESHOLD:
        return False
    size = int.from_bytes(payload[:HEADER], "little")
    if size + HEADER > length:
        return False
    try:
        page = lz4.block.decompress(payload[HEADER : HEADER + size], uncompressed_size=PAGE_SIZE)
    except lz4.block.LZ4BlockError:
        return False
    if len(page) != PAGE_SIZE:
        return False
    out[:] = page
    return True


def reveal(payload: memoryview, out: memoryview, sealer: Sealer | None,
           seal: memoryview | None, slot: int, generation: int) -> bool:  # fmt: skip
    """A proven payload's page into out: opened (sealed areas), then decoded. False when
    it does not open (tampered with, the key gone) or does not decode: EIO."""
    if sealer is not None:
        if seal is None:
            return False
        plain = memoryview(bytearray(len(payload)))
        if not sealer.open(plain, payload, seal, slot, generation):
            return False
        payload = plain
    return decode(payload, out)


def split(data: memoryview, lengths: Sequence[int]) -> list[memoryview]:
    """Payloads back to back in `data`, as one view each."""
    out, at = [], 0
    for length in lengths:
        out.append(data[at : at + length])
        at += length
    return out


def lengths_of(reply: object, count: int) -> array[int]:
    """A Pages answer's payload lengths (a frame of whole pages carries none)."""
    lengths: array[int] | None = getattr(reply, "lengths", None)
    return lengths if lengths is not None else whole(count)


def whole(count: int) -> array[int]:
    """The lengths of `count` whole pages."""
    return array("H", [PAGE_SIZE]) * count


def fill_word(payload: memoryview) -> int | None:
    """The word of a same-filled page's payload (None for any other)."""
    return int.from_bytes(payload, "little") if len(payload) == FILL else None
