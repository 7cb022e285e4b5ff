"""python -m tests.corpus [--only python,redis] [--out DIR] [--cap-mib 64]: build the corpus."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .generate import CAP_PAGES, DEFAULT_DIR, PAGE, generate
from .sources import SOURCES


def main() -> int:
    names = [s.name for s in SOURCES]
    parser = argparse.ArgumentParser(prog="python -m tests.corpus", description=__doc__)
    parser.add_argument("--out", type=Path, default=DEFAULT_DIR, help="corpus directory")
    parser.add_argument("--only", default=",".join(names), help=f"sources, of {','.join(names)}")
    parser.add_argument("--cap-mib", type=int, default=CAP_PAGES * PAGE >> 20,
                        help="pages kept per source, in MiB (sampled uniformly)")  # fmt: skip
    args = parser.parse_args()
    chosen = [s for s in SOURCES if s.name in args.only.split(",")]
    unknown = set(args.only.split(",")) - set(names)
    if unknown:
        print(f"corpus: unknown sources {sorted(unknown)}; known: {names}", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("corpus: reading other processes' pagemap frames needs root", file=sys.stderr)
        return 2
    for source in [s for s in chosen if s.missing()]:
        print(f"corpus: skipping {source.name}: {source.missing()}", file=sys.stderr)
        chosen.remove(source)
    try:
        generate(args.out, chosen, (args.cap_mib << 20) // PAGE)
    except (RuntimeError, OSError) as e:
        print(f"corpus: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
