"""Size classes: where a store keeps a payload shorter than a page.

A payload (protocol/limits.py) is 1..PAGE_SIZE bytes. A whole page keeps an
arena page of its own, as it always did. A payload of at most INLINE_MAX bytes
(the agent's same-filled pages: the repeated 8-byte word) is kept in its
object's metadata and takes no arena bytes. Any other payload goes to the
size class of its length rounded up to a GRANULE: class c holds payloads of
up to c x 256 bytes, in "zspages" of PAGES[c] arena pages carved into
SPOTS[c] equal spots, as zsmalloc does (mm/zsmalloc.c): a 1.3 KiB payload takes
a 1.5 KiB spot, not a page, and a spot may straddle two of its zspage's pages.

How many pages a class's zspage has is chosen for the least waste at its end
(16k - n*c granules of 16k): the fewest pages among those that waste least,
up to MAX_ZSPAGE_PAGES. Measured on the corpus of real anonymous memory
(tests/corpus; the agent's rule: lz4, a 2-byte length header, 256-byte
granules, stored whole above 3072 B, same-filled pages as 8-byte payloads;
`python -m tests.bench.size_classes`), bytes held per byte of payload:
1.3125 with one page per zspage, 1.119 with up to 2, 1.052 up to 3, 1.027 up
to 4 (zsmalloc's limit), 1.0087 up to 5, 1.0048 up to 8. Five pages cost
little more than four (a zspage in progress per class), and take 2,304..3,072-B
payloads (a third of the corpus) from 2-6 % waste to 0-4 %.
"""

from __future__ import annotations

from netswap.protocol import PAGE_SIZE

GRANULE = 256
GRANULES_PER_PAGE = PAGE_SIZE // GRANULE
# Payloads this short live in their object's metadata: an 8-byte word is what the agent
# sends for a same-filled page (zero pages above all).
INLINE_MAX = 8
# What an inline payload costs the store's capacity: its object's metadata (tag 4 B,
# generation 8, length 2, the word 8, state 1, seal 16, a free-list entry 4, its slot's
# map entry 4: 47 B) rounded up. Charged so that inline payloads are bounded by the
# capacity too: the store reserves an arena page (never written) per INLINE_PER_PAGE.
INLINE_COST = 64
INLINE_PER_PAGE = PAGE_SIZE // INLINE_COST
MAX_ZSPAGE_PAGES = 5
# A spot's index within its zspage fits 4 bits: at most 16 spots (class 1 of one page).
MAX_SPOTS = 16
CLASSES = GRANULES_PER_PAGE  # classes 1..16; class 16 holds payloads of 3841..4095 B


def _zspage(granules: int) -> tuple[int, int]:
    """(pages, spots) of the class's zspage: the least waste, then the fewest pages."""
    best = (1, GRANULES_PER_PAGE // granules)
    for pages in range(2, MAX_ZSPAGE_PAGES + 1):
        spots = GRANULES_PER_PAGE * pages // granules
        if spots > MAX_SPOTS:
            break
        waste = (GRANULES_PER_PAGE * pages - spots * granules) / pages
        if waste < (GRANULES_PER_PAGE * best[0] - best[1] * granules) / best[0]:
            best = (pages, spots)
    return best


_TABLE = [(0, 0)] + [_zspage(c) for c in range(1, CLASSES + 1)]
PAGES = tuple(pages for pages, _ in _TABLE)  # per class: arena pages per zspage
SPOTS = tuple(spots for _, spots in _TABLE)  # per class: payloads per zspage
SPOT_SIZE = tuple(c * GRANULE for c in range(CLASSES + 1))  # per class: bytes per spot


def class_of(length: int) -> int:
    """The class of a payload of `length` bytes (INLINE_MAX < length < PAGE_SIZE)."""
    return (length + GRANULE - 1) // GRANULE


def footprint(length: int) -> int:
    """Bytes of capacity a payload of `length` takes (its class's spot; quotas count it)."""
    if length == PAGE_SIZE:
        return PAGE_SIZE
    if length <= INLINE_MAX:
        return INLINE_COST
    return class_of(length) * GRANULE


def signature() -> list[list[int]]:
    """The layout as a file index records it: a store refuses an index of another."""
    return [[GRANULE, INLINE_MAX, INLINE_COST], list(PAGES)]
