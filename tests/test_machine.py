"""The replica machine alone (client/agent/machine): its rules, event by event, with no
loop, socket or store process. Each test pins one sequence the issue's review found
(tests/sim runs them all at random, two faults at once; the real processes run in
test_agent.py, test_rebuild.py and test_faults.py)."""

from __future__ import annotations

import errno
from array import array
from collections.abc import Callable
from typing import Any

import pytest
from netswap.client.agent.jobs import ReadEntry, ReadJob, WriteJob
from netswap.client.agent.machine.bounds import READ_WAIT_S, WRITE_WAIT_S
from netswap.client.agent.machine.machine import PARKED, Replicas
from netswap.client.agent.machine.rebuild import prove, rebuild
from netswap.client.agent.machine.record import Record, StoreMark
from netswap.client.agent.machine.resync import resync
from netswap.client.agent.machine.slots import (
    COUNT_MASK,
    DOUBT,
    LOST,
    NEVER,
    UNPROVEN,
    WRITTEN,
    Slots,
)
from netswap.client.agent.machine.steps import (
    Gather,
    Held,
    Inventory,
    PagesRead,
    Pause,
    Read,
    Ticket,
    Wait,
    Write,
)
from netswap.client.agent.machine.table import IN_SYNC, STALE, SUSPECT, SYNCING
from netswap.protocol import PAGE_SIZE, area_seed, tags_of

SEED = area_seed("unit")


def machine(stores: int = 2, replicas: int = 2, quorum: int = 1, slots: int = 64,
            slab: int = 16) -> Replicas:  # fmt: skip
    m = Replicas(slots, slab, replicas, quorum, [f"s{i}" for i in range(stores)])
    m.begin(None, 0, 77)
    for i in range(stores):
        m.store_up(i, 100 + i, 1000 + i, True)
    m.take_record()
    return m


def write(m: Replicas, first: int, count: int = 1) -> WriteJob:
    job = WriteJob(first, count, [])
    m.begin_write(job)
    return job


def acked(m: Replicas, job: WriteJob, outcomes: dict[int, int] | None = None) -> list[int]:
    """Route the job and answer every send (0 unless `outcomes` says); the stores it went to."""
    sends = m.route_write(job)
    for store, start, count in sends:
        m.write_answered(store, job, start, count, (outcomes or {}).get(store, 0))
    return [s for s, _, _ in sends]


# -- slots and the epoch (P6) -------------------------------------------------------------
def test_generations_only_grow_a_trim_keeps_them_and_a_new_epoch_starts_above() -> None:
    slots = Slots(8, epoch=3)
    first = slots.write(2, 2)
    assert list(first) == [3 << 32 | 1] * 2
    slots.forget(2, 1)
    again = slots.write(2, 1)
    assert again[0] == 3 << 32 | 2 and slots.state[2] == WRITTEN
    slots.epoch = 4  # the next agent: its first write of a slot starts above epoch 4
    assert slots.write(2, 1)[0] == 4 << 32 | 1


def test_a_count_at_its_end_raises_the_epoch_and_records_it_before_the_write() -> None:
    m = machine()
    m.slots.gens[5] = m.epoch << 32 | COUNT_MASK
    before = m.epoch
    job = write(m, 5)
    assert m.epoch == before + 1 and job.generations[0] == m.epoch << 32 | 1
    record = m.take_record()
    assert record is not None and record.epoch == m.epoch  # persisted before it is sent


def test_the_epoch_goes_above_the_record_the_supervisor_and_a_take_over() -> None:
    m = Replicas(64, 16, 2, 1, ["s0", "s1"])
    m.begin(Record(area_id=5, epoch=9, replicas=2, slab_slots=16,
                   stores=[StoreMark("s0"), StoreMark("s1")],
                   slabs=bytearray(2 * 2 * 4)), epoch_floor=4, area_id=0)  # fmt: skip
    assert m.epoch == 10  # the record's 9, not the supervisor's 4 (a torn state page)
    m2 = Replicas(64, 16, 2, 1, ["s0", "s1"])
    m2.begin(Record(area_id=5, epoch=3, stores=[StoreMark("s0"), StoreMark("s1")],
                    replicas=2, slab_slots=16, slabs=bytearray(16)), 12, 0)  # fmt: skip
    assert m2.epoch == 13


