"""The machine's bounds, each with where its number comes from."""

from __future__ import annotations

# How long a read waits for a store that holds its page to answer again. A read
# that fails is a process killed (SIGBUS) on the host; a store that is only paused,
# partitioned or failing over costs the kernel nothing but time, and attach holds the
# device's IO through 120 s of outage (--dead-conn-timeout). Just under that.
READ_WAIT_S = 110.0
# How long a write waits for its replicas when too few answer (every store of its slab
# away, or one that went quiet under it): stalls of 1-30 s (a GC pause, a VM
# migration, SIGSTOP), and a Redis failover at its default 15 s node timeout plus the
# election, cost time and not a write. A failed swap write costs the kernel more than
# time: the page stays in memory (mm/page_io.c re-dirties it) while reclaim needs it
# gone. Past it the write fails and the kernel writes the page again later.
WRITE_WAIT_S = 30.0
# A store away this long has its replicas copied to a spare store (when one is up and
# the slab has an in-sync replica to copy from): long enough to ride out a restart,
# short enough to shrink the window in which a second fault finds one copy.
REPLACE_AFTER_S = 3.0
# Resyncs run at once: each holds a 256 KiB read and a few copies in flight (resync.py).
MAX_RESYNCS = 2
# Log lines kept for the shell between two drains (a burst of faults must not grow it).
MAX_NOTES = 256

__all__ = ["MAX_NOTES", "MAX_RESYNCS", "READ_WAIT_S", "REPLACE_AFTER_S", "WRITE_WAIT_S"]
