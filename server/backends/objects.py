"""The store's payloads shorter than a page: objects, kept in size classes.

A slot holding a whole page maps to its arena page (>= 0). A slot holding a
shorter payload maps to an object, as the handle -2 - object (UNMAPPED is -1):
the object table keeps its tag, generation, length, seal and where it lives --
its word, if it is inline, or its zspage and spot (classes.py). The handle
never changes while the object lives, so compaction moves an object by
changing where it is, not the slot map, and the file index (which names spots)
is written from the same table.

Per class, zspages that have both used and free spots are kept by how many are
used, and a new payload goes to the fullest one (zsmalloc's rule: fewer
zspages half full). A zspage whose last spot is freed gives its pages back.
Frees leave holes; compaction (`victim`, driven by the backend, which copies
the bytes) empties the emptiest zspage of a class into the holes of the others
whenever the class's holes exceed a zspage's spots plus 1/SLACK of its used
spots: so a class never holds more than (1 + 1/SLACK) x its used spots plus
one zspage, and it takes at most one move per payload freed, amortized (the
emptiest zspage is no fuller than the mean). A copy-on-write store keeps the spot a payload left (a
"ghost" object, retired like any other) until its next flush, as it keeps
rewritten pages. Pure bookkeeping: no I/O here.
"""

from __future__ import annotations

import errno
from array import array

from netswap.protocol import PAGE_SIZE, SEAL_SIZE, StoreError

from .classes import (
    CLASSES,
    INLINE_MAX,
    INLINE_PER_PAGE,
    MAX_SPOTS,
    MAX_ZSPAGE_PAGES,
    PAGES,
    SPOT_SIZE,
    SPOTS,
    class_of,
)

# Handles of objects count down from -2; array('i') slot maps bound them.
MAX_OBJECTS = (1 << 31) - 2
# An object's state: LIVE (a slot maps to it), RETIRED (a copy-on-write store keeps it
# until its next flush: the flushed index may name it), GHOST (a spot a moved payload
# left, kept as RETIRED is), FREE (its id is free).
FREE, LIVE, RETIRED, GHOST = 0, 1, 2, 3
# A zspage's state: unused id, taking payloads, or condemned (being emptied: never
# given a new payload, its pages go back with its last spot).
UNUSED, ACTIVE, CONDEMNED = 0, 1, 2
# Holes a class may keep beyond one zspage's spots, as a share of its used spots: 1/16.
# Measured (tests/bench/size_classes.py, memory store): under churn of corpus payloads
# (runs rewritten or discarded) the store holds 1.032 bytes per byte of payload on
# average (1.056 at worst; 1.037 with no compaction at all, 1.017 at 1/64) for 0.001
# moves per payload written; after 90 % of a store of 256-B payloads is discarded at
# random, 1.064 per live byte (8.15 with no compaction; 1.125 at 1/8, 1.018 at 1/64)
# for 0.66 moves per payload discarded (0.56 at 1/8, 0.80 at 1/64).
SLACK = 16
_SPOT_BITS = 4  # where = zspage << 4 | spot (MAX_SPOTS = 16)
_SPOT_MASK = (1 << _SPOT_BITS) - 1


def handle_of(obj: int) -> int:
    return -2 - obj


def object_of(handle: int) -> int:
    return -2 - handle


