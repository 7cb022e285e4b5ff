"""`netswap lab ...`: the labs' subcommands, found by the CLI through an entry point.

The host's package (netswap.client) never imports the labs, which sit above it:
pyproject.toml names `register` under the `netswap.subcommands` entry point, and
the `netswap` command calls it to add `lab` and its subcommands. A lab's
expected failures become UsageError: one line, never a traceback.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from netswap.client.statscmd import StatsError
from netswap.server.units import UsageError

from . import compose as labcompose
from . import procs as labprocs
from . import vm as labvm
from .qemu import LabError

Register = Callable[[argparse.ArgumentParser], None] | None
Run = Callable[[argparse.Namespace], int]

LABS: list[tuple[str, str, Register, Run]] = [
    ("vm", "a QEMU guest attaches netswap as swap and verifies it", labvm.add_arguments,
     labvm.run),
    ("up", "the compose topology as local processes, with a workload",
     labprocs.add_up_arguments, labprocs.run_up),
    ("load", "verified random-page load on an export", labprocs.add_load_arguments,
     labprocs.run_load),
    ("down", "stop exactly what `lab up` started", None, labprocs.run_down),
    ("compose", "the compose lab on podman, offline: up, proofs, down", labcompose.add_arguments,
     labcompose.run),
]  # fmt: skip
# StatsError: `lab load` reads the export's ops endpoint, which may not answer (yet).
LAB_ERRORS = (LabError, labprocs.LabStateError, StatsError)


def _expected(run: Run) -> Run:
    def wrapped(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except LAB_ERRORS as exc:
            raise UsageError(str(exc)) from None

    return wrapped


def register(sub: Any) -> None:
    """Add `lab` and its subcommands to the `netswap` command's subparsers."""
    lab = sub.add_parser("lab", help="labs: `lab vm` swaps a real kernel through netswap")
    labs = lab.add_subparsers(dest="lab", required=True, metavar="LAB")
    for name, text, add_arguments, run in LABS:
        parser = labs.add_parser(name, help=text)
        if add_arguments is not None:
            add_arguments(parser)
        parser.set_defaults(run=_expected(run))
