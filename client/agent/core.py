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
back to the next on error or timeout. What happens when a store goes and comes
back -- replica states, resync, re-replication, pages declared lost -- is
repair.py's; figures for the dashboard are stats.py's.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import random
import ssl
import threading
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from netswap.protocol import MAX_DISCARD_RANGES, StoreError, area_seed
from netswap.server.ops.pressure import Pressure, sample
from netswap.server.ops.recorder import BATCH_BUCKETS, LATENCY_BUCKETS, Recorder

from ..rpc import StoreClient
from .links import TRANSPORT_ERRORS, ConnectStore, StoreLink, WriteRun
from .ops import CallOp, ReadEntry, ReadOp, WriteOp
from .placement import DOWN, IN_SYNC, STALE, SYNCING, SlabTable
from .policy import BatchPolicy, Decision
from .repair import Repair
from .reserve import Reserve

log = logging.getLogger("netswap.agent")

PRESSURE_PERIOD_S = 0.25
USAGE_PERIOD_S = 2.0


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
        connect_store: ConnectStore = StoreClient.connect,
    ) -> None:
        self.area, self.token, self.pages = area, token, pages
        self.area_seed = area_seed(area)  # the area identity in every page's tag
        self.reserve = reserve
        self.quorum = quorum
        self.io_timeout = io_timeout
        self.tls = tls  # verifies the stores (server/tls.py), None: plaintext
        self.connect_store = connect_store
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
        self.slab_writes: dict[int, set[WriteOp]] = {}  # slab -> its writes not yet answered
        # Held while a lone write picks its replicas on nbdkit's thread (directwrite.py)
        # and while a resync begins (repair.py): one sees the other. Every change to
        # slab_writes holds it too, as two threads change it. Reentrant: the direct
        # path tracks its op while it holds it.
        self.routing = threading.RLock()
        self.repair = Repair(self)
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
        self.repair.start()
        self.links = [StoreLink(self, i, h, p) for i, (h, p) in enumerate(self._stores)]
        await asyncio.gather(*(self._first_connect(link) for link in self.links))
        for coro in (self._sample_pressure(), self._refresh_usage(), self.repair.run()):
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
                dirty = self.repair.syncing.get(slab)
                if dirty is not None:
                    dirty.update(range(slot, slot + count))
                for position, store, state in table.replicas_of(slab):
                    link = links[store]
                    if state in (IN_SYNC, SYNCING) and link.up:
                        link.add_write(op, start, count)
                        op.remaining += count
                        kicked.add(link)
                        self.track_write(slab, op)
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
                self.forget_write(op)
                op.finish(self.quorum)

    def store_down(self, link: StoreLink) -> None:
        self.repair.store_down(link)

    def store_up(self, link: StoreLink, lost: bool) -> None:
        self.repair.store_up(link, lost)

    def track_write(self, slab: int, op: WriteOp) -> None:
        """The op will write to this slab: a resync of the slab first waits for it."""
        with self.routing:
            self.slab_writes.setdefault(slab, set()).add(op)

    def forget_write(self, op: WriteOp) -> None:
        """The op is complete, or handed on: no slab waits for it any more."""
        table = self.table
        with self.routing:
            for slab in range(table.slab_of(op.first), table.slab_of(op.first + op.count - 1) + 1):
                ops = self.slab_writes.get(slab)
                if ops is not None:
                    ops.discard(op)
                    if not ops:
                        del self.slab_writes[slab]

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
