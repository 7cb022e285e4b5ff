"""#29's sequences around an agent's restart (its section 5), made to happen with real
processes: real `netswap store` processes, a real `netswap serve` killed -9 and
restarted with --start rebuild (as the supervisor does), libnbd, and where a frame must
arrive late or never, a proxy between agent and store (faultproxy.py).

Each test asserts what the promises (README: P1-P6) say must happen; each was run
against 6afe607, the agent before the replica machine, to confirm or refute the
sequence there: the figures are in the commit messages. test_sequences_io.py has the
sequences of a running agent's reads and writes, test_sequences_epoch.py the epoch's.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import nbd
import pytest
from netswap.client.agent.keys import drop_key

from .faultkit import (
    PAGE,
    ReadBack,
    agent_on,
    file_store,
    lag,
    older_of,
    pause,
    read_back,
    read_later,
    resume,
    running,
    write_pages,
)
from .faultproxy import Proxy
from .nbdserver import connect
from .procs import StoreProc, store_used_pages, wait_until

AREA = f"rebuilds{os.getpid()}"
SLOTS = range(256)


@pytest.fixture(autouse=True)
def _drop_the_key() -> Iterator[None]:
    drop_key(AREA)
    yield
    drop_key(AREA)


# -- leftover copies count as replicas -----------------------------------------------------
@pytest.mark.timeout(180)
def test_a_leftover_copy_on_a_store_the_slab_moved_from_never_proves_it() -> None:
    """Three stores, two replicas. Replica Q is paused past REPLACE_AFTER_S: its slab
    moves to the spare S, and Q keeps its old copies (W1). S is paused in turn and W3
    goes to P alone; the agent dies. At the restart P is away, Q (leftovers) and S
    (stale) answer: two of two replicas' worth of holders, if leftovers count. They must
    not: the slab waits for P, and reads W3."""
    stores = [StoreProc("64M").start() for _ in range(3)]
    agent = agent_on(AREA, stores, "--replicas", "2")
    with running(*stores, agent):
        agent.start()
        w1 = write_pages(agent.uri, b"W1", SLOTS)
        held = [store_used_pages(s) for s in stores]
        p, q = (stores[i] for i, n in enumerate(held) if n)
        (spare,) = (stores[i] for i, n in enumerate(held) if not n)
        pause(q)
        w2 = write_pages(agent.uri, b"W2", SLOTS)  # Q misses it: down, then moved away
        wait_until(lambda: store_used_pages(spare) == len(SLOTS) and lag(agent) == 0, 60,
                   "the slab moved to the spare and resynced")  # fmt: skip
        pause(spare)
        w3 = write_pages(agent.uri, b"W3", SLOTS)  # P alone
        agent.kill()
        pause(p)
        resume(q, spare)
        agent = agent_on(AREA, stores, "--replicas", "2", "--start", "rebuild")
        with running(agent):
            agent.start()
            got: list[ReadBack] = []
            reader = read_later(agent.uri, w3, older_of(w1, w2), got)
            reader.join(3)
            waited = reader.is_alive()  # for P, which alone holds W3
            resume(p)
            reader.join(60)
            print(f"\nleftover on Q, stale S, P away at the rebuild: read back {got[0]}")
            assert got[0].right == len(SLOTS), (str(got[0]), got[0].first_bad)
            assert waited


# -- LOST is forgotten at a restart ----------------------------------------------------------
@pytest.mark.timeout(180)
def test_slots_found_lost_stay_lost_across_an_agent_restart(tmp_path: Path) -> None:
    """One file store rolls back to its flush (X) while the agent runs: the agent finds
    Y on no store and calls the slots lost (EIO). Killed -9 and restarted, it must still
    know: the store's X is not the newest page."""
    store = file_store(tmp_path / "s").start()
    agent = agent_on(AREA, [store], "--replicas", "1")
    with running(store, agent):
        agent.start()
        x = write_pages(agent.uri, b"X", SLOTS, flush=True)
        y = write_pages(agent.uri, b"Y", SLOTS)
        store.kill()
        store.start()

        def lost() -> bool:
            h = connect(agent.uri)
            try:
                h.pread(PAGE, 0)
                return False
            except nbd.Error:
                return True
            finally:
                h.shutdown()

        wait_until(lost, 30, "the agent finding slot 0 lost")
        before = read_back(agent.uri, y, older_of(x))
        agent.kill()
        agent = agent_on(AREA, [store], "--replicas", "1", "--start", "rebuild")
        with running(agent):
            agent.start()
            after = read_back(agent.uri, y, older_of(x))
            print(f"\nlost before the restart: {before}; after: {after}")
            assert before.eio == len(SLOTS)
            assert after.stale == 0 and after.wrong == 0, (str(after), after.first_bad)
            assert after.eio == len(SLOTS)


