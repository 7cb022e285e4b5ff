"""netswap's sans-IO wire protocol: length-prefixed msgpack frames, no I/O here."""

from .checksum import ZERO_PAGE, ZERO_PAGE_CRC, batch_crcs, page_crc
from .codec import decode, encode
from .connection import CLOSED, NEED_DATA, Connection, Event, Role
from .errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from .limits import (
    MAX_BATCH_PAGES,
    MAX_DISCARD_RANGES,
    MAX_FRAME_SIZE,
    MAX_SLOTS,
    PAGE_SIZE,
    PROTOCOL_VERSION,
)
from .messages import (
    Discard,
    Failed,
    Flush,
    Hello,
    Message,
    Ok,
    Pages,
    Reply,
    Request,
    Stats,
    StatsReply,
    Swapfile,
    SwapIn,
    SwapOut,
    Welcome,
)

__all__ = [
    "CLOSED",
    "MAX_BATCH_PAGES",
    "MAX_DISCARD_RANGES",
    "MAX_FRAME_SIZE",
    "MAX_SLOTS",
    "NEED_DATA",
    "PAGE_SIZE",
    "PROTOCOL_VERSION",
    "ZERO_PAGE",
    "ZERO_PAGE_CRC",
    "Connection",
    "Discard",
    "Event",
    "Failed",
    "Flush",
    "Hello",
    "LocalProtocolError",
    "Message",
    "Ok",
    "Pages",
    "ProtocolError",
    "RemoteProtocolError",
    "Reply",
    "Request",
    "Role",
    "Stats",
    "StatsReply",
    "SwapIn",
    "SwapOut",
    "Swapfile",
    "Welcome",
    "batch_crcs",
    "decode",
    "encode",
    "page_crc",
]
