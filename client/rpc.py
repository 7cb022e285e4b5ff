"""Pipelined asyncio client for a page store (asyncpg-style thin shell).

Each request registers a callback under its request id; replies may come back
in any order. Two ways in: `await client.swap_out(...)` and friends (control
and resync paths: one future, one deadline for the whole call, writers wait
while the transport is paused), and `start_swap_out` / `start_swap_in`, the
batch path, which send at once and call back on the loop -- no task, future or
timer per batch, because on the swap path those cost as much as the RPC. A
watchdog sweeps the batch calls every WATCHDOG_PERIOD_S and fails those past
their deadline with TimeoutError (late replies are dropped). The batch path
does not wait on pause_writing: its caller bounds what can be queued (links
keep at most MAX_INFLIGHT batches per store on the wire). When the connection
drops, every pending call fails with ConnectionLost.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import math
import os
import ssl
from collections.abc import Callable, Sequence
from typing import cast

from netswap.protocol import (
    CLOSED,
    NEED_DATA,
    PAGE_SIZE,
    PROTOCOL_VERSION,
    Connection,
    Discard,
    Failed,
    Flush,
    Hello,
    Ok,
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
    batch_tags,
    page_tag,
)
from netswap.server.tls import handshake_failure
from netswap.server.units import read_secret

DEFAULT_DEADLINE_S = 10.0
# A TLS close exchanges close_notify first; a store that does not answer in this
# long is cut off (a plain socket closes at once).
CLOSE_WAIT_S = 1.0
# How late a batch call's timeout may fire: deadlines are seconds, so a quarter
# second of slack is noise, and one sweep costs a scan of a handful of calls.
WATCHDOG_PERIOD_S = 0.25

ReplyCallback = Callable[["Reply | Exception"], None]


class ConnectionLost(ConnectionError):
    """The store connection closed with this request still pending."""


class _RpcProtocol(asyncio.Protocol):
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

    def data_received(self, data: bytes) -> None:
        self.conn.receive_data(data)
        while True:
            try:
                event = self.conn.next_event()
            except RemoteProtocolError as exc:
                self._fail_all(ConnectionLost(f"store sent garbage: {exc}"))
                assert self.transport is not None
                self.transport.abort()
                return
            if event is NEED_DATA or event is CLOSED:
                return
            assert isinstance(event, Reply)
            entry = self.pending.pop(event.request_id, None)
            if entry is not None:
                entry[1](event)

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
    """One authenticated connection to one page store, bound to one area."""

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
                hint = "" if tls else " (a TLS store? give store-tls-ca)"
                raise ConnectionLost(f"{exc}, before the store answered Hello{hint}") from None
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
                future.set_result(reply)

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

    def _start(self, request: Request, on_reply: ReplyCallback) -> None:
        """Send now; on_reply(reply or exception) runs later on the loop, exactly once."""
        conn = self._protocol.conn
        self._start_frame(request.request_id, lambda: conn.send_parts(request), on_reply)

    def _start_frame(
        self, rid: int, frame: Callable[[], Sequence[bytes | memoryview]], on_reply: ReplyCallback
    ) -> None:
        """_start for a frame already cut into buffers by `frame()` (request `rid`)."""
        protocol = self._protocol
        loop = asyncio.get_running_loop()
        if protocol.lost is not None:
            loop.call_soon(on_reply, ConnectionLost(str(protocol.lost)))
            return
        assert protocol.transport is not None
        parts = frame()
        protocol.pending[rid] = (loop.time() + self.deadline, on_reply)
        protocol.transport.writelines(parts)

    def start_swap_out(
        self,
        slots: Sequence[int],
        pages: bytes | Sequence[bytes | memoryview],
        tags: Sequence[int],
        generations: bytes,
        done: Callable[[Exception | None], None],
    ) -> None:
        """The batch path's SwapOut: done(None), done(StoreError) or done(transport error).

        `pages`: the batch's bytes, or buffers that make it up in order (the agent's
        reserve views), written as they are: they must not change until done runs,
        which is after the transport sent them or dropped them with the connection."""
        conn, rid = self._protocol.conn, self._next_id()
        buffers = [pages] if isinstance(pages, bytes) else pages
        self._start_frame(rid, lambda: conn.send_swap_out(rid, slots, buffers, tags, generations),
                          lambda reply: done(_failure(reply)))  # fmt: skip

    def start_swap_in(
        self,
        slots: Sequence[int],
        generations: bytes,
        done: Callable[[bytes, Exception | None], None],
        current: Callable[[], bytes] | None = None,
    ) -> None:
        """The batch path's SwapIn: done(pages, None) once every page is proven to be
        its slot's at the generation asked for (or, when a write raced the read, at
        `current()`'s), else done(b"", error)."""
        slots = tuple(slots)

        seed = self.area_seed

        def on_reply(reply: Reply | Exception) -> None:
            failure = _failure(reply) or check_pages(seed, reply, slots, generations, current)
            done(b"" if failure is not None else cast(Pages, reply).data, failure)

        self._start(SwapIn(self._next_id(), slots), on_reply)

    async def swapfile(self, activate: bool, pages: int) -> None:
        await self._call(Swapfile(self._next_id(), activate, pages, PAGE_SIZE))

    async def swap_out(
        self, slots: Sequence[int], data: bytes, generations: bytes | None = None
    ) -> None:
        """Store pages written for generations[i] (default: each slot's first write)."""
        gens = generations if generations is not None else bytes([1]) * len(slots)
        tags = batch_tags(data, self.area_seed, slots, gens)
        reply = await self._call(SwapOut(self._next_id(), tuple(slots), data, tags, gens))
        assert isinstance(reply, Ok)

    async def swap_in(
        self,
        slots: Sequence[int],
        generations: bytes | None = None,
        current: Callable[[], bytes] | None = None,
    ) -> bytes:
        """Fetch pages, proven end to end to be the slots' at `generations` (default 1)
        or `current()`'s -- a wrong, damaged or stale page is StoreError EIO."""
        gens = generations if generations is not None else bytes([1]) * len(slots)
        reply = await self._call(SwapIn(self._next_id(), tuple(slots)))
        failure = check_pages(self.area_seed, reply, tuple(slots), gens, current)
        if failure is not None:
            raise failure
        assert isinstance(reply, Pages)
        return reply.data

    async def swap_in_unproven(
        self, slots: Sequence[int], generations: bytes
    ) -> tuple[bytes, list[int]]:
        """Fetch pages, and the indexes of those not proven to be the slots' at
        `generations`: a resync skips those, as a write may be on its way to them."""
        slots = tuple(slots)
        reply = await self._call(SwapIn(self._next_id(), slots))
        if not isinstance(reply, Pages) or len(reply.tags) != len(slots):
            raise StoreError(errno.EIO, "store returned the wrong number of pages")
        computed = batch_tags(reply.data, self.area_seed, slots, generations)
        return reply.data, [i for i, tag in enumerate(reply.tags) if computed[i] != tag]

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


