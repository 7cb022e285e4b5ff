"""A restarted agent rebuilds the area from real store processes (no kernel): every page
back, replicas that disagree resolved by generation, what cannot be proven EIO."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from netswap.client.agent.keys import drop_key
from netswap.client.statscmd import fetch

from .conftest import free_port, wait_for_port
from .nbdserver import NETSWAP, connect
from .procs import StoreProc, stores, wait_for_http, wait_until

PAGE = 4096
SIZE = "16M"
# The area, one per test worker: its key lives in root's keyring (client/agent/keys.py),
# which every worker shares, and a fresh start elsewhere must not replace it.
AREA = f"rebuild{os.getpid()}"


@pytest.fixture(autouse=True)
def _drop_the_key() -> Iterator[None]:
    yield
    drop_key(AREA)


@contextmanager
def agent(
    store_procs: list[StoreProc] | list[str], *extra: str, env: dict[str, str] | None = None
) -> Iterator[tuple[str, Path]]:
    """`netswap serve` on the stores (or addresses), area AREA; yields (uri, its log) and
    kills it -9."""
    port = free_port()
    log = Path("/tmp") / f"netswap-rebuild-{port}.log"
    cmd = [NETSWAP, "serve", "--listen", f"127.0.0.1:{port}", "--size", SIZE, "--backend",
           "remote", "--no-mlock", "--area", AREA, "--replicas", "2", *extra]  # fmt: skip
    for s in store_procs:
        cmd += ["--store", s if isinstance(s, str) else s.address]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=out, env=env)
    try:
        wait_for_port(port, proc, timeout=60)
        wait_for_http(extra, proc)
        yield f"nbd://127.0.0.1:{port}/swap", log
    finally:
        proc.kill()  # kill -9: the agent dies with whatever it knew
        proc.wait()
    assert "Traceback" not in log.read_text(), log.read_text()


def write_random(uri: str, count: int, seed: int) -> dict[int, bytes]:
    rng = random.Random(seed)
    h = connect(uri)
    truth = {}
    for slot in rng.sample(range(4096), count):
        truth[slot] = rng.randbytes(PAGE)
        h.pwrite(truth[slot], slot * PAGE)
    h.shutdown()
    return truth


def test_a_restarted_agent_rebuilds_every_page_from_the_stores() -> None:
    with stores(2) as procs:
        with agent(procs) as (uri, _):
            truth = write_random(uri, 300, 1)
            h = connect(uri)
            for slot in list(truth)[:50]:  # some slots rewritten: their counts move on
                truth[slot] = bytes([slot % 251]) * PAGE
                h.pwrite(truth[slot], slot * PAGE)
            h.shutdown()
        http = f"127.0.0.1:{free_port()}"
        with agent(procs, "--start", "rebuild", "--epoch", "7", "--http", http) as (uri, log):
            life = fetch(f"http://{http}/").lifecycle
            assert life is not None and life.started == "rebuild"
            assert life.epoch > 7 and life.rebuild_pages == 300 and life.unproven_slots == 0
            h = connect(uri)
            for slot, data in truth.items():
                assert h.pread(PAGE, slot * PAGE) == data, slot
            unwritten = next(s for s in range(4096) if s not in truth)
            assert h.pread(PAGE, unwritten * PAGE) == bytes(PAGE)  # never written: zeros
            h.pwrite(b"n" * PAGE, unwritten * PAGE)  # and the rebuilt agent writes on
            assert h.pread(PAGE, unwritten * PAGE) == b"n" * PAGE
            h.shutdown()
            text = log.read_text()
            assert "rebuilt the area from the stores" in text and "300 pages proven" in text


def test_replicas_that_disagree_are_resolved_by_generation_never_by_guessing(
    tmp_path: Path,
) -> None:
    """Store B (a file store) dies and misses a write; the agent dies before repairing
    it; B comes back with its flushed, older page. After the restart the two replicas
    disagree: the newer generation wins (A was in sync, the record says) and B, back as
    another boot, is suspect, then resynced."""
    a = StoreProc("64M").start()
    b = StoreProc("64M", ("--backend", "file", "--path", str(tmp_path / "b"))).start()
    try:
        with agent([a, b]) as (uri, _):
            h = connect(uri)
            h.pwrite(b"1" * PAGE, 5 * PAGE)
            h.flush()  # both stores hold write 1 durably
            b.kill()
            h.pwrite(b"2" * PAGE, 5 * PAGE)  # A alone takes write 2
            h.shutdown()
        b.start()  # back with write 1
        http = f"127.0.0.1:{free_port()}"
        with agent([a, b], "--start", "rebuild", "--http", http) as (uri, log):
            h = connect(uri)
            assert h.pread(PAGE, 5 * PAGE) == b"2" * PAGE
            assert "1 replicas not in sync" in log.read_text()
            wait_until(lambda: fetch(f"http://{http}/").replication_lag_pages == 0, 30,
                       "B resynced")  # fmt: skip
            a.kill()  # B, resynced, holds write 2 too
            assert h.pread(PAGE, 5 * PAGE) == b"2" * PAGE
            h.shutdown()
    finally:
        a.kill()
        b.kill()


def test_a_store_away_at_the_rebuild_costs_nothing_when_the_record_has_one_in_sync() -> None:
    """With two replicas acknowledged at one copy, one replica alone once could not prove
    it held the newest pages (they read EIO until the other came back). The record says
    which replica was in sync: it proves them alone, and every page reads at once."""
    with stores(2) as (a, b):
        with agent([a, b]) as (uri, _):
            truth = write_random(uri, 40, 2)
        assert b.proc is not None
        os.kill(b.proc.pid, signal.SIGSTOP)  # away for the rebuild
        try:
            http = f"127.0.0.1:{free_port()}"
            with agent([a, b], "--start", "rebuild", "--http", http) as (uri, _):
                life = fetch(f"http://{http}/").lifecycle
                assert life is not None and life.unproven_slots == 0
                h = connect(uri)
                for s, data in truth.items():
                    assert h.pread(PAGE, s * PAGE) == data, s
                h.shutdown()
        finally:
            os.kill(b.proc.pid, signal.SIGCONT)


def test_a_slab_no_in_sync_replica_can_prove_waits_for_its_store_then_reads() -> None:
    """A is paused while pages are written (stale: they went to B alone) and the agent
    dies before A is repaired; then B is away for the rebuild. A alone cannot prove the
    slab: its reads wait -- never an older page, never EIO while B may come back -- and
    B's return proves it, late."""
    with stores(2) as (a, b):
        assert a.proc is not None and b.proc is not None
        with agent([a, b]) as (uri, _):
            write_random(uri, 20, 6)
            os.kill(a.proc.pid, signal.SIGSTOP)
            truth = write_random(uri, 40, 7)  # A misses these: marked down after 5 s, stale
        os.kill(b.proc.pid, signal.SIGSTOP)
        os.kill(a.proc.pid, signal.SIGCONT)
        try:
            http = f"127.0.0.1:{free_port()}"
            with agent([a, b], "--start", "rebuild", "--http", http) as (uri, log):
                life = fetch(f"http://{http}/").lifecycle
                assert life is not None and life.unproven_slots > 0  # the dashboard's red
                assert "unproven" in log.read_text()
                got: dict[int, bytes] = {}
                h = connect(uri)
                slot = next(iter(truth))
                reader = threading.Thread(
                    target=lambda: got.update({slot: h.pread(PAGE, slot * PAGE)})
                )
                reader.start()
                time.sleep(2)
                assert reader.is_alive()  # it waits for the store that may hold the newest page
                os.kill(b.proc.pid, signal.SIGCONT)
                reader.join(30)
                assert got == {slot: truth[slot]}
                for s, data in truth.items():
                    assert h.pread(PAGE, s * PAGE) == data, s
                life = fetch(f"http://{http}/").lifecycle
                assert life is not None and life.unproven_slots == 0
                h.shutdown()
        finally:
            os.kill(a.proc.pid, signal.SIGCONT)
            os.kill(b.proc.pid, signal.SIGCONT)


