"""Sealed pages (#24), against real stores and the real plugin: no plaintext at rest,
a store that lies caught for exactly the slot it lied about, a key gone is EIO, and
the epoch a restart writes under goes above every one recorded for the key."""

from __future__ import annotations

import errno
import os
import re
import time
from pathlib import Path

import nbd
import pytest
from netswap.client.agent.keys import AreaKey, drop_key
from netswap.client.statscmd import fetch

from .conftest import free_port
from .nbdserver import connect, errno_of
from .procs import StoreProc, stores
from .tamper import TamperProxy
from .test_rebuild import AREA, PAGE, agent

MARKER = b"netswap-plaintext-marker-"
PATTERN = (MARKER * (PAGE // len(MARKER) + 1))[:PAGE]


@pytest.fixture(autouse=True)
def _drop_the_key() -> object:
    yield
    drop_key(AREA)


def arena_bytes(pid: int) -> bytes:
    """A memory store's page arena, read through /proc/PID/mem: its largest anonymous
    mapping."""
    spans = []
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) == 5:  # no path: anonymous
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            spans.append((hi - lo, lo))
    size, lo = max(spans)
    with open(f"/proc/{pid}/mem", "rb") as mem:
        mem.seek(lo)
        return mem.read(size)


@pytest.mark.parametrize("encrypt", [True, False], ids=["sealed", "plain"])
def test_no_plaintext_at_rest_on_a_file_store_or_in_a_memory_store(
    tmp_path: Path, encrypt: bool
) -> None:
    """With encryption (the default) neither store holds the marker; with --no-encrypt
    both do (the check can fail), and the log says what that gives up."""
    memory = StoreProc("64M").start()
    disk = StoreProc("64M", ("--backend", "file", "--path", str(tmp_path / "f"))).start()
    try:
        extra = () if encrypt else ("--no-encrypt",)
        with agent([memory, disk], *extra) as (uri, log):
            h = connect(uri)
            for slot in range(0, 64, 3):
                h.pwrite(PATTERN, slot * PAGE)
            h.flush()
            assert h.pread(PAGE, 9 * PAGE) == PATTERN
            h.shutdown()
            assert memory.proc is not None
            in_arena = MARKER in arena_bytes(memory.proc.pid)
            on_disk = MARKER in (tmp_path / "f" / "pages").read_bytes()
            assert (in_arena, on_disk) == (not encrypt, not encrypt)
            assert ("PLAINTEXT" in log.read_text()) != encrypt
    finally:
        memory.kill()
        disk.kill()


def _write_slots(uri: str, count: int) -> dict[int, bytes]:
    h = connect(uri)
    truth = {}
    for slot in range(count):
        truth[slot] = os.urandom(PAGE)
        h.pwrite(truth[slot], slot * PAGE)
    h.shutdown()
    return truth


@pytest.mark.parametrize("mode", ["flip", "swap", "replay"])
def test_a_store_that_lies_is_caught_for_exactly_the_slot_it_lied_about(mode: str) -> None:
    """The proxy rewrites what a real store answers and makes the store's CRC tag match
    (tests/tamper.py): only the seal can tell. The touched slot reads EIO; every other
    page reads right."""
    with stores(1) as (store,):
        proxy = TamperProxy(("127.0.0.1", store.port))
        with agent([f"127.0.0.1:{proxy.port}"], "--replicas", "1") as (uri, log):
            truth = _write_slots(uri, 16)
            h = connect(uri)
            target, other = 5, 6
            if mode == "replay":
                assert h.pread(PAGE, target * PAGE) == truth[target]  # the proxy keeps it
                truth[target] = os.urandom(PAGE)
                h.pwrite(truth[target], target * PAGE)
            proxy.mode, proxy.target, proxy.other = mode, target, other
            with pytest.raises(nbd.Error) as info:
                span = 2 if mode == "swap" else 1  # a swap needs both in one answer
                h.pread(span * PAGE, target * PAGE)
            assert errno_of(info.value) == errno.EIO
            assert proxy.tampered >= 1
            proxy.mode = ""
            for slot, data in truth.items():
                assert h.pread(PAGE, slot * PAGE) == data, slot
            h.shutdown()
            assert re.search(rf"slot {target}: its page does not open", log.read_text())


def test_without_seals_the_same_lie_returns_wrong_data() -> None:
    """The control for the test above: the store's own check alone cannot see a store
    that recomputes its tags."""
    with stores(1) as (store,):
        proxy = TamperProxy(("127.0.0.1", store.port))
        with agent([f"127.0.0.1:{proxy.port}"], "--replicas", "1", "--no-encrypt") as (uri, _):
            truth = _write_slots(uri, 8)
            proxy.mode, proxy.target = "flip", 5
            h = connect(uri)
            assert h.pread(PAGE, 5 * PAGE) != truth[5]
            h.shutdown()


def test_a_key_dropped_from_the_keyring_makes_every_page_eio() -> None:
    with stores(2) as procs, agent(procs) as (uri, log):
        truth = _write_slots(uri, 8)
        assert drop_key(AREA)
        h = connect(uri)
        deadline = time.monotonic() + 10
        while "key is gone" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        for slot in truth:
            with pytest.raises(nbd.Error) as info:
                h.pread(PAGE, slot * PAGE)
            assert errno_of(info.value) == errno.EIO
        with pytest.raises(nbd.Error) as info:
            h.pwrite(bytes(PAGE), 0)
        assert errno_of(info.value) == errno.EIO
        h.shutdown()
        assert log.read_text().count("now reads and writes EIO") == 1  # one line, once


def test_a_restart_writes_above_every_epoch_recorded_under_the_key() -> None:
    """The nonce argument's last step: stores that held an agent's pages may be away at
    the next rebuild, so its epoch comes from the keyring too. Recorded 40 (an agent whose
    pages no store shows), the next agent writes under 41 or above, and records it."""
    with stores(2) as procs:
        with agent(procs) as (uri, _):
            truth = _write_slots(uri, 4)
        AreaKey.existing(AREA).record_epoch(40)
        http = f"127.0.0.1:{free_port()}"
        with agent(procs, "--start", "rebuild", "--http", http) as (uri, _):
            life = fetch(f"http://{http}/").lifecycle
            assert life is not None and life.epoch > 40
            assert AreaKey.existing(AREA).last_epoch() == life.epoch
            h = connect(uri)
            for slot, data in truth.items():
                assert h.pread(PAGE, slot * PAGE) == data
            h.shutdown()


def test_an_older_cryptography_seals_and_opens_the_same_pages(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The compose lab's image has Debian's cryptography 38 (no encrypt_into): its path
    must produce and accept the very same ciphertexts and seals."""
    from netswap.client.agent import seal

    sealer = seal.Sealer(os.urandom(32), "a")
    plain = memoryview(bytearray(os.urandom(PAGE)))
    pages = {}
    for into in (True, False):
        monkeypatch.setattr(seal, "INTO", into)
        page = memoryview(bytearray(plain))  # sealed in place, as in the reserve
        _, seals = sealer.seal_payloads([page], [0], [PAGE], 9, [1 << 32 | 3], 0)
        pages[into] = (bytes(page), bytes(seals))
    assert pages[True] == pages[False]  # deterministic nonce: same key, same ciphertext
    for into in (True, False):
        monkeypatch.setattr(seal, "INTO", into)
        out = memoryview(bytearray(PAGE))
        page, seals = pages[not into]
        assert sealer.open(out, memoryview(page), memoryview(seals), 9, 1 << 32 | 3)
        assert bytes(out) == bytes(plain)
        assert not sealer.open(out, memoryview(page), memoryview(seals), 10, 1 << 32 | 3)


TRIM = """
import json, os
from netswap.client.hardening import lock_memory, trim_locked_text
from netswap.client.agent import seal
assert lock_memory().ok
import ctypes
from netswap.client.hardening import _mappings
for lo, perms, path, private, hi in _mappings():  # all of the code resident (and locked)
    if seal.LIBRARY in path and "x" in perms:
        for at in range(lo, hi, 4096):
            ctypes.string_at(at, 1)
before, after = trim_locked_text(seal.LIBRARY, seal.warm_up)
sealer = seal.Sealer(os.urandom(32), "trim")
page = memoryview(bytearray(os.urandom(4096)))
stored = [memoryview(bytearray(page))]
tags, seals = sealer.seal_payloads(stored, [0], [4096], 7, [9], 0)
out = memoryview(bytearray(4096))
opened = sealer.open(out, stored[0], memoryview(seals), 7, 9)
print(json.dumps([before, after, opened and out == page]))
"""


def test_the_plugin_keeps_locked_only_the_code_a_seal_runs() -> None:
    """Under mlockall, importing cryptography locked 2-6 MiB of its code (fault-around
    maps what the page cache holds); here all 7.4 MiB of it is made resident first. The
    trim keeps what warm_up ran, and a seal and an open still work after it."""
    import json
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", TRIM], capture_output=True, text=True,
                            timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    before, after, works = json.loads(result.stdout)
    assert works
    assert before > 7 * 1024, f"{before} KiB locked before: the library's code was not resident"
    assert 0 < after < before // 2, (before, after)


def test_the_keyring_calls_share_one_libc_handle() -> None:
    """Every save of the record calls add_key: a CDLL made per call is a class per call,
    garbage only a full collection frees (the hour soak's ctypes/__init__.py:370)."""
    from netswap.client.agent import keys

    assert keys._libc() is keys._libc()
