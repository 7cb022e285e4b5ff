"""The device's reads (nbdkit's threads): the reserve, the fills, zeros, or the stores.

Mixed into remote.RemoteDevice. Under the device's lock (with the machine's),
each slot is planned at once: a page in flight comes from its reserve copy,
opened and decoded; a same-filled one from the device's fills (fills.py);
never written, zeros; lost or in doubt, EIO; the rest from the stores -- a lone
read from this thread, straight into nbdkit's buffer (direct.py), others
through the loop into the job's own buffer, copied from there. No reference to
nbdkit's buffer survives a callback.
"""

from __future__ import annotations

import errno
import threading
from array import array

from netswap.protocol import PAGE_SIZE, SEAL_SIZE, ZERO_PAGE, StoreError

from ..device import check_aligned
from .core import Agent
from .direct import DirectPath
from .fills import Fills
from .jobs import ReadJob, WriteJob
from .machine.bounds import READ_WAIT_S
from .machine.machine import Replicas
from .machine.slots import DOUBT, LOST, NEVER, UNPROVEN, WRITTEN
from .payload import decode
from .reserve import Reserve
from .writes import CHUNK_PAGES

# A read may wait READ_WAIT_S for a store that holds its page (machine/bounds.py); the
# guard against a bug is past that.
READ_GUARD_S = READ_WAIT_S + 10
_UNREADABLE = {
    LOST: "slot {slot}: no store holds its newest page any more (EIO until written again)",
    DOUBT: "slot {slot}: its last write failed (EIO until written again)",
}


class Reads:
    """The read path of remote.RemoteDevice."""

    agent: Agent
    machine: Replicas
    reserve: Reserve
    direct: DirectPath | None
    fills: Fills
    local_reads: int
    _lock: threading.Lock
    _inflight: dict[int, tuple[WriteJob, int]]
    _readers: int

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
        alone = self._readers == 1 and indexes[-1] - lo == n - 1
        if direct is not None and direct.reads and alone and 0 not in expected:  # 0: unproven
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
