"""The supervisor `netswap attach` leaves behind: the agent dies, swap carries on.

One small process per attached device. It starts nbdkit with the agent,
connects /dev/nbdN to it through netlink with a dead-connection timeout
(netlink.py: the kernel then holds the device's IO while no connection is
alive instead of failing it), and watches. When nbdkit dies -- a crash, kill -9,
an OOM kill -- or the kernel reports the link dead, it starts a new one that
rebuilds the area from the stores (start=rebuild, a higher epoch), does the
NBD handshake itself and hands the kernel the new socket (NBD_CMD_RECONFIGURE).
Requests the kernel had sent to the dead connection go again once their
timer finds the socket replaced (knobs.REQUEUE_MS); requests issued meanwhile
waited for the reconnect. SIGHUP (`netswap restart`) replaces a live nbdkit
the same way: an upgrade without draining swap. SIGUSR1 (detach, before its
swapoff) drops the spare and starts none until SIGUSR2: swapoff reads every
swapped page back into a RAM the spare's locked ~60 MiB would leave too small.

It lives inside a host that may be out of memory, so it keeps the swap path's
discipline in RESIDENT_BOUND_KIB: it runs without site (`python3 -S`, attach's
command(): the venv's .pth files alone cost 2 MiB), imports only the stdlib and
this package, allocates with libc's malloc (PYTHONMALLOC=malloc: pymalloc's
1 MiB arenas round up what mlockall pins), touches what it will run at start
(the handshake and the netlink calls are made once before the watch), then
mlockall(MCL_CURRENT | MCL_FUTURE) pins everything, and it runs under
PR_SET_IO_FLUSHER, SCHED_FIFO and oom_score_adj -1000. Nothing a takeover runs
may wait on a page swap could hold (#29: on a diskless host the log is tmpfs): its
lines go through a ring a thread writes out, nbdkit's through a pipe it empties
(logs.py), the server's address was resolved at start, nothing is imported or
read (tests/test_takeover.py audits it), and the files nbdkit reads as it loads
(tokens, TLS) are handed down from memfds it holds locked (held.py): even a cold
start reads none from a page swap could hold.

Where a new nbdkit's memory comes from while swap is held: the dead one's
locked pages (~45 MiB, freed at its death) and, below the min watermark, the
quarter of attach's vm.min_free_kbytes reserve that a real-time task may take
(nbdkit inherits SCHED_FIFO and IO_FLUSHER from the supervisor). Raising the
reserve at the restart does not help: everyone else would stop at the new
watermark, but the new nbdkit too would only get a quarter of it, and kswapd
would evict the page cache it starts from. The state file (JSON,
/run/netswap/supervise-nbdN.json) says what happened: restarts, the last
outage (death to serving), the epoch.

The export is private (#30): nbdkit and its spare serve on Unix sockets in a
directory only root reaches (checked at start), every file it makes is its user's
alone (umask 077), and the kernel is handed a connection only once SO_PEERCRED
names the nbdkit it started or adopted (handshake.check_peer): a user who binds a
freed path first is refused, not served swap.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import select
import signal
import sys
import time

from .child import Child
from .handshake import Endpoint, HandshakeError, PeerError, endpoint, open_checked
from .held import HeldFiles
from .knobs import LOGS, OVERCOMMIT_FOR_NBDKIT, log
from .link import Link
from .netlink import NetlinkError
from .options import Options, UsageError, parse_args
from .protect import (
    MCL_CURRENT,
    MCL_FUTURE,
    libc,
    lock_all,
    protect_from_oom,
    real_time,
    resident_kib,
    set_io_flusher,
)
from .spare import Spare
from .state import StatePage, read_state

# How long a new nbdkit may take to answer at all (Python and the plugin loading).
# Its handshake may then take as long as the agent's rebuild, within the kernel's
# dead-connection timeout: while nbdkit lives, the supervisor waits on it.
START_S = 90.0
POLL_S = 0.1
# The bound on what the supervisor holds: python3 -S with the stdlib modules it
# runs pins 14.5-15 MiB (6.5 MiB of it the python3.11 binary, which MCL_CURRENT locks
# whole); checked once locked, and by the guest lab's drill.
RESIDENT_BOUND_KIB = 16 * 1024
# After a takeover the next spare starts this much later: the held IO drains first,
# then the spare's ~45 MiB is taken by ordinary reclaim, not from the storm's margin.
SPARE_DELAY_S = 5.0
# A spare that died or never said ready is tried again this much later.
SPARE_RETRY_S = 30.0
# How often a spare that waits for swapon (--spare-after-swapon) looks at /proc/swaps:
# attach runs mkswap and swapon right after the device connects (well under a second).
SWAPON_POLL_S = 0.5
# The environment nbdkit must not inherit from the supervisor: the allocator the
# supervisor chose for its own small footprint would slow the agent.
NOT_INHERITED = ("PYTHONMALLOC",)
# What no other user may do to a directory holding the export's sockets or the
# supervisor's files: read, write or search it (#30).
OTHERS = 0o077


class Supervisor:
    def __init__(self, args: Options) -> None:
        self.device = args.device
        # Where nbdkit serves (resolved now: a takeover looks nothing up), and the
        # spare's socket; the two alternate (one: no spare, a cold start).
        self.where = endpoint(args.server)
        self.places: tuple[Endpoint, ...] = (self.where,)
        if args.standby_socket:
            self.places += (endpoint(f"unix:{args.standby_socket}"),)
        self.dead_conn_timeout = args.dead_conn_timeout
        self.state_path: str = args.state
        self.log_path: str = args.serve_log
        # nbdkit's output (the one serving, the spare): a pipe this process empties into
        # the serve log, never a file of theirs (logs.py).
        self.output = LOGS.serve_log(self.log_path)
        self.argv: list[str] = []
        given: dict[str, str] = {}
        # The files nbdkit reads as it loads, read now into locked memory (held.py).
        self.held = HeldFiles()
        if args.command:  # serve --print-command's JSON: nbdkit's argv and environment
            with open(args.command) as f:
                command = json.load(f)
            self.argv, given = self.held.hold(command["argv"]), command["env"]
        if self.argv:  # the nbdkit it starts: on a socket only root reaches
            for place in self.places:
                private_socket(place)
            private_dir(os.path.dirname(self.state_path) or ".")
        inherited = {k: v for k, v in os.environ.items() if k not in NOT_INHERITED}
        self.env: dict[str, str] = {**inherited, **given}
        self.state: dict[str, object] = {"supervisor_pid": os.getpid(), "device": self.device}
        self.state.update({"restarts": 0, "last_outage_s": 0.0, "epoch": 1, "spares": True})
        self.state.update(self._saved())
        self.page = StatePage(self.state_path)
        self.child: Child | None = None
        self.spare: Spare | None = None
        self.spare_due = 0.0  # monotonic time the next spare starts (0: none planned)
        self.spares = True  # False from SIGUSR1 to SIGUSR2: detach's swapoff needs the RAM
        self.spare_after_swapon = args.spare_after_swapon and not args.adopt
        self.link = Link(args.device, args.export, args.dead_conn_timeout, args.io_timeout)
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_write, False)
        self._signals: list[int] = []
        # From the start: a SIGTERM while nbdkit starts (attach undoing a failed swapon)
        # is handled at the watch's first turn, by a stop that disconnects the device.
        for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGUSR1,
                    signal.SIGUSR2):  # fmt: skip
            signal.signal(sig, self.on_signal)

    # -- state -------------------------------------------------------------------
    def _saved(self) -> dict[str, object]:
        saved = read_state(self.state_path)  # a supervisor before this one (--adopt)
        return {k: saved[k] for k in ("restarts", "last_outage_s", "epoch", "serve_pid")
                if k in saved}  # fmt: skip

    def save(self) -> None:
        self.page.write(self.state)

    # -- nbdkit ------------------------------------------------------------------
    def _argv(self, start: str, where: Endpoint) -> list[str]:
        epoch = int(self.state["epoch"])  # type: ignore[call-overload]
        keep = [a for a in self.argv if not a.startswith(("start=", "epoch="))]
        if "-U" in keep:  # serve's argv: nbdkit ... -U PATH ...
            keep[keep.index("-U") + 1] = where.path
        return [*keep, f"start={start}", f"epoch={epoch}"]

    def _env(self) -> dict[str, str]:
        return {**self.env, "NETSWAP_SUPERVISOR_STATE": self.state_path}

    def start_child(self, start: str) -> None:
        with OVERCOMMIT_FOR_NBDKIT.held():
            free_socket(self.where)
            self.child = Child.spawn(self._argv(start, self.where), self._env(), self.output)
            self.state["serve_pid"] = self.child.pid
            self.state["socket"] = self.where.path
            self.save()  # before the device connects: attach returns once it has
            self.wait_answering()

    # -- the spare -----------------------------------------------------------------
    def start_spare(self) -> None:
        self.spare_due = 0.0
        if len(self.places) < 2 or not self.argv or self.spare is not None or not self.spares:
            return
        if self.spare_after_swapon:
            if not is_swap(self.device):
                self.spare_due = time.monotonic() + SWAPON_POLL_S
                return
            self.spare_after_swapon = False
        where = self.places[1] if self.where is self.places[0] else self.places[0]
        OVERCOMMIT_FOR_NBDKIT.allow()  # until it is ready or gone (drop_spare)
        try:
            # Its cushion serves every object; it loads unlocked (it locks at ready).
            env = {**self._env(), "PYTHONMALLOC": "malloc"}
            env.pop("NETSWAP_LOCK_AT_LOAD", None)
            free_socket(where)
            self.spare = Spare.spawn(self._argv("rebuild", where), env, self.output, where)
        except OSError as exc:
            OVERCOMMIT_FOR_NBDKIT.restore()
            log(f"no spare nbdkit ({exc}); trying again in {SPARE_RETRY_S:.0f}s")
            self.spare_due = time.monotonic() + SPARE_RETRY_S
            return
        self.state["standby_pid"], self.state["standby"] = self.spare.child.pid, "starting"
        self.save()

    def spare_heard(self) -> None:
        spare = self.spare
        assert spare is not None
        if spare.heard() and spare.child.alive():
            if spare.ready and self.state.get("standby") != "ready":
                OVERCOMMIT_FOR_NBDKIT.restore()
                self.state["standby"] = "ready"
                self.save()
                log(f"spare nbdkit {spare.child.pid} ready on {spare.where.text}")
            return
        log(f"the spare nbdkit died before serving (its log: {self.log_path}); another in "
            f"{SPARE_RETRY_S:.0f}s")  # fmt: skip
        self.drop_spare()
        self.spare_due = time.monotonic() + SPARE_RETRY_S

    def drop_spare(self) -> None:
        if self.spare is not None:
            if not self.spare.ready:
                OVERCOMMIT_FOR_NBDKIT.restore()
            self.spare.discard()
            self.spare = None
        self.state.pop("standby_pid", None)
        self.state["standby"] = "none"

    def want_spares(self, wanted: bool) -> None:
        """SIGUSR1 (False): no spare, now or after a takeover, till SIGUSR2 (True)."""
        self.spares = self.state["spares"] = wanted
        if wanted:
            self.start_spare()
        else:
            if self.spare is not None:
                log(f"spare nbdkit {self.spare.child.pid} dropped: its memory is wanted "
                    "(detach)")  # fmt: skip
            self.drop_spare()
            self.spare_due = 0.0
        self.save()

    def spare_in_time(self, deadline: float) -> Spare | None:
        """The spare, once ready (waiting for it up to `deadline`), or None."""
        spare = self.spare
        while spare is not None and not spare.ready and time.monotonic() < deadline:
            ready, _, _ = select.select([spare], [], [], max(0.0, deadline - time.monotonic()))
            if ready:
                self.spare_heard()
                spare = self.spare
        return spare if spare is not None and spare.ready else None

    def adopt(self) -> None:
        """--adopt (`netswap adopt`): the supervisor before this one died, and nbdkit,
        detached, may serve on. Watch it on the socket it serves; its spare, which
        answered to the dead one, goes. Were nbdkit gone too, a new one rebuilds."""
        saved = read_state(self.state_path)
        path, pid, spare = saved.get("socket"), saved.get("serve_pid"), saved.get("standby_pid")
        self.where = next((p for p in self.places if p.path and p.path == path), self.where)
        if isinstance(spare, int) and spare != pid and is_nbdkit(spare):
            with contextlib.suppress(ProcessLookupError):
                orphan = Child(spare)
                orphan.kill()
                orphan.close()
        self.state.pop("standby_pid", None)
        self.state["standby"] = "none"
        if not self.argv:  # attach --no-serve: the link is all there is to watch
            return
        if isinstance(pid, int) and is_nbdkit(pid):
            with contextlib.suppress(ProcessLookupError):
                self.child = Child(pid)
                self.state.update(serve_pid=pid, socket=self.where.path)
                log(f"adopted nbdkit {pid} serving on {self.where.text}{self.follow(pid)}")
                return
        self.restart("nbdkit was gone when this supervisor adopted it", graceful=False)

    def follow(self, pid: int) -> str:
        """The adopted nbdkit's output: the pipe the dead supervisor emptied, opened again
        through /proc (a pipe's reader may join at any time), so that its lines reach
        the serve log and its writes never meet a pipe without a reader."""
        path = f"/proc/{pid}/fd/2"
        try:
            if not os.readlink(path).startswith("pipe:"):
                return ""  # a file (started by a netswap before the pipe): it writes there
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            return f" (its output is lost: {exc.strerror})"
        LOGS.follow(fd)
        return ", its output followed"

    def wait_answering(self) -> None:
        """Until nbdkit answers on its socket; whoever else answers there is an error."""
        deadline = time.monotonic() + START_S
        pid = self.child.pid if self.child is not None else 0
        while True:
            try:
                open_checked(self.where, 1, pid).close()
                return
            except PeerError:
                raise
            except OSError:
                pass
            if self.child is not None and not self.child.alive():
                raise RuntimeError(f"nbdkit exited at start (its log: {self.log_path})")
            if time.monotonic() > deadline:
                raise RuntimeError(f"nbdkit did not answer within {START_S:.0f}s")
            time.sleep(POLL_S)

    # -- the kernel ----------------------------------------------------------------
    def serving_pid(self) -> int:
        """Who must answer on the socket: the nbdkit watched (0: a server not ours)."""
        return self.child.pid if self.child is not None else 0

    def connect_device(self) -> None:
        self.link.connect(self.where, START_S, self.serving_pid())

    def reconnect_device(self, patience: float = START_S) -> None:
        self.link.reconfigure(self.where, patience, self.serving_pid())

    # -- the watch -----------------------------------------------------------------
    def on_signal(self, signum: int, _frame: object) -> None:
        self._signals.append(signum)
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_write, b"x")

    def run(self) -> int:
        """Watch until told to stop. Without a child (attach --no-serve: the server is
        someone else's, e.g. systemd's netswap-agent.service with Restart=), a dead
        link is only reconnected, as soon as the server answers again."""
        self.link.subscribe()
        self.state["watching"] = True
        self.save()
        while True:
            events = self.link.fileno()
            watched = [events, self._wake_read]
            if self.child is not None:
                watched.append(self.child.pidfd)
            spare = self.spare
            if spare is not None:
                watched += [spare.fileno(), spare.child.pidfd]
            wait = max(0.0, self.spare_due - time.monotonic()) if self.spare_due else None
            ready, _, _ = select.select(watched, [], [], wait)
            if self.spare_due and time.monotonic() >= self.spare_due:
                self.start_spare()
            if self._wake_read in ready:
                os.read(self._wake_read, 64)
            for signum in self._drain_signals():
                if signum in (signal.SIGUSR1, signal.SIGUSR2):
                    self.want_spares(signum == signal.SIGUSR2)
                    spare = None  # dropped, or a new one not yet heard from
                    continue
                if signum != signal.SIGHUP:
                    return self.stop()
                if self.child is not None:
                    self.restart("a restart was asked for (netswap restart)", graceful=True)
            if (
                spare is not None
                and spare is self.spare
                and (spare.fileno() in ready or spare.child.pidfd in ready)
            ):
                self.spare_heard()
            alive = self.child is None or self.child.alive()
            if events in ready and self.link.died() and alive:
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
                    log(f"{self.where.text} has not answered for {held:.0f}s, past "
                        f"the dead-connection timeout: the kernel fails {self.device}'s IO "
                        f"({exc}); still trying")  # fmt: skip
                time.sleep(0.5)
        outage = time.monotonic() - began
        self.state["last_outage_s"] = round(outage, 3)
        self.save()
        log(f"the connection to {self.where.text} died; a new one in {outage:.2f}s")

    def restart(self, why: str, graceful: bool) -> None:
        """A new nbdkit serves: the spare if there is one (for an upgrade, a spare of the
        installed version, ready before the old one stops), else a cold start."""
        old = self.child
        if graceful and old is not None:
            self.drop_spare()
            self.start_spare()
            self.spare_in_time(time.monotonic() + START_S)
            # Killed, not stopped: nbdkit told to stop answers the requests in flight
            # ESHUTDOWN, which the kernel takes as failed swap IO (seen in the drill);
            # a socket that just dies has them sent again on the new one.
            old.kill()
        began = time.monotonic()
        if old is not None:  # None: adopted with nbdkit already gone
            old.close()
        self.child = None
        self.state["epoch"] = int(self.state["epoch"]) + 1  # type: ignore[call-overload]
        self.save()  # the epoch first: a supervisor dying now must not reuse it
        # A spare not ready now may be stuck on the very IO the kernel holds: not waited for.
        spare = self.spare_in_time(time.monotonic())
        if not (spare is not None and self.take_over(spare, why, began)):
            self.cold_start(why, began)
        outage = time.monotonic() - began
        self.state["restarts"] = int(self.state["restarts"]) + 1  # type: ignore[call-overload]
        self.state["last_outage_s"] = round(outage, 3)
        self.state["last_reason"] = why
        self.save()
        log(f"serving again after {outage:.2f}s (restart {self.state['restarts']}, epoch "
            f"{self.state['epoch']}, {self.where.text})")  # fmt: skip
        self.spare_due = time.monotonic() + SPARE_DELAY_S

    def take_over(self, spare: Spare, why: str, began: float) -> bool:
        log(f"{why}: spare nbdkit {spare.child.pid} takes over on {spare.where.text}")
        self.spare = None
        self.child, self.where = spare.child, spare.where
        self.state.update(serve_pid=spare.child.pid, socket=spare.where.path, standby="none")
        self.state.pop("standby_pid", None)
        self.save()
        try:
            spare.go(int(self.state["epoch"]))  # type: ignore[call-overload]
            held = time.monotonic() - began
            self.reconnect_device(max(START_S, self.dead_conn_timeout - held))
        except (OSError, HandshakeError, NetlinkError) as exc:
            log(f"the spare did not serve ({exc}): a cold start instead")
            spare.child.stop()
            self.child = None
            return False
        return True

    def cold_start(self, why: str, began: float) -> None:
        log(f"{why}: starting a new nbdkit that rebuilds the area from the stores")
        self.drop_spare()  # one not ready holds memory and the other port
        while True:
            try:
                self.start_child("rebuild")
                # The handshake waits for the agent's rebuild: as long as the kernel
                # holds the IO, and at least START_S.
                held = time.monotonic() - began
                self.reconnect_device(max(START_S, self.dead_conn_timeout - held))
                return
            except (RuntimeError, OSError, HandshakeError, NetlinkError) as exc:
                held = time.monotonic() - began
                if held > self.dead_conn_timeout:
                    log(f"the agent has not come back for {held:.0f}s, past the "
                        f"{self.dead_conn_timeout}s dead-connection timeout: the kernel "
                        f"now fails {self.device}'s IO ({exc}); still trying")  # fmt: skip
                else:
                    log(f"the new nbdkit did not serve ({exc}); starting another")
                if self.child is not None and self.child.alive():
                    self.child.stop()
                time.sleep(1.0)

    def stop(self) -> int:
        log("stopping: disconnecting the device and nbdkit")
        self.link.disconnect()
        if self.child is not None:
            self.child.stop()
        self.drop_spare()
        self.page.remove()
        return 0


def private_dir(path: str) -> None:
    """`path` must be a directory of this user's (root's) that no one else reaches."""
    info = os.stat(path)
    if info.st_uid != os.geteuid() or info.st_mode & OTHERS:
        raise ValueError(f"{path} is open to other users (owner uid {info.st_uid}, mode "
                         f"{info.st_mode & 0o777:o}): the export's socket and files must "
                         "be in a directory only root reaches")  # fmt: skip


def private_socket(where: Endpoint) -> None:
    if not where.path:
        raise ValueError(f"the nbdkit it starts serves on a Unix socket, not {where.text}")
    private_dir(os.path.dirname(where.path) or ".")


def free_socket(where: Endpoint) -> None:
    """The path a dead nbdkit bound (nbdkit leaves its socket file behind), freed for
    the next: in a directory only root reaches, nobody else can have bound it since."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(where.path)


