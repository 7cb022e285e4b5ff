"""The soak's report: the RSS chart (matplotlib, artifacts/soak-rss.png) and the lines
`make soak` and make test's slice print."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .nemesis import KINDS

if TYPE_CHECKING:
    from .soak import Outcome, Samples

# The bar for the long runs (#22: 0.1 MiB per 10 min, an hour long); the short slice
# in make test uses a looser one, since a minute of samples cannot resolve it.
SLOPE_BOUND_MIB = 0.1


def draw(chart: Path, samples: Samples, warm: int, slope: float) -> None:
    """RSS of the agent and each store over the run, the warm-up shaded, the agent's
    fitted slope in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for name, figures in samples.by_name.items():
        label = f"{name} (after warm-up {slope:+.2f} MiB/10 min)" if name == "agent" else name
        ax.plot(samples.t, [f[0] / 1024 for f in figures], label=label,
                linewidth=1.6 if name == "agent" else 1.0)  # fmt: skip
    if samples.t and warm:
        ax.axvspan(0, samples.t[warm], color="0.9", label="warm-up")
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel("resident memory, RSS (MiB)")
    ax.set_title("make soak: RSS of the agent (nbdkit + plugin) and the stores, under the nemesis")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    chart.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(chart, dpi=110)


def report(out: Outcome) -> None:
    kinds = ", ".join(f"{sum(f.kind == k for f in out.faults)} {k}" for k in KINDS)
    print(f"soak: {out.seconds:.0f}s, {len(out.faults)} faults ({kinds}; seed {out.seed}), "
          f"{out.pages_checked} pages verified as they went and {out.swept} at the end, "
          f"{len(out.errors)} errors; {out.write_retries} writes failed during an outage and "
          f"were written again; agent RSS slope after warm-up {out.slope:+.2f} MiB per "
          f"10 min over {out.slope_window[0]:.0f}-{out.slope_window[1]:.0f}s (one agent's "
          f"life; bound {SLOPE_BOUND_MIB}"
          f"{'' if out.slope_judged else ': not judged, the agent was restarted'})")  # fmt: skip
    for f in out.faults:
        repair = f"repaired {f.repair_s:.1f}s after" if f.repair_s >= 0 else "not repaired"
        print(f"  {f.began:6.1f}s {f.kind:<12} {f.seconds:5.1f}s, {repair}")
    if out.waiting:
        print(f"  the last fault was not repaired {out.seconds:.0f}s in: {out.waiting}")
    print(f"  agent log lines of pages on no replica any more: {out.lost_in_log}")
    for name, (rss, fds, threads) in out.peaks.items():
        print(f"  {name:<7} peak RSS {rss / 1024:6.1f} MiB, fds {fds:4d}, threads {threads:3d}")
    print(f"  RSS chart: {out.chart}")
    print(f"  stores found down by the agent: {out.downs}")
    if out.snapshots:
        print(f"  tracemalloc snapshots took (off the agent's loop) "
              f"{', '.join(f'{s:.1f}s' for s in out.snapshots)}")  # fmt: skip
    if out.growth:
        print(f"  agent's Python memory after warm-up: {out.traced_growth / 1024:+.1f} KiB "
              "(tracemalloc); the sites that grew most:")  # fmt: skip
        for where, grown in out.growth:
            print(f"    {grown / 1024:+9.1f} KiB  {where}")
    if out.memory:
        print("  the agent's memory over the slope's window (MiB; slope per 10 min):")
        for name, first, last, per in out.memory:
            print(f"    {name:<30} {first:9.2f} -> {last:9.2f}  {per:+7.3f}")
        print("  the mappings that grew most in it:")
        for line in out.mappings:
            print(f"    {line}")
    if out.trimmed[0]:
        before, after = out.trimmed
        print(
            f"  malloc_trim(0) at the end: the agent's RSS {before / 1024:.1f} -> "
            f"{after / 1024:.1f} MiB ({(after - before) / 1024:+.1f}: what malloc held free)"
        )
    for error in out.errors[:5]:
        print(f"  ERROR {error}")
