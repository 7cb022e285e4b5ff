"""A supervisor's takeover, run as attach runs it (python3 -S, stdlib only), for
tests/test_takeover.py: the kernel's side of the link is the one fake (no nbd driver).

usage: python3 -S supervised_takeover.py SUPERVISE_PARENT LOG_FD -- SUPERVISOR_OPTIONS
It adopts the nbdkit the state file names (as `netswap adopt` does: nothing was
connected at its start, so whatever a takeover would import or look up is still to
come), starts its spare and says `ready`; on `kill` it kills nbdkit -9 and takes
over under an audit hook, then says one JSON line: what was imported or opened, the
socket serving, the sockets the kernel's side got (their paths and the pid each one's
peer was checked against). On `stop` it stops everything.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time

sys.path.append(sys.argv[1])
from supervise import knobs, supervisor
from supervise.handshake import Endpoint, connect
from supervise.options import parse_args


class KernelSide:
    """What nbd.ko does with the socket the supervisor hands it: keeps it."""

    def __init__(self, device: str, export: str, *_: int) -> None:
        self.export = export
        self.paths: list[str] = []
        self.sockets: list[socket.socket] = []

    def connect(self, where: Endpoint, patience: float, pid: int) -> None:
        self.sockets.append(connect(where, self.export, patience, pid)[0])
        self.paths.append(where.path)

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
    sup = supervisor.Supervisor(parse_args(sys.argv[4:]))
    sup.adopt()
    sup.save()
    sup.start_spare()
    if sup.spare_in_time(time.monotonic() + 90) is None:
        print("no spare", flush=True)
        return 1
    print("ready", flush=True)
    assert sys.stdin.readline().strip() == "kill"
    sys.addaudithook(audit)
    RECORDING[0] = True
    child = sup.child
    assert child is not None
    os.kill(child.pid, 9)
    while child.alive():
        time.sleep(0.01)
    sup.restart("nbdkit died", graceful=False)
    RECORDING[0] = False
    print(json.dumps({"seen": SEEN, "socket": sup.where.path, "restarts": sup.state["restarts"],
                      "kernel": getattr(sup.link, "paths", [])}), flush=True)  # fmt: skip
    sys.stdin.readline()
    sup.stop()
    logs.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
