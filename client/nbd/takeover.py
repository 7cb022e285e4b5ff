"""What the plugin does so that a takeover touches no page swap may hold.

A spare takes over while the kernel holds the device's IO, so anything its `go`
path waits on must be in memory already: on a diskless host a log file, a
module's source and /run are all tmpfs, whose pages may sit on that very
device. So, in nbdkit:

- Logging (every logger's WARNING and up, the agent's included) and the plugin's
  own lines go through a ring (netswap.client.supervise.logs), which a writer
  thread drains to stderr; nobody waits for it. Under the supervisor stderr is a
  pipe it always empties; without one it may be a file, whose write may wait on a
  swap-in: then only the writer waits.
- The modules the go path imports lazily are imported before the spare says
  ready (preload).
- NETSWAP_TAKEOVER_AUDIT=1 (the tests) records every import and file opened on
  the go path, from ready to serving, with an audit hook, and says them in one line.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from typing import Any

from netswap.client.supervise.logs import Logs

LOGS = Logs("netswap plugin")
# The modules the go path (take_over, the agent's start, the ops endpoint) imports
# inside functions, found by the audit (tests/test_supervisor.py): uvloop (the agent's
# loop), the ops endpoint's, and the idna codec's (asyncio's create_server encodes its
# host name with it).
GO_PATH_MODULES = ("uvloop", "netswap.server.ops.http", "netswap.client.agent.stats",
                   "encodings.idna", "stringprep", "unicodedata")  # fmt: skip
# Files the kernel makes up on read, never a page swap could hold.
NOT_FILES = ("/proc/", "/sys/", "/dev/")
AUDIT = "NETSWAP_TAKEOVER_AUDIT"


class RingHandler(logging.Handler):
    """A logging handler that never waits: the line goes into the ring, or is dropped
    and counted when the ring is full (the writer says how many)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:  # a bad format string: logging's own report, not a crash
            self.handleError(record)
            return
        LOGS.say(line)


def install() -> None:
    """At load: every logger's WARNING and up through the ring, as logging's last
    resort would print them (the message alone)."""
    root = logging.getLogger()
    if not any(isinstance(h, RingHandler) for h in root.handlers):
        handler = RingHandler(logging.WARNING)
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
    if os.environ.get(AUDIT) == "1":
        sys.addaudithook(_AUDITOR.hook)


def start() -> None:
    """In after_fork: the writer thread (threads do not cross nbdkit's fork)."""
    LOGS.start()


def say(line: str) -> None:
    LOGS.say(f"netswap plugin: {line}")


def preload() -> str:
    """Import, before ready, what the go path would import when the device is held, and
    read the dashboard the ops endpoint serves (it reads it on the agent's loop as it
    starts: a loop waiting on a swap-in from the device it serves would never wake)."""
    loaded = 0
    for name in GO_PATH_MODULES:
        try:
            importlib.import_module(name)
            loaded += 1
        except ImportError:  # uvloop is optional: the agent falls back to asyncio's loop
            pass
    "".encode("idna")  # the codec registry's lookup too, not only the module
    from netswap.server.ops import http

    # Until server/ops/http.py reads its page once at import (asked of its owner): the
    # page read here, served from memory from now on.
    page = http.dashboard_html()
    http.dashboard_html = lambda: page
    return f"go path preloaded ({loaded} of {len(GO_PATH_MODULES)} modules, the dashboard)"


class Auditor:
    """Imports and file opens between begin() and end(), from any thread."""

    def __init__(self) -> None:
        self.recording = False
        self.seen: list[str] = []

    def hook(self, event: str, args: tuple[Any, ...]) -> None:
        if not self.recording:
            return
        if event == "import":
            self.seen.append(f"import {args[0]}")
        elif event == "open" and isinstance(args[0], str | bytes):
            path = os.fsdecode(args[0])
            if not path.startswith(NOT_FILES):
                self.seen.append(f"open {path}")

    def begin(self) -> None:
        self.seen = []
        self.recording = os.environ.get(AUDIT) == "1"

    def end(self) -> None:
        if self.recording:
            self.recording = False
            say(f"takeover audit: {len(self.seen)} imports or opens from ready to serving"
                + (f": {', '.join(self.seen[:20])}" if self.seen else ""))  # fmt: skip


_AUDITOR = Auditor()
begin_audit = _AUDITOR.begin
end_audit = _AUDITOR.end
