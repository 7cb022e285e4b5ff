"""The supervisor `netswap attach` leaves behind: the agent dies, swap carries on.

One small process per attached device. It starts nbdkit with the agent,
connects /dev/nbdN to it through netlink with a dead-connection timeout
(netlink.py: the kernel then holds the device's IO while no connection is
alive instead of failing it), and watches. When nbdkit dies -- a crash, kill -9,
an OOM kill -- or the kernel reports the link dead, it starts a new one that
rebuilds the area from the stores (start=rebuild, a higher epoch), does the
NBD handshake itself and hands the kernel the new socket (NBD_CMD_RECONFIGURE).
Requests the kernel had sent to the dead connection go again once their
timer finds the socket replaced (the queue's io_timeout, set to REQUEUE_MS);
requests issued meanwhile waited for the reconnect. SIGHUP (`netswap restart`)
replaces a live nbdkit the same way: an upgrade without draining swap.

It lives inside a host that may be out of memory, so it keeps the swap path's
discipline: everything it will run is imported and touched at start, then
mlockall(MCL_CURRENT | MCL_FUTURE) pins it (about 10 MiB; RESIDENT_BOUND_MIB
is checked at start), it runs under PR_SET_IO_FLUSHER, SCHED_FIFO and
oom_score_adj -1000, and after start it allocates only small Python objects
from its locked heap. nbdkit is started detached from it (a double fork:
nbdkit exits when the process that started it dies, so its parent must be
init from the start), watched through a pidfd, and outlives a supervisor that
dies; a restarted supervisor adopts it from the state file.

Where a new nbdkit's memory comes from while swap is held: the dead one's.
Its locked pages (~45 MiB) are freed at its death; for the length of a
restart the supervisor raises vm.min_free_kbytes by RESTART_RESERVE_KIB, so
that what the dying process freed stays free for ordinary allocations, and the
new nbdkit, real-time like the supervisor, may dip into it. The state file
(JSON, /run/netswap/supervise-nbdN.json) says what happened: restarts, the
last outage (death to serving), the epoch.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from netswap.server.units import parse_hostport

from ..hardening import MCL_CURRENT, MCL_FUTURE, _libc, protect_from_oom, set_io_flusher
from .affinity import set_policy
from .handshake import HandshakeError
from .handshake import connect as nbd_connect
from .netlink import NBD_CMD_LINK_DEAD, Netlink, NetlinkError, device_index

# How long a new nbdkit may take to answer: Python, the plugin, the agent's rebuild
# (REBUILD_WAIT_S for stores, then ~1 s of inventory per GiB). Beyond it, and beyond the
# kernel's dead-connection timeout, the device's held IO fails: the log says why.
START_S = 90.0
POLL_S = 0.1
# The queue's request timer while the kernel's own IO timeout is 0 (never abort): how
# often a request sent to a connection that died looks whether the socket was replaced
# and goes again. 2 s keeps a restart's stall short without a "possible stuck request"
# log line per second for requests that are merely slow.
REQUEUE_MS = 2000
# What the supervisor holds locked: Python and the modules it runs, a few MiB of heap.
RESIDENT_BOUND_MIB = 16
# vm.min_free_kbytes is raised by this much while a new nbdkit starts under held swap:
# about what the dead one held locked, kept free for the new one.
RESTART_RESERVE_KIB = 48 * 1024
MIN_FREE = Path("/proc/sys/vm/min_free_kbytes")
OVERCOMMIT = Path("/proc/sys/vm/overcommit_memory")
# nbdkit 1.32's own .bss is 192 MiB: under the heuristic overcommit check a host whose
# RAM + swap is below this cannot start it, untouched as those pages stay.
NBDKIT_BSS_KIB = 192 * 1024 + 32 * 1024


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} netswap supervise: {message}", file=sys.stderr, flush=True)


class Child:
    """nbdkit, started detached (its parent is init), watched through a pidfd."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.pidfd = os.pidfd_open(pid)

    @classmethod
    def spawn(cls, argv: list[str], env: dict[str, str], log_path: Path) -> Child:
        read, write = os.pipe()
        middle = os.fork()
        if middle == 0:  # the middle process: a session of its own, then nbdkit, then gone
            try:
                os.close(read)
                os.setsid()
                pid = os.fork()
                if pid == 0:
                    out = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
                    null = os.open(os.devnull, os.O_RDONLY)
                    os.dup2(null, 0)
                    os.dup2(out, 1)
                    os.dup2(out, 2)
                    os.execve(argv[0], argv, env)
                os.write(write, str(pid).encode())
            finally:
                os._exit(0)
        os.close(write)
        got = os.read(read, 32)
        os.close(read)
        os.waitpid(middle, 0)
        return cls(int(got))

    def alive(self) -> bool:
        ready, _, _ = select.select([self.pidfd], [], [], 0)
        return not ready

    def stop(self, grace: float = 10.0) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)
        if select.select([self.pidfd], [], [], grace)[0]:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        select.select([self.pidfd], [], [], grace)

    def close(self) -> None:
        os.close(self.pidfd)


