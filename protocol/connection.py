"""The sans-IO connection: bytes in, messages out; messages in, bytes out.

One Connection per side (Role.CLIENT or Role.SERVER), in the manner of h11:
`receive_data()` feeds bytes (b"" is end of stream), `next_event()` returns a
message, NEED_DATA or CLOSED, and `send()` turns a message into bytes. It
enforces who may send what, that a connection starts with a Hello answered by
a Welcome (in protocol 2's layout: codec.py), and that every reply answers
exactly one request in flight. After a RemoteProtocolError the connection is
dead: every later call raises again.

Receiving into a buffer of its own: the connection owns one bytearray, and a
reader fills it directly -- `get_buffer()` for socket.recv_into or asyncio's
BufferedProtocol, then `buffer_updated(n)` -- so no bytes object is made per
read and a batch's pages are copied once, by the kernel. The buffer starts
small (an idle or unauthenticated peer holds INITIAL bytes) and grows, once,
to fit the largest frame the peer announces plus a read's worth (at most
CAPACITY); it is never shrunk, so a busy connection does not reallocate. A message's `data`
and `seals` are views into that buffer: valid until the next call to
get_buffer(), receive_data() or next_event(); a caller copies what it keeps. A
frame header that announces more than `max_frame` (MAX_FRAME_SIZE; a store
lowers it to MAX_HELLO_FRAME until a peer has authenticated) fails at once.
"""

from __future__ import annotations

import enum
from array import array
from collections.abc import Callable, Sequence
from typing import TypeVar

from .codec import (
    HEADER_SIZE,
    LENGTH,
    decode,
    decode_handshake,
    encode,
    encode_handshake,
    encode_parts,
    frame_length,
    swap_out_parts,
)
from .errors import LocalProtocolError, RemoteProtocolError
from .limits import MAX_FRAME_SIZE
from .messages import Buffer, Failed, Hello, Message, Reply, Request, Welcome

_T = TypeVar("_T")

