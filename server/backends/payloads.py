"""Payloads shorter than a page: batches that carry lengths, and compaction.

A batch whose frame says lengths (protocol 4: a compressed page, a
same-filled page's word) is written payload by payload: a whole page as
runs.py writes one, a shorter one as an object (objects.py) in its size class
(classes.py), or in the object's metadata when it is a word. Admission comes
first and is whole, as for pages: newer-only, the area's quota in bytes, and
the arena pages the batch's new zspages and whole pages take -- so a batch is
stored entirely or not at all. A store that overwrites in place (memory)
rewrites a slot's object in its spot when the new payload is of the same
class; a copy-on-write store (file) gives it a new spot and retires the old
one until its next flush, as it does pages (with no room to spare, it too
rewrites in place, with the same consequence after a crash: EIO, never the
older payload).

Reads answer each payload at its length, and a batch of whole pages as
runs.py reads it (no lengths: the fast path). Compaction (objects.py says
when) moves payloads out of a class's emptiest zspage, a copy each, between
other work: a store's loop runs it in slices (`_compact_steps`).
"""

from __future__ import annotations

import errno
import itertools
from array import array
from collections.abc import Iterator, Sequence

from netswap.protocol import (
    PAGE_SIZE,
    SEAL_SIZE,
    ZERO_PAGE,
    StoreError,
    page_tag,
    tags_of_sized,
)

from .base import LOCAL_GENERATION, Buffer
from .classes import INLINE_MAX, class_of, footprint
from .objects import MAX_OBJECTS, handle_of, object_of
from .runs import RunBackend, lowest
from .slotmap import UNMAPPED, Area

# Work units (service.py's slices) for one compaction move: a spot's bytes read and
# written again (two pieces at most) and its bookkeeping: 1.3 us compiled in memory,
# a pread and a pwrite more on file (~2-4 us): 20 units of 0.2 us.
MOVE_UNITS = 20

Payloads = tuple[bytearray, "array[int] | None", "array[int]", "array[int]", bytearray | None]


