"""RemoteDevice: the NBD plugin's `backend=remote`, run in nbdkit's threads.

The thread side of the agent: its writes (writes.py) and reads (reads.py) and
here what is left -- how a device is built from the plugin's settings, its
start (or a standby's take-over), and the control requests: flush waits for
every earlier write and flushes the stores; trim forgets slots (they read as
zeros; the stores' discard is advisory); WRITE_ZEROES writes zero pages (a
rebuild must not bring an older copy back), and extents say which slots were
never written.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import ssl
import threading
from collections.abc import Awaitable
from typing import Any

from netswap.protocol import PAGE_SIZE, StoreError
from netswap.server.units import parse_hostport

from ..device import EXTENT_HOLE, EXTENT_ZERO, check_aligned
from ..rpc import read_token
from .core import Agent
from .direct import DirectPath
from .fills import Fills, PayloadFigures
from .jobs import ControlJob, WriteJob
from .keys import AreaKey, KeyringEntry, RecordKeeper, cluster_name, keyring_usable
from .machine.bounds import WRITE_WAIT_S
from .machine.slots import NEVER
from .machine.table import slab_slots_for
from .policy import BatchPolicy
from .reads import Reads
from .reserve import Reserve
from .writes import CHUNK_PAGES, HARD_TIMEOUT_FACTOR, Writes

log = logging.getLogger("netswap.agent")


_ZEROS: list[memoryview] = []


def _zeros() -> memoryview:
    """One chunk of zero pages, made once (a zeroing writes from it, copies nothing)."""
    if not _ZEROS:
        _ZEROS.append(memoryview(bytes(CHUNK_PAGES * PAGE_SIZE)))
    return _ZEROS[0]


class RemoteDevice(Writes, Reads):
    multi_conn = True  # one agent per nbdkit: flush waits for every connection's writes
    parallel = True
    fast_zero = False  # zeros are written as pages: a FAST_ZERO request is told so

    def __init__(
        self,
        agent: Agent,
        size: int,
        reserve_wait: float,
        write_back: bool = False,
        direct_reads: bool = False,
        direct_writes: bool = False,
        compress: bool = True,
    ) -> None:
        self.agent = agent
        self.machine = agent.machine
        # Pages go as payloads (payload.py): same-filled, lz4, or whole; off: all whole.
        self.compress = compress
        self.fills = Fills(size // PAGE_SIZE)
        self.figures = PayloadFigures()
        # Lone requests on the calling thread (direct.py); None: every one through the loop.
        writes = direct_writes and not write_back
        self.direct = DirectPath(agent, direct_reads, writes) if direct_reads or writes else None
        self.write_back = write_back
        self._write_back_error = 0  # errno of a failed write-back, for the next flush
        self.size = size
        self.reserve = agent.reserve
        self._reserve_wait = reserve_wait
        self._lock = threading.Lock()
        self._inflight: dict[int, tuple[WriteJob, int]] = {}  # slot -> (job, reserve buffer)
        self._jobs: set[WriteJob] = set()
        self.local_reads = 0  # pages served from the reserve or as zeros, under _lock
        self._readers = 0  # preads under way, under _lock
        self._writers = 0  # pwrites under way, under _lock
        self._hard_timeout = WRITE_WAIT_S + agent.io_timeout * HARD_TIMEOUT_FACTOR

    @classmethod
    def open(
        cls,
        *,
        stores: list[str],
        cluster: str = "",
        cluster_wait: int = 1,
        area: str,
        size: int,
        replicas: int,
        quorum: int,
        reserve: int,
        slab: int,
        token_file: str,
        batch_pages: int,
        batch_linger_us: int,
        write_back: bool,
        tls: ssl.SSLContext | None = None,
        direct_reads: bool = True,
        direct_writes: bool = True,
        rebuild: bool = False,
        epoch: int = 0,
        key: AreaKey | None = None,
        holder: str = "",
        force: bool = False,
        compress: bool = True,
    ) -> RemoteDevice:
        """The device for validated plugin settings (`netswap.client.nbd.config`)."""
        token = read_token(token_file or None)
        extra: dict[str, Any] = {}
        if cluster:  # one store, the cluster; its client, not netswap's (cluster/client.py)
            # Imported here: redis-py costs an agent of netswap's stores ~10 MiB locked.
            from ..cluster.client import ClusterClient
            from ..cluster.layout import parse_url

            user, seeds = parse_url(cluster)
            # Its lineage record (P3) beside the agent's record, so a restart reads it.
            lineage = KeyringEntry(cluster_name(area)) if keyring_usable() else None

            def connect(host: str, port: int, area: str, token: str, deadline: float,
                        tls: ssl.SSLContext | None) -> Awaitable[Any]:  # fmt: skip
                return ClusterClient.connect(seeds, area, user, token, deadline, cluster_wait,
                                             durable=lineage)  # fmt: skip

            stores, extra["connect_store"] = [f"{seeds[0][0]}:{seeds[0][1]}"], connect
            extra["must_connect"] = True
            direct_reads = direct_writes = False  # nbdkit's threads speak netswap's protocol
        agent = Agent(
            [parse_hostport(s, 7177) for s in stores],
            area,
            size // PAGE_SIZE,
            Reserve(reserve),
            replicas=replicas,
            slab_slots=slab_slots_for(slab),
            token=token,
            quorum=quorum,
            policy=BatchPolicy(batch_pages, batch_linger_us / 1e6),
            tls=tls,
            rebuild=rebuild,
            epoch=epoch,
            key=key,
            holder=holder,
            force=force,
            keeper=RecordKeeper(area) if keyring_usable() else None,
            **extra,
        )
        # Writers wait for reserve buffers as long as the writes holding them may wait.
        reserve_wait = WRITE_WAIT_S + 2 * agent.io_timeout
        return cls(agent, size, reserve_wait=reserve_wait, write_back=write_back,
                   direct_reads=direct_reads, direct_writes=direct_writes,
                   compress=compress)  # fmt: skip

    def start(self) -> None:
        self.agent.start()

    def take_over(self, epoch: int) -> None:
        """A standby told to serve: what the dead agent knew is rebuilt from its record
        and the stores, and this agent's generations go above `epoch` (and above every
        epoch the record and the keyring know: nothing lowers it)."""
        self.agent.rebuild = True
        self.agent.min_epoch = max(self.agent.min_epoch, epoch)

    def start_ops(self, host: str, port: int, token: str = "") -> None:
        """The ops endpoint runs on the agent's own loop."""
        from netswap.server.ops.http import start_http

        from .stats import agent_source

        source = agent_source(self.agent, lambda: self.local_reads, self.direct, self.figures)
        assert self.agent.loop is not None
        started = start_http(source, host, port, token)
        asyncio.run_coroutine_threadsafe(started, self.agent.loop).result(10)

    def close(self) -> None:
        self.agent.stop()

    # -- control --------------------------------------------------------------
    def flush(self) -> None:
        with self._lock:
            earlier = list(self._jobs)
        for job in earlier:  # wait for every earlier write's acks
            if not job.done.wait(self._hard_timeout):
                raise StoreError(errno.EIO, "an earlier write never completed")
        with self._lock:
            error, self._write_back_error = self._write_back_error, 0
        if error:  # reported once, like a failed write-back to any block device
            raise StoreError(error, "an earlier write-back failed; its pages read as EIO")
        self._call("flush", self.agent.flush)

    def trim(self, count: int, offset: int, fua: bool) -> None:
        first = -(-offset // PAGE_SIZE)
        end = (offset + count) // PAGE_SIZE
        if end > first:
            self._forget(first, end - first)

    def zero(self, count: int, offset: int, fua: bool) -> None:
        """WRITE_ZEROES must read back zeros, after a restart too: the zeros are written
        like any page (a trim is advisory: a rebuild may find a store's older copy)."""
        check_aligned(count, offset)
        zeros = _zeros()
        first, pages = offset // PAGE_SIZE, count // PAGE_SIZE
        for at in range(0, pages, CHUNK_PAGES):
            n = min(CHUNK_PAGES, pages - at)
            self.pwrite(zeros[: n * PAGE_SIZE], (first + at) * PAGE_SIZE, False)
        if fua:
            self.flush()

    def _forget(self, first: int, count: int) -> None:
        with self._lock:
            with self.machine.lock:
                sends = self.machine.trim(first, count)
            for slot in range(first, first + count):
                self._inflight.pop(slot, None)  # a write-back still in flight reads as trimmed
            self.fills.forget(first, count)
        self._call("discard", lambda: self.agent.send_discards(sends))

    def _call(self, what: str, coro_fn: object) -> None:
        job = ControlJob(what)
        self.agent.run_call(job, coro_fn)  # type: ignore[arg-type]
        if not job.done.wait(self._hard_timeout):
            raise StoreError(errno.EIO, f"agent did not complete {what}")
        if job.error:
            raise StoreError(job.error, f"{what} failed")

    def extents(self, count: int, offset: int, req_one: bool) -> list[tuple[int, int, int]]:
        """Never-written slots are holes that read as zeros; the rest is data."""
        state = self.machine.slots.state

        def written(slot: int) -> bool:
            return state[slot] != NEVER

        runs: list[tuple[int, int, int]] = []
        end = offset + count
        at = offset
        while at < end:
            hole = not written(at // PAGE_SIZE)
            stop = (at // PAGE_SIZE + 1) * PAGE_SIZE
            while stop < end and (not written(stop // PAGE_SIZE)) == hole:
                stop += PAGE_SIZE
            stop = min(stop, end)
            runs.append((at, stop - at, EXTENT_HOLE | EXTENT_ZERO if hole else 0))
            if req_one:
                break
            at = stop
        return runs
