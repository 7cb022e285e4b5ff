"""A minute of `make fuzz` (the long run is a million frames): a real store takes
malformed and edge-case frames from eight connections while a well-behaved client
verifies pages; only the offending connections close and RSS stays bounded."""

from __future__ import annotations

from pathlib import Path

import pytest

from .fuzz.fuzz_store import RSS_BOUND_MIB, run, verdict


@pytest.mark.timeout(180)
def test_a_minute_of_fuzzing_closes_only_offenders_and_loses_nothing(tmp_path: Path) -> None:
    tally = run(frames=10**9, seconds=60, workdir=tmp_path)
    print(f"{tally.frames} frames, {tally.malformed} malformed, {tally.connections} "
          f"connections, {tally.good_pages} pages verified, RSS peak "
          f"{tally.rss_peak_kib // 1024} MiB")  # fmt: skip
    assert verdict(tally) == []
    assert tally.frames > 10_000 and tally.malformed > 500 and tally.good_pages > 1_000
    assert tally.rss_peak_kib < RSS_BOUND_MIB * 1024


def test_the_fuzzer_fails_a_store_that_drops_well_behaved_connections(tmp_path: Path) -> None:
    """The check can fail: a store that refuses connections (here: a limit of 3, below
    the fuzzers' 8) closes some that did nothing wrong, and the verdict says so."""
    tally = run(frames=10**9, seconds=5, workdir=tmp_path, store_args=("--max-connections", "3"))
    problems = verdict(tally)
    assert any("closed well-behaved" in p or "well-behaved client" in p for p in problems)
