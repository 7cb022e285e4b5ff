"""The store clients: one connection to a page store, bound to one area.

Two thin shells over the same sans-IO Connection, for the two kinds of thread
that talk to a store:

- `StoreClient`, on the agent's event loop (asyncpg-style): requests are
  pipelined and paired with their replies by id, which may come in any order.
  `await client.swap_out(...)` and friends carry one deadline per call (control
  and repair paths); `start_swap_out` / `start_swap_in` are the batch path: they
  send at once and call back on the loop, with no task, future or timer per
  batch. A watchdog sweeps the batch calls every WATCHDOG_PERIOD_S and fails
  those past their deadline. It reads straight into the connection's buffer
  (asyncio.BufferedProtocol).
- `BlockingClient`, on an nbdkit thread (client/agent/direct.py): one request
  and its reply at a time over a blocking socket, read with recv_into into the
  same kind of buffer; the GIL is free while it waits.

Both prove what they read with protocol/proof.py: a payload is the slot's own
when its tag, recomputed over its bytes at its stored generation, matches, and
that generation (all 64 bits) is the one the caller last wrote. A payload is
what the agent made of a page (protocol/limits.py: the page, compressed, or its
repeated word), 1..PAGE_SIZE bytes; a batch of whole pages travels without
lengths, and Pages.payload(i) gives each either way.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import math
import os
import socket
import ssl
import time
from array import array
from collections.abc import Callable, Sequence
from typing import cast

from netswap.protocol import (
    CLOSED,
    NEED_DATA,
    PROTOCOL_VERSION,
    Connection,
    Discard,
    Failed,
    Fence,
    Flush,
    Held,
    Hello,
    Inventory,
    Pages,
    RemoteProtocolError,
    Reply,
    Request,
    Role,
    Stats,
    StatsReply,
    StoreError,
    Swapfile,
    SwapIn,
    SwapOut,
    Welcome,
    area_seed,
    prove_reply,
    tags_of,
    tags_of_sized,
)
from netswap.protocol.errors import ConnectionLost
from netswap.protocol.messages import Buffer
from netswap.server.tls import handshake_failure
from netswap.server.units import read_secret

DEFAULT_DEADLINE_S = 10.0
# A TLS close exchanges close_notify first; a store that does not answer in this
# long is cut off (a plain socket closes at once).
CLOSE_WAIT_S = 1.0
# How late a batch call's timeout may fire: deadlines are seconds, so a quarter
# second of slack is noise, and one sweep costs a scan of a handful of calls.
WATCHDOG_PERIOD_S = 0.25
# A generation's write count: its low 32 bits (the epoch is above them).
COUNT_MASK = 0xFFFFFFFF

ReplyCallback = Callable[["Reply | Exception"], None]
PagesCallback = Callable[[Pages | None, Exception | None], None]


def _detached(reply: Reply) -> Reply:
    """A reply that outlives the tick it arrived in: its pages and seals copied out of
    the connection's buffer. They are views into it (protocol/connection.py), and an
    awaiting coroutine resumes a loop tick later, after the next read may have
    refilled that buffer: a resync saw its pages turn into other replies' bytes."""
    if not isinstance(reply, Pages):
        return reply
    seals = bytes(reply.seals) if reply.seals is not None else None
    return Pages(reply.request_id, bytes(reply.data), reply.tags, reply.generations, seals,
                 reply.sized_lengths)  # fmt: skip


def _failure(reply: Reply | Exception) -> Exception | None:
    """What a reply says went wrong: the transport's exception, a store's Failed, or None."""
    if isinstance(reply, Exception):
        return reply
    if isinstance(reply, Failed):
        return StoreError(reply.errno, reply.reason)
    return None


def _hello_failed(where: str, exc: Exception, tls: bool) -> ConnectionLost:
    hint = "" if tls or "in protocol" in str(exc) else " (a TLS store? give store-tls-ca)"
    return ConnectionLost(f"{exc}, before {where} answered Hello{hint}")


