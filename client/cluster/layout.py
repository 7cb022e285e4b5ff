"""Where an area's pages live in a Redis-protocol cluster (sans-IO: keys and offsets).

Pages go in **chunks** of CHUNK_PAGES consecutive slots, one string value per chunk,
each page at (slot % CHUNK_PAGES) * 4096, written with SETRANGE and read with
GETRANGE; beside it a metadata value per chunk holds each slot's generation (u64),
tag (u32) and seal (16 B) in three regions. Why 255 pages and not the kernel's 256:
a value of 256 pages is 1 MiB plus the string's 10-byte header, which jemalloc puts
in its 1.25 MiB class (25 % lost); 255 pages fit the 1 MiB class (0.4 %). Both
values are made at their final size on a chunk's first write (scripts.WRITE: a SET of
zeros server-side), because SETRANGE grows a string greedily (to twice its length
under 1 MiB, by another 1 MiB above), which would double what a chunk holds.

Chunks are grouped under one hash tag per **bucket** of BUCKET_CHUNKS chunks
(`netswap:{AREA:BUCKET}:p:CHUNK`), so a batch of neighbouring slots goes to one
node in one pipeline, while an area's buckets spread over every master. Each bucket
has its own fencing floor (`netswap:{AREA:BUCKET}:f`): a script can only touch keys
of one hash slot, so the floor a write is checked against lives beside its chunks.
The area's own record (`netswap:{AREA}:area`: slots, area id, holder) and its floor
(`netswap:{AREA}:floor`) share the hash tag `{AREA}`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from netswap.protocol import PAGE_SIZE, SEAL_SIZE
from netswap.protocol.messages import area_name_ok

CHUNK_PAGES = 255
GEN_SIZE, TAG_SIZE = 8, 4
META_SIZE = GEN_SIZE + TAG_SIZE + SEAL_SIZE  # 28 B per slot
# Regions of a chunk's metadata value: generations, then tags, then seals.
TAGS_AT = CHUNK_PAGES * GEN_SIZE
SEALS_AT = TAGS_AT + CHUNK_PAGES * TAG_SIZE
META_BYTES = CHUNK_PAGES * META_SIZE  # 7,140 B: jemalloc's 7,168 class with its header
PAGES_BYTES = CHUNK_PAGES * PAGE_SIZE  # 1,044,480 B: the 1 MiB class with its header
# 64 chunks (16,320 slots, ~64 MiB of swap) per bucket, so a 16 GiB area has 257
# buckets to spread over the masters' 16,384 hash slots.
BUCKET_CHUNKS = 64


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
    """The pages key and the metadata key of one chunk (one hash tag: one node)."""
    tag = f"netswap:{{{area}:{chunk // BUCKET_CHUNKS}}}"
    return f"{tag}:p:{chunk}", f"{tag}:m:{chunk}"


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
