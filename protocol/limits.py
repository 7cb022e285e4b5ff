"""Named limits of the netswap wire protocol and where each number comes from.

Every bound here exists so that neither peer ever buffers or works on an
amount of data that the other side chose: a frame header that announces more
than MAX_FRAME_SIZE is a protocol error before a single payload byte is kept.
"""

from __future__ import annotations

# Bumped on any incompatible change to the frame layout or a message's fields.
# 2: pages carry tags bound to (area, slot, generation), and SwapOut the generations.
PROTOCOL_VERSION = 2

# The kernel swaps in units of its base page; x86-64 and arm64 (4K kernels) use 4096.
PAGE_SIZE = 4096

# Linux's nbd driver caps one request at max_sectors 256 x 512 B = 128 KiB = 32 pages,
# and swap readahead asks for 8 pages (vm.page-cluster=3). A batch of 256 pages is
# eight such maximal requests coalesced: 1 MiB, large enough to amortise a round trip
# (~43 us on loopback here) and small enough that one frame never pins more than 1 MiB.
MAX_BATCH_PAGES = 256

# One page's metadata on the wire: a uint64 slot (<= 9 bytes msgpack) and a uint32
# checksum (<= 5 bytes); 64 KiB of headroom covers a full batch plus the envelope.
MAX_FRAME_SIZE = MAX_BATCH_PAGES * PAGE_SIZE + 64 * 1024

# Before a peer has authenticated, the only frame it may send is a Hello: type, id and
# version (<= 15 B msgpack), an area name (MAX_AREA_NAME) and a token (MAX_TOKEN_SIZE),
# ~340 B at most; 1 KiB keeps what an unauthenticated peer can make a store hold small.
MAX_HELLO_FRAME = 1024

# Length prefix: a 4-byte big-endian unsigned integer in front of each msgpack body.
FRAME_HEADER_SIZE = 4

# 2**40 slots of 4 KiB is 4 PiB per area: far beyond any swap area (the kernel's own
# swap entry offset is 50-58 bits); the bound keeps slot arithmetic within int64.
MAX_SLOTS = 1 << 40

# A Discard carries ranges, not slots; swap discards arrive one cluster at a time, so
# 1024 ranges per message is generous and keeps one Discard's work bounded.
MAX_DISCARD_RANGES = 1024

# Area names are identifiers chosen by operators (hostname, "swap0", ...); 64 bytes
# fits a FQDN label plus suffix and keeps them usable as file names on the store.
MAX_AREA_NAME = 64

# Tokens are opaque secrets from a token file; 256 bytes holds any sane random token.
MAX_TOKEN_SIZE = 256

# Error text is for humans and logs only; bound it like any other field.
MAX_REASON_SIZE = 1024

# A Stats reply is a flat list of named counters; 256 names covers every counter the
# store exports with room to grow, and bounds the reply's size.
MAX_STATS_ENTRIES = 256
MAX_STAT_NAME = 64

# Request ids are uint32 and wrap; a peer never has anywhere near 2**32 in flight.
MAX_REQUEST_ID = (1 << 32) - 1
