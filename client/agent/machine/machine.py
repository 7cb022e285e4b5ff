"""The agent's replica logic as one state machine, free of I/O.

`Replicas` owns every piece of replica state -- the slots (slots.py), the slab
table (table.py), what the agent believes of each store, the writes in flight
per slab, the resyncs under way, the durable record (record.py) -- and changes
it only in answer to an event: a write or read asked, a store's answer, a store
gone or back, the clock. nbdkit's threads, the agent's event loop (core.py) and
the simulator (tests/sim) are shells that feed it events and carry out what it
decides; every call holds `lock`, so a shell on any thread sees it whole.

The rules, in one place (the README's promises P1-P6 rest on them):
- A write goes to every replica of its slab whose store is up; it is
  acknowledged when each replica it went to has answered and every page has at
  least `quorum` copies. A replica that misses it, or refuses it, is STALE in
  the durable record before the acknowledgement. A write no replica could take
  within WRITE_WAIT_S fails: its slots are DOUBT.
- A read tries the slab's replicas in turn, in-sync ones first, on up stores;
  every page must prove its slot and its generation (proof.py). With no
  replica left to try it waits, up to READ_WAIT_S, while a replica's store is
  away -- a quiet store costs time, not pages -- and fails EIO only when none
  is.
- A store that goes quiet makes its replicas STALE, nothing more. One that comes
  back as the same boot lost nothing; one that restarted (another boot) makes its
  replicas SUSPECT. Either way a resync (resync.py) checks each replica against
  the slots' generations and copies what it lacks; a slot that no replica holds
  once every one has answered is LOST, recorded, and EIO until written again.
- A restarted agent rebuilds from the record and the stores (rebuild.py).
"""

from __future__ import annotations

import errno
import random
import threading
from collections import Counter, deque
from collections.abc import Generator, Iterable
from typing import Any

from ..jobs import ReadEntry, WriteJob
from . import health, planner, recording
from .bounds import MAX_NOTES, READ_WAIT_S
from .record import Record, StoreMark
from .slots import DOUBT, UNPROVEN, WRITTEN, Slots
from .steps import Step
from .table import (
    IN_SYNC,
    MAX_STORES,
    STALE,
    SYNCING,
    SlabTable,
    power_of_two_choices,
)

Task = Generator[Step, Any, None]
PARKED, FAILED = -1, -2  # route_read's answers besides a store index


class StoreView:
    """What the machine believes of one store."""

    __slots__ = ("boot", "down_since", "free_bytes", "index", "name", "store_id", "up")

    def __init__(self, index: int, name: str) -> None:
        self.index, self.name = index, name
        self.up = False
        self.store_id = 0
        self.boot = 0  # the boot it answered as last
        self.down_since = 0.0
        self.free_bytes = 0  # placement takes the freer of two (the shell refreshes it)


