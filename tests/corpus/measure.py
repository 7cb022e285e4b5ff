"""Codecs on pages, and the bytes a page would cost under netswap's rules.

A codec is a pair of per-page calls, set up as the agent would call them: one
reusable context (zstandard's compressor and decompressor, a dictionary
precomputed once), keyword arguments bound once with functools.partial. Each
call is timed in a plain loop with the process's CPU clock, best of REPEATS, so
the figure is what the agent pays per page, Python's call overhead included,
and the other CPU's load moves it little.

netswap's rules for the bytes a page costs on a store: a same-filled page (one
8-byte word repeated) costs 0, as it stays in the agent's slot map; a page
whose compressed length exceeds the threshold is stored whole (4096, with a flag
bit); any other page costs its compressed length rounded up to the granule.
Every page is decompressed and compared with its original: a codec that loses
a byte fails the run rather than report a ratio.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import lz4.block
import zstandard

PAGE = 4096
THRESHOLD = 2990  # Google's far memory (ASPLOS'19): ~73 % of a page; the sweep checks it
GRANULE = 256
REPEATS = 3
T = TypeVar("T")


@dataclass(frozen=True)
class Codec:
    name: str
    compress: Callable[[bytes], bytes]
    decompress: Callable[[bytes], bytes]


def same_filled(page: bytes) -> bool:
    """One 8-byte word repeated (zero pages above all): the agent keeps the word, not the page."""
    return page[:8] * 512 == page


def stored_bytes(length: int, threshold: int = THRESHOLD, granule: int = GRANULE) -> int:
    """Bytes a compressed page of `length` costs on a store (same-filled pages never get here)."""
    return PAGE if length > threshold else -(-length // granule) * granule


def lz4_codec(name: str, **kw: object) -> Codec:
    return Codec(
        name,
        functools.partial(lz4.block.compress, store_size=False, **kw),
        functools.partial(lz4.block.decompress, uncompressed_size=PAGE),
    )


def zstd_codec(
    name: str, level: int, dictionary: zstandard.ZstdCompressionDict | None = None
) -> Codec:
    if dictionary is not None:
        dictionary.precompute_compress(level=level)  # once, not per page
        cctx = zstandard.ZstdCompressor(level=level, dict_data=dictionary)
        dctx = zstandard.ZstdDecompressor(dict_data=dictionary)
    else:
        cctx, dctx = zstandard.ZstdCompressor(level=level), zstandard.ZstdDecompressor()
    return Codec(name, cctx.compress, dctx.decompress)


def zlib_codec() -> Codec:
    import zlib

    return Codec("zlib-1", functools.partial(zlib.compress, level=1), zlib.decompress)


def cramjam_codecs() -> list[Codec]:
    """cramjam's lz4 block and zstd, where it is installed (not a dependency: measured only)."""
    try:
        import cramjam
    except ImportError:
        return []
    lz4c = functools.partial(cramjam.lz4.compress_block, store_size=False)
    lz4d = functools.partial(cramjam.lz4.decompress_block, output_len=PAGE)
    return [
        Codec("cramjam lz4", lambda p: bytes(lz4c(p)), lambda c: bytes(lz4d(c))),
        Codec(
            "cramjam zstd-1",
            lambda p: bytes(cramjam.zstd.compress(p, level=1)),
            lambda c: bytes(cramjam.zstd.decompress(c)),
        ),
    ]


def codecs() -> list[Codec]:
    """Every codec and level the bench compares, in table order."""
    out = [lz4_codec("lz4", mode="default")]
    out += [lz4_codec(f"lz4 accel {a}", mode="fast", acceleration=a) for a in (4, 16, 64)]
    out += [lz4_codec(f"lz4hc {c}", mode="high_compression", compression=c) for c in (1, 4, 9)]
    out += [zstd_codec(f"zstd {lv}", lv) for lv in (-5, -3, -1, 1, 3)]
    return [*out, zlib_codec(), *cramjam_codecs()]


def cpu_per_call(call: Callable[[T], object], items: Sequence[T]) -> float:
    """µs of CPU per call over items, best of REPEATS (0.0 when there are none)."""
    if not items:
        return 0.0
    best = float("inf")
    for _ in range(REPEATS):
        start = time.process_time()
        for item in items:
            call(item)
        best = min(best, time.process_time() - start)
    return best / len(items) * 1e6


@dataclass
class Result:
    """One codec on one set of pages."""

    pages: int
    same: int  # same-filled pages (cost 0 under the rules, never compressed by the agent)
    lengths: list[int]  # compressed length of every page, same-filled ones included
    compress_us: float  # per page the agent compresses (not same-filled)
    decompress_us: float  # per page stored compressed (not same-filled, not above threshold)

    def raw_ratio(self) -> float:
        """Compressed bytes over input bytes, every page compressed: the codec alone."""
        return sum(self.lengths) / (self.pages * PAGE)

    def stored(self, threshold: int = THRESHOLD, granule: int = GRANULE) -> int:
        """Bytes on the stores under netswap's rules."""
        return sum(stored_bytes(n, threshold, granule) for n in self.lengths[self.same :])

    def rule_ratio(self, threshold: int = THRESHOLD, granule: int = GRANULE) -> float:
        return self.stored(threshold, granule) / (self.pages * PAGE)

    def whole(self, threshold: int = THRESHOLD) -> int:
        """Pages stored whole: they do not compress below the threshold."""
        return sum(n > threshold for n in self.lengths[self.same :])


def run(codec: Codec, pages: Sequence[bytes], timed: bool = True) -> Result:
    """codec on pages: lengths of all, times over the ones the agent would (de)compress.

    Same-filled pages go first in `lengths` so that Result.stored can skip them.
    """
    same: list[bytes] = []
    rest: list[bytes] = []
    for page in pages:
        (same if same_filled(page) else rest).append(page)
    lengths = [len(codec.compress(p)) for p in same]
    compressed = [codec.compress(p) for p in rest]
    for page, blob in zip(rest, compressed, strict=True):
        if codec.decompress(blob) != page:
            raise AssertionError(f"{codec.name}: a page did not survive compress + decompress")
    lengths += [len(blob) for blob in compressed]
    kept = [blob for blob in compressed if len(blob) <= THRESHOLD]
    return Result(
        len(pages),
        len(same),
        lengths,
        cpu_per_call(codec.compress, rest) if timed else 0.0,
        cpu_per_call(codec.decompress, kept) if timed else 0.0,
    )
