"""What a user with no privileges can do to an attached export (#30): run as that user.

    setpriv --reuid=nobody --regid=nogroup --clear-groups --inh-caps=-all \\
        /usr/bin/python3 -S -I unprivileged.py check --connect PATH --read PATH --list DIR
    ... unprivileged.py squat --path PATH [--path PATH] --seconds S

Stdlib only and run by path (python3 -S -I), so that the user needs nothing but read
access to this file. It prints one JSON line that says who it ran as (uid, gid,
groups, effective capabilities) and what each attempt got: "ok", or the errno's
name. The caller (tests/test_private.py on this host, lab/guest.py in the guest)
decides; a check is only worth its name when the same run against an open export
-- TCP, a world-readable directory -- gets "ok" (the tests do that too).

check: connect to each socket (the export and its spare), read each file (state,
logs, tokens), list each directory, and look for netswap's keys among those the
kernel shows this user (/proc/keys).

squat: take a socket path the way someone who wants to become the server would --
unlink whatever is there, bind, listen -- over and over for S seconds or until
SIGTERM (a restart happens meanwhile); when it does get one, it answers the NBD
handshake like a real server (export "swap", 16 MiB of zeros) so that whoever
connects to it could hand it to the kernel. Says each path it bound, and how many
connections it answered.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable

# Who the checks run as: nobody, with no groups and no capabilities (setpriv drops the
# inheritable and ambient sets; a uid other than 0 has no effective ones after exec).
NOBODY = ("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--inh-caps=-all")
# Debian's interpreter, without site or the caller's environment: nothing but this file.
PYTHON = ("/usr/bin/python3", "-S", "-I", __file__)

# The squatter's fake export: what a real server would announce (a size and flags).
FAKE_SIZE = 16 << 20
NBD_FLAG_HAS_FLAGS = 1
OPT_GO, REP_ACK, REP_INFO = 7, 1, 3
REPLY_MAGIC = 0x3E889045565A9


# A rootless container's view: nobody's own user namespace, in which it is root with
# every capability (its uid 0 maps to nobody on the host).
USERNS = ("unshare", "--user", "--map-root-user")


def as_nobody(*argv: str, userns: bool = False) -> list[str]:
    """The command line that runs this file as nobody with `argv` (check ... / squat ...);
    `userns`: as root of a user namespace of nobody's (a rootless container)."""
    return [*NOBODY, *(USERNS if userns else ()), *PYTHON, *argv]


def run_as_nobody(*argv: str, timeout: float = 120, userns: bool = False) -> dict[str, object]:
    """Run this file as nobody; its JSON report (a failure to run it is an error)."""
    done = subprocess.run(as_nobody(*argv, userns=userns), capture_output=True, text=True,
                          timeout=timeout, check=False)  # fmt: skip
    if done.returncode != 0 or not done.stdout.strip():
        raise RuntimeError(f"as nobody: exit {done.returncode}: {done.stderr.strip()[-500:]}")
    report: dict[str, object] = json.loads(done.stdout.splitlines()[-1])
    return report


def outcome(action: Callable[[], object]) -> str:
    """'ok' if `action()` ran, else its errno's name."""
    try:
        action()
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc))
    return "ok"


def who() -> dict[str, object]:
    with open("/proc/self/status") as f:
        status = dict(line.split(":", 1) for line in f.read().splitlines())
    return {"uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(),
            "groups": os.getgroups(), "cap_eff": status["CapEff"].strip(),
            "cap_prm": status["CapPrm"].strip()}  # fmt: skip


def connect(path: str) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(2)
        sock.connect(path)
        sock.recv(8)  # a server that answers greets first (NBDMAGIC)


def connect_tcp(address: str) -> None:
    host, _, port = address.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=2) as sock:
        sock.recv(8)


def read(path: str) -> None:
    with open(path, "rb") as f:
        f.read(1)


def netswap_keys() -> list[str]:
    """The keys named netswap:... that the kernel shows this user."""
    with open("/proc/keys") as f:
        return [line.split()[-1] for line in f if "netswap:" in line]


def check(args: argparse.Namespace) -> dict[str, object]:
    tries: list[tuple[str, str, Callable[[str], object]]] = [
        *(("connect", p, connect) for p in args.connect),
        *(("tcp", a, connect_tcp) for a in args.tcp),
        *(("read", p, read) for p in args.read),
        *(("list", d, os.listdir) for d in args.list),
    ]
    attempts = [{"what": what, "path": path, "got": outcome(functools.partial(action, path))}
                for what, path, action in tries]  # fmt: skip
    return {"who": who(), "attempts": attempts, "keys": netswap_keys()}


def take(path: str) -> socket.socket:
    """Unlink what is at `path`, bind a socket of ours there, listen, let anyone in."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(8)
        os.chmod(path, 0o777)
    except OSError:
        sock.close()
        raise
    return sock


def exactly(conn: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = conn.recv(count - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def answer(conn: socket.socket) -> None:
    """The server's side of a fixed newstyle handshake, to NBD_OPT_GO: the connection
    is then in the transmission phase, as the kernel would take it."""
    conn.settimeout(5)
    conn.sendall(b"NBDMAGIC" + b"IHAVEOPT" + struct.pack(">H", 3))
    exactly(conn, 4)  # the client's flags
    _, option, length = struct.unpack(">8sII", exactly(conn, 16))
    exactly(conn, length)  # the export's name and the info asked for
    info = struct.pack(">HQH", 0, FAKE_SIZE, NBD_FLAG_HAS_FLAGS)
    conn.sendall(struct.pack(">QIII", REPLY_MAGIC, option, REP_INFO, len(info)) + info)
    conn.sendall(struct.pack(">QIII", REPLY_MAGIC, option, REP_ACK, 0))


def squat(args: argparse.Namespace) -> dict[str, object]:
    deadline = time.monotonic() + args.seconds
    stop = [False]
    signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__(0, True))
    denied: dict[str, int] = {}
    held: dict[str, socket.socket] = {}
    bound: list[str] = []
    served: list[socket.socket] = []
    tries = 0
    while time.monotonic() < deadline and not stop[0]:
        for path in args.path:
            if path in held and os.path.exists(path):
                continue
            tries += 1
            try:
                held[path] = take(path)
                bound.append(path)
            except OSError as exc:
                name = errno.errorcode.get(exc.errno or 0, str(exc))
                denied[name] = denied.get(name, 0) + 1
        ready, _, _ = select.select(list(held.values()), [], [], 0.02)
        for listener in ready:
            conn, _ = listener.accept()
            try:
                answer(conn)
                served.append(conn)  # kept open: the peer holds our "export"
            except OSError:
                conn.close()
    return {"who": who(), "tries": tries, "denied": denied, "bound": bound,
            "served": len(served)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(prog="unprivileged")
    sub = parser.add_subparsers(dest="mode", required=True)
    one = sub.add_parser("check")
    one.add_argument("--connect", action="append", default=[])
    one.add_argument("--tcp", action="append", default=[], metavar="HOST:PORT")
    one.add_argument("--read", action="append", default=[])
    one.add_argument("--list", action="append", default=[])
    two = sub.add_parser("squat")
    two.add_argument("--path", action="append", required=True)
    two.add_argument("--seconds", type=float, required=True)
    args = parser.parse_args()
    print(json.dumps(check(args) if args.mode == "check" else squat(args)), flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
