"""Putting a swap server inside the kernel's reclaim exemption, before exec.

The kernel's nbd driver sends with __GFP_MEMALLOC on a SOCK_MEMALLOC socket,
but the process on the other end of that socket is ordinary userspace: if it
has to wait for memory reclaim -- which may need swap, which needs it -- the
host deadlocks. Three measures, all inherited across fork and exec:

- prctl(PR_SET_IO_FLUSHER) (Linux >= 5.6, CAP_SYS_RESOURCE): its allocations
  behave as GFP_NOIO, so reclaim never recurses into I/O on its behalf.
- oom_score_adj = -1000: the OOM killer never picks the process serving swap.
- mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT), from the plugin once
  nbdkit has forked (`lock_memory`): every page the process touches stays
  resident, and only those. nbdkit's own --swap is a plain mlockall, which
  populates and pins all of nbdkit's 192 MiB .bss and any MAP_NORESERVE arena:
  260 MB for an idle agent, more than a small host can give (a 384 MiB guest
  was OOM-killed in `attach`). With MCL_ONFAULT the agent holds what it uses
  (about 50 MB at the default 16 MiB reserve); what the swap path needs must
  then be touched in advance: the reserve is populated and mlock()ed on its own.
Each is reported, never fatal: a test run as an ordinary user still works.
"""

from __future__ import annotations

import ctypes
import mmap
from array import array
from collections.abc import Callable

from .supervise.protect import (
    MCL_CURRENT,
    MCL_FUTURE,
    MCL_ONFAULT,
    Outcome,
    libc,
    lock_all,
    protect_from_oom,
    set_io_flusher,
)

__all__ = ["Outcome", "harden_for_swap", "lock_memory", "mlock_buffer", "protect_from_oom",
           "set_io_flusher", "trim_locked_text"]  # fmt: skip


def mlock_buffer(buffer: mmap.mmap, size: int) -> bool:
    """mlock() one writable mapping (the agent's reserve), whatever mlockall did."""
    anchor = ctypes.c_char.from_buffer(buffer)
    try:
        return bool(
            libc().mlock(ctypes.c_void_p(ctypes.addressof(anchor)), ctypes.c_size_t(size)) == 0
        )
    finally:
        del anchor  # drop the buffer export so the mapping can be closed later


def lock_memory() -> Outcome:
    """mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT): resident once touched, for good."""
    return lock_all(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT)


def harden_for_swap(io_flusher: bool = True) -> list[Outcome]:
    """IO_FLUSHER and OOM protection, before exec; the plugin locks memory itself."""
    return [set_io_flusher(), protect_from_oom()] if io_flusher else [protect_from_oom()]


# /proc/self/pagemap: one u64 per page; bit 62 says the page is in swap.
PAGEMAP_SWAPPED = 1 << 62


def fault_in_swapped() -> int:
    """Bring back every page of this process that is in swap; returns how many.

    A standby nbdkit that loaded while the host swapped may have had pages swapped out
    before it locked itself as the plugin loaded (nbdkit's and Python's start). At its
    takeover, touching one of them would wait on the very device whose server it is
    replacing. Under mlockall(MCL_ONFAULT) each page faulted back in here is locked for
    good. /proc/self/pagemap finds them (a page's swap bit), so nothing else is touched:
    nbdkit's 192 MiB .bss stays unallocated."""
    page = mmap.PAGESIZE
    touched = 0
    with open("/proc/self/maps") as maps, open("/proc/self/pagemap", "rb") as pagemap:
        for line in maps:
            fields = line.split()
            if "r" not in fields[1] or (len(fields) > 5 and fields[5].startswith("[v")):
                continue  # unreadable, or the kernel's [vvar]/[vdso]/[vsyscall]
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            pagemap.seek(lo // page * 8)
            entries = array("Q")
            entries.frombytes(pagemap.read((hi - lo) // page * 8))
            for i, entry in enumerate(entries):
                if entry & PAGEMAP_SWAPPED:
                    ctypes.string_at(lo + i * page, 1)
                    touched += 1
    return touched


# mlock2's flag and madvise's advice (linux/mman.h, asm-generic/mman-common.h).
MLOCK_ONFAULT = 1
MADV_DONTNEED = 4


def trim_locked_text(library: str, warm: Callable[[], None]) -> tuple[int, int]:
    """Keep locked only the text of `library` that `warm` runs; (KiB locked before, after).

    Importing cryptography's Rust module touches 5.6 MiB of its 14 MiB of code (every
    submodule registers its types), and under mlockall all of it stays locked, though
    sealing a page runs a sliver of it (measured: 6.5 MiB locked of the agent's 50).
    Each read-only, never-written mapping of the library is unlocked, its pages unmapped
    (they stay in the page cache: nothing is lost), locked again on fault only, and `warm`
    faults back in, and so locks, what the swap path will run. Only mappings with no
    private copy are touched: relocated (RELRO) pages would go back to the file's bytes."""
    warm()  # once before: first-call set-up (the library's lazy statics) need not stay locked
    maps = [m for m in _mappings() if library in m[2] and m[3] == 0 and "w" not in m[1]]
    before = sum(_resident_kib(lo) for lo, *_ in maps)
    c = libc()
    for lo, _perms, _path, _private, hi in maps:
        addr, size = ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo)
        if c.munlock(addr, size) != 0 or c.madvise(addr, size, MADV_DONTNEED) != 0:
            continue  # left as it was: locked and whole
        c.mlock2(addr, size, MLOCK_ONFAULT)
    warm()
    return before, sum(_resident_kib(lo) for lo, *_ in maps)


def _mappings() -> list[tuple[int, str, str, int, int]]:
    """(start, perms, path, private KiB (Anonymous), end) of every file mapping."""
    found: list[tuple[int, str, str, int, int]] = []
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5 and not fields[0].endswith(":"):
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                path = fields[5] if len(fields) > 5 else ""
                found.append((lo, fields[1], path, 0, hi))
            elif fields[0] == "Anonymous:" and found:
                lo, perms, path, _, hi = found[-1]
                found[-1] = (lo, perms, path, int(fields[1]), hi)
    return [m for m in found if m[2].startswith("/")]


def _resident_kib(start: int) -> int:
    """Rss: of the mapping that begins at `start` (under the lock, all of it is locked;
    smaps' Locked: is proportional, halved by a second nbdkit mapping the same file)."""
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and not fields[0].endswith(":"):
                inside = int(fields[0].split("-")[0], 16) == start
            elif inside and fields[0] == "Rss:":
                return int(fields[1])
    return 0
