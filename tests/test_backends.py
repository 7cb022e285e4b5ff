"""Backends: slot mapping, ENOSPC atomicity, checksums, durability, overhead."""

from __future__ import annotations

import errno
import os
import random
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path

import pytest
from netswap.protocol import PAGE_SIZE, StoreError
from netswap.server.backends import FileBackend, MemoryBackend, PageBackend
from netswap.server.backends.base import Step
from netswap.server.backends.slotmap import CLUSTER_SLOTS


def pages(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n * PAGE_SIZE)


def read(backend: PageBackend, area: str, slots: list[int]) -> bytes:
    out = bytearray(len(slots) * PAGE_SIZE)
    backend.read(backend.area(area), slots, memoryview(out))
    return bytes(out)


@pytest.fixture(params=["memory", "file"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> PageBackend:
    if request.param == "memory":
        return MemoryBackend(32)
    return FileBackend(tmp_path / "store", 32)


def test_pages_read_back_in_any_order_and_unwritten_slots_are_zero(backend: PageBackend) -> None:
    area = backend.activate("a", 100)
    data = pages(3)
    backend.write(area, [7, 2, 99], memoryview(data), None)
    got = read(backend, "a", [99, 7, 50, 2])
    assert (
        got
        == data[2 * PAGE_SIZE :]
        + data[:PAGE_SIZE]
        + bytes(PAGE_SIZE)
        + data[PAGE_SIZE : 2 * PAGE_SIZE]
    )
    assert area.used == 3


def test_overwrite_and_discard(backend: PageBackend) -> None:
    area = backend.activate("a", 10)
    backend.write(area, [1], memoryview(pages(1, 1)), None)
    backend.write(area, [1], memoryview(pages(1, 2)), None)
    assert read(backend, "a", [1]) == pages(1, 2)
    backend.discard(area, 0, 5)
    assert read(backend, "a", [1]) == bytes(PAGE_SIZE)
    assert area.used == 0


def test_full_store_refuses_a_batch_whole_and_keeps_serving(backend: PageBackend) -> None:
    area = backend.activate("a", 1000)
    backend.write(area, list(range(30)), memoryview(pages(30)), None)
    with pytest.raises(StoreError) as info:
        backend.write(area, list(range(100, 105)), memoryview(pages(5, 9)), None)
    assert info.value.errno == errno.ENOSPC
    assert read(backend, "a", [100, 101]) == bytes(2 * PAGE_SIZE)  # nothing half-written
    assert read(backend, "a", list(range(30))) == pages(30)
    backend.write(area, [200, 201], memoryview(pages(2, 3)), None)  # the last two fit
    backend.discard(area, 0, 10)
    if isinstance(backend, FileBackend):
        backend.flush()  # copy-on-write pages are reusable after a flush
    backend.write(area, list(range(100, 105)), memoryview(pages(5, 9)), None)
    assert read(backend, "a", list(range(100, 105))) == pages(5, 9)


def test_slots_outside_the_area_are_einval(backend: PageBackend) -> None:
    area = backend.activate("a", 4)
    with pytest.raises(StoreError) as info:
        backend.write(area, [4], memoryview(pages(1)), None)
    assert info.value.errno == errno.EINVAL
    with pytest.raises(StoreError):
        backend.discard(area, 2, 3)
    with pytest.raises(StoreError) as missing:
        backend.area("nope")
    assert missing.value.errno == errno.ENXIO


def test_areas_grow_but_do_not_shrink_and_release_frees_pages(backend: PageBackend) -> None:
    area = backend.activate("a", 4)
    backend.write(area, [3], memoryview(pages(1)), None)
    backend.activate("a", 8)
    assert backend.area("a").pages == 8 and read(backend, "a", [3]) == pages(1)
    with pytest.raises(StoreError):
        backend.activate("a", 2)
    backend.release("a")
    backend.flush()
    assert backend.used_pages == 0 and "a" not in backend.areas


def test_a_corrupted_page_is_eio_and_counted_never_returned(backend: PageBackend) -> None:
    area = backend.activate("a", 4)
    backend.write(area, [0, 1], memoryview(pages(2)), None)
    page = area.page(1)
    if isinstance(backend, MemoryBackend):
        backend._view[page * PAGE_SIZE] ^= 0xFF
    else:
        assert isinstance(backend, FileBackend)
        backend.flush()
        with open(backend.path / "pages", "r+b") as f:
            f.seek(page * PAGE_SIZE + 100)
            f.write(b"\xff\xfe")
    with pytest.raises(StoreError) as info:
        read(backend, "a", [0, 1])
    assert info.value.errno == errno.EIO
    assert backend.counters["checksum_errors"] == 1
    assert read(backend, "a", [0]) == pages(2)[:PAGE_SIZE]


def test_file_store_restarted_serves_every_page_acknowledged_before_flush(tmp_path: Path) -> None:
    path = tmp_path / "s"
    first = FileBackend(path, 64)
    area = first.activate("host1", 50)
    first.write(area, list(range(10)), memoryview(pages(10, 1)), None)
    first.flush()
    # After the flush: overwrite some, add some, discard some -- then "crash".
    first.write(area, [0, 1, 20], memoryview(pages(3, 2)), None)
    first.discard(area, 5, 2)
    first.close()  # no flush: the process died

    second = FileBackend(path, 64)
    assert read(second, "host1", list(range(10))) == pages(10, 1)
    assert read(second, "host1", [20]) == bytes(PAGE_SIZE)
    # and it keeps working, reusing only free pages
    area2 = second.area("host1")
    second.write(area2, list(range(10, 40)), memoryview(pages(30, 5)), None)
    second.flush()
    assert read(second, "host1", list(range(10))) == pages(10, 1)
    second.close()
    third = FileBackend(path, 64)
    assert read(third, "host1", list(range(10, 40))) == pages(30, 5)


def run_steps(steps: Iterator[Step], between: Callable[[int], None]) -> None:
    """Drive a sliced flush as the store's loop does, calling `between` after each step."""
    for n, step in enumerate(steps):
        if isinstance(step, Future):
            step.result()
        between(n)


def test_writes_during_a_sliced_flush_lose_nothing_at_a_crash(tmp_path: Path) -> None:
    """Other clients write, rewrite and discard while the flush builds its records:
    after a crash, every slot holds its pre-flush page or a newer one, never EIO,
    and a page retired during the flush is not reused until the next one."""
    path = tmp_path / "s"
    first = FileBackend(path, 4096)
    area = first.activate("a", 1 << 16)
    spread = [n * CLUSTER_SLOTS for n in range(64)]  # one page in each of 64 clusters
    first.write(area, spread, memoryview(pages(64, 1)), None)
    first.flush()
    seen: dict[int, set[bytes]] = {s: {pages(64, 1)[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]}
                                   for i, s in enumerate(spread)}  # fmt: skip

    def meanwhile(n: int) -> None:
        if n < 64:  # rewrite a slot whose record may or may not be taken yet
            slot = spread[(n * 37) % 64]
            data = pages(1, 100 + n)
            first.write(area, [slot], memoryview(data), None)
            seen[slot].add(data)
        if n == 10:
            first.discard(area, spread[63], 1)  # a whole cluster goes mid-flush
            seen[spread[63]].add(bytes(PAGE_SIZE))

    run_steps(first.flush_steps(), meanwhile)
    assert len(first._retired) > 0  # retired meanwhile: kept for the next flush
    # New slots take pages off the top of the free stack, where wrongly freed pages
    # would be: a record taken before its slot's rewrite would then name another page.
    first.write(area, list(range(1, 129)), memoryview(pages(128, 7)), None)
    first.close()  # crash: no further flush

    second = FileBackend(path, 4096)
    for slot, versions in seen.items():
        assert read(second, "a", [slot]) in versions, slot
    second.close()


def test_a_synchronous_flush_supersedes_a_sliced_one_left_mid_way(tmp_path: Path) -> None:
    backend = FileBackend(tmp_path / "s", 1024)
    area = backend.activate("a", 1 << 16)
    backend.write(area, [n * CLUSTER_SLOTS for n in range(8)], memoryview(pages(8, 3)), None)
    sliced = backend.flush_steps()
    next(sliced)  # the store stopped with this flush at its first record
    backend.write(area, [5], memoryview(pages(1, 9)), None)
    backend.flush()  # shutdown: covers everything, then the old one must not interfere
    assert list(sliced) == []  # it sees it was superseded and ends
    assert list((tmp_path / "s").glob("index.tmp*")) == []
    backend.close()
    again = FileBackend(tmp_path / "s", 1024)
    assert (
        read(again, "a", [5, CLUSTER_SLOTS]) == pages(1, 9) + pages(8, 3)[PAGE_SIZE : 2 * PAGE_SIZE]
    )


def test_file_backend_flushes_itself_to_reuse_rewritten_pages(tmp_path: Path) -> None:
    backend = FileBackend(tmp_path / "s", 8)
    area = backend.activate("a", 8)
    for seed in range(20):  # 20 rewrites of 4 slots through an 8-page arena
        backend.write(area, [0, 1, 2, 3], memoryview(pages(4, seed)), None)
    assert read(backend, "a", [0, 1, 2, 3]) == pages(4, 19)


def test_memory_overhead_at_one_million_pages_is_under_two_percent() -> None:
    n = 1 << 20
    backend = MemoryBackend(n)
    area = backend.activate("big", n)
    # Map every slot, as a full 4 GiB swap area would (writes one byte-identical page
    # per 256 slots to keep the test quick; the index cost is the same either way).
    page = memoryview(pages(1))
    for slot in range(0, n, 256):
        backend.write(area, [slot], page, None)
    overhead = backend.metadata_bytes() / (n * PAGE_SIZE)
    assert overhead <= 0.02, f"{overhead:.4%}"
    # tag 4 + generation 8 + free stack 4 + slot map 4 bytes per page
    assert backend.metadata_bytes() / n <= 20
    backend.write(area, [1], page, None, None, bytes(16))  # sealed pages keep 16 B more
    assert backend.metadata_bytes() / n <= 36
    backend.close()


def test_file_index_rejects_a_smaller_capacity(tmp_path: Path) -> None:
    backend = FileBackend(tmp_path / "s", 16)
    backend.activate("a", 4)
    backend.flush()
    backend.close()
    with pytest.raises(ValueError, match="cannot shrink"):
        FileBackend(tmp_path / "s", 8)
    assert os.path.getsize(tmp_path / "s" / "pages") == 16 * PAGE_SIZE


@pytest.mark.parametrize("seed", range(6))
def test_range_and_slot_operations_agree_with_a_model(backend: PageBackend, seed: int) -> None:
    """Random mixes of batch writes, range writes, range reads and discards."""
    rng = random.Random(seed)
    slots = 24
    area = backend.activate("m", slots)
    model = {s: bytes(PAGE_SIZE) for s in range(slots)}
    for step in range(300):
        op = rng.choice(["write", "write_range", "read_range", "discard", "flush"])
        first = rng.randrange(slots)
        count = rng.randint(1, min(6, slots - first))
        if op in ("write", "write_range"):
            data = rng.randbytes(count * PAGE_SIZE)
            targets = (
                list(range(first, first + count))
                if op == "write_range"
                else rng.sample(range(slots), count)
            )
            try:
                if op == "write_range":
                    backend.write_range(area, first, count, memoryview(data))
                else:
                    backend.write(area, targets, memoryview(data), None)
            except StoreError as exc:
                assert exc.errno == errno.ENOSPC  # 24 slots, 32 pages: only under churn
                continue
            for i, s in enumerate(targets):
                model[s] = data[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]
        elif op == "read_range":
            out = bytearray(count * PAGE_SIZE)
            backend.read_range(area, first, count, memoryview(out))
            expect = b"".join(model[s] for s in range(first, first + count))
            assert out == expect, (seed, step)
        elif op == "discard":
            backend.discard(area, first, count)
            for s in range(first, first + count):
                model[s] = bytes(PAGE_SIZE)
        else:
            backend.flush()
    assert read(backend, "m", list(range(slots))) == b"".join(model[s] for s in range(slots))
    mapped = sum(1 for s in range(slots) if area.page(s) != -1)
    assert area.used == mapped


def test_sequential_range_writes_stay_contiguous_and_read_as_one_run() -> None:
    backend = MemoryBackend(64)
    area = backend.activate("a", 64)
    data = pages(32, 7)
    backend.write_range(area, 0, 32, memoryview(data))
    assert list(area.run(0, 32)) == list(range(32))
    out = bytearray(32 * PAGE_SIZE)
    backend.read_range(area, 0, 32, memoryview(out))
    assert out == data
    with pytest.raises(StoreError):
        backend.write_range(area, 60, 5, memoryview(pages(5)))


def test_a_run_write_that_falls_back_to_single_pages_charges_its_new_cluster_once() -> None:
    """The top of the free stack is not a run, so a fresh run of slots takes the per-page
    path: the cluster it opens is counted once (it was counted twice, and never given back)."""
    backend = MemoryBackend(64)
    area = backend.activate("a", 4 * CLUSTER_SLOTS)
    backend.write(area, [0, 2, 4, 6], memoryview(pages(4)), None)
    backend.discard(area, 2, 1)  # frees one page off the run: the stack's top is no run now
    backend.write_range(area, 2 * CLUSTER_SLOTS, 3, memoryview(pages(3, 1)))
    assert backend.budget.held == len(area.clusters) == 2
    assert read(backend, "a", [2 * CLUSTER_SLOTS + i for i in range(3)]) == pages(3, 1)


def test_a_batch_of_consecutive_slots_is_one_run_of_pages_read_back_as_written() -> None:
    backend = MemoryBackend(64)
    area = backend.activate("a", 64)
    backend.write(area, [5, 6, 7, 8], memoryview(pages(4, 2)), None)
    assert list(area.run(5, 4)) == [0, 1, 2, 3]
    backend.write(area, (6, 7), memoryview(pages(2, 3)), None)  # rewritten in place
    assert list(area.run(5, 4)) == [0, 1, 2, 3]
    assert (
        read(backend, "a", [5, 6, 7, 8])
        == pages(4, 2)[:PAGE_SIZE] + pages(2, 3) + pages(4, 2)[3 * PAGE_SIZE :]
    )
    assert backend.counters["pages_written"] == 6 and area.used == 4
