"""Payloads shorter than a page in the stores' backends (in process, both backends):
size classes, bytes accounting, ENOSPC and quotas in bytes, compaction's bound, a
file store's index of objects, and a model of random work checked step by step."""

from __future__ import annotations

import errno
import random
import zlib
from array import array
from pathlib import Path

import pytest
from netswap.protocol import PAGE_SIZE, SEAL_SIZE, StoreError, area_seed, tags_of_sized
from netswap.server.backends import FileBackend, MemoryBackend, PageBackend
from netswap.server.backends import classes as cl
from netswap.server.backends import index as idx
from netswap.server.backends.objects import LIVE, SLACK, object_of
from netswap.server.backends.slotmap import UNMAPPED

# A payload of every kind: tiny and inline, class edges, the agent's granules, the
# longest shorter than a page, a whole page.
EVERY = [1, 7, 8, 9, 255, 256, 257, 1300, 1536, 2000, 2304, 3072, 3073, 3840, 3841, 4095,
         PAGE_SIZE]  # fmt: skip


def make(kind: str, tmp_path: Path, pages: int) -> PageBackend:
    backend = MemoryBackend(pages) if kind == "memory" else FileBackend(tmp_path / "s", pages)
    backend.newer_only = True  # as the store's service sets it
    return backend


