"""The sans-IO connection: bytes in, messages out; messages in, bytes out.

One Connection per side (Role.CLIENT or Role.SERVER), in the manner of h11:
`receive_data()` feeds bytes (b"" is end of stream), `next_event()` returns a
message, NEED_DATA or CLOSED, and `send()` turns a message into bytes. It
enforces who may send what and that every reply answers exactly one request
in flight. At most one partial frame is buffered beyond what next_event()
has not yet been asked for, and a frame header that announces more than
`max_frame` (MAX_FRAME_SIZE; a store lowers it to MAX_HELLO_FRAME until a
peer has authenticated) fails at once. After a RemoteProtocolError the connection is
dead: every later call raises again.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from typing import TypeVar

from .codec import HEADER_SIZE, decode, encode, encode_parts, frame_length, swap_out_parts
from .errors import LocalProtocolError, RemoteProtocolError
from .limits import MAX_FRAME_SIZE
from .messages import Message, Reply, Request

_T = TypeVar("_T")


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


class _Sentinel(enum.Enum):
    NEED_DATA = "NEED_DATA"
    CLOSED = "CLOSED"


NEED_DATA = _Sentinel.NEED_DATA
CLOSED = _Sentinel.CLOSED
Event = Message | _Sentinel


class Connection:
    def __init__(self, role: Role) -> None:
        self.role = role
        self._buffer = bytearray()
        self.max_frame = MAX_FRAME_SIZE  # the largest frame body the peer may send now
        self._eof = False
        self._error: RemoteProtocolError | None = None
        # Request ids awaiting a reply. On the client: ours; on the server: theirs.
        self._in_flight: set[int] = set()
        self._sends: type[Message] = Request if role is Role.CLIENT else Reply
        self._receives: type[Message] = Reply if role is Role.CLIENT else Request

    @property
    def in_flight(self) -> int:
        """Requests sent (client) or received (server) that have no reply yet."""
        return len(self._in_flight)

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            self._eof = True  # repeating end of stream is harmless
        elif self._eof:
            raise LocalProtocolError("receive_data() after end of stream")
        else:
            self._buffer += data

    def next_event(self) -> Event:
        if self._error is not None:
            raise self._error
        try:
            return self._next_event()
        except RemoteProtocolError as exc:
            self._error = exc
            raise

    def _next_event(self) -> Event:
        buf = self._buffer
        if len(buf) >= HEADER_SIZE:
            length = frame_length(buf, self.max_frame)
            end = HEADER_SIZE + length
            if len(buf) >= end:
                message = decode(memoryview(buf)[HEADER_SIZE:end])
                del buf[:end]
                self._track_received(message)
                return message
        if not self._eof:
            return NEED_DATA
        if buf:
            raise RemoteProtocolError(f"connection closed inside a frame ({len(buf)} bytes)")
        return CLOSED

    def _track_received(self, message: Message) -> None:
        if not isinstance(message, self._receives):
            raise RemoteProtocolError(
                f"a {self.role.value} cannot receive {type(message).__name__}"
            )
        rid = message.request_id
        if self.role is Role.SERVER:
            if rid in self._in_flight:
                raise RemoteProtocolError(f"request id {rid} is already in flight")
            self._in_flight.add(rid)
        else:
            if rid not in self._in_flight:
                raise RemoteProtocolError(f"reply to unknown request id {rid}")
            self._in_flight.discard(rid)

    def send(self, message: Message) -> bytes:
        """The message's frame, as one buffer."""
        return self._sent(message, encode)

    def send_parts(self, message: Message) -> list[bytes | memoryview]:
        """The message's frame as buffers to write in order: a batch's pages are not
        copied into it (for transport.writelines or socket.sendmsg)."""
        return self._sent(message, encode_parts)

    def send_swap_out(
        self,
        request_id: int,
        slots: Sequence[int],
        pages: Sequence[bytes | memoryview],
        tags: Sequence[int],
        generations: bytes,
    ) -> list[bytes | memoryview]:
        """A client's SwapOut straight from its page buffers (codec.swap_out_parts):
        the frame as buffers to write in order; the pages are not copied."""
        if self.role is not Role.CLIENT:
            raise LocalProtocolError("a server cannot send SwapOut")
        if request_id in self._in_flight:
            raise LocalProtocolError(f"request id {request_id} is already in flight")
        parts = swap_out_parts(request_id, slots, pages, tags, generations)
        self._in_flight.add(request_id)
        return parts

    def _sent(self, message: Message, encoder: Callable[[Message], _T]) -> _T:
        if not isinstance(message, self._sends):
            raise LocalProtocolError(f"a {self.role.value} cannot send {type(message).__name__}")
        rid = message.request_id
        if self.role is Role.CLIENT:
            if rid in self._in_flight:
                raise LocalProtocolError(f"request id {rid} is already in flight")
            data = encoder(message)
            self._in_flight.add(rid)
        else:
            if rid not in self._in_flight:
                raise LocalProtocolError(f"no request {rid} to reply to")
            data = encoder(message)
            self._in_flight.discard(rid)
        return data
