"""File backend: pages in one file, the index persisted atomically on flush.

Layout under --path DIR: `pages` (capacity x 4 KiB, sparse, pread/pwrite at
page * 4096: whole pages and the zspages of shorter payloads, payloads.py) and
`index` (slot maps, lengths, tags, generations and where each payload is, in
checksummed records, and each area's life and holder: index.py; replaced by
rename), and the store's small records (records.py): `id`, `boot`, `clean` and
`floors`.

Crash rule: a store restarted on the same path serves every page it had
acknowledged before the last completed Flush. To make that true without a
journal, writes are copy-on-write: a rewritten slot gets a fresh arena page (or
spot) and the old one is only reused once a flush begun after that completes,
so the persisted index never points at data newer than itself; compaction
copies a payload to a new spot and keeps the old one the same way. Flush = write
index.tmpN (a step per cluster record, between other clients' requests), then,
in a thread off the loop, fsync(pages), fsync(index.tmpN), rename, fsync(dir).
When the free stack runs dry the backend flushes on its own to reclaim retired
pages; when even that leaves no page to spare, a rewrite goes in place
(base.py: its tag then disagrees with the flushed index, so a crash makes that
slot EIO, not stale) and only new slots get ENOSPC.
"""

from __future__ import annotations

import errno
import itertools
import os
import struct
from array import array
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from netswap.protocol import PAGE_SIZE, SEAL_SIZE, StoreError

from . import index, records
from .base import Step
from .classes import INLINE_MAX
from .objects import handle_of, object_of
from .payloads import PageBackend
from .slotmap import CLUSTER_SLOTS, UNMAPPED, Area

# Work units (service.py's slices) for one cluster record: building its 13,072 bytes
# costs 55 us compiled for whole pages (42 us for format 3's 8,208) and 110 us for a
# cluster of mixed payloads, some 500 times the 0.2 us unit.
RECORD_UNITS = 500
# Retired pages and objects freed per step after a flush: an object's spot costs 0.41 us
# compiled (2 units), a page's far less; 1,024 of them are at most ~0.4 ms.
RELEASE_BATCH = 1024


