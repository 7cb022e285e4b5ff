"""The kernel settings the supervisor touches around an nbdkit start, stdlib only.

- The device queue's request timer (REQUEUE_MS): with the kernel's IO timeout
  at 0 (never abort), a request sent to a connection that died is sent again
  on the new one when this timer finds the socket replaced.
- Heuristic overcommit, for nbdkit's start only, on a host smaller than
  nbdkit's .bss (a 224 MiB guest): nbdkit never touches those pages.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

from .logs import Logs

# The supervisor's log: lines go through a ring a thread writes out (logs.py says why).
LOGS = Logs("netswap supervise")

# 2 s keeps a restart's stall short without a "possible stuck request" log line per
# second for requests that are merely slow.
REQUEUE_MS = 2000
OVERCOMMIT = "/proc/sys/vm/overcommit_memory"
# nbdkit 1.32's own .bss is 192 MiB: under the heuristic overcommit check a host whose
# RAM + swap is below this (and a margin for the rest of its mappings) cannot start it.
NBDKIT_BSS_KIB = 192 * 1024 + 32 * 1024


def log(message: str) -> None:
    LOGS.say(f"{time.strftime('%H:%M:%S')} netswap supervise: {message}")


def set_requeue_period(device: str, ms: int = REQUEUE_MS) -> None:
    path = f"/sys/block/{device.rsplit('/', 1)[-1]}/queue/io_timeout"
    try:
        with open(path, "w") as f:
            f.write(f"{ms}\n")
    except OSError as exc:
        log(f"cannot set {path} ({exc.strerror}): requests sent to a dead connection go "
            "again only after the kernel's default 30 s")  # fmt: skip


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


class Overcommit:
    """nbdkit's .bss fails the heuristic overcommit check on a host whose RAM and swap
    are smaller; while an nbdkit starts, overcommit is allowed (it never touches those
    pages). Held by count: the one serving and a spare may start together."""

    def __init__(self, say: Callable[[str], None] | None = None) -> None:
        self.holders = 0
        self.changed = False
        self.say = say or log  # the supervisor's log; serve's stderr (serve.check_nbdkit)

    def allow(self) -> None:
        self.holders += 1
        if self.holders > 1:
            return
        total = sum(int(line.split()[1]) for line in _read("/proc/meminfo").splitlines()
                    if line.startswith(("MemTotal:", "SwapTotal:")))  # fmt: skip
        if _read(OVERCOMMIT).strip() != "0" or total > NBDKIT_BSS_KIB:
            return
        with open(OVERCOMMIT, "w") as f:
            f.write("1\n")
        self.changed = True
        self.say(f"RAM + swap ({total // 1024} MiB) is below nbdkit's .bss: overcommit allowed "
            "while nbdkit starts")  # fmt: skip

    def restore(self) -> None:
        self.holders = max(0, self.holders - 1)
        if self.holders == 0 and self.changed:
            with open(OVERCOMMIT, "w") as f:
                f.write("0\n")
            self.changed = False

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        self.allow()
        try:
            yield
        finally:
            self.restore()


OVERCOMMIT_FOR_NBDKIT = Overcommit()
