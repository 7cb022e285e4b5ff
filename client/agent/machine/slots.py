"""What the agent knows of each slot: its state and the generation of its newest write.

The kernel's swap never reads a slot it has not written; the agent answers a
slot never written (or trimmed) with zeros without asking a store. Every write
of a slot takes a new 64-bit *generation*, `epoch << 32 | count`, which its page's
tag (and, sealed, its nonce) carries: a store answering with any other copy of
the slot is caught. Generations of a slot only grow (a trim keeps the last one),
and every agent start raises the epoch above every epoch used before it (the
durable record, record.py), so a generation -- and a nonce -- is never used twice.

States: NEVER (zeros), WRITTEN (its newest copy is on the stores at `gens[slot]`),
LOST (every store that held it answered that it no longer does: EIO until written
again), UNPROVEN (a restarted agent cannot tell its newest write yet: reads wait
for the store that may hold it), DOUBT (its last write failed: neither the old nor
the new page can be proven newest; the kernel writes a page whose write failed
again, and never reads it meanwhile: EIO until written again).

Per slot: a state byte and an 8-byte generation, 9 bytes (36 MiB at 16 GiB of
swap, under the agent's 16-byte budget). Owner: machine.Replicas, under its lock.
"""

from __future__ import annotations

from array import array

NEVER, WRITTEN, LOST, UNPROVEN, DOUBT = 0, 1, 2, 3, 4
COUNT_BITS = 32
COUNT_MASK = (1 << COUNT_BITS) - 1
# Epochs go in the generation's top 32 bits; 2^32 agent starts of one area.
MAX_EPOCH = (1 << 32) - 1


class Slots:
    def __init__(self, slots: int, epoch: int = 1) -> None:
        self.slots = slots
        self.state = bytearray(slots)
        self.gens = array("Q", bytes(8 * slots))
        self.epoch = epoch  # the agent's own: every new generation is above epoch << 32

    def wraps(self, first: int, count: int) -> bool:
        """Would writing these slots need a count past 2^32 - 1 (a new epoch first)?"""
        floor = self.epoch << COUNT_BITS
        gens = self.gens
        for slot in range(first, first + count):
            g = gens[slot]
            if g >= floor and g & COUNT_MASK == COUNT_MASK:
                return True
        return False

    def write(self, first: int, count: int) -> array[int]:
        """Slots first..first+count-1 are being written: their new generations. The
        caller checked `wraps` (a count at its end needs the next epoch recorded)."""
        end = first + count
        self.state[first:end] = bytes([WRITTEN]) * count
        gens = self.gens
        floor = self.epoch << COUNT_BITS
        for slot in range(first, end):
            g = gens[slot]
            gens[slot] = g + 1 if g >= floor else floor | 1
        return gens[first:end]

    def forget(self, first: int, count: int) -> None:
        """Trimmed: neither written nor lost, so they read as zeros (generations stay)."""
        self.state[first : first + count] = bytes(count)

    def set(self, slot: int, state: int) -> None:
        self.state[slot] = state

    def restore(self, slot: int, generation: int, state: int = WRITTEN) -> None:
        """A rebuild found this slot's newest copy at `generation`."""
        self.state[slot] = state
        if generation > self.gens[slot]:
            self.gens[slot] = generation

    def written_slots(self, first: int, stop: int) -> list[int]:
        state = self.state
        return [s for s in range(first, stop) if state[s] == WRITTEN]

    def count(self, state: int, first: int = 0, stop: int = -1) -> int:
        return self.state.count(state, first, self.slots if stop < 0 else stop)

    def metadata_bytes(self) -> int:
        return len(self.state) + self.gens.itemsize * len(self.gens)
