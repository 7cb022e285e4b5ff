"""The page-store core shared by every backend: areas, slot maps, free list.

A store holds `capacity` pages in one arena (an mmap or a file); an area is a
named swap area of `pages` slots whose slot map says which arena page holds
each slot (-1: never written, reads as zeros). Metadata is three flat arrays
-- slot map (4 B/slot), checksums (4 B/page), free stack (4 B/page) -- about
12 bytes per 4 KiB page, 0.3 %, instead of a dict of page objects.

Backends supply only how an arena page is stored, loaded and synced. Nothing
here is thread-safe: the store's event loop, or nbdkit serialising all
requests, is the single caller.
"""

from __future__ import annotations

import errno
import zlib
from array import array
from collections.abc import Iterable, Sequence

from netswap.protocol import PAGE_SIZE, ZERO_PAGE_CRC, StoreError

UNMAPPED = -1
# array('i') indexes arena pages: 2**31 pages of 4 KiB is 8 TiB per store.
MAX_CAPACITY_PAGES = (1 << 31) - 1


def _is_run(pages: array[int]) -> bool:
    """True when pages are p, p+1, p+2, ... (and p is mapped)."""
    first = pages[0]
    return pages[-1] - first == len(pages) - 1 and pages == array(
        "i", range(first, first + len(pages))
    )


class Area:
    """One swap area: slot -> arena page, and how many slots are mapped."""

    __slots__ = ("name", "slot_map", "used")

    def __init__(self, name: str, pages: int) -> None:
        self.name = name
        self.slot_map = array("i", [UNMAPPED]) * pages
        self.used = 0

    @property
    def pages(self) -> int:
        return len(self.slot_map)


