"""One Store per page store: every connection the agent has to it, and its health.

A store is reached two ways, by two kinds of thread, and both live here:
the agent's loop keeps one pipelined StoreClient to it (batches, control,
repair), and nbdkit's threads take blocking clients from its small pool for a
lone read or write (direct.py). The store is *up* while the loop's client is
connected. Any transport failure or missed deadline, on either path, marks
it down at once -- the loop's client is aborted, its pooled clients closed, and
the agent told (StoreEvents) -- and a reconnect loop retries with exponential
backoff. The pool is small: a thread finding no idle client and the pool full
goes through the loop instead, so clients do not grow with nbdkit's threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from netswap.protocol import PAGE_SIZE, StoreError
from netswap.protocol.errors import ConnectionLost

from ..rpc import BlockingClient, StoreClient

log = logging.getLogger("netswap.agent")

BACKOFF_MIN_S = 0.1
BACKOFF_MAX_S = 2.0
TRANSPORT_ERRORS = (ConnectionLost, TimeoutError, OSError)
# Blocking clients per store. Only a read or write that is alone takes one (the
# device batches the rest through the loop), so two suffice: one per NBD connection
# with its lone request, the way nbd-client -C 2 would send them.
POOL_SIZE = 2
# A store the thread path cannot connect to (while the loop's client still can, or
# has not noticed yet) would cost a connect per request; this long, they use the loop.
RETRY_AFTER_S = 1.0
ConnectStore = Callable[[str, int, str, str, float, ssl.SSLContext | None], Awaitable[StoreClient]]
OpenBlocking = Callable[[str, int, str, str, float, ssl.SSLContext | None], BlockingClient]


class StoreEvents(Protocol):
    """What a Store tells the agent (core.Agent implements it): `activate` makes the
    area ready on a store that answered Hello (True: it kept the area) before the store
    counts as up."""

    async def activate(self, store: Store, client: StoreClient) -> bool: ...
    def store_up(self, store: Store, kept: bool) -> None: ...
    def store_down(self, store: Store) -> None: ...


class Session(Protocol):
    """Who the agent is to a store: its area, token, deadlines and TLS."""

    area: str
    token: str
    slots: int
    io_timeout: float
    tls: ssl.SSLContext | None

    @property
    def epoch(self) -> int: ...


class Store:
    def __init__(
        self,
        index: int,
        host: str,
        port: int,
        session: Session,
        events: StoreEvents,
        connect: ConnectStore = StoreClient.connect,
        open_blocking: OpenBlocking = BlockingClient.open,
    ) -> None:
        self.index = index
        self.host, self.port = host, port
        self.name = f"{host}:{port}"
        self.session, self.events = session, events
        self._connect, self._open_blocking = connect, open_blocking
        self.client: StoreClient | None = None
        # What the store says of its room (Stats, protocol 4: bytes, as payloads vary in
        # size); placement takes the freer of two stores by free_bytes.
        self.capacity_bytes = 0
        self.used_bytes = 0
        self.free_bytes = 0
        self._down = asyncio.Event()
        self._down.set()
        self.down_since = 0.0
        self.counters = {"reconnects": 0, "failures": 0}
        self.fenced = 0  # the highest epoch this agent fenced this store with (its floor)
        # The thread path's clients: guarded by `pool_lock`, never held across a call.
        self.pool_lock = threading.Lock()
        self._idle: list[BlockingClient] = []
        self._pooled = 0
        self._retry_at = 0.0

    @property
    def up(self) -> bool:
        return self.client is not None and self.client.connected

    def _room(self, stats: dict[str, int], capacity_pages: int) -> None:
        capacity = stats.get("capacity_bytes", capacity_pages * PAGE_SIZE)
        used = stats.get("used_bytes", stats.get("used_pages", 0) * PAGE_SIZE)
        self.capacity_bytes, self.used_bytes = capacity, used
        self.free_bytes = stats.get("free_bytes", max(0, capacity - used))

    # -- the loop's client -------------------------------------------------------
    async def connect(self) -> None:
        """Connect, have the agent make the area ready on it, and count it up."""
        s = self.session
        client = await self._connect(self.host, self.port, s.area, s.token, s.io_timeout, s.tls)
        try:
            assert client.welcome is not None
            kept = await self.events.activate(self, client)
            stats = await client.stats()
        except BaseException:
            client.abort()
            raise
        self._room(stats, client.welcome.capacity_pages)
        self.client = client
        client.on_lost(self.mark_down)
        self._down.clear()
        self.events.store_up(self, kept)

    async def reconnect_forever(self) -> None:
        backoff = BACKOFF_MIN_S
        while True:
            await self._down.wait()
            try:
                await self.connect()
            except (*TRANSPORT_ERRORS, StoreError) as exc:
                # The first failure of a streak says why, once; the retries stay quiet.
                level = logging.WARNING if backoff == BACKOFF_MIN_S else logging.DEBUG
                log.log(level, "store %s unreachable: %s", self.name, exc)
                await asyncio.sleep(backoff)
                backoff = min(BACKOFF_MAX_S, backoff * 2)
                continue
            backoff = BACKOFF_MIN_S
            self.counters["reconnects"] += 1
            log.warning("store %s is back", self.name)

    def mark_down(self, why: object) -> None:
        """On the loop: the store is unreachable, whichever path found out."""
        if self.client is None:
            return
        log.warning("store %s is down: %s", self.name, why)
        self.counters["failures"] += 1
        client, self.client = self.client, None
        client.abort()
        self.close_pool()
        self._down.set()
        self.down_since = asyncio.get_running_loop().time()
        self.events.store_down(self)

    async def refresh_usage(self) -> None:
        if self.client is not None:
            with contextlib.suppress(*TRANSPORT_ERRORS, StoreError):
                self._room(await self.client.stats(), self.capacity_bytes // PAGE_SIZE)

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

    async def close(self) -> None:
        self.close_pool()
        if self.client is not None:
            await self.client.close()

    # -- the thread path's clients -------------------------------------------------
    def take(self) -> BlockingClient | None:
        """An idle blocking client, a new one, or None (all busy, or retry later).
        Raises what opening one raised (the caller then uses the loop)."""
        with self.pool_lock:
            if self._idle:
                return self._idle.pop()
            if self._pooled >= POOL_SIZE or time.monotonic() < self._retry_at:
                return None
            self._pooled += 1
        s = self.session
        try:
            client = self._open_blocking(self.host, self.port, s.area, s.token, s.io_timeout, s.tls)
            try:  # each connection fences on its own: the store refuses an unfenced one's writes
                epoch = s.epoch
                client.fence(epoch, s.io_timeout)
                self.fenced = max(self.fenced, epoch)
            except BaseException:
                client.close()
                raise
            return client
        except BaseException:
            with self.pool_lock:
                self._pooled -= 1
                self._retry_at = time.monotonic() + RETRY_AFTER_S
            raise

    def give(self, client: BlockingClient) -> None:
        """A client back after a call that went well."""
        with self.pool_lock:
            if self._pooled > len(self._idle):  # else the pool was closed meanwhile
                self._idle.append(client)
                return
        client.close()

    def lost(self, client: BlockingClient) -> None:
        """A client that failed: closed, and its place in the pool freed."""
        client.close()
        with self.pool_lock:
            self._pooled = max(0, self._pooled - 1)

    def close_pool(self) -> None:
        with self.pool_lock:
            idle, self._idle = self._idle, []
            self._pooled -= len(idle)
        for client in idle:
            client.close()
