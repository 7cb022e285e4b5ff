"""CPU placement for `netswap serve --cpus` / `--sched`: where the agent's threads run.

The agent is one Python interpreter: nbdkit's worker threads and the agent's
event loop share one GIL, so the process never runs more than about one CPU's
worth of Python, and every request crosses threads twice (nbdkit thread ->
loop -> nbdkit thread) plus the GIL hand-offs around them. When those threads
sit on different CPUs each hand-off is a cross-CPU wake-up (an IPI; inside a
VM, a VM exit); on one CPU it is a plain context switch. Measured on the 2-vCPU
VM this was built on (make bench-agent with and without --cpus 1): 4K
randwrite QD32 7.3 k -> 11.6 k IOPS, 128K QD8 2.6 k -> 3.6 k, QD1 +7 %. The
embedded backends, which let one request into the plugin at a time, gain
nothing. The price: a pinned agent cannot move off a CPU that something else
is keeping busy, so give it one the workload does not saturate.

`--sched batch` puts the process under SCHED_BATCH: a thread it wakes no
longer preempts the waker. The agent's loop completes a batch by releasing one
lock per waiting nbdkit thread; under SCHED_OTHER each release lets the woken
thread preempt the loop while the loop holds the GIL, so the thread runs only
to block on the GIL again. With --cpus 1, 4K QD32: +23 % side by side, +7-12 %
across bench runs; nothing measurable at 128K. The
price: on a CPU shared with other work, the agent's wake-ups wait for the
tick, so use it on a CPU of the agent's own.

Both are set on the `serve` process just before it becomes (or starts) nbdkit;
threads inherit them.

`--cpus auto`, the default for the remote backend, gathers instead of pinning:
`Gatherer` keeps every thread of the process on one CPU -- the one the rest of
the machine uses least -- and moves them all together when another CPU has
become clearly idler, so the hand-offs stay on one CPU without tying the agent
to a CPU the workload may take over. `--cpus all` leaves placement to the
kernel.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

log = logging.getLogger("netswap.affinity")

# How often the gatherer looks at the CPUs: a move costs one sched_setaffinity per
# thread (~50) and a cold cache, so it follows load over seconds, not ticks.
GATHER_PERIOD_S = 2.0
# Move only when the CPU we are on carries this much more of others' work than the
# idlest one (a fraction of one CPU): less would chase noise back and forth.
MOVE_MARGIN = 0.25
# The first choice is made from a sample this long (the process is starting).
FIRST_SAMPLE_S = 0.1


def parse_cpu_list(text: str) -> frozenset[int]:
    """'1', '0,2', '2-3,6' (taskset -c / cpuset syntax) -> the CPU numbers."""
    cpus: set[int] = set()
    for part in text.split(","):
        low, dash, high = part.strip().partition("-")
        try:
            first, last = int(low), int(high if dash else low)
        except ValueError:
            raise ValueError(
                f"--cpus {text!r}: expected a CPU list such as 1 or 0,2 or 2-3"
            ) from None
        if first < 0 or last < first:
            raise ValueError(f"--cpus {text!r}: bad range {part.strip()!r}")
        cpus.update(range(first, last + 1))
    return frozenset(cpus)


def format_cpu_list(cpus: frozenset[int] | set[int]) -> str:
    """The inverse of parse_cpu_list, with ranges folded: {0, 1, 2, 5} -> '0-2,5'."""
    runs: list[str] = []
    ordered = sorted(cpus)
    start = prev = ordered[0]
    for cpu in [*ordered[1:], None]:
        if cpu is not None and cpu == prev + 1:
            prev = cpu
            continue
        runs.append(str(start) if start == prev else f"{start}-{prev}")
        if cpu is not None:
            start = prev = cpu
    return ",".join(runs)


def parse_cpus_option(text: str) -> frozenset[int] | str:
    """--cpus: 'auto' (gather on the idlest CPU), 'all' (the kernel's choice), or a list."""
    return text if text in ("auto", "all") else parse_cpu_list(text)


def check_available(cpus: frozenset[int]) -> None:
    """Only CPUs this process may run on (its cgroup/affinity), else a clear error."""
    allowed = os.sched_getaffinity(0)
    missing = cpus - allowed
    if missing:
        raise ValueError(
            f"--cpus: CPU {format_cpu_list(set(missing))} not available here "
            f"(allowed: {format_cpu_list(allowed)})"
        )


SCHED_POLICIES = {"normal": os.SCHED_OTHER, "batch": os.SCHED_BATCH, "fifo": os.SCHED_FIFO}
# SCHED_FIFO at the lowest real-time priority: above every normal task, below the
# kernel's own real-time threads. What it buys is memory, not CPU: the page
# allocator lets a real-time task dip a quarter below the min watermark before
# it must reclaim (6.1's gfp_to_alloc_flags: ALLOC_HARDER for rt_task(current);
# ALLOC_MIN_RESERVE later), so the agent's socket buffers come from the reserve
# that vm.min_free_kbytes sets aside instead of from a reclaim that is waiting
# for the agent. The real-time throttle (sched_rt_runtime_us, 95 %) still
# leaves the rest of the machine a share of every CPU.
FIFO_PRIORITY = 1


def set_policy(name: str) -> str:
    priority = FIFO_PRIORITY if name == "fifo" else 0
    os.sched_setscheduler(0, SCHED_POLICIES[name], os.sched_param(priority))
    return f"scheduling policy SCHED_{name.upper() if name != 'normal' else 'OTHER'}"


def pin_process(cpus: frozenset[int]) -> str:
    """Every thread of this process on `cpus` (threads started later inherit it)."""
    check_available(cpus)
    for task in Path("/proc/self/task").iterdir():
        try:
            os.sched_setaffinity(int(task.name), cpus)
        except OSError:  # the thread ended meanwhile
            continue
    return f"CPU affinity {format_cpu_list(cpus)} (nbdkit's threads and the agent hand off on it)"


def _cpu_busy() -> dict[int, tuple[int, int]]:
    """(busy, total) jiffies per CPU since boot, from /proc/stat."""
    out: dict[int, tuple[int, int]] = {}
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("cpu") and line[3:4].isdigit():
            name, *values = line.split()
            ticks = [int(v) for v in values[:8]]
            idle = ticks[3] + ticks[4]  # idle + iowait
            out[int(name[3:])] = (sum(ticks) - idle, sum(ticks))
    return out


def _own_ticks() -> int:
    fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


class Gatherer:
    """Every thread of this process on one CPU, the one others use least.

    The process's threads share one GIL: on two CPUs they buy no parallelism and
    pay a cross-CPU wake-up (an IPI, in a VM an exit) per hand-off. So they all
    run on one CPU; every GATHER_PERIOD_S the gatherer compares how busy each
    allowed CPU was with *other* work and moves the whole process when its CPU
    carries MOVE_MARGIN of a CPU more than the idlest. Threads started later
    inherit the affinity of the thread that starts them; each tick re-applies it
    to any that differ.
    """

    def __init__(self, allowed: frozenset[int] | None = None) -> None:
        self.allowed = sorted(allowed if allowed is not None else os.sched_getaffinity(0))
        self.cpu = -1
        self.moves = 0
        self._last = (_cpu_busy(), _own_ticks())
        self._stop = threading.Event()

    def others_load(self) -> dict[int, float]:
        """Each allowed CPU's busy fraction since the last look, without this process."""
        busy, own = _cpu_busy(), _own_ticks()
        (before, own_before), self._last = self._last, (busy, own)
        load = {}
        for cpu in self.allowed:
            b0, t0 = before.get(cpu, (0, 0))
            b1, t1 = busy.get(cpu, (0, 0))
            span = max(1, t1 - t0)
            mine = own - own_before if cpu == self.cpu else 0
            load[cpu] = max(0.0, (b1 - b0 - mine) / span)
        return load

    def choose(self, load: dict[int, float]) -> int:
        idlest = min(self.allowed, key=lambda c: (load[c], -c))
        if self.cpu in load and load[self.cpu] - load[idlest] < MOVE_MARGIN:
            return self.cpu
        return idlest

    def apply(self, cpu: int) -> None:
        """Put every thread of the process on `cpu` (threads that ended are skipped)."""
        target = {cpu}
        for task in Path("/proc/self/task").iterdir():
            tid = int(task.name)
            try:
                if os.sched_getaffinity(tid) != target:
                    os.sched_setaffinity(tid, target)
            except OSError:  # the thread ended meanwhile
                continue
        if cpu != self.cpu:
            self.moves += self.cpu >= 0
            self.cpu = cpu

    def tick(self) -> None:
        self.apply(self.choose(self.others_load()))

    def start(self) -> str:
        """Choose a first CPU now, then re-choose every GATHER_PERIOD_S in a thread."""
        if len(self.allowed) < 2:
            return f"CPU placement: one CPU allowed ({format_cpu_list(set(self.allowed))})"
        self._stop.wait(FIRST_SAMPLE_S)
        self.tick()
        threading.Thread(target=self._run, name="netswap-gather", daemon=True).start()
        return (
            f"CPU placement: threads gathered on CPU {self.cpu}, re-chosen every "
            f"{GATHER_PERIOD_S:g} s by load (--cpus all: the kernel's choice)"
        )

    def _run(self) -> None:
        while not self._stop.wait(GATHER_PERIOD_S):
            try:
                self.tick()
            except OSError as exc:  # /proc unreadable: keep the last placement
                log.warning("CPU placement: %s", exc)

    def stop(self) -> None:
        self._stop.set()