class Supervisor:
    def __init__(self, args: argparse.Namespace) -> None:
        self.device = args.device
        self.index = device_index(args.device)
        self.host, self.port = parse_hostport(args.server, 10809)
        self.export = args.export
        self.dead_conn_timeout = args.dead_conn_timeout
        self.io_timeout = args.io_timeout
        self.state_path = Path(args.state)
        self.log_path = Path(args.serve_log)
        command = json.loads(Path(args.command).read_text()) if args.command else None
        self.argv: list[str] = command["argv"] if command else []
        self.env: dict[str, str] = {**os.environ, **(command["env"] if command else {})}
        self.state: dict[str, object] = {"supervisor_pid": os.getpid(), "device": self.device}
        self.state.update({"restarts": 0, "last_outage_s": 0.0, "epoch": 1})
        self.state.update(self._saved())
        self.child: Child | None = None
        self.netlink = Netlink()
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_write, False)
        self._signals: list[int] = []

    # -- state -------------------------------------------------------------------
    def _saved(self) -> dict[str, object]:
        try:
            saved = json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return {}
        return {k: saved[k] for k in ("restarts", "last_outage_s", "epoch", "serve_pid")
                if k in saved}  # fmt: skip

    def save(self) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state))
        tmp.replace(self.state_path)

    # -- nbdkit ------------------------------------------------------------------
    def _argv(self, start: str) -> list[str]:
        epoch = int(self.state["epoch"])  # type: ignore[call-overload]
        keep = [a for a in self.argv if not a.startswith(("start=", "epoch="))]
        return [*keep, f"start={start}", f"epoch={epoch}"]

    def start_child(self, start: str) -> None:
        env = {**self.env, "NETSWAP_SUPERVISOR_STATE": str(self.state_path)}
        with overcommit_for_nbdkit():
            self.child = Child.spawn(self._argv(start), env, self.log_path)
            self.state["serve_pid"] = self.child.pid
            self.save()  # before the device connects: attach returns once it has
            self.wait_answering()

    def adopt(self) -> bool:
        """A supervisor restarted while nbdkit lives on: watch the one already running."""
        pid = self.state.get("serve_pid")
        if not isinstance(pid, int):
            return False
        try:
            self.child = Child(pid)
        except ProcessLookupError:
            return False
        return True

    def wait_answering(self) -> None:
        deadline = time.monotonic() + START_S
        while True:
            with contextlib.suppress(OSError), socket.create_connection((self.host, self.port), 1):
                return
            if self.child is not None and not self.child.alive():
                raise RuntimeError(f"nbdkit exited at start (its log: {self.log_path})")
            if time.monotonic() > deadline:
                raise RuntimeError(f"nbdkit did not answer within {START_S:.0f}s")
            time.sleep(POLL_S)

    # -- the kernel ----------------------------------------------------------------
    def connect_device(self) -> None:
        sock, export = nbd_connect(self.host, self.port, self.export, START_S)
        with sock:
            self.netlink.connect(self.index, sock, export.size, 4096, export.flags,
                                 self.io_timeout, self.dead_conn_timeout)  # fmt: skip
        set_requeue_period(self.device, REQUEUE_MS)
        log(f"{self.device} connected to nbd://{self.host}:{self.port}/{self.export} "
            f"(dead-connection timeout {self.dead_conn_timeout}s, io timeout "
            f"{self.io_timeout or 'none'})")  # fmt: skip

    def reconnect_device(self) -> None:
        sock, _ = nbd_connect(self.host, self.port, self.export, START_S)
        with sock:
            self.netlink.reconfigure(self.index, sock)

    # -- the watch -----------------------------------------------------------------
    def on_signal(self, signum: int, _frame: object) -> None:
        self._signals.append(signum)
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_write, b"x")

    def run(self) -> int:
        """Watch until told to stop. Without a child (attach --no-serve: the server is
        someone else's, e.g. systemd's netswap-agent.service with Restart=), a dead
        link is only reconnected, as soon as the server answers again."""
        self.netlink.subscribe()
        for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.on_signal)
        self.save()
        while True:
            events = self.netlink.fileno()
            watched = [events, self._wake_read]
            if self.child is not None:
                watched.append(self.child.pidfd)
            ready, _, _ = select.select(watched, [], [])
            if self._wake_read in ready:
                os.read(self._wake_read, 64)
            for signum in self._drain_signals():
                if signum != signal.SIGHUP:
                    return self.stop()
                if self.child is not None:
                    self.restart("a restart was asked for (netswap restart)", graceful=True)
            if events in ready:
                dead = [i for cmd, i in self.netlink.events()
                        if cmd == NBD_CMD_LINK_DEAD and i == self.index]  # fmt: skip
                if dead and (self.child is None or self.child.alive()):
                    self.relink()
            if self.child is not None and not self.child.alive():
                self.restart("nbdkit died", graceful=False)

    def _drain_signals(self) -> list[int]:
        out, self._signals = self._signals, []
        return out

    def relink(self) -> None:
        """The kernel dropped the connection while nbdkit lives (or, with no child of
        ours, the server went away): a new socket to it, as soon as it answers."""
        began = time.monotonic()
        while True:
            try:
                self.reconnect_device()
                break
            except (OSError, HandshakeError, NetlinkError) as exc:
                if self.child is not None:
                    log(f"the link to nbdkit died and reconnecting failed ({exc}): restarting it")
                    self.child.stop()
                    self.restart("the link died and nbdkit did not take a new one", False)
                    return
                held = time.monotonic() - began
                if held > self.dead_conn_timeout:
                    log(f"nbd://{self.host}:{self.port} has not answered for {held:.0f}s, past "
                        f"the dead-connection timeout: the kernel fails {self.device}'s IO "
                        f"({exc}); still trying")  # fmt: skip
                time.sleep(0.5)
        outage = time.monotonic() - began
        self.state["last_outage_s"] = round(outage, 3)
        self.save()
        log(f"the connection to nbd://{self.host}:{self.port} died; a new one in {outage:.2f}s")

    def restart(self, why: str, graceful: bool) -> None:
        began = time.monotonic()
        old = self.child
        assert old is not None
        log(f"{why}: starting a new nbdkit that rebuilds the area from the stores")
        if graceful:
            old.stop()
        old.close()
        self.state["epoch"] = int(self.state["epoch"]) + 1  # type: ignore[call-overload]
        self.save()  # the epoch first: a supervisor dying now must not reuse it
        with reserve_raised(RESTART_RESERVE_KIB):
            while True:
                try:
                    self.start_child("rebuild")
                    self.reconnect_device()
                    break
                except (RuntimeError, OSError, HandshakeError, NetlinkError) as exc:
                    held = time.monotonic() - began
                    if held > self.dead_conn_timeout:
                        log(f"the agent has not come back for {held:.0f}s, past the "
                            f"{self.dead_conn_timeout}s dead-connection timeout: the kernel "
                            f"now fails {self.device}'s IO ({exc}); still trying")  # fmt: skip
                    else:
                        log(f"the new nbdkit is not serving yet ({exc}); trying again")
                    if self.child is not None and self.child.alive():
                        self.child.stop()
                    time.sleep(1.0)
        outage = time.monotonic() - began
        self.state["restarts"] = int(self.state["restarts"]) + 1  # type: ignore[call-overload]
        self.state["last_outage_s"] = round(outage, 3)
        self.state["last_reason"] = why
        self.save()
        log(f"serving again after {outage:.2f}s (restart {self.state['restarts']}, epoch "
            f"{self.state['epoch']})")  # fmt: skip

    def stop(self) -> int:
        log("stopping: disconnecting the device and nbdkit")
        with contextlib.suppress(NetlinkError):
            self.netlink.disconnect(self.index)
        if self.child is not None:
            self.child.stop()
        self.state_path.unlink(missing_ok=True)
        return 0


