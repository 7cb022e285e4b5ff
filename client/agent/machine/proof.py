"""The end-to-end proof of a page: it is its slot's own, from the write the agent expects.

A page proves itself when its tag, recomputed here over its bytes at the
generation the store returned with it, matches the tag the store returned
(the tag binds area, slot and generation: protocol/checksum.py), and that
generation is the slot's newest -- all 64 bits: a copy from another agent's
epoch with the same write count is not the page (P5). A read that raced a write
of the same slot (NBD leaves such a read's result to either) may find the newer
generation instead: `current` gives the generations now.
"""

from __future__ import annotations

import errno
from array import array
from collections.abc import Callable, Sequence

from netswap.protocol import PAGE_SIZE, StoreError, page_tag, tags_of
from netswap.protocol.messages import Buffer


def prove_pages(
    seed: int,
    data: Buffer,
    tags: array[int],
    generations: array[int],
    slots: Sequence[int],
    expected: array[int],
    current: Callable[[], array[int]] | None = None,
    lengths: Sequence[int] | None = None,
) -> StoreError | None:
    """None when every page (payload: `lengths`, whole pages if None) is its slot's at
    the expected generation (or the current one); else the first failure, as EIO
    naming the slot."""
    if len(tags) != len(slots) or len(generations) != len(slots):
        return StoreError(errno.EIO, "store returned the wrong number of pages")
    if lengths is None or all(length == PAGE_SIZE for length in lengths):
        computed = tags_of(data, seed, slots, generations)
    else:
        computed = payload_tags(memoryview(data), lengths, seed, slots, generations)
    if computed != tags:
        bad = next(i for i, t in enumerate(computed) if t != tags[i])
        return StoreError(errno.EIO, f"slot {slots[bad]}: its page does not match its tag")
    if generations == expected:
        return None
    now = current() if current is not None else expected
    for i, slot in enumerate(slots):
        if generations[i] != expected[i] and generations[i] != now[i]:
            return StoreError(errno.EIO, f"slot {slot}: the store holds generation "
                              f"{generations[i]:#x}, not {expected[i]:#x}")  # fmt: skip
    return None


def payload_tags(
    data: memoryview, lengths: Sequence[int], seed: int, slots: Sequence[int],
    generations: Sequence[int],
) -> array[int]:  # fmt: skip
    """One tag per payload (back to back in `data`), as the store computes it."""
    out = array("I")
    at = 0
    for i, length in enumerate(lengths):
        out.append(page_tag(data[at : at + length], seed, slots[i], generations[i]))
        at += length
    return out
