"""The loop's StoreClient against a fake transport (uvicorn's MockTransport manner):
the bytes a store would send are fed straight into its protocol, so a test
chooses exactly which frames arrive within one loop tick."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from netswap.client.rpc import StoreClient, _RpcProtocol
from netswap.protocol import (
    PAGE_SIZE,
    PROTOCOL_VERSION,
    Connection,
    Hello,
    Pages,
    Role,
    SwapIn,
    Welcome,
    tags_of,
)
from netswap.protocol.messages import Buffer


class FakeTransport:
    """What the client writes, kept for the test's store side to read."""

    def __init__(self) -> None:
        self.written: list[bytes] = []

    def writelines(self, parts: Sequence[Buffer]) -> None:
        self.written.append(b"".join(bytes(p) for p in parts))

    def is_closing(self) -> bool:
        return False

    def abort(self) -> None:
        pass


def feed(protocol: _RpcProtocol, frame: bytes) -> None:
    """The frame arrives in reads as large as the protocol's buffer takes, as a
    BufferedProtocol transport hands them over (its buffer grows once it sees a
    frame's header)."""
    at = 0
    while at < len(frame):
        room = protocol.get_buffer(len(frame) - at)
        n = min(len(room), len(frame) - at)
        room[:n] = frame[at : at + n]
        protocol.buffer_updated(n)
        at += n


async def connected() -> tuple[StoreClient, _RpcProtocol, FakeTransport, Connection]:
    protocol, transport, store = _RpcProtocol(), FakeTransport(), Connection(Role.SERVER)
    protocol.connection_made(transport)  # type: ignore[arg-type]
    client = StoreClient(protocol, 5.0, "area")
    hello = asyncio.create_task(client._call(Hello(1, PROTOCOL_VERSION, "area", "")))
    await asyncio.sleep(0)
    store.receive_data(transport.written.pop())
    assert isinstance(store.next_event(), Hello)
    feed(protocol, store.send(Welcome(1, PROTOCOL_VERSION, 64, 1 << 20)))
    assert isinstance(await hello, Welcome)
    return client, protocol, transport, store


async def test_a_page_read_by_an_awaiting_caller_survives_the_next_reply_in_one_tick() -> None:
    """Pages are views into the connection's buffer; a coroutine that awaits read_pages
    resumes a tick later, after the next read may have reused that buffer. Seen in
    the soak: a resync's pages failed their tags and the slab never came back."""
    client, protocol, transport, store = await connected()
    first = asyncio.create_task(client.read_pages([5]))
    second = asyncio.create_task(client.read_pages([9]))
    await asyncio.sleep(0)
    for frame in transport.written:
        store.receive_data(frame)
    requests = [store.next_event(), store.next_event()]
    assert all(isinstance(r, SwapIn) for r in requests)
    pages = {5: b"\x05" * PAGE_SIZE, 9: b"\x09" * PAGE_SIZE}
    for request, slot in zip(requests, (5, 9), strict=True):
        tags = tags_of(pages[slot], client.area_seed, [slot], [1])
        reply = Pages(request.request_id, pages[slot], tags, [1])  # type: ignore[union-attr]
        feed(protocol, store.send(reply))  # both before either caller runs again
    assert bytes((await first).data) == pages[5]
    assert bytes((await second).data) == pages[9]
    protocol.connection_lost(None)
