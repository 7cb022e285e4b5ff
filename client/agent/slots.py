"""What the agent knows of each slot: written or not, lost or not, and its write count.

The kernel's swap never reads a slot it has not written, and the agent answers
a slot never written (or trimmed) with zeros without asking a store; a slot
whose every copy was lost answers EIO until written again, and so does a slot
a restarted agent could not prove (rebuild.py: its newest copy may be on a
store that is away) until that store is back or the slot is written again. For every written
slot it keeps the number of times it was written, the *count*: a write's
generation on the wire is `epoch << 32 | count` (protocol/limits.py), which
every page's tag carries, so a store answering with a copy from before the
last write is EIO. Counts only grow: a trim keeps them, so a slot written,
trimmed and written again never repeats a generation (nor, for an encrypted
area, a nonce). The epoch is the agent's own, raised each time an agent
starts on the area (`epoch`), so that a count a restarted agent could not
recover never repeats a generation either.

Per slot: a state byte and a 4-byte count, 5 bytes (20 MiB at 16 GiB of swap).
Every change holds `lock`: nbdkit's threads mark writes and trims, the agent's
loop marks pages lost and a rebuild sets counts.
"""

from __future__ import annotations

import threading
from array import array
from collections.abc import Sequence

NEVER, WRITTEN, LOST, UNPROVEN = 0, 1, 2, 3  # a slot's state
# Counts run 1..MAX_COUNT; past it a slot's count starts again at 1 and the epoch is
# raised, so its generation is still new (4 billion writes of one slot).
MAX_COUNT = (1 << 32) - 1
COUNT_BITS = 32


class SlotMap:
    def __init__(self, slots: int, epoch: int = 1) -> None:
        self.slots = slots
        self.state = bytearray(slots)
        self.counts = array("I", bytes(4 * slots))
        self.epoch = epoch
        self.lock = threading.Lock()

    def generation(self, count: int) -> int:
        """The wire generation of this agent's write number `count` of a slot."""
        return self.epoch << COUNT_BITS | count

    # -- writes and trims (nbdkit's threads) -------------------------------------
    def write_run(self, first: int, count: int) -> tuple[array[int], array[int]]:
        """Slots first..first+count-1 are being written: their new counts and wire
        generations, the ones their pages' tags must carry."""
        end = first + count
        with self.lock:
            self.state[first:end] = bytes([WRITTEN]) * count
            counts = self.counts
            for slot in range(first, end):
                if counts[slot] == MAX_COUNT:
                    counts[slot] = 0
                    self.epoch += 1
                counts[slot] += 1
            mine = counts[first:end]
            high = self.epoch << COUNT_BITS
            return mine, array("Q", [high | c for c in mine])

    def forget_run(self, first: int, count: int) -> None:
        """Trimmed: neither written nor lost, so they read as zeros (counts stay)."""
        with self.lock:
            self.state[first : first + count] = bytes(count)

    # -- the loop ------------------------------------------------------------------
    def mark_lost(self, slot: int) -> None:
        """Every copy of this slot is gone: it reads as EIO until written again."""
        with self.lock:
            if self.state[slot] == WRITTEN:
                self.state[slot] = LOST

    def restore(self, slot: int, generation: int, proven: bool = True) -> None:
        """A rebuild found this slot's newest copy at `generation` (or a copy it cannot
        prove newest: the slot reads EIO until it can)."""
        with self.lock:
            self.state[slot] = WRITTEN if proven else UNPROVEN
            self.counts[slot] = max(self.counts[slot], generation & MAX_COUNT)
            self.epoch = max(self.epoch, generation >> COUNT_BITS)

    def mark_unproven_run(self, first: int, count: int) -> None:
        """A rebuild cannot tell whether these slots were written: EIO until proven."""
        with self.lock:
            self.state[first : first + count] = bytes([UNPROVEN]) * count

    def prove(self, slot: int) -> None:
        """An unproven slot's newest copy is known now."""
        with self.lock:
            if self.state[slot] == UNPROVEN:
                self.state[slot] = WRITTEN

    def is_unproven(self, slot: int) -> bool:
        return self.state[slot] == UNPROVEN

    # -- reads -----------------------------------------------------------------
    def is_written(self, slot: int) -> bool:
        return self.state[slot] == WRITTEN

    def is_lost(self, slot: int) -> bool:
        return self.state[slot] == LOST

    def counts_of(self, slots: Sequence[int]) -> array[int]:
        if isinstance(slots, range) and slots.step == 1:
            return self.counts[slots.start : slots.stop]
        counts = self.counts
        return array("I", [counts[s] for s in slots])

    def written_in(self, first: int, stop: int) -> int:
        """How many of slots first..stop-1 are written (a C count, not a loop)."""
        return self.state.count(WRITTEN, first, stop)

    def written_slots(self, first: int, stop: int) -> list[int]:
        state = self.state
        return [s for s in range(first, stop) if state[s] == WRITTEN]

    def metadata_bytes(self) -> int:
        return len(self.state) + self.counts.itemsize * len(self.counts)
