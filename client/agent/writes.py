"""The device's writes (nbdkit's threads): nbdkit's buffer into the reserve as payloads, sealed,
in flight, and to the stores.

Mixed into remote.RemoteDevice. pwrite turns each page into its payload in a
reserve buffer (payload.py; lz4's time is spent outside the lock) before
anything else, gives the job its generations and seals it under the device's
lock (the order writes enter the in-flight map is the order of their
generations), registers it in flight so that reads see it (read-your-writes),
and sends it: a write that is alone goes to its replicas from this thread
(direct.py), any other to the agent's loop. Write-through, the default, waits
for the replicas' acknowledgement. With cache=writeback it returns once the
pages are in the reserve: the loop retires the job when the stores answer, and
a write-back that no replica took marks its pages lost (recorded: they read EIO,
never an older page) and fails the next flush.
"""

from __future__ import annotations

import errno
import logging
import threading
from array import array

from netswap.protocol import PAGE_SIZE, StoreError, page_tag, tags_of

from ..device import check_aligned
from .core import Agent
from .direct import DirectPath
from .fills import Fills, PayloadFigures
from .jobs import WriteJob
from .machine.machine import Replicas
from .machine.slots import DOUBT
from .payload import FILL, encode, whole
from .reserve import Reserve, ReserveTimeout

log = logging.getLogger("netswap.agent")

# Pages per job: a kernel request is at most 32 pages; bigger NBD requests (nbdcopy,
# qemu-img) are cut so one job never pins more than this much of the reserve.
CHUNK_PAGES = 64
# The loop completes every write within its wait for replicas (WRITE_WAIT_S) and two
# RPC deadlines; this is a last-resort guard against a bug past that, after which the
# job's reserve buffers are leaked, not reused.
HARD_TIMEOUT_FACTOR = 6
_NOT_IN_FLIGHT = (None, 0)


class Writes:
    """The write path of remote.RemoteDevice."""

    agent: Agent
    machine: Replicas
    reserve: Reserve
    direct: DirectPath | None
    write_back: bool
    compress: bool
    fills: Fills
    figures: PayloadFigures
    _lock: threading.Lock
    _inflight: dict[int, tuple[WriteJob, int]]
    _jobs: set[WriteJob]
    _writers: int
    _reserve_wait: float
    _hard_timeout: float
    _write_back_error: int

    def flush(self) -> None:
        raise NotImplementedError  # remote.RemoteDevice's

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