# -- writes: one rule ------------------------------------------------------------------------
def test_a_write_is_acknowledged_at_quorum_and_a_replica_that_missed_it_is_stale_first() -> None:
    m = machine(quorum=1)
    job = write(m, 1)
    stores = acked(m, job, {1: errno.ENOSPC})
    assert sorted(stores) == [0, 1] and job.complete and job.error == 0
    slab_states = {s: st for _, s, st in m.table.replicas_of(0)}
    assert slab_states[1] == STALE  # "a refused write leaves a stale copy": repaired later
    record = m.take_record()
    assert record is not None
    recorded = {record.slabs[i]: record.slabs[i + 1] for i in (0, 2)}  # store -> state
    assert recorded[1] == STALE  # recorded with the answer, before the job is answered
    m2 = machine(quorum=2)
    job2 = write(m2, 1)
    acked(m2, job2, {1: errno.ENOSPC})
    assert job2.error == errno.ENOSPC and m2.slots.state[1] == DOUBT


def test_a_write_with_no_store_up_waits_then_fails_and_its_slot_is_in_doubt() -> None:
    m = machine()
    for i in range(2):
        m.store_down(i)
    job = write(m, 3)
    assert m.route_write(job) == [] and not job.complete  # parked: a store may be back
    m.now = WRITE_WAIT_S + 1
    m.expire()
    assert job.complete and job.error == errno.EIO and m.slots.state[3] == DOUBT
    assert m.read_plan(3, 1)[0][0] == DOUBT  # EIO until the kernel writes it again


def test_an_unplaced_replica_is_placed_and_filled_when_a_store_comes() -> None:
    m = Replicas(64, 16, 2, 2, ["s0", "s1"])
    m.begin(None, 0, 1)
    m.store_up(0, 1, 1, True)
    job = write(m, 0)
    acked(m, job)
    assert job.error  # quorum 2 with one replica placed
    m.store_up(1, 2, 2, True)
    assert m.repairs() == [(0, 1)]  # the empty position gets store 1, syncing
    assert m.table.store_of(0, 1) == 1 and m.table.state_of(0, 1) == SYNCING


# -- reads: a quiet store costs time, not pages ------------------------------------------
def test_a_read_waits_for_a_store_that_holds_its_page_and_fails_only_when_none_can() -> None:
    m = machine()
    acked(m, write(m, 2))
    m.store_down(0)
    m.store_down(1)
    entry = ReadEntry(ReadJob([2], array("Q", [m.slots.gens[2]]), bytearray()), 0, 0.0)
    assert m.route_read(entry) == PARKED
    m.store_up(0, 100, 1000, True)  # the same boot: it lost nothing
    _, reads = m.take_parked()
    assert reads == [entry] and m.route_read(entry) == 0
    m.now = 1.0
    assert m.route_read(entry) == PARKED  # store 0 answered without it; store 1 may have it
    m.now = READ_WAIT_S + 1
    m.expire()
    assert m.take_failed_reads() == [entry]


def test_a_store_back_as_another_boot_makes_its_replicas_suspect_in_the_record() -> None:
    m = machine()
    acked(m, write(m, 0))
    m.store_down(1)
    m.store_up(1, 101, 9999, True)  # restarted: a file store back at its last flush
    states = {s: m.table.durable_state(0, p) for p, s, _ in m.table.replicas_of(0)}
    assert states[1] == SUSPECT
    record = m.take_record()
    assert record is not None and record.stores[1].boot == 9999
    m.store_down(0)
    m.store_up(0, 100, 2000, True, prev_boot=1000, clean=True)  # a clean restart: kept all
    assert m.table.durable_state(0, 0 if m.table.store_of(0, 0) == 0 else 1) == STALE


