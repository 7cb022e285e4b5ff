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
from .record import Record, StoreMark, bitmap_of, offsets_in
from .slots import DOUBT, LOST, NEVER, UNPROVEN, WRITTEN, Slots
from .steps import Step
from .table import (
    IN_SYNC,
    MAX_STORES,
    STALE,
    SUSPECT,
    SYNCING,
    UNPLACED,
    SlabTable,
    power_of_two_choices,
)

# How long a read waits for a store that holds its page to answer again. A read
# that fails is a process killed (SIGBUS) on the host; a store that is only paused,
# partitioned or failing over costs the kernel nothing but time, and attach holds the
# device's IO through 120 s of outage (--dead-conn-timeout). Just under that.
READ_WAIT_S = 110.0
# How long a write waits for a replica to take it when no store of its slab answers:
# the RPC deadline. Past it the write fails and the kernel keeps the page in memory
# (mm/page_io.c re-dirties a page whose swap write failed) and writes it again later.
WRITE_WAIT_S = 5.0
# A store away this long has its replicas copied to a spare store (when one is up and
# the slab has an in-sync replica to copy from): long enough to ride out a restart,
# short enough to shrink the window in which a second fault finds one copy.
REPLACE_AFTER_S = 3.0
# Resyncs run at once: each holds a 256 KiB read and a few copies in flight (resync.py).
MAX_RESYNCS = 2
# Log lines kept for the shell between two drains (a burst of faults must not grow it).
MAX_NOTES = 256

Task = Generator[Step, Any, None]
PARKED, FAILED = -1, -2  # route_read's answers besides a store index


