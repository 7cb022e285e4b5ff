"""Where each slab of the swap area lives: a compact table and p2c placement.

The area is cut into slabs (64 MiB by default). A slab is placed on first
write, replica by replica, by power-of-two-choices on free capacity
(Infiniswap): sample two eligible stores, take the one with more free room --
nearly as balanced as asking every store, at constant cost. The table is two
flat byte arrays of slabs x replicas -- store index and replica state -- plus
one bit per slot saying "ever written", so never-written slots read as zeros
without a round trip, a second bit saying "every copy lost" (below), and a
byte per slot of write generation, which every page's tag carries. At 16 GiB
of swap that is ~1.25 bytes per slot (5 MiB).

Replica states: IN_SYNC (serves reads, takes writes); DOWN (its store is
unreachable but the replica has missed nothing yet -- back to IN_SYNC if the
store returns with its pages); STALE (missed a write, or its store came back
empty: takes nothing until resynced); SYNCING (takes writes, serves no reads,
being filled from an in-sync replica). Slots whose every copy was lost read
as EIO, never as zeros, until written again.
"""

from __future__ import annotations

import random
import threading
from array import array
from collections.abc import Callable, Sequence

from netswap.protocol import MAX_GENERATION, PAGE_SIZE

UNPLACED = -1
IN_SYNC, STALE, SYNCING, DOWN = 1, 2, 3, 4


def power_of_two_choices(
    candidates: Sequence[int], free: Callable[[int], int], rng: random.Random
) -> int:
    """Pick one of `candidates`: the freer of two sampled at random."""
    if not candidates:
        raise LookupError("no eligible store")
    if len(candidates) == 1:
        return candidates[0]
    a, b = rng.sample(list(candidates), 2)
    return a if free(a) >= free(b) else b


class SlabTable:
    def __init__(self, pages: int, slab_pages: int, replicas: int) -> None:
        if slab_pages <= 0 or replicas <= 0:
            raise ValueError("slab size and replicas must be positive")
        self.pages = pages
        self.slab_pages = slab_pages
        self.replicas = replicas
        self.slabs = -(-pages // slab_pages)
        self.store = array("b", [UNPLACED]) * (self.slabs * replicas)
        self.state = array("B", [0]) * (self.slabs * replicas)
        self.written = bytearray(-(-pages // 8))
        self.lost = bytearray(-(-pages // 8))
        # Each slot's write generation (protocol/checksum.py): bumped on every write, and
        # bound into the page's tag, so a store answering with an older copy is EIO.
        # 1 byte per slot: 4 MiB at 16 GiB of swap, the largest part of this table.
        self.generations = bytearray(pages)
        # Every write of the two bitmaps holds this lock: nbdkit's threads mark writes
        # and trims, the agent's loop marks pages lost, and a bit is set or cleared by
        # a read-modify-write of its whole byte, which two threads would undo.
        self.bits_lock = threading.Lock()

    def slab_of(self, slot: int) -> int:
        return slot // self.slab_pages

    def slab_slots(self, slab: int) -> range:
        start = slab * self.slab_pages
        return range(start, min(start + self.slab_pages, self.pages))

    # -- written bitmap -------------------------------------------------------
    def mark_written_run(self, first: int, count: int) -> bytes:
        """Slots first..first+count-1 now hold data (and are no longer lost); returns
        their new write generations, the ones their pages' tags must carry."""
        written, lost, gens = self.written, self.lost, self.generations
        with self.bits_lock:
            for slot in range(first, first + count):
                bit = 1 << (slot & 7)
                written[slot >> 3] |= bit
                lost[slot >> 3] &= ~bit & 0xFF
                gens[slot] = gens[slot] % MAX_GENERATION + 1
            return bytes(gens[first : first + count])

    def generations_of(self, slots: Sequence[int]) -> bytes:
        gens = self.generations
        return bytes(gens[s] for s in slots)

    def mark_lost(self, slot: int) -> None:
        """Every copy of this slot is gone: it reads as EIO until written again."""
        bit = 1 << (slot & 7)
        with self.bits_lock:
            self.written[slot >> 3] &= ~bit & 0xFF
            self.lost[slot >> 3] |= bit

    def forget(self, slot: int) -> None:
        """Trimmed: neither written nor lost, so it reads as zeros."""
        keep = ~(1 << (slot & 7)) & 0xFF
        with self.bits_lock:
            self.written[slot >> 3] &= keep
            self.lost[slot >> 3] &= keep

    def is_written(self, slot: int) -> bool:
        return bool(self.written[slot >> 3] & (1 << (slot & 7)))

    def written_in(self, slab: int) -> int:
        """How many slots of a slab are written: a popcount, not a loop over slots."""
        slots = self.slab_slots(slab)
        first, stop = slots.start, slots.stop
        count = 0
        if first % 8 or stop % 8:  # ragged edges (slab sizes not a multiple of 8 pages)
            edge = [s for s in slots if s < -(-first // 8) * 8 or s >= stop // 8 * 8]
            count += sum(1 for s in edge if self.is_written(s))
            first, stop = -(-first // 8) * 8, stop // 8 * 8
        if stop > first:
            count += int.from_bytes(self.written[first // 8 : stop // 8], "little").bit_count()
        return count

    def is_lost(self, slot: int) -> bool:
        return bool(self.lost[slot >> 3] & (1 << (slot & 7)))

    # -- replicas -------------------------------------------------------------
    def replicas_of(self, slab: int) -> list[tuple[int, int, int]]:
        """(position, store, state) of every placed replica of a slab."""
        base = slab * self.replicas
        return [
            (r, self.store[base + r], self.state[base + r])
            for r in range(self.replicas)
            if self.store[base + r] != UNPLACED
        ]

    def set_replica(self, slab: int, position: int, store: int, state: int) -> None:
        self.store[slab * self.replicas + position] = store
        self.state[slab * self.replicas + position] = state

    def set_state(self, slab: int, position: int, state: int) -> None:
        self.state[slab * self.replicas + position] = state

    def placed(self, slab: int) -> bool:
        return self.store[slab * self.replicas] != UNPLACED

    def place(
        self,
        slab: int,
        up: Sequence[int],
        free: Callable[[int], int],
        rng: random.Random,
    ) -> None:
        """Place every replica of a slab on distinct up stores (as many as exist)."""
        chosen: list[int] = []
        for position in range(self.replicas):
            left = [s for s in up if s not in chosen]
            if not left:
                break
            store = power_of_two_choices(left, free, rng)
            chosen.append(store)
            self.set_replica(slab, position, store, IN_SYNC)
        if not chosen:
            raise LookupError("no page store is up")

    def metadata_bytes(self) -> int:
        bitmaps = len(self.written) + len(self.lost)
        return len(self.store) + len(self.state) + bitmaps + len(self.generations)

    def slabs_on(self, store: int) -> list[tuple[int, int]]:
        """(slab, position) of every replica placed on `store`."""
        return [
            (i // self.replicas, i % self.replicas) for i, s in enumerate(self.store) if s == store
        ]


def slab_pages_for(slab_bytes: int) -> int:
    return max(1, slab_bytes // PAGE_SIZE)
