"""`python -m tests.sim` (make simulate): run seeds, or replay one with its trace.

  python -m tests.sim --seeds 100000            every seed from --first on
  python -m tests.sim --seed 1234               one seed, its whole trace on failure
A failure prints its seed, its faults and the trace's last lines; the same seed
gives the same trace.
"""

from __future__ import annotations

import argparse
import sys
import time

from .run import simulate

SHOWN = 60  # trace lines printed for a failing seed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.sim")
    parser.add_argument("--seeds", type=int, default=1000)
    parser.add_argument("--first", type=int, default=1)
    parser.add_argument("--seed", type=int, help="replay this seed alone, with its trace")
    parser.add_argument("--stop-after", type=int, default=1, help="failures before stopping")
    args = parser.parse_args(argv)
    if args.seed is not None:
        out = simulate(args.seed, trace=True)
        print("\n".join(out.trace))
        print("faults:", *out.faults, sep="\n  ")
        print("\n".join(out.violations) or f"seed {args.seed}: every promise held")
        return 0 if out.ok else 1
    began, cpu, ops, failures = time.monotonic(), 0.0, 0, 0
    for seed in range(args.first, args.first + args.seeds):
        out = simulate(seed)
        cpu += out.cpu
        ops += out.ops
        if not out.ok:
            failures += 1
            print(f"seed {seed} FAILED: make simulate SEED={seed} replays it")
            print("  faults:", *out.faults, sep="\n    ")
            print(*out.violations[:10], sep="\n  ")
            print("  trace:", *out.trace[-SHOWN:], sep="\n    ")
            if failures >= args.stop_after:
                break
    done = seed - args.first + 1
    print(
        f"{done} seeds, {failures} failed, {ops} operations in {cpu:.1f} CPU-s "
        f"({ops / max(cpu, 1e-9):.0f} ops per CPU-second; {time.monotonic() - began:.0f}s)"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
