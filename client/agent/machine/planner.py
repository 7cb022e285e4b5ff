"""What the replica machine repairs next, and the figures of how far from whole it is.

Each clock tick, at most MAX_RESYNCS repairs run: an unplaced position gets a
spare store, a stale or suspect replica on an up store is resynced, and a
replica on a store away past REPLACE_AFTER_S moves to a spare store -- only when
the slab has an in-sync replica on an up store to fill it from, so that the
copies left behind are never the only ones. A slab with unproven slots is
proven first (rebuild.prove), when a replica of it came back. Functions of the
machine (machine.Replicas), under its lock.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .bounds import MAX_RESYNCS, REPLACE_AFTER_S
from .slots import DOUBT, LOST, NEVER, UNPROVEN, WRITTEN
from .table import IN_SYNC, STALE, SUSPECT, SYNCING, UNPLACED, power_of_two_choices

if TYPE_CHECKING:
    from .machine import Replicas


def proofs(m: Replicas) -> list[int]:
    """Unproven slabs to prove again now (a replica of theirs came back); the shell
    runs rebuild.prove for each."""
    ready = [slab for slab in m.proving if slab not in m.repairing]
    for slab in ready:
        m.repairing.add(slab)
    return ready


def repairs(m: Replicas) -> list[tuple[int, int]]:
    """Replicas to repair now, as (slab, position), at most MAX_RESYNCS under way:
    unplaced positions placed, stale and suspect replicas resynced, and replicas on
    a store away past REPLACE_AFTER_S moved to a spare store. Each is SYNCING on
    return; the shell runs resync.resync for it."""
    out: list[tuple[int, int]] = []
    table, stores = m.table, m.stores
    for slab in range(table.slabs):
        if len(m.repairing) + len(out) >= MAX_RESYNCS:
            break
        if slab in m.repairing or not table.placed(slab):
            continue
        if m.slots.count(UNPROVEN, *bounds_of(table.slab_slots(slab))):
            continue  # its proof first (rebuild.prove)
        for position in range(table.replicas):
            store, state = table.store_of(slab, position), table.state_of(slab, position)
            if store == UNPLACED:
                chosen = spare(m, slab)
                if chosen < 0:
                    continue
                table.set_replica(slab, position, chosen, SUSPECT)  # new: holds nothing
                m.dirty = True
            elif state in (STALE, SUSPECT) and not stores[store].up:
                chosen = spare(m, slab)
                if (chosen < 0 or m.now - stores[store].down_since < REPLACE_AFTER_S
                        or not any(stores[s].up for s in table.in_sync(slab))):  # fmt: skip
                    continue
                m.leftovers.setdefault(store, set()).add(slab)
                table.set_replica(slab, position, chosen, SUSPECT)
                m.dirty = True
                m.counters["replicas_moved"] += 1
            elif state not in (STALE, SUSPECT):
                continue
            table.set_state(slab, position, SYNCING)
            out.append((slab, position))
            m.repairing.add(slab)
            break
    return out


def spare(m: Replicas, slab: int) -> int:
    """An up store holding no replica of the slab (p2c on free room), or -1."""
    spare = [s.index for s in m.stores if s.up and not m.table.holds(slab, s.index)]
    if not spare:
        return -1
    return power_of_two_choices(spare, lambda s: m.stores[s].free_bytes, m.rng)


def take_leftovers(m: Replicas, store: int) -> list[int]:
    """Slabs this up store still holds copies of but is no replica of (moved away)."""
    left = m.leftovers.pop(store, set())
    return sorted(slab for slab in left if not m.table.holds(slab, store))


def lag(m: Replicas) -> int:
    """Written slots whose slab has a replica not in sync (or not placed)."""
    table, lag = m.table, 0
    for slab in range(table.slabs):
        states = [state for _, _, state in table.replicas_of(slab)]
        if states and (len(states) < table.replicas or any(s != IN_SYNC for s in states)):
            lag += m.slots.count(WRITTEN, *bounds_of(table.slab_slots(slab)))
    return lag


def replicas_behind(m: Replicas) -> int:
    """Placed replicas not in sync."""
    table = m.table
    return sum(1 for slab in range(table.slabs) for _, _, state in table.replicas_of(slab)
               if state != IN_SYNC)  # fmt: skip


def replica_states(m: Replicas, store: int) -> list[int]:
    return [m.table.state_of(slab, pos) for slab, pos in m.table.slabs_on(store)]


def unreadable(m: Replicas) -> dict[str, int]:
    slots = m.slots
    return {"lost": slots.count(LOST), "unproven": slots.count(UNPROVEN),
            "doubt": slots.count(DOUBT), "never": slots.count(NEVER)}  # fmt: skip


def bounds_of(slots: range) -> tuple[int, int]:
    return slots.start, slots.stop
