"""Test helper: a real `netswap serve` (nbdkit + plugin) on a free loopback port."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import nbd

from .conftest import free_port, wait_for_port

NETSWAP = str(Path(sys.executable).parent / "netswap")


@contextmanager
def netswap_serve(*args: str, mlock: bool = False) -> Iterator[str]:
    """Yields the export's URI; kills nbdkit on exit (like a crash, no cleanup)."""
    port = free_port()
    cmd = [NETSWAP, "serve", "--listen", f"127.0.0.1:{port}", *args]
    if not mlock:
        cmd.append("--no-mlock")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_port(port, proc)
        if "--http" in args:
            wait_for_port(int(args[args.index("--http") + 1].rsplit(":", 1)[1]), proc)
        yield f"nbd://127.0.0.1:{port}/swap"
    finally:
        err = kill_and_read_stderr(proc)
        assert "Traceback" not in err, err


def kill_and_read_stderr(proc: subprocess.Popen[bytes]) -> str:
    """Stop a server like a crash would (no cleanup) and return what it printed."""
    proc.kill()
    proc.wait()
    assert proc.stderr is not None
    err = proc.stderr.read().decode()
    proc.stderr.close()
    return err


def connect(uri: str, strict: bool = True) -> nbd.NBD:
    handle = nbd.NBD()
    handle.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    if not strict:
        handle.set_strict_mode(0)  # let misaligned requests reach the server
    handle.connect_uri(uri)
    return handle


def errno_of(error: nbd.Error) -> int:
    """libnbd reports errno by name ('EINVAL'); tests compare numbers."""
    import errno

    return int(getattr(errno, str(error.errno)))
