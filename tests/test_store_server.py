"""The page-store server with real sockets on 127.0.0.1 and the real RPC client."""

from __future__ import annotations

import asyncio
import errno
import random
import struct
import time
from array import array
from collections.abc import Callable

import pytest
from netswap.client.rpc import BlockingClient, ConnectionLost, StoreClient
from netswap.protocol import (
    NEED_DATA,
    NEVER_WRITTEN,
    PAGE_SIZE,
    PROTOCOL_VERSION,
    Connection,
    RemoteProtocolError,
    Role,
    StoreError,
    area_seed,
    encode,
    page_tag,
    tags_of,
)
from netswap.protocol.messages import Flush, Hello, Pages, Request, SwapIn, Welcome
from netswap.server.app import StoreServer


async def connect(server: StoreServer, area: str = "a", token: str = "") -> StoreClient:
    return await StoreClient.connect("127.0.0.1", server.port, area, token, deadline=5)


async def test_concurrent_clients_store_thousands_of_random_pages(store: StoreServer) -> None:
    async def worker(n: int) -> None:
        rng = random.Random(n)
        client = await connect(store, f"host{n}")
        await client.swapfile(True, 1024)
        truth: dict[int, bytes] = {}
        writes: dict[int, int] = {}  # each rewrite newer, as an agent's: the store keeps it
        for _ in range(60):
            slots = rng.sample(range(1024), rng.randint(1, 32))
            data = rng.randbytes(len(slots) * PAGE_SIZE)
            for s in slots:
                writes[s] = writes.get(s, 0) + 1
            await client.swap_out(slots, data, [writes[s] for s in slots])
            for i, s in enumerate(slots):
                truth[s] = data[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]
        slots = sorted(truth)
        for i in range(0, len(slots), 64):
            chunk = slots[i : i + 64]
            got = await client.swap_in(chunk, [writes[s] for s in chunk])
            assert got == b"".join(truth[s] for s in chunk)
        await client.close()

    await asyncio.gather(*(worker(n) for n in range(4)))
    stats = store.service.stats()
    assert stats["pages_written"] >= 4 * 60 and stats["areas"] == 4


async def test_pipelined_requests_on_one_connection(store: StoreServer) -> None:
    client = await connect(store)
    await client.swapfile(True, 512)
    data = {s: random.Random(s).randbytes(PAGE_SIZE) for s in range(256)}
    await asyncio.gather(*(client.swap_out([s], d) for s, d in data.items()))
    got = await asyncio.gather(*(client.swap_in([s]) for s in data))
    assert got == list(data.values())
    await client.close()


async def test_full_store_answers_enospc_and_keeps_working(small_store: StoreServer) -> None:
    client = await connect(small_store)
    await client.swapfile(True, 1000)
    await client.swap_out(list(range(60)), bytes(60 * PAGE_SIZE))
    with pytest.raises(StoreError) as info:
        await client.swap_out(list(range(100, 110)), b"\1" * (10 * PAGE_SIZE))
    assert info.value.errno == errno.ENOSPC
    await client.discard([(0, 20)])
    await client.swap_out(list(range(100, 110)), b"\1" * (10 * PAGE_SIZE))
    assert await client.swap_in([105]) == b"\1" * PAGE_SIZE


async def test_wrong_token_is_eperm_and_areas_are_isolated(token_store: StoreServer) -> None:
    with pytest.raises(StoreError) as info:
        await connect(token_store, "alpha", "s3cret-b")
    assert info.value.errno == errno.EPERM
    with pytest.raises(StoreError):
        await connect(token_store, "alpha", "")
    alpha = await connect(token_store, "alpha", "s3cret-a")
    await alpha.swapfile(True, 16)
    await alpha.swap_out([3], b"A" * PAGE_SIZE)
    beta = await connect(token_store, "beta", "s3cret-b")
    await beta.swapfile(True, 16)
    # Beta's slot 3 is its own: it reads zeros, discards nothing of alpha's.
    assert await beta.swap_in([3], bytes([NEVER_WRITTEN])) == bytes(PAGE_SIZE)
    await beta.discard([(0, 16)])
    await beta.swapfile(False, 0)
    assert await alpha.swap_in([3]) == b"A" * PAGE_SIZE
    assert token_store.service.counters["auth_failures"] == 2