def check_pages(
    seed: int,
    reply: Reply | Exception,
    slots: tuple[int, ...],
    generations: bytes,
    current: Callable[[], bytes] | None,
) -> StoreError | None:
    """A SwapIn answer must be one page per slot, each the slot's own page at the
    generation the caller last wrote: its tag, recomputed here, must match. A
    write that raced the read (NBD leaves such a read's result to either) moved
    the generation on; `current` gives the one now, which a page may match."""
    if not isinstance(reply, Pages) or len(reply.tags) != len(slots):
        return StoreError(errno.EIO, "store returned the wrong number of pages")
    tags = reply.tags
    computed = batch_tags(reply.data, seed, slots, generations)
    if computed == tags:
        return None
    now = current() if current is not None else generations
    view = memoryview(reply.data)
    for i, slot in enumerate(slots):
        page = view[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]
        if computed[i] != tags[i] and page_tag(page, seed, slot, now[i]) != tags[i]:
            return StoreError(
                errno.EIO, f"slot {slot}: not its own page at generation {generations[i]}"
            )
    return None


def _failure(reply: Reply | Exception) -> Exception | None:
    """What a reply says went wrong: the transport's exception, a store's Failed, or None."""
    if isinstance(reply, Exception):
        return reply
    if isinstance(reply, Failed):
        return StoreError(reply.errno, reply.reason)
    return None


def read_token(path: str | None) -> str:
    """The page stores' token: from a file, else $NETSWAP_TOKEN, else none."""
    if not path:
        return os.environ.get("NETSWAP_TOKEN", "")
    return read_secret(path)
