"""A resync: a replica not in sync is checked against the slots' generations, given what it lacks.

Run by a driver (core.py on the loop, or the simulator) as a generator over
the machine (steps.py). The replica is SYNCING: it takes every write from now
on, and the slots written meanwhile (`machine.syncing`) are not copied -- a
newer page reaches it on its own. The steps:

1. Wait for the writes already under way on the slab (each within its deadline):
   a copy read before one lands would install the older page.
2. Ask the replica what it holds (Inventory): the slots whose generation is not
   the slot's newest are what it lacks. A stale replica lacks what it missed; a
   suspect one whatever its store lost; a new one everything.
3. Copy each from another replica that holds it: an in-sync one is read whole;
   any other is asked first which of them it has. Every page read must prove its
   slot and generation (tag and all 64 bits) before it is copied, as stored
   (generation, tag and seal travel; nothing is opened or sealed again).
4. A slot no replica holds, once every replica of the slab has answered, is lost
   (machine.declare_lost, recorded). Were one away, the resync ends without
   calling the replica in sync, and runs again later.

Bounded: SYNC_CHUNK pages per read, SYNC_WINDOW copies in flight.
"""

from __future__ import annotations

from array import array
from collections import deque

from netswap.protocol import MAX_INVENTORY_SLOTS, SEAL_SIZE, page_tag

from .machine import Replicas, Task
from .slots import WRITTEN
from .steps import Gather, Held, Inventory, PagesRead, Pause, Read, Ticket, Wait, Write
from .table import IN_SYNC, SYNCING

# 64 pages per read (256 KiB: memory the swapping host spends on repair, so small),
# and up to 4 copies' writes in flight while the next chunk is read: repair runs at
# a few round trips per window, not one per chunk.
SYNC_CHUNK = 64
SYNC_WINDOW = 4
# How often a resync looks whether the slab's earlier writes are answered: a few loop
# ticks; the wait itself is bounded by two RPC deadlines (DRAIN_DEADLINES).
DRAIN_POLL_S = 0.005
DRAIN_DEADLINES = 2
# Copies hold their own bytes: a view into the read's buffer would be the next
# reply's bytes by the time the copy goes out (23bfee4). The simulator's check that
# it finds that bug turns this off (tests/sim/mutants.py); nothing else may.
COPY_PAGES = True


class Abort(Exception):
    """The resync cannot finish now (a store away, a copy refused): it runs again later."""


def inventory_steps(store: int, span: range) -> tuple[Inventory, ...]:
    return tuple(Inventory(store, first, min(MAX_INVENTORY_SLOTS, span.stop - first))
                 for first in range(span.start, span.stop, MAX_INVENTORY_SLOTS))  # fmt: skip


def merged(answers: list[object]) -> dict[int, int] | None:
    """One store's Inventory answers as slot -> generation; None if one failed."""
    out: dict[int, int] = {}
    for answer in answers:
        if not isinstance(answer, Held):
            return None
        out.update(answer.as_dict())
    return out


def resync(m: Replicas, slab: int, position: int, seed: int, io_timeout: float) -> Task:
    table = m.table
    target = table.store_of(slab, position)
    m.syncing[slab] = set()
    try:
        yield from _resync(m, slab, position, target, seed, io_timeout)
        if table.store_of(slab, position) == target and table.state_of(slab, position) == SYNCING:
            m._mark(slab, position, IN_SYNC)
            m.counters["slabs_resynced"] += 1
    except Abort as why:
        m.counters["resyncs_failed"] += 1
        if str(why):
            m.note("warning", f"resync of slab {slab} onto {m.stores[target].name}: {why}")
        if table.store_of(slab, position) == target and table.state_of(slab, position) == SYNCING:
            m._abort_sync(slab, position)
    finally:
        m.syncing.pop(slab, None)
        m.repairing.discard(slab)


