"""The agent core in process, against fake stores (tests/fakestore.py): ordering,
quorum, failover, repair and the reserve bound, each in well under a second and
without a process or a socket. The same behaviours run against real store
processes in test_agent.py; these pin them down where faults are exact."""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Iterator

import pytest
from netswap.client.agent.core import Agent
from netswap.client.agent.machine.slots import COUNT_MASK
from netswap.client.agent.machine.table import IN_SYNC
from netswap.client.agent.payload import decode
from netswap.client.agent.remote import RemoteDevice
from netswap.client.agent.reserve import Reserve
from netswap.protocol import PAGE_SIZE, StoreError

from .fakestore import FakeStore

SLAB_PAGES = 256


def device_over(stores: list[FakeStore], *, replicas: int, quorum: int = 1,
                reserve_pages: int = 64, io_timeout: float = 2.0) -> RemoteDevice:  # fmt: skip
    by_port = {i: s for i, s in enumerate(stores)}

    async def connect(host: str, port: int, *args: object) -> object:
        return await by_port[port].connect(host, port, *args)  # type: ignore[arg-type]

    agent = Agent([("fake", i) for i in range(len(stores))], "unit", 4096,
                  Reserve(reserve_pages * PAGE_SIZE), replicas=replicas,
                  slab_slots=SLAB_PAGES, quorum=quorum, io_timeout=io_timeout,
                  connect_store=connect)  # type: ignore[arg-type]  # fmt: skip
    device = RemoteDevice(agent, 4096 * PAGE_SIZE, reserve_wait=io_timeout, write_back=False,
                          compress=True)  # fmt: skip
    device.start()
    return device


@pytest.fixture
def two() -> Iterator[tuple[RemoteDevice, FakeStore, FakeStore]]:
    a, b = FakeStore("a"), FakeStore("b")
    device = device_over([a, b], replicas=2)
    yield device, a, b
    device.close()


def page(n: int) -> memoryview:
    """A page of its own (not same-filled: those are read back without a store)."""
    return memoryview(bytes((n + i) % 251 for i in range(16)) * (PAGE_SIZE // 16))


def read(device: RemoteDevice, slot: int, count: int = 1) -> bytes:
    out = bytearray(count * PAGE_SIZE)
    device.pread(memoryview(out), slot * PAGE_SIZE)
    return bytes(out)


def wait(condition: object, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_the_last_write_wins_on_every_replica(
    two: tuple[RemoteDevice, FakeStore, FakeStore],
) -> None:
    device, a, b = two
    for n in range(5):
        device.pwrite(page(n), 7 * PAGE_SIZE, False)
    assert read(device, 7) == bytes(page(4))
    for store in (a, b):
        payload, _, generation = store.pages[7]
        out = memoryview(bytearray(PAGE_SIZE))
        assert decode(memoryview(payload), out) and bytes(out) == bytes(page(4))
        assert len(payload) < PAGE_SIZE  # compressed on its way (payload.py)
        assert generation & 0xFFFFFFFF == 5  # five writes


def test_one_rule_a_refusal_costs_the_write_only_below_its_quorum() -> None:
    """A store's refusal (ENOSPC) is that replica's miss, not the write's: at quorum 1
    the other replica's copy acknowledges it and the refusing replica is stale (never
    read as if it had the page); at quorum 2 the write fails with the store's errno."""
    for quorum in (1, 2):
        a, b = FakeStore("a"), FakeStore("b", write_error=errno.ENOSPC)
        device = device_over([a, b], replicas=2, quorum=quorum)
        try:
            if quorum == 2:
                with pytest.raises(StoreError) as info:
                    device.pwrite(page(1), 0, False)
                assert info.value.errno == errno.ENOSPC
                continue
            device.pwrite(page(1), 0, False)
            table = device.agent.machine.table
            assert [st for _, s, st in table.replicas_of(0) if s == 1] != [IN_SYNC]
            assert read(device, 0) == bytes(page(1))
        finally:
            device.close()


def test_a_store_that_dies_costs_no_error_and_its_replicas_go_stale(
    two: tuple[RemoteDevice, FakeStore, FakeStore],
) -> None:
    device, a, _ = two
    for slot in range(0, 64):
        device.pwrite(page(slot), slot * PAGE_SIZE, False)
    assert device.agent.loop is not None
    device.agent.loop.call_soon_threadsafe(a.kill)
    for slot in range(0, 64):  # reads fail over to b; new writes go to b alone
        assert read(device, slot) == bytes(page(slot))
        device.pwrite(page(slot + 1), slot * PAGE_SIZE, False)
    table = device.agent.machine.table
    states = [st for _, s, st in table.replicas_of(0) if s == 0]
    assert states and states[0] != IN_SYNC
    assert read(device, 0, 64) == b"".join(bytes(page(s + 1)) for s in range(64))


def test_a_store_back_empty_is_resynced_and_then_serves_alone(
    two: tuple[RemoteDevice, FakeStore, FakeStore],
) -> None:
    device, a, b = two
    for slot in range(0, 2 * SLAB_PAGES, 8):
        device.pwrite(page(slot), slot * PAGE_SIZE, False)
    loop = device.agent.loop
    assert loop is not None
    loop.call_soon_threadsafe(b.kill)
    wait(lambda: not device.agent.stores[1].up)
    b.refuse = False  # back, empty: the agent reconnects and copies both slabs to it
    wait(lambda: device.agent.machine.lag() == 0 and device.agent.stores[1].up)
    assert {s for s in b.pages} == set(range(0, 2 * SLAB_PAGES, 8))
    loop.call_soon_threadsafe(a.kill)
    for slot in range(0, 2 * SLAB_PAGES, 8):
        assert read(device, slot) == bytes(page(slot))


def test_in_flight_pages_never_exceed_the_reserve_and_writers_wait() -> None:
    """Both stores frozen: replies are held, so pages pile up in flight. The reserve
    (64 pages, its least) caps them; the other writers wait, then all finish on thaw."""
    a, b = FakeStore("a", frozen=True), FakeStore("b", frozen=True)
    device = device_over([a, b], replicas=2, reserve_pages=64, io_timeout=5.0)
    reserve = device.reserve
    peak, errors = [0], []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], reserve.used)
            time.sleep(0.001)

    def writer(n: int) -> None:
        try:
            device.pwrite(memoryview(bytes([n]) * (16 * PAGE_SIZE)), n * 16 * PAGE_SIZE, False)
        except StoreError as exc:
            errors.append(exc)

    watcher = threading.Thread(target=watch)
    watcher.start()
    writers = [threading.Thread(target=writer, args=(n,)) for n in range(8)]  # 128 pages
    try:
        for t in writers:
            t.start()
        wait(lambda: reserve.used == 64 and reserve.waits > 0)
        time.sleep(0.1)
        assert sum(t.is_alive() for t in writers) == 8  # none could finish: no store answered
        loop = device.agent.loop
        assert loop is not None
        for store in (a, b):
            loop.call_soon_threadsafe(store.thaw)
        for t in writers:
            t.join(10)
        assert not errors and peak[0] <= 64
        assert read(device, 0, 128) == b"".join(bytes([n]) * (16 * PAGE_SIZE) for n in range(8))
    finally:
        stop.set()
        watcher.join()
        device.close()


def test_a_read_in_flight_when_its_store_dies_is_served_by_the_other(
    two: tuple[RemoteDevice, FakeStore, FakeStore],
) -> None:
    device, a, b = two
    device.pwrite(page(3), 3 * PAGE_SIZE, False)
    a.frozen = b.frozen = True
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(read(device, 3)))
    reader.start()
    wait(lambda: a.held or b.held)  # the read waits at one replica...
    dying, other = (a, b) if a.held else (b, a)
    loop = device.agent.loop
    assert loop is not None
    loop.call_soon_threadsafe(dying.kill)  # ...which dies under it
    loop.call_soon_threadsafe(other.thaw)
    reader.join(5)
    assert got == [bytes(page(3))]
    assert device.agent.counters["read_fallbacks"] == 1


