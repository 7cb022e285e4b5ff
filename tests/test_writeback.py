"""cache=writeback through the real plugin, agent and stores: acknowledged from the
reserve, durable at flush, and a write-back no store took is an error, never old data."""

from __future__ import annotations

import errno
import os
import signal

import nbd
import pytest

from .nbdserver import connect, errno_of
from .procs import StoreProc, agent_serve, stores
from .test_agent import PAGE, Storm

WRITEBACK = ("--cache", "writeback")


def test_write_back_storm_then_flush_leaves_every_page_on_both_replicas() -> None:
    with (
        stores(2) as (s1, s2),
        agent_serve([s1, s2], "32M", "--slab", "1M", *WRITEBACK) as (uri, _),
    ):
        storm = Storm(uri, 8192)
        storm.run(4)  # every read is checked: in-flight pages come from the reserve
        assert storm.ops > 200
        h = connect(uri)
        h.flush()
        h.shutdown()
        s1.kill()  # after flush every page is on both: the survivor alone serves all
        storm.verify()


def test_in_flight_write_back_reads_back_and_a_later_trim_wins() -> None:
    with stores(1) as (s1,), agent_serve([s1], "16M", *WRITEBACK) as (uri, _):
        h = connect(uri)
        assert s1.proc is not None
        s1.proc.send_signal(signal.SIGSTOP)  # nothing reaches the store for now
        try:
            h.pwrite(b"A" * PAGE, 0)  # acknowledged from the reserve
            h.pwrite(b"B" * PAGE, PAGE)
            assert h.pread(2 * PAGE, 0) == b"A" * PAGE + b"B" * PAGE  # from the reserve
        finally:
            s1.proc.send_signal(signal.SIGCONT)
        # The trim needs the store (discard), so B may or may not still be in flight
        # when it runs; either way a trim acknowledged after the write wins.
        h.trim(PAGE, PAGE)
        assert h.pread(PAGE, PAGE) == bytes(PAGE)
        h.flush()
        assert h.pread(2 * PAGE, 0) == b"A" * PAGE + bytes(PAGE)
        h.shutdown()


def test_a_full_store_fails_the_next_flush_once_and_lost_pages_read_eio() -> None:
    store = StoreProc("1M").start()  # 256 pages
    try:
        with agent_serve([store], "16M", *WRITEBACK) as (uri, _):
            h = connect(uri)
            pages = {n: os.urandom(PAGE) for n in range(512)}  # incompressible: whole pages
            for first in range(0, 512, 32):
                h.pwrite(b"".join(pages[first + i] for i in range(32)), first * PAGE)
            with pytest.raises(nbd.Error) as failed:
                h.flush()
            assert errno_of(failed.value) == errno.ENOSPC
            h.flush()  # reported once; nothing failed since
            kept = lost = 0
            for n, data in pages.items():
                try:
                    got = h.pread(PAGE, n * PAGE)
                except nbd.Error as exc:
                    assert errno_of(exc) == errno.EIO
                    lost += 1
                    continue
                assert got == data, f"page {n}: neither its data nor EIO"
                kept += 1
            assert kept >= 128 and lost >= 256, (kept, lost)
            h.shutdown()
    finally:
        store.kill()


def test_a_write_back_to_a_dead_store_reads_eio_not_the_older_page() -> None:
    with stores(1) as (s1,), agent_serve([s1], "16M", *WRITEBACK) as (uri, _):
        h = connect(uri)
        h.pwrite(b"old!" * (PAGE // 4), 0)
        h.flush()
        s1.kill()
        h.pwrite(b"new!" * (PAGE // 4), 0)  # acknowledged; no store will take it
        with pytest.raises(nbd.Error) as failed:
            h.flush()
        assert errno_of(failed.value) == errno.EIO
        with pytest.raises(nbd.Error) as lost:
            h.pread(PAGE, 0)
        assert errno_of(lost.value) == errno.EIO
        h.shutdown()
