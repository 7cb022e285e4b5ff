"""#29's epoch sequences with real processes: an agent must seal under an epoch above every
epoch an agent of the area used before (P6), or the same (slot, generation) -- the
AES-GCM nonce -- is sealed over two different pages.

Each test lets an agent write slot 7 (its page reaches the store at (epoch, 1)), trims
it (the store keeps no copy to tell the next agent), and starts the next agent the way
the sequence does: a spare told `go` with a lower epoch (take_over), a cold start with
the epoch a torn supervisor state page gives (1), a spare that served and failed
followed by a cold start, a count at its end (2^32 - 1) wrapping. The next agent's
write of slot 7 must reach the store at a higher generation than every earlier one.
The generations are read from the store itself (Inventory over a probe connection).
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from netswap.client.agent.keys import drop_key
from netswap.client.rpc import StoreClient
from netswap.client.supervise.spare import Spare

from .conftest import free_port
from .faultkit import PAGE, AgentProc, page_of, running
from .nbdserver import NETSWAP, connect
from .procs import StoreProc

AREA = f"epochs{os.getpid()}"
SLOT = 7


# Sealed, the generation is the page's nonce; in plaintext, it is what the page's tag
# binds: a repeat lets another page of the slot prove itself as the newest.
MODES = {"sealed": (), "plain": ("--no-encrypt",)}


@pytest.fixture(autouse=True)
def _drop_the_key() -> Iterator[None]:
    drop_key(AREA)
    yield
    drop_key(AREA)


async def _probe(store: StoreProc) -> StoreClient:
    client = await StoreClient.connect("127.0.0.1", store.port, AREA, deadline=5)
    floor = getattr(client.welcome, "floor", 0)
    if floor:  # protocol 4: a connection changes a fenced area only at its floor or above
        await client.fence(floor)
    return client


def generation(store: StoreProc, slot: int = SLOT) -> int:
    """The generation of the store's copy of `slot` (0: none)."""

    async def ask() -> int:
        client = await _probe(store)
        try:
            held, gens, _lengths = await client.inventory(slot, 1)
            return gens[0] if len(held) else 0
        finally:
            await client.close()

    return asyncio.run(ask())


def put(store: StoreProc, slot: int, gen: int) -> None:
    """A page of `slot` at `gen` straight into the store, as an agent would have sent it
    (the probe tags it; its content is never read)."""

    async def send() -> None:
        client = await _probe(store)
        try:
            await client.swap_out([slot], page_of(b"P", slot), [gen])
        finally:
            await client.close()

    asyncio.run(send())


def write_then_trim(uri: str, tag: bytes, store: StoreProc) -> int:
    """Write slot 7, read the generation the store got, trim the slot; that generation."""
    h = connect(uri)
    h.pwrite(page_of(tag, SLOT), SLOT * PAGE)
    gen = generation(store)
    h.trim(PAGE, SLOT * PAGE)
    h.shutdown()
    assert gen and generation(store) == 0  # the store keeps no copy of it
    return gen


def started(store: StoreProc, mode: str, *extra: str) -> AgentProc:
    return AgentProc(AREA, [store], "4M", "--replicas", "1", *MODES[mode], *extra).start()


def spare_on(store: StoreProc, tmp_path: Path, *extra: str) -> tuple[Spare, int]:
    """A standby nbdkit on the store (not serving until `go`), as the supervisor starts
    one; (the spare, its port)."""
    port = free_port()
    cmd = [NETSWAP, "serve", "--listen", f"127.0.0.1:{port}", "--no-exit-with-parent",
           "--size", "4M", "--backend", "remote", "--no-mlock", "--area", AREA,
           "--replicas", "1", f"--store={store.address}", *extra, "--print-command"]  # fmt: skip
    command = json.loads(subprocess.run(cmd, capture_output=True, text=True,
                                        check=True).stdout)  # fmt: skip
    log = tmp_path / f"spare-{port}.log"
    spare = Spare.spawn(command["argv"], {**os.environ, **command["env"]}, str(log), port)
    deadline = time.monotonic() + 60
    while not spare.ready:
        assert time.monotonic() < deadline, log.read_text()
        if select.select([spare], [], [], 1)[0] and not spare.heard():
            raise AssertionError(f"the spare closed its socket: {log.read_text()!r}")
    return spare, port


def served(spare: Spare, port: int) -> str:
    """After go: the spare's URI once it answers NBD."""
    uri = f"nbd://127.0.0.1:{port}/swap"
    deadline = time.monotonic() + 60
    while True:
        try:
            connect(uri).shutdown()
            return uri
        except Exception:
            assert time.monotonic() < deadline and spare.child.alive(), "the spare never served"
            time.sleep(0.2)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", MODES)