def _nothing() -> None:
    """A Future that is done at once: a waiting flush gives the loop back."""


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
        self._flushing: object | None = None  # the flush under way, if any
        self._tmp_names = itertools.count()
        # fsync takes the disk's time, not ours: it runs here, off the store's loop.
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="netswap-fsync")
        for stale in self.path.glob("index.tmp*"):  # a flush the last process did not end
            stale.unlink()
        self._load_index()
        # Last, once the index has loaded: a store that refuses to start keeps the
        # clean mark of the process before it.
        try:
            self.floors = records.read_floors(self.path / "floors")
            me = records.Incarnation.of_dir(self.path)
        except OSError as exc:
            raise records.UnusableRecord(f"{self.path}: {exc.strerror}") from None
        self.store_id, self.boot, self.prev_boot, self.clean = (
            me.store_id, me.boot, me.prev_boot, me.clean)  # fmt: skip

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

    def _store_at(self, offset: int, data: memoryview) -> None:
        try:
            written = os.pwrite(self._fd, data, offset)
        except OSError as exc:
            raise StoreError(exc.errno or errno.EIO, f"page file write: {exc.strerror}") from None
        if written != len(data):
            raise StoreError(errno.EIO, "short write to the page file")

    def _load_at(self, offset: int, out: memoryview) -> None:
        try:
            got = os.preadv(self._fd, [out], offset)
        except OSError as exc:
            raise StoreError(exc.errno or errno.EIO, f"page file read: {exc.strerror}") from None
        if got != len(out):
            raise StoreError(errno.EIO, "short read from the page file")

    def _load_run(self, page: int, count: int, out: memoryview) -> None:
        try:
            got = os.preadv(self._fd, [out], page * PAGE_SIZE)
        except OSError as exc:
            raise StoreError(exc.errno or errno.EIO, f"page file read: {exc.strerror}") from None
        if got != count * PAGE_SIZE:
            raise StoreError(errno.EIO, "short read from the page file")

    def _retire(self, handle: int) -> None:
        self._retired.append(handle)
        if handle < UNMAPPED:
            self.objects.retire(object_of(handle))

    def _release_steps(self, handles: list[int]) -> Iterator[int]:
        """Free retired pages and objects no index names any more, RELEASE_BATCH at a
        time (an object's spot costs ~2 units, a page's a fraction)."""
        for at in range(0, len(handles), RELEASE_BATCH):
            chunk = handles[at : at + RELEASE_BATCH]
            for handle in chunk:
                if handle >= 0:
                    self.free.append(handle)
                else:
                    self._release(handle)
            yield 2 * len(chunk)

    def _make_room(self, needed: int) -> None:
        # Pages rewritten since the last flush come back after one. Not while a sliced
        # flush is under way: it frees what was retired before it began, when it ends.
        if self._retired and self._flushing is None:
            self.flush()

    # -- durability ---------------------------------------------------------
    def flush_steps(self) -> Iterator[Step]:
        """Flush in steps: one per cluster record, then the fsyncs as a Future.

        The store's other clients go on meanwhile, so the index is built from a
        snapshot of which clusters exist and each record is taken whole at its
        step; the page file is synced after the last record, so every page the
        index names is durable. Only pages retired before the flush began are
        freed at its end: one retired later may still be named by a record.
        """
        while self._flushing is not None:  # another client's flush first: ours covers more
            yield self._io.submit(_nothing)
        me = self._flushing = object()
        tmp = self.path / f"index.tmp{next(self._tmp_names)}"
        try:
            retired = len(self._retired)
            numbers = {id(a): n for n, a in enumerate(self.areas.values())}
            areas = [(a.name, a.pages) for a in self.areas.values()]
            ids = {a.name: (a.area_id, a.holder) for a in self.areas.values()}
            held = [(a, number) for a in self.areas.values() for number in a.clusters]
            with open(tmp, "wb") as f:
                f.write(index.header(self.capacity_pages, areas, self.damaged, len(held), ids))
                for area, number in held:
                    f.write(index.record(self._record(numbers[id(area)], area, number)))
                    yield RECORD_UNITS
                    if self._flushing is not me:
                        return  # a synchronous flush ran meanwhile and covered all of this
            commit = self._io.submit(self._commit, tmp)
            yield commit
            commit.result()  # a failed fsync raises its StoreError here
            done: list[int] = []
            if self._flushing is me:  # no index names them now: out of the list at once
                done = self._retired[:retired]
                del self._retired[:retired]
        finally:
            tmp.unlink(missing_ok=True)  # gone already once committed
            if self._flushing is me:
                self._flushing = None
        yield from self._release_steps(done)
        yield from self._compact_steps()  # the spots freed may leave a class holes

    def floor_steps(self, name: str, epoch: int) -> Iterator[Step]:
        """The floor raised in memory at once, and then in DIR/floors: the Fence is
        answered once the record is durable. The one I/O thread writes them in order,
        each with every floor as it was when it was queued; a floor already there
        waits for the writes queued before it."""
        if self.floors.get(name) == epoch:
            yield self._io.submit(_nothing)
            return
        self._raise_floor(name, epoch)
        done = self._io.submit(self._write_floors, records.floors_record(self.floors))
        yield done
        done.result()  # a failed write raises its StoreError here

    def _write_floors(self, record: bytes) -> None:
        try:
            records.write_atomic(self.path / "floors", record)
        except OSError as exc:
            raise StoreError(exc.errno or errno.EIO, f"floors: {exc.strerror}") from None

    def mark_clean(self) -> None:
        records.mark_clean(self.path, self.boot)

    def flush(self) -> None:
        """The whole flush at once (in-process callers, and the store's shutdown, which
        supersedes a sliced flush that can no longer run)."""
        self._flushing = None
        for step in self.flush_steps():
            if isinstance(step, Future):
                step.result()

    def _commit(self, tmp: Path) -> None:
        """In the I/O thread: pages, then the new index, then its name, durable."""
        try:
            os.fsync(self._fd)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, self.path / "index")
            dir_fd = os.open(self.path, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            raise StoreError(exc.errno or errno.EIO, f"flush: {exc.strerror}") from None

    def _record(self, number: int, area: Area, index_: int) -> index.Cluster:
        """One cluster's record as it is now (empty if its slots went meanwhile)."""
        n, place = CLUSTER_SLOTS, index.PLACE
        cluster = area.clusters.get(index_)
        handles = cluster[:n] if cluster is not None else array("i", [UNMAPPED]) * n
        lengths, t, g = array("H", [0]) * n, array("I", [0]) * n, array("Q", [0]) * n
        spots, places = bytearray(n), array("i", [UNMAPPED]) * (n * place)
        seals = memoryview(bytearray(n * SEAL_SIZE))
        tags, gens, objects = self.tags, self.generations, self.objects
        for i, h in enumerate(handles):
            if h >= 0:
                lengths[i], t[i], g[i], places[i * place] = PAGE_SIZE, tags[h], gens[h], h
                self.seals_into(h, 1, seals, i)
            elif h != UNMAPPED:
                obj = object_of(h)
                length = lengths[i] = objects.lengths[obj]
                t[i], g[i] = objects.tags[obj], objects.generations[obj]
                seals[i * SEAL_SIZE : (i + 1) * SEAL_SIZE] = objects.seal(obj)
                where = objects.where[obj]
                if length <= INLINE_MAX:
                    word = array("i")
                    word.frombytes(where.to_bytes(8, "little"))
                    places[i * place : i * place + 2] = word
                    continue
                pages, spots[i] = objects.location(obj)
                places[i * place : i * place + len(pages)] = pages
        return index.Cluster(number, index_, lengths, t, g, bytes(spots), places, bytes(seals))

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
        areas = [self.activate(name, pages, *loaded.ids.get(name, (0, "")))
                 for name, pages in loaded.areas]  # fmt: skip
        objects, place = self.objects, index.PLACE
        zspages = {first: objects.adopt_zspage(c, held)
                   for first, (c, held, _) in loaded.claims.zspages.items()}  # fmt: skip
        for c in loaded.clusters:
            if not any(c.lengths):
                continue  # its slots went while that flush ran
            area = areas[c.area]
            self.budget.take(area.new_clusters([c.index * CLUSTER_SLOTS]))
            for i, length in enumerate(c.lengths):
                if not length:
                    continue
                slot = c.index * CLUSTER_SLOTS + i
                seal = c.seals[i * SEAL_SIZE : (i + 1) * SEAL_SIZE]
                if length == PAGE_SIZE:
                    page = c.places[i * place]
                    area.map(slot, page)
                    self.tags[page], self.generations[page] = c.tags[i], c.generations[i]
                    if any(seal):
                        self._keep_seal(page, seal, 0)
                    continue
                if length <= INLINE_MAX:
                    word = c.places[i * place : i * place + 2].tobytes()
                    obj = objects.adopt_inline(length, int.from_bytes(word, "little"))
                else:
                    zs = zspages[c.places[i * place]]
                    obj = objects.adopt(length, zs, c.spots[i])
                objects.tags[obj], objects.generations[obj] = c.tags[i], c.generations[i]
                if any(seal):
                    objects.keep_seal(obj, memoryview(seal))
                area.map(slot, handle_of(obj))
                self._mapped(area, length)
        self.damaged = loaded.damaged
        self.counters["index_records_lost"] = loaded.lost
        used = loaded.claims.pages
        self.free = array("i", (p for p in range(self.capacity_pages - 1, -1, -1) if p not in used))
        objects.reserve_inline(self.free)
        self._compact()  # the holes the zspages had at that flush

    def close(self) -> None:
        if self._fd >= 0:
            self._io.shutdown()
            os.close(self._fd)
            self._fd = -1