class Replicas:
    def __init__(
        self,
        slots: int,
        slab_slots: int,
        replicas: int,
        quorum: int,
        stores: list[str],
        *,
        sealed: bool = False,
        rng: random.Random | None = None,
    ) -> None:
        # Plain values first: mypyc counts an attribute set after a call in __init__ as
        # possibly undefined, and its check of those from another module crashes its build.
        self.quorum = quorum
        self.sealed = sealed
        self.now = 0.0  # the shell's clock, set before each event
        self.dirty = False  # the record changed: persist it before acknowledging anything
        self.fenced_out = ""  # why another agent holds the area now: this one stops
        if len(stores) > MAX_STORES:
            raise ValueError(f"at most {MAX_STORES} stores")
        self.lock = threading.RLock()
        self.slots = Slots(slots)
        self.table = SlabTable(slots, slab_slots, replicas)
        self.stores = [StoreView(i, name) for i, name in enumerate(stores)]
        self.rng = rng or random.Random()
        self.record = Record(replicas=replicas, quorum=quorum, slab_slots=slab_slots,
                             stores=[StoreMark(name) for name in stores])  # fmt: skip
        self.record.slabs = bytearray(2 * replicas * self.table.slabs)
        self.writes: dict[int, set[WriteJob]] = {}  # slab -> writes begun, not yet complete
        self.syncing: dict[int, set[int]] = {}  # slab -> slots written since its resync began
        self.parked_reads: list[ReadEntry] = []
        self.parked_writes: list[WriteJob] = []
        self.finished: list[WriteJob] = []  # complete writes the shell has to acknowledge
        self.failed_reads: list[ReadEntry] = []  # reads the shell has to answer (EIO)
        self.leftovers: dict[int, set[int]] = {}  # store -> slabs it holds but is no replica of
        self.repairing: set[int] = set()  # slabs with a resync or proof under way
        self.proving: set[int] = set()  # unproven slabs whose proof waits to run again
        self.counters: Counter[str] = Counter()
        self.notes: deque[tuple[str, str]] = deque(maxlen=MAX_NOTES)

    # -- the durable record -----------------------------------------------------------
    @property
    def epoch(self) -> int:
        return self.slots.epoch

    def begin(self, record: Record | None, epoch_floor: int, area_id: int) -> None:
        """At start: take over what a record says (a restart), or start a fresh one; the
        epoch goes above every epoch any agent used, and is recorded first (P6)."""
        old = record.epoch if record is not None else 0
        self.slots.epoch = max(old, epoch_floor) + 1
        if record is None:
            self.record.area_id = area_id
        else:
            recording.load(self, record)
        self.record.epoch = self.slots.epoch
        self.dirty = True

    def raise_epoch(self, epoch: int) -> None:
        """Go to `epoch` (above what a store has seen), recorded before it is used."""
        if epoch > self.slots.epoch:
            self.slots.epoch = self.record.epoch = epoch
            self.dirty = True

    def take_record(self) -> Record | None:
        """The record to persist now, or None when nothing changed."""
        if not self.dirty:
            return None
        self.dirty = False
        recording.sync_table(self)
        return self.record

    def _mark(self, slab: int, position: int, state: int) -> None:
        """A replica's state changes: persisted before anything relies on it."""
        table = self.table
        before = table.durable_state(slab, position)
        table.set_state(slab, position, state)
        if table.durable_state(slab, position) != before:
            self.dirty = True

    def note(self, level: str, text: str) -> None:
        self.notes.append((level, text))

    # -- writes (begin: nbdkit's threads; the rest: the loop) --------------------------------
    def begin_write(self, job: WriteJob) -> None:
        """Give the job's slots their new generations and count it in flight on its slabs
        (a resync that begins later waits for it). Under `lock`."""
        slots = self.slots
        if slots.wraps(job.first, job.count):  # a count at 2^32 - 1: the next epoch first
            slots.epoch += 1
            self.record.epoch = slots.epoch
            self.dirty = True
            self.counters["epoch_raises"] += 1
        job.generations = slots.write(job.first, job.count)
        table = self.table
        for slab in range(table.slab_of(job.first), table.slab_of(job.first + job.count - 1) + 1):
            self.writes.setdefault(slab, set()).add(job)
            dirty = self.syncing.get(slab)
            if dirty is not None:
                dirty.update(range(job.first, job.first + job.count))

    def route_write(self, job: WriteJob) -> list[tuple[int, int, int]]:
        """Where the job's pages go: (store, first page index, pages) runs, one per replica
        of each slab it spans. [] when it is parked (no replica answers) or failed."""
        if self.fenced_out:
            self._finish_write(job, errno.EIO)
            return []
        table, stores = self.table, self.stores
        sends: list[tuple[int, int, int]] = []
        start = 0
        while start < job.count:
            slot = job.first + start
            slab = table.slab_of(slot)
            count = min(job.count - start, table.slab_slots(slab).stop - slot)
            if not table.placed(slab) and not self._place(slab):
                return self._park_write(job)
            targets = [store for _, store, _ in table.replicas_of(slab) if stores[store].up]
            if not targets:
                return self._park_write(job)
            sends.extend((store, start, count) for store in targets)
            start += count
        job.remaining = sum(count for _, _, count in sends)
        self.counters["swap_out_pages"] += job.count
        return sends

    def _park_write(self, job: WriteJob) -> list[tuple[int, int, int]]:
        if not job.parked_at:  # its wait is bounded from the first time it parked
            job.parked_at = self.now or 1e-9
            self.counters["writes_parked"] += 1
        self.parked_writes.append(job)
        return []

    def _place(self, slab: int) -> bool:
        """Place a slab's replicas on distinct up stores (as many as answer); recorded
        before its first write goes out."""
        up = [s.index for s in self.stores if s.up]
        if not up:
            return False
        table = self.table
        chosen: list[int] = []
        for position in range(table.replicas):
            left = [s for s in up if s not in chosen]
            if not left:
                break
            store = power_of_two_choices(left, lambda s: self.stores[s].free_bytes, self.rng)
            chosen.append(store)
            table.set_replica(slab, position, store, IN_SYNC)
        self.dirty = True
        self.counters["slabs_placed"] += 1
        return True

    def write_answered(
        self, store: int, job: WriteJob, start: int, count: int, outcome: int
    ) -> bool:
        """A replica answered pages start..start+count-1 of `job`: 0 stored, an errno it
        refused them with, or UNREACHABLE. True when the job is complete now."""
        if outcome == 0:
            job.acked(start, count)
        else:
            slab = self.table.slab_of(job.first + start)
            for position, s, state in self.table.replicas_of(slab):
                if s == store and state == IN_SYNC:
                    self._mark(slab, position, STALE)  # it missed a write: recorded first
                    self.counters["replicas_stale"] += 1
                elif s == store and state == SYNCING:
                    self._abort_sync(slab, position)  # it lacks a write its resync skips
            if outcome > 0:
                job.refusal = job.refusal or outcome
                self.counters["write_refusals"] += 1
            if outcome == errno.ESTALE:
                self.fenced(store, f"store {self.stores[store].name}: a newer agent holds the area")
            elif outcome < 0:
                job.unreachable = True
        job.remaining -= count
        if job.remaining > 0:
            return False
        quorum = min(self.quorum, self.table.replicas)
        if min(job.acks) >= quorum:
            self._finish_write(job, 0)
        elif job.unreachable and not job.refusal and not self.fenced_out:
            # A store went quiet under it: it waits (WRITE_WAIT_S) for stores to answer and
            # goes to every replica again -- a write sent twice is the same write.
            job.acks[:] = bytes(job.count)
            job.unreachable = False
            self._park_write(job)
            return False
        else:
            self._finish_write(job, job.refusal or errno.EIO)
        return True

    def _finish_write(self, job: WriteJob, error: int) -> None:
        job.error = job.error or error
        job.complete = True
        table = self.table
        for slab in range(table.slab_of(job.first), table.slab_of(job.first + job.count - 1) + 1):
            jobs = self.writes.get(slab)
            if jobs is not None:
                jobs.discard(job)
                if not jobs:
                    del self.writes[slab]
        if job.error:  # neither page can be proven newest now; the kernel writes it again
            slots, gens = self.slots, job.generations
            doubt: dict[int, list[int]] = {}
            for i in range(job.count):
                slot = job.first + i
                if slots.gens[slot] == gens[i] and slots.state[slot] == WRITTEN:
                    slots.state[slot] = DOUBT
                    doubt.setdefault(table.slab_of(slot), []).append(slot)
            for slab, slots_of in doubt.items():  # recorded: no restart serves an older copy
                self._record_unreadable(slab, slots_of)
            self.counters["writes_failed"] += 1
        self.finished.append(job)

    def direct_write_stores(self, job: WriteJob) -> list[int] | None:
        """A lone write may go from its own thread when its slab is placed, every replica
        is in sync on an up store and no resync is under way; None: through the loop."""
        table = self.table
        slab = table.slab_of(job.first)
        if table.slab_of(job.first + job.count - 1) != slab or slab in self.syncing:
            return None
        replicas = table.replicas_of(slab)
        if len(replicas) != table.replicas or self.fenced_out:
            return None
        if any(state != IN_SYNC or not self.stores[s].up for _, s, state in replicas):
            return None
        return [s for _, s, _ in replicas]

    def direct_write_done(self, job: WriteJob) -> None:
        """Every replica stored a direct write (the loop's rule, met on the thread)."""
        job.acks[:] = bytes([self.table.replicas]) * job.count
        self._finish_write(job, 0)

    def take_finished(self) -> list[WriteJob]:
        done, self.finished = self.finished, []
        return done

    # -- reads --------------------------------------------------------------------------
    def read_plan(self, first: int, count: int) -> list[tuple[int, int]]:
        """Under `lock`, for a read of slots first..first+count-1: per slot (state, its
        generation now). The caller serves NEVER as zeros, fails LOST/DOUBT, and asks
        the stores for WRITTEN (and UNPROVEN: route_read parks it)."""
        state, gens = self.slots.state, self.slots.gens
        return [(state[s], gens[s]) for s in range(first, first + count)]

    def route_read(self, entry: ReadEntry) -> int:
        """The store to ask for this page next, PARKED (it waits for a store to come back)
        or FAILED (no replica can serve it: EIO)."""
        slot = entry.slot
        state = self.slots.state[slot]
        slab = self.table.slab_of(slot)
        if state == WRITTEN:
            best = later = -1
            for _, store, rstate in self.table.replicas_of(slab):
                if not self.stores[store].up:
                    continue
                if entry.tried & (1 << store):
                    continue
                if rstate == IN_SYNC:
                    best = store
                    break
                if later < 0:
                    later = store
            choice = best if best >= 0 else later
            if choice >= 0:
                entry.tried |= 1 << choice
                return choice
        elif state not in (UNPROVEN,):
            return FAILED  # trimmed, lost or in doubt meanwhile: the caller says which
        waiting = (
            self._may_come_back(slab)
            or slab in self.proving
            or (state == UNPROVEN and slab in self.repairing)
        )
        if waiting and self.now - entry.since < READ_WAIT_S:
            if not entry.parked:
                entry.parked = True
                self.parked_reads.append(entry)
                self.counters["reads_parked"] += 1
            return PARKED
        return FAILED

    def _may_come_back(self, slab: int) -> bool:
        """Is a replica of this slab on a store that does not answer now?"""
        return any(not self.stores[s].up for _, s, _ in self.table.replicas_of(slab))

    def direct_read_store(self, first: int, count: int) -> int:
        """A lone read from its own thread: an in-sync replica on an up store, or -1."""
        table = self.table
        slab = table.slab_of(first)
        if table.slab_of(first + count - 1) != slab:
            return -1
        for s in table.in_sync(slab):
            if self.stores[s].up:
                return s
        return -1

    def take_failed_reads(self) -> list[ReadEntry]:
        failed, self.failed_reads = self.failed_reads, []
        return failed

    # -- stores (health.py) ----------------------------------------------------------------
    def store_down(self, store: int) -> None:
        health.store_down(self, store)

    def store_up(
        self, store: int, store_id: int, boot: int, area_kept: bool,
        prev_boot: int = 0, clean: bool = False,
    ) -> None:  # fmt: skip
        health.store_up(self, store, store_id, boot, area_kept, prev_boot, clean)

    def _abort_sync(self, slab: int, position: int) -> None:
        health.abort_sync(self, slab, position)

    def fenced(self, store: int, why: str) -> None:
        health.fenced(self, store, why)

    def take_parked(self) -> tuple[list[WriteJob], list[ReadEntry]]:
        return health.take_parked(self)

    def expire(self) -> None:
        health.expire(self)

    # -- repairs and figures (planner.py) -------------------------------------------------
    def proofs(self) -> list[int]:
        return planner.proofs(self)

    def repairs(self) -> list[tuple[int, int]]:
        return planner.repairs(self)

    def take_leftovers(self, store: int) -> list[int]:
        return planner.take_leftovers(self, store)

    def lag(self) -> int:
        return planner.lag(self)

    def replicas_behind(self) -> int:
        return planner.replicas_behind(self)

    def replica_states(self, store: int) -> list[int]:
        return planner.replica_states(self, store)

    def unreadable(self) -> dict[str, int]:
        return planner.unreadable(self)

    # -- lost slots (recording.py) -----------------------------------------------------------
    def declare_lost(self, slab: int, slots: Iterable[int], was: int = WRITTEN) -> int:
        return recording.declare_lost(self, slab, slots, was)

    def _record_unreadable(self, slab: int, slots: list[int]) -> None:
        recording.record_unreadable(self, slab, slots)

    # -- trims --------------------------------------------------------------------------
    def trim(self, first: int, count: int) -> list[tuple[int, list[tuple[int, int]]]]:
        """Slots trimmed (they read zeros); the discards to send, per store."""
        self.slots.forget(first, count)
        table = self.table
        by_store: dict[int, list[tuple[int, int]]] = {}
        slot, end = first, first + count
        while slot < end:
            slab = table.slab_of(slot)
            stop = min(end, table.slab_slots(slab).stop)
            for _, store, _ in table.replicas_of(slab):
                by_store.setdefault(store, []).append((slot, stop - slot))
            slot = stop
        return [(s, ranges) for s, ranges in by_store.items() if self.stores[s].up]

    # -- figures -----------------------------------------------------------------------


def _bounds(slots: range) -> tuple[int, int]:
    return slots.start, slots.stop