def test_a_spare_told_a_lower_epoch_still_goes_above_every_epoch_used(
    tmp_path: Path, mode: str
) -> None:
    """take_over: agent A (epoch from --epoch 9) seals slot 7; a spare is told `go 8`,
    below it (a supervisor's count behind the area's: a torn state page, an adopt)."""
    store = StoreProc("64M").start()
    with running(store):
        agent = started(store, mode, "--epoch", "9")
        with running(agent):
            first = write_then_trim(agent.uri, b"A", store)
        spare, port = spare_on(store, tmp_path, *MODES[mode])
        try:
            spare.go((first >> 32) - 1)
            second = write_then_trim(served(spare, port), b"B", store)
        finally:
            spare.discard()
        print(f"\nagent A sealed slot 7 at {first:#x}; the spare, told go "
              f"{(first >> 32) - 1}, at {second:#x}")  # fmt: skip
        assert second > first


@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", MODES)
def test_a_cold_start_on_a_torn_state_pages_epoch_goes_above_every_epoch_used(mode: str) -> None:
    """A torn supervisor state page reads as no state: the supervisor's epoch is 1 again,
    and the next agent it starts (a cold start: rebuild) is given --epoch 2."""
    store = StoreProc("64M").start()
    with running(store):
        agent = started(store, mode, "--epoch", "9")
        with running(agent):
            first = write_then_trim(agent.uri, b"A", store)
        again = started(store, mode, "--start", "rebuild", "--epoch", "2")
        with running(again):
            second = write_then_trim(again.uri, b"B", store)
        print(f"\nagent A sealed slot 7 at {first:#x}; the cold start on epoch 2 at "
              f"{second:#x}")  # fmt: skip
        assert second > first


@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", MODES)
def test_a_cold_start_after_a_failed_take_over_goes_above_the_spares_epoch(
    tmp_path: Path, mode: str
) -> None:
    """The supervisor raises its epoch to E and tells the spare `go E`; the spare serves
    (seals slot 7), then the take-over fails (the device could not be reconnected) and
    the spare is stopped; the supervisor cold-starts an agent with the same E."""
    store = StoreProc("64M").start()
    with running(store):
        agent = started(store, mode, "--epoch", "4")
        with running(agent):
            write_then_trim(agent.uri, b"A", store)
        spare, port = spare_on(store, tmp_path, *MODES[mode])
        try:
            spare.go(5)
            first = write_then_trim(served(spare, port), b"S", store)
        finally:
            spare.discard()
        cold = started(store, mode, "--start", "rebuild", "--epoch", "5")
        with running(cold):
            second = write_then_trim(cold.uri, b"C", store)
        print(f"\nthe spare (go 5) sealed slot 7 at {first:#x}; the cold start on epoch 5 "
              f"at {second:#x}")  # fmt: skip
        assert second > first


@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", MODES)
def test_a_count_that_wraps_raises_an_epoch_the_next_agent_goes_above(mode: str) -> None:
    """Slot 7's count at 2^32 - 1 (its page put in the store at that generation: four
    billion writes) when agent B starts; B's write of slot 7 wraps the count and raises
    its epoch. The next agent, C, must go above that epoch too."""
    store = StoreProc("64M").start()
    with running(store):
        agent = started(store, mode)
        with running(agent):
            zero = write_then_trim(agent.uri, b"A", store)
        put(store, SLOT, (zero >> 32) << 32 | 0xFFFFFFFF)
        b = started(store, mode, "--start", "rebuild")
        with running(b):
            first = write_then_trim(b.uri, b"B", store)
        c = started(store, mode, "--start", "rebuild")
        with running(c):
            second = write_then_trim(c.uri, b"C", store)
        print(f"\nslot 7 at {(zero >> 32) << 32 | 0xFFFFFFFF:#x}: agent B sealed it at "
              f"{first:#x}, agent C at {second:#x}")  # fmt: skip
        assert second > first


@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", MODES)
def test_a_fresh_start_after_the_record_went_goes_above_the_stores_floor(mode: str) -> None:
    """A reboot (or a detach) takes the keyring -- the key, the epoch, the record -- and
    the next agent starts fresh on stores that still know the last agent's epoch (their
    floor): it must go above it."""
    store = StoreProc("64M").start()
    with running(store):
        agent = started(store, mode, "--epoch", "9")
        with running(agent):
            first = write_then_trim(agent.uri, b"A", store)
        drop_key(AREA)  # the reboot
        fresh = started(store, mode)
        with running(fresh):
            second = write_then_trim(fresh.uri, b"B", store)
        print(f"\nagent A sealed slot 7 at {first:#x}; after the keyring went, a fresh "
              f"agent at {second:#x}")  # fmt: skip
        assert second > first
