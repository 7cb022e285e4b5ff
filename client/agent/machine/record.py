"""The area's durable record: what a restarted agent must know that the stores cannot tell it.

A restarted agent learns every slot's newest copy from the stores (rebuild.py),
but three things no store can say: which stores are a slab's replicas (a copy
left on a store the slab moved away from is not one), which replicas may lack
acknowledged writes (stale, or suspect: a store that restarted may have lost
some), and which slots were lost (their older copies must never come back). Nor
the epoch: every agent start must go above every epoch any agent sealed under.

The record keeps exactly that, small (2 bytes per replica of a 64 MiB slab, one
bitmap per slab with lost slots), and the agent writes it where its next
incarnation will find it without a page of swap: the kernel's keyring (keys.py),
beside the area's key -- kernel memory, never swapped, readable by root only, and
gone at a reboot, which swap does not survive either. It is written *before*
what it describes is relied on: a replica is stale in the record before a write
is acknowledged without it, a slab's replicas before their first write is sent,
a slot is lost before its read answers EIO, an epoch before its first seal.

Encoding: a header (JSON: area id, epoch, the replica and quorum counts, the
stores by name, id and boot) and the slab table in chunks, each a keyring
entry of at most CHUNK_BYTES; a lost bitmap is its own entry.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

# A user key's payload is at most 32,767 bytes (the kernel's key_type_user); chunks
# of 16 KiB hold 4,096 slabs of two replicas (256 GiB of swap at 64 MiB slabs) each.
CHUNK_BYTES = 16 * 1024
HEADER = "record"
FORMAT = 1


@dataclass
class StoreMark:
    """A store as the record knows it: its address, its identity, and the boot whose
    content the slab states describe (a store that restarted since is another boot)."""

    name: str
    store_id: int = 0
    boot: int = 0


@dataclass
class Record:
    area_id: int = 0
    epoch: int = 0
    replicas: int = 1
    quorum: int = 1
    slab_slots: int = 1
    stores: list[StoreMark] = field(default_factory=list)
    slabs: bytearray = field(default_factory=bytearray)  # per slab x replica: store, state
    lost: dict[int, tuple[int, bytes]] = field(default_factory=dict)  # slab: below, bitmap

    def encode(self) -> dict[str, bytes]:
        """Keyring entries (name suffix -> payload)."""
        chunks = [bytes(self.slabs[at : at + CHUNK_BYTES])
                  for at in range(0, len(self.slabs), CHUNK_BYTES)]  # fmt: skip
        head = {"format": FORMAT, "area_id": self.area_id, "epoch": self.epoch,
                "replicas": self.replicas, "quorum": self.quorum, "slab_slots": self.slab_slots,
                "slab_bytes": len(self.slabs), "chunks": len(chunks),
                "stores": [[s.name, s.store_id, s.boot] for s in self.stores],
                "lost": sorted(self.lost)}  # fmt: skip
        out = {HEADER: json.dumps(head, separators=(",", ":")).encode()}
        for i, chunk in enumerate(chunks):
            out[f"slabs:{i}"] = chunk
        for slab, (below, bitmap) in self.lost.items():
            out[f"lost:{slab}"] = below.to_bytes(8, "little") + bitmap
        return out

    @classmethod
    def decode(cls, parts: dict[str, bytes]) -> Record:
        """From keyring entries; ValueError (with what is wrong) when they do not agree."""
        try:
            head = json.loads(parts[HEADER])
            if head.get("format") != FORMAT:
                raise ValueError(f"record format {head.get('format')}, not {FORMAT}")
            slabs = bytearray()
            for i in range(int(head["chunks"])):
                slabs += parts[f"slabs:{i}"]
            if len(slabs) != int(head["slab_bytes"]):
                raise ValueError("the slab table's chunks do not add up")
            lost = {}
            for slab in head["lost"]:
                raw = parts[f"lost:{slab}"]
                lost[int(slab)] = (int.from_bytes(raw[:8], "little"), bytes(raw[8:]))
            stores = [StoreMark(str(n), int(i), int(b)) for n, i, b in head["stores"]]
            return cls(int(head["area_id"]), int(head["epoch"]), int(head["replicas"]),
                       int(head["quorum"]), int(head["slab_slots"]), stores, slabs,
                       lost)  # fmt: skip
        except (KeyError, TypeError, json.JSONDecodeError) as exc:
            raise ValueError(
                f"the area's record is incomplete ({type(exc).__name__}: {exc})"
            ) from None

    @staticmethod
    def lost_keys(parts: dict[str, bytes]) -> list[str]:
        """The lost-bitmap entries a header names (to read them)."""
        return [f"lost:{slab}" for slab in json.loads(parts[HEADER]).get("lost", [])]

    @staticmethod
    def chunk_keys(parts: dict[str, bytes]) -> list[str]:
        return [f"slabs:{i}" for i in range(int(json.loads(parts[HEADER]).get("chunks", 0)))]


def bitmap_of(offsets: list[int], slots: int) -> bytes:
    """A bitmap of `slots` bits with `offsets` set."""
    bits = bytearray(-(-slots // 8))
    for at in offsets:
        bits[at >> 3] |= 1 << (at & 7)
    return bytes(bits)


def offsets_in(bitmap: bytes) -> list[int]:
    return [i * 8 + b for i, byte in enumerate(bitmap) if byte for b in range(8) if byte >> b & 1]
