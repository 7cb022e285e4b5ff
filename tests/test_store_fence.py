"""Fencing and newer-only writes (protocol 4), on real store processes where it matters:
a dead agent's frames never apply after a newer agent's epoch, and a replayed or
late write never rolls a slot back."""

from __future__ import annotations

import asyncio
import errno
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path

import pytest
from netswap.client.rpc import BlockingClient, StoreClient
from netswap.protocol import PAGE_SIZE, Discard, Fence, Hello, Ok, StoreError, Swapfile, SwapOut
from netswap.protocol import PROTOCOL_VERSION as V
from netswap.server.backends import FileBackend, MemoryBackend
from netswap.server.service import Session, Slices, StoreService, Tokens

from .procs import StoreProc


def page(byte: int) -> bytes:
    return bytes([byte]) * PAGE_SIZE


async def connect(store: StoreProc, area: str = "h") -> StoreClient:
    return await StoreClient.connect("127.0.0.1", store.port, area, deadline=10)


@pytest.fixture
async def memory_store() -> AsyncIterator[StoreProc]:
    store = StoreProc("16M").start()
    yield store
    store.kill()


async def refused(call: Awaitable[None], code: int) -> str:
    with pytest.raises(StoreError) as info:
        await call
    assert info.value.errno == code, info.value
    return info.value.reason


async def test_a_newer_epoch_refuses_an_older_sessions_changes(memory_store: StoreProc) -> None:
    old, new, never = [await connect(memory_store) for _ in range(3)]
    await old.fence(5)
    await old.swapfile(True, 1024)
    await old.swap_out([0, 1], page(1) * 2, [5 << 32 | 1] * 2)
    await new.fence(7)  # a newer agent took the area over
    assert "held by a newer agent (epoch 7)" in await refused(
        old.swap_out([0], page(2), [5 << 32 | 2]), errno.ESTALE
    )
    await refused(old.discard([(0, 2)]), errno.ESTALE)
    await refused(old.swapfile(True, 2048), errno.ESTALE)
    await refused(old.swapfile(False, 0), errno.ESTALE)
    await refused(old.fence(6), errno.ESTALE)  # an older Fence: refused, still unfenced
    await refused(old.swap_out([0], page(2), [5 << 32 | 2]), errno.ESTALE)
    await refused(never.swap_out([0], page(3), [9 << 32 | 1]), errno.ESTALE)  # epoch 0
    assert await old.swap_in([0, 1], [5 << 32 | 1] * 2) == page(1) * 2  # reads change nothing
    await new.swap_out([0], page(4), [7 << 32 | 2])
    assert await new.swap_in([0, 1], [7 << 32 | 2, 5 << 32 | 1]) == page(4) + page(1)
    assert (await connect(memory_store)).welcome.floor == 7  # type: ignore[union-attr]
    # The thread path's client fences on its own connection the same way.
    blocking = BlockingClient.open("127.0.0.1", memory_store.port, "h", "", 10)
    with pytest.raises(StoreError) as info:
        blocking.fence(6, 10)
    assert info.value.errno == errno.ESTALE
    blocking.fence(7, 10)
    assert blocking.welcome is not None and blocking.welcome.floor == 7
    blocking.close()
    for client in (old, new, never):
        await client.close()


async def test_an_unfenced_area_works_as_before_protocol_4(memory_store: StoreProc) -> None:
    a, b = await connect(memory_store), await connect(memory_store)
    await a.swapfile(True, 16)
    await a.swap_out([3], page(1))
    await b.swap_out([3], page(2), [2])  # neither ever fenced: the floor is 0
    assert await a.swap_in([3], [2]) == page(2)
    await b.fence(0)  # fencing at 0 changes nothing either
    await a.discard([(0, 16)])
    await a.close()
    await b.close()


async def test_a_file_store_killed_after_a_fence_still_refuses_the_older_epoch(
    tmp_path: Path,
) -> None:
    store = StoreProc("16M", ("--backend", "file", "--path", str(tmp_path / "s"))).start()
    try:
        client = await connect(store)
        await client.fence(3)
        await client.swapfile(True, 64)
        await (await connect(store)).fence(9)  # answered: durable before the answer
        store.kill()  # -9: no flush, no goodbye
        store.start()
        again = await connect(store)
        assert again.welcome is not None and again.welcome.floor == 9
        await refused(again.fence(3), errno.ESTALE)
        await refused(again.swapfile(True, 64), errno.ESTALE)  # still unfenced
        await again.fence(10)
        await again.swapfile(True, 64)
        await again.close()
    finally:
        store.kill()


