"""asyncio.BufferedProtocol shell over the sans-IO Connection, for the page store.

The transport reads straight into the connection's own buffer (get_buffer /
buffer_updated), so a batch's pages arrive with one copy, the kernel's, and a
SwapOut's pages go from that buffer into the arena.

Requests are answered synchronously as they are parsed (backend calls do not
await), so per-connection in-flight work is bounded by one read chunk. A
request whose work comes in slices (a Discard, releasing an area) runs one
slice per loop iteration; meanwhile this connection reads and parses nothing
more, so its later requests still see its effect, and other clients run. Flow
control runs both ways: when the socket's write buffer passes its high-water
mark we stop reading from that client until it drains, so a client that
pipelines without reading replies cannot make the store buffer without bound.
A protocol violation closes only the offending connection.

The bounds of guard.py are applied here: connections past the limit are
closed at once; until its Hello is answered a peer may send only Hello-sized
frames, for at most the handshake deadline; a failed Hello is answered after
the source's throttle delay, and the connection closed; bytes of unfinished
frames count against one budget for all peers, and a frame must finish
within its deadline. Warnings go through one rate-limited log.
"""

from __future__ import annotations

import asyncio
import logging
from typing import cast

from netswap.protocol import (
    CLOSED,
    MAX_FRAME_SIZE,
    MAX_HELLO_FRAME,
    NEED_DATA,
    Connection,
    Failed,
    Hello,
    RemoteProtocolError,
    Request,
    Role,
)

from .guard import PartialBudget, RateLimitedLog
from .service import Session, Slices, StoreService

log = logging.getLogger("netswap.store")
warn = RateLimitedLog(log)

# Replies queued in the kernel+transport before we stop reading: four full batches.
WRITE_HIGH_WATER = 4 * 1024 * 1024
WRITE_LOW_WATER = 1024 * 1024


