"""Where the agent's threads run: --cpus auto (gathered), a list (pinned), all."""

from __future__ import annotations

import os
import subprocess

import pytest
from netswap.client.nbd import affinity
from netswap.client.nbd.affinity import MOVE_MARGIN, Gatherer

from .nbdserver import NETSWAP, connect
from .procs import agent_serve, stores, wait_until

PAGE = 4096
TWO_CPUS = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")


def gatherer_on(cpu: int, allowed: frozenset[int]) -> Gatherer:
    g = Gatherer(allowed)
    g.cpu = cpu
    return g


def test_the_gatherer_stays_unless_another_cpu_is_clearly_idler() -> None:
    g = gatherer_on(0, frozenset({0, 1, 2}))
    assert g.choose({0: 0.30, 1: 0.20, 2: 0.90}) == 0  # 0.10 better: noise, stay
    assert g.choose({0: 0.30 + MOVE_MARGIN, 1: 0.20, 2: 0.90}) == 1  # clearly idler: move
    fresh = Gatherer(frozenset({0, 1, 2}))  # nowhere yet: the idlest
    assert fresh.choose({0: 0.5, 1: 0.4, 2: 0.1}) == 2


def test_others_load_leaves_out_what_this_process_used(monkeypatch: pytest.MonkeyPatch) -> None:
    busy = iter([{0: (0, 0), 1: (0, 0)}, {0: (90, 100), 1: (10, 100)}])
    own = iter([0, 80])
    monkeypatch.setattr(affinity, "_cpu_busy", lambda: next(busy))
    monkeypatch.setattr(affinity, "_own_ticks", lambda: next(own))
    g = Gatherer(frozenset({0, 1}))
    g.cpu = 0
    load = g.others_load()
    assert load == pytest.approx({0: 0.10, 1: 0.10})  # CPU 0 was busy with us, not others
    assert g.choose(load) == 0


@TWO_CPUS
def test_auto_gathers_every_thread_of_the_agent_on_one_cpu() -> None:
    with stores(1) as procs, agent_serve(procs, "16M") as (uri, nbdkit):
        h = connect(uri)
        h.pwrite(b"g" * (8 * PAGE), 0)
        assert h.pread(8 * PAGE, 0) == b"g" * (8 * PAGE)

        def gathered() -> bool:
            tasks = os.listdir(f"/proc/{nbdkit.pid}/task")
            return (
                len({frozenset(os.sched_getaffinity(int(t))) for t in tasks}) == 1
                and len(os.sched_getaffinity(int(tasks[0]))) == 1
            )

        wait_until(gathered, 10, "every thread on one CPU")
        h.shutdown()
    with stores(1) as procs, agent_serve(procs, "16M", "--cpus", "all") as (uri, nbdkit):
        connect(uri).shutdown()
        allowed = os.sched_getaffinity(0)
        for tid in os.listdir(f"/proc/{nbdkit.pid}/task"):
            assert os.sched_getaffinity(int(tid)) == allowed, f"thread {tid} was moved"


def test_a_cpu_list_and_sched_place_every_thread_of_the_agent_and_bad_lists_are_errors() -> None:
    for bad, words in (
        ("abc", "expected a CPU list"),
        ("3-1", "bad range"),
        ("4096", "CPU 4096 not available here"),
    ):
        result = subprocess.run(
            [NETSWAP, "serve", "--cpus", bad, "--dry-run"], capture_output=True, text=True
        )
        assert result.returncode == 2, result.stderr
        assert words in result.stderr and "Traceback" not in result.stderr
    cpu = max(os.sched_getaffinity(0))
    placed = ("--cpus", str(cpu), "--sched", "batch")
    with stores(1) as procs, agent_serve(procs, "16M", *placed) as (uri, nbdkit):
        h = connect(uri)
        h.pwrite(b"p" * (8 * PAGE), 0)
        assert h.pread(8 * PAGE, 0) == b"p" * (8 * PAGE)
        tasks = os.listdir(f"/proc/{nbdkit.pid}/task")
        assert len(tasks) > 2  # nbdkit's workers and the agent's loop thread
        for tid in tasks:
            assert os.sched_getaffinity(int(tid)) == {cpu}, f"thread {tid}"
            assert os.sched_getscheduler(int(tid)) == os.SCHED_BATCH, f"thread {tid}"
        h.shutdown()