async def test_requests_before_hello_or_before_swapfile_fail_cleanly(
    store: StoreServer, caplog: pytest.LogCaptureFixture
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", store.port)
    writer.write(encode(Flush(1)))
    assert await reader.read(4096) == b""  # closed: the first frame must be a Hello
    assert "the first frame must be a Hello" in caplog.text
    writer.close()
    await writer.wait_closed()
    client = await connect(store, "fresh")
    with pytest.raises(StoreError) as info:
        await client.swap_in([0])
    assert info.value.errno == errno.ENXIO
    await client.close()


async def test_garbage_closes_only_that_connection(store: StoreServer) -> None:
    good = await connect(store, "good")
    await good.swapfile(True, 8)
    await good.swap_out([1], b"g" * PAGE_SIZE)
    for junk in (b"\xff" * 64, struct.pack(">I", 1 << 30), struct.pack(">I", 3) + b"\x93\x01\x02"):
        reader, writer = await asyncio.open_connection("127.0.0.1", store.port)
        writer.write(encode(Hello(1, PROTOCOL_VERSION, "bad")) + junk)
        await reader.read(4096)  # the Welcome
        assert await asyncio.wait_for(reader.read(4096), 5) == b""  # then closed by the store
        writer.close()
        await writer.wait_closed()
    assert store.service.counters["protocol_errors"] == 3
    assert await good.swap_in([1]) == b"g" * PAGE_SIZE


async def test_pending_calls_fail_with_connection_lost_when_the_store_goes(
    store: StoreServer,
) -> None:
    client = await connect(store)
    await client.swapfile(True, 8)
    await store.close()
    with pytest.raises(ConnectionLost):
        await client.swap_in([0])


async def test_each_call_has_one_deadline_against_a_silent_peer() -> None:
    writers: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        await reader.read(1 << 20)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    with pytest.raises(TimeoutError):
        await StoreClient.connect("127.0.0.1", port, "a", deadline=0.3)
    for writer in writers:
        writer.close()
    server.close()
    await server.wait_closed()


async def test_batch_calls_complete_through_callbacks(store: StoreServer) -> None:
    client = await connect(store)
    await client.swapfile(True, 64)
    loop = asyncio.get_running_loop()
    pages = [bytes([n]) * PAGE_SIZE for n in range(1, 9)]
    wrote: asyncio.Future[Exception | None] = loop.create_future()
    data, gens = b"".join(pages), array("Q", [1] * 8)
    client.start_swap_out((range(8),), pages, tags_of(data, client.area_seed, range(8), gens),
                          gens, None, wrote.set_result)  # fmt: skip
    assert await asyncio.wait_for(wrote, 5) is None
    read: asyncio.Future[tuple[bytes, Exception | None]] = loop.create_future()

    def got(reply: Pages | None, failure: Exception | None) -> None:
        read.set_result((bytes(reply.data) if reply is not None else b"", failure))

    client.start_swap_in((range(7, 8), range(0, 1)), False, got)
    assert await asyncio.wait_for(read, 5) == (pages[7] + pages[0], None)
    refused: asyncio.Future[Exception | None] = loop.create_future()
    client.start_swap_out((range(64, 65),), [pages[0]], array("I", [0]), array("Q", [1]), None,
                          refused.set_result)  # fmt: skip
    failure = await asyncio.wait_for(refused, 5)  # beyond the area: the store's errno
    assert isinstance(failure, StoreError) and failure.errno == errno.EINVAL
    await store.close()
    read = loop.create_future()
    client.start_swap_in((range(1),), False, got)
    data, failure = await asyncio.wait_for(read, 5)
    assert data == b"" and isinstance(failure, ConnectionLost)


class ScriptedStore:
    """A fake page store: welcomes every Hello, then answers requests with `answer`
    (raw bytes to write, or None to stay silent) -- for what a real store never does."""

    def __init__(self, answer: Callable[[Connection, Request], bytes | None]) -> None:
        self.answer = answer
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def __aexit__(self, *exc: object) -> None:
        for writer in self.writers:
            writer.close()
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        conn = Connection(Role.SERVER)
        while data := await reader.read(1 << 20):
            conn.receive_data(data)
            while (event := conn.next_event()) is not NEED_DATA:
                assert isinstance(event, Request)
                if isinstance(event, Hello):
                    reply: bytes | None = conn.send(
                        Welcome(event.request_id, PROTOCOL_VERSION, 16, 16)
                    )
                else:
                    reply = self.answer(conn, event)
                if reply is not None:
                    writer.write(reply)


async def test_a_protocol_3_store_refuses_this_client_in_one_line() -> None:
    """What a protocol-3 store answers a protocol-4 Hello (its own Failed, in the
    handshake's layout both keep) reaches both clients as one StoreError naming both
    versions; so does a Welcome in protocol 3's shape, were a store to send one."""
    import msgpack

    answers = {
        "refusal": msgpack.packb([65, 1, errno.EPROTONOSUPPORT, "protocol 4; store speaks 3"]),
        "welcome": msgpack.packb([66, 1, 3, 16, 16]),
    }
    for kind, answer in answers.items():

        async def old_store(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                            answer: bytes = answer) -> None:  # fmt: skip
            await reader.read(4096)
            writer.write(struct.pack(">I", len(answer)) + answer)
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(old_store, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        refusal = kind == "refusal"
        match = "protocol 4; store speaks 3" if refusal else "protocol 3; this client speaks"
        with pytest.raises(StoreError if refusal else ConnectionLost, match=match):
            await StoreClient.connect("127.0.0.1", port, "a", deadline=5)
        with pytest.raises(StoreError if refusal else RemoteProtocolError, match=match):
            await asyncio.to_thread(BlockingClient.open, "127.0.0.1", port, "a", "", 5)
        server.close()
        await server.wait_closed()


async def test_batch_calls_time_out_on_the_watchdog_against_a_silent_store() -> None:
    """A store that answers Hello and then nothing: batch calls fail by their deadline."""
    async with ScriptedStore(lambda conn, request: None) as port:
        client = await StoreClient.connect("127.0.0.1", port, "a", deadline=0.5)
        done: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
        page = bytes(PAGE_SIZE)
        began = time.monotonic()
        client.start_swap_out((range(1),), [page], array("I", [0]), array("Q", [1]), None,
                              done.set_result)  # fmt: skip
        failure = await asyncio.wait_for(done, 5)
        elapsed = time.monotonic() - began
        assert isinstance(failure, TimeoutError)
        assert 0.5 <= elapsed < 0.5 + 0.25 + 0.5  # deadline + one watchdog period + slack
        await client.close()


async def test_a_garbled_reply_fails_every_pending_call_and_drops_the_connection() -> None:
    async with ScriptedStore(lambda conn, request: struct.pack(">I", 5) + b"junk!") as port:
        client = await StoreClient.connect("127.0.0.1", port, "a", deadline=5)
        batch: asyncio.Future[tuple[Pages | None, Exception | None]] = (
            asyncio.get_running_loop().create_future()
        )
        client.start_swap_in((range(1),), False, lambda r, failure: batch.set_result((r, failure)))
        with pytest.raises(ConnectionLost, match="garbage"):
            await client.flush()
        reply, failure = await asyncio.wait_for(batch, 5)
        assert reply is None and isinstance(failure, ConnectionLost)
        assert not client.connected
        await client.close()


@pytest.mark.parametrize(
    ("slot", "generation", "flip", "why"),
    [
        (3, 1, 1, "damaged in transit or at rest"),
        (4, 1, 0, "slot 4's page, with a valid tag, returned for slot 3"),
        (3, 2, 0, "slot 3's page from before its last write"),
    ],
)
async def test_a_page_that_is_not_the_slots_latest_is_eio_not_data(
    slot: int, generation: int, flip: int, why: str
) -> None:
    """The store (scripted) answers slot 3 at generation 1 with a page whose tag holds
    for the bytes -- but for another slot or generation, or not at all: each is EIO."""
    page = b"x" * PAGE_SIZE

    def pages(conn: Connection, request: Request) -> bytes:
        assert isinstance(request, SwapIn)
        tag = page_tag(page, area_seed("a"), slot, generation) ^ flip
        # The store claims the generation asked for; the tag says otherwise (or not).
        return conn.send(Pages(request.request_id, page, (tag,), (1,)))

    async with ScriptedStore(pages) as port:
        client = await StoreClient.connect("127.0.0.1", port, "a", deadline=5)
        with pytest.raises(StoreError, match="does not match its tag") as info:
            await client.swap_in([3], [1])
        assert info.value.errno == errno.EIO, why
        await client.close()


async def test_a_page_from_an_older_write_is_eio_unless_a_raced_write_explains_it() -> None:
    """A page intact at its own generation, but not from the write the reader last
    made (a replica behind): EIO -- unless a write raced the read and the reader's
    count moved on to exactly that one."""
    page = b"y" * PAGE_SIZE

    def pages(conn: Connection, request: Request) -> bytes:
        assert isinstance(request, SwapIn)
        tag = page_tag(page, area_seed("a"), 3, 7 << 32 | 2)
        return conn.send(Pages(request.request_id, page, (tag,), (7 << 32 | 2,)))

    async with ScriptedStore(pages) as port:
        client = await StoreClient.connect("127.0.0.1", port, "a", deadline=5)
        gen = 7 << 32
        with pytest.raises(StoreError, match="holds generation 0x700000002, not 0x700000003"):
            await client.swap_in([3], [gen | 3])
        # The same write count under another epoch is another agent's page, not this one.
        with pytest.raises(StoreError, match="holds generation 0x700000002, not 0x2"):
            await client.swap_in([3], [2])
        assert await client.swap_in([3], [gen | 1], lambda: array("Q", [gen | 2])) == page
        assert await client.swap_in([3], [gen | 2]) == page
        await client.close()


async def test_a_client_that_never_reads_replies_is_paused_not_buffered(
    store: StoreServer,
) -> None:
    client = await connect(store, "reader")
    await client.swapfile(True, 256)
    await client.swap_out(list(range(256)), bytes(256 * PAGE_SIZE))
    reader, writer = await asyncio.open_connection("127.0.0.1", store.port)
    writer.write(encode(Hello(1, PROTOCOL_VERSION, "reader")))
    await reader.readexactly(4)
    from netswap.protocol import SwapIn

    # 400 requests for 1 MiB each, replies never read: the store must stop reading.
    for rid in range(2, 402):
        writer.write(encode(SwapIn(rid, tuple(range(256)))))
    await asyncio.sleep(1.0)
    stuck = [c for c in store.connections if c._conn.buffered > 0]
    assert len(stuck) == 1
    transport = stuck[0]._transport
    assert transport is not None
    # Bounded by the high-water mark plus one reply and one read's worth of requests.
    assert transport.get_write_buffer_size() < 8 * 1024 * 1024
    assert stuck[0]._conn.buffered < 1024 * 1024
    writer.transport.abort()
    assert await client.swap_in([0]) == bytes(PAGE_SIZE)  # written as zeros above
