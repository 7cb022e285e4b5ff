"""What a process serving swap asks of the kernel, in the stdlib only.

IO_FLUSHER (reclaim on its behalf never recurses into IO), oom_score_adj -1000,
SCHED_FIFO, mlockall; each reported, never fatal (a test run as an ordinary user
still works). The supervisor uses them directly; `netswap.client.hardening`
re-exports them for serve and the plugin. libc is the process's own
(ctypes.CDLL(None)): ctypes.util's find_library would import subprocess and re,
1.9 MiB of the supervisor's 16.
"""

from __future__ import annotations

import ctypes
import os

PR_SET_IO_FLUSHER = 57
MCL_CURRENT, MCL_FUTURE, MCL_ONFAULT = 1, 2, 4  # <sys/mman.h>
EINVAL, EPERM = 22, 1


class Outcome:
    """One protection: applied or not, and why (a plain class: no dataclasses here)."""

    __slots__ = ("detail", "ok", "what")

    def __init__(self, what: str, ok: bool, detail: str) -> None:
        self.what, self.ok, self.detail = what, ok, detail

    def __str__(self) -> str:
        return f"{self.what}: {'ok' if self.ok else 'NOT applied'} ({self.detail})"


def libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def set_io_flusher() -> Outcome:
    what = "prctl(PR_SET_IO_FLUSHER)"
    if libc().prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) == 0:
        return Outcome(what, True, "reclaim will not recurse into I/O")
    err = ctypes.get_errno()
    if err == EINVAL:
        detail = "kernel older than 5.6 has no PR_SET_IO_FLUSHER"
    elif err == EPERM:
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


def real_time() -> Outcome:
    """SCHED_FIFO at the lowest real-time priority: runs before every ordinary task, and
    its allocations may dip a quarter below the min watermark (the kernel's rt rule)."""
    what = "SCHED_FIFO"
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
    except PermissionError:
        return Outcome(what, False, "needs CAP_SYS_NICE")
    return Outcome(what, True, "runs before ordinary tasks")


def lock_all(flags: int) -> Outcome:
    names = "|".join(n for n, f in (("MCL_CURRENT", MCL_CURRENT), ("MCL_FUTURE", MCL_FUTURE),
                                    ("MCL_ONFAULT", MCL_ONFAULT)) if flags & f)  # fmt: skip
    what = f"mlockall({names})"
    if libc().mlockall(flags) == 0:
        return Outcome(what, True, "pages this process touches are never swapped")
    err = ctypes.get_errno()
    return Outcome(what, False, f"{os.strerror(err)} (needs CAP_IPC_LOCK or RLIMIT_MEMLOCK)")


def resident_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0