@pytest.fixture(params=["memory", "file"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def write(
    backend: PageBackend,
    slots: list[int],
    payloads: list[bytes],
    gen: int = 1,
    seals: bytes | None = None,
    area: str = "a",
) -> None:
    a = backend.area(area)
    lengths = array("H", [len(p) for p in payloads])
    gens = array("Q", [gen] * len(slots))
    data = b"".join(payloads)
    tags = tags_of_sized(data, lengths, a.seed, slots, gens)
    runs = tuple(range(s, s + 1) for s in slots)
    backend.write_runs(a, runs, memoryview(data), tags, gens, seals, lengths)


def read(backend: PageBackend, slots: list[int], area: str = "a") -> list[bytes]:
    a = backend.area(area)
    runs = tuple(range(s, s + 1) for s in slots)
    out, lengths, tags, gens, _ = backend.read_payloads(a, runs, False)
    if lengths is None:
        lengths = array("H", [PAGE_SIZE]) * len(slots)
    assert tags_of_sized(out, lengths, area_seed(area), slots, gens) == tags
    got, at = [], 0
    for length in lengths:
        got.append(bytes(out[at : at + length]))
        at += length
    return got


def check(backend: PageBackend) -> None:
    """The books balance: every arena page is free, a whole page, a zspage's, an inline
    reservation, or retired (file) -- once each; every object is where its zspage says;
    each area's figures are its slots'."""
    objects = backend.objects
    owners: list[int] = list(backend.free) + list(objects.inline_pages)
    owners += [h for h in getattr(backend, "_retired", []) if h >= 0]
    spots_used = [0] * (cl.CLASSES + 1)
    spots = [0] * (cl.CLASSES + 1)
    for zs, c in enumerate(objects.zs_class):
        if objects.zs_state[zs] == 0:
            continue
        owners += objects.zs_pages[
            zs * cl.MAX_ZSPAGE_PAGES : zs * cl.MAX_ZSPAGE_PAGES + cl.PAGES[c]
        ]
        taken = [i for i in range(cl.SPOTS[c]) if not objects.zs_free[zs] >> i & 1]
        assert objects.zs_used[zs] == len(taken)
        for i in taken:
            obj = objects.zs_objects[zs * cl.MAX_SPOTS + i]
            assert objects.state[obj] != 0 and objects.where[obj] == zs << 4 | i
        if objects.zs_state[zs] == 1:
            spots[c] += cl.SPOTS[c]
            spots_used[c] += len(taken)
    assert spots == objects.spots and spots_used == objects.used
    for c in range(1, cl.CLASSES + 1):  # compaction's bound
        assert spots[c] - spots_used[c] <= cl.SPOTS[c] + spots_used[c] // SLACK
    for area in backend.areas.values():
        small = small_bytes = 0
        for cluster in area.clusters.values():
            for handle in cluster[: len(cluster) - 1]:
                if handle >= 0:
                    owners.append(handle)
                elif handle != UNMAPPED:
                    obj = object_of(handle)
                    assert objects.state[obj] == LIVE
                    small, small_bytes = small + 1, small_bytes + objects.lengths[obj]
        assert (area.small, area.small_bytes) == (small, small_bytes)
    assert sorted(owners) == list(range(backend.capacity_pages))
    assert -(-objects.inline // cl.INLINE_PER_PAGE) <= len(objects.inline_pages)
    assert backend.used_bytes == (backend.capacity_pages - len(backend.free)) * PAGE_SIZE


def test_payloads_of_every_class_read_back_at_their_length(kind: str, tmp_path: Path) -> None:
    backend = make(kind, tmp_path, 64)
    backend.activate("a", 100)
    rng = random.Random(1)
    payloads = [rng.randbytes(n) for n in EVERY]
    slots = list(range(20, 20 + len(EVERY)))
    write(backend, slots, payloads)
    assert read(backend, slots) == payloads
    assert read(backend, [*slots[::-1], 99]) == [*payloads[::-1], bytes(PAGE_SIZE)]
    slots_held, gens, lengths = backend.inventory(backend.area("a"), 0, 100)
    assert list(slots_held) == slots and list(lengths) == EVERY and set(gens) == {1}
    check(backend)
    if isinstance(backend, FileBackend):  # and after a restart
        backend.flush()
        backend.close()
        again = FileBackend(tmp_path / "s", 64)
        assert read(again, slots) == payloads
        assert list(again.inventory(again.area("a"), 0, 100)[2]) == EVERY
        check(again)


def test_a_batch_of_whole_pages_reads_back_without_lengths(kind: str, tmp_path: Path) -> None:
    backend = make(kind, tmp_path, 16)
    area = backend.activate("a", 100)
    write(backend, [1, 2], [bytes(PAGE_SIZE), b"x" * PAGE_SIZE])
    out, lengths, *_ = backend.read_payloads(area, (range(1, 3), range(50, 51)), False)
    assert lengths is None and bytes(out) == bytes(PAGE_SIZE) + b"x" * PAGE_SIZE + bytes(PAGE_SIZE)
    write(backend, [2], [b"y" * 100], 2)
    out, lengths, *_ = backend.read_payloads(area, (range(1, 3),), False)
    assert list(lengths or []) == [PAGE_SIZE, 100]


def test_a_payload_takes_its_class_not_a_page(kind: str, tmp_path: Path) -> None:
    """Eight 1,300-byte payloads take one zspage of class 6 (1,536 B spots, 3 pages for
    8), not eight pages; 64 words take one reserved page and no arena byte."""
    backend = make(kind, tmp_path, 64)
    area = backend.activate("a", 1000)
    assert (cl.class_of(1300), cl.PAGES[6], cl.SPOTS[6]) == (6, 3, 8)
    write(backend, list(range(8)), [bytes([i]) * 1300 for i in range(8)])
    assert backend.used_bytes == 3 * PAGE_SIZE and backend.used_pages == 8
    assert backend.payload_bytes == 8 * 1300 and area.held_bytes == 8 * 1536
    write(backend, list(range(100, 164)), [i.to_bytes(8, "little") for i in range(64)])
    assert backend.used_bytes == 4 * PAGE_SIZE and backend.objects.inline == 64
    assert area.held_bytes == 8 * 1536 + 64 * cl.INLINE_COST
    write(backend, [164], [b"\1" * 8])  # the 65th word: a second reserved page
    assert backend.used_bytes == 5 * PAGE_SIZE
    stats = backend.stats()
    assert stats["used_bytes"] == 5 * PAGE_SIZE and stats["payload_bytes"] == 8 * 1300 + 65 * 8
    assert stats["capacity_bytes"] == 64 * PAGE_SIZE and stats["used_pages"] == 73
    assert read(backend, [3, 150]) == [b"\3" * 1300, (50).to_bytes(8, "little")]
    check(backend)


def test_rewrites_move_payloads_between_classes_and_pages(kind: str, tmp_path: Path) -> None:
    backend = make(kind, tmp_path, 32)
    area = backend.activate("a", 100)
    sizes = [PAGE_SIZE, 300, 8, 2500, PAGE_SIZE, 300]
    for gen in range(1, 8):
        rng = random.Random(gen)
        payloads = [rng.randbytes(rng.choice(sizes)) for _ in range(6)]
        write(backend, list(range(6)), payloads, gen)
        assert read(backend, list(range(6))) == payloads
        assert area.payload_bytes == sum(map(len, payloads)) and area.used == 6
        check(backend)
        if isinstance(backend, FileBackend) and gen % 3 == 0:
            backend.flush()
    backend.discard(area, 0, 6)
    assert area.used == area.small == area.small_bytes == area.small_held == 0
    backend.flush()
    check(backend)
    assert backend.used_bytes == 0 and backend.objects.count == 0


def test_a_store_full_of_bytes_refuses_a_batch_whole(kind: str, tmp_path: Path) -> None:
    backend = make(kind, tmp_path, 8)
    area = backend.activate("a", 1000)
    write(backend, list(range(128)), [bytes([i]) * 256 for i in range(128)])  # 8 pages
    assert backend.free_bytes == 0
    with pytest.raises(StoreError) as info:
        write(backend, [500, 501], [b"a" * 256, b"b" * 8])
    assert info.value.errno == errno.ENOSPC and "store full" in info.value.reason
    assert area.used == 128 and read(backend, [500]) == [bytes(PAGE_SIZE)]  # nothing half-done
    backend.discard(area, 0, 16)  # a page's worth of 256-B payloads
    backend.flush()  # copy-on-write spots come back at a flush
    with pytest.raises(StoreError):  # a page for the 256 B, a page for the word
        write(backend, [500, 501], [b"a" * 256, b"b" * 8])
    backend.discard(area, 16, 16)
    backend.flush()
    write(backend, [500, 501], [b"a" * 256, b"b" * 8])
    assert read(backend, [500, 501, 32]) == [b"a" * 256, b"b" * 8, bytes([32]) * 256]
    check(backend)


def test_an_area_quota_counts_bytes(kind: str, tmp_path: Path) -> None:
    backend = make(kind, tmp_path, 64)
    backend.area_quota = 2 * PAGE_SIZE
    area = backend.activate("a", 1000)
    write(backend, list(range(4)), [b"x" * 2000] * 4)  # 4 x 2,048 B: the quota
    with pytest.raises(StoreError) as info:
        write(backend, [10], [b"y" * 9])
    assert info.value.errno == errno.ENOSPC and "quota of 8192 bytes" in info.value.reason
    write(backend, [0], [b"z" * 1000], 2)  # smaller: fits
    write(backend, [10], [b"y" * 9])
    assert area.held_bytes == 3 * 2048 + 1024 + 256
    stats = backend.area_stats(area)
    assert stats["area_quota_bytes"] == 2 * PAGE_SIZE and stats["area_used_bytes"] == 7424
    assert stats["area_payload_bytes"] == 3 * 2000 + 1000 + 9


def test_seals_are_kept_per_payload(kind: str, tmp_path: Path) -> None:
    backend = make(kind, tmp_path, 16)
    area = backend.activate("a", 100)
    seals = bytes(range(3 * SEAL_SIZE))
    write(backend, [1, 2, 3], [b"a" * 8, b"b" * 700, b"c" * PAGE_SIZE], seals=seals)
    _out, lengths, _, _, got = backend.read_payloads(area, (range(1, 4), range(9, 10)), True)
    assert got == seals + bytes(SEAL_SIZE) and list(lengths or []) == [8, 700, PAGE_SIZE, PAGE_SIZE]
    write(backend, [2], [b"d" * 700], 2)  # rewritten unsealed: no seal kept
    assert backend.read_payloads(area, (range(2, 3),), True)[4] == bytes(SEAL_SIZE)


def test_older_payloads_are_skipped_and_the_rest_of_the_batch_lands(
    kind: str, tmp_path: Path
) -> None:
    backend = make(kind, tmp_path, 16)
    area = backend.activate("a", 100)
    write(backend, [1, 2], [b"new" * 100, b"w" * 8], 5)
    write(backend, [1, 2, 3], [b"old" * 500, b"o" * 8, b"fresh"], 5)
    assert read(backend, [1, 2, 3]) == [b"new" * 100, b"w" * 8, b"fresh"]
    assert backend.counters["pages_superseded"] == 2 and area.superseded == 2


def test_a_damaged_object_is_eio(kind: str, tmp_path: Path) -> None:
    backend = make(kind, tmp_path, 16)
    backend.activate("a", 10)
    write(backend, [1, 2], [b"a" * 700, b"b" * 8])
    objects = backend.objects
    obj = object_of(backend.area("a").page(1))
    first, _, _ = objects.pieces(obj)
    backend._store_at(first, memoryview(b"X"))
    with pytest.raises(StoreError) as info:
        read(backend, [1])
    assert info.value.errno == errno.EIO and backend.counters["checksum_errors"] == 1
    word = object_of(backend.area("a").page(2))
    objects.where[word] ^= 1
    with pytest.raises(StoreError):
        read(backend, [2])


def test_the_embedded_device_reads_whole_pages_and_not_an_object(tmp_path: Path) -> None:
    backend = make("memory", tmp_path, 16)
    area = backend.activate("a", 100)
    write(backend, [1], [b"a" * 100])
    with pytest.raises(StoreError) as info:
        backend.read_range(area, 0, 4, memoryview(bytearray(4 * PAGE_SIZE)))
    assert info.value.errno == errno.EINVAL and "100 bytes" in info.value.reason
    backend.newer_only = False  # as the device's backend (every write LOCAL_GENERATION)
    backend.write_range(area, 1, 1, memoryview(b"p" * PAGE_SIZE))  # a page replaces it
    out = bytearray(PAGE_SIZE)
    backend.read_range(area, 1, 1, memoryview(out))
    assert out == b"p" * PAGE_SIZE and area.small == 0 and backend.objects.count == 0


@pytest.mark.parametrize("size", [256, 1300, 3072])
def test_compaction_bounds_what_discarded_payloads_leave(
    kind: str, tmp_path: Path, size: int
) -> None:
    """A store filled with payloads of one class, nine in ten then discarded at random:
    without compaction most zspages would keep a payload or two (at 16 per page, 81 %
    of the pages for 10 % of the payloads); with it the class holds at most
    (1 + 1/SLACK) x its payloads' spots plus a zspage."""
    pages = 512
    backend = make(kind, tmp_path, pages)
    area = backend.activate("a", 1 << 16)
    c = cl.class_of(size)
    n = pages // cl.PAGES[c] * cl.SPOTS[c]
    rng = random.Random(size)
    payloads = [rng.randbytes(size) for _ in range(n)]
    for first in range(0, n, 256):
        write(backend, list(range(first, min(n, first + 256))), payloads[first : first + 256])
    assert backend.free_bytes < cl.PAGES[c] * PAGE_SIZE  # full
    kept = sorted(rng.sample(range(n), n // 10))
    for slot in sorted(set(range(n)) - set(kept)):
        backend.discard(area, slot, 1)
    backend.flush()  # file: the spots come back; the moves' old spots at the next
    backend.flush()
    objects = backend.objects
    spot_bytes = len(kept) * cl.SPOT_SIZE[c]
    bound = spot_bytes * (1 + 1 / SLACK) + cl.PAGES[c] * PAGE_SIZE
    held = objects.zspage_pages * PAGE_SIZE
    assert held <= bound + cl.SPOT_SIZE[c], (held, bound)
    assert backend.used_bytes == held
    assert backend.counters["compaction_moves"] > 0
    assert read(backend, kept) == [payloads[s] for s in kept]
    check(backend)


def test_a_file_store_keeps_what_it_flushed_and_nothing_newer(tmp_path: Path) -> None:
    """Copy-on-write with objects: payloads written after the last flush are not in
    the restarted store, the flushed ones are, at every class."""
    backend = make("file", tmp_path, 64)
    backend.activate("a", 1000)
    rng = random.Random(3)
    flushed = [rng.randbytes(n) for n in EVERY]
    slots = list(range(len(EVERY)))
    write(backend, slots, flushed)
    backend.flush()
    write(backend, slots, [rng.randbytes(n) for n in reversed(EVERY)], 2)  # not flushed
    backend.discard(backend.area("a"), 0, 3)
    backend.close()  # as a kill -9 would leave it: the index of the last flush
    again = FileBackend(tmp_path / "s", 64)
    assert read(again, slots) == flushed
    check(again)


def test_an_index_record_that_claims_a_spot_twice_is_dropped(tmp_path: Path) -> None:
    backend = make("file", tmp_path, 64)
    backend.activate("a", 1000)
    write(backend, [0, 300], [b"a" * 256, b"b" * 256])  # one zspage, two clusters
    backend.flush()
    backend.close()
    path = tmp_path / "s" / "index"
    raw = bytearray(path.read_bytes())
    length = int.from_bytes(raw[8:12], "little")
    second = 16 + length + idx.RECORD_SIZE
    spots_at = second + 12 + 256 * 14  # the second record's spots
    assert raw[spots_at + 300 - 256] == 1
    raw[spots_at + 300 - 256] = 0  # slot 300 claims slot 0's spot
    body = bytes(raw[second : second + idx.RECORD_SIZE - 4])
    raw[second + idx.RECORD_SIZE - 4 : second + idx.RECORD_SIZE] = zlib.crc32(body).to_bytes(
        4, "little"
    )
    path.write_bytes(raw)
    again = FileBackend(tmp_path / "s", 64)
    assert again.damaged and again.counters["index_records_lost"] == 1
    assert read(again, [0]) == [b"a" * 256]
    with pytest.raises(StoreError) as info:  # its map was lost: EIO, not zeros
        read(again, [300])
    assert info.value.errno == errno.EIO
    check(again)


def test_an_index_of_format_3_or_another_layout_is_refused_in_one_line(tmp_path: Path) -> None:
    backend = make("file", tmp_path, 16)
    backend.activate("a", 10)
    backend.flush()
    backend.close()
    path = tmp_path / "s" / "index"
    good = path.read_bytes()
    path.write_bytes(b"NSWPIDX3" + good[8:])
    with pytest.raises(idx.UnusableIndex, match="format 3, from a netswap of protocol 3"):
        FileBackend(tmp_path / "s", 16)
    length = int.from_bytes(good[8:12], "little")
    blob = good[12 : 12 + length].replace(b'"layout": [[256, 8, 64]', b'"layout": [[512, 8, 64]')
    assert blob != good[12 : 12 + length]
    crc = zlib.crc32(blob).to_bytes(4, "little")
    path.write_bytes(idx.MAGIC + len(blob).to_bytes(4, "little") + blob + crc)
    with pytest.raises(idx.UnusableIndex, match="size classes"):
        FileBackend(tmp_path / "s", 16)


@pytest.mark.parametrize("seed", range(3))
def test_random_work_against_a_model(kind: str, tmp_path: Path, seed: int) -> None:
    """Batches of mixed payloads, rewrites, discards, flushes and (file) restarts: every
    read matches the model and the books balance after every step."""
    rng = random.Random(seed)
    backend = make(kind, tmp_path, 48)
    backend.activate("a", 400)
    model: dict[int, bytes] = {}
    gen = 1
    sizes = [PAGE_SIZE, PAGE_SIZE, 8, 8, 3, 256, 700, 1300, 2048, 2304, 3072, 3500, 4000]
    for _ in range(120):
        op = rng.random()
        if op < 0.6:
            slots = sorted(rng.sample(range(400), rng.randint(1, 24)))
            payloads = [rng.randbytes(rng.choice(sizes)) for _ in slots]
            gen += 1
            try:
                write(backend, slots, payloads, gen)
                model.update(zip(slots, payloads, strict=True))
            except StoreError as exc:
                assert exc.errno == errno.ENOSPC
        elif op < 0.85:
            start, count = rng.randrange(400), rng.randint(1, 40)
            count = min(count, 400 - start)
            backend.discard(backend.area("a"), start, count)
            for slot in range(start, start + count):
                model.pop(slot, None)
        elif isinstance(backend, FileBackend) and op < 0.92:
            backend.flush()
            backend.close()
            backend = FileBackend(tmp_path / "s", 48)
            backend.newer_only = True
        else:
            backend.flush()
        check(backend)
        probe = sorted(rng.sample(range(400), 30))
        assert read(backend, probe) == [model.get(s, bytes(PAGE_SIZE)) for s in probe]
    area = backend.area("a")
    assert area.used == len(model) and area.payload_bytes == sum(map(len, model.values()))


def test_a_batch_past_the_object_table_is_refused_whole(kind: str, tmp_path: Path) -> None:
    """Object ids are bounded (array('i') maps: MAX_OBJECTS): a batch that would pass the
    bound is ENOSPC before anything lands, not halfway through."""
    from netswap.server.backends.objects import MAX_OBJECTS

    backend = make(kind, tmp_path, 16)
    area = backend.activate("a", 100)
    write(backend, [1], [b"a" * 300])
    backend.objects.count = MAX_OBJECTS - 1  # as if the table were nearly full
    with pytest.raises(StoreError) as info:
        write(backend, [2, 3, 4], [b"b" * 8, b"c" * 300, b"d" * PAGE_SIZE])
    assert info.value.errno == errno.ENOSPC and "payloads shorter than a page" in info.value.reason
    assert area.used == 1 and read(backend, [2, 4]) == [bytes(PAGE_SIZE)] * 2
    write(backend, [2], [b"b" * 8])  # one more fits
    assert read(backend, [2]) == [b"b" * 8]
