"""RemoteDevice: the NBD plugin's `backend=remote`, run in nbdkit's threads.

Thread side of the agent. pwrite copies nbdkit's buffer into reserve buffers
(with each page's tag) before anything else, registers the pages as in flight
so that reads see them (read-your-writes), and sends them: a write that is
alone goes to its replicas from this thread (direct.py), any other is handed
to the agent's loop as a job. Write-through, the default, waits for the
replicas' acknowledgement. With cache=writeback it returns once the pages are
in the reserve: the loop retires the job (releases its buffers) when the
stores answer, flush/FUA wait for every earlier job, and a write-back that no
replica took marks its pages lost (they read as EIO, never as older data) and
fails the next flush. pread serves in-flight pages from the reserve,
never-written pages as zeros, and fetches the rest -- a lone read from this
thread, straight into nbdkit's buffer, others through the loop into the job's
own buffer, copied from there. No reference to nbdkit's buffer survives a
callback.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import ssl
import threading
from array import array
from collections.abc import Awaitable
from typing import Any

from netswap.protocol import PAGE_SIZE, SEAL_SIZE, ZERO_PAGE, StoreError, page_tag, tags_of
from netswap.server.units import parse_hostport

from ..device import EXTENT_HOLE, EXTENT_ZERO, check_aligned
from ..rpc import read_token
from .core import Agent
from .direct import DirectPath
from .fills import Fills, PayloadFigures
from .jobs import ControlJob, ReadJob, WriteJob
from .keys import AreaKey, RecordKeeper, keyring_usable
from .machine.bounds import READ_WAIT_S
from .machine.slots import DOUBT, LOST, NEVER, UNPROVEN, WRITTEN
from .machine.table import slab_slots_for
from .payload import FILL, decode, encode, whole
from .policy import BatchPolicy
from .reserve import Reserve, ReserveTimeout

log = logging.getLogger("netswap.agent")

# Pages per job: a kernel request is at most 32 pages; bigger NBD requests (nbdcopy,
# qemu-img) are cut so one job never pins more than this much of the reserve.
CHUNK_PAGES = 64
# The loop completes every write within its RPC deadlines; this is a last-resort
# guard against a bug, after which the job's reserve buffers are leaked, not reused.
HARD_TIMEOUT_FACTOR = 6
# A read may wait READ_WAIT_S for a store that holds its page (machine.py); the guard
# against a bug is past that.
READ_GUARD_S = READ_WAIT_S + 10
_NOT_IN_FLIGHT = (None, 0)
_ZEROS: list[memoryview] = []


def _zeros() -> memoryview:
    """One chunk of zero pages, made once (a zeroing writes from it, copies nothing)."""
    if not _ZEROS:
        _ZEROS.append(memoryview(bytes(CHUNK_PAGES * PAGE_SIZE)))
    return _ZEROS[0]


_UNREADABLE = {
    LOST: "slot {slot}: no store holds its newest page any more (EIO until written again)",
    DOUBT: "slot {slot}: its last write failed (EIO until written again)",
}


class RemoteDevice:
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
        compress: bool = False,
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
        self._hard_timeout = agent.io_timeout * HARD_TIMEOUT_FACTOR

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
        compress: bool = False,
    ) -> RemoteDevice:
        """The device for validated plugin settings (`netswap.client.nbd.config`)."""
        token = read_token(token_file or None)
        extra: dict[str, Any] = {}
        if cluster:  # one store, the cluster; its client, not netswap's (cluster/client.py)
            # Imported here: redis-py costs an agent of netswap's stores ~10 MiB locked.
            from ..cluster.client import ClusterClient
            from ..cluster.layout import parse_url

            user, seeds = parse_url(cluster)

            def connect(host: str, port: int, area: str, token: str, deadline: float,
                        tls: ssl.SSLContext | None) -> Awaitable[Any]:  # fmt: skip
                return ClusterClient.connect(seeds, area, user, token, deadline, cluster_wait)

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
        return cls(agent, size, reserve_wait=agent.io_timeout * 2, write_back=write_back,
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

        source = agent_source(self.agent, lambda: self.local_reads, self.direct)
        assert self.agent.loop is not None
        started = start_http(source, host, port, token)
        asyncio.run_coroutine_threadsafe(started, self.agent.loop).result(10)

    def close(self) -> None:
        self.agent.stop()

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
        views, sealer = reserve.views, self.agent.sealer
        if sealer is not None and not sealer.usable:
            reserve.release(bufs)
            raise StoreError(errno.EIO, "the area's key is gone from the keyring")
        job = WriteJob(first, count, bufs)
        job.lengths = self._encode(view, views, bufs, job)  # outside the lock: lz4's time
        slots = range(first, first + count)
        inflight = self._inflight
        machine = self.machine
        with self._lock:  # generations go in the order writes enter the in-flight map
            with machine.lock:
                machine.begin_write(job)
            gens, seed, lengths = job.generations, self.agent.area_seed, job.lengths
            if sealer is not None:  # under the lock: a page's nonce is its slot and generation
                job.tags, job.seals = sealer.seal_payloads(views, bufs, lengths, first, gens,
                                                           seed)  # fmt: skip
            elif self.compress:
                job.tags = array("I", [page_tag(views[b][: lengths[i]], seed, first + i, gens[i])
                                       for i, b in enumerate(bufs)])  # fmt: skip
            else:
                job.tags = tags_of(view, seed, slots, gens)
            # A write sent by its own thread is ordered with no other: a later write of
            # the same slots waits for it, or the stores could see the two swapped.
            before = {e[0] for s in slots if (e := inflight.get(s)) is not None and e[0].direct}
            direct = self.direct
            job.direct = direct is not None and direct.writes and self._writers == 1 and not before
            inflight.update({slot: (job, buf) for slot, buf in zip(slots, bufs, strict=True)})
            self._jobs.add(job)
        if machine.dirty:  # a new epoch (a count at its end): recorded before it is used
            self.agent.settle()
        for earlier in before:
            earlier.done.wait(self._hard_timeout)
        if job.direct and direct is not None and direct.write(job):
            self._retire(job)
            return
        if self.write_back:
            job.on_done = self._retire_write_back  # acknowledged now; the loop retires it
        self.agent.submit(self.agent.route_write, job)
        if self.write_back:
            return
        if not job.done.wait(self._hard_timeout):
            with self._lock:  # the loop may still hold the buffers: leak them, never reuse
                self._forget_job(job)
            log.error("write of %d pages at slot %d never completed", count, first)
            raise StoreError(errno.EIO, "agent did not complete a write")
        self._retire(job)
        if job.error:
            raise StoreError(job.error, f"write of slots {first}+{count} failed")

    def _encode(self, view: memoryview, views: list[memoryview], bufs: list[int],
                job: WriteJob) -> array[int]:  # fmt: skip
        """Each page's payload into its reserve buffer (payload.py); their lengths. The
        words of same-filled pages go in job.fills (they read back without a store)."""
        count = len(bufs)
        if not self.compress:
            for i, index in enumerate(bufs):
                views[index][:] = view[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]
            return whole(count)
        lengths = array("H", bytes(2 * count))
        for i, index in enumerate(bufs):
            length = encode(view[i * PAGE_SIZE : (i + 1) * PAGE_SIZE], views[index])
            lengths[i] = length
            if length == FILL:
                if job.fills is None:
                    job.fills = {}
                job.fills[i] = int.from_bytes(views[index][:FILL], "little")
        self.figures.count(lengths)
        return lengths

    def _retire(self, job: WriteJob) -> None:
        """A write-through job is answered: it leaves the in-flight map, its buffers
        go back to the reserve, and its same-filled pages read without a store."""
        with self._lock:
            owned = self._forget_job(job)
            if not job.error:
                self.fills.update(job, owned)
        self.reserve.release(job.bufs)

    def _forget_job(self, job: WriteJob) -> list[int]:
        """Under _lock: drop the job's pages from the in-flight map where no newer write
        replaced them; returns those slots."""
        inflight = self._inflight
        owned = []
        for slot in range(job.first, job.first + job.count):
            if inflight.get(slot, _NOT_IN_FLIGHT)[0] is job:
                del inflight[slot]
                owned.append(slot)
        self._jobs.discard(job)
        return owned

    def _retire_write_back(self, job: WriteJob) -> None:
        """On the agent's loop, when a write-back job is complete. Never raises."""
        try:
            machine = self.machine
            with self._lock:
                owned = self._forget_job(job)
                if job.error:  # acknowledged already: these pages are lost, recorded
                    with machine.lock:
                        for slot in owned:  # slots a newer write took over keep it
                            machine.declare_lost(machine.table.slab_of(slot), [slot], DOUBT)
                    self._write_back_error = self._write_back_error or job.error
                else:
                    self.fills.update(job, owned)
            self.reserve.release(job.bufs)
            if job.error:
                self.agent.counters["write_back_failures"] += 1
                self.agent.counters["pages_lost"] += len(owned)
                log.error(
                    "write-back of %d pages at slot %d failed (%s): %d now read as EIO",
                    job.count, job.first, errno.errorcode.get(job.error, job.error), len(owned),
                )  # fmt: skip
        except Exception:  # a bug here must not stop the loop's batch handling
            log.exception("retiring a write-back job failed")

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
        remote: list[int] = []
        gens: list[int] = []
        with self._lock:  # the plan and the in-flight map in one view: a write cannot slip in
            with self.machine.lock:
                plan = self.machine.read_plan(first, count)
            for i, (state, gen) in enumerate(plan):
                slot = first + i
                pending = self._inflight.get(slot)
                if pending is not None:
                    self._from_reserve(buf[i * PAGE_SIZE : (i + 1) * PAGE_SIZE], slot, *pending)
                elif state == WRITTEN and self.fills.fill(
                    slot, buf[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]
                ):
                    continue  # same-filled: no store needed
                elif state in (WRITTEN, UNPROVEN):  # unproven: the loop waits for its proof
                    remote.append(i)
                    gens.append(gen)
                elif state == NEVER:
                    buf[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] = ZERO_PAGE
                else:
                    raise StoreError(errno.EIO, _UNREADABLE[state].format(slot=slot))
            self.local_reads += count - len(remote)
        for at in range(0, len(remote), CHUNK_PAGES):
            self._read_chunk(buf, first, remote[at : at + CHUNK_PAGES], gens[at : at + CHUNK_PAGES])

    def _from_reserve(self, out: memoryview, slot: int, job: WriteJob, buf: int) -> None:
        """An in-flight page, from its reserve buffer (decrypted and decoded)."""
        i = slot - job.first
        length = job.lengths[i] if job.lengths else PAGE_SIZE
        payload, sealer = self.reserve.views[buf][:length], self.agent.sealer
        if sealer is not None and job.seals is not None:
            plain = memoryview(bytearray(length))
            seal = memoryview(job.seals)[i * SEAL_SIZE : (i + 1) * SEAL_SIZE]
            if not sealer.open(plain, payload, seal, slot, job.generations[i]):
                raise StoreError(errno.EIO, f"slot {slot}: its page in flight does not open "
                                 "(the area's key is gone)")  # fmt: skip
            payload = plain
        if not decode(payload, out):
            raise StoreError(errno.EIO, f"slot {slot}: its page in flight does not decode")

    def _read_chunk(self, buf: memoryview, first: int, indexes: list[int], gens: list[int]) -> None:
        machine = self.machine
        slots = [first + i for i in indexes]
        expected = array("Q", gens)
        # A read alone (what a faulting process waits on, at QD1) skips the hand-off;
        # reads that come together go through the loop, whose batches serve them
        # better (make bench-agent, 4K randread QD32: 7.1k IOPS through the loop,
        # 5.2k when two of them at a time went direct).
        direct = self.direct
        lo, n = indexes[0], len(indexes)
        if direct is not None and direct.reads and self._readers == 1 and indexes[-1] - lo == n - 1:
            run = range(first + lo, first + lo + n)
            into = buf[lo * PAGE_SIZE : (lo + n) * PAGE_SIZE]
            if direct.read(run, expected, lambda: machine.slots.gens[run.start : run.stop], into):
                return
        job = ReadJob(slots, expected, bytearray(n * PAGE_SIZE))
        self.agent.submit(self.agent.route_reads, job)
        if not job.done.wait(READ_GUARD_S):
            raise StoreError(errno.EIO, "agent did not complete a read")
        if job.error:
            raise StoreError(job.error, f"read of {n} pages from slot {first + lo} failed")
        out = memoryview(job.out)
        for j, i in enumerate(indexes):
            buf[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] = out[j * PAGE_SIZE : (j + 1) * PAGE_SIZE]

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