def test_a_fresh_start_releases_what_the_stores_held_for_the_area() -> None:
    with stores(2) as procs:
        with agent(procs) as (uri, _):
            write_random(uri, 20, 3)
        with agent(procs) as (uri, _):  # --start fresh, the default: a new swap area
            h = connect(uri)
            assert h.pread(PAGE * 64, 0) == bytes(PAGE * 64)
            h.shutdown()


def test_start_auto_is_fresh_at_boot_and_a_rebuild_after(tmp_path: Path) -> None:
    """systemd's Restart= path: the first agent since boot (no mark in the run directory)
    starts fresh and leaves the mark; the next one rebuilds and reads every page."""
    env = {**os.environ, "NETSWAP_STATE_DIR": str(tmp_path)}
    with stores(2) as procs:
        with agent(procs, "--start", "auto", env=env) as (uri, log):
            wait_until(lambda: (tmp_path / f"agent-{AREA}.started").exists(), 10, "the mark")
            truth = write_random(uri, 100, 3)
            assert "rebuilt" not in log.read_text()
        with agent(procs, "--start", "auto", env=env) as (uri, log):
            h = connect(uri)
            for slot, data in truth.items():
                assert h.pread(PAGE, slot * PAGE) == data, slot
            h.shutdown()
            assert "100 pages proven" in log.read_text()


