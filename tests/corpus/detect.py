"""Cheap verdicts before compressing: is a page same-filled, is it incompressible.

Same-filled: several ways Python can tell a page made of one 8-byte word, each
a one-liner the agent could use, timed on the corpus's pages (mostly not
same-filled: how fast a method rejects matters most), on zero pages and on a
worst case (a filled page whose last byte differs). The agent gets a
memoryview from nbdkit, so each method is also timed on one.

Incompressible: probes that guess from less work than a full compress whether a
page will end above the threshold, timed on random pages and checked on the
corpus, where a wrong "incompressible" costs bytes (the page is stored whole).
"""

from __future__ import annotations

import array
import functools
from collections.abc import Callable

import lz4.block

from .measure import PAGE

Page = bytes | memoryview  # the agent's copy, or nbdkit's buffer
Detector = Callable[[Page], bool]


def by_repeat(p: Page) -> bool:
    return bytes(p[:8]) * 512 == p


def by_shift(p: Page) -> bool:
    return p[8:] == p[:-8]  # period 8: equal to itself shifted by one word


def by_count(p: Page) -> bool:
    return bytes(p).count(bytes(p[:8])) == 512  # 512 disjoint copies tile the page


def by_array(p: Page) -> bool:
    a = array.array("Q")
    a.frombytes(p)
    return min(a) == max(a)


def by_cast(p: Page) -> bool:
    q = memoryview(p).cast("Q")
    return min(q) == max(q)


def by_prefix_then_repeat(p: Page) -> bool:
    """Two words first (most pages differ there), the whole page only when they match."""
    return p[:8] == p[8:16] and bytes(p[:8]) * 512 == p


def same_filled_detectors() -> dict[str, Detector]:
    out: dict[str, Detector] = {
        "p[:8] * 512 == p": by_repeat,
        "p[:8] == p[8:16] and p[:8] * 512 == p": by_prefix_then_repeat,
        "p[8:] == p[:-8]": by_shift,
        "p.count(p[:8]) == 512": by_count,
        "array('Q', p): min == max": by_array,
        "memoryview.cast('Q'): min == max": by_cast,
    }
    try:
        import numpy as np
    except ImportError:
        return out

    def by_numpy(p: Page) -> bool:
        a = np.frombuffer(p, dtype=np.uint64)
        return bool((a == a[0]).all())

    out["numpy: (a == a[0]).all()"] = by_numpy
    return out


def zero_only(p: Page, zero: bytes = bytes(PAGE)) -> bool:
    """Zero pages only (>99 % of same-filled pages at Meta): one memcmp against a constant."""
    return p == zero


def worst_case() -> bytes:
    """A filled page whose last byte differs: every full check reads all of it."""
    return bytes(PAGE - 1) + b"\x01"


# Incompressible probes: True means "store it whole without a full compress".
def probe_head(p: Page, size: int = 256) -> bool:
    """lz4 on the first `size` bytes: no saving there means none likely in the rest."""
    return len(lz4.block.compress(p[:size], store_size=False)) >= size


FAST = functools.partial(lz4.block.compress, store_size=False, mode="fast", acceleration=64)


def probe_fast(p: Page) -> bool:
    """A whole-page lz4 at acceleration 64 (it skips ahead faster where nothing matches):
    at that speed real pages compress poorly, so only "no saving at all" is taken."""
    return len(FAST(p)) >= PAGE


def probes() -> dict[str, Detector]:
    return {
        "lz4 on the first 256 B": probe_head,
        "lz4 on the first 512 B": functools.partial(probe_head, size=512),
        "lz4 accel 64, whole page, no saving": probe_fast,
    }
