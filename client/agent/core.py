"""The per-host agent: swap slots -> replicated pages on remote page stores.

It runs one event loop (uvloop when present) in its own thread, started from
nbdkit's after_fork; nbdkit's threads hand it jobs through `submit` and wait
on them. The agent owns the pieces and wires them; each piece of state has one
owner:

  slot_map  slots.SlotMap      each slot: written, lost, its write count (threads + loop, locked)
  table     placement.SlabTable where each slab's replicas are (the loop; threads read it
                               under routing.lock)
  stores    stores.Store       one per store: its connections, either thread's, and health
  batches   batches.Batches    one per store: what waits to be sent to it (the loop)
  routing   routing.Routing    which replicas a job goes to; the writes in flight per slab
  repair    repair.Repair      replicas going down, coming back, being copied (the loop)

An agent starts either on a fresh area (whatever the stores held for it is
released) or, restarted under a swapping kernel, by rebuilding what the dead
agent knew from the stores (rebuild.py) before it serves.

Everything else here is the loop's lifecycle, the policy's inputs, the figures
the stats read, and the two control requests, discard and flush.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import ssl
import threading
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from netswap.protocol import MAX_DISCARD_RANGES, StoreError, area_seed
from netswap.server.ops.pressure import Pressure, sample
from netswap.server.ops.recorder import BATCH_BUCKETS, LATENCY_BUCKETS, Recorder

from ..rpc import BlockingClient, StoreClient
from .batches import Batches, WriteRun
from .jobs import ControlJob, ReadEntry
from .keys import AreaKey
from .placement import SlabTable
from .policy import BatchPolicy, Decision
from .rebuild import Rebuild, Rebuilt, rebuild_log
from .repair import Repair
from .reserve import Reserve
from .routing import Routing
from .seal import Sealer
from .slots import SlotMap
from .stores import TRANSPORT_ERRORS, ConnectStore, OpenBlocking, Store

log = logging.getLogger("netswap.agent")

PRESSURE_PERIOD_S = 0.25
USAGE_PERIOD_S = 2.0
# A rebuilding agent waits this long for every store before it rebuilds from those it
# has (the kernel holds the swap device's IO meanwhile, for up to its dead-connection
# timeout: attach's default is 120 s); a store that comes later is heard then.
REBUILD_WAIT_S = 10.0
# With no store answering at all, a rebuild waits this long more: everything would be
# unproven and read EIO, while the kernel holds the device's IO (attach's default
# dead-connection timeout is 120 s) and a store may be back in time. Past it the agent
# gives up, and the supervisor's log says the kernel will fail the IO.
REBUILD_NONE_S = 100.0
# How often the agent looks whether its key is still in the keyring (one syscall).
KEY_CHECK_S = 1.0


class Agent:
    def __init__(
        self,
        stores: list[tuple[str, int]],
        area: str,
        slots: int,
        reserve: Reserve,
        *,
        replicas: int,
        slab_slots: int,
        token: str = "",
        quorum: int = 1,
        io_timeout: float = 5.0,
        policy: BatchPolicy | None = None,
        tls: ssl.SSLContext | None = None,
        connect_store: ConnectStore = StoreClient.connect,
        open_blocking: OpenBlocking = BlockingClient.open,
        rebuild: bool = False,
        epoch: int = 0,
        key: AreaKey | None = None,
        must_connect: bool = False,
    ) -> None:
        self.area, self.token, self.slots = area, token, slots
        self.rebuild = rebuild  # a restart: rebuild the area from the stores, never release it
        # The area's key (keys.py) and its cipher (seal.py); None: pages go in plaintext.
        self.key = key
        self.sealer = Sealer(key.material, area) if key is not None else None
        # Above the supervisor's and every epoch an agent wrote under this key (the nonces)
        self.min_epoch = max(epoch, key.last_epoch() if key is not None and rebuild else 0)
        self.rebuilt: Rebuilt | None = None
        self.area_seed = area_seed(area)  # the area identity in every page's tag
        self.reserve = reserve
        self.io_timeout = io_timeout
        self.tls = tls  # verifies the stores (server/tls.py), None: plaintext
        self.policy = policy or BatchPolicy()
        self.counters: Counter[str] = Counter()
        self.slot_map = SlotMap(slots, epoch=max(1, epoch))
        self.table = SlabTable(slots, slab_slots, replicas)
        self.stores = [Store(i, host, port, self, self, connect_store, open_blocking)
                       for i, (host, port) in enumerate(stores)]  # fmt: skip
        self.batches = [Batches(store, self) for store in self.stores]
        self.routing = Routing(self.table, self.slot_map, self.stores, self.batches, quorum,
                               self.counters)  # fmt: skip
        self.repair = Repair(self.table, self.slot_map, self.stores, self.routing,
                             self.counters, io_timeout, self.area_seed,
                             self.sealer is not None)  # fmt: skip
        self.loop: asyncio.AbstractEventLoop | None = None
        self.tasks: set[asyncio.Future[Any]] = set()
        self._inbox: deque[tuple[Callable[..., None], tuple[Any, ...]]] = deque()
        self._drain_scheduled = False
        self._decision: tuple[int, Pressure, Decision] | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._failure: StoreError | None = None
        # A store tier of one (a cluster): unreachable or refusing at start is an error, not
        # a store to wait for.
        self.must_connect = must_connect
        self.first_failure = ""
        self._stop: asyncio.Event | None = None
        self.pressure = Pressure.calm()
        self.decisions: Counter[str] = Counter()
        self.rpc_latency = {op: Recorder(LATENCY_BUCKETS) for op in ("swap_out", "swap_in")}
        self.batch_sizes = {op: Recorder(BATCH_BUCKETS) for op in ("swap_out", "swap_in")}
        self.recent_decisions: deque[tuple[float, str, int]] = deque(maxlen=50)

    # -- lifecycle (called from nbdkit's threads) -------------------------------
    def start(self, connect_timeout: float = 10.0) -> None:
        self._thread = threading.Thread(target=self._run, name="netswap-agent", daemon=True)
        self._thread.start()
        # The wait for stores, then inventory: ~1 s per GiB.
        rebuilding = REBUILD_WAIT_S + REBUILD_NONE_S + 60 if self.rebuild else 0
        if not self._started.wait(connect_timeout + 5 + rebuilding):
            raise TimeoutError("agent loop did not start")
        if self._failure is not None:
            raise self._failure

    def _run(self) -> None:
        try:
            import uvloop

            runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
        except ImportError:
            runner = asyncio.Runner()
        try:
            with runner:
                runner.run(self._main())
        except StoreError as exc:  # the start could not be made (no store to rebuild from)
            self._failure = exc
            self._started.set()

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self.repair.start()
        if self.rebuild:
            await self._rebuild()
        else:
            await asyncio.gather(*(self._first_connect(store) for store in self.stores))
            if self.must_connect and not any(store.up for store in self.stores):
                raise StoreError(
                    errno.EHOSTUNREACH, f"no store tier at start: {self.first_failure}"
                )
        if self.key is not None:  # before any write: the next agent's epoch goes above it
            self.key.record_epoch(self.slot_map.epoch)
            self._background(self._watch_key(self.key))
        for coro in (self._sample_pressure(), self._refresh_usage(), self.repair.run()):
            self._background(coro)
        for store in self.stores:
            self._background(store.reconnect_forever())
        self._started.set()
        await self._stop.wait()
        for task in list(self.tasks):
            task.cancel()
        for store in self.stores:
            await store.close()

    async def _rebuild(self) -> None:
        """Connect to every store that answers within REBUILD_WAIT_S, keeping the area,
        and rebuild the dead agent's knowledge from them (rebuild.py)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + REBUILD_WAIT_S
        lost: set[int] = set()

        async def reach(store: Store) -> None:
            while True:
                try:
                    if await store.connect(fresh=False):
                        lost.add(store.index)
                    return
                except (*TRANSPORT_ERRORS, StoreError) as exc:
                    if loop.time() > deadline:
                        log.warning("store %s unreachable for the rebuild: %s", store.name, exc)
                        return
                    await asyncio.sleep(0.2)

        await asyncio.gather(*(reach(store) for store in self.stores))
        if not any(store.up for store in self.stores):
            log.error("no store answers: the rebuild waits up to %.0f s more (the kernel holds "
                      "the device's IO meanwhile)", REBUILD_NONE_S)  # fmt: skip
            deadline = loop.time() + REBUILD_NONE_S
            await asyncio.gather(*(reach(store) for store in self.stores))
            if not any(store.up for store in self.stores):
                raise ConnectionError(
                    f"no store answered within {REBUILD_WAIT_S + REBUILD_NONE_S:.0f}s"
                    ": this agent cannot rebuild the area"
                )
        reachable = [store for store in self.stores if store.up]
        rebuild = Rebuild(self.table, self.slot_map, self.stores, self.routing.quorum,
                          self.counters, self.sealer is not None)  # fmt: skip
        self.rebuilt = await rebuild.run(reachable, lost, self.min_epoch)
        self.counters["rebuilds"] += 1
        log.warning("%s", rebuild_log(self.rebuilt))
        self.repair.wake()

    async def _first_connect(self, store: Store) -> None:
        try:
            await store.connect(fresh=True)
        except (*TRANSPORT_ERRORS, StoreError) as exc:
            log.warning("store %s unavailable at start: %s", store.name, exc)
            self.first_failure = self.first_failure or str(exc)

    def _background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def stop(self) -> None:
        if self.loop is not None and self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(10)
        for store in self.stores:
            store.close_pool()

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

    def run_call(self, job: ControlJob, coro_fn: Callable[[], Coroutine[Any, Any, int]]) -> None:
        """From a foreign thread: run a control coroutine, its result into the job."""

        async def wrapper() -> None:
            try:
                job.error = await coro_fn()
            except Exception as exc:  # a bug: report EIO rather than hang the caller
                log.exception("agent %s failed", job.what)
                job.error = getattr(exc, "errno", 0) or errno.EIO
            job.done.set()

        self.submit(lambda: self._background(wrapper()))

    # -- store events (stores.StoreEvents) ------------------------------------------
    def store_up(self, store: Store, lost: bool) -> None:
        self.repair.store_up(store, lost)
        rebuilt = self.rebuilt
        if rebuilt is not None and store.name in rebuilt.unreachable and not lost:
            rebuilt.unreachable.remove(store.name)  # what it holds may prove slots now
            rebuild = Rebuild(self.table, self.slot_map, self.stores, self.routing.quorum,
                              self.counters, self.sealer is not None)  # fmt: skip
            everyone = not rebuilt.unreachable and not rebuilt.lost
            self._background(rebuild.late(everyone, self.routing.lock))

    def store_down(self, store: Store) -> None:
        self.repair.store_down(store)

    # -- what batches need (batches.BatchListener) ------------------------------------
    def decide(self) -> Decision:
        """The policy's decision, recomputed only when its inputs change band."""
        occupancy = self.reserve.occupancy
        band = int(occupancy * 20)  # 5 % steps: finer than any policy threshold
        cached = self._decision
        if cached is None or cached[0] != band or cached[1] is not self.pressure:
            cached = self._decision = (band, self.pressure,
                                       self.policy.decide(occupancy, self.pressure))  # fmt: skip
        return cached[2]

    def count_decision(self, reason: str, queued: int) -> None:
        self.decisions[reason] += 1
        self.recent_decisions.append((time.monotonic(), reason, queued))

    def observe_batch(self, direction: str, pages: int, seconds: float) -> None:
        op = "swap_out" if direction == "out" else "swap_in"
        self.rpc_latency[op].observe(seconds)
        self.batch_sizes[op].observe(pages)

    def writes_done(self, store: Store, batch: list[WriteRun], error: int) -> None:
        self.routing.writes_done(store, batch, error)

    def reads_failed(self, store: Store, batch: list[ReadEntry], error: int) -> None:
        self.routing.reads_failed(store, batch, error)

    def read_page_done(self, entry: ReadEntry, error: int) -> None:
        self.routing.read_page_done(entry, error)

    def count_unopened(self, slot: int) -> None:
        """A page that proved its tag but does not open: tampered with, or the key gone."""
        self.counters["seal_failures"] += 1
        if self.sealer is not None and self.sealer.usable:
            log.error("slot %d: its page does not open under the area's key: EIO", slot)

    async def _watch_key(self, key: AreaKey) -> None:
        """Detach, or an operator, may drop the key: from then on every page is EIO."""
        while key.present():
            await asyncio.sleep(KEY_CHECK_S)
        log.error("the area's key is gone from the keyring: every page of %s now reads "
                  "and writes EIO", self.area)  # fmt: skip
        if self.sealer is not None:
            self.sealer.drop()
        key.forget()

    async def _sample_pressure(self) -> None:
        while True:
            self.pressure = sample()
            await asyncio.sleep(PRESSURE_PERIOD_S)

    async def _refresh_usage(self) -> None:
        while True:
            await asyncio.sleep(USAGE_PERIOD_S)
            await asyncio.gather(*(store.refresh_usage() for store in self.stores))

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

            return self.stores[store].call(rpc)

        await asyncio.gather(*(discard_on(store, ranges) for store, ranges in by_store.items()))
        return 0  # discard is advisory: the slot map already reads these as zeros

    async def flush(self) -> int:
        up = [store for store in self.stores if store.up]
        if not up:
            return errno.EIO
        # What each store acknowledged before this Flush is durable once it answers;
        # a write answered later may or may not be, so it stays unflushed.
        taken = [store.unflushed for store in up]
        for store in up:
            store.unflushed = set()
        results = await asyncio.gather(*(store.call(lambda c: c.flush()) for store in up))
        for store, slabs, result in zip(up, taken, results, strict=True):
            if result != 0:
                store.unflushed |= slabs
        failures = [r for r in results if r > 0]
        return failures[0] if failures else (0 if any(r == 0 for r in results) else errno.EIO)
