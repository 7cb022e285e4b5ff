"""attach/detach on this machine: its kernel has no nbd driver, so every path here is
a refusal that must be clear and change nothing. The real attach runs in the VM lab."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .nbdserver import NETSWAP

MIN_FREE = Path("/proc/sys/vm/min_free_kbytes")


def as_nobody(*args: str) -> tuple[int, str]:
    """Run the CLI in a forked child that has really dropped to uid/gid 65534."""
    from netswap.client.cli import main

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: no exec, so the venv's permissions do not matter
        import sys

        sys.stderr = os.fdopen(write_end, "w")
        os.setgid(65534)
        os.setuid(65534)
        status = main(list(args))
        sys.stderr.flush()
        os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end) as f:
        err = f.read()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), err


def netswap(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [NETSWAP, *args]
    env = {
        **os.environ,
        "NETSWAP_STATE_DIR": "/tmp/netswap-test-state",
        "NETSWAP_LOG_DIR": "/tmp/netswap-test-state",
    }
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)


def test_attach_without_nbd_support_is_a_clear_error_and_changes_nothing() -> None:
    before = MIN_FREE.read_text()
    result = netswap("attach", "--device", "/dev/nbd0")
    assert result.returncode == 2
    assert "nbd" in result.stderr and "Traceback" not in result.stderr
    assert MIN_FREE.read_text() == before
    assert not Path("/tmp/netswap-test-state/attach-nbd0.json").exists()


def test_attach_and_detach_refuse_non_root() -> None:
    for command in ("attach", "detach"):
        status, err = as_nobody(command)
        assert status == 2, err
        assert "run as root" in err and "Traceback" not in err


def test_detach_of_a_device_netswap_did_not_attach_is_refused() -> None:
    result = netswap("detach", "--device", "/dev/nbd7")
    assert result.returncode == 2 and "was not attached by netswap" in result.stderr


def test_attach_plan_is_the_documented_sequence() -> None:
    result = netswap(
        "attach",
        "--print-plan",
        "--no-serve",
        "--server",
        "10.0.2.2:10809",
        "--priority",
        "3",
        "--discard",
    )
    assert result.returncode == 0
    assert result.stdout.splitlines() == [
        "modprobe nbd",
        "sysctl -w vm.min_free_kbytes=16384",
        "nbd-client 10.0.2.2 10809 /dev/nbd0 -N swap -b 4096",
        "mkswap /dev/nbd0",
        "swapon -p 3 --discard /dev/nbd0",
    ]


def test_adopt_refuses_what_it_cannot_take_over_in_one_line(tmp_path: Path) -> None:
    """`netswap adopt` replaces a dead supervisor: it refuses a device attach did not
    attach, a supervisor still alive, a device with no saved supervisor options, and
    says so when the new supervisor cannot take over (here: no nbd driver). detach
    refuses a dead supervisor: only a live one disconnects the device."""
    state = Path("/tmp/netswap-test-state")
    state.mkdir(exist_ok=True)
    attached, supervised = state / "attach-nbd5.json", state / "supervise-nbd5.json"
    options = state / "supervise-nbd5.args.json"
    result = netswap("adopt", "--device", "/dev/nbd5")
    assert result.returncode == 2 and "was not attached by netswap" in result.stderr
    status, err = as_nobody("adopt")
    assert status == 2 and "run as root" in err, err
    # A live supervisor: its command line names the package, as attach starts it.
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)  # " +
                              "supervise.supervisor"])  # fmt: skip
    try:
        attached.write_text(json.dumps({"device": "/dev/nbd5", "supervisor_pid": alive.pid}))
        supervised.write_text(json.dumps({"supervisor_pid": alive.pid, "serve_pid": 1}))
        result = netswap("adopt", "--device", "/dev/nbd5")
        assert result.returncode == 2, result.stderr
        assert f"supervisor {alive.pid} still watches /dev/nbd5" in result.stderr
        alive.kill()
        alive.wait()
        result = netswap("detach", "--device", "/dev/nbd5")  # nothing would stop nbdkit
        assert result.returncode == 2 and "`netswap adopt` starts a new one" in result.stderr
        assert attached.exists()
        result = netswap("adopt", "--device", "/dev/nbd5")
        assert result.returncode == 2 and "has no supervisor to replace" in result.stderr
        options.write_text(json.dumps(["--device", "/dev/nbd5", "--server", "127.0.0.1:1",
                                       "--state", str(supervised), "--serve-log",
                                       str(tmp_path / "serve.log")]))  # fmt: skip
        result = netswap("adopt", "--device", "/dev/nbd5")
        assert result.returncode == 2, result.stderr
        assert "the new supervisor did not take over /dev/nbd5" in result.stderr
        assert "Traceback" not in result.stderr
        assert json.loads(attached.read_text())["supervisor_pid"] == alive.pid  # unchanged
    finally:
        alive.kill()
        for path in (attached, supervised, options):
            path.unlink(missing_ok=True)


# A supervisor as detach sees it (its command line names the package): SIGUSR1 drops its
# spare (the state file says standby none), SIGUSR2 is noted beside the state file.
FAKE_SUPERVISOR = """
import json, signal, sys, time
path = sys.argv[1]
def usr1(*_): open(path, "w").write(json.dumps({"spares": False, "standby": "none"}))
def usr2(*_): open(path + ".usr2", "w").write("asked")
signal.signal(signal.SIGUSR1, usr1)
signal.signal(signal.SIGUSR2, usr2)
open(path + ".up", "w").write("up")
time.sleep(60)  # supervise.supervisor
"""


def test_detach_drops_the_spare_and_leaves_a_device_that_stays_swap_served(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before swapoff, which reads every swapped page back into RAM, detach has the
    supervisor drop its spare nbdkit (~60 MiB locked). swapoff may still fail when RAM
    cannot hold the pages (ENOMEM, or the OOM killer takes swapoff): undo must then
    stop, not disconnect the device and stop its supervisor and nbdkit -- every page
    still there would read EIO, SIGBUS for its process (the drill's guest: init, a
    panic) -- and the spare comes back. Here swapoff is a script that fails."""
    from netswap.client.nbd import attach

    (tmp_path / "swapoff").write_text("#!/bin/sh\necho 'swapoff: /dev/nbd6: swapoff failed: "
                                      "Cannot allocate memory' >&2\nexit 255\n")  # fmt: skip
    (tmp_path / "swapoff").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setattr(attach, "is_active_swap", lambda device: True)
    supervised = tmp_path / "supervise-nbd6.json"
    supervised.write_text(json.dumps({"spares": True, "standby": "ready"}))
    monkeypatch.setattr(attach, "supervisor_state", lambda device: supervised)
    supervisor = subprocess.Popen([sys.executable, "-c", FAKE_SUPERVISOR, str(supervised)])
    try:
        while not Path(f"{supervised}.up").exists():  # its handlers are set
            assert supervisor.poll() is None
            time.sleep(0.01)
        state = attach.AttachState("/dev/nbd6", steps=["supervisor", "swapon"],
                                   supervisor_pid=supervisor.pid)  # fmt: skip
        try:
            attach.undo(state)
            raised = ""
        except attach.AttachError as exc:
            raised = str(exc)
        assert raised == ("swapoff /dev/nbd6 failed (swapoff: /dev/nbd6: swapoff failed: "
                          "Cannot allocate memory): it stays swap, attached and served; "
                          "free memory, then detach again")  # fmt: skip
        assert json.loads(supervised.read_text())["standby"] == "none"  # dropped first
        for _ in range(50):  # the spare is wanted again
            if Path(f"{supervised}.usr2").exists():
                break
            time.sleep(0.1)
        assert Path(f"{supervised}.usr2").exists()
        assert supervisor.poll() is None  # not stopped: it keeps the device served
    finally:
        supervisor.kill()
        supervisor.wait()