def _resync(m: Replicas, slab: int, position: int, target: int, seed: int,
            io_timeout: float) -> Task:  # fmt: skip
    table, slots = m.table, m.slots
    span = table.slab_slots(slab)
    dirty = m.syncing[slab]
    earlier = list(m.writes.get(slab, ()))
    deadline = m.now + DRAIN_DEADLINES * io_timeout
    while any(not job.complete for job in earlier):
        if m.now > deadline:
            raise Abort("the slab's earlier writes did not complete in time")
        yield Pause(DRAIN_POLL_S)
    have = merged((yield Gather(inventory_steps(target, span))))
    if have is None:
        raise Abort("")  # the target went away; it is tried again when it is back
    gens = slots.gens
    remaining = {s for s in slots.written_slots(span.start, span.stop)
                 if have.get(s) != gens[s] and s not in dirty}  # fmt: skip
    asked_all = True
    pending: deque[Ticket] = deque()
    others = [(p, s, st) for p, s, st in table.replicas_of(slab) if p != position]
    others.sort(key=lambda r: r[2] != IN_SYNC)  # an in-sync source holds everything
    for _, source, state in others:
        if not remaining:
            break
        if not m.stores[source].up:
            asked_all = False
            continue
        if state == IN_SYNC:
            wanted = sorted(remaining)
        else:
            theirs = merged((yield Gather(inventory_steps(source, span))))
            if theirs is None:
                asked_all = False
                continue
            wanted = sorted(s for s in remaining if theirs.get(s) == gens[s])
        for at in range(0, len(wanted), SYNC_CHUNK):
            chunk = wanted[at : at + SYNC_CHUNK]
            reply = yield Read(source, chunk, m.sealed)
            if not isinstance(reply, PagesRead):
                asked_all = False
                break
            copied = _copy_of(m, reply, chunk, dirty, remaining, seed, target)
            if copied is not None:
                pending.append((yield copied))
            while len(pending) > SYNC_WINDOW:
                (outcome,) = yield Wait((pending.popleft(),))
                if outcome:
                    raise Abort(f"a copy was refused ({outcome})")
    outcomes = yield Wait(tuple(pending))
    if any(outcomes):
        raise Abort(f"a copy was refused ({next(o for o in outcomes if o)})")
    left = [s for s in remaining if slots.state[s] == WRITTEN and s not in dirty]
    if left:
        everyone = asked_all and all(m.stores[s].up for _, s, _ in table.replicas_of(slab))
        if not everyone:
            raise Abort("")  # a replica that may hold them is away: wait for it
        m.declare_lost(slab, left)


def _copy_of(
    m: Replicas,
    reply: PagesRead,
    chunk: list[int],
    dirty: set[int],
    remaining: set[int],
    seed: int,
    target: int,
) -> Write | None:
    """The copy of the payloads in `reply` that prove themselves newest and no write
    touched meanwhile, made now: the reply's buffer is valid until the next yield."""
    slots = m.slots
    payloads, at = [], 0
    for length in reply.lengths:
        payloads.append(reply.data[at : at + length])
        at += length
    keep: list[int] = []
    for i, slot in enumerate(chunk):
        if slot in dirty or slots.state[slot] != WRITTEN:
            remaining.discard(slot)  # a newer write reaches the target itself, or trimmed
        elif (page_tag(payloads[i], seed, slot, reply.generations[i]) == reply.tags[i]
              and reply.generations[i] == slots.gens[slot]):  # fmt: skip
            keep.append(i)
            remaining.discard(slot)
    if not keep:
        return None
    body = b"".join(payloads[i] for i in keep) if COPY_PAGES else _joined_view(reply, keep)
    seals = None
    if reply.seals is not None:
        kept = reply.seals
        seals = b"".join(kept[i * SEAL_SIZE : (i + 1) * SEAL_SIZE] for i in keep)
    m.counters["pages_resynced"] += len(keep)
    return Write(target, [chunk[i] for i in keep], body,
                 array("I", [reply.tags[i] for i in keep]),
                 array("Q", [reply.generations[i] for i in keep]), seals,
                 array("H", [reply.lengths[i] for i in keep]))  # fmt: skip


def _joined_view(reply: PagesRead, keep: list[int]) -> bytes:
    """The mutant's copy: the reply's own buffer, not the payloads' bytes (never used but
    by tests/sim/mutants.py, to show the simulator finds what 23bfee4 fixed)."""
    if keep == list(range(len(keep))):
        return reply.data[: sum(reply.lengths[: len(keep)])]  # type: ignore[return-value]
    at = [0]
    for length in reply.lengths:
        at.append(at[-1] + length)
    return b"".join(reply.data[at[i] : at[i + 1]] for i in keep)
