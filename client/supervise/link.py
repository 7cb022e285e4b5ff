"""The kernel's side of the device: one NBD connection at a time, handed over by netlink.

connect() is the first (NBD_CMD_CONNECT with the dead-connection timeout and the
IO timeout); reconfigure() hands a device whose connection died a new socket
(NBD_CMD_RECONFIGURE); both check who answers and do the NBD handshake first
(handshake.py), here, so the kernel only ever sees a socket of the server it was
meant for, in the transmission phase. events() reports the links the kernel found
dead.
"""

from __future__ import annotations

from .handshake import Endpoint
from .handshake import connect as nbd_connect
from .knobs import log, set_requeue_period
from .netlink import NBD_CMD_LINK_DEAD, Netlink, NetlinkError, device_index

# nbd.ko's block size for swap: the page.
BLOCK_SIZE = 4096


class Link:
    def __init__(self, device: str, export: str, dead_conn_timeout: int,
                 io_timeout: int) -> None:  # fmt: skip
        self.device, self.export = device, export
        self.dead_conn_timeout, self.io_timeout = dead_conn_timeout, io_timeout
        self.index = device_index(device)
        self.netlink = Netlink()

    def connect(self, where: Endpoint, patience: float, pid: int) -> None:
        """The device's first connection: to `where`, served by nbdkit `pid` (0: a
        server not ours, of root's; handshake.check_peer)."""
        sock, export = nbd_connect(where, self.export, patience, pid)
        with sock:
            self.netlink.connect(self.index, sock, export.size, BLOCK_SIZE, export.flags,
                                 self.io_timeout, self.dead_conn_timeout)  # fmt: skip
        set_requeue_period(self.device)
        log(f"{self.device} connected to {where.text} export {self.export} "
            f"(dead-connection timeout {self.dead_conn_timeout}s, io timeout "
            f"{self.io_timeout or 'none'})")  # fmt: skip

    def reconfigure(self, where: Endpoint, patience: float, pid: int) -> None:
        sock, _ = nbd_connect(where, self.export, patience, pid)
        with sock:
            self.netlink.reconfigure(self.index, sock)

    def subscribe(self) -> None:
        self.netlink.subscribe()

    def fileno(self) -> int:
        return self.netlink.fileno()

    def died(self) -> bool:
        """Read the pending events: did the kernel report this device's link dead?"""
        return any(cmd == NBD_CMD_LINK_DEAD and index == self.index
                   for cmd, index in self.netlink.events())  # fmt: skip

    def disconnect(self) -> None:
        try:
            self.netlink.disconnect(self.index)
        except NetlinkError as exc:
            log(f"disconnecting {self.device}: {exc}")
