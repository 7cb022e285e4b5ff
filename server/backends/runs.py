"""Consecutive slots as one run of arena pages: one copy instead of a loop per page.

A multi-page NBD request, a lone swap-out the agent sends on nbdkit's thread (one
slab's consecutive slots: client/agent/direct.py), swap readahead and most
bench batches cover consecutive slots. When those map to consecutive arena pages
the whole run is one copy (one pwrite for the file backend), one slice
assignment of tags and generations and, on reads, one comparison of tags,
instead of base.py's Python loop per page (measured in-process: 32 consecutive
pages written in 15 µs of CPU against 47 µs by the loop). Fresh writes take a run off the
free stack when its top is one, so sequentially written areas stay contiguous.
Anything else, and any run that cannot be placed as one, takes base.py's loop,
which has the same all-or-nothing checks.
"""

from __future__ import annotations

import errno
from array import array
from collections.abc import Sequence

from netswap.protocol import StoreError, tags_of

from .base import LOCAL_GENERATION, BackendCore, Buffer
from .slotmap import UNMAPPED, Area


def _u64s(values: Sequence[int]) -> array[int]:
    return values if isinstance(values, array) and values.typecode == "Q" else array("Q", values)


def _local(count: int) -> array[int]:
    return array("Q", [LOCAL_GENERATION]) * count


def first_of_run(slots: Sequence[int]) -> int | None:
    """slots[0] when slots are s, s+1, s+2, ... (two or more), else None."""
    if isinstance(slots, range):
        return slots.start if len(slots) > 1 and slots.step == 1 else None
    count = len(slots)
    if count < 2 or slots[-1] - slots[0] != count - 1:
        return None
    first = slots[0]
    return first if tuple(slots) == tuple(range(first, first + count)) else None


def is_run(pages: array[int]) -> bool:
    """True when pages are p, p+1, p+2, ... (and p is mapped)."""
    first = pages[0]
    return pages[-1] - first == len(pages) - 1 and pages == array(
        "i", range(first, first + len(pages))
    )


class PageBackend(BackendCore):
    """The backends' base: BackendCore's bookkeeping plus the one-copy runs."""

    def write(
        self,
        area: Area,
        slots: Sequence[int],
        data: memoryview,
        tags: Sequence[int] | None,
        generations: Sequence[int] | None = None,
        seals: Buffer | None = None,
    ) -> None:
        first = first_of_run(slots)
        if first is not None:
            self._check_range(area, first, len(slots))  # a run's bounds: O(1), not per slot
            if self._write_run(area, first, len(slots), data, tags, generations, seals):
                return
        super().write(area, slots, data, tags, generations, seals)

    def read(
        self,
        area: Area,
        slots: Sequence[int],
        out: memoryview,
        seals_out: memoryview | None = None,
    ) -> tuple[array[int], array[int]]:
        first = first_of_run(slots)
        if first is not None:
            self._check_range(area, first, len(slots))
            found = self._read_run(area, first, len(slots), out, seals_out)
            if found is not None:
                return found
        return super().read(area, slots, out, seals_out)

    def write_range(self, area: Area, first: int, count: int, data: memoryview) -> None:
        """The in-process caller's write (the embedded device): tagged here."""
        self._check_range(area, first, count)
        self.write(area, range(first, first + count), data, None)

    def read_range(self, area: Area, first: int, count: int, out: memoryview) -> None:
        self._check_range(area, first, count)
        self.read(area, range(first, first + count), out)

    def _write_run(
        self,
        area: Area,
        first: int,
        count: int,
        data: memoryview,
        tags: Sequence[int] | None,
        generations: Sequence[int] | None,
        seals: Buffer | None,
    ) -> bool:
        """write() of slots first..first+count-1 as one copy; False (nothing done)
        when their pages are not, and cannot be made, one run."""
        current = area.run(first, count)
        if not self.copy_on_write and current[0] != UNMAPPED and is_run(current):
            page = current[0]  # rewritten in place
        else:
            self._check_quota(area, current.count(UNMAPPED))
            taken = self._take_run(count)
            if taken is None:
                return False
            page = taken
            try:
                self._take_clusters(area, range(first, first + count))
            except StoreError:
                self.free.extend(array("i", range(page + count - 1, page - 1, -1)))
                raise
            for i, old in enumerate(current):
                area.map(first + i, page + i)
                if old != UNMAPPED:
                    self._retire(old)
        gens = _u64s(generations) if generations is not None else _local(count)
        if tags is None:
            slots = range(first, first + count)
            tags = tags_of(data, area.seed, slots, gens) if self.verify else array("I", [0]) * count
        self._store_run(page, count, data)
        self.generations[page : page + count] = gens
        self.tags[page : page + count] = tags if isinstance(tags, array) else array("I", tags)
        self._keep_seal(page, seals, 0, count)
        self.counters["pages_written"] += count
        area.written += count
        return True

    def _read_run(
        self, area: Area, first: int, count: int, out: memoryview, seals_out: memoryview | None
    ) -> tuple[array[int], array[int]] | None:
        """read() of slots first..first+count-1 held in one run of pages: one copy,
        and the run's tags checked at once (None: not one run, nothing done)."""
        current = area.run(first, count)
        page = current[0]
        if page == UNMAPPED or not is_run(current):
            return None
        self._load_run(page, count, out)
        tags = self.tags[page : page + count]
        gens = self.generations[page : page + count]
        if self.verify:
            found = tags_of(out, area.seed, range(first, first + count), gens)
            if found != tags:
                bad = next(i for i in range(count) if found[i] != tags[i])
                self.counters["checksum_errors"] += 1
                raise StoreError(errno.EIO, f"tag mismatch in {area.name} slot {first + bad}")
        if seals_out is not None:
            self.seals_into(page, count, seals_out, 0)
        self.counters["pages_read"] += count
        area.read += count
        return tags, gens

    def _take_run(self, count: int) -> int | None:
        """Pop `count` consecutive free pages if the stack's top is such a run."""
        free = self.free
        if count > len(free):
            return None
        top = free[-count:]
        low = top[-1]
        if top[0] - low != count - 1 or top != array("i", range(top[0], low - 1, -1)):
            return None
        del free[-count:]
        return low

    def _check_range(self, area: Area, first: int, count: int) -> None:
        if first < 0 or count < 1 or first + count > area.pages:
            raise StoreError(
                errno.EINVAL, f"slots {first}+{count} outside area {area.name} ({area.pages})"
            )
