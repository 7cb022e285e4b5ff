"""A standby nbdkit: started and locked in advance, it serves only when told.

The supervisor (netswap.client.supervise) keeps one beside the nbdkit that
serves, so that when that one dies the next needs almost no memory: a swapping
host whose swap IO is held cannot give a cold start its ~45 MiB (the storm
takes what the dead one freed within a second, and the min watermark leaves a
real-time task only a quarter of the reserve). The standby builds the device
(reserve populated and locked, slot map, tables), says `ready` on the socket
the supervisor handed it, and blocks in after_fork -- nbdkit listens but does
not answer -- until `go EPOCH`: then the agent rebuilds the area from the
stores under that epoch and nbdkit serves. What the takeover allocates comes from
a cushion the spare grew and locked in advance (CUSHION): the supervisor starts it
with PYTHONMALLOC=malloc, so that Python's objects come from that heap too.
"""

from __future__ import annotations

import socket

# The memory a takeover needs, grown into the heap and locked while the host is calm
# (server/heap.grow_cushion): measured on this machine, a spare grew by 12 MiB from
# ready to serving a 768 MiB area (the rebuild, the loop, the store connections), and
# by 19 MiB more over its first IO in 1 MiB requests; in the 256 MiB guest, in swap's
# 128 KiB requests, by 6.4 MiB in all. Beyond the cushion, a real-time task may take a
# quarter of attach's min_free_kbytes (4 MiB).
CUSHION = 12 * 1024 * 1024
# "go " and an epoch (at most 2^32, ten digits), a newline: a longer line is not ours.
MAX_LINE = 32


class StandbyError(ConnectionError):
    """The supervisor's socket closed, or said something else than `go EPOCH`."""


def wait_for_go(fd: int) -> int:
    """Say ready on the inherited socket `fd`, then wait (as long as it takes) for the
    supervisor's `go EPOCH`; returns the epoch."""
    with socket.socket(fileno=fd) as sock:
        sock.sendall(b"ready\n")
        line = b""
        while not line.endswith(b"\n"):
            chunk = sock.recv(MAX_LINE - len(line))
            if not chunk:
                raise StandbyError("the supervisor went away before telling this standby to serve")
            line += chunk
            if len(line) >= MAX_LINE and not line.endswith(b"\n"):
                raise StandbyError(f"not a go line from the supervisor: {line[:MAX_LINE]!r}")
    word, _, epoch = line.decode("ascii", "replace").strip().partition(" ")
    if word != "go" or not epoch.isdigit():
        raise StandbyError(f"not a go line from the supervisor: {line!r}")
    return int(epoch)
