"""Where each slab of the swap area lives: its replicas, their stores and states.

The area is cut into slabs (64 MiB by default). A slab is placed on first
write, replica by replica, by power-of-two-choices on free capacity
(Infiniswap): sample two eligible stores, take the one with more free room --
nearly as balanced as asking every store, at constant cost. The table is two
flat byte arrays of slabs x replicas: store index and replica state.

Replica states:
- IN_SYNC: holds every acknowledged write of its slab (it may be away for now).
- STALE: missed writes (its store was away, or refused one), but lost none it
  took: a read may still find a slot's newest page there (every page proves its
  generation), and a resync copies what it lacks.
- SUSPECT: may have lost writes it took -- its store restarted (a memory store
  empty, a file store back at its last flush), or it was placed new. Readable
  like a stale one; but a restarted agent's proof never counts on it.
- SYNCING: being made whole by a resync; takes writes, and is SUSPECT or STALE in
  the durable record until it is in sync (`recorded`).

Whether a store answers is the stores' business (machine.StoreView), not a state:
a replica whose store goes quiet becomes STALE at once (the record says so before
any write is acknowledged without it) and nothing more.
"""

from __future__ import annotations

import random
from array import array
from collections.abc import Callable, Sequence

from netswap.protocol import PAGE_SIZE

UNPLACED = 255
IN_SYNC, STALE, SUSPECT, SYNCING = 1, 2, 3, 4
STATE_NAMES = {IN_SYNC: "in sync", STALE: "stale", SUSPECT: "suspect", SYNCING: "syncing"}
# Stores an agent may use: a store index is one byte in the table and in the record.
MAX_STORES = 254


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
    def __init__(self, slots: int, slab_slots: int, replicas: int) -> None:
        if slab_slots <= 0 or replicas <= 0:
            raise ValueError("slab size and replicas must be positive")
        self.slots = slots
        self.slab_size = slab_slots
        self.replicas = replicas
        self.slabs = -(-slots // slab_slots)
        self.store = array("B", [UNPLACED]) * (self.slabs * replicas)
        self.state = array("B", [0]) * (self.slabs * replicas)
        # A syncing replica's state in the durable record until it is in sync.
        self.recorded = array("B", [0]) * (self.slabs * replicas)

    def slab_of(self, slot: int) -> int:
        return slot // self.slab_size

    def slab_slots(self, slab: int) -> range:
        start = slab * self.slab_size
        return range(start, min(start + self.slab_size, self.slots))

    def state_of(self, slab: int, position: int) -> int:
        return self.state[slab * self.replicas + position]

    def store_of(self, slab: int, position: int) -> int:
        return self.store[slab * self.replicas + position]

    def replicas_of(self, slab: int) -> list[tuple[int, int, int]]:
        """(position, store, state) of every placed replica of a slab."""
        base = slab * self.replicas
        store, state = self.store, self.state
        return [(r, store[base + r], state[base + r]) for r in range(self.replicas)
                if store[base + r] != UNPLACED]  # fmt: skip

    def set_replica(self, slab: int, position: int, store: int, state: int) -> None:
        self.store[slab * self.replicas + position] = store
        self.set_state(slab, position, state)

    def set_state(self, slab: int, position: int, state: int) -> None:
        at = slab * self.replicas + position
        if state == SYNCING:  # the record keeps what it was until the sync ends
            self.recorded[at] = self.state[at] if self.state[at] != SYNCING else self.recorded[at]
        self.state[at] = state

    def durable_state(self, slab: int, position: int) -> int:
        """The state the durable record holds for this replica."""
        at = slab * self.replicas + position
        state = self.state[at]
        return self.recorded[at] if state == SYNCING else state

    def unplace(self, slab: int, position: int) -> None:
        self.store[slab * self.replicas + position] = UNPLACED
        self.state[slab * self.replicas + position] = 0

    def placed(self, slab: int) -> bool:
        base = slab * self.replicas
        return any(self.store[base + r] != UNPLACED for r in range(self.replicas))

    def unplaced_positions(self, slab: int) -> list[int]:
        base = slab * self.replicas
        return [r for r in range(self.replicas) if self.store[base + r] == UNPLACED]

    def in_sync(self, slab: int) -> list[int]:
        """The stores of a slab's in-sync replicas."""
        base = slab * self.replicas
        store, state = self.store, self.state
        return [store[base + r] for r in range(self.replicas)
                if store[base + r] != UNPLACED and state[base + r] == IN_SYNC]  # fmt: skip

    def slabs_on(self, store: int) -> list[tuple[int, int]]:
        """(slab, position) of every replica placed on `store`."""
        replicas = self.replicas
        return [(i // replicas, i % replicas) for i, s in enumerate(self.store) if s == store]

    def holds(self, slab: int, store: int) -> bool:
        base = slab * self.replicas
        return any(self.store[base + r] == store for r in range(self.replicas))

    def metadata_bytes(self) -> int:
        return len(self.store) + len(self.state) + len(self.recorded)


def slab_slots_for(slab_bytes: int) -> int:
    return max(1, slab_bytes // PAGE_SIZE)
