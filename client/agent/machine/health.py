"""What the replica machine makes of a store's health: gone, back, fenced; and the waits it bounds.

A store that stops answering (a deadline, a dropped connection) makes its
replicas STALE, nothing more: it lost nothing we know of. One that answers again
as the same boot lost nothing; as another -- unless it ended cleanly right after
the boot the record knows -- it may have lost any write (a memory store all, a
file store those since its last flush), so its replicas are SUSPECT until a
resync has checked them, recorded in the same write as its new boot. Writes and
reads that waited for a store go again once one is back, and fail past their
bounds (bounds.py). Functions of the machine (machine.Replicas), under its lock.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from ..jobs import ReadEntry, WriteJob
from .bounds import READ_WAIT_S, WRITE_WAIT_S
from .slots import UNPROVEN
from .table import IN_SYNC, STALE, SUSPECT, SYNCING

if TYPE_CHECKING:
    from .machine import Replicas


def store_down(m: Replicas, store: int) -> None:
    """A store stopped answering (a deadline, a dropped connection): its replicas
    are STALE from now on -- it has lost nothing we know of."""
    view = m.stores[store]
    if not view.up:
        return
    view.up, view.down_since = False, m.now
    for slab, position in m.table.slabs_on(store):
        state = m.table.state_of(slab, position)
        if state == IN_SYNC:
            m._mark(slab, position, STALE)
        elif state == SYNCING:
            abort_sync(m, slab, position)
    m.counters["store_failures"] += 1


def abort_sync(m: Replicas, slab: int, position: int) -> None:
    """A syncing replica missed a write or its store went: back to what the record
    says it is (its resync sees that and does not call it in sync)."""
    m.table.set_state(slab, position, m.table.durable_state(slab, position))


def store_up(m: Replicas, store: int, store_id: int, boot: int, area_kept: bool,
    prev_boot: int = 0, clean: bool = False,
) -> None:  # fmt: skip
    """A store answers (again). The same boot lost nothing; another boot -- unless it
    ended cleanly right after the one the record knows -- may have lost any write
    (a memory store all, a file store those since its last flush): its replicas are
    SUSPECT until a resync has checked them. The record learns the new boot in the
    same write."""
    view, mark = m.stores[store], m.record.stores[store]
    known = mark.boot
    restarted = known != 0 and boot != known and not (clean and prev_boot == known)
    if restarted or not area_kept:
        for slab, position in m.table.slabs_on(store):
            if m.table.durable_state(slab, position) != SUSPECT:
                m._mark(slab, position, SUSPECT)
        if restarted:
            m.note("warning", f"store {view.name} restarted: its replicas are "
                      f"suspect until checked")  # fmt: skip
    if mark.boot != boot or mark.store_id != store_id:
        mark.boot, mark.store_id = boot, store_id
        m.dirty = True
    view.up, view.store_id, view.boot = True, store_id, boot
    for slab, _ in m.table.slabs_on(store):  # what it holds may prove them now
        span = m.table.slab_slots(slab)
        if m.slots.state.find(UNPROVEN, span.start, span.stop) >= 0:
            m.proving.add(slab)
    m.counters["parked_retries"] += 1  # writes and reads that waited go again (the shell)


def fenced(m: Replicas, store: int, why: str) -> None:
    """A store says a newer agent holds the area: this one must stop writing (P5)."""
    if not m.fenced_out:
        m.fenced_out = why
        m.note("error", f"{why}: this agent stops writing (every write fails EIO)")


def take_parked(m: Replicas) -> tuple[list[WriteJob], list[ReadEntry]]:
    writes, m.parked_writes = m.parked_writes, []
    reads, m.parked_reads = m.parked_reads, []
    for entry in reads:
        entry.parked = False
    return writes, reads


def expire(m: Replicas) -> None:
    """Writes parked past WRITE_WAIT_S fail; reads parked past READ_WAIT_S fail."""
    now = m.now
    keep: list[WriteJob] = []
    for job in m.parked_writes:
        if now - job.parked_at >= WRITE_WAIT_S:
            job.parked_at = 0.0
            m._finish_write(job, errno.EIO)
        else:
            keep.append(job)
    m.parked_writes = keep
    reads: list[ReadEntry] = []
    for entry in m.parked_reads:
        if now - entry.since >= READ_WAIT_S:
            entry.parked = False
            m.failed_reads.append(entry)
            m.counters["reads_expired"] += 1
        else:
            reads.append(entry)
    m.parked_reads = reads
