"""Payloads of 1..4096 bytes (protocol 4, issue 31) on real store processes on
127.0.0.1, through the real clients: every size class round-trips with its tag proven
per payload, a wrong length is a protocol error that closes only its connection, a
full store is ENOSPC by bytes, a file store killed -9 keeps every flushed payload,
compaction bounds what discards leave, and Stats count bytes."""

from __future__ import annotations

import errno
import random
import socket
import struct
import time
from array import array
from pathlib import Path

import pytest
from netswap.client.rpc import BlockingClient, StoreClient
from netswap.protocol import (
    PAGE_SIZE,
    PROTOCOL_VERSION,
    Connection,
    Hello,
    Ok,
    Pages,
    Role,
    StoreError,
    Swapfile,
    SwapIn,
    SwapOut,
    area_seed,
    encode,
    page_tag,
    prove_reply,
    tags_of_sized,
)
from netswap.server.backends.objects import SLACK

from .procs import StoreProc

# Every kind of payload: the agent's (granules up to 3 KiB, a word, a whole page) and
# any other length a peer may send, class edges included.
EVERY = [1, 8, 9, 256, 257, 700, 1024, 1300, 1536, 2048, 2304, 2560, 2816, 3072, 3073,
         3841, 4095, PAGE_SIZE]  # fmt: skip


def payloads(seed: int, lengths: list[int]) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(n) for n in lengths]


async def connect(store: StoreProc, area: str = "a", slots: int = 4096) -> StoreClient:
    client = await StoreClient.connect("127.0.0.1", store.port, area, deadline=10)
    await client.swapfile(True, slots)
    return client


@pytest.mark.parametrize("backend", ["memory", "file"])
async def test_payloads_of_every_class_round_trip_and_are_proven_each(
    backend: str, tmp_path: Path
) -> None:
    extra = ("--backend", "file", "--path", str(tmp_path / "s")) if backend == "file" else ()
    store = StoreProc("16M", extra).start()
    try:
        client = await connect(store)
        sent = payloads(1, EVERY)
        slots = list(range(100, 100 + len(EVERY)))
        await client.swap_out(slots, sent)
        assert await client.swap_in_payloads(slots) == sent
        reply = await client.read_pages(slots[::-1])
        assert reply.sized and list(reply.lengths) == EVERY[::-1]
        assert [bytes(reply.payload(i)) for i in range(len(slots))] == sent[::-1]
        held, gens, lengths = await client.inventory(0, 4096)
        assert list(held) == slots and list(lengths) == EVERY and set(gens) == {1}
        # A batch of whole pages still answers without lengths (the fast path).
        whole = await client.read_pages([slots[-1], 5])
        assert not whole.sized and len(whole.data) == 2 * PAGE_SIZE
        # Rewritten at other lengths, in one batch with new slots: all land.
        again = payloads(2, [*EVERY[::-1], 8, 3072])
        await client.swap_out([*slots, 7, 8], again, [2] * len(slots) + [1, 1])
        assert await client.swap_in_payloads([*slots, 7, 8], [2] * len(slots) + [1, 1]) == again
        await client.close()
    finally:
        store.kill()


async def test_a_payload_whose_tag_does_not_match_is_eio_at_the_store_and_the_client() -> None:
    store = StoreProc("16M").start()
    try:
        client = await connect(store)
        payload = b"compressed" * 70
        wrong = page_tag(payload, client.area_seed, 4, 1)  # slot 4's tag, written at 5
        conn_tags = array("I", [wrong])
        done: list[Exception | None] = []
        client.start_swap_out((range(5, 6),), [payload], conn_tags, array("Q", [1]), None,
                              done.append)  # fmt: skip
        await client.flush()  # after the write's answer
        assert done == [None]  # the store keeps what it is given...
        with pytest.raises(StoreError) as info:  # ...and proves it on the way out
            await client.read_pages([5])
        assert info.value.errno == errno.EIO and "tag mismatch" in info.value.reason
        # A payload altered after the store read it: the client's proof fails.
        await client.swap_out([6], [payload])
        reply = await client.read_pages([6])
        forged = Pages(reply.request_id, b"X" + bytes(reply.data)[1:], reply.tags,
                       reply.generations, None, reply.lengths)  # fmt: skip
        failure = prove_reply(client.area_seed, forged, [6], array("Q", [1]))
        assert failure is not None and failure.errno == errno.EIO
        assert prove_reply(client.area_seed, reply, [6], array("Q", [1])) is None
        await client.close()
    finally:
        store.kill()


