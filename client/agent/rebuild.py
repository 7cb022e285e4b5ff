"""A restarted agent rebuilds what the dead one knew, from the stores alone.

On its loop, before it serves: every reachable store lists what it holds of the
area (Inventory, one slab's worth of slots per call), and from those lists the
agent rebuilds where each slab's replicas are, every slot's newest write
(the highest 64-bit generation any replica holds: the epoch first, then the
count), and which replicas hold all of it. What it cannot prove it does not
guess:

- A slab is *proven* when the replicas it can see must include one that took
  every acknowledged write: with R replicas and writes acknowledged at Q
  copies, seeing R - Q + 1 of them (or every store) suffices, as any Q of R
  meet any R - Q + 1. A proven slab's slots are WRITTEN at their newest
  generation; one no replica holds was never written (or was trimmed): zeros.
- An unproven slab's slots are UNPROVEN: they read EIO (never an older page)
  until the stores that may hold newer copies are back (`late`) or the slot is
  written again. A store that came back empty (it lost the area) holds
  nothing, so while one did, slots no one holds may have been lost: UNPROVEN.
- A replica that lacks a newest page is STALE (repair.py copies it). A slab
  whose newest pages are spread over several replicas first has them merged
  onto one, which then is in sync.
- The agent's epoch goes above every generation seen, and above the one its
  supervisor hands it, so no generation (nor, for an encrypted area, no
  nonce) is ever used twice.

Bounded: one Inventory answer is at most MAX_INVENTORY_SLOTS slots (256 KiB),
at most INVENTORY_WINDOW of them in flight per store, and what is kept per
slab is its holders and per slot its newest generation (one slab being rebuilt
at a time).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import Counter
from dataclasses import dataclass, field

from netswap.protocol import MAX_INVENTORY_SLOTS, StoreError, tags_of

from .placement import IN_SYNC, STALE, SlabTable
from .repair import start_copy
from .slots import COUNT_BITS, UNPROVEN, SlotMap
from .stores import TRANSPORT_ERRORS, Store

# Pages a merge reads from one replica at a time (as repair's resync: 256 KiB).
MERGE_CHUNK = 64

log = logging.getLogger("netswap.agent")

# Inventory calls in flight per store: enough to hide a round trip, few enough that a
# store serving a rebuild keeps answering others (each call walks at most 64 clusters).
INVENTORY_WINDOW = 4


@dataclass
class Rebuilt:
    """What a rebuild found, for the log and the metrics."""

    pages: int = 0  # slots found written and proven
    unproven: int = 0  # slots found, or possibly written, that could not be proven
    stale: int = 0  # replicas found missing newest pages (repair copies them)
    merged: int = 0  # pages copied at rebuild onto a replica to make it whole
    epoch: int = 0
    seconds: float = 0.0
    unreachable: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)  # stores that came back without the area


class Rebuild:
    def __init__(
        self,
        table: SlabTable,
        slot_map: SlotMap,
        stores: list[Store],
        quorum: int,
        counters: Counter[str],
        sealed: bool = False,
    ) -> None:
        self.table, self.slot_map, self.stores = table, slot_map, stores
        self.quorum, self.counters = quorum, counters
        self.sealed = sealed  # merged copies carry their seals

    async def run(self, reachable: list[Store], lost: set[int], min_epoch: int) -> Rebuilt:
        """Rebuild from the stores in `reachable` (connected), those in `lost` having
        come back without the area."""
        loop = asyncio.get_running_loop()
        began = loop.time()
        found = Rebuilt()
        found.unreachable = [s.name for s in self.stores if s not in reachable]
        found.lost = [self.stores[i].name for i in sorted(lost)]
        holding = [s for s in reachable if s.index not in lost]
        everyone = not found.unreachable and not lost
        table = self.table
        top = min_epoch
        for slab in range(table.slabs):
            slots = table.slab_slots(slab)
            held = await asyncio.gather(*(self._inventory(s, slots) for s in holding))
            top = max(top, await self._slab(slab, slots, holding, held, everyone, found))
        self.slot_map.epoch = top + 1
        found.epoch = self.slot_map.epoch
        found.seconds = loop.time() - began
        self.counters["rebuild_pages"] += found.pages
        self.counters["rebuild_unproven"] += found.unproven
        return found

    async def late(self, everyone: bool, lock: threading.RLock) -> None:
        """A store that was away at the rebuild is back: its pages may prove slabs that
        could not be, and slots still UNPROVEN (not written since) are resolved."""
        table, slot_map = self.table, self.slot_map
        holding = [s for s in self.stores if s.up]
        proven = 0
        for slab in range(table.slabs):
            slots = table.slab_slots(slab)
            if slot_map.state.find(UNPROVEN, slots.start, slots.stop) < 0:
                continue
            try:
                held = await asyncio.gather(*(self._inventory(s, slots) for s in holding))
            except (*TRANSPORT_ERRORS, StoreError) as exc:
                log.warning("late rebuild of slab %d: %s", slab, exc)
                return
            holders = [(store, h) for store, h in zip(holding, held, strict=True) if h]
            if not (everyone or len(holders) >= table.replicas - self.quorum + 1):
                continue
            with lock:  # writes mark slots WRITTEN on nbdkit's threads: leave those be
                newest: dict[int, int] = {}
                for _, h in holders:
                    for slot, gen in h.items():
                        newest[slot] = max(gen, newest.get(slot, 0))
                for slot in slots:
                    if slot_map.is_unproven(slot):
                        gen = newest.get(slot, 0)
                        if gen:
                            slot_map.restore(slot, gen)
                        else:
                            slot_map.forget_run(slot, 1)
                        proven += 1
                if not table.placed(slab):
                    whole = [store for store, h in holders
                             if all(h.get(s) == g for s, g in newest.items())]  # fmt: skip
                    self._place(slab, [store for store, _ in holders], whole, Rebuilt())
        log.warning("a store back after the rebuild proved %d slots", proven)

    async def _inventory(self, store: Store, slots: range) -> dict[int, int]:
        """slot -> generation, for every slot of `slots` the store holds."""
        client = store.client
        if client is None:
            raise ConnectionError(f"store {store.name} went away during the rebuild")
        out: dict[int, int] = {}
        firsts = range(slots.start, slots.stop, MAX_INVENTORY_SLOTS)
        for at in range(0, len(firsts), INVENTORY_WINDOW):
            calls = [client.inventory(f, min(MAX_INVENTORY_SLOTS, slots.stop - f))
                     for f in firsts[at : at + INVENTORY_WINDOW]]  # fmt: skip
            for held, gens in await asyncio.gather(*calls):
                out.update(zip(held, gens, strict=True))
        return out

    async def _slab(
        self,
        slab: int,
        slots: range,
        holding: list[Store],
        held: list[dict[int, int]],
        everyone: bool,
        found: Rebuilt,
    ) -> int:
        """Rebuild one slab from what each holding store has of it; returns the highest
        epoch seen in it."""
        table, slot_map = self.table, self.slot_map
        holders = [(store, h) for store, h in zip(holding, held, strict=True) if h]
        proven = everyone or len(holders) >= table.replicas - self.quorum + 1
        newest: dict[int, int] = {}
        for _, h in holders:
            for slot, gen in h.items():
                if gen > newest.get(slot, 0):
                    newest[slot] = gen
        if not proven:
            slot_map.mark_unproven_run(slots.start, len(slots))  # maybe written, unknown
            found.unproven += len(slots)
        for slot, gen in newest.items():
            slot_map.restore(slot, gen, proven)
        found.pages += len(newest) if proven else 0
        whole = [store for store, h in holders
                 if all(h.get(slot) == gen for slot, gen in newest.items())]  # fmt: skip
        if holders and not whole:
            whole = [await self._merge(slab, holders, newest, found)]
        self._place(slab, [store for store, _ in holders], whole, found)
        epochs = (gen >> COUNT_BITS for gen in newest.values())
        return max(epochs, default=0) if newest else 0

    def _place(self, slab: int, holders: list[Store], whole: list[Store], found: Rebuilt) -> None:
        """Replicas where the pages are: a holder with every newest page IN_SYNC, the
        others STALE (repair copies them from an in-sync one)."""
        table = self.table
        if not holders:
            return  # never written, or written only where no one can see: not placed
        ordered = whole + [s for s in holders if s not in whole]
        for position, store in enumerate(ordered[: table.replicas]):
            in_sync = store in whole
            table.set_replica(slab, position, store.index, IN_SYNC if in_sync else STALE)
            found.stale += not in_sync

    async def _merge(
        self,
        slab: int,
        holders: list[tuple[Store, dict[int, int]]],
        newest: dict[int, int],
        found: Rebuilt,
    ) -> Store:
        """No replica holds all the slab's newest pages (replicas that each missed
        different writes): copy onto the one that holds most of them the pages it lacks,
        each from a replica that holds it, proven as repair proves them."""
        primary, mine = max(
            holders, key=lambda sh: sum(sh[1].get(s) == g for s, g in newest.items())
        )
        target = primary.client
        for source, theirs in holders:
            wanted = sorted(s for s, g in newest.items() if mine.get(s) != g and theirs.get(s) == g)
            client = source.client
            if not wanted or client is None or target is None:
                continue
            for at in range(0, len(wanted), MERGE_CHUNK):
                chunk = wanted[at : at + MERGE_CHUNK]
                reply = await client.read_pages(chunk, self.sealed)
                intact = tags_of(reply.data, client.area_seed, chunk, reply.generations)
                gens = reply.generations
                keep = [i for i, slot in enumerate(chunk)
                        if intact[i] == reply.tags[i] and gens[i] == newest[slot]]  # fmt: skip
                if keep:
                    failure = await start_copy(target, reply, chunk, keep)
                    if failure is not None:
                        raise failure
                for i in keep:
                    mine[chunk[i]] = newest[chunk[i]]
                found.merged += len(keep)
        missing = [s for s, g in newest.items() if mine.get(s) != g]
        if missing:  # a copy that proved nothing: those slots cannot be served
            for slot in missing:
                self.slot_map.mark_unproven_run(slot, 1)
            found.unproven += len(missing)
            log.warning("slab %d: %d newest pages could not be merged (EIO until written)",
                        slab, len(missing))  # fmt: skip
        return primary


def rebuild_log(found: Rebuilt) -> str:
    parts = [f"rebuilt the area from the stores in {found.seconds:.1f}s: {found.pages} pages "
             f"proven, epoch {found.epoch}"]  # fmt: skip
    if found.stale:
        parts.append(f"{found.stale} replicas stale (repair copies them)")
    if found.unproven:
        parts.append(f"{found.unproven} slots unproven (EIO until "
                     f"{', '.join(found.unreachable) or 'their stores'} are back)")  # fmt: skip
    if found.lost:
        parts.append(f"stores back without the area: {', '.join(found.lost)}")
    return "; ".join(parts)
