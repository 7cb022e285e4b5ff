"""The `netswap` command: one entry point, one subcommand per job.

Every expected failure (bad option, busy port, missing package, not root)
ends as one line on stderr and a non-zero exit status, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from netswap.server.units import UsageError

from .supervise.protect import MCL_CURRENT, MCL_FUTURE, MCL_ONFAULT, lock_all

# (name, help, module, its add-arguments function, its run function): one row per subcommand.
# A module is imported only when its command runs (or for the full --help): `netswap restart`
# runs inside a host starved of memory, where the 20 MiB that every module's imports cost
# (asyncio, rich, the store) were swapped in and out for minutes (seen in the drill at 256 MiB).
COMMANDS: list[tuple[str, str, str, str, str]] = [
    ("store", "run a page-store server", "netswap.server.storecmd", "add_arguments", "run"),
    ("serve", "export swap over NBD (nbdkit + the netswap plugin)", "netswap.client.nbd.serve",
     "add_arguments", "run"),
    ("attach", "swap on a netswap export (nbd-client + swapon)", "netswap.client.nbd.attach",
     "add_attach_arguments", "run_attach"),
    ("detach", "undo `netswap attach`", "netswap.client.nbd.attach", "add_detach_arguments",
     "run_detach"),
    ("restart", "replace nbdkit and the agent under the swapping kernel (an upgrade)",
     "netswap.client.nbd.attach", "add_restart_arguments", "run_restart"),
    ("adopt", "a new supervisor for an attached device whose supervisor died",
     "netswap.client.nbd.adopt", "add_arguments", "run"),
    ("stats", "live figures from a store or `serve --http` endpoint", "netswap.client.statscmd",
     "add_arguments", "run"),
]  # fmt: skip
# Expected failures: one line on stderr and exit status 2, never a traceback. A module adds
# its own as USER_ERRORS (AttachError, StatsError).
USER_ERRORS: tuple[type[Exception], ...] = (UsageError, ValueError)
# Subcommands installed by packages above this one (the labs: netswap.lab.cli).
SUBCOMMANDS = "netswap.subcommands"


def chosen(argv: Sequence[str]) -> str | None:
    """The subcommand named on the command line: the first word that is not an option."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """Every subcommand's parser, or (only=NAME, one of ours) just that one's arguments."""
    parser = argparse.ArgumentParser(prog="netswap", description="Swap over network storage.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    ours = only in {row[0] for row in COMMANDS}
    for name, text, module_name, add_name, run_name in COMMANDS:
        command = sub.add_parser(name, help=text)
        if not ours or name == only:
            module = importlib.import_module(module_name)
            getattr(module, add_name)(command)
            command.set_defaults(run=getattr(module, run_name),
                                 errors=getattr(module, "USER_ERRORS", ()))  # fmt: skip
    if not ours:
        from importlib.metadata import entry_points

        for entry in entry_points(group=SUBCOMMANDS):
            entry.load()(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if chosen(argv) in ("restart", "adopt"):  # run on a host that swaps hard: what it loads stays
        lock_all(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT)
    parser = build_parser(chosen(argv))
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    expected: tuple[type[Exception], ...] = USER_ERRORS + getattr(args, "errors", ())
    try:
        status: int = args.run(args)
    except expected as exc:
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
