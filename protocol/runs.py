"""Runs: a batch's slots as consecutive ranges, the way swap writes and reads them.

The kernel writes swap in clusters and reads it ahead in runs, a multi-page NBD
request is a run, and the agent's jobs are runs; so a batch's slots travel as
runs -- one u64 each, `first << 16 | count` -- and a store writes or reads each
run with one copy where its arena pages are consecutive too. A batch of
single pages is simply a batch of runs of one.
"""

from __future__ import annotations

import itertools
from array import array
from collections.abc import Sequence

from .errors import LocalProtocolError
from .limits import MAX_BATCH_PAGES, MAX_SLOTS

COUNT_BITS = 16  # a run's count in the low bits of its u64: 1..65535 (a batch: <= 256)
_COUNT_MASK = (1 << COUNT_BITS) - 1


def runs_of(slots: Sequence[int]) -> tuple[range, ...]:
    """The maximal runs of consecutive slots, in the order given."""
    if isinstance(slots, range) and slots.step == 1:
        return (slots,) if len(slots) else ()
    out: list[range] = []
    start = prev = -2
    for slot in slots:
        if slot != prev + 1:
            if start >= 0:
                out.append(range(start, prev + 1))
            start = slot
        prev = slot
    if start >= 0:
        out.append(range(start, prev + 1))
    return tuple(out)


def flat(runs: Sequence[range]) -> range | array[int]:
    """Every slot of the runs, in order: the one range, or an array('Q')."""
    if len(runs) == 1:
        return runs[0]
    out = array("Q")
    for run in runs:
        out.extend(run)
    return out


def check_runs(runs: Sequence[range]) -> int:
    """1..MAX_BATCH_PAGES slots below MAX_SLOTS in non-empty runs that do not overlap;
    returns how many slots."""
    total = 0
    for run in runs:
        if run.step != 1 or not 1 <= len(run) <= MAX_BATCH_PAGES:
            raise LocalProtocolError(f"a run of {len(run)} slots")
        if run.start < 0 or run.stop > MAX_SLOTS:
            raise LocalProtocolError("slot out of range")
        total += len(run)
    if not 1 <= total <= MAX_BATCH_PAGES:
        raise LocalProtocolError(f"a batch holds 1..{MAX_BATCH_PAGES} slots, not {total}")
    if len(runs) > 1:
        ordered = sorted(runs, key=lambda r: r.start)
        for a, b in itertools.pairwise(ordered):
            if b.start < a.stop:
                raise LocalProtocolError("duplicate slot in one batch")
    return total


def pack_runs(runs: Sequence[range]) -> bytes:
    return array("Q", [r.start << COUNT_BITS | len(r) for r in runs]).tobytes()


def unpack_runs(packed: array[int]) -> tuple[range, ...]:
    return tuple(range(p >> COUNT_BITS, (p >> COUNT_BITS) + (p & _COUNT_MASK)) for p in packed)
