"""A takeover waits on no log and opens nothing (#29's fourth failure), kernel aside.

In a guest whose / is tmpfs the supervisor blocked in write(2) to its log, whose
page swap had put on the device whose server had just died (the guest lab's
drill now makes those pages cold before it kills: tests/test_lab_vm.py). Here the
same wait is a log whose file never takes a byte (a pipe nobody reads, filled):
the rings, the pipe from nbdkit, and a real takeover -- real stores, real nbdkit,
a real spare -- under that log, with an audit hook on every import and file open.
The kernel's side of the link is the one fake: this kernel has no nbd driver.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import select
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from netswap.client.agent.keys import drop_key
from netswap.client.supervise.logs import Logs, Ring
from netswap.lab.ports import ExitedEarly, wait_socket

from .conftest import free_port
from .nbdserver import NETSWAP, connect
from .procs import stores

PAGE = 4096
AREA = f"takeover{os.getpid()}"


@contextmanager
def log_pipe() -> Iterator[tuple[int, int]]:
    """(read, write): a log that fill() gets stuck -- a write to it then blocks, as a
    write(2) to a tmpfs page swapped out to a dead device does -- until read_all()."""
    read, write = os.pipe()
    try:
        yield read, write
    finally:
        read_all(read)
        os.close(write)
        os.close(read)


def fill(fd: int) -> None:
    """Write lines to a pipe (or FIFO) until it takes no more, through a file description
    of its own: O_NONBLOCK on `fd`'s would be the writer thread's too."""
    own = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_NONBLOCK)
    try:
        while True:
            os.write(own, (b"x" * 4095 + b"\n") * 16)
    except BlockingIOError:
        pass
    finally:
        os.close(own)


def read_all(fd: int) -> bytes:
    os.set_blocking(fd, False)
    out = b""
    try:
        while chunk := os.read(fd, 1 << 16):
            out += chunk
    except BlockingIOError:
        pass
    return out


def test_a_ring_keeps_lines_in_order_across_its_end_and_counts_what_it_drops() -> None:
    ring = Ring(64)
    assert ring.put(b"a" * 40) and ring.pending() == b"a" * 40
    ring.written(40)
    assert ring.put(b"0123456789" * 3)  # wraps: 24 bytes at the end, 6 at the start
    assert bytes(ring.pending()) == b"012345678901234567890123"
    ring.written(24)
    assert bytes(ring.pending()) == b"456789"
    assert ring.put(b"y" * 58) and not ring.put(b"z", lines=3)  # full: dropped, counted
    assert ring.take_dropped() == 3 and ring.take_dropped() == 0 and ring.dropped_total == 3


def test_a_log_whose_file_waits_never_holds_up_the_one_who_logs() -> None:
    """say() returns at once while the writer thread is stuck in write(2); a full ring
    drops lines and says how many, once, when the file takes bytes again. The control:
    the same log written synchronously (the supervisor before this change) blocks."""
    with log_pipe() as (read, write):
        fill(write)
        logs = Logs("test")
        logs.sinks[0] = (logs.own, write)
        done = threading.Event()
        threading.Thread(target=lambda: (logs.say("synchronous"), done.set()), daemon=True).start()
        assert not done.wait(1.0), "the control: a synchronous write to the stuck log returned"
        read_all(read)  # the control's line goes; the pipe is empty now
        assert done.wait(5)
        fill(write)  # stuck again
        logs.start()
        began = time.monotonic()
        lines = [f"line {i:05d} " + "." * 100 for i in range(1000)]  # ~113 KiB > the ring
        for line in lines:
            logs.say(line)
        assert time.monotonic() - began < 5.0  # nothing waited on the stuck file (forever)
        assert logs.own.dropped_total > 0
        kept = logs.own.capacity // (len(lines[0]) + 1)
        text = b""
        deadline = time.monotonic() + 10
        while b"dropped here" not in text and time.monotonic() < deadline:
            text += read_all(read)
            time.sleep(0.05)
        text += read_all(read)
        said = text.decode(errors="replace").split("\n")
        assert [ln for ln in said if ln.startswith("line ")][:kept] == lines[:kept]
        notes = [int(ln.split()[2]) for ln in said if "dropped here" in ln]
        assert notes and sum(notes) == logs.own.dropped_total, notes


def test_nbdkit_writing_to_its_pipe_never_waits_on_the_serve_log(tmp_path: Path) -> None:
    """nbdkit's stderr is the supervisor's pipe: with the serve log's file stuck, a
    process writing 1 MiB of lines into it still finishes at once (the reader keeps
    emptying the pipe into the ring and drops what does not fit, counted)."""
    fifo = tmp_path / "serve.log"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # the file's side: never read
    try:
        logs = Logs("test")
        logs.start()
        write_end = logs.serve_log(str(fifo))
        assert fcntl.fcntl(write_end, 1032) == 64 * 1024  # F_GETPIPE_SZ: PIPE_SIZE
        line = "f'nbdkit line {i:05d} ' + 'x' * 110 + '\\n'"
        script = f"import sys\nfor i in range(8192): sys.stderr.write({line})"
        began = time.monotonic()
        subprocess.run([sys.executable, "-c", script], stderr=write_end, check=True, timeout=30)
        took = time.monotonic() - began
        assert took < 10, took  # a stuck pipe would have blocked it for the full timeout
        assert logs.serve is not None
        deadline = time.monotonic() + 5
        while logs.serve.dropped_total == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert logs.serve.dropped_total > 0  # 1 MiB through a 64 KiB ring with the file stuck
        got = b""
        deadline = time.monotonic() + 10
        while not (b"dropped here" in got and logs.serve.empty()) and time.monotonic() < deadline:
            got += read_all(reader)
            time.sleep(0.05)
        got += read_all(reader)
        assert got.startswith(b"nbdkit line 00000 "), got[:100]  # in order, from the first
        # Each drop said once: the notes (one per stretch of drops) add up to the count.
        notes = re.findall(rb"(\d+) log lines dropped here", got)
        assert notes and sum(map(int, notes)) == logs.serve.dropped_total, notes
    finally:
        os.close(reader)


# The supervisor's takeover in a process of its own, as attach starts it.
SCRIPT = Path(__file__).with_name("supervised_takeover.py")


@pytest.mark.timeout(240)
def test_a_takeover_under_a_stuck_log_serves_every_page_and_imports_or_opens_nothing(
    tmp_path: Path,
) -> None:
    """A supervisor started as `netswap adopt` starts one (python3 -S, stdlib only; it
    adopts the nbdkit serving, so nothing was connected or looked up at its start) with
    both its logs stuck -- write(2) blocks, as on a tmpfs page swapped out to the device
    whose nbdkit just died -- and nbdkit killed -9: the spare takes over, the kernel's
    side gets a socket that serves every page written before the kill, and the
    takeover imported and opened nothing. Then the logs take bytes again and say it."""
    from netswap.client import supervise
    from netswap.client.nbd.attach import supervisor_env
    from netswap.client.supervise.child import Child
    from netswap.client.supervise.state import StatePage

    first, spare_path = tmp_path / "nbd0-1.sock", tmp_path / "nbd0-2.sock"
    fifo = tmp_path / "serve.log"
    os.mkfifo(fifo)
    serve_reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    state = tmp_path / "state.json"
    with stores(2) as procs, log_pipe() as (own_reader, own_writer):
        cmd = [NETSWAP, "serve", "--unix", str(first), "--no-exit-with-parent",
               "--size", "16M", "--backend", "remote", "--no-mlock", "--area", AREA,
               "--replicas", "2", *[f"--store={p.address}" for p in procs],
               f"--http=127.0.0.1:{free_port()}", "--print-command"]  # fmt: skip
        command = tmp_path / "command.json"
        command.write_text(subprocess.run(cmd, capture_output=True, text=True,
                                          check=True).stdout)  # fmt: skip
        nbdkit = json.loads(command.read_text())
        # The nbdkit a dead supervisor left serving, with the pipe it used to empty.
        dead_read, dead_write = os.pipe()
        served = Child.spawn([*nbdkit["argv"], "start=fresh", "epoch=1"],
                             {**os.environ, **nbdkit["env"]}, dead_write)  # fmt: skip
        os.close(dead_write)
        sup: subprocess.Popen[str] | None = None
        try:
            try:
                wait_socket(first, served.alive)
            except ExitedEarly as exc:
                os.set_blocking(dead_read, False)
                said = os.read(dead_read, 8192)
                raise AssertionError(f"nbdkit exited at start: {said!r}") from exc
            h = connect(f"nbd+unix:///swap?socket={first}")
            truth = {slot: os.urandom(PAGE) for slot in range(0, 4096, 37)}
            for slot, data in truth.items():
                h.pwrite(data, slot * PAGE)
            h.shutdown()
            os.close(dead_read)  # serving; now the supervisor that emptied its pipe dies
            page = StatePage(str(state))  # as the dead supervisor left it
            page.write({"serve_pid": served.pid, "socket": str(first), "epoch": 1})
            page.close()
            parent = Path(supervise.__file__).resolve().parent.parent  # as attach's boot
            options = ["--device", "/dev/nbd0", "--server", f"unix:{first}",
                       "--state", str(state), "--serve-log", str(fifo),
                       "--command", str(command), "--standby-socket", str(spare_path),
                       "--adopt"]  # fmt: skip
            sup = subprocess.Popen(
                [sys.executable, "-S", str(SCRIPT), str(parent), str(own_writer), "--",
                 *options],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, pass_fds=[own_writer],
                env=supervisor_env(), cwd="/",
            )  # fmt: skip
            assert sup.stdin is not None and sup.stdout is not None
            assert select.select([sup.stdout], [], [], 120)[0], read_all(own_reader)[-1500:]
            first = sup.stdout.readline().strip()
            assert first == "ready", (first, read_all(own_reader)[-1500:], read_all(serve_reader))
            before = read_all(own_reader)  # what was said so far; then both logs get stuck
            fill(own_writer)
            filler = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            fill(filler)
            os.close(filler)
            sup.stdin.write("kill\n")
            sup.stdin.flush()
            ready, _, _ = select.select([sup.stdout], [], [], 60)
            if not ready:  # what it said once its log takes bytes, and where it waits
                said = b""
                for _ in range(40):
                    said += read_all(own_reader)
                    time.sleep(0.05)
                said = said.replace(b"x" * 4095 + b"\n", b"")
                tasks = Path(f"/proc/{sup.pid}/task").iterdir()
                waits = [(t / "wchan").read_text() for t in tasks]
                raise AssertionError(
                    f"the takeover did not finish under a stuck log; its "
                    f"threads wait in {waits}; it said {said[-1500:]!r}"
                )
            took = json.loads(sup.stdout.readline())
            assert took["seen"] == [], took["seen"]
            assert took["restarts"] == 1 and took["socket"] == str(spare_path)
            assert took["kernel"] == [str(spare_path)]  # adopted: the link was the dead one's
            h = connect(f"nbd+unix:///swap?socket={spare_path}")
            for slot, data in truth.items():
                assert h.pread(PAGE, slot * PAGE) == data, slot
            h.shutdown()
            # The files take bytes again (one writer thread serves both): what was said.
            said, logged = before, b""
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not (
                b"serving again" in said and b"pages proven" in logged
            ):
                said += read_all(own_reader)
                logged += read_all(serve_reader)
                time.sleep(0.05)
            assert b"its output followed" in said, said[-2000:]  # the adopted nbdkit's pipe
            assert b"spare nbdkit" in said and b"serving again after" in said, said[-2000:]
            assert b"pages proven" in logged, logged[-2000:]  # the spare's, through the pipe
        finally:
            if sup is not None and sup.stdin is not None:
                read_all(own_reader)
                with contextlib.suppress(BrokenPipeError):
                    sup.stdin.write("stop\n")
                    sup.stdin.flush()
                try:
                    sup.wait(30)
                except subprocess.TimeoutExpired:
                    sup.kill()
                    sup.wait()
                for stream in (sup.stdin, sup.stdout):
                    if stream is not None:
                        stream.close()
            if served.alive():
                served.kill()
            served.close()
            os.close(serve_reader)
            drop_key(AREA)


def test_the_plugins_logging_never_waits_on_its_stderr(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inside nbdkit every logger's warnings go through takeover.RingHandler: with stderr
    stuck (a pipe nobody empties: a supervisor stopped, or a file on a page swap holds),
    the agent's loop thread logging a warning returns at once. The control: logging's
    own stream handler on the same stuck stderr blocks."""
    import logging

    from netswap.client.nbd import takeover

    with log_pipe() as (read, write):
        fill(write)
        logs = Logs("netswap plugin")
        logs.sinks[0] = (logs.own, write)
        monkeypatch.setattr(takeover, "LOGS", logs)
        logs.start()
        logger = logging.getLogger("netswap.test-takeover")
        monkeypatch.setattr(logger, "propagate", False)
        stuck = os.fdopen(os.dup(write), "w")
        control = logging.StreamHandler(stuck)
        logger.addHandler(control)
        done = threading.Event()
        threading.Thread(target=lambda: (logger.warning("blocks"), done.set()), daemon=True).start()
        assert not done.wait(1.0), "the control: a stream handler on stuck stderr returned"
        logger.removeHandler(control)
        ring = takeover.RingHandler(logging.WARNING)
        logger.addHandler(ring)
        try:
            began = time.monotonic()
            for i in range(2000):
                logger.warning("slab %d: every replica lost its pages", i)
            assert time.monotonic() - began < 5.0  # a stuck stream would block forever
            assert logs.own.dropped_total > 0  # the ring is bounded: the rest dropped, counted
        finally:
            logger.removeHandler(ring)
            text = read_all(read)  # the control's thread and the writer go on
            assert done.wait(5)
            stuck.close()
        deadline = time.monotonic() + 10
        while b"dropped here" not in text and time.monotonic() < deadline:
            time.sleep(0.05)
            text += read_all(read)
        assert b"slab 0: every replica lost its pages\n" in text and b"dropped here" in text


