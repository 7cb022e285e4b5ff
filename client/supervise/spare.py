"""The standby nbdkit, seen from the supervisor: started early, told when to serve.

A spare is nbdkit with standby=FD (netswap.client.nbd.standby): it builds and
locks its device, writes `ready` on its end of a socketpair, and serves only
after `go EPOCH`. It listens on the other of the supervisor's two sockets (nbdkit
binds before the plugin's after_fork, so the one serving keeps its own), and
takes over the moment the one serving dies: no cold start of Python and the
agent while the device's IO is held and the storm takes any memory freed.
"""

from __future__ import annotations

import contextlib
import os
import socket

from .child import Child
from .handshake import Endpoint

# "ready\n" and nothing else comes from a spare; anything longer is not one.
READY = b"ready\n"


class Spare:
    def __init__(self, child: Child, sock: socket.socket, where: Endpoint) -> None:
        self.child, self.sock, self.where = child, sock, where
        self.ready = False
        self._heard = b""

    @classmethod
    def spawn(cls, argv: list[str], env: dict[str, str], output: str | int,
              where: Endpoint) -> Spare:  # fmt: skip
        """`output`: as Child.spawn's (a log file, or the supervisor's pipe)."""
        ours, theirs = socket.socketpair()
        try:
            os.set_inheritable(theirs.fileno(), True)
            child = Child.spawn([*argv, f"standby={theirs.fileno()}"], env, output,
                                ordinary=True)  # fmt: skip
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        return cls(child, ours, where)

    def fileno(self) -> int:
        return self.sock.fileno()

    def heard(self) -> bool:
        """The socket was readable: True while the spare lives (ready now or not yet)."""
        try:
            chunk = self.sock.recv(len(READY) - len(self._heard))
        except OSError:
            chunk = b""
        if not chunk:
            return False
        self._heard += chunk
        if self._heard == READY:
            self.ready = True
        return READY.startswith(self._heard)

    def go(self, epoch: int) -> None:
        self.sock.sendall(f"go {epoch}\n".encode())
        self.sock.close()

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
        if self.child.alive():
            self.child.stop()
        self.child.close()
