"""Make a tmpfs file's pages cold: out to swap, out of RAM, before the drill kills.

On a diskless host (/ on tmpfs, as in the host-in-guest guest) a log file's pages
swap out like any other, possibly to the very device whose server the drill is
about to kill; a takeover that then writes to that log waits on a swap-in from a
dead device (#29: the supervisor in write(2), in shmem_swapin_folio, until the
kernel failed the device at the dead-connection timeout). Under a storm that
happens by chance; the drill makes it happen every time. Each file is mapped
shared, its pages touched (MADV_PAGEOUT acts on the pages the caller maps) and
paged out (MADV_PAGEOUT, Linux 5.4); the kernel writes them to swap and, once the
write is done and memory is short, frees them. mincore (which for tmpfs counts a
page in the swap cache as resident) says how many have left RAM.
"""

from __future__ import annotations

import ctypes
import os
import time
from pathlib import Path

PAGE = 4096
PROT_READ, MAP_SHARED = 1, 1
MADV_PAGEOUT = 21  # <sys/mman.h>, Linux 5.4 (Debian's Python 3.11 lacks the constant)
MAP_FAILED = ctypes.c_void_p(-1).value

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]  # fmt: skip
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.munlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]


def _mapped(path: Path) -> tuple[int, int, int]:
    """(fd, address, length) of `path` mapped shared and read-only; length 0: empty."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    length = os.fstat(fd).st_size
    if not length:
        return fd, 0, 0
    address = _libc.mmap(None, length, PROT_READ, MAP_SHARED, fd, 0)
    if address in (None, MAP_FAILED):
        os.close(fd)
        raise OSError(ctypes.get_errno(), f"mmap {path}")
    # The drill's orchestrator is mlockall'd (MCL_FUTURE): this mapping would be locked,
    # and MADV_PAGEOUT refuses a locked one (EINVAL).
    _libc.munlock(address, length)
    return fd, address, length


def _unmap(fd: int, address: int, length: int) -> None:
    if length:
        _libc.munmap(address, length)
    os.close(fd)


def resident(path: Path) -> tuple[int, int]:
    """(pages, pages in RAM) of `path`, without touching any."""
    fd, address, length = _mapped(path)
    try:
        pages = (length + PAGE - 1) // PAGE
        if not pages:
            return 0, 0
        vec = ctypes.create_string_buffer(pages)
        if _libc.mincore(address, length, vec) != 0:
            raise OSError(ctypes.get_errno(), f"mincore {path}")
        return pages, sum(b & 1 for b in vec.raw)
    finally:
        _unmap(fd, address, length)


def page_out(path: Path) -> None:
    """Ask the kernel to swap every page of `path` out now."""
    fd, address, length = _mapped(path)
    try:
        for at in range(0, length, PAGE):  # mapped here, or MADV_PAGEOUT skips them
            ctypes.string_at(address + at, 1)
        if length and _libc.madvise(address, length, MADV_PAGEOUT) != 0:
            raise OSError(ctypes.get_errno(), f"madvise(MADV_PAGEOUT) {path}")
    finally:
        _unmap(fd, address, length)


def make_cold(paths: list[Path], patience: float) -> dict[Path, tuple[int, int]]:
    """Page out every file, then wait (at most `patience` s) until none is in RAM;
    returns each file's (pages, pages still in RAM)."""
    for path in paths:
        page_out(path)
    deadline = time.monotonic() + patience
    while True:
        counts = {path: resident(path) for path in paths}
        if all(warm == 0 for _, warm in counts.values()) or time.monotonic() > deadline:
            return counts
        time.sleep(0.2)