class StoreProtocol(asyncio.BufferedProtocol):
    def __init__(self, service: StoreService, connections: set[StoreProtocol]) -> None:
        self._service = service
        self._connections = connections
        self._conn = Connection(Role.SERVER)
        self._session: Session = service.session()
        self._transport: asyncio.Transport | None = None
        self._peer = "?"
        self._writing_paused = False
        self._slices: Slices | None = None  # a sliced request under way
        self._partial = 0  # bytes of this peer's unfinished frame, in the shared budget
        self._tls_hint = ""  # set when the peer opened with a TLS record
        self._budget_paused = False
        self._frames = self._frames_armed = 0  # requests parsed; and when the timer was set
        self._timer: asyncio.TimerHandle | None = None  # handshake, then frame deadline
        self._conn.max_frame = MAX_HELLO_FRAME  # until the peer has authenticated
        self._room = memoryview(b"")
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        transport = self._transport
        peer = transport.get_extra_info("peername")
        self._peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        self._source = str(peer[0]) if peer else "?"
        limits = self._service.limits
        if len(self._connections) >= limits.max_connections:
            self._service.counters["connections_refused"] += 1
            warn.warning("refused", "refusing %s: %d connections open, the --max-connections "
                         "limit", self._peer, len(self._connections))  # fmt: skip
            transport.abort()
            return
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)
        self._connections.add(self)
        self._arm(limits.handshake_s, "handshake_timeouts", "no Hello within the handshake")

    def _arm(self, seconds: float, counter: str, why: str) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(seconds, self._expired, counter, why)

    def _expired(self, counter: str, why: str) -> None:
        self._timer = None
        self._service.counters[counter] += 1
        warn.warning(counter, "closing %s: %s", self._peer, why)
        if self._transport is not None:
            self._transport.abort()

    def get_buffer(self, sizehint: int) -> memoryview:
        self._room = self._conn.get_buffer()
        return self._room

    def buffer_updated(self, nbytes: int) -> None:
        if not self._frames and not self._conn.buffered and bytes(self._room[:2]) == b"\x16\x03":
            self._tls_hint = " (a TLS ClientHello: does this store need --tls-cert?)"
        self._conn.buffer_updated(nbytes)
        self._drain_events()

    def data_received(self, data: bytes) -> None:
        """For transports that hand over bytes (TLS, through tls.TlsAcceptor): the
        same as a read."""
        if not self._frames and not self._conn.buffered and data[:2] == b"\x16\x03":
            self._tls_hint = " (a TLS ClientHello: does this store need --tls-cert?)"
        self._conn.receive_data(data)
        self._drain_events()

    def _account(self) -> None:
        """Charge this peer's unfinished frame to the shared budget; pause when over."""
        budget, transport = self._service.partial, self._transport
        now = self._conn.buffered
        budget.held += now - self._partial
        shrank, self._partial = now < self._partial, now
        if self._conn.max_frame == MAX_FRAME_SIZE:  # authenticated: frame deadlines
            if now and (self._timer is None or self._frames != self._frames_armed):
                # A frame has begun since the last one ended: it must end in time.
                self._frames_armed = self._frames
                self._arm(self._service.limits.frame_s, "frame_timeouts", "a frame stalled")
            elif not now and self._timer is not None:
                self._timer.cancel()
                self._timer = None
        if now and budget.over() and transport is not None and not self._budget_paused:
            self._budget_paused = True
            budget.waiting[self] = None
            transport.pause_reading()
        if shrank:
            _resume_waiting(budget)

    def eof_received(self) -> bool | None:
        self._conn.receive_data(b"")
        self._drain_events()
        return None

    def _drain_events(self) -> None:
        self._handle_events()
        self._account()

    def _handle_events(self) -> None:
        transport = self._transport
        assert transport is not None
        while not transport.is_closing() and not self._writing_paused and self._slices is None:
            try:
                event = self._conn.next_event()
            except RemoteProtocolError as exc:
                self._service.counters["protocol_errors"] += 1
                warn.warning("protocol", "closing %s: protocol error: %s%s", self._peer, exc,
                             self._tls_hint)  # fmt: skip
                transport.abort()
                return
            if event is NEED_DATA:
                return
            if event is CLOSED:
                transport.close()
                return
            assert isinstance(event, Request)
            self._frames += 1
            reply = self._session.handle(event)
            if isinstance(event, Hello) and self._conn.max_frame != MAX_FRAME_SIZE:
                if isinstance(reply, Failed):  # a first Hello refused: throttle, then close
                    self._refuse(reply)
                    return
                self._conn.max_frame = MAX_FRAME_SIZE
                if self._timer is not None:
                    self._timer.cancel()
                    self._timer = None
            if isinstance(reply, Slices):
                self._slices = reply
                transport.pause_reading()
                self._next_slice()
                return
            transport.writelines(self._conn.send_parts(reply))  # a batch's pages: no copy

    def _refuse(self, reply: Failed) -> None:
        """A failed Hello: answer after the source's throttle delay, then close."""
        transport = self._transport
        assert transport is not None
        transport.pause_reading()
        delay = self._service.throttle.failed(self._source)
        warn.warning("hello", "refusing %s: %s (answered after %.1fs)", self._peer,
                     reply.reason, delay)  # fmt: skip
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(delay, self._answer_and_close, reply)

    def _answer_and_close(self, reply: Failed) -> None:
        self._timer = None
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.write(self._conn.send(reply))
            transport.close()

    def _next_slice(self) -> None:
        slices, transport = self._slices, self._transport
        assert slices is not None and transport is not None
        done = slices.run_slice()
        if done is not True:
            # The work goes on even if the peer left: a half-released area would leak.
            if done is False:
                asyncio.get_running_loop().call_soon(self._next_slice)
            else:  # an fsync in the backend's thread: the loop serves others meanwhile
                asyncio.wrap_future(done).add_done_callback(lambda _: self._next_slice())
            return
        self._slices = None
        if transport.is_closing():
            return
        transport.write(self._conn.send(slices.reply))
        self._resume_reading()
        self._drain_events()

    def pause_writing(self) -> None:
        # Stop answering (requests stay parsed-later in the sans-IO buffer, at most
        # one read's worth) and stop reading until the client drains our replies.
        self._writing_paused = True
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._transport is not None and not self._transport.is_closing():
            self._drain_events()
            self._resume_reading()

    def _resume_reading(self) -> None:
        """Read again unless something still holds reading off: the peer not reading
        our replies, a sliced request under way, or the shared budget."""
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if not (self._writing_paused or self._slices is not None or self._budget_paused):
            transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self._connections.discard(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        budget = self._service.partial
        budget.held -= self._partial
        self._partial = 0
        budget.waiting.pop(self, None)
        _resume_waiting(budget)
        if not self.closed.done():
            self.closed.set_result(None)

    def shutdown(self) -> None:
        """Graceful close: replies already written still flush before the FIN."""
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()


def _resume_waiting(budget: PartialBudget) -> None:
    """Let paused peers read again, first paused first, while the budget allows."""
    while budget.waiting and not budget.over():
        peer = cast(StoreProtocol, next(iter(budget.waiting)))
        del budget.waiting[peer]
        peer._budget_paused = False
        peer._resume_reading()
