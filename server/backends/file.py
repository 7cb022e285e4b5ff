"""File backend: pages in one file, the index persisted atomically on flush.

Layout under --path DIR: `pages` (capacity x 4 KiB, sparse, pread/pwrite at
page * 4096) and `index` (slot maps, tags and generations in checksummed
records: index.py; replaced by rename).

Crash rule: a store restarted on the same path serves every page it had
acknowledged before the last completed Flush. To make that true without a
journal, writes are copy-on-write: a rewritten slot gets a fresh arena page and
the old one is only reused after the next flush, so the persisted index never
points at data newer than itself. Flush = fsync(pages), write index.tmp,
fsync, rename, fsync(dir). When the free stack runs dry the backend flushes on
its own to reclaim retired pages; when even that leaves no page to spare, a
rewrite goes in place (base.py: its tag then disagrees with the flushed index,
so a crash makes that slot EIO, not stale) and only new slots get ENOSPC.
"""

from __future__ import annotations

import errno
import os
import struct
from array import array
from collections.abc import Iterator
from pathlib import Path

from netswap.protocol import PAGE_SIZE, StoreError

from . import index
from .base import PageBackend
from .slotmap import CLUSTER_SLOTS, UNMAPPED


class FileBackend(PageBackend):
    kind = "file"
    copy_on_write = True

    def __init__(self, path: str | os.PathLike[str], capacity_pages: int, verify: bool = True):
        super().__init__(capacity_pages, verify)
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path / "pages", os.O_RDWR | os.O_CREAT, 0o600)
        if os.fstat(self._fd).st_size < capacity_pages * PAGE_SIZE:
            os.ftruncate(self._fd, capacity_pages * PAGE_SIZE)
        self._retired: list[int] = []
        self._load_index()

    # -- arena I/O ----------------------------------------------------------
    def _store(self, page: int, data: memoryview) -> None:
        self._store_run(page, 1, data)

    def _load(self, page: int, out: memoryview) -> None:
        self._load_run(page, 1, out)

    def _store_run(self, page: int, count: int, data: memoryview) -> None:
        try:
            written = os.pwrite(self._fd, data, page * PAGE_SIZE)
        except OSError as exc:
            raise StoreError(exc.errno or errno.EIO, f"page file write: {exc.strerror}") from None
        if written != count * PAGE_SIZE:
            raise StoreError(errno.EIO, "short write to the page file")

    def _load_run(self, page: int, count: int, out: memoryview) -> None:
        try:
            got = os.preadv(self._fd, [out], page * PAGE_SIZE)
        except OSError as exc:
            raise StoreError(exc.errno or errno.EIO, f"page file read: {exc.strerror}") from None
        if got != count * PAGE_SIZE:
            raise StoreError(errno.EIO, "short read from the page file")

    def _retire(self, page: int) -> None:
        self._retired.append(page)

    def _make_room(self, needed: int) -> None:
        if self._retired:  # pages rewritten since the last flush come back after one
            self.flush()

    # -- durability ---------------------------------------------------------
    def flush(self) -> None:
        os.fsync(self._fd)
        self._write_index()
        # Only now may pages that the old index referenced be overwritten.
        self.free.extend(self._retired)
        self._retired.clear()

    def _write_index(self) -> None:
        numbers = {name: n for n, name in enumerate(self.areas)}
        count = sum(len(a.clusters) for a in self.areas.values())
        tmp = self.path / "index.tmp"
        with open(tmp, "wb") as f:
            areas = [(a.name, a.pages) for a in self.areas.values()]
            index.write(f, self.capacity_pages, areas, self.damaged, self._records(numbers), count)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path / "index")
        dir_fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def _records(self, numbers: dict[str, int]) -> Iterator[index.Cluster]:
        tags, gens = self.tags, self.generations
        for area in self.areas.values():
            for number, cluster in area.clusters.items():
                pages = cluster[:CLUSTER_SLOTS]
                mapped = [(i, p) for i, p in enumerate(pages) if p != UNMAPPED]
                t, g = array("I", [0]) * CLUSTER_SLOTS, bytearray(CLUSTER_SLOTS)
                for i, p in mapped:
                    t[i], g[i] = tags[p], gens[p]
                yield index.Cluster(numbers[area.name], number, pages, t, bytes(g))

    def _load_index(self) -> None:
        path = self.path / "index"
        if not path.exists():
            return
        try:
            loaded = index.read(path.read_bytes(), self.capacity_pages, str(path))
        except (KeyError, TypeError, ValueError, struct.error) as exc:
            if isinstance(exc, index.UnusableIndex):
                raise
            raise index.UnusableIndex(f"{path}: corrupt index ({type(exc).__name__})") from None
        areas = [self.activate(name, pages) for name, pages in loaded.areas]
        used: set[int] = set()
        for c in loaded.clusters:
            area = areas[c.area]
            self.budget.take(area.new_clusters([c.index * CLUSTER_SLOTS]))
            for i, page in enumerate(c.pages):
                if page != UNMAPPED:
                    area.map(c.index * CLUSTER_SLOTS + i, page)
                    self.tags[page], self.generations[page] = c.tags[i], c.generations[i]
                    used.add(page)
        self.damaged = loaded.damaged
        self.counters["index_records_lost"] = loaded.lost
        self.free = array("i", (p for p in range(self.capacity_pages - 1, -1, -1) if p not in used))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
