"""Only root reaches the swap device (#30), checked as a user with no privileges.

A real supervised export -- real stores, nbdkit and its spare on Unix sockets in a
directory of mode 0700, the supervisor as attach starts it (tests/
supervised_takeover.py: the kernel's side is the one fake, this kernel has no nbd
driver) -- and `nobody` (setpriv: no groups, no capabilities; lab/unprivileged.py)
trying what the issue found open: connecting to the export and to its spare,
reading the state, the logs, the ops token, and becoming the server the kernel
gets by binding a freed socket path first while nbdkit restarts. Each check is
shown able to fail: the same probe against an export on TCP and a world-readable
directory gets in, and with the directory's mode broken after the supervisor's start
check a squatter's socket is refused by the peer check -- and taken by the kernel's
side once the check is taken out.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from netswap.client.agent.keys import drop_key
from netswap.lab.unprivileged import as_nobody, run_as_nobody

from .conftest import free_port
from .nbdserver import NETSWAP, kill_and_read_stderr
from .procs import StoreProc, stores

AREA = f"private{os.getpid()}"
SCRIPT = Path(__file__).with_name("supervised_takeover.py")
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to nobody")


@contextlib.contextmanager
def private_dirs() -> Iterator[tuple[Path, Path]]:
    """A run and a log directory as attach makes them (short paths: a Unix socket's
    path fits 107 bytes)."""
    from netswap.client.nbd.private import private_dir

    run = Path(tempfile.mkdtemp(prefix="ns-run-"))
    log = Path(tempfile.mkdtemp(prefix="ns-log-"))
    for d in (run, log):
        d.chmod(0o755)  # as an older netswap left them: private_dir closes them again
        private_dir(d)
        assert d.stat().st_mode & 0o777 == 0o700
    try:
        yield run, log
    finally:
        subprocess.run(["rm", "-rf", str(run), str(log)], check=False)


class Supervised:
    """The supervisor as attach starts it, nbdkit and its spare on run/nbd0-{1,2}.sock."""

    def __init__(self, run: Path, log: Path, procs: list[StoreProc], *flags: str) -> None:
        from netswap.client import supervise
        from netswap.client.nbd.attach import supervisor_env

        self.first, self.second = run / "nbd0-1.sock", run / "nbd0-2.sock"
        self.state = run / "supervise-nbd0.json"
        token = run / "ops-token"
        token.write_text("s3cret-ops-token\n")
        token.chmod(0o600)
        cmd = [NETSWAP, "serve", "--unix", str(self.first), "--no-exit-with-parent",
               "--size", "16M", "--backend", "remote", "--no-mlock", "--area", AREA,
               "--replicas", "2", *[f"--store={p.address}" for p in procs],
               f"--http=127.0.0.1:{free_port()}", f"--http-token-file={token}",
               "--print-command"]  # fmt: skip
        command = run / "serve-nbd0.json"
        command.write_text(subprocess.run(cmd, capture_output=True, text=True,
                                          check=True).stdout)  # fmt: skip
        self.own_log = log / "supervise-nbd0.log"
        own = os.open(self.own_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        options = ["--device", "/dev/nbd0", "--server", f"unix:{self.first}",
                   "--state", str(self.state), "--serve-log", str(log / "serve-nbd0.log"),
                   "--command", str(command), "--standby-socket", str(self.second)]  # fmt: skip
        parent = Path(supervise.__file__).resolve().parent.parent
        self.proc = subprocess.Popen(
            [sys.executable, "-S", str(SCRIPT), str(parent), str(own), *flags, "--", *options],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, pass_fds=[own],
            env=supervisor_env(), cwd="/",
        )  # fmt: skip
        os.close(own)
        self.serve_log = log / "serve-nbd0.log"
        first = self.said(120)
        if first != "ready":
            self.close()
            raise AssertionError(f"the supervisor said {first!r}: "
                                 f"{self.own_log.read_text()[-1500:]}"
                                 f"{self.serve_log.read_text()[-1500:]}")  # fmt: skip

    def said(self, patience: float) -> str:
        assert self.proc.stdout is not None
        if not select.select([self.proc.stdout], [], [], patience)[0]:
            raise AssertionError(f"the supervisor said nothing in {patience}s: "
                                 f"{self.own_log.read_text()[-2000:]}")  # fmt: skip
        return self.proc.stdout.readline().strip()

    def tell(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def kill_nbdkit(self) -> dict[str, object]:
        """nbdkit killed -9: the supervisor takes over; what the kernel's side got."""
        self.tell("kill")
        report: dict[str, object] = json.loads(self.said(180))
        return report

    def next_spare(self) -> dict[str, object]:
        self.tell("spare")
        report: dict[str, object] = json.loads(self.said(180))
        return report

    def close(self) -> None:
        with contextlib.suppress(BrokenPipeError, OSError):
            self.tell("stop")
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