class StoreView:
    """What the machine believes of one store."""

    __slots__ = ("boot", "down_since", "free_pages", "index", "name", "store_id", "up")

    def __init__(self, index: int, name: str) -> None:
        self.index, self.name = index, name
        self.up = False
        self.store_id = 0
        self.boot = 0  # the boot it answered as last
        self.down_since = 0.0
        self.free_pages = 0


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
        if len(stores) > MAX_STORES:
            raise ValueError(f"at most {MAX_STORES} stores")
        self.lock = threading.RLock()
        self.slots = Slots(slots)
        self.table = SlabTable(slots, slab_slots, replicas)
        self.stores = [StoreView(i, name) for i, name in enumerate(stores)]
        self.quorum = quorum
        self.sealed = sealed
        self.rng = rng or random.Random()
        self.now = 0.0  # the shell's clock, set before each event
        self.record = Record(replicas=replicas, quorum=quorum, slab_slots=slab_slots,
                             stores=[StoreMark(name) for name in stores])  # fmt: skip
        self.record.slabs = bytearray(2 * replicas * self.table.slabs)
        self.dirty = False  # the record changed: persist it before acknowledging anything
        self.writes: dict[int, set[WriteJob]] = {}  # slab -> writes begun, not yet complete
        self.syncing: dict[int, set[int]] = {}  # slab -> slots written since its resync began
        self.parked_reads: list[ReadEntry] = []
        self.parked_writes: list[WriteJob] = []
        self.finished: list[WriteJob] = []  # complete writes the shell has to acknowledge
        self.failed_reads: list[ReadEntry] = []  # reads the shell has to answer (EIO)
        self.leftovers: dict[int, set[int]] = {}  # store -> slabs it holds but is no replica of
        self.repairing: set[int] = set()  # slabs with a resync or proof under way
        self.proving: set[int] = set()  # unproven slabs whose proof waits to run again
        self.lost_pending: dict[int, set[int]] = {}  # slab -> slots found nowhere, to record
        self.fenced_out = ""  # why another agent holds the area now: this one stops
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
            self._load(record)
        self.record.epoch = self.slots.epoch
        self.dirty = True

    def raise_epoch(self, epoch: int) -> None:
        """Go to `epoch` (above what a store has seen), recorded before it is used."""
        if epoch > self.slots.epoch:
            self.slots.epoch = self.record.epoch = epoch
            self.dirty = True

    def _load(self, record: Record) -> None:
        """The dead agent's table: its replicas at their recorded states (mapped onto this
        agent's stores by id, else by name), its stores' boots and its lost slots."""
        mine = self.record
        mine.area_id = record.area_id
        index_of: dict[int, int] = {}
        by_name = {s.name: s.index for s in self.stores}
        for i, mark in enumerate(record.stores):
            if mark.name in by_name:
                here = by_name[mark.name]
                index_of[i] = here
                mine.stores[here] = StoreMark(mark.name, mark.store_id, mark.boot)
        table, width = self.table, record.replicas
        for slab in range(min(table.slabs, len(record.slabs) // (2 * width))):
            for position in range(min(width, table.replicas)):
                at = 2 * (slab * width + position)
                store, state = record.slabs[at], record.slabs[at + 1]
                if store != UNPLACED and store in index_of:
                    table.set_replica(slab, position, index_of[store], state)
        mine.lost = dict(record.lost)
        self._sync_record_table()

    def _sync_record_table(self) -> None:
        table, slabs = self.table, self.record.slabs
        for i in range(table.slabs * table.replicas):
            slab, position = divmod(i, table.replicas)
            slabs[2 * i] = table.store[i]
            slabs[2 * i + 1] = (
                table.durable_state(slab, position) if table.store[i] != UNPLACED else 0
            )

    def take_record(self) -> Record | None:
        """The record to persist now, or None when nothing changed."""
        if not self.dirty:
            return None
        self.dirty = False
        self._sync_record_table()
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
            store = power_of_two_choices(left, lambda s: self.stores[s].free_pages, self.rng)
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
        job.remaining -= count
        if job.remaining > 0:
            return False
        quorum = min(self.quorum, self.table.replicas)
        self._finish_write(job, 0 if min(job.acks) >= quorum else (job.refusal or errno.EIO))
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

    # -- stores ------------------------------------------------------------------------
    def store_down(self, store: int) -> None:
        """A store stopped answering (a deadline, a dropped connection): its replicas
        are STALE from now on -- it has lost nothing we know of."""
        view = self.stores[store]
        if not view.up:
            return
        view.up, view.down_since = False, self.now
        for slab, position in self.table.slabs_on(store):
            state = self.table.state_of(slab, position)
            if state == IN_SYNC:
                self._mark(slab, position, STALE)
            elif state == SYNCING:
                self._abort_sync(slab, position)
        self.counters["store_failures"] += 1

    def _abort_sync(self, slab: int, position: int) -> None:
        """A syncing replica missed a write or its store went: back to what the record
        says it is (its resync sees that and does not call it in sync)."""
        self.table.set_state(slab, position, self.table.durable_state(slab, position))

    def store_up(
        self, store: int, store_id: int, boot: int, area_kept: bool,
        prev_boot: int = 0, clean: bool = False,
    ) -> None:  # fmt: skip
        """A store answers (again). The same boot lost nothing; another boot -- unless it
        ended cleanly right after the one the record knows -- may have lost any write
        (a memory store all, a file store those since its last flush): its replicas are
        SUSPECT until a resync has checked them. The record learns the new boot in the
        same write."""
        view, mark = self.stores[store], self.record.stores[store]
        known = mark.boot
        restarted = known != 0 and boot != known and not (clean and prev_boot == known)
        if restarted or not area_kept:
            for slab, position in self.table.slabs_on(store):
                if self.table.durable_state(slab, position) != SUSPECT:
                    self._mark(slab, position, SUSPECT)
            if restarted:
                self.note("warning", f"store {view.name} restarted: its replicas are "
                          f"suspect until checked")  # fmt: skip
        if mark.boot != boot or mark.store_id != store_id:
            mark.boot, mark.store_id = boot, store_id
            self.dirty = True
        view.up, view.store_id, view.boot = True, store_id, boot
        for slab, _ in self.table.slabs_on(store):  # what it holds may prove them now
            span = self.table.slab_slots(slab)
            if self.slots.state.find(UNPROVEN, span.start, span.stop) >= 0:
                self.proving.add(slab)
        self.retry_parked()

    def fenced(self, store: int, why: str) -> None:
        """A store says a newer agent holds the area: this one must stop writing (P5)."""
        if not self.fenced_out:
            self.fenced_out = why
            self.note("error", f"{why}: this agent stops writing (every write fails EIO)")

    def retry_parked(self) -> None:
        """Writes and reads that waited for a store go again (the shell routes them)."""
        self.counters["parked_retries"] += 1

    def take_parked(self) -> tuple[list[WriteJob], list[ReadEntry]]:
        writes, self.parked_writes = self.parked_writes, []
        reads, self.parked_reads = self.parked_reads, []
        for entry in reads:
            entry.parked = False
        return writes, reads

    # -- the clock ---------------------------------------------------------------------
    def expire(self) -> None:
        """Writes parked past WRITE_WAIT_S fail; reads parked past READ_WAIT_S fail."""
        now = self.now
        keep: list[WriteJob] = []
        for job in self.parked_writes:
            if now - job.parked_at >= WRITE_WAIT_S:
                job.parked_at = 0.0
                self._finish_write(job, errno.EIO)
            else:
                keep.append(job)
        self.parked_writes = keep
        reads: list[ReadEntry] = []
        for entry in self.parked_reads:
            if now - entry.since >= READ_WAIT_S:
                entry.parked = False
                self.failed_reads.append(entry)
                self.counters["reads_expired"] += 1
            else:
                reads.append(entry)
        self.parked_reads = reads

    def proofs(self) -> list[int]:
        """Unproven slabs to prove again now (a replica of theirs came back); the shell
        runs rebuild.prove for each."""
        ready = [slab for slab in self.proving if slab not in self.repairing]
        for slab in ready:
            self.repairing.add(slab)
        return ready

    def repairs(self) -> list[tuple[int, int]]:
        """Replicas to repair now, as (slab, position), at most MAX_RESYNCS under way:
        unplaced positions placed, stale and suspect replicas resynced, and replicas on
        a store away past REPLACE_AFTER_S moved to a spare store. Each is SYNCING on
        return; the shell runs resync.resync for it."""
        out: list[tuple[int, int]] = []
        table, stores = self.table, self.stores
        for slab in range(table.slabs):
            if len(self.repairing) + len(out) >= MAX_RESYNCS:
                break
            if slab in self.repairing or not table.placed(slab):
                continue
            if self.slots.count(UNPROVEN, *_bounds(table.slab_slots(slab))):
                continue  # its proof first (rebuild.prove)
            for position in range(table.replicas):
                store, state = table.store_of(slab, position), table.state_of(slab, position)
                if store == UNPLACED:
                    spare = self._spare(slab)
                    if spare < 0:
                        continue
                    table.set_replica(slab, position, spare, SUSPECT)  # new: holds nothing
                    self.dirty = True
                elif state in (STALE, SUSPECT) and not stores[store].up:
                    spare = self._spare(slab)
                    if (spare < 0 or self.now - stores[store].down_since < REPLACE_AFTER_S
                            or not any(stores[s].up for s in table.in_sync(slab))):  # fmt: skip
                        continue
                    self.leftovers.setdefault(store, set()).add(slab)
                    table.set_replica(slab, position, spare, SUSPECT)
                    self.dirty = True
                    self.counters["replicas_moved"] += 1
                elif state not in (STALE, SUSPECT):
                    continue
                table.set_state(slab, position, SYNCING)
                out.append((slab, position))
                self.repairing.add(slab)
                break
        return out

    def _spare(self, slab: int) -> int:
        """An up store holding no replica of the slab (p2c on free room), or -1."""
        spare = [s.index for s in self.stores if s.up and not self.table.holds(slab, s.index)]
        if not spare:
            return -1
        return power_of_two_choices(spare, lambda s: self.stores[s].free_pages, self.rng)

    def take_leftovers(self, store: int) -> list[int]:
        """Slabs this up store still holds copies of but is no replica of (moved away)."""
        left = self.leftovers.pop(store, set())
        return sorted(slab for slab in left if not self.table.holds(slab, store))

    # -- lost slots --------------------------------------------------------------------
    def declare_lost(self, slab: int, slots: Iterable[int], was: int = WRITTEN) -> int:
        """No replica holds these slots' newest pages (was=UNPROVEN: none can prove which
        is newest; was=DOUBT: a write-back acknowledged before it failed) and every
        replica answered: they read EIO until written again. Returns how many."""
        state = self.slots.state
        lost = [s for s in slots if state[s] == was]
        if not lost:
            return 0
        for s in lost:
            state[s] = LOST
        self._record_unreadable(slab, lost)
        self.counters["pages_lost"] += len(lost)
        self.note("error", f"slab {slab}: {len(lost)} pages are on no replica any more "
                  f"(every store answered): they read EIO until written again")  # fmt: skip
        return len(lost)

    def _record_unreadable(self, slab: int, slots: list[int]) -> None:
        """In the record: no copy of these slots at or below their generation now may ever
        be served again (lost, or their last write failed), so no restart brings one
        back -- a slot written again goes above it."""
        table, state = self.table, self.slots.state
        first = table.slab_slots(slab).start
        old = self.record.lost.get(slab)
        offsets = {s - first for s in slots}
        if old is not None:  # still unreadable from before (not written since) stays so
            offsets |= {o for o in offsets_in(old[1]) if state[first + o] in (LOST, DOUBT)}
        below = max(self.slots.gens[first + o] for o in offsets)
        self.record.lost[slab] = (below, bitmap_of(sorted(offsets), table.slab_size))
        self.dirty = True

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
    def lag(self) -> int:
        """Written slots whose slab has a replica not in sync (or not placed)."""
        table, lag = self.table, 0
        for slab in range(table.slabs):
            states = [state for _, _, state in table.replicas_of(slab)]
            if states and (len(states) < table.replicas or any(s != IN_SYNC for s in states)):
                lag += self.slots.count(WRITTEN, *_bounds(table.slab_slots(slab)))
        return lag

    def replicas_behind(self) -> int:
        """Placed replicas not in sync."""
        table = self.table
        return sum(1 for slab in range(table.slabs) for _, _, state in table.replicas_of(slab)
                   if state != IN_SYNC)  # fmt: skip

    def replica_states(self, store: int) -> list[int]:
        return [self.table.state_of(slab, pos) for slab, pos in self.table.slabs_on(store)]

    def unreadable(self) -> dict[str, int]:
        slots = self.slots
        return {"lost": slots.count(LOST), "unproven": slots.count(UNPROVEN),
                "doubt": slots.count(DOUBT), "never": slots.count(NEVER)}  # fmt: skip


def _bounds(slots: range) -> tuple[int, int]:
    return slots.start, slots.stop
