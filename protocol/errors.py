"""Protocol errors, split by whose fault they are (the h11 convention).

LocalProtocolError: this side tried to build or send something invalid -- a bug
in the caller. RemoteProtocolError: the peer sent something invalid; the only
sane reaction is to close that connection.
"""

from __future__ import annotations

import errno as _errno


class ProtocolError(Exception):
    """Base class of every error raised by netswap.protocol."""


class LocalProtocolError(ProtocolError):
    """We tried to construct or send a message that breaks the protocol."""


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes or a message that breaks the protocol."""


class ConnectionLost(ConnectionError):
    """The connection to a store closed (or was cut) with a request still pending."""


class StoreError(Exception):
    """A request refused with an errno: ENOSPC, EIO, EINVAL, EPERM, ENXIO ...

    One type on both ends of the wire: a store's backends raise it, the store
    sends it as `Failed(errno, reason)`, and the RPC client raises it again
    from that reply. The nbdkit plugin passes `errno` on to the NBD client.
    """

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"{_errno.errorcode.get(code, code)}: {reason}")
        self.errno = code
        self.reason = reason
