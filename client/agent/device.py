"""RemoteDevice: the NBD plugin's `backend=remote`, run in nbdkit's threads.

Thread side of the agent. pwrite copies nbdkit's buffer into reserve buffers
(with each page's CRC) before anything else, registers the pages as in flight
so that reads see them (read-your-writes), hands the op to the agent's loop,
and -- write-through, the default -- waits for the replicas' acknowledgement.
With cache=writeback it returns once the pages are in the reserve: the loop
retires the op (releases its buffers) when the stores answer, flush/FUA wait
for every earlier op, and a write-back that no replica took marks its pages
lost (they read as EIO, never as older data) and fails the next flush.
pread serves in-flight pages from the reserve, never-written pages as zeros,
and fetches the rest through the loop into the op's own buffer, then copies
them into nbdkit's buffer itself. No reference to nbdkit's buffer survives a
callback.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import ssl
import threading

from netswap.protocol import PAGE_SIZE, ZERO_PAGE, StoreError, page_tag
from netswap.server.units import parse_hostport

from ..device import EXTENT_HOLE, EXTENT_ZERO, check_aligned
from ..rpc import read_token
from .core import Agent
from .direct import DirectReads
from .directwrite import DirectWrites
from .ops import CallOp, ReadOp, WriteOp
from .placement import slab_pages_for
from .policy import BatchPolicy
from .reserve import Reserve, ReserveTimeout

log = logging.getLogger("netswap.agent")

# Pages per op: a kernel request is at most 32 pages; bigger NBD requests (nbdcopy,
# qemu-img) are cut so one op never pins more than this much of the reserve.
CHUNK_PAGES = 64
# The loop completes every op within its RPC deadlines; this is a last-resort
# guard against a bug, after which the op's reserve buffers are leaked, not reused.
HARD_TIMEOUT_FACTOR = 6
_NOT_IN_FLIGHT = (None, 0)


class RemoteDevice:
    multi_conn = True  # one agent per nbdkit: flush waits for every connection's writes
    parallel = True

    def __init__(
        self,
        agent: Agent,
        size: int,
        reserve_wait: float,
        write_back: bool = False,
        direct_reads: bool = False,
        direct_writes: bool = False,
    ) -> None:
        self.agent = agent
        # Swap-in on the calling thread (direct.py); None: every read through the loop.
        self.direct = DirectReads(agent) if direct_reads or direct_writes else None
        self.direct_reads = direct_reads
        # A lone write-through write on the calling thread (directwrite.py).
        self.direct_writes = (
            DirectWrites(agent, self.direct)
            if direct_writes and not write_back and self.direct is not None
            else None
        )
        self.write_back = write_back
        self._write_back_error = 0  # errno of a failed write-back, for the next flush
        self.size = size
        self.reserve = agent.reserve
        self._reserve_wait = reserve_wait
        self._lock = threading.Lock()
        self._inflight: dict[int, tuple[WriteOp, int]] = {}  # slot -> (op, reserve buffer)
        self._ops: set[WriteOp] = set()
        self.local_reads = 0  # pages served from the reserve or as zeros, under _lock
        self._readers = 0  # preads under way, under _lock
        self._writers = 0  # pwrites under way, under _lock
        self._hard_timeout = agent.io_timeout * HARD_TIMEOUT_FACTOR
        agent.pending_writes = self._pending

    def _pending(self, slots: list[int]) -> set[int]:
        """The slots among these with a write in flight (on the loop, for a resync)."""
        with self._lock:
            return {s for s in slots if s in self._inflight}

    @classmethod
    def open(
        cls,
        *,
        stores: list[str],
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
    ) -> RemoteDevice:
        """The device for validated plugin settings (`netswap.client.nbd.config`)."""
        agent = Agent(
            [parse_hostport(s, 7177) for s in stores],
            area,
            size // PAGE_SIZE,
            Reserve(reserve),
            replicas=replicas,
            slab_pages=slab_pages_for(slab),
            token=read_token(token_file or None),
            quorum=quorum,
            policy=BatchPolicy(batch_pages, batch_linger_us / 1e6),
            tls=tls,
        )
        return cls(agent, size, reserve_wait=agent.io_timeout * 2, write_back=write_back,
                   direct_reads=direct_reads, direct_writes=direct_writes)  # fmt: skip

    def start(self) -> None:
        self.agent.start()

    def start_ops(self, host: str, port: int, token: str = "") -> None:
        """The ops endpoint runs on the agent's own loop."""
        from netswap.server.ops.http import start_http

        from .stats import agent_source

        source = agent_source(self.agent, lambda: self.local_reads, self.direct,
                              self.direct_writes)  # fmt: skip
        assert self.agent.loop is not None
        started = start_http(source, host, port, token)
        asyncio.run_coroutine_threadsafe(started, self.agent.loop).result(10)

    def close(self) -> None:
        self.agent.stop()
        if self.direct is not None:
            self.direct.close()

    # -- writes ---------------------------------------------------------------
    def pwrite(self, buf: memoryview, offset: int, fua: bool) -> None:
        check_aligned(len(buf), offset)
        first, count = offset // PAGE_SIZE, len(buf) // PAGE_SIZE
        with self._lock:
            self._writers += 1
        try:
            for at in range(0, count, CHUNK_PAGES):
                n = min(CHUNK_PAGES, count - at)
                self._write_chunk(buf[at * PAGE_SIZE : (at + n) * PAGE_SIZE], first + at, n)
        finally:
            with self._lock:
                self._writers -= 1
        if fua:
            self.flush()

    def _write_chunk(self, view: memoryview, first: int, count: int) -> None:
        reserve = self.reserve
        try:
            bufs = reserve.acquire(count, self._reserve_wait)
        except ReserveTimeout as exc:
            raise StoreError(errno.EIO, str(exc)) from None
        views, seed = reserve.views, self.agent.area_seed
        for i, index in enumerate(bufs):
            views[index][:] = view[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]
        slots = range(first, first + count)
        inflight = self._inflight
        with self._lock:  # generations bump in the order writes enter the in-flight map
            gens = self.agent.table.mark_written_run(first, count)
            tags = tuple(
                page_tag(views[index], seed, first + i, gens[i]) for i, index in enumerate(bufs)
            )
            op = WriteOp(first, count, bufs, tags, gens)
            # A write sent by its own thread is ordered with no other: a later write of
            # the same slots waits for it, or the stores could see the two swapped.
            before = {e[0] for s in slots if (e := inflight.get(s)) is not None and e[0].direct}
            op.direct = self.direct_writes is not None and self._writers == 1 and not before
            inflight.update({slot: (op, buf) for slot, buf in zip(slots, bufs, strict=True)})
            self._ops.add(op)
        for earlier in before:
            earlier.done.wait(self._hard_timeout)
        if op.direct and self.direct_writes is not None and self.direct_writes.write(op):
            self._finish_direct(op)
            return
        if self.write_back:
            op.on_done = self._retire_write_back  # acknowledged now; the loop retires it
        self.agent.submit(self.agent.submit_write, op)
        if self.write_back:
            return
        if not op.done.wait(self._hard_timeout):
            with self._lock:  # the loop may still hold the buffers: leak them, never reuse
                self._forget_op(op)
            log.error("write of %d pages at slot %d never completed", count, first)
            raise StoreError(errno.EIO, "agent did not complete a write")
        with self._lock:
            self._forget_op(op)
        reserve.release(bufs)
        if op.error:
            raise StoreError(op.error, f"write of slots {first}+{count} failed")

    def _finish_direct(self, op: WriteOp) -> None:
        """Every replica took a direct write: the op leaves the in-flight map."""
        with self._lock:
            self._forget_op(op)
        self.agent.reserve.release(op.bufs)

    def _forget_op(self, op: WriteOp) -> list[int]:
        """Under _lock: drop the op's pages from the in-flight map where no newer write
        replaced them; returns those slots."""
        inflight = self._inflight
        owned = []
        for slot in range(op.first, op.first + op.count):
            if inflight.get(slot, _NOT_IN_FLIGHT)[0] is op:
                del inflight[slot]
                owned.append(slot)
        self._ops.discard(op)
        return owned

    def _retire_write_back(self, op: WriteOp) -> None:
        """On the agent's loop, when a write-back op is complete. Never raises."""
        try:
            table = self.agent.table
            with self._lock:
                owned = self._forget_op(op)
                if op.error:
                    for slot in owned:  # slots a newer write took over keep it
                        table.mark_lost(slot)
                    self._write_back_error = self._write_back_error or op.error
            self.reserve.release(op.bufs)
            if op.error:
                self.agent.counters["write_back_failures"] += 1
                self.agent.counters["pages_lost"] += len(owned)
                log.error(
                    "write-back of %d pages at slot %d failed (%s): %d now read as EIO",
                    op.count, op.first, errno.errorcode.get(op.error, op.error), len(owned),
                )  # fmt: skip
        except Exception:  # a bug here must not stop the loop's batch handling
            log.exception("retiring a write-back op failed")

    # -- reads ----------------------------------------------------------------
    def pread(self, buf: memoryview, offset: int) -> None:
        check_aligned(len(buf), offset)
        with self._lock:
            self._readers += 1
        try:
            self._pread(buf, offset)
        finally:
            with self._lock:
                self._readers -= 1

    def _pread(self, buf: memoryview, offset: int) -> None:
        first, count = offset // PAGE_SIZE, len(buf) // PAGE_SIZE
        table, reserve = self.agent.table, self.reserve
        remote: list[int] = []
        with self._lock:
            for i in range(count):
                slot = first + i
                page = buf[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]
                pending = self._inflight.get(slot)
                if pending is not None:
                    page[:] = reserve.page(pending[1])
                elif table.is_written(slot):
                    remote.append(i)
                elif table.is_lost(slot):
                    raise StoreError(errno.EIO, f"slot {slot}: every copy was lost")
                else:
                    page[:] = ZERO_PAGE
            self.local_reads += count - len(remote)
        for at in range(0, len(remote), CHUNK_PAGES):
            self._read_chunk(buf, first, remote[at : at + CHUNK_PAGES])

    def _read_chunk(self, buf: memoryview, first: int, indexes: list[int]) -> None:
        table = self.agent.table
        slots = [first + i for i in indexes]
        gens = table.generations_of(slots)
        data: bytes | bytearray | None = None
        # A read alone (what a faulting process waits on, at QD1) skips the hand-off;
        # reads that come together go through the loop, whose batches serve them
        # better (make bench-agent, 4K randread QD32: 7.1k IOPS through the loop,
        # 5.2k when two of them at a time went direct).
        if self.direct is not None and self.direct_reads and self._readers == 1:
            data = self.direct.read(slots, gens, lambda: table.generations_of(slots))
        if data is None:
            op = ReadOp(slots, gens, bytearray(len(indexes) * PAGE_SIZE))
            self.agent.submit(self.agent.submit_read, op)
            if not op.done.wait(self._hard_timeout):
                raise StoreError(errno.EIO, "agent did not complete a read")
            if op.error:
                raise StoreError(op.error, f"read of {len(indexes)} pages from slot {first} failed")
            data = op.out
        out = memoryview(data)
        for j, i in enumerate(indexes):
            buf[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] = out[j * PAGE_SIZE : (j + 1) * PAGE_SIZE]

    # -- control --------------------------------------------------------------
    def flush(self) -> None:
        with self._lock:
            earlier = list(self._ops)
        for op in earlier:  # wait for every earlier write's acks
            if not op.done.wait(self._hard_timeout):
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
        check_aligned(count, offset)
        self._forget(offset // PAGE_SIZE, count // PAGE_SIZE)

    def _forget(self, first: int, count: int) -> None:
        table = self.agent.table
        with self._lock:
            for slot in range(first, first + count):
                table.forget(slot)
                self._inflight.pop(slot, None)  # a write-back still in flight reads as trimmed
        self._call("discard", lambda: self.agent.discard(first, count))

    def _call(self, what: str, coro_fn: object) -> None:
        op = CallOp(what)
        self.agent.run_call(op, coro_fn)  # type: ignore[arg-type]
        if not op.done.wait(self._hard_timeout):
            raise StoreError(errno.EIO, f"agent did not complete {what}")
        if op.error:
            raise StoreError(op.error, f"{what} failed")

    def extents(self, count: int, offset: int, req_one: bool) -> list[tuple[int, int, int]]:
        """Never-written slots are holes that read as zeros; the rest is data."""
        table = self.agent.table
        runs: list[tuple[int, int, int]] = []
        end = offset + count
        at = offset
        while at < end:
            hole = not table.is_written(at // PAGE_SIZE)
            stop = (at // PAGE_SIZE + 1) * PAGE_SIZE
            while stop < end and (not table.is_written(stop // PAGE_SIZE)) == hole:
                stop += PAGE_SIZE
            stop = min(stop, end)
            runs.append((at, stop - at, EXTENT_HOLE | EXTENT_ZERO if hole else 0))
            if req_one:
                break
            at = stop
        return runs
