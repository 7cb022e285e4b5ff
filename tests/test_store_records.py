"""Who answers and who holds (protocol 4), on real store processes: the Welcome's
store id, boot and clean mark across restarts, kill -9 and SIGTERM; the area
record (one host per area, issue #30); and a protocol-3 peer's one line."""

from __future__ import annotations

import errno
import socket
import struct
import subprocess
from pathlib import Path

import msgpack
import pytest
from netswap.client.rpc import StoreClient
from netswap.protocol import PAGE_SIZE, PROTOCOL_VERSION, StoreError, Welcome

from .procs import StoreProc


async def welcome(store: StoreProc, area: str = "h") -> Welcome:
    client = await StoreClient.connect("127.0.0.1", store.port, area, deadline=10)
    await client.close()
    assert client.welcome is not None
    return client.welcome


def file_store(path: Path) -> StoreProc:
    return StoreProc("16M", ("--backend", "file", "--path", str(path)))


async def test_a_memory_store_is_a_new_store_at_every_start() -> None:
    store = StoreProc("16M").start()
    try:
        first = await welcome(store)
        store.kill()
        store.start()
        second = await welcome(store)
    finally:
        store.kill()
    assert first.boot != second.boot and first.store_id != second.store_id
    assert (second.prev_boot, second.clean) == (0, False)
    assert 0 not in (first.boot, first.store_id)


async def test_a_file_store_keeps_its_id_and_says_how_its_last_boot_ended(
    tmp_path: Path,
) -> None:
    store = file_store(tmp_path / "s").start()
    try:
        first = await welcome(store)
        assert (first.prev_boot, first.clean) == (0, False)  # a new directory
        store.kill()  # -9: the previous boot did not end clean
        store.start()
        killed = await welcome(store)
        assert killed.store_id == first.store_id and killed.boot != first.boot
        assert (killed.prev_boot, killed.clean) == (first.boot, False)
        assert store.stop() == 0  # SIGTERM: flushed, then marked clean
        store.start()
        stopped = await welcome(store)
        assert stopped.store_id == first.store_id
        assert len({first.boot, killed.boot, stopped.boot}) == 3
        assert (stopped.prev_boot, stopped.clean) == (killed.boot, True)
        store.kill()  # the clean mark was for that boot only
        store.start()
        again = await welcome(store)
        assert (again.prev_boot, again.clean) == (stopped.boot, False)
    finally:
        store.kill()


async def test_one_host_per_area_unless_the_same_host_or_force(tmp_path: Path) -> None:
    store = file_store(tmp_path / "s").start()
    page = b"A" * PAGE_SIZE
    try:
        a = await StoreClient.connect("127.0.0.1", store.port, "h", deadline=10)
        await a.swapfile(True, 64, area_id=11, holder="host-a")
        await a.swap_out([1], page)
        b = await StoreClient.connect("127.0.0.1", store.port, "h", deadline=10)
        assert b.welcome is not None
        assert (b.welcome.area_id, b.welcome.holder, b.welcome.area_slots) == (11, "host-a", 64)
        for call in (b.swapfile(True, 64, area_id=22, holder="host-b"),
                     b.swapfile(True, 64, area_id=11, holder="host-b"),  # its life, not its host
                     b.swapfile(False, 0, holder="host-b"),
                     b.swapfile(False, 0)):  # fmt: skip
            with pytest.raises(StoreError, match="area h is held by host-a") as info:
                await call
            assert info.value.errno == errno.EEXIST
        assert await a.swap_in([1]) == page  # nothing was released
        await a.flush()
        assert store.stop() == 0
        store.start()  # the record survives a restart with its area
        again = await welcome(store)
        assert (again.area_id, again.holder, again.area_slots) == (11, "host-a", 64)
        a = await StoreClient.connect("127.0.0.1", store.port, "h", deadline=10)
        assert await a.swap_in([1]) == page
        await a.swapfile(True, 64, area_id=12, holder="host-a")  # the same host, fresh
        assert await a.swap_in([1], [0]) == bytes(PAGE_SIZE)  # a new life: empty
        assert ((await welcome(store)).area_id, (await welcome(store)).holder) == (12, "host-a")
        await a.swap_out([1], page)
        b = await StoreClient.connect("127.0.0.1", store.port, "h", deadline=10)
        await b.swapfile(True, 32, area_id=23, holder="host-b", force=True)  # a takeover
        assert await b.swap_in([1], [0]) == bytes(PAGE_SIZE)
        await b.flush()
        store.kill()  # flushed: the new holder is on disk with its area
        store.start()
        taken = await welcome(store)
        assert (taken.area_id, taken.holder, taken.area_slots) == (23, "host-b", 32)
        b = await StoreClient.connect("127.0.0.1", store.port, "h", deadline=10)
        with pytest.raises(StoreError, match="held by host-b"):
            await b.swapfile(False, 0, holder="host-a")
        await b.swapfile(False, 0, holder="host-a", force=True)
        gone = await welcome(store)
        assert (gone.area_id, gone.holder, gone.area_slots) == (0, "", 0)
        await b.close()
    finally:
        store.kill()


