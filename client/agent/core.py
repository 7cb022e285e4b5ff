"""The per-host agent: the replica machine's shell on its event loop.

It runs one event loop (uvloop when present) in its own thread, started from
nbdkit's after_fork; nbdkit's threads hand it work through `submit` and wait on
it. Every decision about replicas -- where a write goes, when it is
acknowledged, which replica a read asks, what a store's absence or return
means, what to repair, what a restart can prove -- is the machine's
(machine/machine.py), under its lock; this shell carries them out:

  machine   machine.Replicas   slots, slab table, stores' health, record (the lock)
  stores    stores.Store       one per store: its connections, either thread's
  batches   batches.Batches    one per store: what waits to be sent to it
  driver    driver.Driver      the machine's resyncs, rebuilds and proofs, step by step
  keeper    keys.RecordKeeper  the machine's durable record, in the keyring

After every event it `settle`s: the record is persisted if the machine changed
it -- before any write goes out or any answer goes back --, then completed
writes and failed reads are answered. An agent starts on a fresh area (a new
area id: what the stores held for the area before is replaced) or, restarted
under a swapping kernel, rebuilds from its record and the stores before it
serves.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import ssl
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Coroutine
from typing import Any

from netswap.protocol import StoreError, area_seed
from netswap.server.ops.pressure import Pressure, sample
from netswap.server.ops.recorder import BATCH_BUCKETS, LATENCY_BUCKETS, Recorder

from ..rpc import BlockingClient, StoreClient
from .batches import Batches
from .driver import Driver
from .jobs import ControlJob, ReadEntry
from .keys import AreaKey, KeyringError, RecordKeeper
from .machine.machine import Replicas
from .machine.rebuild import prove
from .machine.resync import resync
from .policy import BatchPolicy, Decision
from .reserve import Reserve
from .routes import Routes
from .seal import Sealer
from .startup import REBUILD_NONE_S, REBUILD_WAIT_S, Startup
from .stores import ConnectStore, OpenBlocking, Store

log = logging.getLogger("netswap.agent")

TICK_S = 0.25  # the clock's work: parked waits, repairs, proofs (and pressure sampling)
USAGE_PERIOD_S = 2.0
# How often the agent looks whether its key is still in the keyring (one syscall).
KEY_CHECK_S = 1.0


class Agent(Startup, Routes):
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
        holder: str = "",
        force: bool = False,
        keeper: RecordKeeper | None = None,
    ) -> None:
        self.area, self.token, self.slots = area, token, slots
        self.rebuild = rebuild  # a restart: rebuild the area from its record and the stores
        self.holder = holder  # this host, as the stores' area record names it (hostid.py)
        self.force = force  # a fresh start takes the area from another holder (--force)
        self.key = key
        self.sealer = Sealer(key.material, area) if key is not None else None
        self.min_epoch = epoch  # the supervisor's: this agent's epoch goes above it
        self.keeper = keeper
        self.area_seed = area_seed(area)  # the area identity in every page's tag
        self.reserve = reserve
        self.io_timeout = io_timeout
        self.tls = tls  # verifies the stores (server/tls.py), None: plaintext
        self.policy = policy or BatchPolicy()
        names = [f"{host}:{port}" for host, port in stores]
        self.machine = Replicas(slots, slab_slots, replicas, quorum, names,
                                sealed=self.sealer is not None)  # fmt: skip
        self.counters = self.machine.counters
        self.stores = [Store(i, host, port, self, self, connect_store, open_blocking)
                       for i, (host, port) in enumerate(stores)]  # fmt: skip
        self.batches = [Batches(store, self) for store in self.stores]
        self.driver = Driver(self)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.tasks: set[asyncio.Future[Any]] = set()
        self._inbox: deque[tuple[Callable[..., None], tuple[Any, ...]]] = deque()
        self._drain_scheduled = False
        self._decision: tuple[int, Pressure, Decision] | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._failure: StoreError | None = None
        # A store tier of one (a cluster): unreachable or refusing at start is an error.
        self.must_connect = must_connect
        self.first_failure = ""
        self.held_elsewhere = ""  # a store's refusal: another host holds this area
        self._stop: asyncio.Event | None = None
        self.rebuilt_seconds = 0.0
        self._serving = False  # set once started: later epoch raises re-fence the stores
        self._fenced_at = 0  # the epoch every connection was last fenced at
        self.pressure = Pressure.calm()
        self.decisions: Counter[str] = Counter()
        self.rpc_latency = {op: Recorder(LATENCY_BUCKETS) for op in ("swap_out", "swap_in")}
        self.batch_sizes = {op: Recorder(BATCH_BUCKETS) for op in ("swap_out", "swap_in")}
        self.recent_decisions: deque[tuple[float, str, int]] = deque(maxlen=50)
        # Set by the device: answers a read job's entry once all its pages are in.
        self.on_read_done: Callable[[ReadEntry, int], None] = _read_page_done

    # -- lifecycle (called from nbdkit's threads) -------------------------------
    def start(self, connect_timeout: float = 10.0) -> None:
        self._thread = threading.Thread(target=self._run, name="netswap-agent", daemon=True)
        self._thread.start()
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
        except (StoreError, KeyringError, ConnectionError) as exc:  # the start could not be made
            self._failure = exc if isinstance(exc, StoreError) else StoreError(
                getattr(exc, "errno", 0) or errno.EIO, str(exc))  # fmt: skip
            self._started.set()

    @property
    def epoch(self) -> int:
        return self.machine.epoch

    def clock(self) -> float:
        return self.loop.time() if self.loop is not None else time.monotonic()

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._begin()
        if self.rebuild:
            await self._rebuild()
        else:
            await asyncio.gather(*(self._first_connect(store) for store in self.stores))
            if not any(store.up for store in self.stores):
                if self.held_elsewhere:  # no store would give it: one line, not a wait
                    raise StoreError(errno.EEXIST, f"{self.held_elsewhere} (netswap serve "
                                     "--force takes it: that host loses its swap)")  # fmt: skip
                if self.must_connect:
                    raise StoreError(
                        errno.EHOSTUNREACH, f"no store tier at start: {self.first_failure}"
                    )
        if self.key is not None:
            self._background(self._watch_key(self.key))
        for coro in (self._clock(), self._refresh_usage()):
            self._background(coro)
        for store in self.stores:
            self._background(store.reconnect_forever())
        self._serving = True
        self._refence()  # a rebuild that found a later epoch on a store raised it
        self._started.set()
        await self._stop.wait()
        for task in list(self.tasks):
            task.cancel()
        for store in self.stores:
            await store.close()

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
        """From any thread: run fn(*args) on the loop, soon, in submission order (one
        self-pipe write wakes the loop for every item that arrives before it drains)."""
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

    def log_exception(self, what: str) -> None:
        log.exception("%s", what)

    # -- after every event: the record first, then the answers ---------------------------
    def settle(self) -> None:
        m = self.machine
        with m.lock:
            record = m.take_record()
            if record is not None and self.keeper is not None:
                try:
                    self.keeper.save(record)
                except KeyringError as exc:  # acknowledging past an unrecorded change is not
                    log.error("the area's record could not be written (%s): every write "
                              "fails until it can", exc)  # fmt: skip
                    m.fenced_out = m.fenced_out or f"the record cannot be written: {exc}"
            finished = m.take_finished()
            failed = m.take_failed_reads()
            notes = list(m.notes)
            m.notes.clear()
        for level, text in notes:
            log.log(logging.ERROR if level == "error" else logging.WARNING, "%s", text)
        for job in finished:
            job.signal()
        for entry in failed:
            self.on_read_done(entry, errno.EIO)
        if self._serving and m.epoch > self._fenced_at and self.loop is not None:
            self._fenced_at = m.epoch
            self.loop.call_soon_threadsafe(self._refence)

    def _refence(self) -> None:
        """On the loop: the epoch rose while serving (a write count at 2^32 - 1 took the
        next one): every connection fenced below it goes and comes back fenced at it --
        else the agent's own new connections, fenced higher, would make the store refuse
        its older ones (ESTALE), read as a newer agent's."""
        epoch = self.machine.epoch
        self._fenced_at = max(self._fenced_at, epoch)
        for store in self.stores:
            if store.client is not None and store.fenced < epoch:
                store.mark_down(f"the agent's epoch rose to {epoch}: it fences again")

    # -- stores (stores.StoreEvents) -----------------------------------------------------
    def store_up(self, store: Store, kept: bool) -> None:
        welcome = store.client.welcome if store.client is not None else None
        assert welcome is not None
        m = self.machine
        with m.lock:
            m.now = self.clock()
            m.store_up(store.index, welcome.store_id, welcome.boot, kept, welcome.prev_boot,
                       welcome.clean)  # fmt: skip
            leftovers = m.take_leftovers(store.index)
        self.settle()
        for slab in leftovers:  # copies where the slab moved from: never a replica again
            span = m.table.slab_slots(slab)
            self._background(self._discard_on(store.index, [(span.start, len(span))]))
        self.reroute()

    def store_down(self, store: Store) -> None:
        m = self.machine
        with m.lock:
            m.now = self.clock()
            m.store_down(store.index)
        self.settle()

    # -- the clock -------------------------------------------------------------------
    async def _clock(self) -> None:
        while True:
            self.pressure = sample()
            self.tick()
            await asyncio.sleep(TICK_S)

    def tick(self) -> None:
        m = self.machine
        with m.lock:
            m.now = self.clock()
            m.expire()
            repairs = m.repairs()
            proofs = m.proofs()
            parked = bool(m.parked_reads or m.parked_writes)
        self.settle()
        for slab, position in repairs:
            self.driver.start(resync(m, slab, position, self.area_seed, self.io_timeout))
        for slab in proofs:
            self.driver.start(prove(m, slab))
        if parked:
            self.reroute()

    async def _watch_key(self, key: AreaKey) -> None:
        """Detach, or an operator, may drop the key: from then on every page is EIO."""
        while key.present():
            await asyncio.sleep(KEY_CHECK_S)
        log.error("the area's key is gone from the keyring: every page of %s now reads "
                  "and writes EIO", self.area)  # fmt: skip
        if self.sealer is not None:
            self.sealer.drop()
        key.forget()

    async def _refresh_usage(self) -> None:
        while True:
            await asyncio.sleep(USAGE_PERIOD_S)
            await asyncio.gather(*(store.refresh_usage() for store in self.stores))
            with self.machine.lock:
                for store in self.stores:
                    self.machine.stores[store.index].free_bytes = store.free_bytes


def _read_page_done(entry: ReadEntry, error: int) -> None:
    job = entry.job
    if error:
        job.error = job.error or error
    job.remaining -= 1
    if job.remaining == 0:
        job.done.set()
