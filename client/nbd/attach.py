"""`netswap attach` / `detach` / `restart`: put swap on a netswap export, and take it off.

attach: check root and kernel support (modprobe nbd), refuse a busy device,
raise vm.min_free_kbytes to a floor, and start the supervisor (netswap.client.supervise),
which starts nbdkit with the agent (unless a server already answers: then it
only watches the link), connects the device through netlink with a
dead-connection timeout, and stays to restart nbdkit when it dies; then
mkswap, swapon. detach undoes exactly what attach recorded in its state file,
in reverse; restart asks the supervisor to replace nbdkit under the swapping
kernel (an upgrade). `--no-supervisor` is the plain way instead: nbd-client,
whose netlink mode has no dead-connection timeout, so a dying server fails
every request at once -- what `--print-plan` prints, and what a user who runs
nbd-client by hand gets.

Netlink, either way: the kernel owns the socket -- nbd.ko marks it
SOCK_MEMALLOC and sends with __GFP_MEMALLOC -- and no client process stays in
the I/O path; in the older ioctl mode a resident nbd-client (which `-swap`
merely mlocks) must survive every memory crunch. The remaining userspace hops
are nbdkit, which `netswap serve` mlocks, exempts from reclaim recursion
(PR_SET_IO_FLUSHER) and from the OOM killer, and the supervisor, which holds
itself to the same rules.

Private (#30): the export attach starts is a Unix socket in /run/netswap, a
directory only root reaches (private.py), as are its files and its logs' directory;
attach never hands the kernel a server that merely answers somewhere (a user could
have started it), only the one its supervisor started, checked by SO_PEERCRED, or
the one named with --no-serve --server.

vm.min_free_kbytes floor: swapping over nbd needs atomic reserves for the
network send path; a stock 6.1 kernel in a 128 MiB guest deadlocked in 4 of 12
runs at its default and in 0 of 14 at 16384 KiB, so attach raises it to at
least 16384 (never lowers it) and detach restores the old value.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from netswap.server.units import UsageError, parse_hostport

from .. import supervise
from ..agent.keys import KeyringError, drop_key
from .private import private_dir, tcp_exposure

MIN_FREE_KBYTES_FLOOR = 16384
# The kernel holds a dead connection's IO this long for a new one (NBD_ATTR_DEAD_CONN_
# TIMEOUT): long enough for a restart that rebuilds the area (seconds), an upgrade, or a
# store that takes a while to answer; the value userspace block servers commonly use.
DEAD_CONN_TIMEOUT_S = 120
# How long serve may take to answer: nbdkit, the plugin and the agent's first connection
# to each store, then the spare's start. About 3 s each on this machine; a starved host or
# a TCG guest is slower.
SERVE_START_S = 120
# How long detach waits for the supervisor to drop its spare: it stops it within twice
# its 10 s grace (supervise/child.py: SIGTERM, then SIGKILL).
SPARE_DROP_S = 25
STATE_DIR = Path(os.environ.get("NETSWAP_STATE_DIR", "/run/netswap"))
# Logs on disk where there is one; on a diskless host /var/log is tmpfs like /run, whose
# pages swap out, and appending to a log page swapped out to the device a dead agent
# served waits on that device: the supervisor never writes them on its takeover's path
# (supervise/logs.py).
LOG_DIR = Path(os.environ.get("NETSWAP_LOG_DIR", "/var/log/netswap"))
SYSCTL = Path("/proc/sys/vm/min_free_kbytes")
# The least RAM (MemTotal) that holds a spare: ~57 MiB locked (nbd/standby.py's cushion
# included) beside the nbdkit serving (~50 MiB) and the supervisor (16 MiB), with the
# kernel's own (~20 MiB of slab here) and the 16 MiB min_free_kbytes floor, and room for
# the host's work. Measured: a 256 MiB guest (MemTotal 205 MiB) holds one through the
# drill; a 224 MiB guest (MemTotal 173 MiB) OOM-killed attach while its spare loaded,
# with 124 MiB unevictable and free memory at the min watermark.
SPARE_MIN_MEMTOTAL_KIB = 192 * 1024
WATERMARK_SCALE = Path("/proc/sys/vm/watermark_scale_factor")


class AttachError(Exception):
    """A precondition failed; nothing was changed (or what was, was undone)."""


# What `netswap` prints as one line (cli.py).
USER_ERRORS = (AttachError,)


@dataclass
class AttachState:
    device: str
    serve_pid: int = 0
    supervisor_pid: int = 0
    old_min_free_kbytes: int = 0
    new_min_free_kbytes: int = 0
    old_watermark_scale: int = 0
    new_watermark_scale: int = 0
    area: str = ""  # the area of the server attach started: detach drops its key
    steps: list[str] = field(default_factory=list)


def add_attach_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="/dev/nbd0")
    parser.add_argument(
        "--server",
        metavar="unix:PATH|HOST:PORT",
        help="with --no-serve: the export of a server already running (e.g. netswap-agent."
        "service's); without it attach starts its own, on a socket only root reaches",
    )
    parser.add_argument("--export", default="swap")
    parser.add_argument("--priority", type=int, help="swapon priority (-p)")
    parser.add_argument("--discard", action="store_true", help="swapon --discard")
    parser.add_argument(
        "--min-free-kbytes",
        type=int,
        default=MIN_FREE_KBYTES_FLOOR,
        help=f"floor for vm.min_free_kbytes (default {MIN_FREE_KBYTES_FLOOR})",
    )
    parser.add_argument(
        "--watermark-scale-factor",
        type=int,
        default=0,
        help="floor for vm.watermark_scale_factor (default: leave it)",
    )
    parser.add_argument(
        "--no-serve", action="store_true", help="do not start `netswap serve` when nothing answers"
    )
    parser.add_argument(
        "--dead-conn-timeout",
        type=int,
        default=DEAD_CONN_TIMEOUT_S,
        metavar="S",
        help=f"the kernel holds IO this long for a restarted agent (default {DEAD_CONN_TIMEOUT_S})",
    )
    parser.add_argument(
        "--io-timeout",
        type=int,
        default=0,
        metavar="S",
        help="the kernel's per-request timeout (default 0: never abort; the supervisor's "
        "reconnect decides); if set, at least --dead-conn-timeout, or it fails the IO the "
        "kernel holds for a restart (ceph-csi #2394)",
    )
    parser.add_argument(
        "--no-standby",
        action="store_true",
        help="no spare nbdkit locked in advance (saves ~45 MiB; a restart is then a cold "
        "start, which a host that swaps hard may not have the memory for)",
    )
    parser.add_argument(
        "--no-supervisor",
        action="store_true",
        help="plain nbd-client instead: no restart, a dead server fails swap's IO at once",
    )
    parser.add_argument(
        "--print-plan",
        action="store_true",
        help="print the shell commands attach would run, change nothing",
    )
    parser.add_argument(
        "serve_args",
        nargs=argparse.REMAINDER,
        help="after --: arguments for `netswap serve` (e.g. --backend remote ...)",
    )


def add_detach_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="/dev/nbd0")


def add_restart_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="/dev/nbd0")
    parser.add_argument("--timeout", type=float, default=180, metavar="S",
                        help="how long to wait for the new agent to serve")  # fmt: skip


def nbd_client_command(server: str, device: str, export: str) -> list[str]:
    """nbd-client for unix:PATH (its -unix flag takes the path as the host) or HOST:PORT."""
    if server.startswith("unix:"):
        where = ["-unix", server.removeprefix("unix:")]
    else:
        host, port = parse_hostport(server, 10809)
        where = [host, str(port)]
    return ["nbd-client", *where, device, "-N", export, "-b", "4096"]


def swapon_command(device: str, priority: int | None, discard: bool) -> list[str]:
    cmd = ["swapon"]
    if priority is not None:
        cmd += ["-p", str(priority)]
    if discard:
        cmd.append("--discard")
    return [*cmd, device]


def plan(args: argparse.Namespace, server: str | None) -> list[list[str]]:
    """The commands attach runs, in order (also what the VM lab's guest runs): with a
    server of its own (server None), `netswap serve` on a root-only socket first (a
    command ending in "&" goes to the background)."""
    steps = [["modprobe", "nbd"], ["sysctl", "-w", f"vm.min_free_kbytes={args.min_free_kbytes}"]]
    if server is None:
        path = serve_socket(args.device)
        steps += [["mkdir", "-p", "-m", "0700", str(path.parent)],
                  ["netswap", "serve", "--unix", str(path), "--no-exit-with-parent",
                   *serve_arguments(getattr(args, "serve_args", [])), "&"]]  # fmt: skip
        server = f"unix:{path}"
    return [*steps, nbd_client_command(server, args.device, args.export), ["mkswap", args.device],
            swapon_command(args.device, args.priority, args.discard)]  # fmt: skip


def serve_socket(device: str, which: int = 1) -> Path:
    """The Unix socket of the nbdkit attach starts (which=1) and of its spare (2): the
    two alternate, in a directory only root reaches."""
    return STATE_DIR / f"{Path(device).name}-{which}.sock"


def serve_arguments(serve_args: list[str]) -> list[str]:
    return serve_args[1:] if serve_args[:1] == ["--"] else serve_args


def state_path(device: str) -> Path:
    return STATE_DIR / f"attach-{Path(device).name}.json"


def run_attach(args: argparse.Namespace) -> int:
    server = check_server(args)
    if args.print_plan:
        for cmd in plan(args, server):
            background = cmd[-1:] == ["&"]
            print(shlex.join(cmd[:-1] if background else cmd) + (" &" if background else ""))
        return 0
    require_root()
    os.umask(0o077)  # what attach and its children make is root's alone
    require_nbd(args.device)
    if not (args.no_standby or args.no_supervisor or args.no_serve) and not spare_fits():
        args.no_standby = True
    if not args.no_supervisor:
        check_supervisable(args)
        if args.io_timeout and args.io_timeout < args.dead_conn_timeout:
            raise AttachError(f"--io-timeout {args.io_timeout} would fail the IO the kernel "
                              f"holds for a restart before --dead-conn-timeout "
                              f"{args.dead_conn_timeout} ends: 0, or at least that")  # fmt: skip
    state = AttachState(args.device)
    try:
        state.old_min_free_kbytes, state.new_min_free_kbytes = raise_floor(
            SYSCTL, args.min_free_kbytes
        )
        state.old_watermark_scale, state.new_watermark_scale = raise_floor(
            WATERMARK_SCALE, args.watermark_scale_factor
        )
        private_dirs()
        if args.no_supervisor:
            if server is None:
                path = serve_socket(args.device)
                state.area = area_of(serve_command(path, args.serve_args))
                state.serve_pid = start_serve(path, args.serve_args, serve_log(args.device))
                server = f"unix:{path}"
            elif not answers(server):
                raise AttachError(f"nothing answers on {server} (--no-serve)")
            run(nbd_client_command(server, args.device, args.export))
            state.steps.append("nbd-client")
        else:
            state.supervisor_pid, state.area = start_supervisor(args, server)
            state.steps.append("supervisor")
        run(["mkswap", args.device])
        run(swapon_command(args.device, args.priority, args.discard))
        state.steps.append("swapon")
        if state.supervisor_pid and state.area and not args.no_standby:
            wait_for_spare(args.device)
    except BaseException:
        try:
            undo(state)
        except AttachError:  # still swap: what attach did stays, for detach to undo
            save_state(state)
            raise
        raise
    save_state(state)
    print(f"netswap: {args.device} is swap on {server or 'a root-only socket'}, export "
          f"{args.export}")  # fmt: skip
    return 0


def save_state(state: AttachState) -> None:
    private_dirs()
    state_path(state.device).write_text(json.dumps(asdict(state)))


def spare_fits(meminfo: Path = Path("/proc/meminfo")) -> bool:
    """Whether this host's RAM holds a spare nbdkit beside the one serving; says why not."""
    total = next((int(line.split()[1]) for line in meminfo.read_text().splitlines()
                  if line.startswith("MemTotal:")), 0)  # fmt: skip
    if total >= SPARE_MIN_MEMTOTAL_KIB:
        return True
    print(f"netswap: no spare nbdkit: {total // 1024} MiB of RAM cannot hold one (~57 MiB "
          f"locked) beside the nbdkit serving and the supervisor (it takes "
          f"{SPARE_MIN_MEMTOTAL_KIB // 1024} MiB): a restart is a cold start (--no-standby)",
          file=sys.stderr)  # fmt: skip
    return False


def check_server(args: argparse.Namespace) -> str | None:
    """The server attach connects to: --server with --no-serve (unix:PATH or HOST:PORT,
    a TCP one said to be open to every local user), else None: its own, private."""
    if args.server is None:
        if args.no_serve:
            raise AttachError("--no-serve needs --server unix:PATH or HOST:PORT")
        return None
    if not args.no_serve:
        raise AttachError("--server names a server already running: give --no-serve too "
                          "(without it attach starts its own, on a socket only root "
                          "reaches)")  # fmt: skip
    server: str = args.server
    if server.startswith("/"):
        server = f"unix:{server}"
    if not server.startswith("unix:"):
        try:
            host, port = parse_hostport(server, 10809)
        except UsageError as exc:
            raise AttachError(str(exc)) from None
        if not args.print_plan:
            print(f"netswap: warning: {tcp_exposure(host, port)}; and who answers on TCP "
                  "cannot be checked", file=sys.stderr)  # fmt: skip
        server = f"{host}:{port}"
    return server


def private_dirs() -> None:
    """attach's directories, root's alone (private.py)."""
    try:
        private_dir(STATE_DIR)
        private_dir(LOG_DIR)
    except UsageError as exc:
        raise AttachError(str(exc)) from None


def check_supervisable(args: argparse.Namespace) -> None:
    """Write-back acknowledges pages still only in the agent's reserve: they would die
    with it, so an agent that may die and come back serves write-through."""
    serve = args.serve_args
    if "writeback" in serve and any(a.startswith("--cache") for a in serve):
        raise AttachError("--cache writeback under the supervisor would lose the pages an "
                          "agent that dies had acknowledged from its reserve: use "
                          "write-through (the default), or --no-supervisor")  # fmt: skip


def supervisor_state(device: str) -> Path:
    return STATE_DIR / f"supervise-{Path(device).name}.json"


def supervisor_log(device: str) -> Path:
    return LOG_DIR / f"supervise-{Path(device).name}.log"


def supervisor_options_path(device: str) -> Path:
    return STATE_DIR / f"supervise-{Path(device).name}.args.json"


def spawn_supervisor(options: list[str], device: str) -> subprocess.Popen[bytes]:
    """The supervisor, detached (a session of its own), logging to its log file."""
    with open(supervisor_log(device), "ab") as out:
        return subprocess.Popen([*supervisor_argv(), *options], start_new_session=True,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=out, cwd="/",
                                env=supervisor_env())  # fmt: skip


def supervisor_argv() -> list[str]:
    """The lean way to run the supervisor (supervise/__init__.py): no site, the package
    found as a top-level one beside its siblings, after the stdlib."""
    parent = str(Path(supervise.__file__).resolve().parent.parent)
    boot = (f"import sys; sys.path.append({parent!r}); "
            "from supervise.supervisor import main; sys.exit(main())")  # fmt: skip
    return [sys.executable, "-S", "-c", boot]


def supervisor_env() -> dict[str, str]:
    """libc's malloc for its small footprint (nbdkit does not inherit it); nothing from
    the operator's environment that would change what it imports."""
    drop = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONMALLOC")
    return {**{k: v for k, v in os.environ.items() if k not in drop}, "PYTHONMALLOC": "malloc"}


def supervisor_options(args: argparse.Namespace, server: str,
                       command: Path | None) -> list[str]:  # fmt: skip
    """The supervisor's command line (supervise/options.py reads it); with `command` (serve's
    nbdkit argv) it starts and restarts nbdkit itself on `server` (unix:PATH), without it
    it only watches the link to `server`."""
    device = args.device
    opts = ["--device", device, "--server", server, "--export", args.export,
            "--dead-conn-timeout", str(args.dead_conn_timeout),
            "--io-timeout", str(args.io_timeout), "--state", str(supervisor_state(device)),
            "--serve-log", str(serve_log(device))]  # fmt: skip
    if command is not None:
        opts += ["--command", str(command)]
        if not args.no_standby:  # the spare listens on the other socket; the two alternate
            opts += ["--standby-socket", str(serve_socket(device, 2)), "--spare-after-swapon"]
    return opts


def start_supervisor(args: argparse.Namespace, server: str | None) -> tuple[int, str]:
    """Start the supervisor, detached; return once the device is connected (its pid, and
    the area of the server it started, if it did). `server` None: it starts nbdkit on
    attach's private socket; else it watches that server, which must answer now."""
    device = args.device
    command: Path | None = None
    area = ""
    if server is None:
        path = serve_socket(device)
        command = STATE_DIR / f"serve-{Path(device).name}.json"
        command.write_text(serve_command(path, args.serve_args))
        area = area_of(command.read_text())
        server = f"unix:{path}"
    elif not answers(server):
        raise AttachError(f"nothing answers on {server} (--no-serve)")
    options = supervisor_options(args, server, command)
    # Kept for `netswap adopt` (adopt.py): a supervisor that dies is replaced by one
    # started with the same options.
    supervisor_options_path(device).write_text(json.dumps(options))
    proc = spawn_supervisor(options, device)
    log = supervisor_log(device)
    connected = Path("/sys/block") / Path(device).name / "pid"
    deadline = time.monotonic() + SERVE_START_S
    while not connected.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_process(proc.pid)
            raise AttachError(f"the supervisor did not connect {device}{last_line(log)} "
                              f"(log {log})")  # fmt: skip
        time.sleep(0.2)
    return proc.pid, area


def wait_for_spare(device: str) -> None:
    """Return once the supervisor's spare is ready: until then a death of nbdkit under a
    storm would be a cold start (supervise/spare.py)."""
    path = supervisor_state(device)
    deadline = time.monotonic() + SERVE_START_S
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            if json.loads(path.read_text()).get("standby") == "ready":
                return
        time.sleep(0.2)
    print(f"netswap: warning: the supervisor's spare nbdkit is not ready after "
          f"{SERVE_START_S}s (log {supervisor_log(device)}): until it is, a restart is a "
          "cold start", file=sys.stderr)  # fmt: skip


def area_of(command: str) -> str:
    """The area= of serve's nbdkit command line (serve --print-command's JSON)."""
    argv = json.loads(command)["argv"]
    return next((a.partition("=")[2] for a in argv if a.startswith("area=")), "")


def serve_command(path: Path, serve_args: list[str]) -> str:
    """nbdkit's argv and environment, on the Unix socket `path`, from `netswap serve
    --print-command` (JSON)."""
    cmd = [sys.executable, "-m", "netswap.client.cli", "serve", "--unix", str(path),
           "--no-exit-with-parent", *serve_arguments(serve_args), "--print-command"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or [f"exit status {done.returncode}"]
        raise AttachError(lines[-1].removeprefix("netswap serve: error: "))
    return done.stdout


def run_detach(args: argparse.Namespace) -> int:
    require_root()
    path = state_path(args.device)
    if not path.exists():
        raise AttachError(f"{args.device} was not attached by netswap ({path} is missing)")
    state = AttachState(**json.loads(path.read_text()))
    if state.supervisor_pid and not running_supervisor(state.supervisor_pid):
        # Only the supervisor disconnects the device and stops its nbdkit; swapoff
        # without them would leave both, and its pid may be another process's now.
        raise AttachError(f"the supervisor of {args.device} (pid {state.supervisor_pid}) is "
                          "gone: `netswap adopt` starts a new one, then detach")  # fmt: skip
    undo(state)
    path.unlink()
    print(f"netswap: {args.device} detached")
    return 0


def run_restart(args: argparse.Namespace) -> int:
    """Replace nbdkit and the agent under the swapping kernel (the installed version)."""
    require_root()
    path = supervisor_state(args.device)
    try:
        before = json.loads(path.read_text())
    except (OSError, ValueError):
        raise AttachError(f"no supervisor watches {args.device} ({path}: netswap attach "
                          "without --no-supervisor starts one)") from None  # fmt: skip
    try:
        os.kill(int(before["supervisor_pid"]), signal.SIGHUP)
    except ProcessLookupError:
        raise AttachError(f"the supervisor of {args.device} (pid {before['supervisor_pid']}) "
                          "is gone: `netswap adopt` starts a new one") from None  # fmt: skip
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        time.sleep(0.2)
        with contextlib.suppress(OSError, ValueError):
            now = json.loads(path.read_text())
            if now.get("restarts", 0) > before.get("restarts", 0):
                print(f"netswap: {args.device} served again after {now['last_outage_s']:.2f}s "
                      f"(restart {now['restarts']}, epoch {now['epoch']})")  # fmt: skip
                return 0
    raise AttachError(f"the agent did not serve again within {args.timeout:.0f}s "
                      f"(log {supervisor_log(args.device)})")  # fmt: skip


def undo(state: AttachState) -> None:
    """Reverse what attach did, newest first; keep going past failures, bar a swapoff's:
    a device that is still swap stays attached and served (swapoff raises)."""
    if "swapon" in state.steps and is_active_swap(state.device):
        spare = running_supervisor(state.supervisor_pid) and drop_spare(state)
        try:
            swapoff(state.device)
        except AttachError:
            if spare:  # the device stays: so does its protection against a slow takeover
                os.kill(state.supervisor_pid, signal.SIGUSR2)
            raise
    if "nbd-client" in state.steps:
        run(["nbd-client", "-d", state.device], check=False)
    if state.supervisor_pid:  # it disconnects the device and stops its nbdkit
        stop_process(state.supervisor_pid, grace_s=30)
        supervisor_options_path(state.device).unlink(missing_ok=True)
    if state.serve_pid:
        stop_process(state.serve_pid)
    if state.area:  # nothing serves the area any more: its key goes (keys.py)
        try:
            drop_key(state.area)
        except KeyringError as exc:
            print(f"netswap: the key of area {state.area} stays in the keyring: {exc}",
                  file=sys.stderr)  # fmt: skip
    restore(SYSCTL, state.old_min_free_kbytes, state.new_min_free_kbytes)
    restore(WATERMARK_SCALE, state.old_watermark_scale, state.new_watermark_scale)


def drop_spare(state: AttachState) -> bool:
    """Ask the supervisor to stop its spare nbdkit and start none (SIGUSR1), and wait
    until it has: the spare holds ~60 MiB locked (nbdkit, the agent, its heap cushion)
    that swapoff needs. Seen in the lab's 256 MiB guest after its storm: with the spare,
    143 MiB locked left swapoff 14 MiB short, and the OOM killer took swapoff. True if
    a spare was there to drop."""
    path = supervisor_state(state.device)
    try:
        before = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    # "spares": a supervisor that knows SIGUSR1 (to an older one it is a kill -- no spare).
    if "spares" not in before or before.get("standby") in (None, "none"):
        return False
    os.kill(state.supervisor_pid, signal.SIGUSR1)
    deadline = time.monotonic() + SPARE_DROP_S
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            if json.loads(path.read_text()).get("standby") == "none":
                break
        time.sleep(0.1)
    return True


def swapoff(device: str) -> None:
    """Take the device off swap, or raise AttachError and leave everything serving it.
    swapoff reads every page still swapped there back into RAM first, and fails when
    RAM cannot hold them (ENOMEM; or the OOM killer takes swapoff itself, the first it
    picks while swapoff runs). A device torn down then fails the reads of those pages:
    their processes die of SIGBUS (seen in the lab: the guest's init, so a panic)."""
    try:
        done = subprocess.run(["swapoff", device], capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise AttachError("swapoff is not installed (apt-get install util-linux)") from None
    if is_active_swap(device):
        lines = (done.stderr or done.stdout).strip().splitlines()
        why = lines[-1] if lines else f"exit status {done.returncode}"
        raise AttachError(f"swapoff {device} failed ({why}): it stays swap, attached and "
                          "served; free memory, then detach again")  # fmt: skip


def running_supervisor(pid: object) -> bool:
    """Whether `pid` is a live netswap supervisor (not a process that reused its pid)."""
    if not isinstance(pid, int):
        return False
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(b"supervise.supervisor" in arg for arg in argv)


def require_root() -> None:
    if os.geteuid() != 0:
        raise AttachError("attach/detach change the kernel's swap: run as root")


def require_nbd(device: str) -> None:
    name = Path(device).name
    sys_dir = Path("/sys/block") / name
    if not sys_dir.exists():
        try:
            result = subprocess.run(["modprobe", "nbd"], capture_output=True, text=True)
        except FileNotFoundError:
            raise AttachError(
                "no nbd device and no modprobe to load nbd (apt-get install kmod)"
            ) from None
        if result.returncode != 0 or not sys_dir.exists():
            why = (result.stderr.strip().splitlines() or ["no nbd driver"])[-1]
            raise AttachError(f"this kernel has no nbd support (modprobe nbd: {why})")
    pid = sys_dir / "pid"
    if pid.exists() or is_active_swap(device):
        raise AttachError(f"{device} is busy (already connected or in use as swap)")


def is_active_swap(device: str) -> bool:
    try:
        lines = Path("/proc/swaps").read_text().splitlines()[1:]
    except OSError:
        return False
    return any(line.split()[0] == device for line in lines if line.split())


def answers(server: str) -> bool:
    """Whether something accepts a connection on `server` (unix:PATH or HOST:PORT)."""
    try:
        if server.startswith("unix:"):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(1)
                sock.connect(server.removeprefix("unix:"))
            return True
        with socket.create_connection(parse_hostport(server, 10809), timeout=1):
            return True
    except (OSError, UsageError):
        return False


def serve_log(device: str) -> Path:
    return LOG_DIR / f"serve-{Path(device).name}.log"


def start_serve(path: Path, serve_args: list[str], log: Path) -> int:
    """Start `netswap serve` for good on the Unix socket `path`; its output goes to `log`,
    never to our pipes (a caller capturing attach's output would otherwise wait on it
    forever)."""
    extra = serve_arguments(serve_args)
    cmd = [
        sys.executable,
        "-m",
        "netswap.client.cli",
        "serve",
        "--unix",
        str(path),
        # The server must outlive this command: serve stays nbdkit's parent (and
        # passes on SIGTERM from detach) instead of exec'ing into an nbdkit that
        # --exit-with-parent would stop the moment attach returns.
        "--no-exit-with-parent",
        # SCHED_FIFO: the agent's socket buffers may come from below the min watermark
        # (affinity.py says why); without it a starved host deadlocked at its first
        # swap-out in every run (`netswap lab vm --host-in-guest --configs no-fifo`).
        # An explicit --sched among the serve arguments wins (argparse: last one).
        "--sched",
        "fifo",
        *extra,
    ]
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, start_new_session=True, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=out)  # fmt: skip
    deadline = time.monotonic() + SERVE_START_S
    while not answers(f"unix:{path}"):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_process(proc.pid)
            raise AttachError(f"`netswap serve` did not come up on unix:{path}"
                              f"{last_line(log)} (log {log})")  # fmt: skip
        time.sleep(0.2)
    return proc.pid


def last_line(log: Path) -> str:
    """The log's last line as ': LINE', for an error that names the log ('' if none).
    Only a regular file: a log that is the console (the lab guest's) would block this
    read until someone typed a line -- the stall of a 192 MiB guest."""
    text = log.read_text(errors="replace") if log.is_file() else ""
    lines = text.strip().splitlines()
    return f": {lines[-1]}" if lines else ""


def stop_process(pid: int, grace_s: float = 5.0) -> None:
    try:
        os.kill(pid, 15)
    except ProcessLookupError:
        return
    for _ in range(int(grace_s * 10)):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)


def raise_floor(sysctl: Path, floor: int) -> tuple[int, int]:
    """Raise a vm sysctl to at least `floor`, never lower it: (old value, value set or 0)."""
    current = int(sysctl.read_text())
    if current >= floor:
        return current, 0
    try:
        sysctl.write_text(f"{floor}\n")
    except OSError as exc:
        raise AttachError(f"cannot raise vm.{sysctl.name} to {floor}: {exc.strerror}") from None
    return current, floor


def restore(sysctl: Path, old: int, new: int) -> None:
    """Put back what raise_floor changed, unless someone changed it since."""
    if new and int(sysctl.read_text()) == new:
        sysctl.write_text(f"{old}\n")


def run(cmd: list[str], check: bool = True) -> None:
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise AttachError(f"{cmd[0]} is not installed") from None
    if check and result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise AttachError(
            f"{shlex.join(cmd)} failed: {detail[-1] if detail else result.returncode}"
        )
