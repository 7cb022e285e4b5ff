"""Pure parts of the agent: policy, pressure parsing, placement, reserve, the keyring
probe (the replica machine's own: tests/test_machine.py)."""

from __future__ import annotations

import errno
import random
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from netswap.client.agent import keys
from netswap.client.agent.machine.table import power_of_two_choices
from netswap.client.agent.policy import BatchPolicy
from netswap.client.agent.reserve import Reserve, ReserveTimeout
from netswap.server.ops.pressure import Pressure, parse_meminfo, parse_psi, parse_watermarks, sample

CALM = Pressure.calm()


def pressure(**kw: float) -> Pressure:
    base = dict(
        psi_some_avg10=0.0,
        psi_full_avg10=0.0,
        mem_available_kb=1 << 30,
        watermark_min_kb=16384,
        watermark_low_kb=20480,
        watermark_high_kb=24576,
    )
    base.update(kw)
    return Pressure(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("occupancy", "p", "reason", "pages", "linger"),
    [
        (0.0, CALM, "calm", 64, 200e-6),
        (0.49, CALM, "calm", 64, 200e-6),
        (0.5, CALM, "reserve_busy", 32, 50e-6),
        (0.1, pressure(psi_some_avg10=12.0), "psi_busy", 32, 50e-6),
        (0.75, CALM, "reserve_urgent", 16, 0.0),
        (0.1, pressure(mem_available_kb=10000), "watermark_urgent", 16, 0.0),
        (0.1, pressure(psi_full_avg10=6.0), "psi_urgent", 16, 0.0),
        (0.9, pressure(psi_some_avg10=50.0), "reserve_urgent", 16, 0.0),
    ],
)
def test_policy_shrinks_batch_and_linger_as_pressure_rises(
    occupancy: float, p: Pressure, reason: str, pages: int, linger: float
) -> None:
    decision = BatchPolicy(max_pages=64, linger_s=200e-6).decide(occupancy, p)
    assert (decision.reason, decision.max_pages, decision.linger_s) == (reason, pages, linger)
    assert decision.send_now == (linger == 0)


def test_policy_is_monotonic_in_reserve_occupancy() -> None:
    policy = BatchPolicy()
    decisions = [policy.decide(o / 100, CALM) for o in range(101)]
    sizes = [d.max_pages for d in decisions]
    lingers = [d.linger_s for d in decisions]
    assert sizes == sorted(sizes, reverse=True) and lingers == sorted(lingers, reverse=True)


def test_policy_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        BatchPolicy(max_pages=0)
    with pytest.raises(ValueError):
        BatchPolicy(max_pages=1000)
    with pytest.raises(ValueError):
        BatchPolicy(linger_s=-1)


def test_pressure_parsers_read_kernel_formats(tmp_path: Path) -> None:
    psi = (
        "some avg10=12.50 avg60=3.00 avg300=1.00 total=123\n"
        "full avg10=4.25 avg60=1.00 avg300=0.50 total=45\n"
    )
    assert parse_psi(psi) == (12.5, 4.25)
    assert parse_meminfo("MemTotal: 100 kB\nMemAvailable:   123456 kB\n") == 123456
    zoneinfo = (
        "Node 0, zone   DMA\n  pages free 3\n        min      10\n        low      12\n"
        "        high     14\nNode 0, zone Normal\n        min      100\n        low      125\n"
        "        high     150\n"
    )
    assert parse_watermarks(zoneinfo) == (440, 548, 656)
    (tmp_path / "pressure").mkdir()
    (tmp_path / "pressure" / "memory").write_text(psi)
    (tmp_path / "meminfo").write_text("MemAvailable: 5000 kB\n")
    (tmp_path / "zoneinfo").write_text(zoneinfo)
    got = sample(tmp_path)
    assert got == Pressure(12.5, 4.25, 5000, 440, 548, 656)
    assert sample(tmp_path / "missing") == Pressure(0.0, 0.0, 1 << 40, 0, 0, 0)


def test_power_of_two_choices_prefers_free_stores_and_spreads_load() -> None:
    rng = random.Random(0)
    free = {0: 100, 1: 100, 2: 100, 3: 1}
    picks = Counter(power_of_two_choices([0, 1, 2, 3], free.__getitem__, rng) for _ in range(4000))
    assert picks[3] < 0.02 * 4000  # the nearly full store is picked only when paired with itself
    assert min(picks[s] for s in (0, 1, 2)) > 0.25 * 4000
    with pytest.raises(LookupError):
        power_of_two_choices([], free.__getitem__, rng)


def test_reserve_hands_out_and_takes_back_buffers() -> None:
    reserve = Reserve(256 * 1024)
    assert reserve.pages == 64
    assert reserve.locked  # root here: mlock of 256 KiB must succeed
    first = reserve.acquire(60, 1)
    assert reserve.used == 60 and len(set(first)) == 60
    reserve.page(first[0])[:] = b"x" * 4096
    assert bytes(reserve.page(first[0])) == b"x" * 4096
    with pytest.raises(ReserveTimeout):
        reserve.acquire(5, 0.05)
    with pytest.raises(ValueError):
        reserve.acquire(65, 1)
    threading.Timer(0.1, reserve.release, args=(first[:10],)).start()
    start = time.monotonic()
    more = reserve.acquire(5, 5)  # waits for the release, does not allocate
    assert time.monotonic() - start >= 0.05 and len(more) == 5
    assert reserve.waits == 2 and reserve.high_water == 60
    with pytest.raises(ValueError):
        Reserve(4096)


def test_the_keyring_probe_keeps_an_entry_and_leaves_none() -> None:
    assert keys.keyring_usable()  # root's keyring on this host keeps entries
    with pytest.raises(keys.KeyringError) as gone:
        keys._search(keys.PROBE)
    assert gone.value.errno == errno.ENOKEY


@pytest.mark.parametrize("code", [errno.EACCES, errno.EPERM, errno.ENOSYS])
def test_a_keyring_that_refuses_to_keep_entries_is_not_usable(
    monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    """podman lets a container search root's keyring but refuses keyctl setperm (EACCES):
    a probe by search took it for usable, and every write of the area's record failed
    (EIO for every page of the compose lab's load)."""
    real_add = keys._add

    def refused(description: str, payload: bytes) -> int:
        real_add(description, payload)  # the entry is made, as under podman; then refused
        raise keys.KeyringError(code, f"keyctl setperm: {errno.errorcode[code]}")

    monkeypatch.setattr(keys, "_add", refused)
    assert not keys.keyring_usable()
    with pytest.raises(keys.KeyringError):  # and the probe's entry is gone
        keys._search(keys.PROBE)
