"""Routing, on the agent's loop: which replicas a job's pages go to, and what their answers mean.

Writes: each page goes to every replica of its slab that takes writes (IN_SYNC
or SYNCING) on an up store; the slab is placed on first write by
power-of-two-choices. A job completes when every such replica has answered
and each page has at least `quorum` acks. A replica whose store fails
mid-write goes STALE: it serves no reads until resynced (repair.py). A DOWN
replica that misses a write goes STALE too.
Reads: each page goes to the first in-sync replica on an up store and falls
back to the next on error or timeout.

Owner of `lock` and `slab_writes`: the writes of each slab not yet answered.
A resync of a slab begins under `lock` and first waits for those; a lone
write on an nbdkit thread (direct.py) picks its replicas and enters
slab_writes under `lock` too, so either the resync sees it or it sees the
resync and goes through the loop.
"""

from __future__ import annotations

import errno
import random
import threading
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

from .batches import Batches, WriteRun
from .jobs import ReadEntry, ReadJob, WriteJob
from .placement import DOWN, IN_SYNC, STALE, SYNCING, SlabTable
from .slots import SlotMap
from .stores import Store

if TYPE_CHECKING:
    from .repair import Repair


class Routing:
    def __init__(
        self,
        table: SlabTable,
        slot_map: SlotMap,
        stores: list[Store],
        batches: list[Batches],
        quorum: int,
        counters: Counter[str],
    ) -> None:
        self.table, self.slot_map = table, slot_map
        self.stores, self.batches = stores, batches
        self.quorum = quorum
        self.counters = counters
        self.rng = random.Random()
        self.repair: Repair | None = None  # set once repair exists (it needs routing)
        # Reentrant: the direct path tracks its job while it holds it.
        self.lock = threading.RLock()
        self.slab_writes: dict[int, set[WriteJob]] = {}  # slab -> its writes not yet answered
        # Of some slots, those whose latest write is not complete yet (the device, which
        # bumps counts, sets this; called on the loop).
        self.pending_writes: Callable[[list[int]], set[int]] = lambda slots: set()

    def up_stores(self) -> list[int]:
        return [store.index for store in self.stores if store.up]

    # -- writes -------------------------------------------------------------------
    def submit_write(self, job: WriteJob) -> None:
        """Queue the job's pages on every writable replica, one run per slab."""
        self.counters["swap_out_pages"] += job.count
        table, stores, batches = self.table, self.stores, self.batches
        syncing = self.repair.syncing if self.repair is not None else {}
        kicked: set[Batches] = set()
        start = 0
        while start < job.count:
            slot = job.first + start
            slab = table.slab_of(slot)
            count = min(job.count - start, table.slab_slots(slab).stop - slot)
            if table.placed(slab) or self._place(slab):
                dirty = syncing.get(slab)
                if dirty is not None:
                    dirty.update(range(slot, slot + count))
                for position, store, state in table.replicas_of(slab):
                    if state in (IN_SYNC, SYNCING) and stores[store].up:
                        batches[store].add_write(job, start, count)
                        job.remaining += count
                        kicked.add(batches[store])
                        self.track_write(slab, job)
                    elif state == DOWN:  # it misses this write: it needs a copy now
                        table.set_state(slab, position, STALE)
                        self.counters["replicas_stale"] += 1
            else:
                job.error = errno.EIO
            start += count
        for batch in kicked:
            batch.kick()
        if job.remaining == 0:
            job.complete(errno.EIO)  # no replica of some page is reachable

    def _place(self, slab: int) -> bool:
        up = self.up_stores()
        if not up:
            return False
        self.table.place(slab, up, lambda s: self.stores[s].free_pages, self.rng)
        self.counters["slabs_placed"] += 1
        return True

    def writes_done(self, store: Store, batch: list[WriteRun], error: int) -> None:
        """error: 0 ok, errno from the store, -1 the store is unreachable."""
        table = self.table
        for job, start, count in batch:
            if error == 0:
                store.unflushed.add(table.slab_of(job.first + start))
                job.acked(start, count)
            elif error > 0:
                job.error = job.error or error
            else:
                self.mark_stale(table.slab_of(job.first + start), store.index)
            job.remaining -= count
            if job.remaining == 0:
                self.forget_write(job)
                job.finish(self.quorum)

    def track_write(self, slab: int, job: WriteJob) -> None:
        """The job will write to this slab: a resync of the slab first waits for it."""
        with self.lock:
            self.slab_writes.setdefault(slab, set()).add(job)

    def forget_write(self, job: WriteJob) -> None:
        """The job is complete, or handed on: no slab waits for it any more."""
        table = self.table
        with self.lock:
            for slab in range(
                table.slab_of(job.first), table.slab_of(job.first + job.count - 1) + 1
            ):
                jobs = self.slab_writes.get(slab)
                if jobs is not None:
                    jobs.discard(job)
                    if not jobs:
                        del self.slab_writes[slab]

    def mark_stale(self, slab: int, store: int) -> None:
        for position, s, state in self.table.replicas_of(slab):
            if s == store and state != STALE:
                self.table.set_state(slab, position, STALE)
                self.counters["replicas_stale"] += 1

    # -- reads --------------------------------------------------------------------
    def submit_read(self, job: ReadJob) -> None:
        self.counters["swap_in_pages"] += len(job.slots)
        for index in range(len(job.slots)):
            self._route_read(ReadEntry(job, index))
        for batch in self.batches:
            if batch.reads:
                batch.kick()

    def _route_read(self, entry: ReadEntry) -> bool:
        slab = self.table.slab_of(entry.slot)
        for _, store, state in self.table.replicas_of(slab):
            if state == IN_SYNC and self.stores[store].up and not entry.tried & (1 << store):
                entry.tried |= 1 << store
                self.batches[store].add_read(entry)
                return True
        self.read_page_done(entry, errno.EIO)
        return False

    def reads_failed(self, store: Store, batch: list[ReadEntry], error: int) -> None:
        self.counters["read_fallbacks"] += len(batch)
        for entry in batch:
            self._route_read(entry)
        for other in self.batches:
            if other.reads:
                other.kick()

    def read_page_done(self, entry: ReadEntry, error: int) -> None:
        job = entry.job
        if error:
            job.error = job.error or error
        job.remaining -= 1
        if job.remaining == 0:
            job.done.set()
