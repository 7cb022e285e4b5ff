"""The store under a hostile or buggy client: the three defects of issue #14.

1. An area's declared size costs nothing until written: Swapfile(2**40 slots)
   on a real store process moves its RSS by under a few MiB, and releasing it
   is instant; scattered writes stop at the slot-map budget with ENOSPC.
2. No request holds the loop: a 1,024-range Discard over 2**30 slots, or a
   Flush of a 38 MB index, runs in slices while another client's 1-page reads
   keep a millisecond-class p99.
3. A page is bound to its slot: a misdirected write, or an index whose bytes
   were flipped, is EIO or a refusal to start -- never another slot's data.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import os
import random
import shutil
import struct
import subprocess
import time
from array import array
from collections.abc import Iterator
from pathlib import Path

import pytest
from netswap.client.rpc import StoreClient
from netswap.lab.ports import free_port
from netswap.protocol import (
    MAX_FRAME_SIZE,
    MAX_HELLO_FRAME,
    PAGE_SIZE,
    PROTOCOL_VERSION,
    Connection,
    Failed,
    Hello,
    Role,
    StoreError,
    SwapOut,
    area_seed,
    encode,
    tags_of,
)
from netswap.server.app import StoreServer, start_store
from netswap.server.backends import FileBackend, MemoryBackend
from netswap.server.backends.index import UnusableIndex
from netswap.server.backends.slotmap import CLUSTER_SLOTS, MAX_AREAS
from netswap.server.guard import Limits
from netswap.server.service import Tokens

from .conftest import wait_for_port


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise LookupError("no VmRSS")


@pytest.fixture
def big_store(netswap_cmd: list[str]) -> Iterator[tuple[int, int]]:
    """A real store process of 1 GiB: (port, pid)."""
    port = free_port()
    proc = subprocess.Popen(
        [*netswap_cmd, "store", "--listen", f"127.0.0.1:{port}", "--capacity", "1G"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, proc)
        yield port, proc.pid
    finally:
        proc.kill()
        proc.wait()


# -- 1: an area's size ---------------------------------------------------------------
@pytest.mark.parametrize("pages", [2**28, 2**32, 2**40])
async def test_a_huge_area_costs_nothing_until_written(
    big_store: tuple[int, int], pages: int
) -> None:
    port, pid = big_store
    client = await StoreClient.connect("127.0.0.1", port, "huge")
    before = rss_kib(pid)
    await client.swapfile(True, pages)
    last = pages - 1
    await client.swap_out([0, last], b"a" * PAGE_SIZE + b"z" * PAGE_SIZE)
    assert await client.swap_in([last, 0]) == b"z" * PAGE_SIZE + b"a" * PAGE_SIZE
    grown = rss_kib(pid) - before
    # Before: 2**28 slots grew the store by ~1 GiB (a 4-byte slot map entry per slot).
    assert grown < 8 * 1024, f"RSS grew {grown} KiB for an area of {pages} slots"
    began = time.perf_counter()
    await client.swapfile(False, 0)  # before: ~7 s of a blocked loop at 2**28
    assert time.perf_counter() - began < 0.5
    await client.close()


def test_scattered_writes_stop_at_the_slot_map_budget_with_enospc() -> None:
    backend = MemoryBackend(4 * CLUSTER_SLOTS)  # budget: 4 x 4 + 1024 clusters
    area = backend.activate("a", 1 << 40)
    page = memoryview(bytes(PAGE_SIZE))
    limit = backend.budget.limit
    for n in range(limit):  # one page per cluster: each write creates a cluster
        if backend.free:
            backend.write(area, [n * CLUSTER_SLOTS], page, None)
        else:
            backend.discard(area, (n - 1) * CLUSTER_SLOTS, 1)  # keep a page free
            backend.write(area, [n * CLUSTER_SLOTS], page, None)
            backend.discard(area, n * CLUSTER_SLOTS, 1)  # and the cluster count low
    assert backend.budget.held <= limit
    backend2 = MemoryBackend(1 << 16)
    area2 = backend2.activate("b", 1 << 40)
    with pytest.raises(StoreError) as info:
        for n in range(backend2.budget.limit + 1):
            backend2.write(area2, [n * CLUSTER_SLOTS], page, None)
    assert info.value.errno == errno.ENOSPC and "slot maps full" in info.value.reason
    assert backend2.budget.held == backend2.budget.limit
    assert backend2.stats()["enospc"] == 1
    # What is held still reads back; freeing clusters gives the budget back.
    backend2.discard(area2, 0, 1 << 30)
    assert backend2.budget.held < backend2.budget.limit
    backend2.write(area2, [7], page, None)


def test_areas_are_bounded_in_number() -> None:
    backend = MemoryBackend(64)
    for n in range(MAX_AREAS):
        backend.activate(f"a{n}", 1 << 40)
    with pytest.raises(StoreError) as info:
        backend.activate("one-more", 1)
    assert info.value.errno == errno.ENOSPC
    backend.activate("a0", 1 << 40)  # an existing area is not a new one


# -- 2: work per request -------------------------------------------------------------
async def stalled_victim(
    netswap_cmd: list[str], store_args: list[str], heavy: str
) -> tuple[list[float], float]:
    """A victim client's 1-page read latencies while an attacker that holds one page
    in each of 16,384 clusters sends `heavy` (discard of 2**30 slots, or flush)."""
    port = free_port()
    proc = subprocess.Popen(
        [*netswap_cmd, "store", "--listen", f"127.0.0.1:{port}", *store_args],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for_port(port, proc)
        attacker = await StoreClient.connect("127.0.0.1", port, "attacker", deadline=120)
        await attacker.swapfile(True, 1 << 40)
        # One page in each of 16,384 clusters: as much as there is to walk.
        page = bytes(PAGE_SIZE) * 256
        for base in range(0, 16384, 256):
            await attacker.swap_out([(base + i) * CLUSTER_SLOTS for i in range(256)], page)
        victim = await StoreClient.connect("127.0.0.1", port, "victim", deadline=10)
        await victim.swapfile(True, 16)
        await victim.swap_out([0], b"v" * PAGE_SIZE)
        quiet = []
        for _ in range(200):
            t = time.perf_counter()
            await victim.swap_in([0])
            quiet.append(time.perf_counter() - t)
        # 1,024 ranges of 2**20 slots (a 7 KiB frame): 2**30 slots, 4,194,304 clusters.
        ranges = [(n << 20, 1 << 20) for n in range(1024)]
        work = attacker.discard(ranges) if heavy == "discard" else attacker.flush()
        began = time.perf_counter()
        task = asyncio.ensure_future(work)
        latencies = []
        while not task.done():
            t = time.perf_counter()
            assert await victim.swap_in([0]) == b"v" * PAGE_SIZE
            latencies.append(time.perf_counter() - t)
        await task
        took = time.perf_counter() - began
        quiet.sort()
        latencies.sort()
        print(f"{heavy} {took:.2f}s; victim reads meanwhile {len(latencies)}: "
              f"p50 {latencies[len(latencies) // 2] * 1e3:.2f} ms, "
              f"p99 {latencies[int(len(latencies) * 0.99)] * 1e3:.2f} ms, "
              f"max {latencies[-1] * 1e3:.2f} ms; alone p99 "
              f"{quiet[int(len(quiet) * 0.99)] * 1e3:.2f} ms")  # fmt: skip
        stats = await victim.stats()
        await attacker.close()
        await victim.close()
        return latencies, stats["clusters"]
    finally:
        proc.kill()
        proc.wait()


async def test_a_worst_case_discard_does_not_stall_another_clients_reads(
    netswap_cmd: list[str],
) -> None:
    # 4 GiB, reserved not touched: a slot-map budget of 17,408 clusters.
    latencies, clusters = await stalled_victim(netswap_cmd, ["--capacity", "4G"], "discard")
    assert len(latencies) >= 20  # the victim ran all along, not once at the end
    assert latencies[int(len(latencies) * 0.99)] < 0.02  # before: one read waited 35 s
    assert clusters == 1  # all but the victim's were discarded


async def test_a_flush_of_a_large_index_does_not_stall_another_clients_reads(
    netswap_cmd: list[str], tmp_path: Path
) -> None:
    """The file store's index of 16,384 cluster records (38 MB) is built a record per
    step and synced in a thread: the victim's reads go on throughout."""
    args = ["--capacity", "4G", "--backend", "file", "--path", str(tmp_path / "s")]
    latencies, clusters = await stalled_victim(netswap_cmd, args, "flush")
    assert len(latencies) >= 20  # before: none, as the flush held the loop to the end
    assert latencies[int(len(latencies) * 0.99)] < 0.02
    assert clusters == 16385
    assert os.path.getsize(tmp_path / "s" / "index") > 16384 * 8208


