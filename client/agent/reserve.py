"""The swap-out reserve: a fixed pool of page buffers, allocated once, locked.

Gorman's rule for swap over the network: writing a page out must never need
memory that is not there. Every page an NBD write hands us is copied into one
of these buffers before anything else happens, and stays there until every
replica has it; nothing on that path allocates page-sized memory. The pool is
one mmap, populated (MAP_POPULATE) and mlock()ed on its own -- on top of the
process-wide mlockall that nbdkit --swap applies -- so its pages are resident
from the start and stay so (`locked` says whether the kernel allowed it).

When the pool is empty, writers wait -- bounded by a deadline -- rather than
allocate more: in-flight swap-out bytes never exceed the reserve.

Sizing rule (README): kernel swap writes are at most 128 KiB (32 pages); the nbd
driver keeps up to `nbds_max` x queue depth requests in flight per connection;
16 MiB holds 128 maximal requests -- 4x nbd's default 32-deep queue per
connection with headroom for batching.
"""

from __future__ import annotations

import mmap
import threading
import time

from netswap.protocol import PAGE_SIZE

from ..hardening import mlock_buffer


class ReserveTimeout(Exception):
    """No reserve buffers came free before the deadline."""


class Reserve:
    def __init__(self, size: int) -> None:
        if size < 64 * PAGE_SIZE or size % PAGE_SIZE:
            raise ValueError(f"reserve must be a multiple of {PAGE_SIZE} and >= 256 KiB")
        self.pages = size // PAGE_SIZE
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
        self._arena = mmap.mmap(-1, size, flags=flags)
        self.locked = mlock_buffer(self._arena, size)
        self.view = memoryview(self._arena)
        # One view per buffer, made once: the swap path indexes, never slices.
        self.views = [self.view[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] for i in range(self.pages)]
        # A stack of free buffer indexes, preallocated at full size.
        self._free = list(range(self.pages - 1, -1, -1))
        self._cond = threading.Condition()
        self.waits = 0
        self.high_water = 0

    @property
    def used(self) -> int:
        return self.pages - len(self._free)

    @property
    def occupancy(self) -> float:
        return self.used / self.pages

    def page(self, index: int) -> memoryview:
        return self.views[index]

    def acquire(self, count: int, timeout: float) -> list[int]:
        """Take `count` buffers, waiting at most `timeout` seconds for them."""
        if count > self.pages:
            raise ValueError(f"{count} pages exceed the whole reserve ({self.pages})")
        deadline = time.monotonic() + timeout
        with self._cond:
            if len(self._free) < count:
                self.waits += 1
            while len(self._free) < count:
                left = deadline - time.monotonic()
                if left <= 0 or not self._cond.wait(left):
                    if len(self._free) >= count:
                        break
                    raise ReserveTimeout(f"reserve exhausted for {timeout:.1f}s")
            taken = self._free[-count:]
            del self._free[-count:]
            self.high_water = max(self.high_water, self.used)
            return taken

    def release(self, indexes: list[int]) -> None:
        with self._cond:
            self._free.extend(indexes)
            self._cond.notify_all()

    def close(self) -> None:
        for view in self.views:
            view.release()
        self.view.release()
        self._arena.close()
