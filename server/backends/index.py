"""The file backend's index on disk: format 3, every record checksummed.

Layout: MAGIC, then a header record (u32 length, JSON, u32 CRC32 of the JSON:
capacity, areas with their declared sizes, how many cluster records follow,
whether maps were lost before, and since protocol 4 `ids`: per area its life
and holder (records.py), kept here, in the same rename as the maps, so that a
life never names pages of another; an index without them reads as 0 and "",
and a store of protocol 3 ignores them), then one fixed-size record per cluster:
area number, cluster number, then per slot its arena page (i32, -1 unmapped),
tag (u32), generation (u64) and seal (16 B, zeros if none), and a CRC32 of
all of it.

A flipped bit can no longer move a page: a record whose CRC fails, or whose
fields are impossible (a page outside the arena or claimed twice, a mapped
slot with generation 0), is dropped and the store marks itself damaged, so an
unmapped slot reads as EIO rather than zeros; and every page's tag names its
slot, so a map that does load but is wrong is EIO at the first read. A
corrupt header, or format 1 from an older netswap, refuses to start with one
line saying so: the page file is left untouched for an operator to keep.
"""

from __future__ import annotations

import json
import struct
import zlib
from array import array
from dataclasses import dataclass, field

from netswap.protocol import MAX_HOLDER

from .slotmap import CLUSTER_SLOTS, UNMAPPED

MAGIC = b"NSWPIDX3"
# Format 1: bare slot maps and checksums, no record checks (before protocol 2);
# format 2: one-byte generations and no seals (protocol 2).
OLD_MAGICS = {b"NSWPIDX1": "1, from a netswap before protocol 2",
              b"NSWPIDX2": "2, from a netswap of protocol 2"}  # fmt: skip
SEAL_SIZE = 16
_LEN = struct.Struct("<I")
_CRC = struct.Struct("<I")
_KEY = struct.Struct("<IQ")  # area number, cluster number
RECORD_SIZE = _KEY.size + CLUSTER_SLOTS * (4 + 4 + 8 + SEAL_SIZE) + _CRC.size
# The JSON header names every area (MAX_AREAS x ~100 bytes): 1 MiB bounds it.
MAX_HEADER = 1 << 20


class UnusableIndex(ValueError):
    """The index cannot be used at all (wrong format, corrupt header): refuse to start."""


@dataclass
class Cluster:
    area: int
    index: int
    pages: array[int]
    tags: array[int]
    generations: array[int]
    seals: bytes


@dataclass
class Loaded:
    capacity_pages: int
    areas: list[tuple[str, int]]
    clusters: list[Cluster] = field(default_factory=list)
    lost: int = 0  # records dropped
    damaged: bool = False
    ids: dict[str, tuple[int, str]] = field(default_factory=dict)  # area: (area_id, holder)


def header(
    capacity_pages: int,
    areas: list[tuple[str, int]],
    damaged: bool,
    count: int,
    ids: dict[str, tuple[int, str]] | None = None,
) -> bytes:
    """MAGIC and the header record: `count` cluster records must follow."""
    blob = json.dumps({"capacity_pages": capacity_pages, "areas": areas, "clusters": count,
                       "damaged": damaged, "ids": ids or {}}).encode()  # fmt: skip
    return MAGIC + _LEN.pack(len(blob)) + blob + _CRC.pack(zlib.crc32(blob))


def record(c: Cluster) -> bytes:
    body = _KEY.pack(c.area, c.index) + c.pages.tobytes() + c.tags.tobytes()
    body += c.generations.tobytes() + c.seals
    return body + _CRC.pack(zlib.crc32(body))


def read(raw: bytes, capacity_pages: int, where: str) -> Loaded:
    if raw[:8] in OLD_MAGICS:
        raise UnusableIndex(f"{where} is index format {OLD_MAGICS[raw[:8]]}; this store "
                            "reads format 3 -- move the directory aside or use a fresh "
                            "--path")  # fmt: skip
    if raw[:8] != MAGIC:
        raise UnusableIndex(f"{where} is not a netswap index")
    (length,) = _LEN.unpack_from(raw, 8) if len(raw) >= 12 else (MAX_HEADER + 1,)
    blob = raw[12 : 12 + length]
    crc = raw[12 + length : 16 + length]
    if length > MAX_HEADER or len(crc) != 4 or _CRC.unpack(crc)[0] != zlib.crc32(blob):
        raise UnusableIndex(f"{where}: corrupt header (its checksum fails)")
    header = json.loads(blob)
    if header["capacity_pages"] > capacity_pages:
        raise UnusableIndex(f"{where} holds {header['capacity_pages']} pages; capacity cannot "
                          "shrink")  # fmt: skip
    loaded = Loaded(header["capacity_pages"], [(n, p) for n, p in header["areas"]])
    loaded.damaged = bool(header["damaged"])
    for name, (area_id, holder) in header.get("ids", {}).items():
        if type(area_id) is not int or not 0 <= area_id < 1 << 64 or type(holder) is not str:
            raise TypeError(f"area {name}'s id")
        if len(holder.encode()) > MAX_HOLDER or not holder.isprintable():  # as the wire's
            raise ValueError(f"area {name}'s holder")
        loaded.ids[name] = (area_id, holder)
    claimed: set[int] = set()
    offset = 16 + length
    for _ in range(header["clusters"]):
        record = raw[offset : offset + RECORD_SIZE]
        offset += RECORD_SIZE
        cluster = _parse(record, loaded, claimed)
        if cluster is None:
            loaded.lost += 1
        else:
            loaded.clusters.append(cluster)
    loaded.damaged = loaded.damaged or loaded.lost > 0
    return loaded


def _parse(record: bytes, loaded: Loaded, claimed: set[int]) -> Cluster | None:
    """One record, or None when it cannot be trusted."""
    if len(record) != RECORD_SIZE:
        return None
    body, (crc,) = record[:-4], _CRC.unpack(record[-4:])
    if zlib.crc32(body) != crc:
        return None
    area, index = _KEY.unpack_from(body)
    at = _KEY.size
    pages, tags, gens = array("i"), array("I"), array("Q")
    pages.frombytes(body[at : at + 4 * CLUSTER_SLOTS])
    tags.frombytes(body[at + 4 * CLUSTER_SLOTS : at + 8 * CLUSTER_SLOTS])
    gens.frombytes(body[at + 8 * CLUSTER_SLOTS : at + 16 * CLUSTER_SLOTS])
    seals = body[at + 16 * CLUSTER_SLOTS :]
    if area >= len(loaded.areas) or index * CLUSTER_SLOTS >= loaded.areas[area][1]:
        return None
    mapped = [(p, g) for p, g in zip(pages, gens, strict=True) if p != UNMAPPED]
    if any(not 0 <= p < loaded.capacity_pages or g == 0 for p, g in mapped):
        return None
    mine = {p for p, _ in mapped}
    if len(mine) != len(mapped) or mine & claimed:
        return None
    claimed |= mine
    return Cluster(area, index, pages, tags, gens, bytes(seals))