# -- resync ---------------------------------------------------------------------------------
class World:
    """Stores as dicts (slot -> (gen, tag, page)) answering a task's steps at once."""

    def __init__(self, stores: int) -> None:
        self.held: list[dict[int, tuple[int, int, bytes]]] = [{} for _ in range(stores)]
        self.away: set[int] = set()
        self.scratch = bytearray(64 * PAGE_SIZE)

    def put(self, store: int, slot: int, gen: int, fill: int) -> None:
        page = bytes([fill]) * PAGE_SIZE
        self.held[store][slot] = (gen, tags_of(page, SEED, [slot], array("Q", [gen]))[0], page)

    def answer(self, step: Any) -> Any:
        if isinstance(step, Gather):
            return [self.answer(s) for s in step.steps]
        if isinstance(step, Inventory):
            if step.store in self.away:
                return -1
            got = sorted(
                s for s in self.held[step.store] if step.first <= s < step.first + step.count
            )
            return Held(array("Q", got), array("Q", [self.held[step.store][s][0] for s in got]))
        if isinstance(step, Read):
            tags, gens = array("I"), array("Q")
            for i, slot in enumerate(step.slots):
                gen, tag, page = self.held[step.store].get(slot, (0, 0, bytes(PAGE_SIZE)))
                self.scratch[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] = page
                tags.append(tag)
                gens.append(gen)
            return PagesRead(memoryview(self.scratch)[: len(step.slots) * PAGE_SIZE], tags, gens,
                             None, array("H", [PAGE_SIZE] * len(step.slots)))  # fmt: skip
        if isinstance(step, Write):
            for i, slot in enumerate(step.slots):
                page = bytes(step.data[i * PAGE_SIZE : (i + 1) * PAGE_SIZE])
                self.held[step.store][slot] = (step.generations[i], step.tags[i], page)
            return Ticket(0)
        if isinstance(step, Wait):
            return [t.outcome for t in step.tickets]
        if isinstance(step, Pause):
            return None
        raise TypeError(step)


def run(task: Any, answer: Callable[[Any], Any]) -> None:
    reply = None
    while True:
        try:
            step = task.send(reply)
        except StopIteration:
            return
        reply = answer(step)


def test_a_resync_copies_only_what_the_replica_lacks_and_proves_each_page() -> None:
    m, world = machine(), World(2)
    for slot in (0, 1, 2):
        acked(m, write(m, slot))
    for slot in (0, 1, 2):
        for store in (0, 1):
            world.put(store, slot, m.slots.gens[slot], slot + 1)
    m.store_down(1)
    job = write(m, 1)  # store 1 misses this write
    acked(m, job)
    world.put(0, 1, m.slots.gens[1], 0x55)
    m.store_up(1, 101, 1001, True)
    ((slab, position),) = m.repairs()
    run(resync(m, slab, position, SEED, 5.0), world.answer)
    assert m.table.state_of(slab, position) == IN_SYNC
    assert world.held[1][1][2] == bytes([0x55]) * PAGE_SIZE  # the one page it lacked
    assert m.counters["pages_resynced"] == 1


def test_a_slot_no_replica_holds_is_lost_only_once_every_replica_answered() -> None:
    m, world = machine(), World(2)
    acked(m, write(m, 4))  # neither store is given the page: both lost it
    m.store_down(0)
    m.store_down(1)
    m.store_up(1, 101, 5, False)  # back empty (a memory store restarted)
    ((slab, position),) = m.repairs()
    world.away.add(0)
    run(resync(m, slab, position, SEED, 5.0), world.answer)
    assert m.slots.state[4] == WRITTEN  # store 0 may hold it: wait for it
    m.store_up(0, 100, 6, False)
    world.away.clear()
    for slab, position in m.repairs():
        run(resync(m, slab, position, SEED, 5.0), world.answer)
    assert m.slots.state[4] == LOST
    record = m.take_record()
    assert record is not None and 0 in record.lost  # "LOST is forgotten at a restart": no


