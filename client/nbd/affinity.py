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
"""

from __future__ import annotations

import os


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


def pin(cpus: frozenset[int]) -> str:
    os.sched_setaffinity(0, cpus)
    return f"CPU affinity {format_cpu_list(cpus)} (nbdkit's threads and the agent hand off on it)"
