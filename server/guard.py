"""What a store lets peers cost it before and after they prove who they are.

The store answers anyone who connects, so each thing a peer can make it hold
has a bound here: how many connections (refused past `max_connections`, each
refusal counted, logged once per interval), how long a peer may take to send
its Hello (`handshake_s`), how large a frame it may send before then
(protocol MAX_HELLO_FRAME), how fast one source may guess tokens (each failed
Hello closes its connection, after a delay that doubles per recent failure of
that source), and how many bytes of unfinished frames all peers together may
park in the store (`partial_budget`: past it, connections stop being read
until others finish their frames; a partial frame that makes no progress for
`frame_s` closes its connection, so the budget always comes back).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

from netswap.protocol import MAX_FRAME_SIZE


@dataclass(frozen=True)
class Limits:
    # Below a default soft RLIMIT_NOFILE of 1024, with room for the store's own files
    # and the ops endpoint; `--max-connections` raises it with the limit.
    max_connections: int = 960
    # A Hello is one small frame; an agent sends it within a round trip of connecting.
    handshake_s: float = 5.0
    # Every agent batch is one frame of <= MAX_FRAME_SIZE sent in one write; a frame
    # still unfinished after this long is a peer holding memory, not a slow link.
    frame_s: float = 10.0
    # 64 full frames in flight at once across all peers (~68 MiB): more than the
    # MAX_INFLIGHT (4) batches of 16 agents, each on the wire at the same instant.
    partial_budget: int = 64 * MAX_FRAME_SIZE


class AuthThrottle:
    """Per source address: how long to hold a failed Hello's answer (and close)."""

    BASE_S = 0.1  # the first failure of a source: a typo costs a tenth of a second
    MAX_S = 10.0  # a guesser waits at most this long per guess (and per connection)
    FORGET_S = 60.0  # a source with no failure for a minute starts again at BASE_S
    SOURCES = 4096  # sources remembered (oldest forgotten first): ~0.5 MiB at most

    def __init__(self) -> None:
        self._recent: OrderedDict[str, tuple[int, float]] = OrderedDict()

    def failed(self, source: str) -> float:
        """Record a failure of `source`; returns the delay to impose on it."""
        now = time.monotonic()
        count, last = self._recent.pop(source, (0, now))
        if now - last > self.FORGET_S:
            count = 0
        self._recent[source] = (count + 1, now)
        while len(self._recent) > self.SOURCES:
            self._recent.popitem(last=False)
        return float(min(self.BASE_S * 2**count, self.MAX_S))


class RateLimitedLog:
    """One line per kind of event per interval, saying how many were held back."""

    INTERVAL_S = 10.0
    KINDS = 64  # distinct kinds kept; kinds are code-chosen, not peer-chosen

    def __init__(self, log: logging.Logger) -> None:
        self._log = log
        self._kinds: OrderedDict[str, tuple[float, int]] = OrderedDict()

    def warning(self, kind: str, message: str, *args: object) -> None:
        now = time.monotonic()
        last, held = self._kinds.get(kind, (0.0, 0))
        if last and now - last < self.INTERVAL_S:
            self._kinds[kind] = (last, held + 1)
            return
        self._kinds[kind] = (now, 0)
        self._kinds.move_to_end(kind)
        while len(self._kinds) > self.KINDS:
            self._kinds.popitem(last=False)
        suffix = f" (and {held} more like it in the last {self.INTERVAL_S:.0f}s)" if held else ""
        self._log.warning(message + suffix, *args)


class PartialBudget:
    """Bytes of unfinished frames, all connections together, and who waits on them."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self.waiting: OrderedDict[object, None] = OrderedDict()  # paused, in arrival order

    def over(self) -> bool:
        return self.held > self.limit
