"""The kernel's nbd driver over generic netlink: connect, reconfigure, disconnect, watch.

What nbd-client does in netlink mode, plus what it does not expose: a
dead-connection timeout, and NBD_CMD_RECONFIGURE, which hands a device whose
connection died a new socket (Josef Bacik, Linux 4.12: "take down the nbd
server for less than the dead connection timeout time and bring it back up
and everything resumes gracefully"). The kernel marks the socket
SOCK_MEMALLOC as it did the first. The socket must be one this process holds,
already past the NBD handshake (handshake.py); the kernel takes its own
reference, so the caller may close its descriptor afterwards.

Messages are built by hand from linux/nbd-netlink.h and linux/genetlink.h: a
netlink header, a generic netlink header, then attributes (each padded to 4
bytes). Everything here is stdlib and small: the supervisor that calls it runs
inside a host that may be out of memory (supervisor.py), without site.
"""

from __future__ import annotations

import errno
import os
import socket
import struct

NETLINK_GENERIC = 16
GENL_ID_CTRL = 0x10
CTRL_CMD_GETFAMILY = 3
CTRL_ATTR_FAMILY_ID, CTRL_ATTR_FAMILY_NAME, CTRL_ATTR_MCAST_GROUPS = 1, 2, 7
CTRL_ATTR_MCAST_GRP_NAME, CTRL_ATTR_MCAST_GRP_ID = 1, 2
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
NLMSG_ERROR, NLMSG_DONE = 0x2, 0x3
SOL_NETLINK, NETLINK_ADD_MEMBERSHIP = 270, 1
NLA_F_NESTED = 0x8000
# linux/nbd-netlink.h
NBD_FAMILY, NBD_VERSION, NBD_MC_GROUP = "nbd", 1, "nbd_mc_group"
(NBD_CMD_CONNECT, NBD_CMD_DISCONNECT, NBD_CMD_RECONFIGURE, NBD_CMD_LINK_DEAD,
 NBD_CMD_STATUS) = 1, 2, 3, 4, 5  # fmt: skip
(NBD_ATTR_INDEX, NBD_ATTR_SIZE_BYTES, NBD_ATTR_BLOCK_SIZE_BYTES, NBD_ATTR_TIMEOUT,
 NBD_ATTR_SERVER_FLAGS, NBD_ATTR_CLIENT_FLAGS, NBD_ATTR_SOCKETS,
 NBD_ATTR_DEAD_CONN_TIMEOUT) = 1, 2, 3, 4, 5, 6, 7, 8  # fmt: skip
NBD_SOCK_ITEM, NBD_SOCK_FD = 1, 1
# A reply of the kernel's is a header and a few attributes; 64 KiB is netlink's own
# page-sized default read, far above any answer here.
RECV_BYTES = 65536

_NLMSG = struct.Struct("=IHHII")
_GENL = struct.Struct("=BBH")
_NLA = struct.Struct("=HH")


class NetlinkError(OSError):
    """The kernel refused a request (its errno), or nbd's netlink family is missing."""


def _attr(kind: int, payload: bytes) -> bytes:
    body = _NLA.pack(_NLA.size + len(payload), kind) + payload
    return body + bytes(-len(body) % 4)


def _u32(kind: int, value: int) -> bytes:
    return _attr(kind, struct.pack("=I", value))


def _u64(kind: int, value: int) -> bytes:
    return _attr(kind, struct.pack("=Q", value))


def _sockets(fds: list[int]) -> bytes:
    items = b"".join(_attr(NBD_SOCK_ITEM | NLA_F_NESTED, _u32(NBD_SOCK_FD, fd)) for fd in fds)
    return _attr(NBD_ATTR_SOCKETS | NLA_F_NESTED, items)


def parse_attrs(data: bytes) -> dict[int, bytes]:
    """Top-level attributes by type (the nested flag cleared)."""
    out: dict[int, bytes] = {}
    at = 0
    while at + _NLA.size <= len(data):
        length, kind = _NLA.unpack_from(data, at)
        if length < _NLA.size:
            break
        out[kind & ~NLA_F_NESTED] = data[at + _NLA.size : at + length]
        at += (length + 3) & ~3
    return out


class Family:
    """The nbd family's id and its multicast groups (a plain class: see handshake.Export)."""

    __slots__ = ("groups", "id")

    def __init__(self, id: int, groups: dict[str, int]) -> None:
        self.id, self.groups = id, groups


