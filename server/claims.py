"""Who may change an area: the fencing floor, and the area's holder.

Fencing (P5: a dead agent's frames never apply after a newer agent's epoch).
Every area name has a floor, the highest epoch any connection of it fenced
with (backends: `floors`; a file store makes it durable before the Fence is
answered). Fence(e) below the floor is refused ESTALE and leaves the
connection as it was; otherwise the floor rises to e and the connection is
bound to e. A connection below the floor changes nothing: SwapOut, Discard and
Swapfile either way are refused ESTALE (a Discard in slices is checked before
each slice, so a newer agent's Fence stops an older one's Discard midway). A
connection that never fenced is at epoch 0: on an area never fenced it works
as before protocol 4, on a fenced one it can change nothing. The floor
outlives the area, so an agent that releases and remakes its area still
fences out the one before it; a new holder reads the floor in the Welcome and
fences above it.

The area record (issue #30: one host per area). An area is one life
(`area_id`, 0: any) held by one host (`holder`, "": nobody named). Activating:
  - no area: it is made, that life, that holder;
  - the same life (or a request of life 0, the old behaviour) and not another
    host's claim: it grows, as before;
  - otherwise the old life is released and the new one made -- if `force`, or
    the area has no holder, or it is the same host's (starting fresh) -- or the
    request is refused EEXIST naming the holder, and nothing changes.
Releasing an area another host holds is refused EEXIST too, unless `force`.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator

from netswap.protocol import StoreError, Swapfile

from .backends import Area, PageBackend
from .backends.base import Step


def stale(name: str, epoch: int, floor: int) -> StoreError:
    """The refusal of a change from a connection below the area's floor."""
    return StoreError(errno.ESTALE, f"area {name} is held by a newer agent (epoch {floor}); "
                      f"this connection's epoch is {epoch}")  # fmt: skip


def fence_steps(backend: PageBackend, name: str, epoch: int) -> Iterator[Step]:
    """Raise `name`'s floor to `epoch` (refused ESTALE below it), durable at the end."""
    floor = backend.floors.get(name, 0)
    if epoch < floor:
        raise StoreError(errno.ESTALE, f"area {name} is held by a newer agent (epoch {floor})")
    return backend.floor_steps(name, epoch)


def _held(area: Area) -> StoreError:
    return StoreError(errno.EEXIST, f"area {area.name} is held by {area.holder} (area id "
                      f"{area.area_id:#x}); only a forced takeover replaces it")  # fmt: skip


def _another_host(area: Area, holder: str) -> bool:
    return bool(area.holder) and holder != area.holder


def activate_steps(backend: PageBackend, name: str, request: Swapfile) -> Iterator[int] | None:
    """Make, grow or replace the area as the rule above says (EEXIST: nothing done).
    None when it is done already; else the replacement's steps (the old life's pages
    handed back in slices)."""
    area = backend.areas.get(name)
    same_life = area is not None and request.area_id in (0, area.area_id)
    if area is None or (same_life and not (request.holder and _another_host(area, request.holder))):
        backend.activate(name, request.slots, request.area_id, request.holder)
        return None
    if not (request.force or not area.holder or area.holder == request.holder):
        raise _held(area)
    return backend.replace_steps(name, request.slots, request.area_id, request.holder)


def release_steps(backend: PageBackend, name: str, request: Swapfile) -> Iterator[int]:
    """Release the area, unless another host holds it (EEXIST) and no `force`."""
    area = backend.areas.get(name)
    if area is not None and _another_host(area, request.holder) and not request.force:
        raise _held(area)
    return backend.release_steps(name)
