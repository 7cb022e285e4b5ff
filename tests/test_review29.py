"""A hostile review of #29's promises: sequences that break them on the current code.

Each test here failed on 71e6b77 (its assertion fired) and passes since its fix; each
drives the real machine (client/agent/machine) with the fakes of test_machine.py.
"""

from __future__ import annotations

import errno

from netswap.client.agent.core import Agent
from netswap.client.agent.keys import KeyringError
from netswap.client.agent.machine.bounds import WRITE_WAIT_S
from netswap.client.agent.machine.slots import DOUBT, LOST, WRITTEN
from netswap.client.agent.remote import RemoteDevice
from netswap.client.agent.reserve import Reserve
from netswap.protocol import PAGE_SIZE, StoreError

from .fakestore import FakeStore
from .test_agent_core import page
from .test_machine import World, acked, machine, restarted, write


def test_a_slot_written_again_after_a_failed_write_reads_after_a_restart() -> None:
    """An outage fails one write of slots 1 and 2 (slot 1 had been written 5 times, slot 2
    once): both DOUBT, recorded with `below` = slot 1's generation. The kernel writes both
    again once the stores are back; both acknowledged on both replicas. The agent is then
    killed -9 and restarted: slot 2's newest page is on both stores, at a generation
    (count 3) below slot 1's failed one (count 6) -- and it reads EIO."""
    m, world = machine(), World(2)
    for _ in range(5):
        acked(m, write(m, 1))
    acked(m, write(m, 2))
    for s in (0, 1):
        m.store_down(s)
    failed = write(m, 1, 2)  # slots 1 and 2, while no store answers
    assert m.route_write(failed) == []
    m.now = WRITE_WAIT_S + 1
    m.expire()
    assert failed.error == errno.EIO and m.slots.state[1] == m.slots.state[2] == DOUBT
    for s in (0, 1):
        m.store_up(s, 100 + s, 1000 + s, True)  # the same boots: nothing lost
    again = write(m, 1, 2)  # the kernel writes the pages whose write failed again
    acked(m, again)
    assert again.error == 0
    for s in (0, 1):
        for slot in (1, 2):
            world.put(s, slot, m.slots.gens[slot], slot)
    new = restarted(m, world)
    assert new.slots.state[1] == WRITTEN
    assert new.slots.state[2] == WRITTEN, "slot 2's acknowledged page, on both stores, is EIO"
    assert new.slots.state[2] != LOST


def test_a_replica_away_at_a_rebuild_is_not_called_in_sync_after_missing_writes() -> None:
    """Two stores, two replicas, quorum 1. Slot 3 is X on both. The agent dies; store 1 is
    away when it restarts (a stall, a partition). The new agent writes Y to slot 3: it goes
    to store 0 alone and is acknowledged. Store 1 comes back as the same boot (it lost
    nothing). The agent dies again, and store 0 is away at that restart: store 1, which
    the record still calls in sync, proves the slab alone and slot 3 reads X."""
    m, world = machine(), World(2)
    acked(m, write(m, 3))
    x = m.slots.gens[3]
    for s in (0, 1):
        world.put(s, 3, x, 0x58)
    world.away = {1}
    new = restarted(m, world)
    assert new.slots.state[3] == WRITTEN and new.slots.gens[3] == x
    y_job = write(new, 3)
    assert acked(new, y_job) == [0] and y_job.error == 0  # Y acknowledged, on store 0 alone
    y = new.slots.gens[3]
    world.put(0, 3, y, 0x59)
    world.away = set()
    new.store_up(1, 101, 1001, True)  # the same boot: it lost nothing, but missed Y
    repairs = new.repairs()
    world.away = {0}
    again = restarted(new, world)
    broken = []
    if again.slots.state[3] == WRITTEN and again.slots.gens[3] == x:
        broken.append("P1: slot 3 reads X, older than the acknowledged Y")
    if not repairs:
        broken.append("P4: store 1's replica missed Y and is never resynced")
    assert not broken, broken


class _FailingKeeper:
    """A keyring that takes the first records and then refuses (its quota reached)."""

    def __init__(self) -> None:
        self.fail = False
        self.saved: list[object] = []

    def load(self) -> None:
        return None

    def save(self, record: object) -> None:
        if self.fail:
            raise KeyringError(errno.EDQUOT, "Disk quota exceeded")
        self.saved.append(record)


def test_a_write_is_not_acknowledged_past_a_record_that_could_not_be_written() -> None:
    """Two fake stores, two replicas, quorum 1. Store b refuses writes (ENOSPC): a write
    is acknowledged with a's copy alone once b's replica is STALE in the record. The
    keyring refuses that record (EDQUOT): the write must fail, as the code's own comment
    says ("acknowledging past an unrecorded change is not"), since a restart would read a
    record that calls b in sync and could prove the slab from b's older page."""
    a, b = FakeStore("a"), FakeStore("b")
    keeper = _FailingKeeper()

    async def connect(host: str, port: int, *args: object) -> object:
        return await (a, b)[port].connect(host, port, *args)  # type: ignore[arg-type]

    agent = Agent([("fake", 0), ("fake", 1)], "unit", 4096, Reserve(64 * PAGE_SIZE),
                  replicas=2, slab_slots=256, quorum=1, io_timeout=2.0,
                  connect_store=connect, keeper=keeper)  # type: ignore[arg-type]  # fmt: skip
    device = RemoteDevice(agent, 4096 * PAGE_SIZE, reserve_wait=2.0, compress=True)
    device.start()
    try:
        device.pwrite(page(1), 5 * PAGE_SIZE, False)  # placed, on both
        keeper.fail, b.write_error = True, errno.ENOSPC
        try:
            device.pwrite(page(2), 5 * PAGE_SIZE, False)
            acknowledged = True
        except StoreError:
            acknowledged = False
        assert "record cannot be written" in agent.machine.fenced_out  # the save did fail
        assert not acknowledged, "acknowledged with b STALE in memory only"
    finally:
        device.close()
