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
from collections import deque
from typing import TYPE_CHECKING

from netswap.protocol import PAGE_SIZE, StoreError, batch_tags

from ..rpc import StoreClient
from .links import TRANSPORT_ERRORS, StoreLink
from .ops import WriteOp
from .placement import DOWN, IN_SYNC, STALE, SYNCING, power_of_two_choices

if TYPE_CHECKING:
    from .core import Agent

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
    """The agent's replication and repair (its `repair` attribute)."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.syncing: dict[int, set[int]] = {}  # slab -> slots written during its sync
        self._wake: asyncio.Event | None = None

    def store_down(self, link: StoreLink) -> None:
        table = self.agent.table
        for slab, position in table.slabs_on(link.index):
            state = table.state[slab * table.replicas + position]
            if state == IN_SYNC:
                table.set_state(slab, position, DOWN)
            elif state == SYNCING:
                table.set_state(slab, position, STALE)
        self.wake()

    def store_up(self, link: StoreLink, lost: bool) -> None:
        """A store is back: replicas that missed nothing and kept every page they were
        sent (none written since its last Flush, or it lost none) are in sync."""
        table = self.agent.table
        for slab, position in table.slabs_on(link.index):
            if table.state[slab * table.replicas + position] == DOWN:
                kept = not lost and slab not in link.unflushed
                table.set_state(slab, position, IN_SYNC if kept else STALE)
        link.unflushed.clear()  # what it lacks now comes back by resync, which re-adds
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
            for slab in range(self.agent.table.slabs):
                for position, store, state in self.agent.table.replicas_of(slab):
                    link = self.agent.links[store]
                    gone = state == DOWN and now - link.down_since >= REPLACE_AFTER_S
                    if state == STALE or (gone and not link.up):
                        await self.repair_slab(slab, position, store)

    def lag(self) -> int:
        """Slots whose slab has a replica that is not in sync."""
        table = self.agent.table
        lag = 0
        for slab in range(table.slabs):
            if any(state != IN_SYNC for _, _, state in table.replicas_of(slab)):
                lag += table.written_in(slab)
        return lag

    async def repair_slab(self, slab: int, position: int, store: int) -> None:
        table = self.agent.table
        replicas = table.replicas_of(slab)
        holders = {s for _, s, _ in replicas}
        sources = [s for _, s, st in replicas if st == IN_SYNC and self.agent.links[s].up]
        if not sources:
            if all(st == STALE for _, _, st in replicas) and self.agent.links[store].up:
                self._declare_lost(slab, position)
            return  # else wait: a DOWN or unreachable in-sync replica may come back
        spare = [s for s in self.agent.up_stores() if s not in holders]
        if spare:
            links = self.agent.links
            target = power_of_two_choices(spare, lambda s: links[s].free_pages, self.agent.rng)
        elif self.agent.links[store].up and table.state[slab * table.replicas + position] == STALE:
            target = store
        else:
            return
        # Writes routed before this point did not go to the target and are not in
        # `dirty`; one still queued for the source would be overtaken by the copy's
        # read, which would then install the older page on the target. So the copy
        # starts once they are all answered (each within its RPC deadline). Under
        # `routing`, a lone write on nbdkit's thread is either among them or sees
        # the sync and goes through the loop (directwrite.py).
        with self.agent.routing:
            table.set_replica(slab, position, target, SYNCING)
            dirty = self.syncing[slab] = set()
            earlier = list(self.agent.slab_writes.get(slab, ()))
        try:
            ok = await self._drained(earlier) and await self._copy_slab(
                slab, sources[0], target, dirty
            )
        finally:
            del self.syncing[slab]
        still = table.store[slab * table.replicas + position] == target
        if ok and still and table.state[slab * table.replicas + position] == SYNCING:
            table.set_state(slab, position, IN_SYNC)
            self.agent.counters["slabs_resynced"] += 1
        elif still:
            table.set_state(slab, position, STALE)

    def _declare_lost(self, slab: int, position: int) -> None:
        """Every copy of this slab's pages is gone: they read as EIO from now on."""
        table = self.agent.table
        lost = 0
        for slot in table.slab_slots(slab):
            if table.is_written(slot):
                table.mark_lost(slot)
                lost += 1
        for pos, _, _ in table.replicas_of(slab):
            table.set_state(slab, pos, IN_SYNC)
        self.agent.counters["pages_lost"] += lost
        log.error("slab %d: every replica lost its pages; %d pages now read as EIO", slab, lost)

    async def _drained(self, ops: list[WriteOp]) -> bool:
        """Wait until every op is complete; False if one outlives two RPC deadlines."""
        deadline = asyncio.get_running_loop().time() + 2 * self.agent.io_timeout
        while any(not op.done.is_set() for op in ops):
            if asyncio.get_running_loop().time() > deadline:
                return False
            await asyncio.sleep(DRAIN_POLL_S)
        return True

    async def _copy_slab(self, slab: int, source: int, target: int, dirty: set[int]) -> bool:
        table = self.agent.table
        written = [s for s in table.slab_slots(slab) if table.is_written(s)]
        copies: deque[asyncio.Future[Exception | None]] = deque()
        try:
            for at in range(0, len(written), SYNC_CHUNK):
                chunk = written[at : at + SYNC_CHUNK]
                wrong = await self._copy_chunk(source, target, chunk, dirty, copies)
                if wrong:
                    where = self.agent.links[source].name
                    log.warning("resync of slab %d failed: slots %s are not their own pages "
                                "at %s", slab, wrong[:8], where)  # fmt: skip
                    return False
                while len(copies) > SYNC_WINDOW or (copies and at + SYNC_CHUNK >= len(written)):
                    failure = await copies.popleft()
                    if failure is not None:
                        raise failure
        except StoreError as exc:
            where = self.agent.links[target].name
            log.warning("resync of slab %d onto %s failed: %s", slab, where, exc)
            return False
        except TRANSPORT_ERRORS as exc:
            for link in (self.agent.links[source], self.agent.links[target]):
                if link.client is not None and not link.client.connected:
                    link.mark_down(exc)
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
        """Read a chunk; start the copy of what no write touched meanwhile, with the
        generation it was read at (a newer write reaches the target on its own), its
        outcome appended to `copies`. Returns the slots whose page did not prove
        itself and no write explains."""
        table = self.agent.table
        src, dst = self.agent.links[source].client, self.agent.links[target].client
        if src is None or dst is None:
            raise ConnectionError("a store of the resync is gone")
        gens = table.generations_of(chunk)
        data, unproven = await src.swap_in_unproven(chunk, gens)
        now = table.generations_of(chunk)
        moved = {i for i, s in enumerate(chunk)
                 if s in dirty or not table.is_written(s) or now[i] != gens[i]}  # fmt: skip
        keep = [i for i in range(len(chunk)) if i not in moved and i not in unproven]
        if keep:
            pages = b"".join(data[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] for i in keep)
            kept = bytes(gens[i] for i in keep)
            copies.append(start_copy(dst, [chunk[i] for i in keep], pages, kept))
            self.agent.links[target].unflushed.add(table.slab_of(chunk[0]))
            self.agent.counters["pages_resynced"] += len(keep)
        # A write takes its generation on nbdkit's thread before the loop routes it:
        # read in between, the source still holds the older page. Such a write is
        # routed after the sync began, so it reaches the target itself.
        odd = [chunk[i] for i in unproven if i not in moved]
        pending = self.agent.pending_writes(odd) if odd else set()
        return [s for s in odd if s not in pending]


def start_copy(
    client: StoreClient, slots: list[int], pages: bytes, generations: bytes
) -> asyncio.Future[Exception | None]:
    """A resync copy, written to the transport at once, in order with batch writes;
    the future gets its outcome (None or the failure).

    The caller picked `slots` (those not rewritten meanwhile) in this same loop
    tick; an awaitable swap_out may first wait for a paused transport, and a
    batch write of one of those slots sent in that wait would then be
    overwritten on the target by this older copy.
    """
    done: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()

    def finished(failure: Exception | None) -> None:
        if not done.done():
            done.set_result(failure)

    tags = batch_tags(pages, client.area_seed, slots, generations)
    client.start_swap_out(slots, pages, tags, generations, finished)
    return done