# -- late() proves what it cannot read ------------------------------------------------------
@pytest.mark.timeout(180)
def test_a_slab_proven_late_reads_from_the_replica_that_holds_its_newest_pages() -> None:
    """A is paused while W2 goes to B alone (A stale); the agent dies. At the restart B
    is away, A (W1) answers: the slab cannot be proven. B comes back and proves it late:
    then every slot reads W2 -- from B, the replica that has it -- and once B is resynced
    onto A, A alone reads W2 too."""
    a, b = StoreProc("64M").start(), StoreProc("64M").start()
    agent = agent_on(AREA, [a, b], "--replicas", "2")
    with running(a, b, agent):
        agent.start()
        w1 = write_pages(agent.uri, b"W1", SLOTS)
        pause(a)
        w2 = write_pages(agent.uri, b"W2", SLOTS)  # B alone, once A is found down
        agent.kill()
        pause(b)
        resume(a)
        agent = agent_on(AREA, [a, b], "--replicas", "2", "--start", "rebuild")
        with running(agent):
            agent.start()
            resume(b)
            time.sleep(3)  # B back: the late proof
            first = read_back(agent.uri, w2, older_of(w1))
            time.sleep(5)  # whatever repair there is has had its time
            later = read_back(agent.uri, w2, older_of(w1))
            print(f"\nproven late: read back {first}; 5 s later {later}")
            assert first.right == later.right == len(SLOTS), (str(later), later.first_bad)
            wait_until(lambda: lag(agent) == 0, 30, "A resynced")
            b.kill()
            alone = read_back(agent.uri, w2, older_of(w1))
            assert alone.right == len(SLOTS), (str(alone), alone.first_bad)


# -- a store failing during a rebuild stops the device ---------------------------------------
@pytest.mark.timeout(180)
def test_an_inventory_that_never_answers_costs_the_rebuild_time_not_the_device() -> None:
    """The store's first Inventory of the rebuild never gets an answer (the proxy drops
    that connection's frames: a store stalled on it, a partition): the RPC times out. The
    agent must still serve, and every page once the store answers on a new connection."""
    from netswap.protocol.messages import Inventory

    store = StoreProc("64M").start()
    proxy = Proxy(store)
    agent = agent_on(AREA, [proxy.address], "--replicas", "1")
    with running(store, proxy, agent):
        agent.start()
        w1 = write_pages(agent.uri, b"W1", SLOTS)
        agent.kill()
        proxy.cut_on = frozenset({Inventory.TYPE})
        agent = agent_on(AREA, [proxy.address], "--replicas", "1", "--start", "rebuild")
        with running(agent):
            began = time.monotonic()
            try:
                agent.start(timeout=60)
            except TimeoutError:
                pytest.fail(f"the agent did not start serving; its log: {agent.text()[-600:]}")
            found = read_back(agent.uri, w1)
            print(f"\nan Inventory cut: served after {time.monotonic() - began:.1f}s, "
                  f"read back {found}")  # fmt: skip
            assert proxy.cuts == 1
            assert found.right == len(SLOTS), (str(found), found.first_bad)


# -- a dead agent's frames still apply -------------------------------------------------------
@pytest.mark.timeout(180)
def test_a_dead_agents_frames_that_arrive_after_a_new_agent_never_apply() -> None:
    """Agent 1's write W2 is on its way to the store (the proxy holds its frames: a
    sliced request, a segment retransmitted late) when agent 1 is killed -9. Agent 2
    rebuilds, fences the store and writes W3; then agent 1's frames arrive. They must
    not apply: every slot reads W3, never W2 (a page no agent acknowledged)."""
    from netswap.protocol.messages import SwapOut

    store = StoreProc("64M").start()
    proxy = Proxy(store)
    agent = agent_on(AREA, [proxy.address], "--replicas", "1")
    with running(store, proxy, agent):
        agent.start()
        w1 = write_pages(agent.uri, b"W1", SLOTS)
        proxy.hold(SwapOut.TYPE)

        def write_w2() -> None:
            with contextlib.suppress(nbd.Error):  # agent 1 dies under it
                write_pages(agent.uri, b"W2", SLOTS)

        threading.Thread(target=write_w2, daemon=True).start()
        wait_until(lambda: proxy.held() > 0, 10, "agent 1's W2 on its way")
        time.sleep(1)  # more of it, on every connection (the loop's too, once it falls back)
        agent.kill()
        agent = agent_on(AREA, [proxy.address], "--replicas", "1", "--start", "rebuild")
        with running(agent):
            agent.start()
            w3 = write_pages(agent.uri, b"W3", SLOTS)
            held = proxy.held()
            proxy.release()
            time.sleep(1)  # the store takes them (or refuses them)
            found = read_back(agent.uri, w3, older_of(w1))
            print(f"\n{held} of agent 1's frames arrived after agent 2's writes: "
                  f"read back {found}")  # fmt: skip
            assert held > 0
            assert found.right == len(SLOTS), (str(found), found.first_bad)


# -- zeroed ranges come back --------------------------------------------------------------------
@pytest.mark.timeout(180)
def test_a_zeroed_range_reads_zeros_after_an_agent_restart() -> None:
    """W1 on both replicas; B is cut off (a partition: the proxy drops everything) while
    the range is zeroed (WRITE_ZEROES), then reachable again; the agent is killed -9 and
    restarted. The range must read zeros: B's W1 is older than the zeroing."""

    a, b = StoreProc("64M").start(), StoreProc("64M").start()
    proxy = Proxy(b)
    agent = agent_on(AREA, [a.address, proxy.address], "--replicas", "2")
    with running(a, b, proxy, agent):
        agent.start()
        w1 = write_pages(agent.uri, b"W1", SLOTS)
        write_pages(agent.uri, b"Y", range(512, 576))  # A holds more of the slab
        proxy.partition()
        h = connect(agent.uri)
        h.zero(len(SLOTS) * PAGE, 0)
        h.shutdown()
        proxy.heal()
        agent.kill()
        agent = agent_on(AREA, [a.address, proxy.address], "--replicas", "2", "--start", "rebuild")
        with running(agent):
            agent.start()
            zeros = dict.fromkeys(SLOTS, bytes(PAGE))
            found = read_back(agent.uri, zeros, older_of(w1))
            print(f"\nzeroed while B was cut off, agent restarted: read back {found}")
            assert found.right == len(SLOTS), (str(found), found.first_bad)
