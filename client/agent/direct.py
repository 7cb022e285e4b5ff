"""Swap-in on nbdkit's own threads: a read goes to a store without the loop.

Runs in nbdkit's worker threads. A faulting process waits for one 4 KiB read at
QD1, and handing that read to the agent's loop thread and back cost about a
third of its latency (shared README: blocking RPCs from worker threads, 196 µs
against 295 µs). So a read goes straight to one in-sync replica over a blocking
connection this thread keeps to that store -- the GIL is free while the socket
waits -- and its pages are proven as on the loop's path (rpc.check_pages: each
tag recomputed for its slot and generation). Anything out of the ordinary -- no
connection, a deadline passed, a refusal, a page not proven, a read across
slabs -- hands the read to the loop's path, which owns failover, fallbacks and
marking a store down. A lone write does the same over these connections
(directwrite.py).

Each store has a small pool of such connections: a thread takes an idle one,
or opens one while the pool is below POOL_SIZE, and gives it back after its
call; with all of them busy the read goes through the loop, which batches. So
a lone faulting thread (QD1, what a user waits on) skips the hand-off, many at
once are batched, and the connections do not grow with nbdkit's threads (16 per
NBD connection, coming and going with those connections).
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Callable

from netswap.protocol import (
    CLOSED,
    PROTOCOL_VERSION,
    Connection,
    Hello,
    Pages,
    Reply,
    Request,
    Role,
    StoreError,
    SwapIn,
    Welcome,
)
from netswap.protocol.errors import RemoteProtocolError
from netswap.server.ops.recorder import BATCH_BUCKETS, LATENCY_BUCKETS, Recorder

from ..rpc import ConnectionLost, check_pages
from .core import Agent
from .placement import IN_SYNC

# One recv: a 1 MiB batch of pages arrives in a few; larger buffers only cost memory.
RECV_BYTES = 256 * 1024
# What a direct call can meet on its way; each hands the request to the loop.
DIRECT_ERRORS = (OSError, ssl.SSLError, StoreError, RemoteProtocolError, TimeoutError)
# Connections per store. The device sends only a read that is alone down this path
# (device.py: reads that come together are batched by the loop), so one or two at a
# time per store suffice: two NBD connections each with its lone read.
POOL_SIZE = 2
# A store the direct path cannot connect to (while the loop's link still can, or
# has not noticed yet) costs a connect per lone read; this long, they use the loop.
RETRY_AFTER_S = 1.0


class _Conn:
    """A blocking connection to one store, bound to the agent's area."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.conn, self.ids = sock, Connection(Role.CLIENT), 0

    @classmethod
    def open(cls, agent: Agent, host: str, port: int) -> _Conn:
        sock = socket.create_connection((host, port), timeout=agent.io_timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if agent.tls is not None:
            sock = agent.tls.wrap_socket(sock, server_hostname=host)
        conn = cls(sock)
        hello = Hello(conn.next_id(), PROTOCOL_VERSION, agent.area, agent.token)
        if not isinstance(conn.call(hello, agent.io_timeout), Welcome):
            conn.close()
            raise ConnectionLost(f"{host}:{port} did not welcome the direct path")
        return conn

    def next_id(self) -> int:
        self.ids = (self.ids + 1) & 0xFFFFFFFF
        return self.ids

    def call(self, request: Request, deadline: float) -> Reply:
        """One request, its reply, within `deadline` seconds in all."""
        end = time.monotonic() + deadline
        self.sock.settimeout(deadline)
        self.sock.sendall(self.conn.send(request))
        return self.reply(end)

    def send_parts(self, parts: list[bytes | memoryview], deadline: float) -> None:
        """A frame given as buffers (Connection.send_swap_out), without joining them
        (TLS has no sendmsg: joined there)."""
        sock = self.sock
        sock.settimeout(deadline)
        if isinstance(sock, ssl.SSLSocket):
            sock.sendall(b"".join(parts))
            return
        views = [memoryview(p).cast("B") for p in parts]
        while views:
            sent = sock.sendmsg(views)
            while views and sent >= len(views[0]):
                sent -= len(views.pop(0))
            if sent:
                views[0] = views[0][sent:]

    def reply(self, end: float) -> Reply:
        """The reply to the request in flight, by `end` (time.monotonic()). Past `end`,
        what has already arrived still counts: a write waits for its replicas in turn,
        and one that answered in time must not be late because another did not."""
        while True:
            event = self.conn.next_event()
            if isinstance(event, Reply):
                return event
            if event is CLOSED:
                raise ConnectionLost("the store closed the direct connection")
            self.sock.settimeout(max(0.0, end - time.monotonic()))  # 0: only what is there
            try:
                data = self.sock.recv(RECV_BYTES)
            except (TimeoutError, BlockingIOError, ssl.SSLWantReadError):
                raise TimeoutError("the store did not answer in time") from None
            self.conn.receive_data(data)

    def close(self) -> None:
        self.sock.close()


class _Pool:
    """The idle connections to one store, how many exist, and when to try again."""

    def __init__(self) -> None:
        self.idle: list[_Conn] = []
        self.total = 0
        self.retry_at = 0.0  # after a failed connect, lone reads use the loop until then


class DirectReads:
    """The agent's reads done on the calling thread; None means: use the loop."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self._pools: dict[int, _Pool] = {}
        self.lock = threading.Lock()  # guards the pools and the figures, not the calls
        self.counters = {"direct_reads": 0, "direct_fallbacks": 0, "pages": 0}
        # Round trips and batch sizes of the swap-ins done here; the stats merge them
        # with the loop's (each side's recorders have one writer at a time).
        self.latency = Recorder(LATENCY_BUCKETS)
        self.batches = Recorder(BATCH_BUCKETS)

    def read(self, slots: list[int], gens: bytes, current: Callable[[], bytes]) -> bytes | None:
        agent, table = self.agent, self.agent.table
        slab = table.slab_of(slots[0])
        if table.slab_of(slots[-1]) != slab:
            return self._count(None)
        store = next((s for _, s, st in table.replicas_of(slab)
                      if st == IN_SYNC and agent.links[s].up), None)  # fmt: skip
        if store is None:
            return self._count(None)
        try:
            conn = self.take(store)
        except DIRECT_ERRORS:
            return self._count(None)
        if conn is None:  # every connection to that store is busy
            return self._count(None)
        try:
            began = time.perf_counter()
            reply = conn.call(SwapIn(conn.next_id(), tuple(slots)), agent.io_timeout)
        except DIRECT_ERRORS:
            self.lost(store, conn)
            return self._count(None)
        self.give(store, conn)
        if check_pages(agent.area_seed, reply, tuple(slots), gens, current) is not None:
            return self._count(None)  # a refusal or an unproven page: the loop decides
        assert isinstance(reply, Pages)  # check_pages proved it
        with self.lock:
            self.latency.observe(time.perf_counter() - began)
            self.batches.observe(len(slots))
            self.counters["pages"] += len(slots)
        return self._count(reply.data)

    def take(self, store: int) -> _Conn | None:
        """An idle connection to `store`, a new one, or None (all busy, or retry later)."""
        with self.lock:
            pool = self._pools.setdefault(store, _Pool())
            if pool.idle:
                return pool.idle.pop()
            if pool.total >= POOL_SIZE or time.monotonic() < pool.retry_at:
                return None
            pool.total += 1
        link = self.agent.links[store]
        try:
            return _Conn.open(self.agent, link.host, link.port)
        except BaseException:
            with self.lock:
                pool.total -= 1
                pool.retry_at = time.monotonic() + RETRY_AFTER_S
            raise

    def give(self, store: int, conn: _Conn) -> None:
        with self.lock:
            pool = self._pools.get(store)
            if pool is not None:  # else closed meanwhile
                pool.idle.append(conn)
                return
        conn.close()

    def lost(self, store: int, conn: _Conn) -> None:
        conn.close()
        with self.lock:
            pool = self._pools.get(store)
            if pool is not None:
                pool.total -= 1

    def _count(self, data: bytes | None) -> bytes | None:
        with self.lock:
            self.counters["direct_reads" if data is not None else "direct_fallbacks"] += 1
        return data

    def close(self) -> None:
        with self.lock:
            conns = [c for pool in self._pools.values() for c in pool.idle]
            self._pools = {}
        for conn in conns:
            conn.close()