def secrets(*dirs: Path) -> list[str]:
    """Every file under `dirs` but the sockets: what a user must not read."""
    return sorted(str(p) for d in dirs for p in d.rglob("*") if p.is_file())


def denied(report: dict[str, object]) -> list[dict[str, str]]:
    """The attempts that got anything but EACCES."""
    attempts: list[dict[str, str]] = report["attempts"]  # type: ignore[assignment]
    return [a for a in attempts if a["got"] != "EACCES"]


def assert_nobody(report: dict[str, object]) -> None:
    who: dict[str, object] = report["who"]  # type: ignore[assignment]
    assert who["uid"] == who["euid"] == 65534 and who["groups"] == [], who
    assert int(str(who["cap_eff"]), 16) == 0 == int(str(who["cap_prm"]), 16), who


@pytest.mark.timeout(300)
def test_nobody_reaches_neither_the_export_nor_its_spare_nor_a_secret_nor_a_freed_path() -> None:
    """As nobody: connecting to the export and to the spare, reading every file the
    supervised export keeps (state, serve command, ops token, logs), listing either
    directory and seeing the area's key are all refused; and binding either socket
    path while nbdkit is killed -9 and its spare takes over, and while the next spare
    starts on the path the dead one freed, never succeeds: the kernel's side gets
    the nbdkit the supervisor started, checked by SO_PEERCRED."""
    with private_dirs() as (run, log), stores(2) as procs:
        sup = Supervised(run, log, procs)
        try:
            files = secrets(run, log)
            assert {Path(f).name for f in files} >= {"supervise-nbd0.json", "ops-token",
                                                       "serve-nbd0.json", "serve-nbd0.log",
                                                       "supervise-nbd0.log"}  # fmt: skip
            args = ["check", "--connect", str(sup.first), "--connect", str(sup.second),
                    "--list", str(run), "--list", str(log)]  # fmt: skip
            args += [a for f in files for a in ("--read", f)]
            report = run_as_nobody(*args)
            assert_nobody(report)
            assert len(report["attempts"]) == len(files) + 4  # type: ignore[arg-type]
            assert denied(report) == [], denied(report)
            assert report["keys"] == []  # root's keyring: netswap:AREA is not shown
            # Binding first, as nbdkit dies and its spare takes over, and as the next
            # spare starts on the path the dead one left.
            squatter = subprocess.Popen(
                as_nobody("squat", "--path", str(sup.first), "--path", str(sup.second),
                          "--seconds", "40"),
                stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            try:
                took = sup.kill_nbdkit()
                assert took["restarts"] == 1 and took["seen"] == [], took
                # The device's first connection (nbdkit) and the takeover's (its spare),
                # each to the nbdkit the supervisor started, root's.
                assert took["kernel"] == [str(sup.first), str(sup.second)], took
                peers: list[list[int]] = took["peers"]  # type: ignore[assignment]
                assert peers[0][1] == 0 and peers[1] == [took["serving"], 0], took
                spare = sup.next_spare()
                assert spare["socket"] == str(sup.first) and spare["standby"], spare
            except BaseException:
                squatter.kill()
                squatter.communicate()
                raise
            out, _ = squatter.communicate(timeout=120)
            squat = json.loads(out.splitlines()[-1])
            assert_nobody(squat)
            assert squat["bound"] == [] and squat["served"] == 0, squat
            assert squat["tries"] > 100 and set(squat["denied"]) == {"EACCES"}, squat
        finally:
            sup.close()
            drop_key(AREA)


@pytest.mark.timeout(300)
def test_a_rootless_container_is_another_user_to_the_export() -> None:
    """A user namespace of nobody's (what a rootless container runs in): its root has
    every capability there, and still reaches neither the export, nor its spare, nor
    any of its files -- it is uid 65534 to the host's directory of mode 0700."""
    with private_dirs() as (run, log), stores(2) as procs:
        sup = Supervised(run, log, procs)
        try:
            args = ["check", "--connect", str(sup.first), "--connect", str(sup.second),
                    "--list", str(run), "--list", str(log)]  # fmt: skip
            args += [a for f in secrets(run, log) for a in ("--read", f)]
            report = run_as_nobody(*args, userns=True)
            who: dict[str, object] = report["who"]  # type: ignore[assignment]
            assert who["euid"] == 0 and int(str(who["cap_eff"]), 16) != 0, who  # root, inside
            assert denied(report) == [], denied(report)
        finally:
            sup.close()
            drop_key(AREA)


@pytest.mark.timeout(400)
@pytest.mark.parametrize("checked", [True, False], ids=["peer-checked", "control-unchecked"])
def test_a_user_who_binds_the_spares_path_first_is_refused_by_the_peer_check(
    checked: bool,
) -> None:
    """The second line of defence, and the proof that the first test can fail: the
    socket directory opened to everyone after the supervisor started (0777), nobody
    replaces the spare's socket with an NBD server of its own, nbdkit is killed -9.
    With the peer check the supervisor refuses the squatter (its pid is not the
    spare's), cold-starts an nbdkit on that path and the kernel's side gets root's
    nbdkit; with the check taken out (the control) the kernel's side gets the
    squatter's socket -- every swapped page would have gone to nobody."""
    with private_dirs() as (run, log), stores(2) as procs:
        sup = Supervised(run, log, procs, *([] if checked else ["--no-peer-check"]))
        squatter: subprocess.Popen[str] | None = None
        try:
            run.chmod(0o777)
            squatter = subprocess.Popen(
                as_nobody("squat", "--path", str(sup.second), "--seconds", "25"),
                stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            deadline = time.monotonic() + 20
            while sup.second.stat().st_uid != 65534:  # nobody's socket is in place
                assert time.monotonic() < deadline and squatter.poll() is None
                time.sleep(0.05)
            took = sup.kill_nbdkit()
            out, _ = squatter.communicate(timeout=120)
            squat = json.loads(out.splitlines()[-1])
            assert squat["bound"][:1] == [str(sup.second)], squat
            assert took["kernel"] == [str(sup.first), str(sup.second)], took
            pid, uid = took["peers"][-1]  # type: ignore[index]
            if checked:
                assert (pid, uid) == (took["serving"], 0), took  # root's nbdkit, cold-started
                text = sup.own_log.read_text()
                assert "(uid 65534), not nbdkit" in text and "refused" in text, text[-2000:]
            else:  # nobody's server, through the handshake: the kernel's now
                assert uid == 65534 and pid != took["serving"] and squat["served"] >= 1, took
        finally:
            if squatter is not None and squatter.returncode is None:
                squatter.kill()
                squatter.communicate()
            run.chmod(0o700)
            sup.close()
            drop_key(AREA)


@pytest.mark.timeout(120)
def test_the_probe_gets_in_where_the_export_is_open(tmp_path: Path) -> None:
    """The checks above can fail: nobody connects to a TCP export (`netswap serve
    --listen`, the compose lab's and the demo's: its one line says so) and reads its
    greeting, and reads a file in a world-readable directory; `serve --unix` in the
    same directory answers only its owner (umask 077 on the socket)."""
    port = free_port()
    cmd = [NETSWAP, "serve", "--listen", f"127.0.0.1:{port}", "--size", "16M", "--no-mlock"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    sock = Path(tempfile.mkdtemp(prefix="ns-open-")) / "nbd.sock"
    sock.parent.chmod(0o755)
    (sock.parent / "state.json").write_text("{}")
    (sock.parent / "state.json").chmod(0o644)
    unix = subprocess.Popen([NETSWAP, "serve", "--unix", str(sock), "--size", "16M",
                             "--no-mlock"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)  # fmt: skip
    try:
        from netswap.lab.ports import wait_port, wait_socket

        wait_port(port, lambda: proc.poll() is None)
        wait_socket(sock, lambda: unix.poll() is None)
        report = run_as_nobody("check", "--tcp", f"127.0.0.1:{port}", "--connect", str(sock),
                               "--read", str(sock.parent / "state.json"))  # fmt: skip
        assert_nobody(report)
        got = [a["got"] for a in report["attempts"]]  # type: ignore[attr-defined]
        assert got == ["EACCES", "ok", "ok"], report  # unix socket, TCP, the file
    finally:
        err = kill_and_read_stderr(proc)
        unix_err = kill_and_read_stderr(unix)
        subprocess.run(["rm", "-rf", str(sock.parent)], check=False)
    assert f"nbd://127.0.0.1:{port} answers every user of this host" in err, err
    assert "can read and write every page swapped to it" in err, err
    assert f"unix:{sock} answers only uid 0" in unix_err and "others may enter" in unix_err


def test_serve_unix_refuses_a_directory_others_may_write_and_a_busy_socket(
    tmp_path: Path,
) -> None:
    """serve --unix in a directory others may write (they could put their socket in
    the export's place) is one line; so is a path where something answers."""
    import socket

    open_dir = Path(tempfile.mkdtemp(prefix="ns-w-"))
    try:
        open_dir.chmod(0o777)
        done = subprocess.run([NETSWAP, "serve", "--unix", str(open_dir / "s"), "--size", "16M"],
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        assert done.returncode == 2 and "others may write" in done.stderr, done.stderr
        open_dir.chmod(0o700)
        busy = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        busy.bind(str(open_dir / "s"))
        busy.listen(1)
        done = subprocess.run([NETSWAP, "serve", "--unix", str(open_dir / "s"), "--size", "16M"],
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        busy.close()
        assert done.returncode == 2 and "already in use" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
    finally:
        subprocess.run(["rm", "-rf", str(open_dir)], check=False)


def test_attach_plans_a_private_socket_and_names_what_tcp_opens() -> None:
    """attach's own server is a root-only socket (its plan, for nbd-client by hand);
    --server without --no-serve is refused (attach no longer takes whatever answers
    there); a TCP --server is said to be open to every local user."""
    from .test_attach import netswap

    plan = netswap("attach", "--print-plan", "--", "--backend", "remote", "--store", "s:7177")
    assert plan.returncode == 0, plan.stderr
    assert plan.stdout.splitlines()[2:5] == [
        "mkdir -p -m 0700 /tmp/netswap-test-state",
        "netswap serve --unix /tmp/netswap-test-state/nbd0-1.sock --no-exit-with-parent "
        "--backend remote --store s:7177 &",
        "nbd-client -unix /tmp/netswap-test-state/nbd0-1.sock /dev/nbd0 -N swap -b 4096",
    ], plan.stdout
    refused = netswap("attach", "--server", "127.0.0.1:10809")
    assert refused.returncode == 2 and "give --no-serve too" in refused.stderr, refused.stderr
    tcp = netswap("attach", "--no-serve", "--server", "127.0.0.1:10809", "--print-plan")
    assert tcp.returncode == 0 and "nbd-client 127.0.0.1 10809" in tcp.stdout
    warned = netswap("attach", "--no-serve", "--server", "127.0.0.1:10809", "--device",
                     "/dev/nbd7")  # fmt: skip
    assert "answers every user of this host" in warned.stderr, warned.stderr


def test_the_peer_check_names_who_answered() -> None:
    """check_peer, in process: a socket whose other end is this process passes for its
    pid and is refused for any other, naming the pid and uid that answered."""
    import socket

    from netswap.client.supervise.handshake import PeerError, check_peer, endpoint

    ours, theirs = socket.socketpair()
    with ours, theirs:
        where = endpoint("unix:/run/netswap/nbd0-1.sock")
        check_peer(ours, where, os.getpid())
        check_peer(ours, where, 0)  # a server not ours: any process of root's
        with pytest.raises(PeerError, match=rf"pid {os.getpid()} \(uid 0\), not nbdkit 1:"):
            check_peer(ours, where, 1)
