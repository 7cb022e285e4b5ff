"""Test helpers: real `netswap store` and `netswap serve --backend remote` processes."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from .conftest import free_port, wait_for_port
from .nbdserver import NETSWAP


class StoreProc:
    """A page store on a fixed port that tests can kill -9 and start again."""

    def __init__(
        self, capacity: str = "256M", extra: tuple[str, ...] = (), netswap: str = NETSWAP
    ) -> None:
        self.port = free_port()
        self.capacity = capacity
        self.extra = extra
        self.netswap = netswap  # another checkout's, for a benchmark's before-and-after
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None, "the store is not running"
        return self.proc.pid

    def start(self) -> StoreProc:
        cmd = [self.netswap, "store", "--listen", self.address, "--capacity", self.capacity]
        self.proc = subprocess.Popen([*cmd, *self.extra], stderr=subprocess.DEVNULL)
        wait_for_port(self.port, self.proc)
        if "--http" in self.extra:  # the ops endpoint starts just after the store
            http = self.extra[self.extra.index("--http") + 1]
            wait_for_port(int(http.rsplit(":", 1)[1]), self.proc)
        return self

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def stop(self) -> int:
        """SIGTERM: the graceful shutdown (a file store flushes and marks itself
        clean); its exit status."""
        assert self.proc is not None
        self.proc.terminate()
        status = self.proc.wait(timeout=30)
        self.proc = None
        return status


@contextmanager
def stores(count: int, capacity: str = "256M") -> Iterator[list[StoreProc]]:
    procs = [StoreProc(capacity) for _ in range(count)]
    try:
        yield [p.start() for p in procs]
    finally:
        for p in procs:
            p.kill()


@contextmanager
def agent_serve(
    store_procs: list[StoreProc], size: str = "64M", *extra: str, env: dict[str, str] | None = None
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """`netswap serve --backend remote` over the given stores; yields (uri, nbdkit)."""
    port = free_port()
    cmd = [NETSWAP, "serve", "--listen", f"127.0.0.1:{port}", "--size", size,
           "--backend", "remote", "--no-mlock", "--area", "testhost", *extra]  # fmt: skip
    for s in store_procs:
        cmd += ["--store", s.address]
    with ExitStack() as stack:
        log = stack.enter_context(open(agent_log(port), "w+b"))
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log,
                                env={**os.environ, **(env or {})})  # fmt: skip
        try:
            wait_for_port(port, proc, timeout=30)
            wait_for_http(extra, proc)
            yield f"nbd://127.0.0.1:{port}/swap", proc
        finally:
            proc.kill()
            proc.wait()
            log.seek(0)
            text = log.read().decode(errors="replace")
            assert "Traceback" not in text, text


def agent_log(port: int) -> Path:
    """Where agent_serve's nbdkit on `port` logs (kept after it stops)."""
    return Path("/tmp") / f"netswap-agent-{port}.log"


def wait_for_http(args: tuple[str, ...] | list[str], proc: subprocess.Popen[bytes]) -> None:
    """nbdkit listens before after_fork has started the ops endpoint: wait for both."""
    if "--http" in args:
        http = args[list(args).index("--http") + 1]
        wait_for_port(int(http.rsplit(":", 1)[1]), proc)


def store_used_pages(store: StoreProc) -> int:
    """The store's own count of pages it holds (all areas), over a probe connection."""
    import asyncio

    from netswap.client.rpc import StoreClient

    async def ask() -> int:
        client = await StoreClient.connect("127.0.0.1", store.port, "probe", deadline=5)
        try:
            return (await client.stats())["used_pages"]
        finally:
            await client.close()

    return asyncio.run(ask())


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout}s")
        time.sleep(0.25)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise LookupError("no VmRSS")
