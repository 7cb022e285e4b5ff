"""asyncio.Protocol shell over the sans-IO Connection, for the page store.

Requests are answered synchronously as they are parsed (backend calls do not
await), so per-connection in-flight work is bounded by one read chunk. A
request whose work comes in slices (a Discard, releasing an area) runs one
slice per loop iteration; meanwhile this connection reads and parses nothing
more, so its later requests still see its effect, and other clients run. Flow
control runs both ways: when the socket's write buffer passes its high-water
mark we stop reading from that client until it drains, so a client that
pipelines without reading replies cannot make the store buffer without bound.
A protocol violation closes only the offending connection.
"""

from __future__ import annotations

import asyncio
import logging
from typing import cast

from netswap.protocol import CLOSED, NEED_DATA, Connection, RemoteProtocolError, Request, Role

from .service import Session, Slices, StoreService

log = logging.getLogger("netswap.store")

# Replies queued in the kernel+transport before we stop reading: four full batches.
WRITE_HIGH_WATER = 4 * 1024 * 1024
WRITE_LOW_WATER = 1024 * 1024


class StoreProtocol(asyncio.Protocol):
    def __init__(self, service: StoreService, connections: set[StoreProtocol]) -> None:
        self._service = service
        self._connections = connections
        self._conn = Connection(Role.SERVER)
        self._session: Session = service.session()
        self._transport: asyncio.Transport | None = None
        self._peer = "?"
        self._writing_paused = False
        self._slices: Slices | None = None  # a sliced request under way
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        transport = self._transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)
        peer = transport.get_extra_info("peername")
        self._peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        self._connections.add(self)

    def data_received(self, data: bytes) -> None:
        self._conn.receive_data(data)
        self._drain_events()

    def eof_received(self) -> bool | None:
        self._conn.receive_data(b"")
        self._drain_events()
        return None

    def _drain_events(self) -> None:
        transport = self._transport
        assert transport is not None
        while not transport.is_closing() and not self._writing_paused and self._slices is None:
            try:
                event = self._conn.next_event()
            except RemoteProtocolError as exc:
                self._service.counters["protocol_errors"] += 1
                log.warning("closing %s: protocol error: %s", self._peer, exc)
                transport.abort()
                return
            if event is NEED_DATA:
                return
            if event is CLOSED:
                transport.close()
                return
            assert isinstance(event, Request)
            reply = self._session.handle(event)
            if isinstance(reply, Slices):
                self._slices = reply
                transport.pause_reading()
                self._next_slice()
                return
            transport.write(self._conn.send(reply))

    def _next_slice(self) -> None:
        slices, transport = self._slices, self._transport
        assert slices is not None and transport is not None
        if not slices.run_slice():
            # The work goes on even if the peer left: a half-released area would leak.
            asyncio.get_running_loop().call_soon(self._next_slice)
            return
        self._slices = None
        if transport.is_closing():
            return
        transport.write(self._conn.send(slices.reply))
        if not self._writing_paused:
            transport.resume_reading()
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
            if not self._writing_paused and self._slices is None:
                self._transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self._connections.discard(self)
        if not self.closed.done():
            self.closed.set_result(None)

    def shutdown(self) -> None:
        """Graceful close: replies already written still flush before the FIN."""
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()
