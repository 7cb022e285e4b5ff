"""The soak's verified workload: two writers of whole 8-page blocks, each reading back a
random block it wrote before and checking it byte for byte.

It behaves as the kernel does under faults. A write that fails is written again (the
kernel keeps a page whose swap write failed and writes it later: mm/page_io.c); P2
allows a write to fail during an outage. A read that fails is a lost page -- an error
-- unless the agent was being restarted (the nemesis says so through `restarts`):
then, as the kernel's IO waits for the supervisor's new agent, the worker reconnects
and asks again. At the end every block written is read once more (`sweep`).
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable

import nbd

BLOCK_PAGES = 8
BLOCK = BLOCK_PAGES * 4096
# How long a worker waits for the agent to answer again after a restart: the rebuild
# waits 10 s for a store that is away (core.REBUILD_WAIT_S), and then it must serve.
RECONNECT_S = 60.0
# A write failing this long in a row is an error, not an outage the kernel rides out:
# the longest stall (30 s) plus the write's own wait and deadline (5 s + 5 s), twice.
WRITE_RETRY_S = 80.0


class Workload:
    def __init__(self, uri: str, restarts: Callable[[], int]) -> None:
        self.uri = uri
        self.restarts = restarts  # how many times the nemesis restarted the agent so far
        self.errors: list[str] = []
        self.checked = 0  # pages read back and verified
        self.write_retries = 0  # writes that failed and were written again
        self.reconnects = 0
        self.truth: list[dict[int, bytes]] = [{}, {}]
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._worker, args=(n,), daemon=True)
                         for n in range(2)]  # fmt: skip

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(RECONNECT_S + WRITE_RETRY_S)

    def _connect(self) -> tuple[nbd.NBD, int]:
        """A connection to the agent, and the restart count it was made at."""
        deadline = time.monotonic() + RECONNECT_S
        while True:
            restarts = self.restarts()
            try:
                h = nbd.NBD()
                h.connect_uri(self.uri)
                return h, restarts
            except nbd.Error:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def _worker(self, n: int) -> None:
        rng = random.Random(n)
        truth = self.truth[n]
        try:
            conn = self._connect()
            blocks = conn[0].get_size() // BLOCK // 2
            while not self._stop.is_set():
                block = n * blocks + rng.randrange(blocks)
                data = rng.randbytes(BLOCK)
                conn = self._write(conn, block, data)
                truth[block] = data
                probe = rng.choice(list(truth))
                conn, got = self._read(conn, probe)
                if got != truth[probe]:
                    self.errors.append(f"block {probe} read back wrong")
                    return
                self.checked += BLOCK_PAGES
            conn[0].shutdown()
        except nbd.Error as exc:
            self.errors.append(f"worker {n}: {exc}")

    def _write(self, conn: tuple[nbd.NBD, int], block: int, data: bytes) -> tuple[nbd.NBD, int]:
        began = time.monotonic()
        while True:
            try:
                conn[0].pwrite(data, block * BLOCK)
                return conn
            except nbd.Error:
                if self.restarts() != conn[1]:  # its agent was killed: the next one's turn
                    self.reconnects += 1
                    conn = self._connect()
                    continue
                if time.monotonic() - began > WRITE_RETRY_S:
                    raise
                self.write_retries += 1
                time.sleep(0.1)  # the kernel writes a failed page again later

    def _read(self, conn: tuple[nbd.NBD, int], block: int) -> tuple[tuple[nbd.NBD, int], bytes]:
        while True:
            try:
                return conn, bytes(conn[0].pread(BLOCK, block * BLOCK))
            except nbd.Error:
                if self.restarts() == conn[1]:
                    raise  # a page lost
                self.reconnects += 1
                conn = self._connect()

    def sweep(self) -> tuple[int, list[str]]:
        """Read every block written once more: (pages verified, what was wrong)."""
        wrong: list[str] = []
        pages = 0
        h, _ = self._connect()
        for truth in self.truth:
            for block, data in sorted(truth.items()):
                try:
                    ok = bytes(h.pread(BLOCK, block * BLOCK)) == data
                except nbd.Error as exc:
                    wrong.append(f"sweep: block {block}: {exc}")
                    continue
                pages += BLOCK_PAGES
                if not ok:
                    wrong.append(f"sweep: block {block} read back wrong")
        h.shutdown()
        return pages, wrong
