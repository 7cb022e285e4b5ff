"""nbdkit as the supervisor's child: started detached, watched through a pidfd.

nbdkit must outlive a supervisor that dies (a new supervisor adopts it, and the
device keeps its connection meanwhile): it is started with serve's
--no-exit-with-parent, in a session of its own, by a double fork that makes init
its parent from the start. A pidfd (Linux 5.3) lets the supervisor -- or the one
that adopts it -- wait on it all the same. The pid comes back through a pipe.
Its output goes to a file, or (the supervisor's choice, logs.py) to a pipe.

nbdkit (1.32, strace: with or without --exit-with-parent) sets PR_SET_PDEATHSIG
to SIGTERM as it starts, so it must not exec while the middle process is still
its parent: under load the middle's exit came after nbdkit's prctl, and its
exit sent nbdkit SIGTERM before nbdkit wrote a line (ftrace's signal_generate:
sig=15 from the middle's pid to the spare's). So the grandchild waits, on a
pidfd of the middle, until the middle has exited -- by then the kernel has
reparented it -- and only then execs.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal


class Child:
    """nbdkit, started detached (its parent is init), watched through a pidfd."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.pidfd = os.pidfd_open(pid)

    @classmethod
    def spawn(cls, argv: list[str], env: dict[str, str], output: str | os.PathLike[str] | int,
              ordinary: bool = False) -> Child:  # fmt: skip
        """`output`: a log file's path, or a descriptor (the supervisor's pipe) that
        becomes nbdkit's stdout and stderr. `ordinary`: not the supervisor's SCHED_FIFO
        (a spare loading while the host swaps must not take memory and CPU ahead of
        the nbdkit serving)."""
        read, write = os.pipe()
        middle = os.fork()
        if middle == 0:  # the middle process: a session of its own, then nbdkit, then gone
            try:
                os.close(read)
                os.setsid()
                middle_fd = os.pidfd_open(os.getpid())
                pid = os.fork()
                if pid == 0:
                    # Readable once the middle is a zombie, which is after the kernel
                    # made init our parent: nbdkit's PDEATHSIG is then init's, not the
                    # middle's. No timeout: the middle only writes the pid and exits,
                    # and the supervisor's waitpid(middle) already waits for the same.
                    select.select([middle_fd], [], [])
                    os.close(middle_fd)
                    if isinstance(output, int):
                        out = output
                    else:
                        out = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                    # Ignored, as the supervisor's Python has it: an nbdkit that outlives
                    # the supervisor's pipe gets EPIPE for a line, not a fatal signal.
                    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
                    null = os.open(os.devnull, os.O_RDONLY)
                    os.dup2(null, 0)
                    os.dup2(out, 1)
                    os.dup2(out, 2)
                    if ordinary:
                        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
                    os.execve(argv[0], argv, env)
                os.write(write, str(pid).encode())
            finally:
                os._exit(0)
        os.close(write)
        got = os.read(read, 32)
        os.close(read)
        os.waitpid(middle, 0)
        return cls(int(got))

    def alive(self) -> bool:
        ready, _, _ = select.select([self.pidfd], [], [], 0)
        return not ready

    def kill(self, grace: float = 10.0) -> None:
        """SIGKILL, and wait for the exit."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        select.select([self.pidfd], [], [], grace)

    def stop(self, grace: float = 10.0) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)
        if select.select([self.pidfd], [], [], grace)[0]:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        select.select([self.pidfd], [], [], grace)

    def close(self) -> None:
        os.close(self.pidfd)