def is_swap(device: str) -> bool:
    """Whether `device` is swap now (attach's swapon done)."""
    try:
        with open("/proc/swaps") as f:
            return any(line.split()[:1] == [device] for line in f)
    except OSError:
        return False


def is_nbdkit(pid: int) -> bool:
    """Whether `pid` is an nbdkit now (a pid in an old state file may have been reused)."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip() == "nbdkit"
    except OSError:
        return False


def protect() -> None:
    """IO_FLUSHER, OOM-exempt, SCHED_FIFO: for this process and every nbdkit it starts."""
    for outcome in (set_io_flusher(), protect_from_oom(), real_time()):
        if not outcome.ok:
            log(str(outcome))


def lock() -> None:
    """Everything this process holds, resident for good (not inherited by nbdkit)."""
    outcome = lock_all(MCL_CURRENT | MCL_FUTURE)
    if not outcome.ok:
        log(str(outcome))
    rss = resident_kib()
    if rss > RESIDENT_BOUND_KIB:
        log(f"resident {rss / 1024:.1f} MiB, above the {RESIDENT_BOUND_KIB // 1024} MiB it "
            "should hold")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """The supervisor's life, its log written out by a thread from the first line to
    the last (at most logs.FLUSH_S more at the end)."""
    M_ARENA_MAX = -8  # <malloc.h>: one arena, not one per thread, each locked whole
    libc().mallopt(M_ARENA_MAX, 1)
    try:
        return supervise(sys.argv[1:] if argv is None else argv)
    finally:
        LOGS.flush()


def supervise(argv: list[str]) -> int:
    try:
        args = parse_args(argv)
    except UsageError as exc:
        log(f"usage: {exc}")
        return 2
    if args.footprint:
        LOGS.start()
        LOGS.serve_log(os.devnull)  # its threads and rings count too
        lock()
        print(json.dumps({"resident_kib": resident_kib(), "modules": sorted(sys.modules)}))
        return 0
    os.umask(0o077)  # its files and nbdkit's sockets are root's alone (#30)
    try:
        protect()
        LOGS.start()  # after protect(): IO_FLUSHER and SCHED_FIFO are per thread, inherited
        supervisor = Supervisor(args)
        if args.adopt:
            supervisor.adopt()
            supervisor.save()
        else:
            if supervisor.argv:
                supervisor.start_child("fresh")
            supervisor.save()  # whoever sees the device connected finds the state
            supervisor.connect_device()
        # The spare loads once attach has run swapon (--spare-after-swapon: it locks as
        # it loads, and swap may then take others' pages to make room, never its own);
        # attach waits for it to be ready.
        supervisor.start_spare()
        lock()
        what = f"nbdkit {supervisor.state['serve_pid']}" if supervisor.argv else "the link"
        log(f"watching {what} for {args.device}; resident {resident_kib() / 1024:.1f} MiB")
        return supervisor.run()
    except (OSError, RuntimeError, HandshakeError, NetlinkError, ValueError) as exc:
        code = getattr(exc, "errno", None)
        why = os.strerror(code) if isinstance(code, int) and code in errno.errorcode else exc
        log(f"error: {why if not str(exc) else exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
