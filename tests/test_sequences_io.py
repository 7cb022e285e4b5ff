"""#29's sequences of a running agent's reads and writes (its section 5), made to happen
with real processes: real `netswap store` processes, a real `netswap serve` (or, where a
thread must be caught between two steps, the device in this process over real stores),
libnbd, and a proxy between agent and store where a frame must wait (faultproxy.py).

Each test asserts what the promises (README: P1-P6) say must happen; each was run
against 6afe607, the agent before the replica machine, to confirm or refute the
sequence there: the figures are in the commit messages.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

import nbd
import pytest
from netswap.client.agent.keys import drop_key

from .faultkit import (
    PAGE,
    agent_on,
    lag,
    page_of,
    read_back,
    running,
    write_pages,
)
from .faultproxy import Proxy
from .nbdserver import connect
from .procs import StoreProc, store_used_pages, wait_until

AREA = f"sequences{os.getpid()}"
SLOTS = range(256)


@pytest.fixture(autouse=True)
def _drop_the_key() -> Iterator[None]:
    drop_key(AREA)
    yield
    drop_key(AREA)


# -- an unplaced replica is never filled -------------------------------------------------------
@pytest.mark.timeout(120)
def test_a_replica_left_unplaced_is_placed_when_its_store_comes_and_writes_go_on() -> None:
    """Two replicas, quorum two; B is not running when the slab is first written: the
    slab gets one replica, and the write fails (one copy of two). The kernel writes it
    again; once B is started, the second replica must be placed and filled, and the
    write acknowledged."""
    a, b = StoreProc("64M").start(), StoreProc("64M")
    agent = agent_on(AREA, [a, b], "--replicas", "2", "--quorum", "2")
    with running(a, b, agent):
        agent.start()
        h = connect(agent.uri)
        with pytest.raises(nbd.Error):
            h.pwrite(b"1" * PAGE, 0)  # one replica of two: the write fails
        b.start()
        failures, deadline = 0, time.monotonic() + 30
        while True:
            try:
                h.pwrite(b"1" * PAGE, 0)
                break
            except nbd.Error:
                failures += 1
                assert time.monotonic() < deadline, f"{failures} writes failed in 30 s"
                time.sleep(0.5)
        print(f"\nB started: the write went through after {failures} more failures")
        assert h.pread(PAGE, 0) == b"1" * PAGE
        h.shutdown()
        assert store_used_pages(b) == 1


# -- a refused write leaves a stale copy for good ------------------------------------------------
@pytest.mark.timeout(180)
def test_a_replica_that_refused_a_write_is_resynced_and_redundancy_comes_back() -> None:
    """B is full (256 pages) and refuses the write of new slots (ENOSPC); A takes them.
    Room is made on B (a trim), then A is killed -9 and restarted empty: A must be
    resynced -- from B -- and redundancy come back. The refused write is not written
    again meanwhile: where it failed, the kernel keeps the page dirty in memory and may
    not write it for a long while."""
    a, b = StoreProc("64M").start(), StoreProc("1M").start()
    agent = agent_on(AREA, [a, b], "--replicas", "2")
    with running(a, b, agent):
        agent.start()
        truth = write_pages(agent.uri, b"F", range(256))  # B full
        h = connect(agent.uri)
        extra = {300 + i: bytes([i + 1]) * PAGE for i in range(8)}
        try:
            h.pwrite(b"".join(extra.values()), 300 * PAGE)
            refused = ""
        except nbd.Error as exc:
            refused = str(exc)
        assert (store_used_pages(a), store_used_pages(b)) == (264, 256)  # B refused them
        h.trim(128 * PAGE, 0)  # room on B
        h.shutdown()
        truth = {s: p for s, p in truth.items() if s >= 128}
        if not refused:
            truth.update(extra)
        wait_until(lambda: lag(agent) == 0, 30, "both replicas in sync")
        a.kill()
        a.start()
        try:
            wait_until(lambda: lag(agent) == 0, 30, "A resynced from B")
        finally:
            print(f"\nB refused a write ({refused or 'the write was acknowledged'}); "
                  f"A restarted: lag {lag(agent)} pages")  # fmt: skip
        b.kill()  # A alone
        found = read_back(agent.uri, truth)
        print(f"A alone: read back {found}")
        assert found.right == found.pages, (str(found), found.first_bad)


# -- a read racing a write on the same slot gets EIO -----------------------------------------
@pytest.mark.timeout(120)
def test_a_read_overtaken_by_writes_of_its_slot_gets_one_of_their_pages_never_eio() -> None:
    """NBD leaves a read that races writes of its block to any of their pages. The read
    of slot 5 is asked at generation g and its request held (the proxy); writes g+1 and
    g+2 are acknowledged, g+3 is on its way (held); then the read reaches the store,
    which answers g+2. That is the page of a write that raced the read: it must be
    served (or g+3's), never EIO."""
    from netswap.protocol.messages import SwapIn, SwapOut

    store = StoreProc("64M").start()
    proxy = Proxy(store)
    agent = agent_on(AREA, [proxy.address], "--replicas", "1")
    with running(store, proxy, agent):
        agent.start()
        # Pages of their own: a same-filled page is read back without a store.
        versions = [bytes(range(n, n + 16)) * (PAGE // 16) for n in range(4)]
        h = connect(agent.uri)
        h.pwrite(versions[0], 4 * PAGE)  # the slab placed: writes go from nbdkit's thread
        h.pwrite(versions[0], 5 * PAGE)  # g
        first = list(proxy.links)
        proxy.hold(SwapIn.TYPE, links=first)
        got: list[bytes | str] = []

        def reader() -> None:
            r = connect(agent.uri)
            try:
                got.append(bytes(r.pread(PAGE, 5 * PAGE)))
            except nbd.Error as exc:
                got.append(str(exc))
            r.shutdown()

        thread = threading.Thread(target=reader, daemon=True)
        thread.start()
        wait_until(lambda: proxy.held(first) > 0, 10, "the read on its way")
        h.pwrite(versions[1], 5 * PAGE)  # g+1 and g+2 acknowledged
        h.pwrite(versions[2], 5 * PAGE)
        later = [link for link in proxy.links if link not in first]
        proxy.hold(SwapOut.TYPE, links=later)
        writer = threading.Thread(target=h.pwrite, args=(versions[3], 5 * PAGE), daemon=True)
        writer.start()  # g+3 begun, held
        wait_until(lambda: proxy.held(later) > 0, 10, "write g+3 on its way")
        proxy.release(first)
        thread.join(30)
        proxy.release(later)
        writer.join(30)
        h.shutdown()
        print(f"\na read overtaken by two writes of its slot: {str(got[0])[:60]!r}")
        assert got[0] in versions[2:], got[0]


# -- a direct read gives its connection back before it copies the pages out ------------------
@pytest.mark.timeout(60)
def test_a_direct_read_copies_its_pages_out_before_its_connection_serves_another() -> None:
    """A lone read goes from nbdkit's thread over a connection of the store's pool, and
    its pages are views into that connection's buffer. Given back to the pool, the
    connection serves the next thread's request, whose reply lands in the same buffer.
    Here that next request comes at once (the pool's give is wrapped: another thread's
    read of slot 9 goes on the connection the moment it is given back): the read of slot
    5 must still return slot 5's page. Plaintext (no key): nothing is copied in between."""
    from netswap.client.agent import stores as stores_module
    from netswap.client.agent.remote import RemoteDevice
    from netswap.protocol.messages import SwapIn

    store = StoreProc("64M").start()
    real_give = stores_module.Store.give
    reused: list[int] = []

    def give_then_reuse(self: stores_module.Store, client: object) -> None:
        real_give(self, client)  # type: ignore[arg-type]
        if reused:
            return
        again = self.take()  # the pool's last: the connection just given back
        assert again is client
        again.call(SwapIn(again.next_id(), (range(9, 10),), False), 5.0)
        reused.append(1)
        real_give(self, again)

    with running(store):
        device = RemoteDevice.open(
            stores=[store.address], area=AREA, size=4 << 20, replicas=1, quorum=1,
            reserve=1 << 20, slab=4 << 20, token_file="", batch_pages=64,
            batch_linger_us=200, write_back=False,
        )  # fmt: skip
        device.start()
        try:
            for slot in (5, 9):
                device.pwrite(memoryview(page_of(b"D", slot)), slot * PAGE, False)
            stores_module.Store.give = give_then_reuse  # type: ignore[method-assign]
            out = bytearray(PAGE)
            try:
                device.pread(memoryview(out), 5 * PAGE)
            finally:
                stores_module.Store.give = real_give  # type: ignore[method-assign]
            print(f"\na direct read whose connection served another read at once: "
                  f"slot 5 read {bytes(out[:8])!r}")  # fmt: skip
            assert reused, "the read did not go direct"
            assert bytes(out) == page_of(b"D", 5)
        finally:
            device.close()