# -- the loop's client ---------------------------------------------------------
class _RpcProtocol(asyncio.BufferedProtocol):
    def __init__(self) -> None:
        self.conn = Connection(Role.CLIENT)
        self.pending: dict[int, tuple[float, ReplyCallback]] = {}  # rid -> (due, callback)
        self.transport: asyncio.Transport | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self.lost: Exception | None = None
        self.on_lost: Callable[[Exception], None] | None = None
        self._can_write = asyncio.Event()
        self._can_write.set()
        self.gone = asyncio.Event()  # connection_lost has run: the socket is closed

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self._sweep()

    def _sweep(self) -> None:
        """Fail the calls whose deadline has passed; re-arm while connected."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        for rid in [rid for rid, (due, _) in self.pending.items() if due <= now]:
            self.pending.pop(rid)[1](TimeoutError(f"store did not answer request {rid} in time"))
        if self.lost is None:
            self._watchdog = loop.call_later(WATCHDOG_PERIOD_S, self._sweep)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.conn.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        self.conn.buffer_updated(nbytes)
        self._deliver()

    def data_received(self, data: bytes) -> None:  # transports that hand over bytes
        self.conn.receive_data(data)
        self._deliver()

    def _deliver(self) -> None:
        conn, pending = self.conn, self.pending
        while True:
            try:
                event = conn.next_event()
            except RemoteProtocolError as exc:
                self._fail_all(ConnectionLost(f"store sent garbage: {exc}"))
                assert self.transport is not None
                self.transport.abort()
                return
            if event is NEED_DATA or event is CLOSED:
                return
            entry = pending.pop(event.request_id, None)  # type: ignore[union-attr]
            if entry is not None:
                entry[1](event)  # type: ignore[arg-type]

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    async def writable(self) -> None:
        await self._can_write.wait()

    def connection_lost(self, exc: Exception | None) -> None:
        self.gone.set()
        lost = ConnectionLost(f"connection to store lost: {exc or 'closed by peer'}")
        self._fail_all(lost)
        self._can_write.set()
        if self.on_lost is not None:
            self.on_lost(lost)

    def _fail_all(self, exc: Exception) -> None:
        self.lost = self.lost or exc
        if self._watchdog is not None:
            self._watchdog.cancel()
        pending, self.pending = self.pending, {}
        for _, callback in pending.values():
            callback(exc)


class StoreClient:
    """One authenticated, pipelined connection to one page store, bound to one area."""

    def __init__(self, protocol: _RpcProtocol, deadline: float, area: str) -> None:
        self._protocol = protocol
        self._ids = itertools.count(1)
        self.deadline = deadline
        self.area_seed = area_seed(area)  # every page's tag names the area it belongs to
        self.welcome: Welcome | None = None

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        area: str,
        token: str = "",
        deadline: float = DEFAULT_DEADLINE_S,
        tls: ssl.SSLContext | None = None,
    ) -> StoreClient:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(deadline):
            raw, protocol = await loop.create_connection(_RpcProtocol, host, port)
            if tls is not None:  # TLS as a second step: on failure the socket is ours to close
                try:
                    wrapped = await loop.start_tls(raw, protocol, tls, server_hostname=host)
                except (ssl.SSLError, ConnectionResetError) as exc:  # one line to act on
                    raw.abort()
                    why = handshake_failure(exc)
                    raise ConnectionLost(f"TLS with {host}:{port} failed: {why}") from None
                assert wrapped is not None
                protocol.transport = wrapped
            client = cls(protocol, deadline, area)
            try:
                reply = await client._call(Hello(client._next_id(), PROTOCOL_VERSION, area, token))
            except ConnectionLost as exc:
                client.abort()
                raise _hello_failed(f"{host}:{port}", exc, tls is not None) from None
            except BaseException:
                client.abort()
                raise
        assert isinstance(reply, Welcome)
        client.welcome = reply
        return client

    def on_lost(self, callback: Callable[[Exception], None]) -> None:
        """Call `callback` (on the loop) when the connection drops, for whatever reason."""
        self._protocol.on_lost = callback

    @property
    def connected(self) -> bool:
        return self._protocol.lost is None and self._protocol.transport is not None

    def _next_id(self) -> int:
        while True:
            rid = next(self._ids) & 0xFFFFFFFF
            if rid not in self._protocol.pending:
                return rid

    async def _call(self, request: Request, deadline: float | None = None) -> Reply:
        protocol = self._protocol
        if protocol.lost is not None:
            raise ConnectionLost(str(protocol.lost))
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()

        def resolve(reply: Reply | Exception) -> None:
            if future.done():
                return
            if isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(_detached(reply))

        rid = request.request_id
        try:
            async with asyncio.timeout(deadline if deadline is not None else self.deadline):
                await protocol.writable()
                if protocol.lost is not None:
                    raise ConnectionLost(str(protocol.lost))
                assert protocol.transport is not None
                protocol.pending[rid] = (math.inf, resolve)  # this call's own timeout rules
                protocol.transport.writelines(protocol.conn.send_parts(request))
                reply = await future
        finally:
            protocol.pending.pop(rid, None)
        failure = _failure(reply)
        if failure is not None:
            raise failure
        return reply

    def _start(
        self, rid: int, parts: Callable[[], Sequence[Buffer]], on_reply: ReplyCallback
    ) -> None:
        """Send the frame `parts()` cuts for request `rid` now; on_reply(reply or
        exception) runs later on the loop, exactly once."""
        protocol = self._protocol
        loop = asyncio.get_running_loop()
        if protocol.lost is not None:
            loop.call_soon(on_reply, ConnectionLost(str(protocol.lost)))
            return
        assert protocol.transport is not None
        frame = parts()
        protocol.pending[rid] = (loop.time() + self.deadline, on_reply)
        protocol.transport.writelines(frame)

    # -- the batch path ------------------------------------------------------
    def start_swap_out(
        self,
        runs: Sequence[range],
        pages: Sequence[Buffer],
        tags: array[int],
        generations: array[int],
        seals: Buffer | None,
        done: Callable[[Exception | None], None],
    ) -> None:
        """A SwapOut of `pages`, one payload per slot of `runs` in order (its length is
        its buffer's: PAGE_SIZE for a whole page), each tagged over the payload as it
        goes; written as they are: they must not change until done(None | error)
        runs."""
        conn, rid = self._protocol.conn, self._next_id()
        self._start(rid, lambda: conn.send_swap_out(rid, runs, generations, tags, seals, pages),
                    lambda reply: done(_failure(reply)))  # fmt: skip

    def start_swap_in(self, runs: Sequence[range], sealed: bool, done: PagesCallback) -> None:
        """A SwapIn; done(Pages, None) with its payloads as views valid during the call
        only (Pages.lengths, Pages.payload(i); not yet proven: the caller checks them),
        or done(None, error)."""
        rid = self._next_id()
        request = SwapIn(rid, tuple(runs), sealed)
        conn = self._protocol.conn

        def on_reply(reply: Reply | Exception) -> None:
            failure = _failure(reply)
            if failure is None and not isinstance(reply, Pages):
                failure = StoreError(errno.EIO, f"a {type(reply).__name__} answered SwapIn")
            done(reply if failure is None else None, failure)  # type: ignore[arg-type]

        self._start(rid, lambda: conn.send_parts(request), on_reply)

    # -- control, repair and tests -------------------------------------------
    async def swapfile(
        self, activate: bool, slots: int, area_id: int = 0, holder: str = "", force: bool = False
    ) -> None:
        """Activate (make, grow, or replace: server/claims.py) or release the area, as
        the life `area_id` held by `holder`; StoreError EEXIST names another holder."""
        await self._call(Swapfile(self._next_id(), activate, slots, area_id=area_id,
                                  holder=holder, force=force))  # fmt: skip

    async def fence(self, epoch: int) -> None:
        """Bind this connection to `epoch` and raise the area's floor to it; StoreError
        ESTALE when a newer agent fenced the area (this connection then changes
        nothing). Durable at a file store when it returns."""
        await self._call(Fence(self._next_id(), epoch))

    async def swap_out(
        self,
        slots: Sequence[int],
        data: Buffer | Sequence[Buffer],
        generations: Sequence[int] | None = None,
        seals: Buffer | None = None,
    ) -> None:
        """Store payloads written for generations[i] (default: each slot's first write):
        `data` is whole pages back to back, or one buffer per payload of any length."""
        gens = array("Q", list(generations) if generations is not None else [1] * len(slots))
        if isinstance(data, (bytes, bytearray, memoryview)):
            tags = tags_of(data, self.area_seed, slots, gens)
            await self._call(SwapOut(self._next_id(), slots, data, tags, gens, seals))
            return
        lengths = array("H", [len(payload) for payload in data])
        joined = b"".join(data)
        tags = tags_of_sized(joined, lengths, self.area_seed, slots, gens)
        await self._call(SwapOut(self._next_id(), slots, joined, tags, gens, seals, lengths))

    async def read_pages(self, slots: Sequence[int], sealed: bool = False) -> Pages:
        """The store's answer to a SwapIn, unproven, its buffers copied (repair and
        rebuild decide themselves which pages they trust)."""
        reply = await self._call(SwapIn(self._next_id(), slots, sealed))
        if not isinstance(reply, Pages) or len(reply.tags) != len(slots):
            raise StoreError(errno.EIO, "store returned the wrong number of pages")
        return reply  # detached when it arrived (_detached)

    async def swap_in(
        self,
        slots: Sequence[int],
        generations: Sequence[int] | None = None,
        current: Callable[[], array[int]] | None = None,
    ) -> bytes:
        """Fetch payloads proven end to end to be the slots' at `generations` (default
        1) or `current()`'s -- a wrong, damaged or stale one is StoreError EIO: back to
        back (whole pages: the pages; swap_in_payloads splits them)."""
        reply = await self.read_pages(slots)
        self._prove(reply, slots, generations, current)
        return bytes(reply.data)

    async def swap_in_payloads(
        self,
        slots: Sequence[int],
        generations: Sequence[int] | None = None,
        current: Callable[[], array[int]] | None = None,
    ) -> list[bytes]:
        """swap_in, one bytes per payload."""
        reply = await self.read_pages(slots)
        self._prove(reply, slots, generations, current)
        return [bytes(reply.payload(i)) for i in range(len(reply.tags))]

    def _prove(
        self,
        reply: Pages,
        slots: Sequence[int],
        generations: Sequence[int] | None,
        current: Callable[[], array[int]] | None,
    ) -> None:
        gens = list(generations) if generations is not None else [1] * len(slots)
        failure = prove_reply(self.area_seed, reply, slots, array("Q", gens), current)
        if failure is not None:
            raise failure

    async def inventory(self, first: int, count: int) -> tuple[array[int], array[int], array[int]]:
        """The slots of first..first+count-1 the store holds, their generations, and
        their payloads' lengths (PAGE_SIZE: a whole page)."""
        reply = await self._call(Inventory(self._next_id(), first, count))
        if not isinstance(reply, Held):
            raise StoreError(errno.EIO, f"a {type(reply).__name__} answered Inventory")
        return reply.slots, reply.generations, reply.lengths

    async def discard(self, ranges: Sequence[tuple[int, int]]) -> None:
        await self._call(Discard(self._next_id(), tuple(ranges)))

    async def flush(self) -> None:
        await self._call(Flush(self._next_id()))

    async def stats(self) -> dict[str, int]:
        reply = await self._call(Stats(self._next_id()))
        assert isinstance(reply, StatsReply)
        return reply.as_dict()

    def abort(self) -> None:
        if self._protocol.transport is not None:
            self._protocol.transport.abort()

    async def close(self) -> None:
        """Close, and wait (briefly) until the socket is: TLS says goodbye first."""
        protocol = self._protocol
        transport = protocol.transport
        if transport is not None and not transport.is_closing():
            transport.close()
        protocol._fail_all(ConnectionLost("client closed"))
        if transport is not None:
            try:
                await asyncio.wait_for(protocol.gone.wait(), CLOSE_WAIT_S)
            except TimeoutError:
                transport.abort()
        await asyncio.sleep(0)


