"""Who reaches the export and attach's files (#30): root only, unless asked otherwise.

NBD has no authentication: whoever connects to the export reads and writes every
page swapped to it, opened (the seal guards the stores' copies, not the export).
So the export attach starts is a Unix socket in a directory only root reaches
(/run/netswap, mode 0700), and its files -- state, the serve command, the logs that
name areas, the ops token -- live in directories of the same kind: a user can
neither connect, nor read them, nor bind a freed socket path first (the
supervisor also checks who answers: supervise/handshake.check_peer). A TCP
listener (serve --listen, the compose lab's and the demo's) answers every user of
the host, and off loopback every host that reaches it: serve says so, in one line.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
from pathlib import Path

from netswap.server.units import UsageError, is_loopback

# What no other user may do to a directory of attach's (read, write, search).
OTHERS = 0o077
# A Unix socket's path fits sun_path: 108 bytes with its NUL.
MAX_SOCKET_PATH = 107


def private_dir(path: Path) -> Path:
    """`path`, a directory only this user reaches: made 0700 if missing; one of ours
    that others reach (an older netswap made /run/netswap 0755) closed to them; one
    of another user's, or anything but a directory, refused in one line."""
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700, parents=True)
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode):
        raise UsageError(f"{path} is not a directory (a symlink or a file is where netswap "
                         "keeps its private files)")  # fmt: skip
    if info.st_uid != os.geteuid():
        raise UsageError(f"{path} belongs to uid {info.st_uid}, not to this user "
                         f"({os.geteuid()}): netswap keeps swap's secrets there")  # fmt: skip
    if info.st_mode & OTHERS:
        path.chmod(0o700)
    return path


def others_reach(path: Path) -> bool:
    """Whether users other than its owner may enter the directory `path`."""
    return bool(path.stat().st_mode & 0o011)


def check_socket_dir(path: Path) -> None:
    """A directory others may write (and not sticky) lets them replace a socket in it
    under its clients: refused."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise UsageError(f"{path} does not exist (make it root's alone: mkdir -m 0700 "
                         f"{path})") from None  # fmt: skip
    if mode & 0o022 and not mode & stat.S_ISVTX:
        raise UsageError(f"others may write {path} (mode {mode & 0o7777:o}): they could "
                         "put a socket of theirs in place of the export's")  # fmt: skip


def free_socket_path(path: Path) -> None:
    """Make `path` ready for nbdkit -U: a stale socket nbdkit left (it never removes its
    own) goes; a socket that answers is a busy export; anything else is refused."""
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise UsageError(f"{path} is longer than a Unix socket's {MAX_SOCKET_PATH} bytes")
    try:
        info = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise UsageError(f"{path} exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError as exc:
            if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                raise UsageError(f"cannot use {path}: {exc.strerror}") from None
        else:
            raise UsageError(f"{path} is already in use (another nbd server?)")
    path.unlink(missing_ok=True)


def tcp_exposure(host: str, port: int) -> str:
    """One line: what a TCP listener exposes, and to whom."""
    who = "every user of this host" if is_loopback(host) else (
        f"every host that reaches {host} and every user of this host")  # fmt: skip
    return (
        f"nbd://{host}:{port} answers {who}, with no authentication: each can read and "
        "write every page swapped to it (keys and all); to keep it root's, serve "
        "--unix PATH in a root-only directory, as attach does"
    )


def unix_exposure(path: Path) -> str:
    """One line: who may connect to the socket serve --unix makes (umask 077: its owner)."""
    where = path.parent
    if others_reach(where):
        return (
            f"unix:{path} answers only uid {os.geteuid()} (the socket is mode 0700), "
            f"but others may enter {where}: a directory of mode 0700 also keeps its "
            "path from being taken while no server holds it"
        )
    return f"unix:{path} answers only uid {os.geteuid()} (mode 0700 in a directory of its own)"
