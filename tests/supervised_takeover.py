"""A supervisor's takeover, run as attach runs it (python3 -S, stdlib only), for
tests/test_takeover.py: the kernel's side of the link is the one fake (no nbd driver).

usage: python3 -S supervised_takeover.py SUPERVISE_PARENT LOG_FD [--no-peer-check] --
       SUPERVISOR_OPTIONS
With --adopt among the options it adopts the nbdkit the state file names (as `netswap
adopt` does: nothing was connected at its start, so whatever a takeover would import
or look up is still to come); without, it starts nbdkit as attach's supervisor does.
It starts its spare and says `ready`; on `kill` it kills nbdkit -9 and takes over
under an audit hook, then says one JSON line: what was imported or opened, the
socket serving, the sockets the kernel's side got and who was at their other end
(pid and uid, SO_PEERCRED). On `spare` it starts the next spare and says its pid
once it is ready; on `stop` it stops everything. --no-peer-check takes the check of
who answers out (tests/test_private.py's control: what a user who bound a freed path
first would get without it).
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
import time

sys.path.append(sys.argv[1])
from supervise import handshake, knobs, supervisor
from supervise.handshake import Endpoint, connect
from supervise.options import parse_args

UCRED = struct.Struct("=iII")


class KernelSide:
    """What nbd.ko does with the socket the supervisor hands it: keeps it."""

    def __init__(self, device: str, export: str, *_: int) -> None:
        self.export = export
        self.paths: list[str] = []
        self.peers: list[tuple[int, int]] = []  # (pid, uid) at each socket's other end
        self.sockets: list[socket.socket] = []

    def connect(self, where: Endpoint, patience: float, pid: int) -> None:
        sock = connect(where, self.export, patience, pid)[0]
        self.sockets.append(sock)
        self.paths.append(where.path)
        got = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, UCRED.size)
        self.peers.append(UCRED.unpack(got)[:2])

    reconfigure = connect

    def subscribe(self) -> None:
        pass

    def disconnect(self) -> None:
        for sock in self.sockets:
            sock.close()


SEEN: list[str] = []
RECORDING = [False]


def audit(event: str, args: tuple[object, ...]) -> None:
    if not RECORDING[0]:
        return
    if event == "import":
        SEEN.append(f"import {args[0]}")
    elif event == "open" and isinstance(args[0], str | bytes):
        path = os.fsdecode(args[0])
        if not path.startswith(("/proc/", "/sys/", "/dev/")):  # made up by the kernel
            SEEN.append(f"open {path}")


def main() -> int:
    supervisor.Link = KernelSide  # type: ignore[misc,assignment]
    logs = knobs.LOGS
    logs.sinks[0] = (logs.own, int(sys.argv[2]))  # the test's log, which it lets get stuck
    logs.start()
    ours = sys.argv[3 : sys.argv.index("--")]
    if "--no-peer-check" in ours:
        handshake.check_peer = lambda *_: None  # type: ignore[assignment]
    options = sys.argv[sys.argv.index("--") + 1 :]
    sup = supervisor.Supervisor(parse_args(options))
    if "--adopt" in options:
        sup.adopt()
        sup.save()
    else:
        try:
            sup.start_child("fresh")
        except RuntimeError:
            time.sleep(1)  # nbdkit's last lines, through the pipe, into the serve log
            logs.flush()
            raise
        sup.save()
        sup.connect_device()
    sup.start_spare()
    if sup.spare_in_time(time.monotonic() + 90) is None:
        print("no spare", flush=True)
        return 1
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "kill":  # stop: nothing killed
        sup.stop()
        logs.flush()
        return 0
    sys.addaudithook(audit)
    RECORDING[0] = True
    child = sup.child
    assert child is not None
    os.kill(child.pid, 9)
    while child.alive():
        time.sleep(0.01)
    sup.restart("nbdkit died", graceful=False)
    RECORDING[0] = False
    kernel = sup.link
    serving = sup.child.pid if sup.child is not None else 0
    print(json.dumps({"seen": SEEN, "socket": sup.where.path, "restarts": sup.state["restarts"],
                      "serving": serving, "kernel": getattr(kernel, "paths", []),
                      "peers": getattr(kernel, "peers", [])}), flush=True)  # fmt: skip
    while sys.stdin.readline().strip() == "spare":
        sup.start_spare()
        spare = sup.spare_in_time(time.monotonic() + 90)
        print(json.dumps({"standby": spare.child.pid if spare else 0,
                          "socket": spare.where.path if spare else ""}), flush=True)  # fmt: skip
    sup.stop()
    logs.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
