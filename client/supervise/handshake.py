"""The NBD handshake, client side: a connection to an export, made ready for the kernel.

Fixed newstyle negotiation (the NBD protocol, doc/proto.md), as nbd-client does
before it hands a socket to the kernel: the server's greeting, our flags, one
NBD_OPT_GO for the export, its NBD_REP_INFO (size and transmission flags) and
NBD_REP_ACK. After that the socket is in the transmission phase, which the
kernel's driver speaks itself; netlink.py hands it over. Every read is bounded
(an option reply's data at MAX_REPLY, the whole exchange at `deadline`), and a
server that says anything unexpected is one line, never a hang.

Who answers is checked before a byte is read (#30): the export attach starts is a
Unix socket in a root-only directory, and the kernel gets a connection only when
SO_PEERCRED names the nbdkit the supervisor started (its pid: nbdkit runs in the
foreground, so the process that listens is the one exec'd), or, for a server not
ours (attach --no-serve), a process of root's. Whoever else answers -- a user who bound
a freed path first -- gets refused, never handed the device's pages. A TCP
endpoint (--no-serve HOST:PORT) cannot be checked: attach says so.
"""

from __future__ import annotations

import os
import socket
import struct
import time

NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = b"IHAVEOPT"
REPLY_MAGIC = 0x3E889045565A9
FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES = 1, 2
OPT_GO = 7
REP_ACK, REP_INFO = 1, 3
REP_ERROR_BIT = 1 << 31
INFO_EXPORT = 0
# The longest option reply we accept: an NBD_REP_INFO is a few bytes, an error's
# message is human text; the protocol bounds strings at 4 KiB.
MAX_REPLY = 4096


class HandshakeError(ConnectionError):
    """The server is not an NBD server, or refused the export."""


class PeerError(HandshakeError):
    """The process that answers is not the server the kernel may be handed."""


class Endpoint:
    """Where an export answers: a Unix socket's path, or a TCP address resolved once.
    A plain class, as Export (no dataclasses in the supervisor)."""

    __slots__ = ("address", "family", "text")

    def __init__(self, family: int, address: str | tuple[str, int], text: str) -> None:
        self.family, self.address, self.text = family, address, text

    @property
    def path(self) -> str:
        return self.address if isinstance(self.address, str) else ""


def endpoint(server: str) -> Endpoint:
    """`unix:PATH` (or an absolute path), or HOST:PORT (PORT 10809 when absent), the
    host looked up now (resolve() says why only now)."""
    if server.startswith(("unix:", "/")):
        path = server.removeprefix("unix:")
        return Endpoint(socket.AF_UNIX, path, f"unix:{path}")
    host, sep, port = server.rpartition(":")
    if not sep or "]" in port:
        host, port = server, "10809"
    host = host.strip("[]")
    family, numeric = resolve(host)
    return Endpoint(family, (numeric, int(port)), f"nbd://{host}:{port}")


# struct ucred: pid, uid, gid (<sys/socket.h>), what SO_PEERCRED answers.
_UCRED = struct.Struct("=iII")


def check_peer(sock: socket.socket, where: Endpoint, pid: int) -> None:
    """The process listening on a Unix socket must be nbdkit `pid` (0: any process of
    this user's -- root's -- for a server attach did not start), and run as this user,
    as the kernel recorded it at listen()."""
    if sock.family != socket.AF_UNIX:
        return  # TCP: who listens cannot be known; attach --no-serve warns of it
    got, uid, _ = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                _UCRED.size))  # fmt: skip
    if (pid and got != pid) or uid != os.geteuid():
        want = f"nbdkit {pid}" if pid else f"a process of uid {os.geteuid()}"
        raise PeerError(f"{where.text} is served by pid {got} (uid {uid}), not {want}: "
                        "refused, the device is not handed to it")  # fmt: skip


