"""`netswap serve`: nbdkit with the netswap plugin, in the foreground.

Checks everything a user could get wrong before nbdkit starts (so errors are
one clear line, not a Python traceback from inside nbdkit), hardens the
process for serving swap, prints the commands that attach the export, then
exec()s nbdkit: the nbdkit process *is* the server, with --exit-with-parent so
it never outlives whoever started it.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
from pathlib import Path

from netswap.server.units import UsageError, is_loopback, parse_hostport

from ..hardening import harden_for_swap
from ..supervise.knobs import Overcommit
from .affinity import SCHED_POLICIES, check_available, parse_cpus_option, set_policy
from .config import ConfigError, PluginConfig, add_serve_options, plugin_params
from .private import check_socket_dir, free_socket_path, tcp_exposure, unix_exposure

DEFAULT_LISTEN = "127.0.0.1:10809"
PLUGIN = Path(__file__).resolve().with_name("nbdkit_plugin.py")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help=f"NBD over TCP (default {DEFAULT_LISTEN}): every local user, and off loopback "
        "every host that reaches it, can read and write the swapped pages",
    )
    where.add_argument(
        "--unix",
        metavar="PATH",
        type=Path,
        help="NBD on a Unix socket only this user may connect to (attach's way)",
    )
    parser.add_argument("--export", default="swap", help="NBD export name (default swap)")
    add_serve_options(parser)
    parser.add_argument(
        "--no-io-flusher",
        action="store_true",
        help="do not apply PR_SET_IO_FLUSHER (for experiments: lab vm's hang campaign)",
    )
    parser.add_argument(
        "--no-exit-with-parent",
        action="store_true",
        help="keep serving after the process that started it exits",
    )
    parser.add_argument("--threads", type=int, help="nbdkit worker threads per connection")
    parser.add_argument(
        "--sched",
        choices=sorted(SCHED_POLICIES),
        default="normal",
        help="scheduling policy; batch: wake-ups do not preempt (use with --cpus of its own)",
    )
    parser.add_argument("--verbose-nbdkit", action="store_true", help="nbdkit -v")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="validate and print the nbdkit command line, do not run it",
    )
    parser.add_argument(
        "--print-command",
        action="store_true",
        help="validate and print nbdkit's argv and environment as JSON (for the supervisor)",
    )


def serve_params(args: argparse.Namespace) -> list[str]:
    """The plugin's key=value pairs; a remote area defaults to this host's name."""
    params = plugin_params(args)
    if args.backend == "remote" and args.area is None:
        params.append(f"area={_default_area()}")
    return params


def _default_area() -> str:
    name = socket.gethostname().split(".")[0] or "host"
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in name)[:64]


def check_nbdkit(overcommit: bool = False) -> str:
    """nbdkit and its Python plugin, installed and able to start. `overcommit`: for the
    supervisor's nbdkit (serve --print-command), which starts it under the overcommit
    it allows while nbdkit starts on a host whose RAM and swap are below nbdkit's .bss
    (knobs.Overcommit); so is this check, as root."""
    nbdkit = shutil.which("nbdkit")
    if nbdkit is None:
        raise UsageError("nbdkit is not installed (apt-get install nbdkit nbdkit-plugin-python)")
    allowed = Overcommit(lambda line: print(f"netswap serve: {line}", file=sys.stderr))
    with allowed.held() if overcommit and os.geteuid() == 0 else contextlib.nullcontext():
        out = subprocess.run([nbdkit, "--dump-config"], capture_output=True, text=True,
                             check=False)  # fmt: skip
    if out.returncode != 0:
        # Seen on a 192 MiB host: nbdkit's 192 MiB .bss fails the kernel's overcommit check.
        why = (out.stderr.strip().splitlines() or [f"exit status {out.returncode}"])[-1]
        raise UsageError(f"nbdkit does not start here ({why}); RAM + swap must exceed "
                         "nbdkit's own 192 MiB .bss unless vm.overcommit_memory=1")  # fmt: skip
    plugindir = next(
        (ln.split("=", 1)[1] for ln in out.stdout.splitlines() if ln.startswith("plugindir=")), ""
    )
    if not Path(plugindir, "nbdkit-python-plugin.so").exists():
        raise UsageError("nbdkit's python plugin is missing (apt-get install nbdkit-plugin-python)")
    return nbdkit


def check_port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise UsageError(f"{host}:{port} is already in use (another nbd server?)") from None
            raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


def nbdkit_command(nbdkit: str, args: argparse.Namespace, host: str, port: int) -> list[str]:
    """nbdkit's argv: on args.unix when set (-U: the supervisor swaps the path), else
    on host:port."""
    where = ["-U", str(args.unix)] if args.unix else ["-i", host, "-p", str(port)]
    cmd = [nbdkit, "-f", *where, "-e", args.export]
    if not args.no_exit_with_parent:
        cmd.append("--exit-with-parent")
    if args.threads:
        cmd += ["-t", str(args.threads)]
    if args.verbose_nbdkit:
        cmd.append("-v")
    return [*cmd, "python", str(PLUGIN), *serve_params(args)]


# The plugin locks its memory as it loads, not only in after_fork (nbdkit_plugin.py).
LOCK_AT_LOAD = "NETSWAP_LOCK_AT_LOAD"


def plugin_env() -> dict[str, str]:
    """nbdkit embeds /usr/bin/python3: point it at this venv's site-packages."""
    site = sysconfig.get_paths()["purelib"]
    env = dict(os.environ)
    env["NETSWAP_SITE"] = os.pathsep.join(filter(None, [site, env.get("NETSWAP_SITE")]))
    return env


