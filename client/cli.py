"""The `netswap` command: one entry point, one subcommand per job.

Every expected failure (bad option, busy port, missing package, not root)
ends as one line on stderr and a non-zero exit status, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from typing import Any

from netswap.server import storecmd
from netswap.server.units import UsageError

from . import statscmd
from .nbd import attach
from .nbd import serve as servecmd

Register = Callable[[argparse.ArgumentParser], None] | None
Run = Callable[[argparse.Namespace], int]

# (name, help, add its arguments, run it): one row per subcommand.
COMMANDS: list[tuple[str, str, Register, Run]] = [
    ("store", "run a page-store server", storecmd.add_arguments, storecmd.run),
    ("serve", "export swap over NBD (nbdkit + the netswap plugin)", servecmd.add_arguments,
     servecmd.run),
    ("attach", "swap on a netswap export (nbd-client + swapon)", attach.add_attach_arguments,
     attach.run_attach),
    ("detach", "undo `netswap attach`", attach.add_detach_arguments, attach.run_detach),
    ("restart", "replace nbdkit and the agent under the swapping kernel (an upgrade)",
     attach.add_restart_arguments, attach.run_restart),
    ("stats", "live figures from a store or `serve --http` endpoint", statscmd.add_arguments,
     statscmd.run),
]  # fmt: skip
# Expected failures: one line on stderr and exit status 2, never a traceback.
USER_ERRORS = (UsageError, attach.AttachError, statscmd.StatsError, ValueError)
# Subcommands installed by packages above this one (the labs: netswap.lab.cli).
SUBCOMMANDS = "netswap.subcommands"


def _register(sub: Any, rows: list[tuple[str, str, Register, Run]]) -> None:
    for name, text, add_arguments, run in rows:
        parser = sub.add_parser(name, help=text)
        if add_arguments is not None:
            add_arguments(parser)
        parser.set_defaults(run=run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="netswap", description="Swap over network storage.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _register(sub, COMMANDS)
    for entry in entry_points(group=SUBCOMMANDS):
        entry.load()(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        status: int = args.run(args)
    except USER_ERRORS as exc:
        print(f"netswap {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"netswap {args.command}: error: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return status


if __name__ == "__main__":
    sys.exit(main())
