"""The per-host agent: swap slots -> replicated pages on remote page stores.

It runs one event loop (uvloop when present) in its own thread, started from
nbdkit's after_fork; nbdkit's threads hand it WriteOps / ReadOps through
call_soon_threadsafe and wait on the op. Everything below runs on that loop,
so the slab table, links and batches need no locks.

Writes: each page goes to every up replica of its slab (placed on first write
by power-of-two-choices); an op completes when every such replica has
answered and each page has at least `quorum` acks. A replica whose store
fails mid-write is marked STALE: it serves no reads until resynced.
Reads: each page goes to the first in-sync replica on an up store and falls
back to the next on error or timeout. A background task re-replicates stale
replicas -- onto another store when one is free of that slab, else back onto
the same store once it returns -- copying every written slot from an in-sync
replica while new writes also go to the target (slots written meanwhile are
not copied, so the copy never overwrites newer data).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import random
import ssl
import threading
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from netswap.protocol import MAX_DISCARD_RANGES, PAGE_SIZE, StoreError, area_seed, batch_tags
from netswap.server.ops.pressure import Pressure, sample
from netswap.server.ops.recorder import BATCH_BUCKETS, LATENCY_BUCKETS, Recorder
from netswap.server.ops.snapshot import StoreRow

from ..rpc import StoreClient
from .links import TRANSPORT_ERRORS, StoreLink, WriteRun
from .ops import CallOp, ReadEntry, ReadOp, WriteOp
from .placement import DOWN, IN_SYNC, STALE, SYNCING, SlabTable, power_of_two_choices
from .policy import BatchPolicy, Decision
from .reserve import Reserve

log = logging.getLogger("netswap.agent")

PRESSURE_PERIOD_S = 0.25
USAGE_PERIOD_S = 2.0
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


class Agent:
    def __init__(
        self,
        stores: list[tuple[str, int]],
        area: str,
        pages: int,
        reserve: Reserve,
        *,
        replicas: int,
        slab_pages: int,
        token: str = "",
        quorum: int = 1,
        io_timeout: float = 5.0,
        policy: BatchPolicy | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.area, self.token, self.pages = area, token, pages
        self.area_seed = area_seed(area)  # the area identity in every page's tag
        self.reserve = reserve
        self.quorum = quorum
        self.io_timeout = io_timeout
        self.tls = tls  # verifies the stores (server/tls.py), None: plaintext
        self.policy = policy or BatchPolicy()
        self.table = SlabTable(pages, slab_pages, replicas)
        self.rng = random.Random()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.links: list[StoreLink] = []
        self.tasks: set[asyncio.Future[Any]] = set()
        self._stores = stores
        self._inbox: deque[tuple[Callable[..., None], tuple[Any, ...]]] = deque()
        self._drain_scheduled = False
        self._decision: tuple[int, Pressure, Decision] | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._stop: asyncio.Event | None = None
        self._syncing: dict[int, set[int]] = {}  # slab -> slots written during its sync
        self._slab_writes: dict[int, set[WriteOp]] = {}  # slab -> its writes not yet answered
        self._resync_wake: asyncio.Event | None = None
        self.pressure = Pressure.calm()
        self.decisions: Counter[str] = Counter()
        self.counters: Counter[str] = Counter()
        self.rpc_latency = {op: Recorder(LATENCY_BUCKETS) for op in ("swap_out", "swap_in")}
        self.batch_sizes = {op: Recorder(BATCH_BUCKETS) for op in ("swap_out", "swap_in")}
        self.recent_decisions: deque[tuple[float, str, int]] = deque(maxlen=50)
        # Of some slots, those whose latest write is not complete yet (the device,
        # which bumps generations, sets this; called on the loop).
        self.pending_writes: Callable[[list[int]], set[int]] = lambda slots: set()

    # -- lifecycle (called from nbdkit's threads) -------------------------------
    def start(self, connect_timeout: float = 10.0) -> None:
        self._thread = threading.Thread(target=self._run, name="netswap-agent", daemon=True)
        self._thread.start()
        if not self._started.wait(connect_timeout + 5):
            raise TimeoutError("agent loop did not start")

    def _run(self) -> None:
        try:
            import uvloop

            runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
        except ImportError:
            runner = asyncio.Runner()
        with runner:
            runner.run(self._main())

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._resync_wake = asyncio.Event()
        self.links = [StoreLink(self, i, h, p) for i, (h, p) in enumerate(self._stores)]
        await asyncio.gather(*(self._first_connect(link) for link in self.links))
        for coro in (self._sample_pressure(), self._refresh_usage(), self._resync_loop()):
            self._background(coro)
        for link in self.links:
            self._background(link.reconnect_forever())
        self._started.set()
        await self._stop.wait()
        for task in list(self.tasks):
            task.cancel()
        for link in self.links:
            if link.client is not None:
                await link.client.close()

    async def _first_connect(self, link: StoreLink) -> None:
        try:
            await link.connect(fresh=True)
        except (*TRANSPORT_ERRORS, StoreError) as exc:
            log.warning("store %s unavailable at start: %s", link.name, exc)

    def _background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def stop(self) -> None:
        if self.loop is not None and self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(10)

    def submit(self, fn: Callable[..., None], *args: Any) -> None:
        """From any thread: run fn(*args) on the loop, soon, in submission order.

        Items queue in a deque and one call_soon_threadsafe wakes the loop for
        all that arrive before it drains: one self-pipe write per burst, not
        per request.
        """
        self._inbox.append((fn, args))
        if not self._drain_scheduled:
            self._drain_scheduled = True
            assert self.loop is not None
            self.loop.call_soon_threadsafe(self._drain_inbox)

    def _drain_inbox(self) -> None:
        self._drain_scheduled = False  # before draining: a later append reschedules
        inbox = self._inbox
        while inbox:
            fn, args = inbox.popleft()
            fn(*args)

    def run_call(self, op: CallOp, coro_fn: Callable[[], Coroutine[Any, Any, int]]) -> None:
        """From a foreign thread: run a control coroutine, result into op."""

        async def wrapper() -> None:
            try:
                op.error = await coro_fn()
            except Exception as exc:  # a bug: report EIO rather than hang the caller
                log.exception("agent %s failed", op.what)
                op.error = getattr(exc, "errno", 0) or errno.EIO
            op.done.set()

        self.submit(lambda: self._background(wrapper()))

    # -- policy ---------------------------------------------------------------
    def decide(self) -> Decision:
        """The policy's decision, recomputed only when its inputs change band."""
        occupancy = self.reserve.occupancy
        band = int(occupancy * 20)  # 5 % steps: finer than any policy threshold
        cached = self._decision
        if cached is None or cached[0] != band or cached[1] is not self.pressure:
            cached = self._decision = (
                band,
                self.pressure,
                self.policy.decide(occupancy, self.pressure),
            )
        return cached[2]

    def count_decision(self, reason: str, queued: int) -> None:
        self.decisions[reason] += 1
        self.recent_decisions.append((time.monotonic(), reason, queued))

    def observe_batch(self, direction: str, pages: int, seconds: float) -> None:
        op = "swap_out" if direction == "out" else "swap_in"
        self.rpc_latency[op].observe(seconds)
        self.batch_sizes[op].observe(pages)

    async def _sample_pressure(self) -> None:
        while True:
            self.pressure = sample()
            await asyncio.sleep(PRESSURE_PERIOD_S)

    async def _refresh_usage(self) -> None:
        while True:
            await asyncio.sleep(USAGE_PERIOD_S)
            await asyncio.gather(*(link.refresh_usage() for link in self.links))

    # -- writes ---------------------------------------------------------------
    def up_stores(self) -> list[int]:
        return [link.index for link in self.links if link.up]

    def submit_write(self, op: WriteOp) -> None:
        """Queue the op's pages on every writable replica, one run per slab."""
        self.counters["swap_out_pages"] += op.count
        table, links = self.table, self.links
        kicked: set[StoreLink] = set()
        start = 0
        while start < op.count:
            slot = op.first + start
            slab = table.slab_of(slot)
            count = min(op.count - start, table.slab_slots(slab).stop - slot)
            if table.placed(slab) or self._place(slab):
                dirty = self._syncing.get(slab)
                if dirty is not None:
                    dirty.update(range(slot, slot + count))
                for position, store, state in table.replicas_of(slab):
                    link = links[store]
                    if state in (IN_SYNC, SYNCING) and link.up:
                        link.add_write(op, start, count)
                        op.remaining += count
                        kicked.add(link)
                        self._slab_writes.setdefault(slab, set()).add(op)
                    elif state == DOWN:  # it misses this write: it needs a copy now
                        table.set_state(slab, position, STALE)
                        self.counters["replicas_stale"] += 1
            else:
                op.error = errno.EIO
            start += count
        for link in kicked:
            link.kick()
        if op.remaining == 0:
            op.complete(errno.EIO)  # no replica of some page is reachable

    def _place(self, slab: int) -> bool:
        up = self.up_stores()
        if not up:
            return False
        self.table.place(slab, up, lambda s: self.links[s].free_pages, self.rng)
        self.counters["slabs_placed"] += 1
        return True

    def writes_done(self, link: StoreLink, batch: list[WriteRun], error: int) -> None:
        """error: 0 ok, errno from the store, -1 the store is unreachable."""
        table = self.table
        for op, start, count in batch:
            if error == 0:
                link.unflushed.add(table.slab_of(op.first + start))
                acks = op.acks
                for i in range(start, start + count):
                    acks[i] += 1
            elif error > 0:
                op.error = op.error or error
            else:
                self._mark_stale(table.slab_of(op.first + start), link.index)
            op.remaining -= count
            if op.remaining == 0:
                self._forget_write(op)
                op.finish(self.quorum)

    def _forget_write(self, op: WriteOp) -> None:
        """The op is complete: no slab waits for it any more."""
        table = self.table
        for slab in range(table.slab_of(op.first), table.slab_of(op.first + op.count - 1) + 1):
            ops = self._slab_writes.get(slab)
            if ops is not None:
                ops.discard(op)
                if not ops:
                    del self._slab_writes[slab]

    def _mark_stale(self, slab: int, store: int) -> None:
        for position, s, state in self.table.replicas_of(slab):
            if s == store and state != STALE:
                self.table.set_state(slab, position, STALE)
                self.counters["replicas_stale"] += 1

    # -- reads ----------------------------------------------------------------
    def submit_read(self, op: ReadOp) -> None:
        self.counters["swap_in_pages"] += len(op.slots)
        for index in range(len(op.slots)):
            self._route_read(ReadEntry(op, index))
        for link in self.links:
            if link.reads:
                link.kick()

    def _route_read(self, entry: ReadEntry) -> bool:
        slab = self.table.slab_of(entry.slot)
        for _, store, state in self.table.replicas_of(slab):
            link = self.links[store]
            if state == IN_SYNC and link.up and not entry.tried & (1 << store):
                entry.tried |= 1 << store
                link.add_read(entry)
                return True
        self.read_page_done(entry.op, errno.EIO)
        return False

    def reads_failed(self, link: StoreLink, batch: list[ReadEntry], error: int) -> None:
        self.counters["read_fallbacks"] += len(batch)
        for entry in batch:
            self._route_read(entry)
        for other in self.links:
            if other.reads:
                other.kick()

    def read_page_done(self, op: ReadOp, error: int) -> None:
        if error:
            op.error = op.error or error
        op.remaining -= 1
        if op.remaining == 0:
            op.done.set()

    # -- control: discard, flush ------------------------------------------------
    async def discard(self, first: int, count: int) -> int:
        table = self.table
        by_store: dict[int, list[tuple[int, int]]] = {}
        slot, end = first, first + count
        while slot < end:
            slab = table.slab_of(slot)
            stop = min(end, table.slab_slots(slab).stop)
            for _, store, _ in table.replicas_of(slab):
                by_store.setdefault(store, []).append((slot, stop - slot))
            slot = stop

        def discard_on(store: int, ranges: list[tuple[int, int]]) -> Awaitable[int]:
            async def rpc(client: StoreClient) -> None:
                for at in range(0, len(ranges), MAX_DISCARD_RANGES):
                    await client.discard(ranges[at : at + MAX_DISCARD_RANGES])

            return self.links[store].call(rpc)

        calls = [discard_on(store, ranges) for store, ranges in by_store.items()]
        await asyncio.gather(*calls)
        return 0  # discard is advisory: the bitmap already reads these as zeros

    async def flush(self) -> int:
        up = [link for link in self.links if link.up]
        if not up:
            return errno.EIO
        # What each store acknowledged before this Flush is durable once it answers;
        # a write answered later may or may not be, so it stays unflushed.
        taken = [link.unflushed for link in up]
        for link in up:
            link.unflushed = set()
        results = await asyncio.gather(*(link.call(lambda c: c.flush()) for link in up))
        for link, slabs, result in zip(up, taken, results, strict=True):
            if result != 0:
                link.unflushed |= slabs
        failures = [r for r in results if r > 0]
        return failures[0] if failures else (0 if any(r == 0 for r in results) else errno.EIO)

    # -- store health and re-replication ----------------------------------------
    def store_down(self, link: StoreLink) -> None:
        table = self.table
        for slab, position in table.slabs_on(link.index):
            state = table.state[slab * table.replicas + position]
            if state == IN_SYNC:
                table.set_state(slab, position, DOWN)
            elif state == SYNCING:
                table.set_state(slab, position, STALE)
        self._wake_resync()

    def store_up(self, link: StoreLink, lost: bool) -> None:
        """A store is back: replicas that missed nothing and kept every page they were
        sent (none written since its last Flush, or it lost none) are in sync."""
        table = self.table
        for slab, position in table.slabs_on(link.index):
            if table.state[slab * table.replicas + position] == DOWN:
                kept = not lost and slab not in link.unflushed
                table.set_state(slab, position, IN_SYNC if kept else STALE)
        link.unflushed.clear()  # what it lacks now comes back by resync, which re-adds
        self._wake_resync()

    def _wake_resync(self) -> None:
        if self._resync_wake is not None:
            self._resync_wake.set()

    async def _resync_loop(self) -> None:
        assert self._resync_wake is not None
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._resync_wake.wait(), RESYNC_PERIOD_S)
            self._resync_wake.clear()
            now = asyncio.get_running_loop().time()
            for slab in range(self.table.slabs):
                for position, store, state in self.table.replicas_of(slab):
                    link = self.links[store]
                    gone = state == DOWN and now - link.down_since >= REPLACE_AFTER_S
                    if state == STALE or (gone and not link.up):
                        await self._repair(slab, position, store)

    def replication_lag(self) -> int:
        """Slots whose slab has a replica that is not in sync."""
        table = self.table
        lag = 0
        for slab in range(table.slabs):
            if any(state != IN_SYNC for _, _, state in table.replicas_of(slab)):
                lag += table.written_in(slab)
        return lag

    async def _repair(self, slab: int, position: int, store: int) -> None:
        table = self.table
        replicas = table.replicas_of(slab)
        holders = {s for _, s, _ in replicas}
        sources = [s for _, s, st in replicas if st == IN_SYNC and self.links[s].up]
        if not sources:
            if all(st == STALE for _, _, st in replicas) and self.links[store].up:
                self._declare_lost(slab, position)
            return  # else wait: a DOWN or unreachable in-sync replica may come back
        spare = [s for s in self.up_stores() if s not in holders]
        if spare:
            target = power_of_two_choices(spare, lambda s: self.links[s].free_pages, self.rng)
        elif self.links[store].up and table.state[slab * table.replicas + position] == STALE:
            target = store
        else:
            return
        table.set_replica(slab, position, target, SYNCING)
        dirty = self._syncing[slab] = set()
        # Writes routed before this point did not go to the target and are not in
        # `dirty`; one still queued for the source would be overtaken by the copy's
        # read, which would then install the older page on the target. So the copy
        # starts once they are all answered (each within its RPC deadline).
        earlier = list(self._slab_writes.get(slab, ()))
        try:
            ok = await self._drained(earlier) and await self._copy_slab(
                slab, sources[0], target, dirty
            )
        finally:
            del self._syncing[slab]
        still = table.store[slab * table.replicas + position] == target
        if ok and still and table.state[slab * table.replicas + position] == SYNCING:
            table.set_state(slab, position, IN_SYNC)
            self.counters["slabs_resynced"] += 1
        elif still:
            table.set_state(slab, position, STALE)

    def _declare_lost(self, slab: int, position: int) -> None:
        """Every copy of this slab's pages is gone: they read as EIO from now on."""
        table = self.table
        lost = 0
        for slot in table.slab_slots(slab):
            if table.is_written(slot):
                table.mark_lost(slot)
                lost += 1
        for pos, _, _ in table.replicas_of(slab):
            table.set_state(slab, pos, IN_SYNC)
        self.counters["pages_lost"] += lost
        log.error("slab %d: every replica lost its pages; %d pages now read as EIO", slab, lost)

    async def _drained(self, ops: list[WriteOp]) -> bool:
        """Wait until every op is complete; False if one outlives two RPC deadlines."""
        deadline = asyncio.get_running_loop().time() + 2 * self.io_timeout
        while any(not op.done.is_set() for op in ops):
            if asyncio.get_running_loop().time() > deadline:
                return False
            await asyncio.sleep(DRAIN_POLL_S)
        return True

    async def _copy_slab(self, slab: int, source: int, target: int, dirty: set[int]) -> bool:
        table = self.table
        written = [s for s in table.slab_slots(slab) if table.is_written(s)]
        copies: deque[asyncio.Future[Exception | None]] = deque()
        try:
            for at in range(0, len(written), SYNC_CHUNK):
                chunk = written[at : at + SYNC_CHUNK]
                wrong = await self._copy_chunk(source, target, chunk, dirty, copies)
                if wrong:
                    log.warning("resync of slab %d failed: slots %s are not their own pages "
                                "at %s", slab, wrong[:8], self.links[source].name)  # fmt: skip
                    return False
                while len(copies) > SYNC_WINDOW or (copies and at + SYNC_CHUNK >= len(written)):
                    failure = await copies.popleft()
                    if failure is not None:
                        raise failure
        except StoreError as exc:
            log.warning("resync of slab %d onto %s failed: %s", slab, self.links[target].name, exc)
            return False
        except TRANSPORT_ERRORS as exc:
            for link in (self.links[source], self.links[target]):
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
        table = self.table
        src, dst = self.links[source].client, self.links[target].client
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
            self.links[target].unflushed.add(table.slab_of(chunk[0]))
            self.counters["pages_resynced"] += len(keep)
        # A write takes its generation on nbdkit's thread before the loop routes it:
        # read in between, the source still holds the older page. Such a write is
        # routed after the sync began, so it reaches the target itself.
        odd = [chunk[i] for i in unproven if i not in moved]
        pending = self.pending_writes(odd) if odd else set()
        return [s for s in odd if s not in pending]

    # -- figures --------------------------------------------------------------
    def store_table(self) -> list[StoreRow]:
        """One row per store for the dashboard: health, usage, slabs by state."""
        table = self.table
        rows = []
        for link in self.links:
            states = [table.state[i] for i, s in enumerate(table.store) if s == link.index]
            rows.append(
                StoreRow(
                    name=link.name,
                    up=link.up,
                    used_bytes=link.used_pages * PAGE_SIZE,
                    capacity_bytes=link.capacity_pages * PAGE_SIZE,
                    slabs=len(states),
                    stale=sum(1 for st in states if st in (STALE, DOWN)),
                    syncing=sum(1 for st in states if st == SYNCING),
                    failures=link.counters["failures"],
                    reconnects=link.counters["reconnects"],
                )
            )
        return rows

    def stats(self) -> dict[str, int]:
        out: dict[str, int] = dict(self.counters)
        out["reserve_pages"] = self.reserve.pages
        out["reserve_used_pages"] = self.reserve.used
        out["reserve_waits"] = self.reserve.waits
        out["reserve_locked"] = int(self.reserve.locked)
        out["stores_up"] = len(self.up_stores())
        out["metadata_bytes"] = self.table.metadata_bytes()
        for reason, n in self.decisions.items():
            out[f"decision_{reason}"] = n
        for direction, op in (("out", "swap_out"), ("in", "swap_in")):
            out[f"batches_{direction}"] = self.batch_sizes[op].count
            out[f"batch_pages_{direction}"] = int(self.batch_sizes[op].sum)
        return out


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
