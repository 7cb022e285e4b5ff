"""The end-to-end proof of a page: it is its slot's own, from the write its reader expects.

A page (a payload: whole, or shorter where the agent compresses) proves itself
when its tag, recomputed over its bytes at the generation the store returned
with it, matches the tag the store returned (the tag binds area, slot and
generation: checksum.py), and that generation is the one the reader expects --
all 64 bits of it: a copy from another agent's epoch with the same write count is
not the page. A read that raced writes of the same slot (NBD leaves such a read's
result to any of them) may find a newer generation instead, up to the slot's
newest now (`current`): every generation in between is a write begun after the
read was asked, never an older page. The agent's every read and copy, and the tools' reads, use
this one proof.
"""

from __future__ import annotations

import errno
from array import array
from collections.abc import Callable, Sequence

from .checksum import tags_of, tags_of_sized
from .errors import StoreError
from .limits import PAGE_SIZE
from .messages import Buffer, Pages


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
    """None when every payload (back to back in `data`, each `lengths[i]` long; whole
    pages if None) is its slot's at the expected generation (or the current one);
    else the first failure, as EIO naming the slot."""
    if len(tags) != len(slots) or len(generations) != len(slots):
        return StoreError(errno.EIO, "store returned the wrong number of pages")
    if lengths is None or all(length == PAGE_SIZE for length in lengths):
        computed = tags_of(data, seed, slots, generations)
    else:
        computed = tags_of_sized(data, lengths, seed, slots, generations)
    if computed != tags:
        bad = next(i for i, t in enumerate(computed) if t != tags[i])
        return StoreError(errno.EIO, f"slot {slots[bad]}: its page does not match its tag")
    if generations == expected:
        return None
    now = current() if current is not None else expected
    for i, slot in enumerate(slots):
        if not expected[i] <= generations[i] <= max(expected[i], now[i]):
            return StoreError(errno.EIO, f"slot {slot}: the store holds generation "
                              f"{generations[i]:#x}, not {expected[i]:#x}")  # fmt: skip
    return None


def prove_reply(
    seed: int,
    reply: object,
    slots: Sequence[int],
    expected: array[int],
    current: Callable[[], array[int]] | None = None,
) -> StoreError | None:
    """prove_pages for a SwapIn's answer (anything but Pages is no page)."""
    if not isinstance(reply, Pages):
        return StoreError(errno.EIO, f"a {type(reply).__name__} answered SwapIn")
    return prove_pages(seed, reply.data, reply.tags, reply.generations, slots, expected,
                       current, reply.sized_lengths)  # fmt: skip
