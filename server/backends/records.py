"""A store's small records beside its pages: who it is, which life of its process,
and every area's fencing floor.

Each is a tiny file under the file store's DIR, replaced whole (written to a
temporary name, fsynced, renamed over, the directory fsynced), so a crash
leaves the old record or the new one, never half of either:

  id      the store's identity, made once when DIR is first used
  boot    the boot of the process serving DIR now (the next one's prev_boot)
  clean   written by a graceful shutdown after its last flush: the boot it ends
  floors  per area name, the highest epoch any connection fenced with

At start (`Incarnation.of_dir`, once the index has loaded): prev_boot is what
`boot` holds, clean is whether `clean` names that very boot, then this
process's boot goes into `boot` and `clean` is removed, all durable before the
store accepts a connection. So a kill -9 leaves clean false, and a `clean` file
left by an older process (its removal lost in a crash) names another boot.

An id is a random u64 (never 0: 0 says "none" on the wire). A record that
cannot be read refuses the store's start in one line, as a corrupt index does.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

# Floors kept per store: every area's (MAX_AREAS, slotmap.py) and as many again for
# names whose area went (a floor outlives its area). A floor is ~100 bytes in DIR/floors,
# so the file stays under a megabyte, rewritten only when a Fence raises a floor.
MAX_FLOORS = 2 * 4096
# A record file is a line of hex or a JSON object of MAX_FLOORS floors: 2 MiB bounds it.
MAX_RECORD = 2 << 20


def new_id() -> int:
    """A random nonzero u64."""
    return int.from_bytes(os.urandom(8), "little") or 1


class UnusableRecord(ValueError):
    """A record file that cannot be read: the store refuses to start."""


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data`, durable: tmp, fsync, rename, fsync(dir)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    sync_dir(path.parent)


def sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read(path: Path) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read(MAX_RECORD + 1)
    except FileNotFoundError:
        return None


def read_id(path: Path) -> int | None:
    """A record of one id (a line of hex), or None when there is none."""
    raw = _read(path)
    if raw is None:
        return None
    try:
        value = int(raw.strip(), 16)
    except ValueError:
        value = -1
    if not 0 < value < 1 << 64:
        raise UnusableRecord(f"{path} does not hold a store id or boot (16 hex digits) -- "
                             "move it aside if the directory is otherwise sound")  # fmt: skip
    return value


def _hex(value: int) -> bytes:
    return f"{value:016x}\n".encode()


@dataclass
class Incarnation:
    store_id: int
    boot: int
    prev_boot: int = 0
    clean: bool = False

    @classmethod
    def of_dir(cls, path: Path) -> Incarnation:
        """The file store's: its id (made if DIR has none), the boot before, whether
        that one ended clean; then this boot recorded and the clean mark removed."""
        store_id = read_id(path / "id")
        if store_id is None:
            store_id = new_id()
            write_atomic(path / "id", _hex(store_id))
        prev = read_id(path / "boot") or 0
        try:
            clean = prev != 0 and read_id(path / "clean") == prev
        except UnusableRecord:
            clean = False  # a torn mark says nothing was promised
        me = cls(store_id, new_id(), prev, clean)
        write_atomic(path / "boot", _hex(me.boot))
        (path / "clean").unlink(missing_ok=True)
        sync_dir(path)
        return me


def mark_clean(path: Path, boot: int) -> None:
    """The last flush of this boot is done: DIR/clean names it."""
    write_atomic(path / "clean", _hex(boot))


def read_floors(path: Path) -> dict[str, int]:
    """DIR/floors: {"floors": {area: epoch}} (none yet: no floor)."""
    raw = _read(path)
    if raw is None:
        return {}
    try:
        floors = json.loads(raw)["floors"]
        ok = type(floors) is dict and len(floors) <= MAX_FLOORS
        ok = ok and all(type(v) is int and 0 <= v < 1 << 64 for v in floors.values())
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise UnusableRecord(f"{path} is not a record of floors -- a store that forgot its "
                             "floors would let a dead agent's frames apply; restore it or "
                             "move the directory aside")  # fmt: skip
    return {str(k): int(v) for k, v in floors.items()}


def floors_record(floors: dict[str, int]) -> bytes:
    return json.dumps({"floors": floors}, sort_keys=True).encode()