def set_requeue_period(device: str, ms: int) -> None:
    path = Path("/sys/block") / Path(device).name / "queue" / "io_timeout"
    try:
        path.write_text(f"{ms}\n")
    except OSError as exc:
        log(f"cannot set {path} ({exc.strerror}): requests sent to a dead connection go "
            "again only after the kernel's default 30 s")  # fmt: skip


@contextlib.contextmanager
def reserve_raised(extra_kib: int) -> Iterator[None]:
    """vm.min_free_kbytes raised by `extra_kib` for the block, then put back."""
    try:
        before = int(MIN_FREE.read_text())
        MIN_FREE.write_text(f"{before + extra_kib}\n")
    except OSError:
        yield
        return
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            MIN_FREE.write_text(f"{before}\n")


@contextlib.contextmanager
def overcommit_for_nbdkit() -> Iterator[None]:
    """nbdkit's 192 MiB .bss fails the heuristic overcommit check on a host whose RAM
    and swap are smaller; for its start only, overcommit is allowed (it never touches
    those pages)."""
    total = sum(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith(("MemTotal:", "SwapTotal:")))  # fmt: skip
    try:
        mode = OVERCOMMIT.read_text().strip()
    except OSError:
        mode = ""
    if mode != "0" or total > NBDKIT_BSS_KIB:
        yield
        return
    OVERCOMMIT.write_text("1\n")
    log(f"RAM + swap ({total // 1024} MiB) is below nbdkit's .bss: overcommit allowed for "
        "its start")  # fmt: skip
    try:
        yield
    finally:
        OVERCOMMIT.write_text("0\n")


