"""Memory backend: one anonymous mmap arena of `capacity` pages (whole pages and
the zspages of shorter payloads, payloads.py).

The arena is reserved up front (MAP_NORESERVE: the kernel backs a page only
when it is first written), so a store's RSS follows its high-water mark and a
busy store never reallocates. Freed pages go back on the free stack and are
reused first; releasing a whole area also hands its memory back with
MADV_DONTNEED.
"""

from __future__ import annotations

import mmap

from netswap.protocol import PAGE_SIZE

from .payloads import PageBackend


class MemoryBackend(PageBackend):
    kind = "memory"

    def __init__(self, capacity_pages: int, verify: bool = True) -> None:
        super().__init__(capacity_pages, verify)
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)
        self._arena = mmap.mmap(-1, capacity_pages * PAGE_SIZE, flags=flags)
        self._view = memoryview(self._arena)

    def _store(self, page: int, data: memoryview) -> None:
        offset = page * PAGE_SIZE
        self._view[offset : offset + PAGE_SIZE] = data

    def _load(self, page: int, out: memoryview) -> None:
        offset = page * PAGE_SIZE
        out[:] = self._view[offset : offset + PAGE_SIZE]

    def _store_run(self, page: int, count: int, data: memoryview) -> None:
        offset = page * PAGE_SIZE
        self._view[offset : offset + count * PAGE_SIZE] = data

    def _load_run(self, page: int, count: int, out: memoryview) -> None:
        offset = page * PAGE_SIZE
        out[:] = self._view[offset : offset + count * PAGE_SIZE]

    def _store_at(self, offset: int, data: memoryview) -> None:
        self._view[offset : offset + len(data)] = data

    def _load_at(self, offset: int, out: memoryview) -> None:
        out[:] = self._view[offset : offset + len(out)]

    def _released(self) -> None:
        self._arena.madvise(mmap.MADV_DONTNEED)

    def close(self) -> None:
        self._view.release()
        self._arena.close()
