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
import ctypes.util
import mmap
import os
from dataclasses import dataclass

PR_SET_IO_FLUSHER = 57
MCL_CURRENT, MCL_FUTURE, MCL_ONFAULT = 1, 2, 4  # <sys/mman.h>


@dataclass(frozen=True)
class Outcome:
    what: str
    ok: bool
    detail: str

    def __str__(self) -> str:
        return f"{self.what}: {'ok' if self.ok else 'NOT applied'} ({self.detail})"


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def set_io_flusher() -> Outcome:
    what = "prctl(PR_SET_IO_FLUSHER)"
    if _libc().prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) == 0:
        return Outcome(what, True, "reclaim will not recurse into I/O")
    err = ctypes.get_errno()
    if err == 22:
        detail = "kernel older than 5.6 has no PR_SET_IO_FLUSHER"
    elif err == 1:
        detail = "needs CAP_SYS_RESOURCE (run as root)"
    else:
        detail = os.strerror(err)
    return Outcome(what, False, detail)


def protect_from_oom(score: int = -1000) -> Outcome:
    what = f"oom_score_adj={score}"
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(score))
    except OSError as exc:
        return Outcome(what, False, exc.strerror or str(exc))
    return Outcome(what, True, "the OOM killer will not pick this process")


def mlock_buffer(buffer: mmap.mmap, size: int) -> bool:
    """mlock() one writable mapping (the agent's reserve), whatever mlockall did."""
    anchor = ctypes.c_char.from_buffer(buffer)
    try:
        return bool(
            _libc().mlock(ctypes.c_void_p(ctypes.addressof(anchor)), ctypes.c_size_t(size)) == 0
        )
    finally:
        del anchor  # drop the buffer export so the mapping can be closed later


def lock_memory() -> Outcome:
    """mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT): resident once touched, for good."""
    what = "mlockall(MCL_CURRENT|MCL_FUTURE|MCL_ONFAULT)"
    if _libc().mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT) == 0:
        return Outcome(what, True, "pages this process touches are never swapped")
    err = ctypes.get_errno()
    return Outcome(what, False, f"{os.strerror(err)} (needs CAP_IPC_LOCK or RLIMIT_MEMLOCK)")


def harden_for_swap(io_flusher: bool = True) -> list[Outcome]:
    """IO_FLUSHER and OOM protection, before exec; the plugin locks memory itself."""
    return [set_io_flusher(), protect_from_oom()] if io_flusher else [protect_from_oom()]
