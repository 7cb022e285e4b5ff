"""Replication and repair: what the agent does when a store goes and comes back.

On the agent's loop. A store that goes marks its in-sync replicas DOWN; one that
comes back with its pages (and took no write since its last Flush) has them in
sync again, else STALE. A background task repairs stale replicas, and DOWN ones
whose store stays away past REPLACE_AFTER_S: onto a spare store that holds no
copy of that slab when one is up, else back onto the same store. A copy reads
each written slot from an in-sync replica and writes it to the target while
new writes also go there; slots written meanwhile are not copied, so the copy
never overwrites newer data. When every replica is stale and none can come
back, the slab's pages are declared lost: EIO from then on, never zeros.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from array import array
from collections import Counter, deque

from netswap.protocol import PAGE_SIZE, SEAL_SIZE, Pages, StoreError, tags_of
from netswap.protocol.runs import runs_of

from ..rpc import StoreClient, counts_of
from .jobs import WriteJob
from .placement import DOWN, IN_SYNC, STALE, SYNCING, SlabTable, power_of_two_choices
from .routing import Routing
from .slots import SlotMap
from .stores import TRANSPORT_ERRORS, Store

log = logging.getLogger("netswap.agent")

RESYNC_PERIOD_S = 0.5
# A store down this long has its replicas copied elsewhere (when a spare store
# exists): long enough to ride out a restart, short enough to shrink the window
# in which a second failure loses pages.
REPLACE_AFTER_S = 3.0
# A resync copies 64 pages per read (256 KiB: memory the swapping host spends on
# repair, so small) and keeps up to SYNC_WINDOW copies' writes in flight while it
# reads the next: repair runs at a few round trips per window, not one per chunk.
SYNC_CHUNK = 64
SYNC_WINDOW = 4
# How often a resync checks whether the slab's earlier writes are answered: a few
# loop ticks; the wait itself is bounded by two RPC deadlines.
DRAIN_POLL_S = 0.005


class Repair:
    """The agent's replication and repair, on its loop."""

    def __init__(
        self,
        table: SlabTable,
        slot_map: SlotMap,
        stores: list[Store],
        routing: Routing,
        counters: Counter[str],
        io_timeout: float,
        area_seed: int,
        sealed: bool = False,
    ) -> None:
        self.table, self.slot_map, self.stores = table, slot_map, stores
        self.routing, self.counters = routing, counters
        self.io_timeout, self.area_seed, self.sealed = io_timeout, area_seed, sealed
        self.syncing: dict[int, set[int]] = {}  # slab -> slots written during its sync
        self._wake: asyncio.Event | None = None
        routing.repair = self

    def store_down(self, store: Store) -> None:
        table = self.table
        for slab, position in table.slabs_on(store.index):
            state = table.state_of(slab, position)
            if state == IN_SYNC:
                table.set_state(slab, position, DOWN)
            elif state == SYNCING:
                table.set_state(slab, position, STALE)
        self.wake()

    def store_up(self, store: Store, lost: bool) -> None:
        """A store is back: replicas that missed nothing and kept every page they were
        sent (none written since its last Flush, or it lost none) are in sync."""
        table = self.table
        for slab, position in table.slabs_on(store.index):
            if table.state_of(slab, position) == DOWN:
                kept = not lost and slab not in store.unflushed
                table.set_state(slab, position, IN_SYNC if kept else STALE)
        store.unflushed.clear()  # what it lacks now comes back by resync, which re-adds
        self.wake()

    def wake(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def start(self) -> None:
        """On the agent's loop, before run()."""
        self._wake = asyncio.Event()

    async def run(self) -> None:
        """Repair whatever is stale, or down too long, whenever woken or every period."""
        assert self._wake is not None
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), RESYNC_PERIOD_S)
            self._wake.clear()
            now = asyncio.get_running_loop().time()
            for slab in range(self.table.slabs):
                for position, index, state in self.table.replicas_of(slab):
                    store = self.stores[index]
                    gone = state == DOWN and now - store.down_since >= REPLACE_AFTER_S
                    if state == STALE or (gone and not store.up):
                        await self.repair_slab(slab, position, index)

    def lag(self) -> int:
        """Slots whose slab has a replica that is not in sync."""
        table = self.table
        lag = 0
        for slab in range(table.slabs):
            if any(state != IN_SYNC for _, _, state in table.replicas_of(slab)):
                slots = table.slab_slots(slab)
                lag += self.slot_map.written_in(slots.start, slots.stop)
        return lag

    async def repair_slab(self, slab: int, position: int, store: int) -> None:
        table, stores = self.table, self.stores
        replicas = table.replicas_of(slab)
        holders = {s for _, s, _ in replicas}
        sources = [s for _, s, st in replicas if st == IN_SYNC and stores[s].up]
        if not sources:
            if all(st == STALE for _, _, st in replicas) and stores[store].up:
                self._declare_lost(slab)
            return  # else wait: a DOWN or unreachable in-sync replica may come back
        spare = [s for s in self.routing.up_stores() if s not in holders]
        if spare:
            target = power_of_two_choices(spare, lambda s: stores[s].free_pages, self.routing.rng)
        elif stores[store].up and table.state_of(slab, position) == STALE:
            target = store
        else:
            return
        # Writes routed before this point did not go to the target and are not in
        # `dirty`; one still queued for the source would be overtaken by the copy's
        # read, which would then install the older page on the target. So the copy
        # starts once they are all answered (each within its RPC deadline). Under
        # the routing lock, a lone write on nbdkit's thread is either among them or
        # sees the sync and goes through the loop (direct.py).
        with self.routing.lock:
            table.set_replica(slab, position, target, SYNCING)
            dirty = self.syncing[slab] = set()
            earlier = list(self.routing.slab_writes.get(slab, ()))
        try:
            ok = await self._drained(earlier) and await self._copy_slab(
                slab, sources[0], target, dirty
            )
        finally:
            del self.syncing[slab]
        still = table.store_of(slab, position) == target
        if ok and still and table.state_of(slab, position) == SYNCING:
            table.set_state(slab, position, IN_SYNC)
            self.counters["slabs_resynced"] += 1
        elif still:
            table.set_state(slab, position, STALE)

    def _declare_lost(self, slab: int) -> None:
        """Every copy of this slab's pages is gone: they read as EIO from now on."""
        table, slot_map = self.table, self.slot_map
        slots = table.slab_slots(slab)
        written = slot_map.written_slots(slots.start, slots.stop)
        for slot in written:
            slot_map.mark_lost(slot)
        for pos, _, _ in table.replicas_of(slab):
            table.set_state(slab, pos, IN_SYNC)
        self.counters["pages_lost"] += len(written)
        log.error("slab %d: every replica lost its pages; %d pages now read as EIO", slab,
                  len(written))  # fmt: skip

    async def _drained(self, jobs: list[WriteJob]) -> bool:
        """Wait until every job is complete; False if one outlives two RPC deadlines."""
        deadline = asyncio.get_running_loop().time() + 2 * self.io_timeout
        while any(not job.done.is_set() for job in jobs):
            if asyncio.get_running_loop().time() > deadline:
                return False
            await asyncio.sleep(DRAIN_POLL_S)
        return True

    async def _copy_slab(self, slab: int, source: int, target: int, dirty: set[int]) -> bool:
        slots = self.table.slab_slots(slab)
        written = self.slot_map.written_slots(slots.start, slots.stop)
        copies: deque[asyncio.Future[Exception | None]] = deque()
        try:
            for at in range(0, len(written), SYNC_CHUNK):
                chunk = written[at : at + SYNC_CHUNK]
                wrong = await self._copy_chunk(source, target, chunk, dirty, copies)
                if wrong:
                    where = self.stores[source].name
                    log.warning("resync of slab %d failed: slots %s are not their own pages "
                                "at %s", slab, wrong[:8], where)  # fmt: skip
                    return False
                while len(copies) > SYNC_WINDOW or (copies and at + SYNC_CHUNK >= len(written)):
                    failure = await copies.popleft()
                    if failure is not None:
                        raise failure
        except StoreError as exc:
            log.warning("resync of slab %d onto %s failed: %s", slab, self.stores[target].name,
                        exc)  # fmt: skip
            return False
        except TRANSPORT_ERRORS as exc:
            for store in (self.stores[source], self.stores[target]):
                if store.client is not None and not store.client.connected:
                    store.mark_down(exc)
            return False
        return True

    async def _copy_chunk(
        self,
        source: int,
        target: int,
        chunk: list[int],
        dirty: set[int],
        copies: deque[asyncio.Future[Exception | None]],
    ) -> list[int]:
        """Read a chunk; start the copy of what no write touched meanwhile, as stored
        (generation, tag and seal: a newer write reaches the target on its own), its
        outcome appended to `copies`. Returns the slots whose page did not prove
        itself and no write explains."""
        slot_map = self.slot_map
        src, dst = self.stores[source].client, self.stores[target].client
        if src is None or dst is None:
            raise ConnectionError("a store of the resync is gone")
        counts = slot_map.counts_of(chunk)
        reply = await src.read_pages(chunk, self.sealed)
        now = slot_map.counts_of(chunk)
        found = counts_of(reply.generations)
        intact = tags_of(reply.data, self.area_seed, chunk, reply.generations)
        moved = {i for i, s in enumerate(chunk)
                 if s in dirty or not slot_map.is_written(s) or now[i] != counts[i]}  # fmt: skip
        unproven = {i for i in range(len(chunk))
                    if intact[i] != reply.tags[i] or found[i] != counts[i]}  # fmt: skip
        keep = [i for i in range(len(chunk)) if i not in moved and i not in unproven]
        if keep:
            copies.append(start_copy(dst, reply, chunk, keep))
            self.stores[target].unflushed.add(self.table.slab_of(chunk[0]))
            self.counters["pages_resynced"] += len(keep)
        # A write takes its count on nbdkit's thread before the loop routes it: read
        # in between, the source still holds the older page. Such a write is routed
        # after the sync began, so it reaches the target itself.
        odd = [chunk[i] for i in unproven if i not in moved]
        pending = self.routing.pending_writes(odd) if odd else set()
        return [s for s in odd if s not in pending]


def start_copy(
    client: StoreClient, reply: Pages, chunk: list[int], keep: list[int]
) -> asyncio.Future[Exception | None]:
    """A resync copy of the pages `keep` indexes in `reply`, written to the transport
    at once, in order with batch writes; the future gets its outcome (None or the
    failure).

    The caller picked `keep` (those not rewritten meanwhile) in this same loop
    tick; an awaitable swap_out may first wait for a paused transport, and a
    batch write of one of those slots sent in that wait would then be
    overwritten on the target by this older copy.
    """
    done: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()

    def finished(failure: Exception | None) -> None:
        if not done.done():
            done.set_result(failure)

    data = memoryview(reply.data)
    pages = [data[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] for i in keep]
    tags = array("I", [reply.tags[i] for i in keep])
    gens = array("Q", [reply.generations[i] for i in keep])
    seals = None
    if reply.seals is not None:
        kept = memoryview(reply.seals)
        seals = b"".join(kept[i * SEAL_SIZE : (i + 1) * SEAL_SIZE] for i in keep)
    client.start_swap_out(runs_of([chunk[i] for i in keep]), pages, tags, gens, seals,
                          finished)  # fmt: skip
    return done