def test_an_adopted_nbdkits_pipe_is_followed_again(tmp_path: Path) -> None:
    """A supervisor that dies takes its end of nbdkit's pipe along (nbdkit's writes then
    fail EPIPE, never kill it: SIGPIPE is ignored); the one that adopts nbdkit opens the
    same pipe again through /proc and its lines reach the serve log once more."""
    read, write = os.pipe()
    loop = ("trap '' PIPE; i=0; while [ $i -lt 100 ]; do echo line $i >&2; i=$((i+1)); "
            "sleep 0.05; done")  # fmt: skip
    writer = subprocess.Popen(["sh", "-c", loop], stderr=write)
    os.close(write)
    try:
        assert os.read(read, 8).startswith(b"line 0")
        os.close(read)  # the supervisor dies
        time.sleep(0.3)
        assert writer.poll() is None  # EPIPE, not a fatal signal
        logs = Logs("test")
        logs.start()
        log = tmp_path / "serve.log"
        logs.serve_log(str(log))
        logs.follow(os.open(f"/proc/{writer.pid}/fd/2", os.O_RDONLY | os.O_NONBLOCK))
        assert writer.wait(30) == 0
        deadline = time.monotonic() + 5
        while b"line 99\n" not in log.read_bytes() and time.monotonic() < deadline:
            time.sleep(0.05)
        lines = log.read_bytes().decode().splitlines()
        assert lines[-1] == "line 99" and len(lines) > 50, lines  # the rest, from the pipe
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
