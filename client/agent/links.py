"""One link per page store: its connection, health, reconnects and batches.

A link is up while its StoreClient is connected. Any transport failure or
missed deadline marks it down at once (the agent then stops routing to it and
marks its replicas stale) and a reconnect loop retries with exponential
backoff. Batches: writes and reads for this store queue here and go out as one
SwapOut / SwapIn when the batch is full, when the store has nothing in flight
(no reason to wait), when the linger timer fires, or at once when the policy
says pressure is high. At most MAX_INFLIGHT batches per store are on the wire.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from netswap.protocol import MAX_BATCH_PAGES, PAGE_SIZE, StoreError

from ..rpc import ConnectionLost, StoreClient
from .ops import ReadEntry, ReadOp, WriteOp
from .placement import SlabTable
from .policy import Decision
from .reserve import Reserve

log = logging.getLogger("netswap.agent")

MAX_INFLIGHT = 4
WriteRun = tuple[WriteOp, int, int]  # (op, index of its first page, pages): consecutive slots
BACKOFF_MIN_S = 0.1
BACKOFF_MAX_S = 2.0
TRANSPORT_ERRORS = (ConnectionLost, TimeoutError, OSError)
ConnectStore = Callable[[str, int, str, str, float, ssl.SSLContext | None], Awaitable[StoreClient]]


class LinkListener(Protocol):
    """What a link needs from the agent, and tells it: one interface (core.Agent)."""

    area: str
    token: str
    pages: int
    io_timeout: float
    tls: ssl.SSLContext | None
    table: SlabTable
    reserve: Reserve
    connect_store: ConnectStore  # StoreClient.connect; tests pass an in-process fake

    def decide(self) -> Decision: ...
    def count_decision(self, reason: str, queued: int) -> None: ...
    def observe_batch(self, direction: str, pages: int, seconds: float) -> None: ...
    def writes_done(self, link: StoreLink, batch: list[WriteRun], error: int) -> None: ...
    def reads_failed(self, link: StoreLink, batch: list[ReadEntry], error: int) -> None: ...
    def read_page_done(self, op: ReadOp, error: int) -> None: ...
    def store_up(self, link: StoreLink, lost: bool) -> None: ...
    def store_down(self, link: StoreLink) -> None: ...


class StoreLink:
    def __init__(self, agent: LinkListener, index: int, host: str, port: int) -> None:
        self.agent = agent
        self.index = index
        self.host, self.port = host, port
        self.name = f"{host}:{port}"
        self.client: StoreClient | None = None
        self.capacity_pages = 0
        self.used_pages = 0
        self.inflight = 0
        self.writes: list[WriteRun] = []
        self.write_pages = 0
        self.write_slots: set[int] = set()
        self.reads: list[ReadEntry] = []
        # Slabs this store acknowledged writes to since its last completed Flush: a
        # file store killed and restarted keeps only what it had flushed, so on its
        # return these need a copy even though it kept its pages.
        self.unflushed: set[int] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._down = asyncio.Event()
        self._down.set()
        self.down_since = 0.0
        self.counters = {"reconnects": 0, "failures": 0}

    @property
    def up(self) -> bool:
        return self.client is not None and self.client.connected

    @property
    def free_pages(self) -> int:
        return max(0, self.capacity_pages - self.used_pages)

    # -- connection -----------------------------------------------------------
    async def connect(self, fresh: bool) -> bool:
        """Connect and activate the area; True when the store lost our pages."""
        agent = self.agent
        client = await agent.connect_store(
            self.host, self.port, agent.area, agent.token, agent.io_timeout, agent.tls
        )
        try:
            assert client.welcome is not None
            lost = client.welcome.area_pages == 0
            if fresh and not lost:
                await client.swapfile(False, 0)  # a new swap area starts empty
            await client.swapfile(True, agent.pages)
            stats = await client.stats()
        except BaseException:
            client.abort()
            raise
        self.capacity_pages = client.welcome.capacity_pages
        self.used_pages = stats.get("used_pages", 0)
        self.client = client
        client.on_lost(self.mark_down)
        self._down.clear()
        return lost

    async def reconnect_forever(self) -> None:
        backoff = BACKOFF_MIN_S
        while True:
            await self._down.wait()
            try:
                lost = await self.connect(fresh=False)
            except (*TRANSPORT_ERRORS, StoreError) as exc:
                # The first failure of a streak says why, once; the retries stay quiet.
                level = logging.WARNING if backoff == BACKOFF_MIN_S else logging.DEBUG
                log.log(level, "store %s unreachable: %s", self.name, exc)
                await asyncio.sleep(backoff)
                backoff = min(BACKOFF_MAX_S, backoff * 2)
                continue
            backoff = BACKOFF_MIN_S
            self.counters["reconnects"] += 1
            log.warning("store %s is back (%s)", self.name, "empty" if lost else "kept pages")
            self.agent.store_up(self, lost)

    def mark_down(self, why: object) -> None:
        if self.client is None:
            return
        log.warning("store %s is down: %s", self.name, why)
        self.counters["failures"] += 1
        client, self.client = self.client, None
        client.abort()
        self._down.set()
        self.down_since = asyncio.get_running_loop().time()
        self.agent.store_down(self)

    async def refresh_usage(self) -> None:
        if self.client is not None:
            with contextlib.suppress(*TRANSPORT_ERRORS, StoreError):
                self.used_pages = (await self.client.stats()).get("used_pages", self.used_pages)

    # -- batching -------------------------------------------------------------
    def add_write(self, op: WriteOp, start: int, count: int) -> None:
        slots = range(op.first + start, op.first + start + count)
        while not self.write_slots.isdisjoint(slots):  # a slot twice in a batch: send now
            self._send_writes(MAX_BATCH_PAGES)
        self.writes.append((op, start, count))
        self.write_pages += count
        self.write_slots.update(slots)

    def add_read(self, entry: ReadEntry) -> None:
        self.reads.append(entry)

    def kick(self) -> None:
        """Send what is queued now, or arm the linger timer, as the policy says."""
        decision = self.agent.decide()
        if self.inflight >= MAX_INFLIGHT:
            return  # a completing batch kicks again
        full = self.write_pages >= decision.max_pages or len(self.reads) >= decision.max_pages
        if full or self.inflight == 0 or decision.send_now:
            self._flush(decision.max_pages, decision.reason)
        elif self._timer is None and (self.writes or self.reads):
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(decision.linger_s, self._linger_expired)

    def _linger_expired(self) -> None:
        self._timer = None
        self._flush(self.agent.decide().max_pages, "linger")

    def _flush(self, max_pages: int, reason: str) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while (self.writes or self.reads) and self.inflight < MAX_INFLIGHT:
            queued = self.write_pages + len(self.reads)
            if self.writes:
                self._send_writes(max_pages)
            if self.reads and self.inflight < MAX_INFLIGHT:
                self._send_reads(max_pages)
            self.agent.count_decision(reason, queued - self.write_pages - len(self.reads))

    def _send_writes(self, max_pages: int) -> None:
        batch, room = [], max_pages
        while self.writes and room:
            op, start, count = self.writes[0]
            if count > room:  # split the run: its tail waits for the next batch
                batch.append((op, start, room))
                self.writes[0] = (op, start + room, count - room)
                break
            batch.append(self.writes.pop(0))
            room -= count
        sent = max_pages - room
        self.write_pages -= sent
        if not self.writes:
            self.write_slots.clear()
        for op, start, count in batch:
            self.write_slots.difference_update(range(op.first + start, op.first + start + count))
        if batch:
            self._swap_out(batch, sent)

    def _send_reads(self, max_pages: int) -> None:
        batch, self.reads = self.reads[:max_pages], self.reads[max_pages:]
        if batch:
            self._swap_in(batch)

    def _swap_out(self, batch: list[WriteRun], pages: int) -> None:
        client = self.client
        if client is None:
            self.agent.writes_done(self, batch, -1)
            return
        views = self.agent.reserve.views
        slots: list[int] = []
        tags: list[int] = []
        gens: list[bytes] = []
        data: list[memoryview] = []
        for op, start, count in batch:
            end = start + count
            slots.extend(range(op.first + start, op.first + end))
            tags.extend(op.tags[start:end])
            gens.append(op.generations[start:end])
            data.extend([views[b] for b in op.bufs[start:end]])
        began = time.perf_counter()

        def done(failure: Exception | None) -> None:
            error = self._outcome(client, failure)
            if error == 0:
                self.agent.observe_batch("out", pages, time.perf_counter() - began)
            self.agent.writes_done(self, batch, error)
            self._batch_done()

        self.inflight += 1
        client.start_swap_out(slots, data, tags, b"".join(gens), done)  # the views, not a copy

    def _swap_in(self, batch: list[ReadEntry]) -> None:
        client = self.client
        if client is None:
            self.agent.reads_failed(self, batch, -1)
            return
        began = time.perf_counter()

        def done(data: bytes, failure: Exception | None) -> None:
            error = self._outcome(client, failure)
            if error:
                self.agent.reads_failed(self, batch, error)
            else:
                self.agent.observe_batch("in", len(batch), time.perf_counter() - began)
                view = memoryview(data)
                for i, entry in enumerate(batch):
                    at = entry.index * PAGE_SIZE
                    entry.op.out[at : at + PAGE_SIZE] = view[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]
                    self.agent.read_page_done(entry.op, 0)
            self._batch_done()

        self.inflight += 1
        slots = [e.slot for e in batch]
        table = self.agent.table
        client.start_swap_in(slots, bytes(e.generation for e in batch), done,
                             lambda: table.generations_of(slots))  # fmt: skip

    def _outcome(self, client: StoreClient, failure: Exception | None) -> int:
        """0 ok, the store's errno, or -1 when the store is unreachable (now marked down)."""
        if failure is None:
            return 0
        if isinstance(failure, StoreError):
            return failure.errno
        if self.client is client:  # not a stale failure of a client already replaced
            self.mark_down(failure)
        return -1

    def _batch_done(self) -> None:
        self.inflight -= 1
        if self.writes or self.reads:
            self.kick()

    async def call(self, fn: Callable[[StoreClient], Awaitable[None]]) -> int:
        """Run one control RPC; 0, an errno, or -1 when the store is unreachable."""
        if self.client is None:
            return -1
        try:
            await fn(self.client)
        except StoreError as exc:
            return exc.errno
        except TRANSPORT_ERRORS as exc:
            self.mark_down(exc)
            return -1
        return 0