@pytest.mark.parametrize("bad", [0, PAGE_SIZE + 1, 0xFFFF, "sum"])
async def test_a_wrong_length_closes_that_connection_only(bad: int | str) -> None:
    store = StoreProc("16M").start()
    try:
        good = await connect(store)
        await good.swap_out([1], [b"kept" * 100])
        sock = socket.create_connection(("127.0.0.1", store.port), timeout=10)
        conn = Connection(Role.CLIENT)
        sock.sendall(conn.send(Hello(1, PROTOCOL_VERSION, "a", "")))
        while not conn.handshaken:
            conn.receive_data(sock.recv(4096))
            conn.next_event()
        lengths = [8, 300]
        frame = bytearray(encode(SwapOut(2, [9, 10], bytes(308), [0, 0], [1, 1], None, lengths)))
        at = 4 + 8 + 8 + 8 + 12 * 2  # length, head, runs' count, the run, gens and tags
        if bad == "sum":
            struct.pack_into("<H", frame, at, 9)  # one byte more than the frame carries
        else:
            assert isinstance(bad, int)
            struct.pack_into("<H", frame, at, bad)
            frame = frame[: at + 4] + bytes(bad + 300)
            frame[:4] = struct.pack(">I", len(frame) - 4)
        sock.sendall(frame)
        sock.settimeout(10)
        assert sock.recv(4096) == b""  # closed, no answer
        sock.close()
        assert await good.swap_in_payloads([1]) == [b"kept" * 100]
        stats = await good.stats()
        assert stats["used_pages"] == 1  # nothing of the bad frame was kept
        assert stats["protocol_errors"] == 1  # refused as one (not a failure inside)
        await good.close()
    finally:
        store.kill()


async def test_a_full_store_is_enospc_by_bytes_and_a_batch_lands_whole_or_not_at_all() -> None:
    store = StoreProc("64K").start()  # 16 pages
    try:
        client = await connect(store)
        sent = payloads(3, [256] * 256)  # 256 x 256 B: 16 pages of class 1
        await client.swap_out(list(range(256)), sent)
        stats = await client.stats()
        assert stats["used_bytes"] == stats["capacity_bytes"] == 16 * PAGE_SIZE
        assert stats["free_bytes"] == 0 and stats["used_pages"] == 256
        for batch in ([b"a" * 256], [b"b" * 8], [b"a" * 256, b"b" * 8]):
            with pytest.raises(StoreError) as info:
                await client.swap_out(list(range(1000, 1000 + len(batch))), batch)
            assert info.value.errno == errno.ENOSPC and "store full" in info.value.reason
        assert (await client.stats())["used_pages"] == 256  # neither landed
        await client.discard([(0, 32)])  # two pages' worth: the 256 B and the word's page
        await client.swap_out([1000, 1001], [b"a" * 256, b"b" * 8])
        assert await client.swap_in_payloads([1000, 1001, 40]) == [b"a" * 256, b"b" * 8, sent[40]]
        await client.close()
    finally:
        store.kill()


async def test_a_file_store_killed_keeps_the_flushed_payloads_of_every_class(
    tmp_path: Path,
) -> None:
    store = StoreProc("16M", ("--backend", "file", "--path", str(tmp_path / "s"))).start()
    try:
        client = await connect(store)
        flushed = payloads(4, EVERY)
        slots = list(range(len(EVERY)))
        await client.swap_out(slots, flushed)
        await client.flush()
        await client.swap_out(slots[:5], payloads(5, [300] * 5), [2] * 5)  # not flushed
        await client.discard([(10, 3)])  # not flushed either
        store.kill()  # -9
        store.start()
        client = await connect(store)
        # Every flushed payload, proven at write 1: not the rewrites made after the flush
        # (a copy-on-write store's index named the flushed spots), not the discard.
        assert await client.swap_in_payloads(slots) == flushed
        assert list((await client.inventory(0, 4096))[2]) == EVERY
        await client.close()
    finally:
        store.kill()