class Netlink:
    """One generic netlink socket, for requests (and, subscribed, nbd's events)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_GENERIC)
        self._seq = 0
        try:
            self.sock.bind((0, 0))
            self.family = self._family(NBD_FAMILY)
        except BaseException:
            self.sock.close()
            raise

    def close(self) -> None:
        self.sock.close()

    def fileno(self) -> int:
        return self.sock.fileno()

    def _request(self, family: int, cmd: int, attrs: bytes) -> list[bytes]:
        """Send one request, return the payloads of its answers (after the genl header)."""
        self._seq += 1
        seq = self._seq
        body = _GENL.pack(cmd, NBD_VERSION, 0) + attrs
        self.sock.send(_NLMSG.pack(_NLMSG.size + len(body), family, NLM_F_REQUEST | NLM_F_ACK,
                                   seq, 0) + body)  # fmt: skip
        answers: list[bytes] = []
        while True:
            data = self.sock.recv(RECV_BYTES)
            at = 0
            while at + _NLMSG.size <= len(data):
                length, kind, _, got_seq, _ = _NLMSG.unpack_from(data, at)
                payload = data[at + _NLMSG.size : at + length]
                at += (length + 3) & ~3
                if got_seq != seq:
                    continue  # an event, or an answer to something else
                if kind == NLMSG_ERROR:
                    (code,) = struct.unpack_from("=i", payload)
                    if code:
                        raise NetlinkError(-code, os.strerror(-code))
                    return answers
                if kind == NLMSG_DONE:
                    return answers
                answers.append(payload[_GENL.size :])

    def _family(self, name: str) -> Family:
        try:
            named = _attr(CTRL_ATTR_FAMILY_NAME, name.encode() + b"\0")
            answers = self._request(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, named)
        except NetlinkError as exc:
            if exc.errno == errno.ENOENT:
                raise NetlinkError(errno.ENOENT, "the kernel's nbd driver has no netlink family "
                                   "(modprobe nbd; Linux 4.12 or later)") from None  # fmt: skip
            raise
        attrs = parse_attrs(answers[0])
        (family_id,) = struct.unpack("=H", attrs[CTRL_ATTR_FAMILY_ID][:2])
        groups: dict[str, int] = {}
        nested = parse_attrs(attrs.get(CTRL_ATTR_MCAST_GROUPS, b""))
        for group in nested.values():
            fields = parse_attrs(group)
            group_name = fields.get(CTRL_ATTR_MCAST_GRP_NAME, b"").rstrip(b"\0").decode()
            (group_id,) = struct.unpack("=I", fields.get(CTRL_ATTR_MCAST_GRP_ID, bytes(4)))
            groups[group_name] = group_id
        return Family(family_id, groups)

    # -- nbd -------------------------------------------------------------------------
    def connect(
        self,
        index: int,
        sock: socket.socket,
        size: int,
        block_size: int,
        server_flags: int,
        io_timeout: int,
        dead_conn_timeout: int,
    ) -> int:
        """Attach /dev/nbd<index> to an NBD connection already past its handshake."""
        attrs = (_u32(NBD_ATTR_INDEX, index) + _u64(NBD_ATTR_SIZE_BYTES, size)
                 + _u64(NBD_ATTR_BLOCK_SIZE_BYTES, block_size)
                 + _u64(NBD_ATTR_SERVER_FLAGS, server_flags)
                 + _u64(NBD_ATTR_TIMEOUT, io_timeout)
                 + _u64(NBD_ATTR_DEAD_CONN_TIMEOUT, dead_conn_timeout)
                 + _sockets([sock.fileno()]))  # fmt: skip
        for answer in self._request(self.family.id, NBD_CMD_CONNECT, attrs):
            got = parse_attrs(answer).get(NBD_ATTR_INDEX)
            if got is not None:
                return int(struct.unpack("=I", got[:4])[0])
        return index

    def reconfigure(self, index: int, sock: socket.socket) -> None:
        """Hand the device whose connection died this new one (NBD_CMD_RECONFIGURE)."""
        attrs = _u32(NBD_ATTR_INDEX, index) + _sockets([sock.fileno()])
        self._request(self.family.id, NBD_CMD_RECONFIGURE, attrs)

    def disconnect(self, index: int) -> None:
        self._request(self.family.id, NBD_CMD_DISCONNECT, _u32(NBD_ATTR_INDEX, index))

    def subscribe(self) -> None:
        """Receive nbd's events (NBD_CMD_LINK_DEAD) on this socket from now on."""
        group = self.family.groups.get(NBD_MC_GROUP)
        if group is None:
            raise NetlinkError(errno.ENOENT, "the nbd driver has no multicast group")
        self.sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group)

    def events(self) -> list[tuple[int, int]]:
        """(command, device index) of the nbd events waiting on the socket (non-blocking)."""
        out: list[tuple[int, int]] = []
        while True:
            try:
                data = self.sock.recv(RECV_BYTES, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return out
            at = 0
            while at + _NLMSG.size <= len(data):
                length, kind, _, _, _ = _NLMSG.unpack_from(data, at)
                payload = data[at + _NLMSG.size : at + length]
                at += (length + 3) & ~3
                if kind != self.family.id or len(payload) < _GENL.size:
                    continue
                (cmd, _, _) = _GENL.unpack_from(payload)
                index = parse_attrs(payload[_GENL.size :]).get(NBD_ATTR_INDEX, bytes(4))
                out.append((cmd, int(struct.unpack("=I", index[:4])[0])))


def device_index(device: str) -> int:
    """/dev/nbd3 -> 3."""
    name = os.path.basename(device)
    if not name.startswith("nbd") or not name[3:].isdigit():
        raise ValueError(f"{device} is not an nbd device (/dev/nbdN)")
    return int(name[3:])