# -- 3: a page is bound to its slot --------------------------------------------------
async def test_a_misdirected_write_is_eio_at_the_store_and_the_client(
    store: StoreServer,
) -> None:
    client = await StoreClient.connect("127.0.0.1", store.port, "a")
    await client.swapfile(True, 16)
    page = b"m" * PAGE_SIZE
    gens = array("Q", [1])
    tag_for_slot_1 = tags_of(page, client.area_seed, [1], gens)
    done: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
    client.start_swap_out((range(2, 3),), [page], tag_for_slot_1, gens, None, done.set_result)
    assert await done is None
    with pytest.raises(StoreError) as info:
        await client.swap_in([2])
    assert info.value.errno == errno.EIO and "tag mismatch" in info.value.reason
    assert store.service.backend.stats()["checksum_errors"] == 1
    await client.close()


def fill(path: Path, slots: int) -> dict[int, bytes]:
    backend = FileBackend(path, 64)
    area = backend.activate("a", 64)
    truth = {s: bytes([s + 1]) * PAGE_SIZE for s in range(slots)}
    for s, data in truth.items():
        backend.write(area, [s], memoryview(data), None)
    backend.flush()
    backend.close()
    return truth


def test_a_flipped_index_byte_is_eio_or_a_refusal_never_wrong_data(tmp_path: Path) -> None:
    """The probe that found 3 wrong pages in 40 flips, over more flips: each flip either
    stops the store at start (one clear line) or leaves every slot right or EIO."""
    clean = tmp_path / "clean"
    truth = fill(clean, 24)
    size = (clean / "index").stat().st_size
    rng = random.Random(14)
    outcomes = {"refused": 0, "eio": 0, "all-right": 0}
    for trial in range(200):
        copy = tmp_path / f"t{trial}"
        shutil.copytree(clean, copy)
        raw = bytearray((copy / "index").read_bytes())
        raw[rng.randrange(size)] ^= 1 << rng.randrange(8)
        (copy / "index").write_bytes(raw)
        try:
            backend = FileBackend(copy, 64)
        except UnusableIndex:
            outcomes["refused"] += 1
            shutil.rmtree(copy)
            continue
        area = backend.area("a")
        eio = 0
        for slot, data in truth.items():
            out = bytearray(PAGE_SIZE)
            try:
                backend.read(area, [slot], memoryview(out))
            except StoreError as exc:
                assert exc.errno == errno.EIO
                eio += 1
                continue
            assert out == data, f"trial {trial}: slot {slot} read another page"
        outcomes["eio" if eio else "all-right"] += 1
        backend.close()
        shutil.rmtree(copy)
    print(outcomes)
    assert outcomes["eio"] + outcomes["refused"] > 100  # the flips did land


