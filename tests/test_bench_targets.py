"""make bench-agent's targets report (tests/bench/targets.py) on figures made up here:
each verdict can come out met, within noise or MISSED, and a saved run prints again."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.bench import targets
from tests.bench.content import ROWS
from tests.bench.fio import Result, Workload

WORK = [Workload("4K randwrite QD32", "randwrite", "4k", 32)]


def runs(*iops: float, cpu: float = 100.0) -> list[Result]:
    return [Result(x, 50.0, 90.0, 10.0, cpu, 20.0) for x in iops]


def test_a_verdict_is_on_the_median_and_the_noise_is_the_range() -> None:
    assert targets.verdict([0.95, 0.91, 0.93], 0.9, True) == "met"
    assert targets.verdict([0.85, 0.91, 0.80], 0.9, True) == "within noise"
    assert targets.verdict([0.85, 0.89, 0.80], 0.9, True) == "MISSED"
    assert targets.verdict([0.2, 0.4, 0.25], 0.3, False) == "met"
    assert targets.verdict([0.35, 0.4, 0.5], 0.3, False) == "MISSED"


def test_ratios_pair_the_rounds_and_cpu_counts_every_process() -> None:
    results = {"a": {"r": runs(100, 300)}, "b": {"r": runs(200, 200, cpu=170.0)}}
    assert targets.per_round(results, "a", "b", "r") == [0.5, 1.5]
    # b: 170 + 20 + 10 = 200 us per request, a: 100 + 20 + 10 = 130
    assert targets.cpu_ratio(results, "a", "b", "r") == pytest.approx([200 / 130] * 2)


def test_the_report_says_what_misses(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    row = WORK[0].name
    results = {
        "agent": {row: runs(80, 82, 85)},
        "agent-raw": {row: runs(100, 100, 100, cpu=130.0)},
        "agent-before": {row: runs(90, 80, 95, cpu=50.0)},
    }
    corpus = {r.name: runs(90, 95, 99) for r in ROWS}
    corpus[ROWS[-1].name] = [Result(9000, 30.0, 60.0) for _ in range(3)]
    results["agent-corpus"] = corpus
    results["agent-corpus-raw"] = {r.name: runs(100, 100, 100) for r in ROWS}
    fig = {"used": 1700.0, "payload": 1690.0, "held": 1.0, "used_end": 1600.0,
           "wire_out": 1750.0, "wire_in": 1750.0}  # fmt: skip
    figures = {"agent-corpus": fig, "agent-corpus-raw": dict.fromkeys(fig, 4096.0)}
    saved = tmp_path / "run.json"
    targets.save(saved, results, WORK, figures)
    targets.corpus(*targets.load(saved)[::2])
    targets.report(results, WORK, {})
    out = capsys.readouterr().out
    # agent / agent-raw: 0.80, 0.82, 0.85 against 0.9; CPU (130 + 30) / (100 + 30)
    assert re.search(r"QD32 +0\.82x \[0\.80-0\.85\].* 1\.23x +>= 0\.90 MISSED", out)
    # agent / agent-before: 0.89, 1.02, 0.89 against 0.95: the median misses, a round meets it
    # and its CPU per request, (50 + 30) / (100 + 30), says it misses
    assert re.search(r"QD32 +0\.89x \[0\.89-1\.02\].* 0\.62x +>= 0\.95 within noise "
                     r"\(CPU b/a misses it\)", out)  # fmt: skip
    assert re.search(r"zero page / a stored corpus page +0\.60x.*<= 0\.30 MISSED", out)
    assert "= 0.415x  <= 0.45 met" in out
