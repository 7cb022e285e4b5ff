"""The supervisor's parts that run here (this kernel has no nbd driver: the kernel side
runs in QEMU, tests/test_lab_vm.py): the NBD handshake against real nbdkit, the netlink
messages, a missing nbd driver as one line, nbdkit started detached and watched."""

from __future__ import annotations

import errno
import json
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from netswap.client.supervise import netlink
from netswap.client.supervise.child import Child
from netswap.client.supervise.handshake import HandshakeError, endpoint
from netswap.client.supervise.handshake import connect as nbd_connect

from .conftest import free_port
from .nbdserver import netswap_serve

NBD_REQUEST_MAGIC, NBD_REPLY_MAGIC = 0x25609513, 0x67446698


def test_the_handshake_leaves_a_socket_the_kernel_could_use(tmp_path: Path) -> None:
    with netswap_serve("--size", "16M") as uri:
        port = int(uri.split(":")[2].split("/")[0])
        sock, export = nbd_connect(endpoint(f"127.0.0.1:{port}"), "swap", 10)
        with sock:
            assert export.size == 16 << 20
            assert export.flags & 1  # NBD_FLAG_HAS_FLAGS, and the rest the plugin declares
            # Transmission phase, as nbd.ko speaks it: one 4 KiB read at offset 0.
            sock.sendall(struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, 0, 0, 7, 0, 4096))
            head = b""
            while len(head) < 16:
                head += sock.recv(16 - len(head))
            magic, error, handle = struct.unpack(">IIQ", head)
            assert (magic, error, handle) == (NBD_REPLY_MAGIC, 0, 7)


def test_a_server_that_is_not_nbd_is_one_clear_error() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def talk() -> None:
        conn, _ = listener.accept()
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        conn.close()

    import threading

    threading.Thread(target=talk, daemon=True).start()
    with pytest.raises(HandshakeError, match="not a newstyle NBD server"):
        nbd_connect(endpoint(f"127.0.0.1:{port}"), "swap", 5)
    listener.close()


def test_netlink_attributes_are_laid_out_as_the_kernel_reads_them() -> None:
    sockets = netlink._sockets([5])
    # NBD_ATTR_SOCKETS (nested) > NBD_SOCK_ITEM (nested) > NBD_SOCK_FD u32 5
    fd = struct.pack("=HHI", 8, netlink.NBD_SOCK_FD, 5)
    nested = netlink.NLA_F_NESTED
    item = struct.pack("=HH", 4 + len(fd), netlink.NBD_SOCK_ITEM | nested) + fd
    assert sockets == struct.pack("=HH", 4 + len(item), netlink.NBD_ATTR_SOCKETS | nested) + item
    parsed = netlink.parse_attrs(netlink._u64(netlink.NBD_ATTR_SIZE_BYTES, 1 << 30) + sockets)
    assert struct.unpack("=Q", parsed[netlink.NBD_ATTR_SIZE_BYTES])[0] == 1 << 30
    assert netlink.parse_attrs(parsed[netlink.NBD_ATTR_SOCKETS])[netlink.NBD_SOCK_ITEM] == fd
    odd = netlink._attr(1, b"abc")  # padded to 4
    assert len(odd) == 8 and odd[4:7] == b"abc"
    assert netlink.device_index("/dev/nbd12") == 12
    with pytest.raises(ValueError, match="not an nbd device"):
        netlink.device_index("/dev/sda")


@pytest.mark.skipif(Path("/sys/module/nbd").exists(), reason="this kernel has the nbd driver")
def test_a_kernel_without_the_nbd_driver_is_one_line() -> None:
    with pytest.raises(netlink.NetlinkError) as info:
        netlink.Netlink()
    assert info.value.errno == errno.ENOENT and "modprobe nbd" in str(info.value)