def test_a_lost_index_record_makes_unmapped_slots_eio_not_zeros(tmp_path: Path) -> None:
    fill(tmp_path / "s", 4)
    index = tmp_path / "s" / "index"
    raw = bytearray(index.read_bytes())
    raw[-10] ^= 0xFF  # inside the only cluster record (slots 0..255)
    index.write_bytes(raw)
    backend = FileBackend(tmp_path / "s", 64)
    assert backend.damaged and backend.stats()["index_records_lost"] == 1
    with pytest.raises(StoreError) as info:
        backend.read(backend.area("a"), [0], memoryview(bytearray(PAGE_SIZE)))
    assert info.value.errno == errno.EIO
    backend.flush()  # the damage is persisted, not forgotten at the next start
    backend.close()
    assert FileBackend(tmp_path / "s", 64).damaged


def test_an_index_from_before_tags_is_refused_in_one_line(tmp_path: Path) -> None:
    fill(tmp_path / "s", 2)
    index = tmp_path / "s" / "index"
    index.write_bytes(b"NSWPIDX1" + index.read_bytes()[8:])
    with pytest.raises(UnusableIndex, match=r"format 1.*fresh --path"):
        FileBackend(tmp_path / "s", 64)
    assert (tmp_path / "s" / "pages").stat().st_size == 64 * PAGE_SIZE  # nothing touched


