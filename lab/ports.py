"""Loopback ports and Unix sockets for the labs and the tests: pick a free port, wait
until one (or a socket) answers."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable


class ExitedEarly(RuntimeError):
    """The process that should open the port ended first."""


def free_port() -> int:
    """A port nothing listens on now (the kernel's pick); racy by nature, fine for labs."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, running: Callable[[], bool] = lambda: True, timeout: float = 30.0) -> None:
    """Return once 127.0.0.1:port accepts a connection.

    Raises ExitedEarly as soon as running() turns false, TimeoutError after
    `timeout` seconds.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not running():
            raise ExitedEarly(f"the process exited before 127.0.0.1:{port} answered")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing answered on 127.0.0.1:{port} after {timeout:.0f}s")


def wait_socket(path: str | os.PathLike[str], running: Callable[[], bool] = lambda: True,
                timeout: float = 30.0) -> None:  # fmt: skip
    """Return once the Unix socket `path` accepts a connection (as wait_port)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not running():
            raise ExitedEarly(f"the process exited before {path} answered")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(0.5)
                sock.connect(os.fspath(path))
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing answered on {path} after {timeout:.0f}s")