def test_a_protocol_3_hello_gets_one_line_naming_both_versions(
    store_process: tuple[int, subprocess.Popen[bytes]],
) -> None:
    """A protocol-3 agent's Hello (protocol 2's layout, which 3 and 4 keep) is answered
    EPROTONOSUPPORT naming both versions, which that agent can read, and the store
    logs one line about it, no traceback."""
    port, proc = store_process
    old_hello = msgpack.packb([1, 7, 3, "host", ""])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(struct.pack(">I", len(old_hello)) + old_hello)
        head = sock.recv(4, socket.MSG_WAITALL)
        body = sock.recv(struct.unpack(">I", head)[0], socket.MSG_WAITALL)
        assert sock.recv(1) == b""  # then closed
    kind, rid, code, reason = msgpack.unpackb(body)  # protocol 3's Failed, as it reads it
    assert (kind, rid, code) == (65, 7, errno.EPROTONOSUPPORT)
    assert "protocol 3" in reason and f"protocol {PROTOCOL_VERSION}" in reason
    proc.kill()
    assert proc.stderr is not None
    log = proc.stderr.read().decode()
    lines = [line for line in log.splitlines() if "protocol 3" in line]
    assert len(lines) == 1 and "Traceback" not in log, log


def test_a_record_that_cannot_be_read_refuses_the_start_in_one_line(
    netswap_cmd: list[str], tmp_path: Path
) -> None:
    """A store that forgot its floors would let a dead agent's frames apply: a torn
    DIR/floors (or DIR/id) stops the start with one line, the directory untouched."""
    for name, junk in (("floors", b'{"floors": {"h": -1}}'), ("id", b"not hex\n")):
        path = tmp_path / name
        path.mkdir()
        (path / name).write_bytes(junk)
        result = subprocess.run([*netswap_cmd, "store", "--backend", "file", "--path", str(path),
                                 "--capacity", "1M", "--listen", "127.0.0.1:0"],
                                capture_output=True, text=True, timeout=30)  # fmt: skip
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert f"{path / name}" in result.stderr
        assert (path / name).read_bytes() == junk and not (path / "boot").exists()


def test_an_index_without_area_records_loads_with_no_life_and_no_holder(
    tmp_path: Path,
) -> None:
    """An index whose header has no 'ids' reads as area_id 0 and no holder; one written
    now keeps both (in process). (Protocol 3's index, format 3, is refused whole:
    tests/test_payloads.py.)"""
    import json
    import zlib

    from netswap.server.backends import FileBackend, classes, index

    store = FileBackend(tmp_path, 64)
    store.activate("h", 8, 5, "host-a")
    store.flush()
    store.close()
    again = FileBackend(tmp_path, 64)
    assert (again.areas["h"].area_id, again.areas["h"].holder) == (5, "host-a")
    again.close()
    blob = json.dumps({"capacity_pages": 64, "areas": [["h", 8]], "clusters": 0,
                       "damaged": False, "layout": classes.signature()}).encode()  # fmt: skip
    (tmp_path / "index").write_bytes(index.MAGIC + struct.pack("<I", len(blob)) + blob
                                     + struct.pack("<I", zlib.crc32(blob)))  # fmt: skip
    old = FileBackend(tmp_path, 64)
    assert (old.areas["h"].area_id, old.areas["h"].holder, old.areas["h"].pages) == (0, "", 8)
    old.close()
