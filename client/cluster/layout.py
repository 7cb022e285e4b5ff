"""Where an area's payloads live in a Redis-protocol cluster (sans-IO: keys and offsets).

A slot holds a **payload** (client/agent/payload.py): a same-filled page's 8-byte
word, an lz4 block in 256-byte granules up to 3,072 B, or a whole page. Slots go in
**chunks** of CHUNK_PAGES consecutive slots. A chunk's payloads are **packed**, in
slot order, into one byte stream; its **index** value holds each slot's generation
(u64), tag (u32), seal (16 B) and payload length (u16; 0: nothing held) in four
regions, and a slot's place in the stream is the sum of the lengths before it.
The stream is cut into SEGMENT-byte **segments**, the fields 0, 1, 2, ... of one
hash per chunk (the last one shorter): a write that changes a payload's length
rewrites the stream from that payload on, a write of the same lengths only the
segments it touches (scripts.py). Why this layout (measured by `INFO memory` on a
3+3 cluster, 81,920 pages of the corpus's payload lengths, README: the cluster
tier): each segment is exactly a jemalloc class (16 KiB with the string's 6-byte
header), so a chunk costs its payloads plus one part-filled segment; one value per
chunk instead lands wherever jemalloc's classes fall (0.47x a whole page against
0.43x), one value per payload pays a class and a key for each (0.51x-0.53x), and
whole pages cost 1.013x a page (the 255-page strings before: 1.023x). 64 slots a
chunk: a quarter of the kernel's 256-slot swap cluster, and a length change moves
at most 256 KiB.

Chunks are grouped under one hash tag per **bucket** of BUCKET_CHUNKS chunks
(`netswap:{AREA:BUCKET}:i:CHUNK` and `...:d:CHUNK`), so a batch of neighbouring
slots goes to one node in one pipeline, while an area's buckets spread over every
master. Each bucket has its own fencing floor (`netswap:{AREA:BUCKET}:f`): a
script can only touch keys of one hash slot, so the floor a write is checked
against lives beside its chunks. The area's own record (`netswap:{AREA}:area`:
slots, area id, holder) and its floor (`netswap:{AREA}:floor`) share the hash tag
`{AREA}`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from netswap.protocol import PAGE_SIZE, SEAL_SIZE
from netswap.protocol.messages import area_name_ok

CHUNK_PAGES = 64
GEN_SIZE, TAG_SIZE, LEN_SIZE = 8, 4, 2
INDEX_SIZE = GEN_SIZE + TAG_SIZE + SEAL_SIZE + LEN_SIZE  # 30 B per slot
# Regions of a chunk's index value: generations, tags, seals, payload lengths.
TAGS_AT = CHUNK_PAGES * GEN_SIZE
SEALS_AT = TAGS_AT + CHUNK_PAGES * TAG_SIZE
LENS_AT = SEALS_AT + CHUNK_PAGES * SEAL_SIZE
INDEX_BYTES = CHUNK_PAGES * INDEX_SIZE  # 1,920 B: jemalloc's 2,048 class with its header
# A segment fills jemalloc's 16 KiB class exactly with the string's header (5 B for a
# string under 64 KiB) and its terminating zero: no byte of a full segment is lost.
SEGMENT = 16384 - 6
# The most segments a chunk's stream can have (every payload a whole page: 17).
MAX_SEGMENTS = -(-CHUNK_PAGES * PAGE_SIZE // SEGMENT)
# 256 chunks (16,384 slots, 64 MiB of swap) per bucket, so a 16 GiB area has 256
# buckets to spread over the masters' 16,384 hash slots.
BUCKET_CHUNKS = 256


class Piece:
    """The part of a run that falls in one chunk: slots first..first+count-1, at
    `index` in the batch's order."""

    __slots__ = ("chunk", "count", "first", "index")

    def __init__(self, chunk: int, first: int, count: int, index: int) -> None:
        self.chunk, self.first, self.count, self.index = chunk, first, count, index

    @property
    def offset(self) -> int:
        """The first slot's place in its chunk."""
        return self.first - self.chunk * CHUNK_PAGES


def pieces(runs: Sequence[range]) -> Iterator[Piece]:
    """The runs cut at chunk boundaries, in order."""
    index = 0
    for run in runs:
        slot = run.start
        while slot < run.stop:
            chunk = slot // CHUNK_PAGES
            end = min(run.stop, (chunk + 1) * CHUNK_PAGES)
            yield Piece(chunk, slot, end - slot, index)
            index += end - slot
            slot = end


def chunk_keys(area: str, chunk: int) -> tuple[str, str]:
    """The index key and the stream's hash of one chunk (one hash tag: one node). Not
    the 255-page layout's `:p:` and `:m:` keys: an area written by an older client is
    never read as this layout (swap does not outlive its host's boot anyway)."""
    tag = f"netswap:{{{area}:{chunk // BUCKET_CHUNKS}}}"
    return f"{tag}:i:{chunk}", f"{tag}:d:{chunk}"


def bucket_floor_key(area: str, bucket: int) -> str:
    """The floor of one bucket: in the hash slot of its chunks."""
    return f"netswap:{{{area}:{bucket}}}:f"


def floor_key_of(area: str, chunk: int) -> str:
    return bucket_floor_key(area, chunk // BUCKET_CHUNKS)


def area_key(area: str) -> str:
    return f"netswap:{{{area}}}:area"


def area_floor_key(area: str) -> str:
    return f"netswap:{{{area}}}:floor"


def chunks_of(slots: int) -> int:
    return -(-slots // CHUNK_PAGES)


def buckets_of(slots: int) -> int:
    return -(-chunks_of(slots) // BUCKET_CHUNKS)


def check_area_name(area: str) -> None:
    """The protocol's rule (protocol/messages.py): no '}' to end a hash tag early, and
    no ':' or glob character to widen an ACL pattern (`~netswap:{AREA:*` names exactly
    one area only then: area `a` would match area `a:b`'s keys, `a*` every area's)."""
    if not area_name_ok(area):
        raise ValueError(f"area {area!r}: an area name is a letter or digit, then letters, "
                         "digits, '.', '_' or '-' (64 bytes at most)")  # fmt: skip


def parse_url(url: str) -> tuple[str, list[tuple[str, int]]]:
    """redis://[USER@]HOST:PORT[,HOST:PORT...] -> (user, seeds)."""
    if not url.startswith("redis://"):
        raise ValueError("a cluster is redis://[USER@]HOST:PORT[,HOST:PORT...]")
    rest = url.removeprefix("redis://").rstrip("/")
    user, _, hosts = rest.rpartition("@")
    seeds = []
    for item in hosts.split(","):
        host, sep, port = item.rpartition(":")
        if not sep or not port.isdigit() or not host:
            raise ValueError(f"{item!r} is not HOST:PORT")
        seeds.append((host.strip("[]"), int(port)))
    return user, seeds
