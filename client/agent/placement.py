"""Where each slab of the swap area lives: a compact table and p2c placement.

The area is cut into slabs (64 MiB by default). A slab is placed on first
write, replica by replica, by power-of-two-choices on free capacity
(Infiniswap): sample two eligible stores, take the one with more free room --
nearly as balanced as asking every store, at constant cost. The table is two
flat byte arrays of slabs x replicas -- store index and replica state: 2 bytes
per replica of a 64 MiB slab. What the agent knows of each slot (written,
lost, its write count) is slots.py's.

Replica states: IN_SYNC (serves reads, takes writes); DOWN (its store is
unreachable but the replica has missed nothing yet -- back to IN_SYNC if the
store returns with its pages); STALE (missed a write, or its store came back
empty: takes nothing until resynced); SYNCING (takes writes, serves no reads,
being filled from an in-sync replica).

Owner: the agent's loop changes the table. nbdkit's threads read it (a lone
read or write picks its replicas: direct.py) under routing.Routing's lock,
which every change of a replica's state that a thread must see holds too.
"""

from __future__ import annotations

import random
from array import array
from collections.abc import Callable, Sequence

from netswap.protocol import PAGE_SIZE

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
    def __init__(self, slots: int, slab_slots: int, replicas: int) -> None:
        if slab_slots <= 0 or replicas <= 0:
            raise ValueError("slab size and replicas must be positive")
        self.slots = slots
        self.slab_size = slab_slots
        self.replicas = replicas
        self.slabs = -(-slots // slab_slots)
        self.store = array("b", [UNPLACED]) * (self.slabs * replicas)
        self.state = array("B", [0]) * (self.slabs * replicas)

    def slab_of(self, slot: int) -> int:
        return slot // self.slab_size

    def slab_slots(self, slab: int) -> range:
        start = slab * self.slab_size
        return range(start, min(start + self.slab_size, self.slots))

    def state_of(self, slab: int, position: int) -> int:
        return self.state[slab * self.replicas + position]

    def store_of(self, slab: int, position: int) -> int:
        return self.store[slab * self.replicas + position]

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
        return len(self.store) + len(self.state)

    def in_sync(self, slab: int) -> list[int]:
        """The stores of a slab's in-sync replicas."""
        base = slab * self.replicas
        store, state = self.store, self.state
        return [store[base + r] for r in range(self.replicas)
                if store[base + r] != UNPLACED and state[base + r] == IN_SYNC]  # fmt: skip

    def slabs_on(self, store: int) -> list[tuple[int, int]]:
        """(slab, position) of every replica placed on `store`."""
        return [
            (i // self.replicas, i % self.replicas) for i, s in enumerate(self.store) if s == store
        ]


def slab_slots_for(slab_bytes: int) -> int:
    return max(1, slab_bytes // PAGE_SIZE)
