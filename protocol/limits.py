"""Named limits of the netswap wire protocol and where each number comes from.

Every bound here exists so that neither peer ever buffers or works on an
amount of data that the other side chose: a frame header that announces more
than MAX_FRAME_SIZE is a protocol error before a single payload byte is kept.
"""

from __future__ import annotations

# Bumped on any incompatible change to the frame layout or a message's fields.
# 2: pages carry tags bound to (area, slot, generation), and SwapOut the generations.
# 3: batches are binary (packed arrays, pages outside msgpack), generations are 64-bit,
#    pages may carry a seal, and Inventory lists what an area holds. The Hello and its
#    answer keep version 2's layout, so that the two versions tell each other apart.
# 4: the Welcome says which store answers and which life of it (store_id, boot,
#    prev_boot, clean) and the area's record (area_id, holder, floor); Fence raises an
#    area's floor and a session below it changes nothing; Swapfile carries the area's
#    id, its holder and force; a SwapOut no newer than the page a slot holds is skipped;
#    a page travels and is stored as a payload of 1..PAGE_SIZE bytes (what the agent made
#    of it: compressed, or one repeated word) with its length, and Held says the lengths.
PROTOCOL_VERSION = 4

# The kernel swaps in units of its base page; x86-64 and arm64 (4K kernels) use 4096.
PAGE_SIZE = 4096

# Linux's nbd driver caps one request at max_sectors 256 x 512 B = 128 KiB = 32 pages,
# and swap readahead asks for 8 pages (vm.page-cluster=3). A batch of 256 pages is
# eight such maximal requests coalesced: 1 MiB, large enough to amortise a round trip
# (~43 us on loopback here) and small enough that one frame never pins more than 1 MiB.
MAX_BATCH_PAGES = 256

# A payload is what the agent made of one page: the page itself (PAGE_SIZE), the page
# compressed (fewer bytes) or its repeated word (8 bytes). The store keeps it as it is and
# never looks inside; an empty payload or one larger than the page it stands for is a
# protocol error. A length travels as a u16.
MIN_PAYLOAD = 1
MAX_PAYLOAD = PAGE_SIZE

# A seal is the AEAD tag of an encrypted page (AES-GCM's 16 bytes): the store keeps it
# beside the page and never looks inside.
SEAL_SIZE = 16

# One page's metadata on the wire at most: its slot (8 B), generation (8 B), tag (4 B),
# payload length (2 B) and seal (16 B); 64 KiB of headroom covers the headers and any
# control message. A batch's payloads are at most MAX_BATCH_PAGES x PAGE_SIZE = 1 MiB.
PAGE_META_MAX = 8 + 8 + 4 + 2 + SEAL_SIZE
MAX_FRAME_SIZE = MAX_BATCH_PAGES * (PAGE_SIZE + PAGE_META_MAX) + 64 * 1024

# Before a peer has authenticated, the only frame it may send is a Hello: type, id and
# version (<= 15 B msgpack), an area name (MAX_AREA_NAME) and a token (MAX_TOKEN_SIZE),
# ~340 B at most; 1 KiB keeps what an unauthenticated peer can make a store hold small.
MAX_HELLO_FRAME = 1024

# Length prefix: a 4-byte big-endian unsigned integer in front of each frame body.
FRAME_HEADER_SIZE = 4

# 2**40 slots of 4 KiB is 4 PiB per area: far beyond any swap area (the kernel's own
# swap entry offset is 50-58 bits); the bound keeps slot arithmetic within int64.
MAX_SLOTS = 1 << 40

# A Discard carries ranges, not slots; swap discards arrive one cluster at a time, so
# 1024 ranges per message is generous and keeps one Discard's work bounded.
MAX_DISCARD_RANGES = 1024

# An Inventory covers at most one default slab (64 MiB of swap): its answer is at most
# 16,384 x 18 B (slot, generation, length) = 288 KiB, and the store walks at most 64
# of its 256-slot clusters.
MAX_INVENTORY_SLOTS = 1 << 14

# Area names are identifiers chosen by operators (hostname, "swap0", ...); 64 bytes
# fits a FQDN label plus suffix and keeps them usable as file names on the store.
MAX_AREA_NAME = 64

# A holder names the host that holds an area (e.g. its machine id and the area): 128
# bytes holds a 32-hex-digit machine id, a FQDN label and the area name with room.
MAX_HOLDER = 128

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

# Generations are 64-bit: a slot's write count in the low 32 bits and the writer's
# epoch above them (the agent's; the store only keeps and returns them). 0 is "never
# written".
MAX_GENERATION = (1 << 64) - 1
