"""Protocol errors, split by whose fault they are (the h11 convention).

LocalProtocolError: this side tried to build or send something invalid -- a bug
in the caller. RemoteProtocolError: the peer sent something invalid; the only
sane reaction is to close that connection.
"""

from __future__ import annotations


class ProtocolError(Exception):
    """Base class of every error raised by netswap.protocol."""


class LocalProtocolError(ProtocolError):
    """We tried to construct or send a message that breaks the protocol."""


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes or a message that breaks the protocol."""
