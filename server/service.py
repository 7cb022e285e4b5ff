"""The page store's request logic, free of I/O: one Session per connection.

A session starts unbound; Hello authenticates it and binds it to exactly one
area, and every later request acts on that area only -- so a client that
proved itself for area A has no way to even name area B. Backend refusals
become Failed replies with their errno; nothing a client sends raises here.

A session also carries the epoch it fenced with (claims.py: a session below
its area's floor changes nothing), and the service turns on the backend's
newer-only writes: a page no newer than the one its slot holds is skipped.

Every request's work on the loop is bounded: batches by MAX_BATCH_PAGES, and
the three whose work a client can make large -- a Discard's ranges, releasing
an area, a Flush of many clusters -- come back as `Slices`, run SLICE_UNITS at
a time between other clients' requests (transport.py), with their reply sent
when the last is done; a Flush's fsyncs run in a thread while the loop serves.
"""

from __future__ import annotations

import errno
import itertools
import time
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass

from netswap.protocol import (
    PAGE_SIZE,
    PROTOCOL_VERSION,
    Discard,
    Failed,
    Fence,
    Flush,
    Held,
    Hello,
    Inventory,
    Ok,
    Pages,
    Reply,
    Request,
    Stats,
    StatsReply,
    StoreError,
    Swapfile,
    SwapIn,
    SwapOut,
    Welcome,
)
from netswap.protocol.limits import MAX_REASON_SIZE

from . import claims
from .backends import PageBackend
from .backends.base import Step
from .guard import AuthThrottle, Limits, PartialBudget
from .ops.recorder import BATCH_BUCKETS, LATENCY_BUCKETS, Recorder
from .tokens import ADMIN, Tokens

__all__ = ["ADMIN", "Session", "Slices", "StoreService", "Tokens", "failed"]

# Work units one slice may do before other clients' requests run: a unit is ~0.2 us
# (one page unmapped, one cluster passed over; a held cluster scanned is 32: see
# backends/base.py), so a slice holds the loop for about a millisecond
# (tests/test_store_hardening.py measures another client's p99 meanwhile).
SLICE_UNITS = 4096


@dataclass
class Slices:
    """A request whose work runs a slice at a time; `reply` once `steps` run out."""

    steps: Iterator[Step]
    reply: Reply

    def run_slice(self) -> bool | Future[None]:
        """Do up to SLICE_UNITS of work: True when all of it is done, a Future when
        the next slice must wait for it (an fsync in a thread)."""
        done = 0
        try:
            for step in self.steps:
                if isinstance(step, Future):
                    return step
                done += step
                if done >= SLICE_UNITS:
                    return False
        except StoreError as exc:
            self.reply = failed(self.reply.request_id, exc)
        return True


def failed(request_id: int, exc: StoreError) -> Failed:
    """A backend's refusal as the reply that carries its errno (reason bounded)."""
    return Failed(request_id, exc.errno, exc.reason[:MAX_REASON_SIZE])


class StoreService:
    """State shared by all sessions: the backend, the tokens, the counters."""

    def __init__(self, backend: PageBackend, tokens: Tokens, limits: Limits | None = None) -> None:
        self.backend = backend
        # A store's writes are newer-only (runs.py): a replayed or late SwapOut never
        # rolls a slot back. The embedded device, which writes LOCAL_GENERATION each
        # time, does not set it.
        backend.newer_only = True
        self.tokens = tokens
        self.limits = limits or Limits()
        self.throttle = AuthThrottle()
        self.partial = PartialBudget(self.limits.partial_budget)
        self.counters = {
            "connections": 0,
            "protocol_errors": 0,
            "auth_failures": 0,
            "connections_refused": 0,
            "handshake_timeouts": 0,
            "frame_timeouts": 0,
        }
        self.recorders = {
            "latency": {op: Recorder(LATENCY_BUCKETS) for op in ("swap_out", "swap_in")},
            "batch": {op: Recorder(BATCH_BUCKETS) for op in ("swap_out", "swap_in")},
        }

    def session(self) -> Session:
        self.counters["connections"] += 1
        return Session(self)

    def stats(self) -> dict[str, int]:
        return {**self.backend.stats(), **self.counters}