class PageBackend(RunBackend):
    """The backends' base: whole pages in runs, shorter payloads as objects."""

    # -- writes --------------------------------------------------------------------
    def _write_sized(
        self,
        area: Area,
        runs: Sequence[range],
        data: memoryview,
        tags: Sequence[int] | None,
        generations: Sequence[int] | None,
        seals: Buffer | None,
        lengths: array[int],
    ) -> None:
        count = len(lengths)
        gens = _u64s(generations) if generations is not None else _local(count)
        slots = list(itertools.chain.from_iterable(runs))
        if tags is None:
            tags = tags_of_sized(data, lengths, area.seed, slots, gens) if self.verify else \
                array("I", [0]) * count  # fmt: skip
        for run in runs:
            self._check_range(area, run.start, len(run))
        current = array("i")
        for run in runs:
            current.extend(area.run(run.start, len(run)))
        if self.newer_only:
            keep = [h == UNMAPPED or gens[i] > self.held_generation(h)
                    for i, h in enumerate(current)]  # fmt: skip
        else:
            keep = [True] * count
        # Whether each payload may be rewritten where its slot's is (once: both the
        # admission and the placement ask).
        fits = [self._fits(h, lengths[i]) for i, h in enumerate(current)]
        in_place = self._admit_sized(area, slots, current, lengths, keep, fits)
        rewrite = in_place or not self.copy_on_write
        at = 0
        for i, slot in enumerate(slots):
            length = lengths[i]
            if keep[i]:
                view = data[at : at + length]
                seal = seals[i * SEAL_SIZE : (i + 1) * SEAL_SIZE] if seals is not None else None
                there = rewrite and fits[i]
                if length == PAGE_SIZE:
                    self._put_page(area, slot, current[i], view, tags[i], gens[i], seal, there)
                else:
                    self._put_object(area, slot, current[i], view, tags[i], gens[i], seal,
                                     there)  # fmt: skip
            at += length
        written = sum(keep)
        self.counters["pages_written"] += written
        self.counters["pages_superseded"] += count - written
        area.written += written
        area.superseded += count - written
        if self.objects.dirty:
            self._compact()

    def _admit_sized(
        self,
        area: Area,
        slots: list[int],
        current: array[int],
        lengths: array[int],
        keep: list[bool],
        fits: list[bool],
    ) -> bool:
        """Every check before anything is stored; True when a copy-on-write store with no
        room to spare must rewrite in place."""
        more = 0
        for i, handle in enumerate(current):
            if keep[i]:
                more += footprint(lengths[i]) - self._footprint(handle)
        self._check_quota(area, more)
        cow = self.copy_on_write
        needed = self._pages_needed(lengths, keep, fits, not cow)
        if cow and needed > len(self.free):
            self._make_room(needed)
            needed = self._pages_needed(lengths, keep, fits, False)
            if needed > len(self.free):  # no room to spare: in place where it can be
                needed = self._pages_needed(lengths, keep, fits, True)
                if needed <= len(self.free):
                    self._take_clusters(area, slots)
                    return True
        if needed > len(self.free):
            self.counters["enospc"] += 1
            raise StoreError(errno.ENOSPC, f"store full: {needed} pages needed, "
                             f"{len(self.free)} free")  # fmt: skip
        self._take_clusters(area, slots)
        return False

    def _pages_needed(
        self, lengths: array[int], keep: list[bool], fits: list[bool], in_place: bool
    ) -> int:
        pages, inline = 0, 0
        spots: dict[int, int] = {}
        for i, length in enumerate(lengths):
            if not keep[i] or (in_place and fits[i]):
                continue
            if length == PAGE_SIZE:
                pages += 1
            elif length <= INLINE_MAX:
                inline += 1
            else:
                c = class_of(length)
                spots[c] = spots.get(c, 0) + 1
        objects = self.objects
        if objects.count + inline + sum(spots.values()) > MAX_OBJECTS:
            self.counters["enospc"] += 1
            raise StoreError(errno.ENOSPC, f"store holds {objects.count} payloads shorter than "
                             f"a page, of the {MAX_OBJECTS} it may")  # fmt: skip
        return pages + objects.pages_needed(spots, inline)

    def _fits(self, handle: int, length: int) -> bool:
        """Whether a payload of `length` may be rewritten where `handle` is."""
        if handle >= 0:
            return length == PAGE_SIZE
        if handle == UNMAPPED or length == PAGE_SIZE:
            return False
        held = self.objects.lengths[object_of(handle)]
        if held <= INLINE_MAX or length <= INLINE_MAX:
            return held <= INLINE_MAX and length <= INLINE_MAX
        return class_of(held) == class_of(length)

    def _footprint(self, handle: int) -> int:
        if handle >= 0:
            return PAGE_SIZE
        if handle == UNMAPPED:
            return 0
        return footprint(self.objects.lengths[object_of(handle)])

    def _put_page(
        self,
        area: Area,
        slot: int,
        handle: int,
        view: memoryview,
        tag: int,
        gen: int,
        seal: Buffer | None,
        there: bool,
    ) -> None:
        """A whole page: rewritten `there`, where the slot's page is, or on a new one."""
        if there:
            page = handle
        else:
            page = self.free.pop()
            area.map(slot, page)
            if handle != UNMAPPED:
                self._replaced(area, handle)
        self._store(page, view)
        self.tags[page] = tag
        self.generations[page] = gen
        self._keep_seal(page, seal, 0)

    def _put_object(
        self,
        area: Area,
        slot: int,
        handle: int,
        view: memoryview,
        tag: int,
        gen: int,
        seal: Buffer | None,
        there: bool,
    ) -> None:
        """A shorter payload: rewritten `there`, in its slot's object's spot (the same
        class), or as a new object."""
        objects, length = self.objects, len(view)
        if there:
            obj = object_of(handle)
            area.small_bytes += length - objects.lengths[obj]  # the same class: same spot
            objects.lengths[obj] = length
        else:
            obj = objects.new(length, self.free)
            area.map(slot, handle_of(obj))
            self._mapped(area, length)
            if handle != UNMAPPED:
                self._replaced(area, handle)
        self._store_object(obj, view)
        objects.tags[obj] = tag
        objects.generations[obj] = gen
        objects.keep_seal(obj, memoryview(seal) if seal is not None else None)

    def _store_object(self, obj: int, view: memoryview) -> None:
        objects = self.objects
        if len(view) <= INLINE_MAX:
            objects.set_inline(obj, view)
            return
        first, size, rest = objects.pieces(obj)
        self._store_at(first, view[:size])
        if rest >= 0:
            self._store_at(rest, view[size:])

    def _load_spot(self, where: int, out: memoryview) -> None:
        first, size, rest = self.objects.spot_pieces(where, len(out))
        self._load_at(first, out[:size])
        if rest >= 0:
            self._load_at(rest, out[size:])

    # -- reads ---------------------------------------------------------------------
    def read_payloads(self, area: Area, runs: Sequence[range], sealed: bool) -> Payloads:
        """The payloads of `runs` in order, back to back, with their lengths (None: all
        whole pages), tags, generations and (when `sealed`) seals. A slot never written
        reads as a page of zeros at generation 0 -- or EIO on a store whose slot maps
        were damaged; a payload whose tag does not match it at its slot is EIO."""
        for run in runs:
            self._check_range(area, run.start, len(run))
        maps, n = [], 0
        for run in runs:
            maps.append(area.run(run.start, len(run)))
            n += len(run)
        seals = bytearray(n * SEAL_SIZE) if sealed else None
        seals_out = memoryview(seals) if seals is not None else None
        if lowest(maps) >= UNMAPPED:  # whole pages: no lengths
            out = bytearray(n * PAGE_SIZE)
            tags, gens = self._read_maps(area, runs, maps, memoryview(out), seals_out)
            return out, None, tags, gens, seals
        objects = self.objects
        lengths = array("H", [PAGE_SIZE]) * n
        handles = array("i")
        for current in maps:
            handles.extend(current)
        for i, handle in enumerate(handles):
            if handle < UNMAPPED:
                lengths[i] = objects.lengths[object_of(handle)]
        out = bytearray(sum(lengths))
        view = memoryview(out)
        tags, gens = array("I", [0]) * n, array("Q", [0]) * n
        at = 0
        for i, slot in enumerate(itertools.chain.from_iterable(runs)):
            end = at + lengths[i]
            tags[i], gens[i] = self._read_one(area, slot, handles[i], view[at:end])
            if seals_out is not None:
                self._seal_into(handles[i], seals_out[i * SEAL_SIZE : (i + 1) * SEAL_SIZE])
            at = end
        self.counters["pages_read"] += n
        area.read += n
        return out, lengths, tags, gens, seals

    def _read_one(self, area: Area, slot: int, handle: int, out: memoryview) -> tuple[int, int]:
        """One slot's payload into `out` (its length), proven; its tag and generation."""
        if handle >= 0:
            self._load(handle, out)
            return self._verified(area, slot, handle, out), self.generations[handle]
        if handle == UNMAPPED:
            if self.damaged:
                raise StoreError(errno.EIO, f"{area.name} slot {slot}: its map was lost")
            out[:] = ZERO_PAGE
            return self._zero_tag(area, slot), 0
        objects, obj = self.objects, object_of(handle)
        if len(out) <= INLINE_MAX:
            out[:] = objects.inline_word(obj)
        else:
            self._load_spot(objects.where[obj], out)
        tag, gen = objects.tags[obj], objects.generations[obj]
        if self.verify and page_tag(out, area.seed, slot, gen) != tag:
            self.counters["checksum_errors"] += 1
            raise StoreError(errno.EIO, f"tag mismatch in {area.name} slot {slot}")
        return tag, gen

    def _seal_into(self, handle: int, out: memoryview) -> None:
        if handle >= 0:
            self.seals_into(handle, 1, out, 0)
        elif handle == UNMAPPED:
            out[:] = bytes(SEAL_SIZE)
        else:
            out[:] = self.objects.seal(object_of(handle))

    # -- compaction ----------------------------------------------------------------
    def _compact_steps(self) -> Iterator[int]:
        """Move payloads out of the emptiest zspage of each class over its bound (its
        spots go with the copy: at once in memory, at the next flush on file)."""
        objects = self.objects
        while (found := objects.victim()) is not None:
            zs, movers = found
            for obj in movers:
                old = objects.move(obj, zs, self.free)
                if old is None:
                    continue
                buf = memoryview(bytearray(objects.lengths[obj]))
                self._load_spot(old, buf)
                self._store_object(obj, buf)
                if self.copy_on_write:
                    self._retire(handle_of(objects.ghost(old, len(buf))))
                else:
                    self.free.extend(objects.free_where(old))
                self.counters["compaction_moves"] += 1
                yield MOVE_UNITS


def _u64s(values: Sequence[int]) -> array[int]:
    if isinstance(values, array) and values.typecode == "Q":
        return values
    return array("Q", list(values) if isinstance(values, (bytes, bytearray)) else values)


def _local(count: int) -> array[int]:
    return array("Q", [LOCAL_GENERATION]) * count
