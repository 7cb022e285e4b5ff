"""Logs that nothing on a takeover waits for: bounded rings, drained by threads.

On a diskless host / is tmpfs, and so is /var/log: a log file's pages swap out
like any other, possibly to the very device whose server just died. A
supervisor that appended a line to its log in the middle of a takeover waited in
write(2) for a swap-in from that device (seen in the guest lab: shmem_swapin_folio,
until the kernel failed the device's IO at the dead-connection timeout). So:

- say() copies a line into a Ring, a buffer allocated and touched at start (locked
  with the rest of the process), under a lock that is never held across a system
  call. A full ring drops the line and counts it; the count is said once, in a
  line of its own, when the writer has room again.
- A writer thread drains each ring into its file. It may wait on a swap-in for as
  long as the kernel holds the device: nobody waits for it.
- nbdkit's stdout and stderr (the one serving and the spare) are a pipe that a
  reader thread empties into the serve log's ring as soon as anything arrives.
  nbdkit writes its errors synchronously from its worker threads, and the plugin
  its lines: a pipe this process always empties never blocks them, whatever the
  file does.

The threads come from _thread (threading's import would cost the supervisor about
1 MiB of its 16) with small stacks: mlockall(MCL_FUTURE) locks a thread's whole stack.
"""

from __future__ import annotations

import _thread
import contextlib
import fcntl
import os
import select
import time
from collections.abc import Callable

# A process's own lines (the supervisor's; in nbdkit, the plugin's and the agent's
# warnings): a takeover logs 3-5 lines of ~150 bytes; a cold start that keeps failing
# logs about one a second, so a whole dead-connection timeout (120 s) of them is
# ~18 KiB. All of it fits while the writer waits out a held device.
OWN_RING = 32 * 1024
# nbdkit's output through the supervisor's pipe: a whole drill in the guest lab (a 768
# MiB storm of 22 min, three takeovers, an adoption) wrote 82 lines, 7.2 KiB, of
# nbdkit's, the plugin's and the agent's; this holds that nine times over.
SERVE_RING = 64 * 1024
# The kernel's default pipe size, set explicitly: the reader runs SCHED_FIFO like the
# rest of the supervisor and empties the pipe as soon as it is written to, so only a
# burst between two of its turns waits in the pipe (a few lines, far below 64 KiB).
PIPE_SIZE = 64 * 1024
F_SETPIPE_SZ = 1031  # <fcntl.h>
# Each thread runs one flat loop (Python 3.11 keeps Python frames off the C stack):
# 64 KiB is ample, where glibc's default (RLIMIT_STACK, 8 MiB) would all be locked.
THREAD_STACK = 64 * 1024
# What the reader takes from the pipe at a time (select wakes it again while more waits).
CHUNK = 16 * 1024
# A writer that finds nothing to do looks again this often (drop notes, a missed wake).
IDLE_S = 1.0
# How long the last lines may take to reach their files when the process ends: a
# file stuck on a held device must not keep a supervisor that was told to stop.
FLUSH_S = 2.0


