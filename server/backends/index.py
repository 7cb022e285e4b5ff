"""The file backend's index on disk: format 4, every record checksummed.

Layout: MAGIC, then a header record (u32 length, JSON, u32 CRC32 of the JSON:
capacity, areas with their declared sizes, how many cluster records follow,
whether maps were lost before, per area its life and holder (records.py), and
the size-class layout it was written with (classes.signature())), then one
fixed-size record per cluster: area number, cluster number, then per slot its
payload's length (u16, 0: unmapped), tag (u32), generation (u64), spot in its
zspage (u8), where it is (5 x i32: a whole page's arena page; an object's
zspage pages, as many as its class has; an inline payload's 8 bytes), and seal
(16 B, zeros if none), and a CRC32 of all of it.

Each record says all there is to know of its slots, so the zspages are rebuilt
from their objects: the spots one record names must not collide with another's
or with a whole page, or the record is dropped.

A flipped bit can no longer move a page: a record whose CRC fails, or whose
fields are impossible (a page outside the arena or claimed twice, a spot taken
twice or beyond its class, a zspage named with other pages, a mapped slot with
generation 0, a length over a page), is dropped and the store marks itself
damaged, so an unmapped slot reads as EIO rather than zeros; and every
payload's tag names its slot, so a map that does load but is wrong is EIO at
the first read. A corrupt header, an older format (3: whole pages only, from
protocol 3) or another size-class layout refuses to start with one line
saying so: the page file is left untouched for an operator to keep.
"""

from __future__ import annotations

import json
import struct
import zlib
from array import array
from dataclasses import dataclass, field

from netswap.protocol import MAX_HOLDER, PAGE_SIZE

from .classes import INLINE_MAX, MAX_ZSPAGE_PAGES, PAGES, SPOTS, class_of, signature
from .slotmap import CLUSTER_SLOTS

MAGIC = b"NSWPIDX4"
# Format 1: bare slot maps and checksums, no record checks (before protocol 2);
# format 2: one-byte generations and no seals (protocol 2); format 3: whole pages only.
OLD_MAGICS = {b"NSWPIDX1": "1, from a netswap before protocol 2",
              b"NSWPIDX2": "2, from a netswap of protocol 2",
              b"NSWPIDX3": "3, from a netswap of protocol 3 (whole pages only)"}  # fmt: skip
SEAL_SIZE = 16
PLACE = MAX_ZSPAGE_PAGES  # i32 per slot for where its payload is
_LEN = struct.Struct("<I")
_CRC = struct.Struct("<I")
_KEY = struct.Struct("<IQ")  # area number, cluster number
_SLOT = 2 + 4 + 8 + 1 + 4 * PLACE + SEAL_SIZE
RECORD_SIZE = _KEY.size + CLUSTER_SLOTS * _SLOT + _CRC.size
# The JSON header names every area (MAX_AREAS x ~100 bytes): 1 MiB bounds it.
MAX_HEADER = 1 << 20


class UnusableIndex(ValueError):
    """The index cannot be used at all (wrong format, corrupt header): refuse to start."""


@dataclass
class Cluster:
    area: int
    index: int
    lengths: array[int]  # H, 0: unmapped
    tags: array[int]
    generations: array[int]
    spots: bytes
    places: array[int]  # i, PLACE per slot
    seals: bytes


@dataclass
class Claims:
    """Arena pages and spots the records read so far hold: page -> the first page of
    its zspage (itself for a whole page), and per zspage its class, pages and spots."""

    pages: dict[int, int] = field(default_factory=dict)
    zspages: dict[int, tuple[int, tuple[int, ...], set[int]]] = field(default_factory=dict)


@dataclass
class Loaded:
    capacity_pages: int
    areas: list[tuple[str, int]]
    clusters: list[Cluster] = field(default_factory=list)
    lost: int = 0  # records dropped
    damaged: bool = False
    ids: dict[str, tuple[int, str]] = field(default_factory=dict)  # area: (area_id, holder)
    claims: Claims = field(default_factory=Claims)


def header(
    capacity_pages: int,
    areas: list[tuple[str, int]],
    damaged: bool,
    count: int,
    ids: dict[str, tuple[int, str]] | None = None,
) -> bytes:
    """MAGIC and the header record: `count` cluster records must follow."""
    blob = json.dumps({"capacity_pages": capacity_pages, "areas": areas, "clusters": count,
                       "damaged": damaged, "ids": ids or {},
                       "layout": signature()}).encode()  # fmt: skip
    return MAGIC + _LEN.pack(len(blob)) + blob + _CRC.pack(zlib.crc32(blob))


