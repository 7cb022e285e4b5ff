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
           "set_io_flusher"]  # fmt: skip


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
