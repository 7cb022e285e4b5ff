"""The supervisor's command line, as attach writes it (attach.start_supervisor).

Parsed by hand, as --name value pairs and two flags: argparse checks each option
through its help formatter, which imports shutil, bz2 and lzma (2 MiB of the
supervisor's 16).
"""

from __future__ import annotations


def host_port(server: str) -> tuple[str, int]:
    """HOST:PORT (PORT 10809 when absent; [v6]:PORT), without netswap's own parser."""
    host, sep, port = server.rpartition(":")
    if not sep or "]" in port:
        host, port = server, "10809"
    return host.strip("[]"), int(port)


class Options:
    """What attach passes; the defaults are attach's."""

    __slots__ = ("adopt", "command", "dead_conn_timeout", "device", "export", "footprint",
                 "io_timeout", "serve_log", "server", "standby_port", "state")  # fmt: skip

    def __init__(self) -> None:
        self.device = self.server = self.state = self.serve_log = self.command = ""
        self.export = "swap"
        self.dead_conn_timeout, self.io_timeout = 120, 0
        self.standby_port = 0  # the spare's port; 0: no spare
        self.adopt = self.footprint = False  # --adopt: watch the nbdkit already running


FLAGS = ("adopt", "footprint")
NUMBERS = ("dead_conn_timeout", "io_timeout", "standby_port")
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
