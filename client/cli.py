"""The `netswap` command: one entry point, one subcommand per job.

Every expected failure (bad option, busy port, missing package, not root)
ends as one line on stderr and a non-zero exit status, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from netswap.server import servecmd, storecmd

from . import attach, labprocs, labvm, statscmd


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="netswap", description="Swap over network storage.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    store = sub.add_parser("store", help="run a page-store server")
    storecmd.add_arguments(store)
    store.set_defaults(run=storecmd.run)
    serve = sub.add_parser("serve", help="export swap over NBD (nbdkit + the netswap plugin)")
    servecmd.add_arguments(serve)
    serve.set_defaults(run=servecmd.run)
    attach_p = sub.add_parser("attach", help="swap on a netswap export (nbd-client + swapon)")
    attach.add_attach_arguments(attach_p)
    attach_p.set_defaults(run=attach.run_attach)
    detach_p = sub.add_parser("detach", help="undo `netswap attach`")
    attach.add_detach_arguments(detach_p)
    detach_p.set_defaults(run=attach.run_detach)
    stats = sub.add_parser("stats", help="live figures from a store or `serve --http` endpoint")
    statscmd.add_arguments(stats)
    stats.set_defaults(run=statscmd.run)
    lab = sub.add_parser("lab", help="labs: `lab vm` swaps a real kernel through netswap")
    lab_sub = lab.add_subparsers(dest="lab", required=True, metavar="LAB")
    vm = lab_sub.add_parser("vm", help="a QEMU guest attaches netswap as swap and verifies it")
    labvm.add_arguments(vm)
    vm.set_defaults(run=labvm.run)
    up = lab_sub.add_parser("up", help="the compose topology as local processes, with a workload")
    labprocs.add_up_arguments(up)
    up.set_defaults(run=labprocs.run_up)
    load = lab_sub.add_parser("load", help="verified random-page load on an export")
    labprocs.add_load_arguments(load)
    load.set_defaults(run=labprocs.run_load)
    down = lab_sub.add_parser("down", help="stop exactly what `lab up` started")
    down.set_defaults(run=labprocs.run_down)
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
    except (
        storecmd.UsageError,
        attach.AttachError,
        labvm.LabError,
        statscmd.StatsError,
        labprocs.LabStateError,
    ) as exc:
        print(f"netswap {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
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