class Session:
    def __init__(self, service: StoreService) -> None:
        self.service = service
        self.area_name: str | None = None
        self.admin = False  # may see the whole store's Stats (an @admin token)
        self.epoch = 0  # the epoch this session fenced with (0: never)

    def handle(self, request: Request) -> Reply | Slices:
        rid = request.request_id
        try:
            return self._dispatch(request)
        except StoreError as exc:
            return failed(rid, exc)

    def _dispatch(self, request: Request) -> Reply | Slices:
        rid = request.request_id
        if isinstance(request, Hello):
            return self._hello(request)
        if self.area_name is None:
            raise StoreError(errno.EPERM, "send Hello first")
        backend = self.service.backend
        if isinstance(request, SwapOut):
            began = time.perf_counter()
            self._current()
            area = backend.area(self.area_name)
            data = memoryview(request.data)
            backend.write_runs(area, request.runs, data, request.tags, request.generations,
                               request.seals, request.sized_lengths)  # fmt: skip
            self._observe("swap_out", len(request.tags), began)
            return Ok(rid)
        if isinstance(request, SwapIn):
            began = time.perf_counter()
            area = backend.area(self.area_name)
            out, lengths, tags, gens, seals = backend.read_payloads(area, request.runs,
                                                                    request.sealed)  # fmt: skip
            self._observe("swap_in", len(tags), began)
            # The bytearray goes out as is (codec.encode_parts), without a copy into bytes.
            return Pages(rid, out, tags, gens, seals, lengths)
        if isinstance(request, Inventory):
            area = backend.area(self.area_name)
            return Held(rid, *backend.inventory(area, request.first, request.count))
        if isinstance(request, Discard):
            self._current()
            area = backend.area(self.area_name)
            for start, count in request.ranges:  # all or nothing: check before any work
                if start + count > area.pages:
                    raise StoreError(errno.EINVAL, f"discard beyond area end ({area.pages})")
            steps = (backend.discard_steps(area, s, c) for s, c in request.ranges)
            return Slices(self._while_current(itertools.chain.from_iterable(steps)), Ok(rid))
        if isinstance(request, Fence):
            return Slices(self._fence(request.epoch), Ok(rid))
        if isinstance(request, Flush):
            return Slices(backend.flush_steps(), Ok(rid))
        if isinstance(request, Swapfile):
            return self._swapfile(request)
        if isinstance(request, Stats):
            mine = backend.areas.get(self.area_name)
            own = backend.area_stats(mine) if mine is not None else {}
            if not self.admin:  # other areas' load is not this client's business
                own = own or backend.space()
                return StatsReply.from_mapping(rid, own)
            return StatsReply.from_mapping(rid, {**self.service.stats(), **own})
        raise StoreError(errno.EOPNOTSUPP, f"unsupported request {type(request).__name__}")

    def _current(self) -> None:
        """Refuse (ESTALE) a change from a session below its area's floor."""
        assert self.area_name is not None
        floor = self.service.backend.floors.get(self.area_name, 0)
        if self.epoch < floor:
            raise claims.stale(self.area_name, self.epoch, floor)

    def _while_current(self, steps: Iterator[Step]) -> Iterator[Step]:
        """A sliced change, stopped (ESTALE) at the first slice after a newer Fence."""
        for step in steps:
            self._current()
            yield step

    def _fence(self, epoch: int) -> Iterator[Step]:
        assert self.area_name is not None
        yield from claims.fence_steps(self.service.backend, self.area_name, epoch)
        self.epoch = epoch

    def _observe(self, op: str, pages: int, began: float) -> None:
        """Service time of one batch at the store (the agent measures round trips)."""
        recorders = self.service.recorders
        recorders["latency"][op].observe(time.perf_counter() - began)
        recorders["batch"][op].observe(pages)

    def _hello(self, hello: Hello) -> Reply:
        if self.area_name is not None:
            raise StoreError(errno.EINVAL, "this connection is already bound to an area")
        if hello.version != PROTOCOL_VERSION:
            raise StoreError(errno.EPROTONOSUPPORT, f"the client speaks protocol {hello.version}, "
                             f"this store protocol {PROTOCOL_VERSION}: run the same netswap "
                             "on both")  # fmt: skip
        if not self.service.tokens.allows(hello.area, hello.token):
            self.service.counters["auth_failures"] += 1
            raise StoreError(errno.EPERM, f"token not valid for area {hello.area}")
        self.area_name = hello.area
        self.admin = self.service.tokens.is_admin(hello.token)
        b = self.service.backend
        area = b.areas.get(hello.area)
        return Welcome(hello.request_id, PROTOCOL_VERSION, area.pages if area else 0,
                       b.capacity_pages, b.store_id, b.boot, b.prev_boot, b.clean,
                       area.area_id if area else 0, area.holder if area else "",
                       b.floors.get(hello.area, 0))  # fmt: skip

    def _swapfile(self, request: Swapfile) -> Reply | Slices:
        assert self.area_name is not None
        if request.page_size != PAGE_SIZE:
            raise StoreError(errno.EINVAL, f"page size {request.page_size}; store uses {PAGE_SIZE}")
        self._current()
        backend, rid = self.service.backend, request.request_id
        if request.activate:
            if request.slots == 0:
                raise StoreError(errno.EINVAL, "an area needs at least one page")
            steps = claims.activate_steps(backend, self.area_name, request)
            return Ok(rid) if steps is None else Slices(steps, Ok(rid))
        return Slices(claims.release_steps(backend, self.area_name, request), Ok(rid))
