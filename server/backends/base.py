"""The page-store core shared by every backend: areas, slot maps, free list.

A store holds `capacity` pages in one arena (an mmap or a file); an area is a
named swap area whose slot map (slotmap.py: sparse by cluster, bounded by the
store's capacity, not by the area's declared size) says where each slot's
payload is. A whole page has an arena page of its own; per arena page the store
keeps the page's tag (4 B: a CRC32 bound to area, slot and write generation --
protocol/checksum.py) and generation (8 B); the free stack adds 4 B: 16 bytes
per 4 KiB page, plus ~4.4 bytes per mapped slot in clusters. A page written
sealed (encrypted by its agent) has its 16-byte seal kept too, in an array made
on the first such write and backed by memory only where written. A shorter
payload is an object (objects.py) in a size class (classes.py), with its tag,
generation, length and seal in the object table.

Capacity counts bytes: the arena's pages in use, whatever holds them (whole
pages, zspages of objects, the pages reserved for inline payloads), against
the arena's size; `used_pages` counts payloads, as it counted pages.

Reads verify the tag against the slot asked for, so a slot map pointing at the
wrong page is EIO, never another slot's data (runs.py reads and writes pages,
a run of consecutive slots at a time). Work that a client can make large
(discarding ranges, releasing an area) comes as generators of work units, so
the store's loop can run it in slices (service.py); the plain methods run them
to the end for in-process callers. Backends supply only how an arena page is
stored, loaded and synced. Nothing here is thread-safe: the store's event
loop, or nbdkit serialising all requests, is the single caller.
"""

from __future__ import annotations

import errno
import mmap
from array import array
from collections.abc import Iterable, Iterator
from concurrent.futures import Future

from netswap.protocol import (
    PAGE_SIZE,
    SEAL_SIZE,
    StoreError,
    page_tag,
)

from .classes import footprint
from .objects import Objects, object_of
from .records import MAX_FLOORS, new_id
from .slotmap import CLUSTER_SLOTS, MAX_AREAS, UNMAPPED, Area, ClusterBudget

Buffer = bytes | bytearray | memoryview

# One step of sliced work: units done (the unit: below), or a Future to wait for.
Step = int | Future[None]

# array('i') indexes arena pages: 2**31 pages of 4 KiB is 8 TiB per store.
MAX_CAPACITY_PAGES = (1 << 31) - 1
# Work units (service.py's slices) for unmapping in a held cluster: scanning its 256
# entries costs ~7 us here, ~35 times the 0.2 us that retiring one page or passing
# over a cluster not held costs, the unit.
HELD_CLUSTER_UNITS = 32
# The generation of pages written by an in-process caller (the embedded device),
# which keeps no generations of its own: the tag still binds them to their slot.
LOCAL_GENERATION = 1


