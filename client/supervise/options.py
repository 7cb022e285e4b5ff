"""The supervisor's command line, as attach writes it (attach.start_supervisor).

Parsed by hand, as --name value pairs and two flags: argparse checks each option
through its help formatter, which imports shutil, bz2 and lzma (2 MiB of the
supervisor's 16).
"""

from __future__ import annotations


class Options:
    """What attach passes; the defaults are attach's."""

    __slots__ = ("adopt", "command", "dead_conn_timeout", "device", "export", "footprint",
                 "io_timeout", "serve_log", "server", "spare_after_swapon", "standby_socket",
                 "state")  # fmt: skip

    def __init__(self) -> None:
        # server: unix:PATH where the nbdkit it starts serves (--command), or the server
        # it only watches (attach --no-serve: unix:PATH or HOST:PORT).
        self.device = self.server = self.state = self.serve_log = self.command = ""
        self.export = "swap"
        self.dead_conn_timeout, self.io_timeout = 120, 0
        self.standby_socket = ""  # the spare's socket path; "": no spare
        self.adopt = self.footprint = False  # --adopt: watch the nbdkit already running
        # --spare-after-swapon (attach's): the spare loads once the device is swap, when
        # the host can make room for it by swapping others out (a 224 MiB host cannot
        # hold nbdkit, the spare and the supervisor, all locked, before).
        self.spare_after_swapon = False


FLAGS = ("adopt", "footprint", "spare_after_swapon")
NUMBERS = ("dead_conn_timeout", "io_timeout")
REQUIRED = ("device", "server", "state", "serve_log")


def parse_args(argv: list[str]) -> Options:
    """--name value pairs and the two flags; anything else is a UsageError."""
    opts = Options()
    given = iter(argv)
    for arg in given:
        name = arg[2:].replace("-", "_")
        if not arg.startswith("--") or name not in Options.__slots__:
            raise UsageError(f"unknown option {arg!r}")
        if name in FLAGS:
            setattr(opts, name, True)
            continue
        value = next(given, None)
        if value is None:
            raise UsageError(f"{arg} needs a value")
        try:
            setattr(opts, name, int(value) if name in NUMBERS else value)
        except ValueError:
            raise UsageError(f"{arg} takes a number, not {value!r}") from None
    missing = [f"--{n.replace('_', '-')}" for n in REQUIRED if not getattr(opts, n)]
    if missing and not opts.footprint:
        raise UsageError(f"missing {', '.join(missing)}")
    return opts


class UsageError(ValueError):
    pass
