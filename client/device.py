"""Block devices the nbdkit plugin exports: the seam between NBD and pages.

The plugin speaks bytes and offsets; a device speaks slots. `BlockDevice` is
the whole contract the plugin relies on, so the embedded backends (memory,
file: `PageDevice`, here) and the remote agent (`netswap.client.agent.remote`) plug in
the same way. Every data request must be 4 KiB aligned -- the plugin
advertises 4096 as its minimum block size, the kernel's nbd driver with
`-b 4096` never sends less -- and a misaligned one is EINVAL before anything is
touched. Trim is advisory and rounds inwards to whole pages.
"""

from __future__ import annotations

import errno
from typing import Protocol

from netswap.protocol import PAGE_SIZE, StoreError
from netswap.server.backends import UNMAPPED, PageBackend

EXTENT_HOLE = 1  # nbdkit.EXTENT_HOLE
EXTENT_ZERO = 2  # nbdkit.EXTENT_ZERO


class BlockDevice(Protocol):
    size: int
    # Whether flush on one connection covers writes made on every other one.
    multi_conn: bool
    # Whether the device wants nbdkit's THREAD_MODEL_PARALLEL (it blocks on I/O).
    parallel: bool

    def start(self) -> None: ...
    # A standby's turn to serve (nbd/standby.py): rebuild, under the supervisor's epoch.
    def take_over(self, epoch: int) -> None: ...
    def start_ops(self, host: str, port: int, token: str = "") -> None: ...
    def pread(self, buf: memoryview, offset: int) -> None: ...
    def pwrite(self, buf: memoryview, offset: int, fua: bool) -> None: ...
    def flush(self) -> None: ...
    def trim(self, count: int, offset: int, fua: bool) -> None: ...
    def zero(self, count: int, offset: int, fua: bool) -> None: ...
    def extents(self, count: int, offset: int, req_one: bool) -> list[tuple[int, int, int]]: ...
    def close(self) -> None: ...


def check_aligned(count: int, offset: int) -> None:
    if offset % PAGE_SIZE or count % PAGE_SIZE:
        raise StoreError(
            errno.EINVAL, f"request at {offset}+{count} is not {PAGE_SIZE}-byte aligned"
        )


class PageDevice:
    """A device of `size` bytes stored as one area of a local page backend."""

    multi_conn = True  # one backend in one process: a flush covers every connection
    parallel = False

    def __init__(self, backend: PageBackend, size: int, area: str = "nbd") -> None:
        self.backend = backend
        self.size = size
        self.area = backend.activate(area, size // PAGE_SIZE)

    def start(self) -> None:
        """Nothing to start: local backends need no threads."""

    def take_over(self, epoch: int) -> None:
        raise StoreError(errno.EINVAL, "standby= is only for backend=remote")

    def start_ops(self, host: str, port: int, token: str = "") -> None:
        from netswap.server.ops.http import HttpThread
        from netswap.server.ops.sources import backend_source

        HttpThread(backend_source(self.backend), host, port, token).start()

    def pread(self, buf: memoryview, offset: int) -> None:
        count = len(buf)
        if offset % PAGE_SIZE or count % PAGE_SIZE:
            check_aligned(count, offset)
        if count == PAGE_SIZE:
            self.backend.read(self.area, (offset // PAGE_SIZE,), buf)
        else:
            self.backend.read_range(self.area, offset // PAGE_SIZE, count // PAGE_SIZE, buf)

    def pwrite(self, buf: memoryview, offset: int, fua: bool) -> None:
        count = len(buf)
        if offset % PAGE_SIZE or count % PAGE_SIZE:
            check_aligned(count, offset)
        if count == PAGE_SIZE:
            self.backend.write(self.area, (offset // PAGE_SIZE,), buf, None)
        else:
            self.backend.write_range(self.area, offset // PAGE_SIZE, count // PAGE_SIZE, buf)
        if fua:
            self.backend.flush()

    def flush(self) -> None:
        self.backend.flush()

    def trim(self, count: int, offset: int, fua: bool) -> None:
        first = -(-offset // PAGE_SIZE)
        end = (offset + count) // PAGE_SIZE
        if end > first:
            self.backend.discard(self.area, first, end - first)
        if fua:
            self.backend.flush()

    def zero(self, count: int, offset: int, fua: bool) -> None:
        check_aligned(count, offset)
        self.backend.discard(self.area, offset // PAGE_SIZE, count // PAGE_SIZE)
        if fua:
            self.backend.flush()

    def extents(self, count: int, offset: int, req_one: bool) -> list[tuple[int, int, int]]:
        """Runs of data and holes (unmapped slots read as zeros) over the range."""
        first = offset // PAGE_SIZE
        end = min(-(-(offset + count) // PAGE_SIZE), self.area.pages)
        pages = self.area.run(first, end - first)  # nbdkit bounds count by the export size
        runs: list[tuple[int, int, int]] = []
        start = first
        hole = pages[0] == UNMAPPED
        for slot in range(first + 1, end):
            if (pages[slot - first] == UNMAPPED) != hole:
                runs.append(self._run(start, slot, hole, offset))
                if req_one:
                    return runs
                start, hole = slot, not hole
        runs.append(self._run(start, end, hole, offset))
        return runs

    @staticmethod
    def _run(start: int, end: int, hole: bool, offset: int) -> tuple[int, int, int]:
        begin = max(start * PAGE_SIZE, offset)
        kind = EXTENT_HOLE | EXTENT_ZERO if hole else 0
        return (begin, end * PAGE_SIZE - begin, kind)

    def close(self) -> None:
        self.backend.flush()
        self.backend.close()