# Room for one read beyond a frame: 256 KiB is what asyncio and uvloop read per
# callback; a 1 MiB batch arrives in a few.
READ_ROOM = 256 * 1024
CAPACITY = HEADER_SIZE + MAX_FRAME_SIZE + READ_ROOM
# What a connection holds before it has seen a large frame: a Hello (1 KiB) and a
# little; 800 idle peers hold 3 MiB (tests/test_store_hardening.py).
INITIAL = 4096
# Below this much free room a read is not worth a call: move the unparsed tail up.
MIN_ROOM = 2048


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
        self._buf = bytearray(INITIAL)
        self._view = memoryview(self._buf)
        self._start = self._end = 0  # unparsed bytes are _buf[_start:_end]
        self.max_frame = MAX_FRAME_SIZE  # the largest frame body the peer may send now
        self.handshaken = False  # a Welcome went by: batches' layout from now on
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
        return self._end - self._start

    # -- receiving -------------------------------------------------------------
    def get_buffer(self) -> memoryview:
        """Free room to read into; then buffer_updated(n)."""
        start, end = self._start, self._end
        if start == end:
            self._start = self._end = start = end = 0
        size = len(self._buf)
        if size - end < MIN_ROOM or start > size // 2:  # keep the unparsed tail, in front
            self._buf[: end - start] = self._view[start:end]
            self._start, self._end = 0, end - start
        want = self._frame_wanted()
        if want > len(self._buf) or len(self._buf) - self._end < MIN_ROOM:
            self._grow(min(CAPACITY, max(want, self._end + MIN_ROOM) + READ_ROOM))
        return self._view[self._end :]

    def _frame_wanted(self) -> int:
        """Bytes the frame being received needs in all (0: its header is not in yet, or
        announces more than allowed: next_event() will say so)."""
        if self._end - self._start < HEADER_SIZE:
            return 0
        (length,) = LENGTH.unpack_from(self._buf, self._start)
        return HEADER_SIZE + length if length <= self.max_frame else 0

    def _grow(self, size: int) -> None:
        """A new, larger buffer holding the unparsed bytes (views already handed out
        keep the old one alive: they stay valid)."""
        if size <= len(self._buf):
            return
        start, end = self._start, self._end
        bigger = bytearray(size)
        bigger[: end - start] = self._view[start:end]
        self._buf, self._view = bigger, memoryview(bigger)
        self._start, self._end = 0, end - start

    def buffer_updated(self, nbytes: int) -> None:
        if not 0 <= nbytes <= len(self._buf) - self._end:
            raise LocalProtocolError(f"buffer_updated({nbytes}) beyond the buffer")
        if self._eof and nbytes:
            raise LocalProtocolError("data after end of stream")
        self._end += nbytes

    def receive_data(self, data: Buffer) -> None:
        """Bytes read by the caller (b"": end of stream). At most the buffer's room:
        a reader drains next_event() to NEED_DATA between reads, and then there is
        always room for one more of READ_ROOM bytes."""
        if not data:
            self._eof = True  # repeating end of stream is harmless
            return
        if self._eof:
            raise LocalProtocolError("receive_data() after end of stream")
        room = self.get_buffer()
        if len(data) > len(room):
            self._grow(min(CAPACITY, self._end + len(data)))
            room = self._view[self._end :]
        if len(data) > len(room):
            raise LocalProtocolError(f"{len(data)} bytes exceed the {len(room)} free: "
                                     "call next_event() until NEED_DATA first")  # fmt: skip
        room[: len(data)] = data
        self._end += len(data)

    def next_event(self) -> Event:
        if self._error is not None:
            raise self._error
        try:
            return self._next_event()
        except RemoteProtocolError as exc:
            self._error = exc
            raise

    def _next_event(self) -> Event:
        start, end = self._start, self._end
        if end - start >= HEADER_SIZE:
            length = frame_length(self._buf, self.max_frame, start)
            stop = start + HEADER_SIZE + length
            if end >= stop:
                self._start = stop
                body = self._view[start + HEADER_SIZE : stop]
                message = decode(body) if self.handshaken else self._handshake(body)
                self._track_received(message)
                return message
        if not self._eof:
            return NEED_DATA
        if end > start:
            raise RemoteProtocolError(f"connection closed inside a frame ({end - start} bytes)")
        return CLOSED

    def _handshake(self, body: memoryview) -> Message:
        message = decode_handshake(body)
        if isinstance(message, Welcome):
            self.handshaken = True
        return message

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

    # -- sending ---------------------------------------------------------------
    def send(self, message: Message) -> bytes:
        """The message's frame, as one buffer."""
        frame = self._sent(message, encode)
        return frame

    def send_parts(self, message: Message) -> list[Buffer]:
        """The message's frame as buffers to write in order: a batch's pages are not
        copied into it (for transport.writelines or socket.sendmsg)."""
        frame = self._sent(message, encode_parts)
        return [frame] if isinstance(frame, bytes) else frame

    def send_swap_out(
        self,
        request_id: int,
        runs: Sequence[range],
        generations: array[int],
        tags: array[int],
        seals: Buffer | None,
        pages: Sequence[Buffer],
    ) -> list[Buffer]:
        """A client's SwapOut straight from its payload buffers, one per slot of `runs`
        (codec.swap_out_parts: each buffer's length is its payload's; all PAGE_SIZE,
        the frame carries no lengths): the frame as buffers to write in order; the
        payloads are not copied."""
        if self.role is not Role.CLIENT or not self.handshaken:
            raise LocalProtocolError("SwapOut is a client's, after the handshake")
        if request_id in self._in_flight:
            raise LocalProtocolError(f"request id {request_id} is already in flight")
        parts = swap_out_parts(request_id, runs, generations, tags, seals, pages)
        self._in_flight.add(request_id)
        return parts

    def _sent(self, message: Message, encoder: Callable[[Message], _T]) -> _T | bytes:
        """The message's frame by `encoder`; the handshake's messages (until a Welcome
        has gone by) in protocol 2's layout."""
        if not isinstance(message, self._sends):
            raise LocalProtocolError(f"a {self.role.value} cannot send {type(message).__name__}")
        if not self.handshaken:
            if not isinstance(message, (Hello, Welcome, Failed)):
                raise LocalProtocolError(f"{type(message).__name__} before the handshake")
            return self._sent_handshake(message)
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

    def _sent_handshake(self, message: Hello | Welcome | Failed) -> bytes:
        rid = message.request_id
        if self.role is Role.CLIENT:
            if rid in self._in_flight:
                raise LocalProtocolError(f"request id {rid} is already in flight")
            self._in_flight.add(rid)
        elif rid in self._in_flight:
            self._in_flight.discard(rid)
        else:
            raise LocalProtocolError(f"no request {rid} to reply to")
        if isinstance(message, Welcome):
            self.handshaken = True
        return encode_handshake(message)