# -- a thread's client ---------------------------------------------------------
class BlockingClient:
    """One request and its reply at a time, over a blocking socket (nbdkit threads)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.conn, self._ids = sock, Connection(Role.CLIENT), 0
        self.welcome: Welcome | None = None  # the store's answer to Hello

    @classmethod
    def open(
        cls,
        host: str,
        port: int,
        area: str,
        token: str,
        deadline: float,
        tls: ssl.SSLContext | None = None,
    ) -> BlockingClient:
        sock = socket.create_connection((host, port), timeout=deadline)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls is not None:
            sock = tls.wrap_socket(sock, server_hostname=host)
        client = cls(sock)
        try:
            reply = client.call(Hello(client.next_id(), PROTOCOL_VERSION, area, token), deadline)
        except ConnectionLost as exc:
            client.close()
            raise _hello_failed(f"{host}:{port}", exc, tls is not None) from None
        except BaseException:
            client.close()
            raise
        if not isinstance(reply, Welcome):
            client.close()
            failure = _failure(reply)
            raise failure if failure is not None else ConnectionLost(f"{host}:{port}: no Welcome")
        client.welcome = reply
        return client

    def fence(self, epoch: int, deadline: float) -> None:
        """StoreClient.fence on this connection: each connection fences on its own."""
        failure = _failure(self.call(Fence(self.next_id(), epoch), deadline))
        if failure is not None:
            raise failure

    def next_id(self) -> int:
        self._ids = (self._ids + 1) & 0xFFFFFFFF
        return self._ids

    def call(self, request: Request, deadline: float) -> Reply:
        """One request, its reply, within `deadline` seconds in all."""
        end = time.monotonic() + deadline
        self.sock.settimeout(deadline)
        self.send(self.conn.send_parts(request), deadline)
        return self.reply(end)

    def send(self, parts: Sequence[Buffer], deadline: float) -> None:
        """A frame given as buffers, in one sendmsg where the socket takes it (TLS has
        no sendmsg: joined there)."""
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
        and one that answered in time must not be late because another did not. Its
        pages are views into this connection's buffer, valid until the next call."""
        conn, sock = self.conn, self.sock
        while True:
            event = conn.next_event()
            if event is CLOSED:
                raise ConnectionLost("the store closed the connection")
            if event is not NEED_DATA:
                return cast(Reply, event)
            sock.settimeout(max(0.0, end - time.monotonic()))  # 0: only what is there
            try:
                got = sock.recv_into(conn.get_buffer())
            except (TimeoutError, BlockingIOError, ssl.SSLWantReadError):
                raise TimeoutError("the store did not answer in time") from None
            if got:
                conn.buffer_updated(got)
            else:
                conn.receive_data(b"")

    def close(self) -> None:
        self.sock.close()


def read_token(path: str | None) -> str:
    """The page stores' token: from a file, else $NETSWAP_TOKEN, else none."""
    if not path:
        return os.environ.get("NETSWAP_TOKEN", "")
    return read_secret(path)