def test_a_direct_reply_that_arrived_in_time_counts_after_the_deadline() -> None:
    """A direct write waits for its replicas in turn: once a frozen one has used up
    the deadline, an answer the other sent long ago must still be read, not taken
    for a timeout (which marked a healthy store down: found by the SIGSTOP test)."""
    import socket

    from netswap.client.rpc import BlockingClient
    from netswap.protocol import PROTOCOL_VERSION, Connection, Hello, Ok, Role, SwapIn, Welcome

    ours, store = socket.socketpair()
    with ours, store:
        conn = BlockingClient(ours)
        server = Connection(Role.SERVER)
        server.receive_data(conn.conn.send(Hello(1, PROTOCOL_VERSION, "a", "")))
        server.next_event()
        conn.conn.receive_data(server.send(Welcome(1, PROTOCOL_VERSION, 0, 1)))
        conn.conn.next_event()
        server.receive_data(conn.conn.send(SwapIn(7, (1,))))
        server.next_event()
        store.sendall(server.send(Ok(7)))
        assert conn.reply(time.monotonic() - 1) == Ok(7)
        conn.conn.send(SwapIn(8, (1,)))  # no answer this time: a prompt timeout
        began = time.monotonic()
        with pytest.raises(TimeoutError):
            conn.reply(time.monotonic() - 1)
        assert time.monotonic() - began < 0.5


def test_an_epoch_raised_mid_run_fences_every_connection_again(
    two: tuple[RemoteDevice, FakeStore, FakeStore],
) -> None:
    """A slot's write count at 2^32 - 1 takes the next epoch (recorded first, P6). The
    connections fenced at the old one are fenced again at it: else the first new one
    (a reconnect) raises a store's floor above them, and the store refuses them as an
    older agent's -- this agent fenced out by itself."""
    device, a, b = two
    machine = device.agent.machine
    device.pwrite(page(1), 5 * PAGE_SIZE, False)
    old = machine.epoch
    with machine.lock:
        machine.slots.gens[5] = old << 32 | COUNT_MASK
    device.pwrite(page(2), 5 * PAGE_SIZE, False)
    assert machine.epoch == old + 1
    wait(lambda: a.floor == b.floor == old + 1 and all(s.up for s in device.agent.stores))
    loop = device.agent.loop
    assert loop is not None
    loop.call_soon_threadsafe(a.kill)  # a reconnect, fenced at the new epoch
    for n in range(3, 8):
        device.pwrite(page(n), n * PAGE_SIZE, False)
        assert read(device, n) == bytes(page(n))
    assert not machine.fenced_out