def record(c: Cluster) -> bytes:
    body = _KEY.pack(c.area, c.index) + c.lengths.tobytes() + c.tags.tobytes()
    body += c.generations.tobytes() + c.spots + c.places.tobytes() + c.seals
    return body + _CRC.pack(zlib.crc32(body))


def read(raw: bytes, capacity_pages: int, where: str) -> Loaded:
    if raw[:8] in OLD_MAGICS:
        raise UnusableIndex(f"{where} is index format {OLD_MAGICS[raw[:8]]}; this store "
                            "reads format 4 -- move the directory aside or use a fresh "
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
    if header.get("layout") != signature():
        raise UnusableIndex(f"{where} was written with size classes {header.get('layout')}, "
                            f"this store keeps {signature()} -- move the directory aside "
                            "or use the netswap that wrote it")  # fmt: skip
    loaded = Loaded(header["capacity_pages"], [(n, p) for n, p in header["areas"]])
    loaded.damaged = bool(header["damaged"])
    for name, (area_id, holder) in header.get("ids", {}).items():
        if type(area_id) is not int or not 0 <= area_id < 1 << 64 or type(holder) is not str:
            raise TypeError(f"area {name}'s id")
        if len(holder.encode()) > MAX_HOLDER or not holder.isprintable():  # as the wire's
            raise ValueError(f"area {name}'s holder")
        loaded.ids[name] = (area_id, holder)
    offset = 16 + length
    for _ in range(header["clusters"]):
        record = raw[offset : offset + RECORD_SIZE]
        offset += RECORD_SIZE
        cluster = _parse(record, loaded)
        if cluster is None:
            loaded.lost += 1
        else:
            loaded.clusters.append(cluster)
    loaded.damaged = loaded.damaged or loaded.lost > 0
    return loaded


def _parse(record: bytes, loaded: Loaded) -> Cluster | None:
    """One record, or None when it cannot be trusted (its claims are then not kept)."""
    if len(record) != RECORD_SIZE:
        return None
    body, (crc,) = record[:-4], _CRC.unpack(record[-4:])
    if zlib.crc32(body) != crc:
        return None
    area, index = _KEY.unpack_from(body)
    if area >= len(loaded.areas) or index * CLUSTER_SLOTS >= loaded.areas[area][1]:
        return None
    n, at = CLUSTER_SLOTS, _KEY.size
    lengths, tags, gens, places = array("H"), array("I"), array("Q"), array("i")
    lengths.frombytes(body[at : at + 2 * n])
    tags.frombytes(body[at + 2 * n : at + 6 * n])
    gens.frombytes(body[at + 6 * n : at + 14 * n])
    spots = body[at + 14 * n : at + 15 * n]
    places.frombytes(body[at + 15 * n : at + (15 + 4 * PLACE) * n])
    seals = body[at + (15 + 4 * PLACE) * n :]
    if not _claim(lengths, gens, spots, places, loaded):
        return None
    return Cluster(area, index, lengths, tags, gens, bytes(spots), places, bytes(seals))


def _claim(
    lengths: array[int], gens: array[int], spots: bytes, places: array[int], loaded: Loaded
) -> bool:
    """Check every mapped slot's place against the claims so far and each other; keep
    the record's claims only when all hold."""
    claims, capacity = loaded.claims, loaded.capacity_pages
    pages: dict[int, int] = {}  # this record's new claims
    zspages: dict[int, tuple[int, tuple[int, ...], set[int]]] = {}
    for i, length in enumerate(lengths):
        if length == 0:
            continue
        if gens[i] == 0 or length > PAGE_SIZE:
            return False
        if length <= INLINE_MAX:
            continue
        held: tuple[int, ...]
        if length == PAGE_SIZE:
            c, held = 0, (places[i * PLACE],)
        else:
            c = class_of(length)
            held = tuple(places[i * PLACE : i * PLACE + PAGES[c]])
            if spots[i] >= SPOTS[c]:
                return False
        if any(not 0 <= p < capacity for p in held):
            return False
        if c == 0:  # a whole page: its own
            if held[0] in claims.pages or held[0] in pages:
                return False
            pages[held[0]] = held[0]
            continue
        first = held[0]
        zspage = zspages.get(first) or claims.zspages.get(first)
        if zspage is None:
            if any(p in claims.pages or p in pages for p in held):
                return False
            zspage = zspages[first] = (c, held, set())
            for p in held:
                pages[p] = first
        elif zspage[:2] != (c, held):
            return False
        elif first not in zspages:  # a zspage of an earlier record: spots copied
            zspage = zspages[first] = (c, held, set(zspage[2]))
        if spots[i] in zspage[2]:
            return False
        zspage[2].add(spots[i])
    claims.pages.update(pages)
    claims.zspages.update(zspages)
    return True