class Export:
    """An export's size and transmission flags (what the kernel calls the server flags).
    A plain class: dataclasses would cost the supervisor ~1.5 MiB of its 16 (inspect)."""

    __slots__ = ("flags", "size")

    def __init__(self, size: int, flags: int) -> None:
        self.size, self.flags = size, flags


def _read(sock: socket.socket, count: int, end: float) -> bytes:
    out = bytearray()
    while len(out) < count:
        sock.settimeout(max(0.01, end - time.monotonic()))
        try:
            chunk = sock.recv(count - len(out))
        except TimeoutError:
            raise HandshakeError("the NBD server did not finish its handshake in time") from None
        if not chunk:
            raise HandshakeError("the NBD server closed the connection during the handshake")
        out += chunk
    return bytes(out)


def negotiate(sock: socket.socket, export: str, deadline: float) -> Export:
    """NBD_OPT_GO for `export` on a connected socket; returns its size and flags."""
    end = time.monotonic() + deadline
    greeting = _read(sock, 18, end)
    if greeting[:8] != NBDMAGIC or greeting[8:16] != IHAVEOPT:
        raise HandshakeError("not a newstyle NBD server (no NBDMAGIC/IHAVEOPT greeting)")
    (server_flags,) = struct.unpack(">H", greeting[16:])
    if not server_flags & FLAG_FIXED_NEWSTYLE:
        raise HandshakeError("the NBD server does not speak fixed newstyle")
    zeroes = server_flags & FLAG_NO_ZEROES
    sock.sendall(struct.pack(">I", FLAG_FIXED_NEWSTYLE | zeroes))
    name = export.encode()
    data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)  # no extra info asked
    sock.sendall(IHAVEOPT + struct.pack(">II", OPT_GO, len(data)) + data)
    found: Export | None = None
    while True:
        magic, option, kind, length = struct.unpack(">QIII", _read(sock, 20, end))
        if magic != REPLY_MAGIC or option != OPT_GO or length > MAX_REPLY:
            raise HandshakeError("the NBD server's option reply is malformed")
        body = _read(sock, length, end)
        if kind & REP_ERROR_BIT:
            why = body.decode(errors="replace") or f"error {kind & ~REP_ERROR_BIT}"
            raise HandshakeError(f"the NBD server refused export {export!r}: {why}")
        if kind == REP_INFO and len(body) >= 12 and struct.unpack(">H", body[:2])[0] == INFO_EXPORT:
            size, flags = struct.unpack(">QH", body[2:12])
            found = Export(size, flags)
        elif kind == REP_ACK:
            if found is None:
                raise HandshakeError("the NBD server sent no export information")
            sock.settimeout(None)
            return found


def resolve(host: str) -> tuple[int, str]:
    """The address family and numeric address of `host`, looked up once, at start: a
    lookup may read files (/etc/hosts, and socket.getaddrinfo's idna codec imports its
    modules at its first call), which on a diskless host are tmpfs pages that swap may
    have put on the very device a takeover brings back. A numeric host (attach's
    default) needs no lookup at all, and leaves the codec's 1.5 MiB unimported."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
            return family, host
        except OSError:
            continue
    family, _, _, _, address = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0]
    return family, str(address[0])


def open_checked(where: Endpoint, deadline: float, pid: int) -> socket.socket:
    """A connection to `where` whose peer passed check_peer (not yet negotiated)."""
    sock = socket.socket(where.family, socket.SOCK_STREAM)
    try:
        sock.settimeout(deadline)
        sock.connect(where.address)  # numeric: no lookup (CPython parses it with inet_pton)
        if where.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        check_peer(sock, where, pid)
        return sock
    except BaseException:
        sock.close()
        raise


def connect(where: Endpoint, export: str, deadline: float,
            pid: int = 0) -> tuple[socket.socket, Export]:  # fmt: skip
    """A connection to the export at `where`, its peer checked (check_peer: nbdkit
    `pid`), negotiated and ready for the kernel."""
    sock = open_checked(where, deadline, pid)
    try:
        return sock, negotiate(sock, export, deadline)
    except BaseException:
        sock.close()
        raise
