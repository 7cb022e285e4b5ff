"""Same-filled slots the device answers itself, and what its payloads weigh (#31).

A same-filled page still goes to the stores as its 8-byte payload (payload.py:
a restarted agent must find its newest generation there), but once a replica
acknowledged it, its swap-in needs no store: the device keeps which slots hold
a zero page -- a bit per slot, 512 KiB at 16 GiB of swap: zero pages are over
99 % of same-filled ones (linux-mm, 2024; 1.6 of 2.2 % of the corpus,
tests/corpus/RESULTS.md) -- and the word of up to MAX_WORDS other ones. A
slot past that bound, or not known since a restart, is read from a store like
any page. Owner: the device, under its lock; the machine's state comes first
(a lost or failed slot is EIO whatever was here).
"""

from __future__ import annotations

import threading
from array import array
from collections import Counter

from netswap.protocol import PAGE_SIZE, ZERO_PAGE

from .jobs import WriteJob
from .payload import FILL

WHOLE = PAGE_SIZE

# Non-zero words remembered: 65,536 entries are ~7 MiB of the agent's locked memory at
# most, and the corpus's non-zero fills are 0.6 % of pages (64 GiB of swap's worth).
MAX_WORDS = 1 << 16
_WORDS = PAGE_SIZE // FILL


class Fills:
    def __init__(self, slots: int) -> None:
        self.zero = bytearray(-(-slots // 8))
        self.words: dict[int, int] = {}

    def update(self, job: WriteJob, owned: list[int]) -> None:
        """A write of these slots (those no newer write took over) is acknowledged."""
        fills = job.fills
        for slot in owned:
            word = fills.get(slot - job.first) if fills is not None else None
            if word is None:
                self.clear(slot)
            elif word == 0:
                self.zero[slot >> 3] |= 1 << (slot & 7)
                self.words.pop(slot, None)
            else:
                self.zero[slot >> 3] &= ~(1 << (slot & 7)) & 0xFF
                if slot in self.words or len(self.words) < MAX_WORDS:
                    self.words[slot] = word

    def clear(self, slot: int) -> None:
        self.zero[slot >> 3] &= ~(1 << (slot & 7)) & 0xFF
        if self.words:
            self.words.pop(slot, None)

    def forget(self, first: int, count: int) -> None:
        """Trimmed (a range may be the whole area: whole bytes at once)."""
        end = first + count
        head = min(end, -(-first // 8) * 8)
        for slot in range(first, head):
            self.clear(slot)
        tail = max(head, end // 8 * 8)
        self.zero[head // 8 : tail // 8] = bytes(tail // 8 - head // 8)
        for slot in range(tail, end):
            self.clear(slot)
        if self.words:
            for slot in [s for s in self.words if first <= s < end]:
                del self.words[slot]

    def fill(self, slot: int, out: memoryview) -> bool:
        """Write the slot's page into out if it is same-filled and known."""
        if self.zero[slot >> 3] >> (slot & 7) & 1:
            out[:] = ZERO_PAGE
            return True
        word = self.words.get(slot) if self.words else None
        if word is None:
            return False
        out[:] = word.to_bytes(FILL, "little") * _WORDS
        return True

    def zero_slots(self) -> int:
        return int.from_bytes(self.zero, "little").bit_count()


class PayloadFigures:
    """Pages written by kind (same-filled, compressed, whole) and the bytes they became."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.kinds: Counter[str] = Counter()
        self.payload_bytes = 0

    def count(self, lengths: array[int]) -> None:
        filled = lengths.count(FILL)
        whole = lengths.count(WHOLE)
        with self._lock:
            self.kinds["filled"] += filled
            self.kinds["whole"] += whole
            self.kinds["compressed"] += len(lengths) - filled - whole
            self.payload_bytes += sum(lengths)
