"""What the replica machine writes into its durable record (record.py), and reads back.

The record is the dead agent's knowledge a restart needs: the slab table as the
record must see it (a syncing replica as what it was before), the stores'
boots, and the slots no copy of which may ever be served again -- lost (no
replica held them once every one had answered), or whose last write failed
(neither page can be proven newest): a bitmap per slab and the generation at or
below which no copy counts. Functions of the machine (machine.Replicas).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from .record import Record, StoreMark, bitmap_of, offsets_in
from .slots import DOUBT, LOST, WRITTEN
from .table import UNPLACED

if TYPE_CHECKING:
    from .machine import Replicas


def load(m: Replicas, record: Record) -> None:
    """The dead agent's table: its replicas at their recorded states (mapped onto this
    agent's stores by id, else by name), its stores' boots and its lost slots."""
    mine = m.record
    mine.area_id = record.area_id
    index_of: dict[int, int] = {}
    by_name = {s.name: s.index for s in m.stores}
    for i, mark in enumerate(record.stores):
        if mark.name in by_name:
            here = by_name[mark.name]
            index_of[i] = here
            mine.stores[here] = StoreMark(mark.name, mark.store_id, mark.boot)
    table, width = m.table, record.replicas
    for slab in range(min(table.slabs, len(record.slabs) // (2 * width))):
        for position in range(min(width, table.replicas)):
            at = 2 * (slab * width + position)
            store, state = record.slabs[at], record.slabs[at + 1]
            if store != UNPLACED and store in index_of:
                table.set_replica(slab, position, index_of[store], state)
    mine.lost = dict(record.lost)
    sync_table(m)


def sync_table(m: Replicas) -> None:
    table, slabs = m.table, m.record.slabs
    for i in range(table.slabs * table.replicas):
        slab, position = divmod(i, table.replicas)
        slabs[2 * i] = table.store[i]
        slabs[2 * i + 1] = table.durable_state(slab, position) if table.store[i] != UNPLACED else 0


def declare_lost(m: Replicas, slab: int, slots: Iterable[int], was: int = WRITTEN) -> int:
    """No replica holds these slots' newest pages (was=UNPROVEN: none can prove which
    is newest; was=DOUBT: a write-back acknowledged before it failed) and every
    replica answered: they read EIO until written again. Returns how many."""
    state = m.slots.state
    lost = [s for s in slots if state[s] == was]
    if not lost:
        return 0
    for s in lost:
        state[s] = LOST
    record_unreadable(m, slab, lost)
    m.counters["pages_lost"] += len(lost)
    m.note("error", f"slab {slab}: {len(lost)} pages are on no replica any more "
              f"(every store answered): they read EIO until written again")  # fmt: skip
    return len(lost)


def record_unreadable(m: Replicas, slab: int, slots: list[int]) -> None:
    """In the record: no copy of these slots at or below their generation now may ever
    be served again (lost, or their last write failed), so no restart brings one
    back -- a slot written again goes above it."""
    table, state = m.table, m.slots.state
    first = table.slab_slots(slab).start
    old = m.record.lost.get(slab)
    offsets = {s - first for s in slots}
    if old is not None:  # still unreadable from before (not written since) stays so
        offsets |= {o for o in offsets_in(old[1]) if state[first + o] in (LOST, DOUBT)}
    below = max(m.slots.gens[first + o] for o in offsets)
    m.record.lost[slab] = (below, bitmap_of(sorted(offsets), table.slab_size))
    m.dirty = True


def written_again(m: Replicas, first: int, generations: Iterable[int]) -> None:
    """A write of these slots reached its quorum: a slot it left newest is readable
    again, so it leaves the record's unreadable ones -- in the record before the
    write is acknowledged (settle), else a restart would still hold it at or below
    its slab's one `below` (another slot's, maybe above this one's new generation)
    and make it LOST. A copy of it at or below its old generation never counts
    again either way: the write went above it."""
    lost, table, gens = m.record.lost, m.table, m.slots.gens
    if not lost:
        return
    for i, gen in enumerate(generations):
        slot = first + i
        slab = table.slab_of(slot)
        entry = lost.get(slab)
        if entry is None or gens[slot] != gen:
            continue
        offset = slot - table.slab_slots(slab).start
        bits = bytearray(entry[1])
        if not bits[offset >> 3] >> (offset & 7) & 1:
            continue
        bits[offset >> 3] &= ~(1 << (offset & 7)) & 0xFF
        if any(bits):
            lost[slab] = (entry[0], bytes(bits))
        else:
            del lost[slab]
        m.dirty = True