class Objects:
    """Every object of one store, and the zspages of its size classes."""

    def __init__(self) -> None:
        # Per object.
        self.tags = array("I")
        self.generations = array("Q")
        self.lengths = array("H")
        self.where = array("Q")  # inline: the payload as a little-endian word
        self.state = array("B")
        self.seals: bytearray | None = None  # made at the first sealed payload
        self.free_ids = array("i")
        # Per zspage: class, state, spots used, free spots (a bitmask), pages, and the
        # object at each spot (for compaction).
        self.zs_class = array("B")
        self.zs_state = array("B")
        self.zs_used = array("B")
        self.zs_free = array("H")
        self.zs_pages = array("i")
        self.zs_objects = array("i")
        self.zs_free_ids = array("i")
        # Per class: ACTIVE zspages with u used spots (0 < u < SPOTS) in partial[c][u],
        # a bit per non-empty u in partial_bits[c]; spots in ACTIVE zspages, and used.
        self.partial: list[list[dict[int, None]]] = [
            [{} for _ in range(SPOTS[c] + 1)] for c in range(CLASSES + 1)
        ]
        self.partial_bits = [0] * (CLASSES + 1)
        self.spots = [0] * (CLASSES + 1)
        self.used = [0] * (CLASSES + 1)
        self.zspages = 0  # ACTIVE or CONDEMNED
        self.zspage_pages = 0  # their arena pages
        self.inline = 0  # inline objects, LIVE or RETIRED
        self.inline_pages: list[int] = []  # arena pages reserved for them (never written)
        self.dirty: set[int] = set()  # classes that freed spots since the last compaction
        self.count = 0  # objects not FREE
        # The holes a class may keep: 1/slack of its used spots (None: no compaction;
        # tests/bench/size_classes.py compares them).
        self.slack: int | None = SLACK

    # -- objects ------------------------------------------------------------------
    def new(self, length: int, free: array[int]) -> int:
        """A LIVE object for a payload of `length` bytes, placed (pages from `free`,
        which the caller checked: pages_needed)."""
        obj = self._new_id()
        self.lengths[obj] = length
        self.state[obj] = LIVE
        if length <= INLINE_MAX:
            self.inline += 1
            if len(self.inline_pages) * INLINE_PER_PAGE < self.inline:
                self.inline_pages.append(free.pop())
            self.where[obj] = 0
        else:
            self.where[obj] = self._take_spot(class_of(length), obj, free)
        return obj

    def _new_id(self) -> int:
        self.count += 1
        if self.free_ids:
            return self.free_ids.pop()
        obj = len(self.state)
        if obj >= MAX_OBJECTS:
            self.count -= 1
            raise StoreError(errno.ENOSPC, f"store holds {MAX_OBJECTS} payloads, the most it may")
        self.tags.append(0)
        self.generations.append(0)
        self.lengths.append(0)
        self.where.append(0)
        self.state.append(FREE)
        if self.seals is not None:
            self.seals += bytes(SEAL_SIZE)
        return obj

    def retire(self, obj: int) -> None:
        """A copy-on-write store keeps the object (and its spot) until its next flush."""
        self.state[obj] = RETIRED

    def release(self, obj: int) -> list[int]:
        """Free the object and its spot; returns arena pages now free (a zspage's, or an
        inline reservation)."""
        length = self.lengths[obj]
        self.state[obj] = FREE
        self.free_ids.append(obj)
        self.count -= 1
        if length <= INLINE_MAX:
            self.inline -= 1
            if (len(self.inline_pages) - 1) * INLINE_PER_PAGE >= self.inline:
                return [self.inline_pages.pop()]
            return []
        return self._free_spot(self.where[obj])

    def inline_word(self, obj: int) -> bytes:
        return self.where[obj].to_bytes(8, "little")[: self.lengths[obj]]

    def set_inline(self, obj: int, payload: memoryview) -> None:
        self.where[obj] = int.from_bytes(payload, "little")

    def pieces(self, obj: int) -> tuple[int, int, int]:
        """Where the object's bytes are in the arena: (offset, bytes there, offset of
        the rest or -1) -- a spot straddles at most two of its zspage's pages."""
        return self.spot_pieces(self.where[obj], self.lengths[obj])

    def location(self, obj: int) -> tuple[array[int], int]:
        """The pages of the object's zspage and its spot there (what a file index keeps)."""
        where = self.where[obj]
        zs = where >> _SPOT_BITS
        base = zs * MAX_ZSPAGE_PAGES
        return self.zs_pages[base : base + PAGES[self.zs_class[zs]]], where & _SPOT_MASK

    def spot_pieces(self, where: int, length: int) -> tuple[int, int, int]:
        zs, spot = where >> _SPOT_BITS, where & _SPOT_MASK
        at = spot * SPOT_SIZE[self.zs_class[zs]]
        page, within = at // PAGE_SIZE, at % PAGE_SIZE
        base = zs * MAX_ZSPAGE_PAGES
        first = self.zs_pages[base + page] * PAGE_SIZE + within
        if within + length <= PAGE_SIZE:
            return first, length, -1
        return first, PAGE_SIZE - within, self.zs_pages[base + page + 1] * PAGE_SIZE

    def keep_seal(self, obj: int, seal: memoryview | None) -> None:
        if seal is None and self.seals is None:
            return
        if self.seals is None:
            self.seals = bytearray(SEAL_SIZE * len(self.state))
        at = obj * SEAL_SIZE
        self.seals[at : at + SEAL_SIZE] = seal if seal is not None else bytes(SEAL_SIZE)

    def seal(self, obj: int) -> bytes:
        if self.seals is None:
            return bytes(SEAL_SIZE)
        return bytes(self.seals[obj * SEAL_SIZE : (obj + 1) * SEAL_SIZE])

    # -- spots and zspages --------------------------------------------------------
    def _take_spot(self, c: int, obj: int, free: array[int]) -> int:
        bits = self.partial_bits[c]
        if bits:
            used = bits.bit_length() - 1  # the fullest
            zs, _ = self.partial[c][used].popitem()
            if not self.partial[c][used]:
                self.partial_bits[c] &= ~(1 << used)
        else:
            zs = self._new_zspage(c, free)
        mask = self.zs_free[zs]
        spot = (mask & -mask).bit_length() - 1
        self.zs_free[zs] = mask & ~(1 << spot)
        used = self.zs_used[zs] = self.zs_used[zs] + 1
        if used < SPOTS[c]:
            self._file(c, zs, used)
        self.used[c] += 1
        self.zs_objects[zs * MAX_SPOTS + spot] = obj
        return zs << _SPOT_BITS | spot

    def _file(self, c: int, zs: int, used: int) -> None:
        self.partial[c][used][zs] = None
        self.partial_bits[c] |= 1 << used

    def _unfile(self, c: int, zs: int, used: int) -> None:
        bucket = self.partial[c][used]
        del bucket[zs]
        if not bucket:
            self.partial_bits[c] &= ~(1 << used)

    def _new_zspage(self, c: int, free: array[int]) -> int:
        if self.zs_free_ids:
            zs = self.zs_free_ids.pop()
        else:
            zs = len(self.zs_class)
            self.zs_class.append(0)
            self.zs_state.append(UNUSED)
            self.zs_used.append(0)
            self.zs_free.append(0)
            self.zs_pages.extend([-1] * MAX_ZSPAGE_PAGES)
            self.zs_objects.extend([-1] * MAX_SPOTS)
        k = PAGES[c]
        self.zs_class[zs] = c
        self.zs_state[zs] = ACTIVE
        self.zs_used[zs] = 0
        self.zs_free[zs] = (1 << SPOTS[c]) - 1
        for i in range(k):
            self.zs_pages[zs * MAX_ZSPAGE_PAGES + i] = free.pop()
        self.spots[c] += SPOTS[c]
        self.zspages += 1
        self.zspage_pages += k
        return zs

    def _free_spot(self, where: int) -> list[int]:
        zs, spot = where >> _SPOT_BITS, where & _SPOT_MASK
        c, used = self.zs_class[zs], self.zs_used[zs]
        self.zs_free[zs] |= 1 << spot
        self.zs_objects[zs * MAX_SPOTS + spot] = -1
        self.zs_used[zs] = used - 1
        if self.zs_state[zs] == CONDEMNED:
            return self._drop_zspage(zs) if used == 1 else []
        self.used[c] -= 1
        if used < SPOTS[c]:
            self._unfile(c, zs, used)
        self.dirty.add(c)
        if used == 1:
            self.spots[c] -= SPOTS[c]
            return self._drop_zspage(zs)
        self._file(c, zs, used - 1)
        return []

    def _drop_zspage(self, zs: int) -> list[int]:
        k = PAGES[self.zs_class[zs]]
        base = zs * MAX_ZSPAGE_PAGES
        pages = self.zs_pages[base : base + k].tolist()
        self.zs_pages[base : base + k] = array("i", [-1]) * k
        self.zs_state[zs] = UNUSED
        self.zs_class[zs] = 0
        self.zs_free_ids.append(zs)
        self.zspages -= 1
        self.zspage_pages -= k
        return pages

    # -- admission ------------------------------------------------------------------
    def pages_needed(self, spots: dict[int, int], inline: int) -> int:
        """Arena pages that placing spots[c] more payloads of class c and `inline` more
        inline payloads would take, beyond the holes of the classes' zspages."""
        pages = 0
        for c, wanted in spots.items():
            short = wanted - (self.spots[c] - self.used[c])
            if short > 0:
                pages += -(-short // SPOTS[c]) * PAGES[c]
        if inline > 0:
            reserved = len(self.inline_pages) * INLINE_PER_PAGE
            pages += max(0, -(-(self.inline + inline - reserved) // INLINE_PER_PAGE))
        return pages

    # -- compaction -----------------------------------------------------------------
    def over(self, c: int) -> bool:
        """Whether class c keeps more holes than its bound."""
        slack = self.slack
        if slack is None:
            return False
        return self.spots[c] - self.used[c] > SPOTS[c] + self.used[c] // slack

    def victim(self) -> tuple[int, list[int]] | None:
        """The emptiest zspage of a class over its bound, condemned, and its LIVE
        objects to move elsewhere (move()); None when every class is within bounds."""
        while self.dirty:
            c = next(iter(self.dirty))
            if not self.over(c) or not self.partial_bits[c]:
                self.dirty.discard(c)
                continue
            bits = self.partial_bits[c]
            used = (bits & -bits).bit_length() - 1  # the emptiest
            bucket = self.partial[c][used]
            zs, _ = bucket.popitem()
            if not bucket:
                self.partial_bits[c] &= ~(1 << used)
            self.zs_state[zs] = CONDEMNED
            self.spots[c] -= SPOTS[c]
            self.used[c] -= used
            base = zs * MAX_SPOTS
            held = [o for o in self.zs_objects[base : base + MAX_SPOTS] if o >= 0]
            return zs, [o for o in held if self.state[o] == LIVE]
        return None

    def move(self, obj: int, zs: int, free: array[int]) -> int | None:
        """Give a LIVE object of condemned zspage `zs` a spot elsewhere in its class;
        returns where it was (its bytes are still there), or None when it is no longer
        there (freed or moved since the zspage was condemned)."""
        old, c = self.where[obj], self.zs_class[zs]
        if self.state[obj] != LIVE or self.lengths[obj] <= INLINE_MAX or old >> _SPOT_BITS != zs:
            return None
        if not self.partial_bits[c] and len(free) < PAGES[c]:
            return None  # the holes went to writes meanwhile, and no page is free: stay
        if self.count >= MAX_OBJECTS:
            return None  # no id for the ghost a copy-on-write store keeps: stay
        self.where[obj] = self._take_spot(c, obj, free)
        return old

    def free_where(self, where: int) -> list[int]:
        """Free the spot an object left (a store that rewrites in place)."""
        return self._free_spot(where)

    def ghost(self, where: int, length: int) -> int:
        """A GHOST object holding the spot a payload left, to retire like any other."""
        obj = self._new_id()
        self.lengths[obj] = length
        self.where[obj] = where
        self.state[obj] = GHOST
        self.zs_objects[(where >> _SPOT_BITS) * MAX_SPOTS + (where & _SPOT_MASK)] = obj
        return obj

    # -- a file store's restart ---------------------------------------------------
    def adopt_zspage(self, c: int, pages: tuple[int, ...]) -> int:
        """A zspage of class c on these pages (from a file index), no spot used yet."""
        zs = self._new_zspage(c, array("i", reversed(pages)))
        self.dirty.add(c)
        return zs

    def adopt(self, length: int, zs: int, spot: int) -> int:
        """A LIVE object at `spot` of zspage `zs` (the index checked it is free)."""
        obj = self._new_id()
        c, used = self.zs_class[zs], self.zs_used[zs]
        if 0 < used < SPOTS[c]:
            self._unfile(c, zs, used)
        self.zs_free[zs] &= ~(1 << spot)
        self.zs_used[zs] = used + 1
        if used + 1 < SPOTS[c]:
            self._file(c, zs, used + 1)
        self.used[c] += 1
        self.zs_objects[zs * MAX_SPOTS + spot] = obj
        self.lengths[obj], self.state[obj] = length, LIVE
        self.where[obj] = zs << _SPOT_BITS | spot
        return obj

    def adopt_inline(self, length: int, word: int) -> int:
        obj = self._new_id()
        self.lengths[obj], self.state[obj], self.where[obj] = length, LIVE, word
        self.inline += 1
        return obj

    def reserve_inline(self, free: array[int]) -> None:
        """The pages inline payloads take, once the arena's free pages are known."""
        while len(self.inline_pages) * INLINE_PER_PAGE < self.inline and free:
            self.inline_pages.append(free.pop())

    # -- figures --------------------------------------------------------------------
    def metadata_bytes(self) -> int:
        arrays = (self.tags, self.generations, self.lengths, self.where, self.state,
                  self.free_ids, self.zs_class, self.zs_state, self.zs_used, self.zs_free,
                  self.zs_pages, self.zs_objects, self.zs_free_ids)  # fmt: skip
        total = sum(a.itemsize * a.buffer_info()[1] for a in arrays)
        return total + (len(self.seals) if self.seals is not None else 0)