def protect() -> None:
    """IO_FLUSHER, OOM-exempt, SCHED_FIFO: for this process and every nbdkit it starts."""
    for outcome in (set_io_flusher(), protect_from_oom()):
        if not outcome.ok:
            log(str(outcome))
    try:
        set_policy("fifo")
    except PermissionError:
        log("SCHED_FIFO: NOT applied (needs CAP_SYS_NICE)")


def lock() -> None:
    """Everything this process holds, resident for good (not inherited by nbdkit)."""
    if _libc().mlockall(MCL_CURRENT | MCL_FUTURE) != 0:
        log("mlockall: NOT applied (needs CAP_IPC_LOCK or RLIMIT_MEMLOCK)")
    rss = resident_mib()
    if rss > RESIDENT_BOUND_MIB:
        log(f"resident {rss:.1f} MiB, above the {RESIDENT_BOUND_MIB} MiB it should hold")


def resident_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="netswap supervise")
    parser.add_argument("--device", required=True)
    parser.add_argument("--server", required=True, metavar="HOST:PORT")
    parser.add_argument("--export", default="swap")
    parser.add_argument("--dead-conn-timeout", type=int, default=120)
    parser.add_argument("--io-timeout", type=int, default=0)
    parser.add_argument("--state", required=True, help="JSON state file")
    parser.add_argument("--serve-log", required=True)
    parser.add_argument("--command", help="JSON of nbdkit's argv and env (serve --print-command)")
    parser.add_argument("--adopt", action="store_true", help="watch the nbdkit already running")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        protect()
        supervisor = Supervisor(args)
        if args.adopt and supervisor.adopt():
            log(f"adopted nbdkit {supervisor.state['serve_pid']}")
        else:
            if supervisor.argv:
                supervisor.start_child("fresh")
            supervisor.save()  # whoever sees the device connected finds the state
            supervisor.connect_device()
        lock()
        what = f"nbdkit {supervisor.state['serve_pid']}" if supervisor.argv else "the link"
        log(f"watching {what} for {args.device}; resident {resident_mib():.1f} MiB")
        return supervisor.run()
    except (OSError, RuntimeError, HandshakeError, NetlinkError, ValueError) as exc:
        code = getattr(exc, "errno", None)
        why = os.strerror(code) if isinstance(code, int) and code in errno.errorcode else exc
        log(f"error: {why if not str(exc) else exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