def session_on(service: StoreService, area: str = "h") -> Session:
    session = service.session()
    assert not isinstance(session.handle(Hello(1, V, area)), Slices)
    return session


def run(reply: object) -> object:
    """A reply, its slices run to the end (as transport.py runs them, without a loop)."""
    if not isinstance(reply, Slices):
        return reply
    while (done := reply.run_slice()) is not True:
        if not isinstance(done, bool):
            done.result()
    return reply.reply


def test_a_sliced_discard_stops_at_the_first_slice_after_a_newer_fence() -> None:
    """Frames queued at the store are no way around the fence: an older agent's
    Discard in slices stops (ESTALE) once a newer agent fenced, and the pages the
    newer one wrote meanwhile stay."""
    service = StoreService(MemoryBackend(1 << 16), Tokens.open())
    old, new = session_on(service), session_on(service)
    assert run(old.handle(Fence(2, 1))) == Ok(2)
    assert old.handle(Swapfile(3, True, 1 << 16)) == Ok(3)
    slots = range(0, 1 << 16, 256)  # one page in each of 256 clusters: many slices
    for n, slot in enumerate(slots):
        assert old.handle(SwapOut(4 + n, [slot], page(1), [0], [1 << 32 | 1])) == Ok(4 + n)
    discard = old.handle(Discard(1000, ((0, 1 << 16),)))
    assert isinstance(discard, Slices) and discard.run_slice() is False
    assert run(new.handle(Fence(5, 2))) == Ok(5)
    assert new.handle(SwapOut(6, [1 << 15], page(2), [0], [2 << 32 | 2])) == Ok(6)
    reply = run(discard)
    assert getattr(reply, "errno", None) == errno.ESTALE
    area = service.backend.areas["h"]
    assert 0 < area.used < len(slots) and area.page(1 << 15) != -1


@pytest.mark.parametrize("kind", ["memory", "file"])
def test_a_write_no_newer_than_the_slots_page_is_skipped(kind: str, tmp_path: Path) -> None:
    """In process, both backends (the file one copies on write): an older generation
    or the same one is not written, the rest of its batch is; Stats counts them."""
    backend = MemoryBackend(64) if kind == "memory" else FileBackend(tmp_path, 64)
    service = StoreService(backend, Tokens.open())  # turns newer-only on
    session = session_on(service)
    assert session.handle(Swapfile(2, True, 64)) == Ok(2)
    assert session.handle(SwapOut(3, [5, 6], page(1) * 2, [0, 0], [4, 4])) == Ok(3)
    # slot 5 older (3), slot 6 the same (4: a resync's copy), slot 7 new: only 7 lands
    assert session.handle(SwapOut(4, [5, 6, 7], page(2) * 3, [0] * 3, [3, 4, 1])) == Ok(4)
    area = backend.areas["h"]
    out = memoryview(bytearray(3 * PAGE_SIZE))
    backend.verify = False  # the tags above are not real ones; the bytes are what counts
    _, gens = backend.read(area, [5, 6, 7], out)
    assert bytes(out) == page(1) * 2 + page(2) and list(gens) == [4, 4, 1]
    assert service.stats()["pages_superseded"] == 2
    assert service.stats()["pages_written"] == 3
    assert backend.area_stats(area)["area_pages_superseded"] == 2
    backend.close()


def test_the_embedded_device_keeps_overwriting_at_its_one_generation() -> None:
    """No service, no newer-only rule: the device writes LOCAL_GENERATION every time."""
    backend = MemoryBackend(16)
    area = backend.activate("dev", 16)
    backend.write_range(area, 0, 1, memoryview(page(1)))
    backend.write_range(area, 0, 1, memoryview(page(2)))
    out = memoryview(bytearray(PAGE_SIZE))
    backend.read_range(area, 0, 1, out)
    assert bytes(out) == page(2) and backend.counters["pages_superseded"] == 0


async def test_a_late_write_from_an_older_connection_never_replaces_a_newer_page(
    memory_store: StoreProc,
) -> None:
    """A real store: a write of generation 2 acknowledged, then one of generation 1
    (a frame of an older connection, late) is skipped, still answered Ok, and so is
    one of generation 2 again (a resync's copy)."""
    first, late = await connect(memory_store), await connect(memory_store)
    await first.swapfile(True, 8)
    await first.swap_out([2], page(9), [2])
    await late.swap_out([2], page(8), [1])
    await late.swap_out([2], page(7), [2])
    assert await first.swap_in([2], [2]) == page(9)
    stats = await first.stats()
    assert stats["pages_superseded"] == 2 and stats["area_pages_superseded"] == 2
    await asyncio.gather(first.close(), late.close())