def run(args: argparse.Namespace) -> int:
    try:
        host, port = parse_hostport(args.listen or DEFAULT_LISTEN, 10809)
        config = PluginConfig()
        for param in serve_params(args):
            key, _, value = param.partition("=")
            config.set(key, value)
        config.complete()
        cpus = parse_cpus_option(config.cpus)
        if isinstance(cpus, frozenset):
            check_available(cpus)
    except (ValueError, ConfigError) as exc:
        raise UsageError(str(exc)) from None
    if args.unix:
        args.unix = args.unix.absolute()  # nbdkit changes directory as it starts
    nbdkit = check_nbdkit(overcommit=args.print_command)
    cmd = nbdkit_command(nbdkit, args, host, port)
    if args.dry_run:
        print(" ".join(cmd))
        return 0
    if args.print_command:
        env = {"NETSWAP_SITE": plugin_env()["NETSWAP_SITE"]}
        if config.mlock != "off":  # a supervisor's spare loads while the host may swap
            env[LOCK_AT_LOAD] = "1"
        print(json.dumps({"argv": cmd, "env": env}))
        return 0
    if args.unix:
        check_socket_dir(args.unix.parent)
        free_socket_path(args.unix)
        os.umask(0o077)  # nbdkit's socket: mode 0700, its owner's alone
        print(f"netswap serve: {unix_exposure(args.unix)}", file=sys.stderr)
    else:
        check_port_free(host, port)
        print(f"netswap serve: {'' if is_loopback(host) else 'warning: '}"
              f"{tcp_exposure(host, port)}", file=sys.stderr)  # fmt: skip
    for outcome in harden_for_swap(io_flusher=not args.no_io_flusher):
        print(f"netswap serve: {outcome}", file=sys.stderr)
    if args.sched != "normal":
        try:
            print(f"netswap serve: {set_policy(args.sched)}", file=sys.stderr)
        except PermissionError:
            print(f"netswap serve: scheduling policy {args.sched}: NOT applied (needs "
                  "CAP_SYS_NICE or RLIMIT_RTPRIO)", file=sys.stderr)  # fmt: skip
    print_next_steps(args, host, port)
    sys.stdout.flush()
    sys.stderr.flush()
    if args.no_exit_with_parent:
        return supervise(cmd)
    os.execve(nbdkit, cmd, plugin_env())


def supervise(cmd: list[str]) -> int:
    """Run nbdkit as a child and pass on SIGTERM/SIGINT (--no-exit-with-parent).

    Seen here: an nbdkit whose parent exits also exits, even without
    --exit-with-parent, so a server meant to outlive its starter keeps this
    process as nbdkit's parent rather than exec()ing into it.
    """
    child = subprocess.Popen(cmd, env=plugin_env())

    def forward(signum: int, _frame: object) -> None:
        child.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    return child.wait()


def print_next_steps(args: argparse.Namespace, host: str, port: int) -> None:
    where, client = f"nbd://{host}:{port}/{args.export}", f"{host} {port}"
    server = f"{host}:{port}"
    if args.unix:
        where, client, server = f"unix:{args.unix}", f"-unix {args.unix}", f"unix:{args.unix}"
    print(
        f"netswap: serving a {args.size} {args.backend} export {args.export!r} on {where}\n"
        "Attach it as swap, as root on the host that swaps:\n"
        "  modprobe nbd\n"
        f"  nbd-client {client} /dev/nbd0 -N {args.export} -b 4096\n"
        "  mkswap /dev/nbd0\n"
        "  swapon /dev/nbd0\n"
        f"(or all of it: netswap attach --no-serve --server {server} --export {args.export})\n"
        "Detach: swapoff /dev/nbd0 && nbd-client -d /dev/nbd0   (Ctrl-C stops this server)",
        flush=True,
    )
