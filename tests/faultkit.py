"""Test helpers for faults with real processes: an agent to kill -9 and restart, writers
that write a failed page again (as the kernel does), a read-back that counts right, EIO
and stale pages, and a proxy between an agent and a store that holds or drops frames.

Used by test_faults.py and test_sequences.py; kept to what 6afe607's agent and stores
understand too, so that the same tests run against it (their figures before and after
are in the commit messages).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import nbd

from .conftest import free_port, wait_for_port
from .nbdserver import NETSWAP, connect
from .procs import StoreProc

PAGE = 4096
BLOCK = 8  # pages per write: the kernel writes clusters of pages


class AgentProc:
    """`netswap serve --backend remote` on the stores (or addresses); kill() is kill -9."""

    def __init__(self, area: str, stores: list[StoreProc] | list[str], size: str,
                 *extra: str) -> None:  # fmt: skip
        self.port = free_port()
        self.log = Path("/tmp") / f"netswap-faults-{self.port}.log"
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
            self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=out)
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
            if isinstance(p, Proxy):
                p.close()
            else:
                p.kill()


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
    """A page that names its slot and what wrote it (4 bytes of tag)."""
    return (tag.ljust(4)[:4] + slot.to_bytes(4, "little")) * (PAGE // 8)


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
                while True:
                    try:
                        h.pwrite(data, first * PAGE)
                        break
                    except nbd.Error:
                        self.failures += 1
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


# -- a proxy between agents and a store ---------------------------------------------------
LENGTH = struct.Struct(">I")  # every frame: a 4-byte big-endian length, then its body


class Link:
    """One agent connection through the proxy: the agent's socket and the store's."""

    def __init__(self, agent: socket.socket, store: socket.socket) -> None:
        self.agent, self.store = agent, store
        self.held: list[bytes] = []  # frames kept from the store, in order
        self.hold: frozenset[int] = frozenset()  # frame types to keep (and all after one)
        self.cut = False  # a frame of a type in Proxy.cut_on went by: nothing more passes
        self.agent_gone = False
        self.lock = threading.Lock()


class Proxy:
    """A TCP proxy in front of one store, reading the agent's frames (the store's answers
    pass as they are). It can keep an agent's frames from the store and deliver them
    later -- a dead agent's frames still on their way, a segment retransmitted late --
    or stop a connection for good at the first frame of a kind (the store stalls on it)."""

    def __init__(self, store: StoreProc) -> None:
        self.store = store
        self.port = free_port()
        self.links: list[Link] = []
        self.cut_on: frozenset[int] = frozenset()  # a connection sending one of these stalls
        self.cuts = 0  # connections stalled so far
        self.max_cuts = 1
        self.partitioned = False  # every frame of every connection is dropped, for good
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def hold(self, *types: int, links: list[Link] | None = None) -> None:
        """From now on, keep the frames of these types (and every later frame) that these
        connections (default: those open now) send."""
        for link in self.links if links is None else links:
            link.hold |= frozenset(types)

    def held(self, links: list[Link] | None = None) -> int:
        return sum(len(link.held) for link in (self.links if links is None else links))

    def release(self, links: list[Link] | None = None) -> None:
        """Deliver the kept frames of these connections (default: all), in order; those
        whose agent is gone end."""
        for link in list(self.links) if links is None else links:
            with link.lock:
                frames, link.held, link.hold = link.held, [], frozenset()
                for frame in frames:
                    link.store.sendall(frame)
                if link.agent_gone:
                    link.store.shutdown(socket.SHUT_WR)

    def partition(self) -> None:
        """The store is cut off: nothing of any connection reaches it (nor its answers the
        agent) until heal(); the connections cut stay dead, new ones after heal() pass."""
        self.partitioned = True
        for link in self.links:
            link.cut = True

    def heal(self) -> None:
        self.partitioned = False

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        for link in self.links:
            for s in (link.agent, link.store):
                s.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                agent, _ = self._listener.accept()
                store = socket.create_connection(("127.0.0.1", self.store.port))
            except OSError:
                return
            link = Link(agent, store)
            self.links.append(link)
            threading.Thread(target=self._to_store, args=(link,), daemon=True).start()
            threading.Thread(target=self._to_agent, args=(link,), daemon=True).start()

    def _to_agent(self, link: Link) -> None:
        try:
            while data := link.store.recv(1 << 16):
                if not link.cut:
                    link.agent.sendall(data)
        except OSError:
            pass
        if not link.cut:
            _quietly(link.agent.shutdown, socket.SHUT_WR)

    def _to_store(self, link: Link) -> None:
        buf, first = b"", True
        try:
            while data := link.agent.recv(1 << 16):
                buf += data
                while len(buf) >= 4 and len(buf) >= 4 + LENGTH.unpack_from(buf)[0]:
                    end = 4 + LENGTH.unpack_from(buf)[0]
                    frame, buf = buf[:end], buf[end:]
                    kind = -1 if first else frame[4]  # the handshake is msgpack: no head
                    first = False
                    self._pass(link, kind, frame)
        except OSError:
            pass
        with link.lock:
            link.agent_gone = True
            if not link.held and not link.hold and not link.cut:
                _quietly(link.store.shutdown, socket.SHUT_WR)

    def _pass(self, link: Link, kind: int, frame: bytes) -> None:
        if self.partitioned:
            link.cut = True
        if kind in self.cut_on and self.cuts < self.max_cuts and not link.cut:
            link.cut = True
            self.cuts += 1
        if link.cut:
            return
        with link.lock:
            if link.held or kind in link.hold:
                link.held.append(frame)
            else:
                link.store.sendall(frame)


def _quietly(fn: Callable[[int], None], how: int) -> None:
    with contextlib.suppress(OSError):
        fn(how)
