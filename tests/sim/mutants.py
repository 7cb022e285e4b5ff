"""Three bugs netswap once had, put back on purpose: the simulator must find each.

A check that cannot fail proves nothing. Each mutant below restores one
historic behaviour into the real machine for the length of a `with` block;
tests/test_simulator.py runs seeds until the simulator reports a broken promise,
within make test's budget, and fails if it never does.

- `no_reply_copy`: a resync's copy keeps views of the read's buffer instead of
  bytes (the bug 23bfee4 fixed: the copy went out as the next reply's bytes).
- `stale_is_lost`: the old rule "a store back from down whose slabs were written
  since its last flush is stale, and a slab whose replicas are all stale is lost":
  a resync with no in-sync source declares the slab's pages lost.
- `trust_rollback`: the old rebuild, which trusted whatever a store held: a
  replica whose store restarted (a file store back at its last flush) counts
  toward the proof as if it had lost nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from netswap.client.agent.machine import rebuild, resync
from netswap.client.agent.machine.machine import Replicas, Task
from netswap.client.agent.machine.table import IN_SYNC


@contextmanager
def no_reply_copy() -> Iterator[None]:
    resync.COPY_PAGES = False
    try:
        yield
    finally:
        resync.COPY_PAGES = True


@contextmanager
def stale_is_lost() -> Iterator[None]:
    real = resync._resync

    def old(m: Replicas, slab: int, position: int, target: int, seed: int,
            io_timeout: float) -> Task:  # fmt: skip
        others = [st for p, _, st in m.table.replicas_of(slab) if p != position]
        if not any(st == IN_SYNC for st in others):
            span = m.table.slab_slots(slab)
            m.declare_lost(slab, m.slots.written_slots(span.start, span.stop))
            return
        yield from real(m, slab, position, target, seed, io_timeout)

    resync._resync = old  # type: ignore[assignment]
    try:
        yield
    finally:
        resync._resync = real  # type: ignore[assignment]


@contextmanager
def trust_rollback() -> Iterator[None]:
    real = rebuild.SUSPECT
    rebuild.SUSPECT = -1  # no replica is ever left out of the proof
    try:
        yield
    finally:
        rebuild.SUSPECT = real


MUTANTS = {"no_reply_copy": no_reply_copy, "stale_is_lost": stale_is_lost,
           "trust_rollback": trust_rollback}  # fmt: skip
