"""The area's record and floors in the cluster: read, claimed, fenced (scripts.py).

The record (`netswap:{AREA}:area`) is the area's size, its life (area id) and its
holder, as a netswap store keeps them (server/claims.py); the floors are the area's
(`netswap:{AREA}:floor`, which the Welcome reports) and one per bucket beside the
bucket's chunks, where the write script can check it. Every change goes with WAIT,
as a page does: a floor or a record lost in a failover is a doubt like a page.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .layout import area_floor_key, area_key, bucket_floor_key
from .router import Cmd, Router
from .scripts import CLAIM, CLEARED, FENCE, READ

# Bucket floors raised per request: bounded work per round trip (16,384 buckets is a
# 1 TiB area).
FENCE_BATCH = 512


@dataclass(frozen=True)
class Record:
    slots: int
    area_id: int
    holder: str
    clearing: int  # slots of a replaced or released life whose chunks are not yet gone
    floor: int


class Area:
    def __init__(self, router: Router, name: str) -> None:
        self.router, self.name = router, name
        self.keys = [area_key(name), area_floor_key(name)]

    async def read(self) -> Record:
        cmd = Cmd(self.keys[0], *READ.args(self.keys))
        await self.router.run([cmd])
        slots, area_id, holder, clearing, floor = cmd.result
        return Record(int(slots), int(area_id), _text(holder), int(clearing), int(floor))

    async def claim(self, activate: bool, slots: int, area_id: int, holder: str, force: bool,
                    epoch: int) -> int:  # fmt: skip
        """Make, grow, replace or release (EEXIST: another holder; ESTALE: below the
        floor); the slots whose chunks must go now (0: none)."""
        cmd = Cmd(self.keys[0], *CLAIM.args(self.keys, int(activate), slots, str(area_id),
                                            holder, int(force), epoch))  # fmt: skip
        await self.router.run([cmd], write=True)
        return int(cmd.result)

    async def cleared(self, clearing: int, epoch: int) -> None:
        """The chunks of `clearing` slots are gone: the record says so."""
        await self.router.run([Cmd(self.keys[0], *CLEARED.args(self.keys, epoch, clearing))],
                              write=True)  # fmt: skip

    async def fence(self, epoch: int) -> None:
        """The area's floor to `epoch` (ESTALE below it)."""
        key = self.keys[1]
        await self.router.run([Cmd(key, *FENCE.args([key], epoch))], write=True)

    async def fence_buckets(self, buckets: range, epoch: int) -> None:
        for at in range(buckets.start, buckets.stop, FENCE_BATCH):
            keys = [bucket_floor_key(self.name, b)
                    for b in range(at, min(at + FENCE_BATCH, buckets.stop))]  # fmt: skip
            await self.router.run([Cmd(k, *FENCE.args([k], epoch)) for k in keys], write=True)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