def test_nbdkit_is_started_detached_and_outlives_its_watcher(tmp_path: Path) -> None:
    """nbdkit exits when the process that started it dies: so its parent is init from
    the start, and the supervisor watches it through a pidfd."""
    port = free_port()
    argv = ["/usr/bin/nbdkit", "-f", "-i", "127.0.0.1", "-p", str(port), "memory", "1M"]
    child = Child.spawn(argv, dict(os.environ), tmp_path / "serve.log")
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 1).close()
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        ppid = int(Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        assert ppid != os.getpid()  # not ours: our death would take it along
        assert child.alive()
        child.stop()
        assert not child.alive()
    finally:
        child.close()
        subprocess.run(["pkill", "-f", f"-p {port} memory"], check=False)


# Child.spawn with a middle process that lingers after its fork, as a loaded machine's
# scheduler makes it do; then whether that nbdkit serves, or died without a line.
LINGERING_MIDDLE = """
import os, socket, sys, time
from netswap.client.supervise.child import Child
from netswap.lab.ports import ExitedEarly, wait_port
# In the middle, after it forks nbdkit's process (and here, after the first fork).
os.register_at_fork(after_in_parent=lambda: time.sleep(1))
port = int(sys.argv[1])
argv = ["/usr/bin/nbdkit", "-f", "-i", "127.0.0.1", "-p", str(port), "memory", "1M"]
child = Child.spawn(argv, dict(os.environ), sys.argv[2])
try:
    wait_port(port, child.alive, timeout=30)
    time.sleep(2)  # a SIGTERM'd nbdkit may still answer for a moment: later, then
    wait_port(port, child.alive, timeout=30)
    print("serving")
except ExitedEarly:
    print("died")
finally:
    child.kill()
    child.close()
"""


def test_nbdkit_outlives_a_middle_process_that_exits_late(tmp_path: Path) -> None:
    """nbdkit sets PR_SET_PDEATHSIG (SIGTERM) as it starts, even without
    --exit-with-parent: started while the double fork's middle process still lived,
    it died of the middle's exit before a line (the takeover tests' flake under
    load). Here the middle lingers a second after its fork, every time."""
    log = tmp_path / "serve.log"
    run = subprocess.run([sys.executable, "-c", LINGERING_MIDDLE, str(free_port()), str(log)],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert run.stdout.strip() == "serving", (run.stdout, run.stderr, log.read_text())


def test_the_supervisor_runs_lean_within_its_16_mib() -> None:
    """Started as attach starts it (no site, libc malloc), locked, it holds at most
    RESIDENT_BOUND_KIB and has imported nothing but the stdlib and its own package."""
    from netswap.client.nbd.attach import supervisor_argv, supervisor_env
    from netswap.client.supervise.supervisor import RESIDENT_BOUND_KIB

    argv = [*supervisor_argv(), "--device", "/dev/nbd0", "--server", "x", "--state", "x",
            "--serve-log", "x", "--footprint"]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, env=supervisor_env(), cwd="/",
                          check=True, timeout=30)  # fmt: skip
    report = json.loads(done.stdout)
    modules = set(report["modules"])
    assert "site" not in modules and not any(m.startswith("netswap") for m in modules)
    assert "supervise.supervisor" in modules  # found by path, as a top-level package
    heavy = modules & {"dataclasses", "inspect", "logging", "asyncio", "subprocess", "pathlib"}
    assert not heavy, heavy
    assert report["resident_kib"] <= RESIDENT_BOUND_KIB, report["resident_kib"]


def test_a_spare_serves_only_after_go_and_then_rebuilds_what_the_dead_one_wrote(
    tmp_path: Path,
) -> None:
    """The standby path, kernel aside: a real nbdkit with standby=FD builds its device and
    says ready but answers no handshake; after `go EPOCH` it rebuilds the area from real
    stores and serves every page the killed agent had written; and from ready to serving
    (its ops endpoint started too) it imported no module and opened no file, which on a
    diskless host could sit on the device it takes over (without takeover.preload: uvloop,
    the ops endpoint's modules and its dashboard.html, the idna codec)."""
    import select

    from netswap.client.agent.keys import drop_key
    from netswap.client.supervise.spare import Spare

    from .nbdserver import NETSWAP, connect
    from .procs import stores
    from .test_rebuild import AREA, PAGE, agent, write_random

    with stores(2) as procs:
        with agent(procs) as (uri, _):
            truth = write_random(uri, 50, 9)
        place = endpoint(f"unix:{tmp_path / 'spare.sock'}")
        cmd = [
            NETSWAP,
            "serve",
            "--unix",
            place.path,
            "--no-exit-with-parent",
            "--size",
            "16M",
            "--backend",
            "remote",
            "--no-mlock",
            "--area",
            AREA,
            "--replicas",
            "2",
            *[f"--store={p.address}" for p in procs],
            f"--http=127.0.0.1:{free_port()}",
            "--print-command",
        ]
        command = json.loads(subprocess.run(cmd, capture_output=True, text=True,
                                            check=True).stdout)  # fmt: skip
        log = tmp_path / "spare.log"
        env = {**os.environ, **command["env"], "NETSWAP_TAKEOVER_AUDIT": "1"}
        spare = Spare.spawn(command["argv"], env, str(log), place)
        try:
            deadline = time.monotonic() + 60
            while not spare.ready:
                assert time.monotonic() < deadline, log.read_text()
                if select.select([spare], [], [], 1)[0] and not spare.heard():
                    time.sleep(1)  # what nbdkit said as it went (seen once in CI: nothing)
                    raise AssertionError(
                        f"the spare closed its socket; alive: "
                        f"{spare.child.alive()}; log: {log.read_text()!r}"
                    )
            with pytest.raises(HandshakeError, match="in time"):
                nbd_connect(place, "swap", 1.0, spare.child.pid)  # listening, not serving
            spare.go(7)
            sock, export = nbd_connect(place, "swap", 60, spare.child.pid)
            sock.close()
            assert export.size == 16 << 20
            h = connect(f"nbd+unix:///swap?socket={place.path}")
            for slot, data in truth.items():
                assert h.pread(PAGE, slot * PAGE) == data, slot
            h.shutdown()
            # The go path, from ready to serving, imported and opened nothing (the
            # plugin's audit hook; the ring's writer says so a moment later).
            deadline = time.monotonic() + 10
            while "takeover audit:" not in log.read_text() and time.monotonic() < deadline:
                time.sleep(0.1)
            text = log.read_text()
            assert "50 pages proven" in text
            assert "takeover audit: 0 imports or opens from ready to serving" in text, text
        finally:
            spare.discard()
            drop_key(AREA)


def test_the_supervisor_reads_the_command_line_attach_writes() -> None:
    from netswap.client.cli import build_parser
    from netswap.client.nbd.attach import serve_socket, supervisor_options
    from netswap.client.supervise.options import UsageError, parse_args

    args = build_parser().parse_args(["attach", "--device", "/dev/nbd3"])
    first = f"unix:{serve_socket('/dev/nbd3')}"
    opts = parse_args(supervisor_options(args, first, Path("/run/cmd.json")))
    assert (opts.device, opts.export, opts.command) == ("/dev/nbd3", "swap", "/run/cmd.json")
    assert (opts.dead_conn_timeout, opts.io_timeout) == (120, 0)
    assert opts.server == "unix:/run/netswap/nbd3-1.sock"
    assert opts.standby_socket == "/run/netswap/nbd3-2.sock"
    args = build_parser().parse_args(["attach", "--no-standby", "--no-serve"])
    opts = parse_args(supervisor_options(args, "127.0.0.1:10809", None))
    assert (opts.command, opts.standby_socket, opts.server) == ("", "", "127.0.0.1:10809")
    bad_lines = (["--device"], "needs a value"), (["--bogus", "1"], "unknown option")
    bad_lines += (["--io-timeout", "x"], "takes a number"), ([], "missing --device")
    for bad, why in bad_lines:
        with pytest.raises(UsageError, match=why):
            parse_args(bad)


def test_sigusr1_drops_the_spare_and_none_starts_till_sigusr2(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Detach's swapoff needs the spare's locked memory: SIGUSR1 stops the spare and
    keeps any from starting (a takeover meanwhile plans one: start_spare refuses it),
    the state file saying so; SIGUSR2 starts one again. The spare, its spawning and the
    state page are fakes (this kernel has no nbd device for a whole supervisor: the lab
    runs one)."""
    from netswap.client.supervise import supervisor as module

    class FakeSpare:
        def __init__(self, pid: int) -> None:
            self.ready, self.discarded = True, False
            self.child = type("Child", (), {"pid": pid})()

        def discard(self) -> None:
            self.discarded = True

    spawned: list[FakeSpare] = []

    def spawn(*_: object) -> FakeSpare:
        spawned.append(FakeSpare(5000 + len(spawned)))
        return spawned[-1]

    monkeypatch.setattr(module.Spare, "spawn", spawn)
    monkeypatch.setattr(module, "OVERCOMMIT_FOR_NBDKIT", type("O", (), {
        "allow": lambda self: None, "restore": lambda self: None})())  # fmt: skip
    saved: list[dict[str, object]] = []
    sup = module.Supervisor.__new__(module.Supervisor)
    first = FakeSpare(4242)
    sup.spare, sup.spare_due, sup.spares = first, 0.0, True  # type: ignore[assignment]
    sup.state = {"spares": True, "standby": "ready", "standby_pid": 4242, "epoch": 3}
    sup.page = type("Page", (), {"write": lambda self, state: saved.append(dict(state))})()  # type: ignore[assignment]
    monkeypatch.setattr(module, "free_socket", lambda where: None)
    sup.where = module.endpoint("unix:/nonexistent/nbd0.sock")
    sup.places = (sup.where, module.endpoint("unix:/nonexistent/nbd0-spare.sock"))
    sup.spare_after_swapon, sup.argv, sup.env = False, ["nbdkit"], {}
    sup.state_path, sup.output = "/nonexistent/state.json", 1
    sup.want_spares(False)
    assert first.discarded and sup.spare is None and sup.spare_due == 0.0
    assert saved[-1]["standby"] == "none" and saved[-1]["spares"] is False
    assert "standby_pid" not in saved[-1]
    sup.start_spare()  # a takeover's planned spare, while detach's swapoff runs
    assert spawned == [] and sup.spare is None
    sup.want_spares(True)  # swapoff failed: the device stays, its spare comes back
    assert [s.child.pid for s in spawned] == [5000] and sup.spare is spawned[0]
    assert saved[-1]["spares"] is True and saved[-1]["standby_pid"] == 5000
