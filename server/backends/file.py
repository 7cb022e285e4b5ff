"""File backend: pages in one file, the index persisted atomically on flush.

Layout under --path DIR: `pages` (capacity x 4 KiB, sparse, pread/pwrite at
page * 4096) and `index` (the slot maps and checksums, replaced by rename).

Crash rule: a store restarted on the same path serves every page it had
acknowledged before the last completed Flush. To make that true without a
journal, writes are copy-on-write: a rewritten slot gets a fresh arena page and
the old one is only reused after the next flush, so the persisted index never
points at data newer than itself. Flush = fsync(pages), write index.tmp,
fsync, rename, fsync(dir). When the free stack runs dry the backend flushes on
its own to reclaim retired pages before answering ENOSPC.
"""

from __future__ import annotations

import errno
import json
import os
import struct
from array import array
from pathlib import Path

from netswap.protocol import PAGE_SIZE, StoreError

from .base import UNMAPPED, Area, PageBackend

_MAGIC = b"NSWPIDX1"
_LEN = struct.Struct("<Q")


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
        if self._retired and needed <= len(self.free) + len(self._retired):
            self.flush()
            return
        super()._make_room(needed)

    # -- durability ---------------------------------------------------------
    def flush(self) -> None:
        os.fsync(self._fd)
        self._write_index()
        # Only now may pages that the old index referenced be overwritten.
        self.free.extend(self._retired)
        self._retired.clear()

    def _write_index(self) -> None:
        header = {
            "capacity_pages": self.capacity_pages,
            "areas": [[a.name, a.pages] for a in self.areas.values()],
        }
        tmp = self.path / "index.tmp"
        with open(tmp, "wb") as f:
            blob = json.dumps(header).encode()
            f.write(_MAGIC + _LEN.pack(len(blob)) + blob)
            for area in self.areas.values():
                f.write(area.slot_map.tobytes())
            f.write(self.checksums.tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path / "index")
        dir_fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def _load_index(self) -> None:
        index = self.path / "index"
        if not index.exists():
            return
        try:
            self._parse_index(index, index.read_bytes())
        except (KeyError, TypeError, struct.error, json.JSONDecodeError) as exc:
            raise ValueError(f"{index}: corrupt index ({exc.__class__.__name__})") from None

    def _parse_index(self, index: Path, raw: bytes) -> None:
        if raw[:8] != _MAGIC:
            raise ValueError(f"{index}: not a netswap index")
        (length,) = _LEN.unpack_from(raw, 8)
        header = json.loads(raw[16 : 16 + length])
        if header["capacity_pages"] > self.capacity_pages:
            raise ValueError(
                f"{index} holds {header['capacity_pages']} pages; capacity cannot shrink"
            )
        offset = 16 + length
        used: set[int] = set()
        for name, pages in header["areas"]:
            area = self.areas[name] = Area(name, 0)
            area.slot_map = array("i")
            area.slot_map.frombytes(raw[offset : offset + 4 * pages])
            offset += 4 * pages
            mapped = [p for p in area.slot_map if p != UNMAPPED]
            area.used = len(mapped)
            used.update(mapped)
        old = header["capacity_pages"]
        self.checksums[:old] = array("I", raw[offset : offset + 4 * old])
        self.free = array("i", (p for p in range(self.capacity_pages - 1, -1, -1) if p not in used))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