def test_with_no_store_answering_the_rebuild_waits_for_one_instead_of_serving_eio() -> None:
    """Every store away when the agent restarts: it does not serve (the kernel holds the
    IO meanwhile) until one answers, then every page reads."""
    with stores(2) as procs:
        with agent(procs) as (uri, _):
            truth = write_random(uri, 30, 4)
        for p in procs:
            assert p.proc is not None
            os.kill(p.proc.pid, signal.SIGSTOP)
        try:
            with agent(procs, "--start", "rebuild") as (uri, log):
                wait_until(lambda: "no store answers" in log.read_text(), 30, "the wait")
                for p in procs:
                    assert p.proc is not None
                    os.kill(p.proc.pid, signal.SIGCONT)
                h = connect(uri)
                for slot, data in truth.items():
                    assert h.pread(PAGE, slot * PAGE) == data, slot
                h.shutdown()
        finally:
            for p in procs:
                if p.proc is not None:
                    os.kill(p.proc.pid, signal.SIGCONT)


def test_a_second_kill_during_the_rebuild_loses_nothing() -> None:
    """The agent restarted after a kill -9 is killed in turn while it rebuilds (a store
    it waits for is stopped); the third one reads every page."""
    with stores(2) as (a, b):
        with agent([a, b]) as (uri, _):
            truth = write_random(uri, 60, 5)
        assert b.proc is not None
        os.kill(b.proc.pid, signal.SIGSTOP)  # the rebuild waits for it (REBUILD_WAIT_S)
        port = free_port()
        cmd = [NETSWAP, "serve", "--listen", f"127.0.0.1:{port}", "--size", SIZE, "--backend",
               "remote", "--no-mlock", "--area", AREA, "--replicas", "2", "--start",
               "rebuild", "--store", a.address, "--store", b.address]  # fmt: skip
        second = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(3)
        assert second.poll() is None  # still rebuilding
        second.kill()
        second.wait()
        os.kill(b.proc.pid, signal.SIGCONT)
        with agent([a, b], "--start", "rebuild") as (uri, log):
            h = connect(uri)
            for slot, data in truth.items():
                assert h.pread(PAGE, slot * PAGE) == data, slot
            h.shutdown()
            assert "60 pages proven" in log.read_text()