def test_the_store_command_says_so_and_exits(tmp_path: Path, netswap_cmd: list[str]) -> None:
    fill(tmp_path / "s", 2)
    index = tmp_path / "s" / "index"
    index.write_bytes(b"NSWPIDX1" + index.read_bytes()[8:])
    result = subprocess.run(
        [*netswap_cmd, "store", "--backend", "file", "--path", str(tmp_path / "s"),
         "--capacity", f"{64 * PAGE_SIZE}", "--listen", f"127.0.0.1:{free_port()}"],
        capture_output=True, text=True, timeout=30, env={**os.environ},
    )  # fmt: skip
    assert result.returncode != 0
    assert "format 1" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# -- risks: what peers may cost the store ----------------------------------------------
async def raw(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def read_frame(reader: asyncio.StreamReader) -> bytes:
    (length,) = struct.unpack(">I", await reader.readexactly(4))
    return await reader.readexactly(length)


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    """True when the store closes (EOF or reset) within `seconds`, replies skipped."""
    try:
        async with asyncio.timeout(seconds):
            while await reader.read(65536):
                pass
    except TimeoutError:
        return False
    except ConnectionError:
        pass
    return True


async def test_unauthenticated_peers_hold_little_and_give_it_back(
    big_store: tuple[int, int],
) -> None:
    """Before: 2,000 peers each parking most of a 1 MiB frame held 2.1 GiB for good.
    Now a frame larger than a Hello is refused before Welcome, a Hello-sized partial
    frame is all a peer can park, and the handshake deadline (5 s) ends it."""
    port, pid = big_store
    before = rss_kib(pid)
    reader, writer = await raw(port)
    writer.write(struct.pack(">I", 1 << 20) + b"\0" * 65536)  # the start of a 1 MiB frame
    assert await closed_within(reader, 2)
    writer.close()
    peers = [await raw(port) for _ in range(800)]
    for _, w in peers:
        w.write(struct.pack(">I", MAX_HELLO_FRAME) + b"\0" * (MAX_HELLO_FRAME - 1))
    await asyncio.sleep(1)
    holding = rss_kib(pid) - before
    assert holding < 16 * 1024, f"800 unauthenticated peers hold {holding} KiB"
    ended = await asyncio.gather(*(closed_within(r, 10) for r, _ in peers))
    assert all(ended)  # the handshake deadline closed every one
    for _, w in peers:
        w.close()
    after = rss_kib(pid) - before
    print(f"RSS: +{holding} KiB with 800 peers parked, +{after} KiB after they went")
    assert after < 16 * 1024


async def test_connections_past_the_limit_are_refused_and_logged_once(
    netswap_cmd: list[str], tmp_path: Path
) -> None:
    port = free_port()
    log = tmp_path / "store.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*netswap_cmd, "store", "--listen", f"127.0.0.1:{port}", "--capacity", "16M",
             "--max-connections", "4"],
            stdout=subprocess.DEVNULL, stderr=out,
        )  # fmt: skip
    try:
        wait_for_port(port, proc)
        await asyncio.sleep(0.5)  # wait_for_port's own probe has gone
        kept = [await StoreClient.connect("127.0.0.1", port, f"a{n}") for n in range(4)]
        refused = 0
        for _ in range(20):
            try:
                extra = await StoreClient.connect("127.0.0.1", port, "extra", deadline=2)
            except (ConnectionError, OSError):
                refused += 1
            else:
                await extra.close()
        assert refused == 20
        for client in kept:  # the four in service are untouched
            await client.swapfile(True, 8)
            await client.swap_out([1], b"k" * PAGE_SIZE)
        stats = await kept[0].stats()
        assert stats["connections_refused"] == 20
        for client in kept:
            await client.close()
    finally:
        proc.terminate()
        proc.wait()
    lines = [x for x in log.read_text().splitlines() if "refusing" in x]
    assert len(lines) == 1, lines  # one line per interval, not one per connection


