"""Did the cluster keep every acknowledged write? Its masters' histories, and the boot
the cluster answers as (P3 on the cluster tier; sans-IO, but for the keyring).

Redis replicates asynchronously. A write is acknowledged once WAIT has counted the
replicas holding it, and WAIT counts a replica only when it acknowledged *every*
write before this connection's last one (its offset, not this write). When a master
fails, the replica with the best offset is promoted, and it takes a new replication
id (`master_replid`), keeping its old master's as `master_replid2`
(replication.c: shiftReplicationId). A master restarted without persistence comes
back empty with a new id and no `master_replid2`. So a master's history is its
replid, and a change of master is one of three things:

- a replica took over (its replid2 is the old master's replid): it holds every write
  all the old master's replicas acknowledged -- so nothing was lost unless a write
  was acknowledged when WAIT had counted fewer than all of them (a *doubt*);
- the same address with another history: it restarted and lost what it held;
- a master never seen, with no replid2: a new one (resharding moves keys to it).

`State` keeps, per area, each master's replid and whether it is in doubt, and the
`boot` the cluster answers as. A change that may have lost an acknowledged write (a
doubtful takeover, a restart, a history this client never saw) makes a new boot: the
agent's machine then calls its replicas SUSPECT and checks every slot's generation,
and a restarted agent does not trust what it finds. A takeover without doubt keeps
the boot. The state is kept where the agent's own record is, in root's keyring (so a
restarted agent judges what happened while it was dead: `Durable`), and in this process.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from typing import Protocol

NO_REPLID = "0" * 40  # master_replid2 of a master that never took over from another


@dataclass(frozen=True)
class Master:
    """A master serving slots now, as its INFO replication says."""

    address: str
    replid: str
    replid2: str


@dataclass
class Entry:
    replid: str
    doubt: bool = False  # an acknowledged write may be missing from one of its replicas


@dataclass
class State:
    area_id: int
    store_id: int
    boot: int
    prev_boot: int = 0
    masters: dict[str, Entry] = field(default_factory=dict)  # address -> its history

    @classmethod
    def fresh(cls, area_id: int, masters: list[Master], store_id: int = 0) -> State:
        return cls(area_id, store_id or random_id(), random_id(), 0,
                   {m.address: Entry(m.replid) for m in masters})  # fmt: skip

    def encode(self) -> bytes:
        return json.dumps({"area_id": self.area_id, "store_id": self.store_id,
                           "boot": self.boot, "prev_boot": self.prev_boot,
                           "masters": {a: [e.replid, e.doubt]
                                       for a, e in sorted(self.masters.items())}},
                          separators=(",", ":")).encode()  # fmt: skip

    @classmethod
    def decode(cls, raw: bytes) -> State:
        """ValueError when it is not a state this code wrote."""
        try:
            d = json.loads(raw)
            return cls(int(d["area_id"]), int(d["store_id"]), int(d["boot"]),
                       int(d["prev_boot"]), {str(a): Entry(str(r), bool(x))
                                             for a, (r, x) in d["masters"].items()})  # fmt: skip
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"the cluster's lineage record is unreadable: {exc}") from None


def random_id() -> int:
    return secrets.randbits(63) | 1


def judge(known: dict[str, Entry], now: list[Master]) -> tuple[dict[str, Entry], list[str]]:
    """The masters' histories now, and why an acknowledged write may be lost ([]: it
    may not: every change of master was a takeover by a replica holding every write)."""
    by_replid = {e.replid: (a, e) for a, e in known.items()}
    out: dict[str, Entry] = {}
    losses: list[str] = []
    for m in now:
        mine = known.get(m.address)
        if m.replid in by_replid:  # the history it had (at this address or, moved, another)
            out[m.address] = Entry(m.replid, by_replid[m.replid][1].doubt)
            continue
        src = by_replid.get(m.replid2) if m.replid2 != NO_REPLID else None
        if src is not None:
            if src[1].doubt:
                losses.append(f"{m.address} took over from {src[0]}, which had acknowledged "
                              "writes not yet on every replica")  # fmt: skip
        elif mine is not None:
            losses.append(f"{m.address} has a new history (it restarted: what it held is gone)")
        elif m.replid2 != NO_REPLID:
            losses.append(f"{m.address} took over a history this agent never saw")
        out[m.address] = Entry(m.replid)
    return out, losses


class Durable(Protocol):
    """Where the state outlives this process: one keyring entry (the agent gives its
    client one, keys.KeyringEntry: `netswap:AREA:cluster`, beside its own record)."""

    def load(self) -> bytes | None: ...
    def save(self, payload: bytes) -> None: ...


class Keeper:
    """The area's State, in this process and, when the agent gave one, in its keyring
    entry: read at a connect (a restarted agent's client finds what the dead one knew),
    written before a write in doubt is acknowledged. A keyring that refuses fails the
    write that needed it (OSError, made a StoreError EIO by the caller)."""

    _here: dict[str, State] = {}  # one per area in this process, shared by its clients

    def __init__(self, area: str, durable: Durable | None) -> None:
        self.area, self.durable = area, durable

    def load(self) -> State | None:
        """ValueError when the entry is not a state this code wrote."""
        here = self._here.get(self.area)
        if here is not None or self.durable is None:
            return here
        raw = self.durable.load()
        return State.decode(raw) if raw is not None else None

    def save(self, state: State) -> None:
        if self.durable is not None:
            self.durable.save(state.encode())
        self._here[self.area] = state