class Ring:
    """A bounded byte ring: put() never waits on anything but a memory copy."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._buf = bytearray(capacity)
        for at in range(0, capacity, 4096):  # resident now, locked with the rest
            self._buf[at] = 0
        self._view = memoryview(self._buf)
        self._lock = _thread.allocate_lock()
        self._head = 0  # bytes ever put
        self._tail = 0  # bytes ever written out
        self._dropped = 0  # lines dropped since the last note
        self.dropped_total = 0

    def put(self, data: bytes | memoryview, lines: int = 1) -> bool:
        """Keep `data` (`lines` lines) if it fits whole; else drop and count it."""
        size = len(data)
        with self._lock:
            if size > self.capacity - (self._head - self._tail):
                self._dropped += lines
                self.dropped_total += lines
                return False
            at = self._head % self.capacity
            first = min(size, self.capacity - at)
            self._view[at : at + first] = data[:first]
            self._view[: size - first] = data[first:]
            self._head += size
        return True

    def pending(self) -> memoryview:
        """The oldest unwritten bytes that lie in one piece (empty when none)."""
        with self._lock:
            at = self._tail % self.capacity
            return self._view[at : at + min(self._head - self._tail, self.capacity - at)]

    def written(self, count: int) -> None:
        with self._lock:
            self._tail += count

    def take_dropped(self) -> int:
        with self._lock:
            dropped, self._dropped = self._dropped, 0
        return dropped

    def empty(self) -> bool:
        with self._lock:
            return self._head == self._tail and not self._dropped


class Logs:
    """The process's rings, their files, the writer thread and the pipe reader."""

    def __init__(self, who: str) -> None:
        self.who = who  # the drop note's author: "netswap supervise"
        self.own = Ring(OWN_RING)
        self.sinks: list[tuple[Ring, int]] = [(self.own, 2)]  # fd 2: attach's log file
        self.serve: Ring | None = None
        self.pipes: list[int] = []
        self.pipe_write = -1  # nbdkit's stdout and stderr
        self._chunk = bytearray()  # the pipe reader's buffer, made in serve_log()
        self._wake = _thread.allocate_lock()
        self._wake.acquire()  # locked: no wake-up pending
        self._added_r, self._added_w = -1, -1
        self.running = False

    def say(self, line: str) -> None:
        data = (line + "\n").encode(errors="replace")
        if not self.running:  # before the writer starts (or in a library's caller)
            _write_all(self.sinks[0][1], data)
            return
        if self.own.put(data):
            self.kick()

    def kick(self) -> None:
        with contextlib.suppress(RuntimeError):  # a wake-up is already pending
            self._wake.release()

    def start(self) -> None:
        """The writer thread; say() queues from now on."""
        if self.running:
            return
        self.running = True
        _spawn(self._write_loop)

    def serve_log(self, path: str) -> int:
        """nbdkit's output: a pipe (its write end returned, for every nbdkit started)
        that the reader thread empties into a ring the writer appends to `path`."""
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        read, self.pipe_write = os.pipe2(os.O_CLOEXEC)
        with contextlib.suppress(OSError):  # else the default size, the same on Linux
            fcntl.fcntl(read, F_SETPIPE_SZ, PIPE_SIZE)
        self.serve = Ring(SERVE_RING)
        self._chunk = bytearray(CHUNK)
        self.sinks.append((self.serve, fd))
        self.pipes.append(read)
        self._added_r, self._added_w = os.pipe2(os.O_CLOEXEC)
        _spawn(self._read_loop)
        return self.pipe_write

    def follow(self, fd: int) -> None:
        """Also empty `fd`, another pipe of nbdkit's (an adopted one's stderr)."""
        self.pipes.append(fd)
        if self._added_w >= 0:
            os.write(self._added_w, b"+")

    def _read_loop(self) -> None:
        while True:
            watched = [*self.pipes, self._added_r]
            try:
                ready, _, _ = select.select(watched, [], [])
            except OSError:  # a pipe closed under us: look again
                continue
            for fd in ready:
                if fd == self._added_r:
                    os.read(fd, 64)
                    continue
                try:
                    count = os.readv(fd, [self._chunk])
                except BlockingIOError:  # an adopted pipe is non-blocking: nothing after all
                    continue
                except OSError:
                    count = 0
                if count == 0:  # every writer gone (an adopted nbdkit died)
                    self.pipes = [p for p in self.pipes if p != fd]
                    os.close(fd)
                    continue
                data = memoryview(self._chunk)[:count]
                assert self.serve is not None
                if self.serve.put(data, max(1, self._chunk.count(b"\n", 0, count))):
                    self.kick()

    def _write_loop(self) -> None:
        while True:
            self._wake.acquire(timeout=IDLE_S)
            for ring, fd in self.sinks:
                self._drain(ring, fd)

    def _drain(self, ring: Ring, fd: int) -> None:
        while True:
            chunk = ring.pending()
            if not chunk:
                break
            try:
                count = os.write(fd, chunk)
            except OSError:
                count = len(chunk)  # a log that cannot be written: lost, not retried
            ring.written(count)
        dropped = ring.take_dropped()
        if dropped:
            note = (f"{time.strftime('%H:%M:%S')} {self.who}: {dropped} log lines dropped here "
                    "(the log's ring was full while its file waited)\n")  # fmt: skip
            _write_all(fd, note.encode())

    def flush(self, patience: float = FLUSH_S) -> bool:
        """Wait (at most `patience`) until every ring is written out."""
        if not self.running:
            return True
        deadline = time.monotonic() + patience
        while not all(ring.empty() for ring, _ in self.sinks):
            if time.monotonic() > deadline:
                return False
            self.kick()
            time.sleep(0.01)
        return True


def _spawn(loop: Callable[[], None]) -> None:
    """A thread with a small stack; the size is put back for the process's other threads
    (nbdkit's agent starts its own, which need the default)."""
    old = _thread.stack_size(THREAD_STACK)
    try:
        _thread.start_new_thread(loop, ())
    finally:
        _thread.stack_size(old)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view) :]
    except OSError:
        pass