class PageBackend:
    """Common slot bookkeeping; subclasses implement the arena I/O."""

    kind = "abstract"

    def __init__(self, capacity_pages: int, verify: bool = True) -> None:
        if not 0 < capacity_pages <= MAX_CAPACITY_PAGES:
            raise ValueError(f"capacity must be 1..{MAX_CAPACITY_PAGES} pages")
        self.capacity_pages = capacity_pages
        self.verify = verify
        self.areas: dict[str, Area] = {}
        self.checksums = array("I", [0]) * capacity_pages
        # A stack of free arena pages; popping from the end hands out 0, 1, 2, ...
        self.free = array("i", range(capacity_pages - 1, -1, -1))
        self.counters = {
            "pages_written": 0,
            "pages_read": 0,
            "pages_discarded": 0,
            "checksum_errors": 0,
            "enospc": 0,
        }

    # -- arena I/O, per backend -------------------------------------------------
    def _store(self, page: int, data: memoryview) -> None:
        raise NotImplementedError

    def _load(self, page: int, out: memoryview) -> None:
        raise NotImplementedError

    def _store_run(self, page: int, count: int, data: memoryview) -> None:
        for i in range(count):
            self._store(page + i, data[i * PAGE_SIZE : (i + 1) * PAGE_SIZE])

    def _load_run(self, page: int, count: int, out: memoryview) -> None:
        for i in range(count):
            self._load(page + i, out[i * PAGE_SIZE : (i + 1) * PAGE_SIZE])

    def _retire(self, page: int) -> None:
        """A page is no longer referenced; by default it is free at once."""
        self.free.append(page)

    def flush(self) -> None:
        """Make every acknowledged write durable (no-op for memory)."""

    def close(self) -> None:
        """Release the arena."""

    # -- areas --------------------------------------------------------------
    def activate(self, name: str, pages: int) -> Area:
        area = self.areas.get(name)
        if area is None:
            area = self.areas[name] = Area(name, pages)
        elif pages > area.pages:
            area.slot_map.extend(array("i", [UNMAPPED]) * (pages - area.pages))
        elif pages < area.pages:
            raise StoreError(errno.EINVAL, f"area {name} has {area.pages} slots; cannot shrink")
        return area

    def release(self, name: str) -> None:
        area = self.areas.pop(name, None)
        if area is not None:
            self._unmap(area, range(area.pages))

    def area(self, name: str) -> Area:
        area = self.areas.get(name)
        if area is None:
            raise StoreError(errno.ENXIO, f"area {name} is not active (send Swapfile first)")
        return area

    # -- pages --------------------------------------------------------------
    def write(
        self, area: Area, slots: Sequence[int], data: memoryview, crcs: Sequence[int] | None
    ) -> None:
        """Store len(slots) pages from `data`; all of them or (on error) none."""
        self._check_slots(area, slots)
        slot_map = area.slot_map
        cow = self.copy_on_write
        needed = len(slots) if cow else sum(1 for s in slots if slot_map[s] == UNMAPPED)
        if needed > len(self.free):
            self._make_room(needed)
        for i, slot in enumerate(slots):
            view = data[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]
            crc = crcs[i] if crcs is not None else (zlib.crc32(view) if self.verify else 0)
            page = slot_map[slot]
            if page == UNMAPPED:
                page = slot_map[slot] = self.free.pop()
                area.used += 1
            elif cow:
                self._retire(page)
                page = slot_map[slot] = self.free.pop()
            self._store(page, view)
            self.checksums[page] = crc
        self.counters["pages_written"] += len(slots)

    # Memory overwrites a slot's page in place; the file backend writes a fresh page
    # so that the index persisted at the last flush never points at newer data.
    copy_on_write = False

    def _make_room(self, needed: int) -> None:
        """Called when the free stack is short; raise ENOSPC unless room can be made."""
        self.counters["enospc"] += 1
        raise StoreError(errno.ENOSPC, f"store full: {needed} pages needed, {len(self.free)} free")

    def read(self, area: Area, slots: Sequence[int], out: memoryview) -> list[int]:
        """Fill `out` with the pages of `slots`; returns their checksums."""
        self._check_slots(area, slots)
        slot_map = area.slot_map
        crcs: list[int] = []
        for i, slot in enumerate(slots):
            view = out[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]
            page = slot_map[slot]
            if page == UNMAPPED:
                view[:] = bytes(PAGE_SIZE)
                crcs.append(ZERO_PAGE_CRC)
                continue
            self._load(page, view)
            crc = self.checksums[page]
            if self.verify and zlib.crc32(view) != crc:
                self.counters["checksum_errors"] += 1
                raise StoreError(errno.EIO, f"checksum mismatch in {area.name} slot {slot}")
            crcs.append(crc)
        self.counters["pages_read"] += len(slots)
        return crcs

    # -- contiguous ranges (NBD requests) ---------------------------------------
    # A multi-page NBD request covers consecutive slots; when those map to
    # consecutive arena pages the whole request is one copy (one pwrite for the
    # file backend) instead of a Python loop per page. Fresh writes take a run
    # off the free stack when its top is one, so sequentially written areas
    # stay contiguous.

    def write_range(self, area: Area, first: int, count: int, data: memoryview) -> None:
        self._check_range(area, first, count)
        slot_map = area.slot_map
        current = slot_map[first : first + count]
        if not self.copy_on_write and current[0] != UNMAPPED and _is_run(current):
            page = current[0]
        else:
            run = self._take_run(count)
            if run is None:
                self.write(area, range(first, first + count), data, None)
                return
            for old in current:
                if old != UNMAPPED:
                    self._retire(old)
            area.used += current.count(UNMAPPED)
            slot_map[first : first + count] = array("i", range(run, run + count))
            page = run
        self._store_run(page, count, data)
        if self.verify:
            crc32 = zlib.crc32
            self.checksums[page : page + count] = array(
                "I", (crc32(data[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]) for i in range(count))
            )
        self.counters["pages_written"] += count

    def read_range(self, area: Area, first: int, count: int, out: memoryview) -> None:
        self._check_range(area, first, count)
        current = area.slot_map[first : first + count]
        page = current[0]
        if page == UNMAPPED or not _is_run(current):
            self.read(area, range(first, first + count), out)
            return
        self._load_run(page, count, out)
        if self.verify:
            crc32, sums = zlib.crc32, self.checksums
            for i in range(count):
                if crc32(out[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]) != sums[page + i]:
                    self.counters["checksum_errors"] += 1
                    raise StoreError(
                        errno.EIO, f"checksum mismatch in {area.name} slot {first + i}"
                    )
        self.counters["pages_read"] += count

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

    def discard(self, area: Area, start: int, count: int) -> None:
        if start + count > area.pages:
            raise StoreError(errno.EINVAL, f"discard beyond area end ({area.pages} slots)")
        self._unmap(area, range(start, start + count))

    def _unmap(self, area: Area, slots: Iterable[int]) -> None:
        slot_map = area.slot_map
        freed = 0
        for slot in slots:
            page = slot_map[slot]
            if page != UNMAPPED:
                slot_map[slot] = UNMAPPED
                self._retire(page)
                freed += 1
        area.used -= freed
        self.counters["pages_discarded"] += freed

    def _check_slots(self, area: Area, slots: Sequence[int]) -> None:
        limit = area.pages
        for slot in slots:
            if not 0 <= slot < limit:
                raise StoreError(errno.EINVAL, f"slot {slot} outside area {area.name} ({limit})")

    # -- accounting ---------------------------------------------------------
    @property
    def used_pages(self) -> int:
        return self.capacity_pages - len(self.free)

    def metadata_bytes(self) -> int:
        """Bytes of index kept per store: what 'overhead per page' measures."""
        total = self.checksums.itemsize * len(self.checksums)
        total += self.free.itemsize * self.free.buffer_info()[1]
        total += sum(a.slot_map.itemsize * len(a.slot_map) for a in self.areas.values())
        return total

    def stats(self) -> dict[str, int]:
        return {
            **self.counters,
            "capacity_pages": self.capacity_pages,
            "used_pages": self.used_pages,
            "areas": len(self.areas),
            "metadata_bytes": self.metadata_bytes(),
        }