async def test_compaction_bounds_what_discards_leave_and_stats_count_bytes() -> None:
    """A store full of 256-B payloads, nine in ten discarded at random: Stats show the
    bytes held within (1 + 1/SLACK) of the live spots plus a zspage, not the 8x a
    store without compaction keeps (tests/bench/size_classes.py)."""
    store = StoreProc("4M").start()  # 1,024 pages: 16,384 payloads of 256 B
    try:
        client = await connect(store, slots=1 << 14)
        rng = random.Random(6)
        sent = {}
        for first in range(0, 1 << 14, 256):
            batch = [rng.randbytes(256) for _ in range(256)]
            await client.swap_out(list(range(first, first + 256)), batch)
            sent.update(zip(range(first, first + 256), batch, strict=True))
        full = await client.stats()
        assert full["free_bytes"] == 0 and full["payload_bytes"] == (1 << 14) * 256
        gone = sorted(rng.sample(range(1 << 14), (1 << 14) * 9 // 10))
        for i in range(0, len(gone), 1024):
            await client.discard([(s, 1) for s in gone[i : i + 1024]])
        kept = sorted(set(sent) - set(gone))
        stats = await client.stats()
        live = len(kept) * 256
        assert stats["payload_bytes"] == live and stats["used_pages"] == len(kept)
        assert stats["used_bytes"] <= live * (1 + 1 / SLACK) + PAGE_SIZE + 256
        assert stats["free_bytes"] == stats["capacity_bytes"] - stats["used_bytes"]
        assert stats["area_used_bytes"] == live and stats["area_payload_bytes"] == live
        for i in range(0, len(kept), 256):
            chunk = kept[i : i + 256]
            assert await client.swap_in_payloads(chunk) == [sent[s] for s in chunk]
        await client.close()
    finally:
        store.kill()


async def test_an_area_quota_in_bytes_counts_what_payloads_take() -> None:
    store = StoreProc("16M", ("--area-quota", "64K")).start()
    try:
        client = await connect(store)
        await client.swap_out(list(range(32)), [b"x" * 2048] * 32)  # 32 x 2 KiB: the quota
        with pytest.raises(StoreError) as info:
            await client.swap_out([40], [b"y"])
        assert info.value.errno == errno.ENOSPC and "quota of 65536 bytes" in info.value.reason
        stats = await client.stats()
        assert stats["area_quota_bytes"] == 65536 and stats["area_used_bytes"] == 65536
        other = await connect(store, "b")
        await other.swap_out([0], [bytes(PAGE_SIZE)])  # another area still has room
        await client.close()
        await other.close()
    finally:
        store.kill()


def test_the_direct_path_sends_payloads_and_proves_them() -> None:
    """BlockingClient (nbdkit's thread) frames payload buffers as they are."""
    store = StoreProc("16M").start()
    try:
        client = BlockingClient.open("127.0.0.1", store.port, "d", "", 10)
        sent = payloads(8, [PAGE_SIZE, 8, 1300])
        assert isinstance(client.call(Swapfile(client.next_id(), True, 64), 10), Ok)
        seed, gens = area_seed("d"), array("Q", [1, 1, 1])
        lengths = array("H", map(len, sent))
        tags = tags_of_sized(b"".join(sent), lengths, seed, [3, 4, 5], gens)
        views = [memoryview(p) for p in sent]
        client.send(client.conn.send_swap_out(client.next_id(), (range(3, 6),), gens, tags,
                                              None, views), 10)  # fmt: skip
        assert isinstance(client.reply(time.monotonic() + 10), Ok)
        reply = client.call(SwapIn(client.next_id(), range(3, 6)), 10)
        assert prove_reply(seed, reply, range(3, 6), array("Q", [1, 1, 1])) is None
        assert isinstance(reply, Pages) and [bytes(reply.payload(i)) for i in range(3)] == sent
        client.close()
    finally:
        store.kill()