# -- rebuild ---------------------------------------------------------------------------------
def restarted(m: Replicas, world: World, boots: dict[int, int] | None = None) -> Replicas:
    """A new agent from m's record, its stores answering as `world` (another boot where
    `boots` says)."""
    record = m.take_record() or m.record
    new = Replicas(m.slots.slots, m.table.slab_size, m.table.replicas, m.quorum,
                   [s.name for s in m.stores])  # fmt: skip
    new.begin(record, 0, 0)
    for i, view in enumerate(m.stores):
        if i not in world.away:
            new.store_up(i, view.store_id, (boots or {}).get(i, view.boot), True)
    run(rebuild(new), world.answer)
    return new


def test_a_rebuild_never_serves_an_older_page_from_a_rolled_back_store() -> None:
    """The issue's failure 3: one file store, X flushed then Y acknowledged; the store is
    killed and restarted on its directory (back at X), then the agent: Y is not X."""
    m, world = machine(stores=1, replicas=1), World(1)
    acked(m, write(m, 7))
    x = m.slots.gens[7]
    world.put(0, 7, x, 0x58)
    acked(m, write(m, 7))  # Y, acknowledged; the store rolls back to X
    new = restarted(m, world, boots={0: 4242})
    assert new.slots.state[7] != WRITTEN  # never X: lost (every replica answered)
    assert new.slots.state[7] == LOST


def test_a_rebuild_ignores_a_leftover_copy_on_a_store_the_slab_moved_from() -> None:
    m, world = machine(stores=3, replicas=2), World(3)
    acked(m, write(m, 0))
    members = [s for _, s, _ in m.table.replicas_of(0)]
    spare = ({0, 1, 2} - set(members)).pop()
    world.put(spare, 0, m.slots.gens[0] - 0, 0x11)  # an old copy where the slab is no replica
    world.put(spare, 0, (m.epoch << 32) | 1, 0x11)
    world.away.update(members)  # no replica answers
    new = restarted(m, world)
    assert new.slots.state[0] == UNPROVEN  # never proven from the leftover


def test_a_late_proof_leaves_a_slot_written_since_the_rebuild_alone() -> None:
    """`late()` raced a write: a write that lands between the proof's question and its
    answer keeps its own generation (the machine applies the answer under its lock)."""
    m, world = machine(), World(2)
    acked(m, write(m, 3))
    for store in (0, 1):
        world.put(store, 3, m.slots.gens[3], 3)
    world.away.update({0, 1})
    new = restarted(m, world)
    assert new.slots.state[3] == UNPROVEN
    world.away.clear()
    new.store_up(0, 100, 1000, True)
    new.store_up(1, 101, 1001, True)
    (slab,) = new.proofs()
    task = prove(new, slab)
    step = task.send(None)
    acked(new, write(new, 3))  # the kernel writes the slot meanwhile
    mine = new.slots.gens[3]
    with pytest.raises(StopIteration):
        task.send(world.answer(step))
    assert new.slots.state[3] == WRITTEN and new.slots.gens[3] == mine
    assert new.slots.state[4] == NEVER


def test_a_late_proof_counts_only_the_slabs_replicas() -> None:
    m, world = machine(stores=3, replicas=2), World(3)
    acked(m, write(m, 0))
    members = [s for _, s, _ in m.table.replicas_of(0)]
    world.away.update(members)
    new = restarted(m, world)
    assert new.slots.state[0] == UNPROVEN
    assert new.proofs() == []  # the third store, up all along, proves nothing