async def test_a_peer_that_says_nothing_is_closed_at_the_handshake_deadline() -> None:
    server = await start_store(MemoryBackend(64), "127.0.0.1", 0, limits=Limits(handshake_s=0.5))
    try:
        reader, writer = await raw(server.port)
        began = time.monotonic()
        assert await closed_within(reader, 5)
        assert 0.4 < time.monotonic() - began < 3
        assert server.service.counters["handshake_timeouts"] == 1
        writer.close()
    finally:
        await server.close()


async def test_a_wrong_token_closes_the_connection_after_a_growing_delay(
    token_store: StoreServer,
) -> None:
    delays = []
    for _ in range(4):
        reader, writer = await raw(token_store.port)
        began = time.monotonic()
        writer.write(encode(Hello(1, PROTOCOL_VERSION, "alpha", "guess")))
        frame = await reader.read(65536)
        delays.append(time.monotonic() - began)
        conn = Connection(Role.CLIENT)
        conn.send(Hello(1, PROTOCOL_VERSION, "alpha", "guess"))
        conn.receive_data(frame)
        reply = conn.next_event()
        assert isinstance(reply, Failed) and reply.errno == errno.EPERM
        writer.write(encode(Hello(2, PROTOCOL_VERSION, "alpha", "s3cret-a")))  # a 2nd try
        assert await closed_within(reader, 2)  # ...is never read: the connection is done
        writer.close()
    print("failed Hello answered after " + ", ".join(f"{d:.2f}s" for d in delays))
    assert delays[0] >= 0.09
    growth = [later / earlier for earlier, later in itertools.pairwise(delays)]
    assert min(growth) > 1.6, growth  # doubling per failure of the source
    # A right token from another connection still works at once.
    client = await StoreClient.connect("127.0.0.1", token_store.port, "alpha", "s3cret-a")
    await client.close()


