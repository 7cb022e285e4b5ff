"""Test helpers for faults with real processes: an agent to kill -9 and restart, writers
that write a failed page again (as the kernel does), a read-back that counts right, EIO
and stale pages.

Used by test_faults.py and the test_sequences_*.py (the proxy: faultproxy.py); kept to
what 6afe607's agent and stores understand too, so that the same tests run against it
(their figures before and after are in the commit messages).
"""

from __future__ import annotations

import itertools
import os
import random
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import nbd
from netswap.client.statscmd import fetch

from .conftest import free_port, wait_for_port
from .faultproxy import Proxy
from .nbdserver import NETSWAP, connect
from .procs import StoreProc

PAGE = 4096
_LOGS = itertools.count()
BLOCK = 8  # pages per write: the kernel writes clusters of pages
# A write failing this long in a row is an error, not an outage ridden out: the longest
# stall here (7 s) plus a write's wait for a replica and its deadline (5 s + 5 s), twice.
GIVE_UP_S = 40.0


class AgentProc:
    """`netswap serve --backend remote` on the stores (or addresses); kill() is kill -9."""

    def __init__(self, area: str, stores: list[StoreProc] | list[str], size: str, *extra: str,
                 port: int = 0, env: dict[str, str] | None = None) -> None:  # fmt: skip
        self.port = port or free_port()  # a restart may keep its predecessor's port
        self.env = {**os.environ, **(env or {})}
        # Its own log, also when it takes its predecessor's port (a restart).
        self.log = Path("/tmp") / f"netswap-faults-{self.port}-{os.getpid()}-{next(_LOGS)}.log"
        self.cmd = [NETSWAP, "serve", "--listen", f"127.0.0.1:{self.port}", "--size", size,
                    "--backend", "remote", "--no-mlock", "--area", area, *extra]  # fmt: skip
        for s in stores:
            self.cmd += ["--store", s if isinstance(s, str) else s.address]
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"nbd://127.0.0.1:{self.port}/swap"

    def start(self, timeout: float = 60) -> AgentProc:
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=out,
                                         env=self.env)  # fmt: skip
        wait_for_port(self.port, self.proc, timeout=timeout)
        if "--http" in self.cmd:  # the ops endpoint starts just after nbdkit listens
            http = self.cmd[self.cmd.index("--http") + 1]
            wait_for_port(int(http.rsplit(":", 1)[1]), self.proc)
        return self

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def text(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def running(*procs: StoreProc | AgentProc | Proxy) -> Iterator[None]:
    """Whatever happens in the test, every process given is resumed and killed."""
    try:
        yield
    finally:
        for p in reversed(procs):
            if isinstance(p, StoreProc) and p.proc is not None:
                os.kill(p.proc.pid, signal.SIGCONT)
            p.close() if isinstance(p, Proxy) else p.kill()


def pause(*stores: StoreProc) -> None:
    for s in stores:
        assert s.proc is not None
        os.kill(s.proc.pid, signal.SIGSTOP)


def resume(*stores: StoreProc) -> None:
    for s in stores:
        assert s.proc is not None
        os.kill(s.proc.pid, signal.SIGCONT)


def file_store(path: Path, capacity: str = "64M") -> StoreProc:
    return StoreProc(capacity, ("--backend", "file", "--path", str(path)))


def page_of(tag: bytes, slot: int) -> bytes:
    """A page that names its slot and what wrote it (its first 8 bytes: 4 of tag, the
    slot), then bytes no compressor shrinks, drawn from both: a whole page on every
    store, and read from a store (a same-filled page is answered by the agent itself,
    payload.py, and a compressible one changes what a store of N bytes holds)."""
    name = tag.ljust(4)[:4] + slot.to_bytes(4, "little")
    return name + random.Random(name).randbytes(PAGE - len(name))


def write_pages(uri: str, tag: bytes, slots: range | list[int], flush: bool = False
                ) -> dict[int, bytes]:  # fmt: skip
    h = connect(uri)
    pages = {slot: page_of(tag, slot) for slot in slots}
    for slot, data in pages.items():
        h.pwrite(data, slot * PAGE)
    if flush:
        h.flush()
    h.shutdown()
    return pages


@dataclass
class ReadBack:
    """What reading written pages back found."""

    pages: int = 0
    right: int = 0
    eio: int = 0
    stale: int = 0  # an older page of the slot
    wrong: int = 0  # neither its newest nor an older page
    first_bad: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return (f"{self.pages} pages: {self.right} right, {self.eio} EIO, {self.stale} stale, "
                f"{self.wrong} wrong")  # fmt: skip


def read_back(uri: str, newest: dict[int, bytes], older: dict[int, set[bytes]] | None = None
              ) -> ReadBack:  # fmt: skip
    """Read every page of `newest` one by one: right, EIO, an older page, or other."""
    out = ReadBack()
    h = connect(uri)
    for slot, data in sorted(newest.items()):
        out.pages += 1
        try:
            got = bytes(h.pread(PAGE, slot * PAGE))
        except nbd.Error:
            out.eio += 1
            continue
        if got == data:
            out.right += 1
            continue
        if got in (older or {}).get(slot, ()):
            out.stale += 1
        else:
            out.wrong += 1
        if len(out.first_bad) < 5:
            out.first_bad.append(f"slot {slot}: {got[:8]!r}")
    h.shutdown()
    return out


class Writers:
    """Threads writing BLOCK-page blocks at random in their own stripes, each write
    written again until it is acknowledged (the kernel's way with a failed swap write:
    mm/page_io.c re-dirties the page and keeps it). `newest` is every page's newest
    acknowledged content, `older` what it held before."""

    def __init__(self, uri: str, slots: int, threads: int = 4, seed: int = 0) -> None:
        self.uri, self.slots, self.seed = uri, slots, seed
        self.newest: dict[int, bytes] = {}
        self.older: dict[int, set[bytes]] = {}
        self.pages_written = 0
        self.failures = 0  # writes that failed and were written again
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(n, threads), daemon=True)
                         for n in range(threads)]  # fmt: skip

    def __enter__(self) -> Writers:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(120)
        assert not any(t.is_alive() for t in self._threads), "a writer hangs"
        assert not self.errors, self.errors[:3]

    def wait_for(self, pages: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.pages_written < pages:
            assert time.monotonic() < deadline, f"{self.pages_written} pages in {timeout}s"
            assert not self.errors, self.errors[:3]
            time.sleep(0.05)

    def _run(self, n: int, threads: int) -> None:
        rng = random.Random(self.seed * 1000 + n)
        stripe = self.slots // threads // BLOCK
        try:
            h = connect(self.uri)
            while not self._stop.is_set():
                first = (n * stripe + rng.randrange(stripe)) * BLOCK
                data = rng.randbytes(BLOCK * PAGE)
                failing = 0.0
                while True:
                    try:
                        h.pwrite(data, first * PAGE)
                        break
                    except nbd.Error:
                        self.failures += 1
                        failing = failing or time.monotonic()
                        if time.monotonic() - failing > GIVE_UP_S:
                            raise
                        time.sleep(0.1)  # the kernel writes it again later
                with self._lock:
                    for i in range(BLOCK):
                        page = data[i * PAGE : (i + 1) * PAGE]
                        before = self.newest.get(first + i)
                        if before is not None:
                            self.older.setdefault(first + i, set()).add(before)
                        self.newest[first + i] = page
                    self.pages_written += BLOCK
            h.shutdown()
        except BaseException as exc:
            self.errors.append(exc)


# -- what the sequences' tests share -----------------------------------------------------
def http_of(agent: AgentProc) -> str:
    return f"http://{agent.cmd[agent.cmd.index('--http') + 1]}/"


def lag(agent: AgentProc) -> int:
    return fetch(http_of(agent)).replication_lag_pages


def agent_on(area: str, stores: list[StoreProc] | list[str], *extra: str) -> AgentProc:
    """An agent on one 4 MiB slab (so which stores hold what is plain), its ops endpoint on."""
    return AgentProc(area, stores, "4M", "--slab", "4M", "--http", f"127.0.0.1:{free_port()}",
                     *extra)  # fmt: skip


def read_later(uri: str, newest: dict[int, bytes], older: dict[int, set[bytes]],
               out: list[ReadBack]) -> threading.Thread:  # fmt: skip
    """read_back on a thread (its reads may wait for a store)."""
    reader = threading.Thread(target=lambda: out.append(read_back(uri, newest, older)))
    reader.start()
    return reader


def older_of(*versions: dict[int, bytes]) -> dict[int, set[bytes]]:
    out: dict[int, set[bytes]] = {}
    for pages in versions:
        for slot, page in pages.items():
            out.setdefault(slot, set()).add(page)
    return out
