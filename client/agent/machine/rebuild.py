"""A restarted agent rebuilds what the dead one knew: from its durable record and the stores.

The record (record.py) says which stores are each slab's replicas, in which
state the dead agent left them, which boot of each store it knew, and which
slots were lost. The stores say what they hold (Inventory). From both, slab by
slab (`prove`):

- A replica counts toward the proof when its store answered, is the boot the
  record knows (or ended cleanly right after it), and the record does not call
  it suspect. A slab is *proven* when a counting replica was in sync, or when at
  least P - Q + 1 of its P placed replicas count (every write was acknowledged
  at Q copies, and any Q of P meet any P - Q + 1).
- A proven slab's slots take the newest generation any replica that answered
  holds -- never a copy on a store that is no replica of the slab (a leftover),
  never one the record calls lost -- and a slot no replica holds was never
  written, or trimmed: zeros. Replicas missing a newest page are STALE (resync.py
  copies it to them).
- An unproven slab's slots are UNPROVEN: a read waits for a replica that may hold
  them to come back (`prove` runs again when it does), or fails EIO when none can.
- Slabs the record never placed hold nothing anyone acknowledged.

The epoch was raised and recorded before any of this (Replicas.begin); a store
holding a generation of a later epoch means the record fell behind: the epoch
goes above it, recorded, and the log says so.
"""

from __future__ import annotations

from .machine import Replicas, Task
from .record import offsets_in
from .resync import inventory_steps, merged
from .slots import COUNT_BITS, LOST, NEVER, UNPROVEN, WRITTEN
from .steps import Gather
from .table import IN_SYNC, STALE, SUSPECT

# Slabs whose inventories are asked at once: a few round trips in flight per store,
# and what is kept is one slab's slots at a time per slab in the window.
REBUILD_WINDOW = 4


def rebuild(m: Replicas) -> Task:
    """Every slab the record placed, proven or left unproven; then the epoch check."""
    table = m.table
    placed = [slab for slab in range(table.slabs) if table.placed(slab)]
    for slab in placed:  # until proven, none of it may be read as never written
        span = table.slab_slots(slab)
        m.slots.state[span.start : span.stop] = bytes([UNPROVEN]) * len(span)
    top = 0
    for at in range(0, len(placed), REBUILD_WINDOW):
        window = placed[at : at + REBUILD_WINDOW]
        steps, owners = [], []
        for slab in window:
            for store in _answering(m, slab):
                for step in inventory_steps(store, table.slab_slots(slab)):
                    steps.append(step)
                    owners.append((slab, store))
        answers = yield Gather(tuple(steps))
        for slab in window:
            held = _held_by(slab, owners, answers)
            top = max(top, _apply(m, slab, held))
    if top >= m.epoch:
        m.slots.epoch = top + 1
        m.record.epoch = m.epoch
        m.dirty = True
        m.note("error", f"a store holds a generation of epoch {top}, above the recorded one: "
               f"the epoch goes to {m.epoch}")  # fmt: skip
    m.counters["rebuilds"] += 1


def prove(m: Replicas, slab: int) -> Task:
    """A replica of an unproven slab is back: try the proof again (late)."""
    try:
        stores = _answering(m, slab)
        steps, owners = [], []
        for store in stores:
            for step in inventory_steps(store, m.table.slab_slots(slab)):
                steps.append(step)
                owners.append((slab, store))
        answers = yield Gather(tuple(steps))
        _apply(m, slab, _held_by(slab, owners, answers))
    finally:
        m.repairing.discard(slab)
        m.proving.discard(slab)


def _answering(m: Replicas, slab: int) -> list[int]:
    return [s for _, s, _ in m.table.replicas_of(slab) if m.stores[s].up]


def _held_by(
    slab: int, owners: list[tuple[int, int]], answers: list[object]
) -> dict[int, dict[int, int]]:
    """store -> what it holds of the slab, for the stores whose every answer came."""
    by_store: dict[int, list[object]] = {}
    for (owner, store), answer in zip(owners, answers, strict=True):
        if owner == slab:
            by_store.setdefault(store, []).append(answer)
    out = {}
    for store, parts in by_store.items():
        held = merged(parts)
        if held is not None:
            out[store] = held
    return out


def _apply(m: Replicas, slab: int, held: dict[int, dict[int, int]]) -> int:
    """Prove the slab from what its answering replicas hold; only slots still UNPROVEN
    change (a write since then is newer than anything here). Returns the top epoch seen."""
    table, slots = m.table, m.slots
    replicas = table.replicas_of(slab)
    counting = [(p, s) for p, s, _ in replicas
                if s in held and table.durable_state(slab, p) != SUSPECT]  # fmt: skip
    quorum = min(m.record.quorum, len(replicas)) or 1
    proven = any(table.durable_state(slab, p) == IN_SYNC for p, _ in counting) or (
        len(counting) >= max(1, len(replicas) - quorum + 1)
    )
    newest: dict[int, int] = {}
    for h in held.values():
        for slot, gen in h.items():
            if gen > newest.get(slot, 0):
                newest[slot] = gen
    top = max((gen >> COUNT_BITS for gen in newest.values()), default=0)
    span = table.slab_slots(slab)
    state = slots.state
    if not proven:
        for slot, gen in newest.items():
            if state[slot] == UNPROVEN:
                slots.restore(slot, gen, UNPROVEN)
        if len(held) == len(replicas):  # every replica answered: nothing left to wait for
            m.declare_lost(slab, span, was=UNPROVEN)
        else:
            m.counters["rebuild_unproven"] += state.count(UNPROVEN, span.start, span.stop)
        return top
    lost_below, lost = 0, set()
    if slab in m.record.lost:
        lost_below, bitmap = m.record.lost[slab]
        lost = {span.start + o for o in offsets_in(bitmap)}
    proven_pages = 0
    for slot in span:
        if state[slot] != UNPROVEN:
            continue
        gen = newest.get(slot, 0)
        if slot in lost and gen <= lost_below:
            slots.restore(slot, gen, LOST)
        elif gen:
            slots.restore(slot, gen, WRITTEN)
            proven_pages += 1
        else:
            state[slot] = NEVER
    for position, store, rstate in replicas:
        mine = held.get(store)
        if mine is None or rstate != IN_SYNC:
            continue
        if any(mine.get(slot) != gen for slot, gen in newest.items() if state[slot] == WRITTEN):
            m._mark(slab, position, STALE)  # it lacks a newest page: resync.py copies it
    m.counters["rebuild_pages"] += proven_pages
    return top