async def test_unfinished_frames_share_one_budget_and_a_stalled_one_is_closed() -> None:
    frame = MAX_FRAME_SIZE
    limits = Limits(partial_budget=frame + frame // 2, frame_s=1.5)
    server = await start_store(MemoryBackend(1024), "127.0.0.1", 0, limits=limits)
    try:
        writers = []
        readers = []
        for name in ("a", "b"):
            client = await StoreClient.connect("127.0.0.1", server.port, name)
            await client.swapfile(True, 256)
            await client.close()
            r, w = await raw(server.port)
            w.write(encode(Hello(1, PROTOCOL_VERSION, name)))
            await read_frame(r)  # Welcome
            readers.append(r)
            writers.append(w)
        gens = array("Q", [1]) * 256
        data = bytes(256 * PAGE_SIZE)
        tags = tags_of(data, area_seed("a"), range(256), gens)
        whole = encode(SwapOut(2, tuple(range(256)), data, tags, gens))
        writers[0].write(whole[: len(whole) - 100])  # a's frame: all but 100 bytes
        await asyncio.sleep(0.2)
        tags_b = tags_of(data, area_seed("b"), range(256), gens)
        whole_b = encode(SwapOut(2, tuple(range(256)), data, tags_b, gens))
        writers[1].write(whole_b[: len(whole_b) - 100])  # b goes over the budget: paused
        await asyncio.sleep(0.2)
        budget = server.service.partial
        assert budget.over() and len(budget.waiting) == 1
        writers[0].write(whole[len(whole) - 100 :])  # a finishes: b may go on
        writers[1].write(whole_b[len(whole_b) - 100 :])
        for r in readers:
            await asyncio.wait_for(read_frame(r), 5)  # each gets its Ok
        assert budget.held == 0 and not budget.waiting
        writers[0].write(whole[:1000])  # a frame begun and never finished
        began = time.monotonic()
        assert await closed_within(readers[0], 5)
        assert 1.0 < time.monotonic() - began < 4
        assert server.service.counters["frame_timeouts"] == 1 and budget.held == 0
        for w in writers:
            w.close()
    finally:
        await server.close()


def test_an_area_quota_stops_one_area_not_the_others() -> None:
    backend = MemoryBackend(64)
    backend.area_quota = 16 * PAGE_SIZE  # bytes: sixteen whole pages
    greedy, other = backend.activate("greedy", 64), backend.activate("other", 64)
    page = memoryview(bytes(PAGE_SIZE) * 16)
    backend.write(greedy, list(range(16)), page, None)
    backend.write(greedy, list(range(16)), page, None)  # rewrites need no more room
    with pytest.raises(StoreError) as info:
        backend.write(greedy, [16], page[:PAGE_SIZE], None)
    assert info.value.errno == errno.ENOSPC and "area greedy is at its quota" in info.value.reason
    with pytest.raises(StoreError):
        backend.write_range(greedy, 20, 2, page[: 2 * PAGE_SIZE])
    backend.write(other, list(range(16)), page, None)  # the others still have room
    assert backend.stats()["quota_refusals"] == 2


def test_a_full_file_store_rewrites_in_place_and_a_crash_then_is_eio(tmp_path: Path) -> None:
    """Before: once full, a file store could not rewrite a slot, even after Flush."""
    backend = FileBackend(tmp_path / "s", 8)
    area = backend.activate("a", 8)
    for slot in range(8):
        backend.write(area, [slot], memoryview(bytes([slot + 1]) * PAGE_SIZE), None)
    backend.flush()
    with pytest.raises(StoreError):  # a new slot: no room
        backend.write(backend.activate("b", 8), [0], memoryview(bytes(PAGE_SIZE)), None)
    backend.write(area, [3], memoryview(b"R" * PAGE_SIZE), None, b"\2")  # a rewrite: fine
    out = bytearray(PAGE_SIZE)
    backend.read(area, [3], memoryview(out))
    assert out == b"R" * PAGE_SIZE
    backend.close()  # a crash: the index of the last flush, with slot 3's old tag
    again = FileBackend(tmp_path / "s", 8)
    with pytest.raises(StoreError) as info:
        again.read(again.area("a"), [3], memoryview(out))
    assert info.value.errno == errno.EIO  # not the old copy, not the new one unproven
    again.read(again.area("a"), [4], memoryview(out))
    assert out == bytes([5]) * PAGE_SIZE


async def test_stats_show_an_area_its_own_figures_and_the_whole_only_to_admin(
    tmp_path: Path,
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("alpha s3cret-a\nbeta s3cret-b\n@admin r00t\n")
    server = await start_store(MemoryBackend(1024), "127.0.0.1", 0, Tokens.from_file(tokens))
    try:
        alpha = await StoreClient.connect("127.0.0.1", server.port, "alpha", "s3cret-a")
        await alpha.swapfile(True, 64)
        await alpha.swap_out(list(range(10)), bytes(10 * PAGE_SIZE))
        beta = await StoreClient.connect("127.0.0.1", server.port, "beta", "s3cret-b")
        await beta.swapfile(True, 64)
        await beta.swap_out([0], bytes(PAGE_SIZE))
        seen = await beta.stats()
        # Its own figures and what placement needs; nothing of alpha's, no store totals.
        assert seen["area_pages_written"] == 1 and seen["area_used_pages"] == 1
        assert seen["capacity_pages"] == 1024 and seen["used_pages"] == 11
        assert "pages_written" not in seen and "areas" not in seen and "connections" not in seen
        admin = await StoreClient.connect("127.0.0.1", server.port, "ops", "r00t")
        whole = await admin.stats()
        assert whole["pages_written"] == 11 and whole["areas"] == 2 and whole["connections"] >= 3
        for client in (alpha, beta, admin):
            await client.close()
    finally:
        await server.close()