class BackendCore:
    """Common slot bookkeeping; subclasses implement the arena I/O (runs.py adds the
    one-copy paths for consecutive slots and is what the backends extend)."""

    kind = "abstract"

    def __init__(self, capacity_pages: int, verify: bool = True) -> None:
        if not 0 < capacity_pages <= MAX_CAPACITY_PAGES:
            raise ValueError(f"capacity must be 1..{MAX_CAPACITY_PAGES} pages")
        self.capacity_pages = capacity_pages
        self.verify = verify
        self.areas: dict[str, Area] = {}
        self.budget = ClusterBudget(capacity_pages)
        self.tags = array("I", [0]) * capacity_pages
        self.generations = array("Q", [0]) * capacity_pages
        self._seals: mmap.mmap | None = None  # made on the first sealed write
        # A stack of free arena pages; popping from the end hands out 0, 1, 2, ...
        self.free = array("i", range(capacity_pages - 1, -1, -1))
        self.objects = Objects()  # payloads shorter than a page
        # Set when slot maps were lost (a corrupt index record): a slot with no page
        # may then be one whose page was forgotten, so it reads as EIO, not zeros.
        self.damaged = False
        # Bytes of capacity one area may take (0: no bound but the capacity), so that
        # one host cannot fill a store that others share (Area.held_bytes).
        self.area_quota = 0
        # Set by the store's service (not the embedded device, whose every write is
        # LOCAL_GENERATION): a page no newer than the one its slot holds is not
        # written, so a replayed or late frame never rolls a slot back (runs.py).
        self.newer_only = False
        # Who answers (records.py): the store's identity, this process's boot, and for
        # a file store the boot before it and whether that one ended clean.
        self.store_id = new_id()
        self.boot = new_id()
        self.prev_boot = 0
        self.clean = False
        # Per area name, the highest epoch a connection of it fenced with. It outlives
        # the area (a release, a replacement), so a dead agent's frames stay refused.
        self.floors: dict[str, int] = {}
        self.counters = {
            "pages_superseded": 0,
            "pages_written": 0,
            "pages_read": 0,
            "pages_discarded": 0,
            "checksum_errors": 0,
            "enospc": 0,
            "quota_refusals": 0,
            "compaction_moves": 0,
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

    def _store_at(self, offset: int, data: memoryview) -> None:
        """Bytes at an arena offset (an object's piece)."""
        raise NotImplementedError

    def _load_at(self, offset: int, out: memoryview) -> None:
        raise NotImplementedError

    def _retire(self, handle: int) -> None:
        """A page or object is no longer referenced; by default it is free at once."""
        if handle >= 0:
            self.free.append(handle)
        else:
            self._release(handle)

    def _release(self, handle: int) -> None:
        """Free an object, its spot, and any page that frees."""
        pages = self.objects.release(object_of(handle))
        if pages:
            self.free.extend(pages)

    def _compact_steps(self) -> Iterator[int]:
        """Compaction's moves, as work units (payloads.py)."""
        return iter(())

    def _compact(self) -> None:
        for _ in self._compact_steps():
            pass

    def _released(self) -> None:
        """The store holds no area any more (memory hands its arena back to the kernel)."""

    def flush(self) -> None:
        """Make every acknowledged write durable (no-op for memory)."""

    def flush_steps(self) -> Iterator[Step]:
        """The flush as steps for the store's loop: work units, or a Future to await."""
        self.flush()
        return iter(())

    def close(self) -> None:
        """Release the arena."""

    def mark_clean(self) -> None:
        """After the last flush of a graceful shutdown: say so to the next process
        (file: DIR/clean names this boot; memory: nothing outlives the process)."""

    def floor_steps(self, name: str, epoch: int) -> Iterator[Step]:
        """Raise `name`'s floor to `epoch` (the caller checked it is not lower), durable
        when the steps end (file: DIR/floors fsynced in the I/O thread)."""
        self._raise_floor(name, epoch)
        return iter(())

    def _raise_floor(self, name: str, epoch: int) -> None:
        if name not in self.floors and len(self.floors) >= MAX_FLOORS:
            raise StoreError(errno.ENOSPC, f"store keeps the floors of {MAX_FLOORS} areas, "
                             "the most it may")  # fmt: skip
        self.floors[name] = max(epoch, self.floors.get(name, 0))

    # -- areas --------------------------------------------------------------
    def activate(self, name: str, pages: int, area_id: int = 0, holder: str = "") -> Area:
        """Create or grow an area: O(1) at any size, as its clusters come on first write.
        A new area is the life `area_id`, held by `holder`; growing keeps both."""
        area = self.areas.get(name)
        if area is None:
            if len(self.areas) >= MAX_AREAS:
                self.counters["enospc"] += 1
                raise StoreError(errno.ENOSPC, f"store holds {MAX_AREAS} areas, the most it may")
            area = self.areas[name] = Area(name, pages, self.budget, area_id, holder)
        elif pages < area.pages:
            raise StoreError(errno.EINVAL, f"area {name} has {area.pages} slots; cannot shrink")
        area.pages = pages
        return area

    def replace_steps(self, name: str, pages: int, area_id: int, holder: str) -> Iterator[int]:
        """A new life of the area at once, empty; the old one's pages then go back as
        release_steps hands them back."""
        old = self.areas.pop(name, None)
        try:
            self.activate(name, pages, area_id, holder)
        except StoreError:
            if old is not None:
                self.areas[name] = old  # refused: nothing changed
            raise
        if old is not None:
            yield from self._free_steps(old)

    def release_steps(self, name: str) -> Iterator[int]:
        """Drop an area at once (a new activate starts empty), then hand its pages
        back cluster by cluster, yielding the work done (clusters + pages)."""
        area = self.areas.pop(name, None)
        if area is not None:
            yield from self._free_steps(area)

    def _free_steps(self, area: Area) -> Iterator[int]:
        """The pages of an area no longer in `areas`, handed back cluster by cluster."""
        for index in list(area.clusters):
            freed = area.unmap_span(index, 0, CLUSTER_SLOTS)
            self._retire_all(area, freed)
            yield HELD_CLUSTER_UNITS + len(freed) * (1 + self._small_share(freed))
        yield from self._compact_steps()
        if not self.areas:
            self.damaged = False  # no area left for a lost map to be wrong about
            self._released()

    def release(self, name: str) -> None:
        for _ in self.release_steps(name):
            pass

    def area(self, name: str) -> Area:
        area = self.areas.get(name)
        if area is None:
            raise StoreError(errno.ENXIO, f"area {name} is not active (send Swapfile first)")
        return area

    # -- pages (runs.py reads and writes them) ----------------------------------
    def _keep_seal(self, page: int, seals: Buffer | None, index: int, count: int = 1) -> None:
        """Keep seals[index:index+count] for pages page..page+count-1 (or forget theirs)."""
        if seals is None and self._seals is None:
            return
        if self._seals is None:
            # MAP_NORESERVE, zero-filled: memory follows the pages written sealed.
            flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)
            self._seals = mmap.mmap(-1, self.capacity_pages * SEAL_SIZE, flags=flags)
        at, size = page * SEAL_SIZE, count * SEAL_SIZE
        if seals is None:
            self._seals[at : at + size] = bytes(size)
        else:
            self._seals[at : at + size] = seals[index * SEAL_SIZE : index * SEAL_SIZE + size]

    def seals_into(self, page: int, count: int, out: memoryview, index: int) -> None:
        """The seals of pages page..page+count-1 into out[index:] (zeros if none kept)."""
        size, at = count * SEAL_SIZE, index * SEAL_SIZE
        kept = self._seals
        if kept is None:
            out[at : at + size] = bytes(size)
        else:
            out[at : at + size] = kept[page * SEAL_SIZE : page * SEAL_SIZE + size]

    # Memory overwrites a slot's page in place; the file backend writes a fresh page
    # so that the index persisted at the last flush never points at newer data.
    copy_on_write = False

    def _take_clusters(self, area: Area, slots: Iterable[int]) -> None:
        new = area.new_clusters(slots)
        if new:
            try:
                self.budget.take(new)
            except StoreError:
                self.counters["enospc"] += 1
                raise

    def _make_room(self, needed: int) -> None:
        """Called when the free stack is short: reclaim what can be (file: flush)."""

    def _check_quota(self, area: Area, more: int) -> None:
        """Refuse a write that takes the area past its quota (`more` bytes of capacity)."""
        quota = self.area_quota
        if quota and more > 0 and area.held_bytes + more > quota:
            self.counters["enospc"] += 1
            self.counters["quota_refusals"] += 1
            raise StoreError(errno.ENOSPC, f"area {area.name} is at its quota of {quota} bytes "
                             f"(--area-quota): {area.held_bytes} held, {more} more "
                             "asked")  # fmt: skip

    def _unmapped(self, area: Area, handles: Iterable[int]) -> None:
        """Objects that left the area's slots: its figures of shorter payloads."""
        lengths = self.objects.lengths
        for handle in handles:
            if handle < UNMAPPED:
                length = lengths[object_of(handle)]
                area.small -= 1
                area.small_bytes -= length
                area.small_held -= footprint(length)

    def _mapped(self, area: Area, length: int) -> None:
        """An object of `length` bytes came to one of the area's slots."""
        area.small += 1
        area.small_bytes += length
        area.small_held += footprint(length)

    def held_generation(self, handle: int) -> int:
        if handle >= 0:
            return self.generations[handle]
        if handle == UNMAPPED:
            return 0
        return self.objects.generations[object_of(handle)]

    def inventory(
        self, area: Area, first: int, count: int
    ) -> tuple[array[int], array[int], array[int]]:
        """The slots of first..first+count-1 that hold a payload, its generation and its
        length (PAGE_SIZE: a whole page)."""
        if first + count > area.pages:
            raise StoreError(errno.EINVAL, f"inventory beyond area end ({area.pages} slots)")
        slots, gens, lengths = array("Q"), array("Q"), array("H")
        run = area.run(first, count)
        generations, objects = self.generations, self.objects
        for i, handle in enumerate(run):
            if handle >= 0:
                slots.append(first + i)
                gens.append(generations[handle])
                lengths.append(PAGE_SIZE)
            elif handle != UNMAPPED:
                obj = object_of(handle)
                slots.append(first + i)
                gens.append(objects.generations[obj])
                lengths.append(objects.lengths[obj])
        return slots, gens, lengths

    def _verified(self, area: Area, slot: int, page: int, view: memoryview) -> int:
        """The page's tag, once it is proven to be `slot`'s page of `area` (else EIO)."""
        tag = self.tags[page]
        if self.verify and page_tag(view, area.seed, slot, self.generations[page]) != tag:
            self.counters["checksum_errors"] += 1
            raise StoreError(errno.EIO, f"tag mismatch in {area.name} slot {slot}")
        return tag

    def discard_steps(self, area: Area, start: int, count: int) -> Iterator[int]:
        """Unmap slots start..start+count-1, yielding the work done per cluster
        visited: the cost follows what the area holds, not the range's length."""
        if start + count > area.pages:
            raise StoreError(errno.EINVAL, f"discard beyond area end ({area.pages} slots)")
        for span in area.spans(start, count):
            if span is None or span[0] not in area.clusters:
                yield 1  # a cluster not held, passed over
                continue
            freed = area.unmap_span(*span)
            self._retire_all(area, freed)
            area.discarded += len(freed)
            yield HELD_CLUSTER_UNITS + len(freed) * (1 + self._small_share(freed))
        yield from self._compact_steps()

    def discard(self, area: Area, start: int, count: int) -> None:
        for _ in self.discard_steps(area, start, count):
            pass

    def _retire_all(self, area: Area, handles: list[int]) -> None:
        if handles and min(handles) < UNMAPPED:
            self._unmapped(area, handles)
        for handle in handles:
            self._retire(handle)
        self.counters["pages_discarded"] += len(handles)

    @staticmethod
    def _small_share(handles: list[int]) -> int:
        """A unit more per handle when some are objects (freeing a spot costs ~2)."""
        return 1 if handles and min(handles) < UNMAPPED else 0

    # -- accounting ---------------------------------------------------------
    @property
    def used_pages(self) -> int:
        """Payloads held (each stands for a page of some area)."""
        return sum(area.used for area in self.areas.values())

    @property
    def capacity_bytes(self) -> int:
        return self.capacity_pages * PAGE_SIZE

    @property
    def used_bytes(self) -> int:
        """Bytes of capacity in use: arena pages holding anything (whole pages, zspages,
        the reservation for inline payloads, pages a file store keeps until a flush)."""
        return (self.capacity_pages - len(self.free)) * PAGE_SIZE

    @property
    def free_bytes(self) -> int:
        return len(self.free) * PAGE_SIZE

    @property
    def payload_bytes(self) -> int:
        """Bytes of the payloads held: used_bytes / payload_bytes is what they cost."""
        return sum(area.payload_bytes for area in self.areas.values())

    def metadata_bytes(self) -> int:
        """Bytes of index kept per store: what 'overhead per page' measures."""
        total = self.tags.itemsize * len(self.tags)
        total += self.generations.itemsize * len(self.generations)
        total += self.free.itemsize * self.free.buffer_info()[1]
        total += sum(4 * len(c) for a in self.areas.values() for c in a.clusters.values())
        total += self.objects.metadata_bytes()
        return total + (len(self._seals) if self._seals is not None else 0)

    def space(self) -> dict[str, int]:
        """The store's size and use, in payloads and in bytes: what placement needs."""
        return {
            "capacity_pages": self.capacity_pages,
            "used_pages": self.used_pages,
            "capacity_bytes": self.capacity_bytes,
            "used_bytes": self.used_bytes,
            "free_bytes": self.free_bytes,
            "payload_bytes": self.payload_bytes,
        }

    def area_stats(self, area: Area) -> dict[str, int]:
        """What one area's client may see: its own figures, and the store's size and
        use, which placement needs."""
        return {
            **self.space(),
            "area_pages": area.pages,
            "area_used_pages": area.used,
            "area_used_bytes": area.held_bytes,
            "area_payload_bytes": area.payload_bytes,
            "area_pages_written": area.written,
            "area_pages_read": area.read,
            "area_pages_discarded": area.discarded,
            "area_pages_superseded": area.superseded,
            "area_quota_pages": self.area_quota // PAGE_SIZE,
            "area_quota_bytes": self.area_quota,
        }

    def stats(self) -> dict[str, int]:
        objects = self.objects
        return {
            **self.counters,
            **self.space(),
            "areas": len(self.areas),
            "clusters": self.budget.held,
            "clusters_limit": self.budget.limit,
            "metadata_bytes": self.metadata_bytes(),
            "objects": objects.count,
            "inline_payloads": objects.inline,
            "zspages": objects.zspages,
            "zspage_pages": objects.zspage_pages,
        }
