"""The simulated agent: the real replica machine (client/agent/machine) behind a simulated shell.

What the agent's event loop does with real sockets (client/agent/core.py),
this does with simulated links, in the same order: it gives the machine each
event, persists the durable record whenever the machine changed it -- before
any write goes out or any answer goes back --, carries out what the machine
decided (sends, completions, repairs), and drives the machine's resyncs and
rebuilds step by step (steps.py). A Read's pages reach a resync as views of
one scratch buffer that is scribbled over as soon as the resync yields again,
as a real connection's buffer is refilled by the next reply.
"""

from __future__ import annotations

import errno
import random
from array import array
from collections.abc import Callable, Generator
from dataclasses import dataclass
from functools import partial
from typing import Any

from netswap.client.agent.jobs import ReadEntry, ReadJob, WriteJob
from netswap.client.agent.machine.machine import FAILED, PARKED, Replicas
from netswap.client.agent.machine.rebuild import prove, rebuild
from netswap.client.agent.machine.record import Record, StoreMark
from netswap.client.agent.machine.resync import resync
from netswap.client.agent.machine.slots import DOUBT, LOST, NEVER
from netswap.client.agent.machine.steps import (
    Discard,
    Gather,
    Held,
    Inventory,
    PagesRead,
    Pause,
    Read,
    Ticket,
    Wait,
    Write,
)
from netswap.client.agent.payload import FILL, split
from netswap.protocol import PAGE_SIZE, area_seed, page_tag, prove_pages

from .model import Model, content_of, page_of
from .network import UNREACHABLE, Link, Network
from .stores import SimStore
from .world import World

IO_TIMEOUT = 5.0  # the agent's RPC deadline (core.Agent's io_timeout)
TICK_S = 0.25  # how often the loop's clock work runs (core.py: PRESSURE_PERIOD_S)
BACKOFF = (0.1, 2.0)  # reconnect backoff (stores.py)
REBUILD_WAIT_S = 10.0  # startup.REBUILD_WAIT_S
SEED = area_seed("sim")
# The payload lengths the agent sends (client/agent/payload.py): same-filled, a few
# compressed sizes, whole.
LENGTHS = (FILL, 256, 768, 3072, PAGE_SIZE, PAGE_SIZE)


@dataclass
class Config:
    slots: int
    slab: int
    replicas: int
    quorum: int


class Keyring:
    """The simulated kernel keyring: survives the agent, not the host."""

    def __init__(self) -> None:
        self.record: Record | None = None
        self.writes = 0

    def put(self, record: Record) -> None:
        self.writes += 1
        self.record = copy_record(record)


def copy_record(r: Record) -> Record:
    return Record(r.area_id, r.epoch, r.replicas, r.quorum, r.slab_slots,
                  [StoreMark(s.name, s.store_id, s.boot) for s in r.stores],
                  bytearray(r.slabs), dict(r.lost))  # fmt: skip


class SimAgent:
    def __init__(self, world: World, net: Network, stores: list[SimStore], cfg: Config,
                 keyring: Keyring, model: Model, name: str, rebuilding: bool) -> None:  # fmt: skip
        self.world, self.net, self.stores, self.cfg = world, net, stores, cfg
        self.keyring, self.model, self.name = keyring, model, name
        self.m = Replicas(cfg.slots, cfg.slab, cfg.replicas, cfg.quorum,
                          [s.name for s in stores],
                          rng=random.Random(world.rng.getrandbits(32)))  # fmt: skip
        self.links: list[Link | None] = [None] * len(stores)
        self.backoff = [BACKOFF[0]] * len(stores)
        self.alive = True
        self.rebuilding = rebuilding
        self.serving = False
        self.pages: dict[WriteJob, list[tuple[int, int, bytes, None]]] = {}
        self.done: dict[WriteJob, Callable[[int], None]] = {}
        self.reads: dict[ReadEntry, Callable[[int | None], None]] = {}
        self.scratch = bytearray(PAGE_SIZE * 64)
        self.waiting: list[tuple[Generator[Any, Any, None], Wait]] = []
        self._waiting_then: dict[int, Callable[[], None] | None] = {}
        self.started = world.now

    def log(self, text: str) -> None:
        self.world.log(f"{self.name}: {text}")

    # -- life ------------------------------------------------------------------------
    def start(self) -> None:
        m, record = self.m, self.keyring.record
        m.now = self.world.now
        if self.rebuilding and record is not None:
            m.begin(copy_record(record), 0, record.area_id)
        else:
            self.rebuilding = False
            floor = record.epoch if record is not None else 0
            m.begin(None, floor, self.world.rng.getrandbits(63) | 1)
        self.log(f"starts ({'rebuild' if self.rebuilding else 'fresh'}), epoch {m.epoch}")
        self.persist()
        for store in self.stores:
            self.connect(store.index)
        if self.rebuilding:
            self.world.after(0.05, self._maybe_rebuild)
        else:
            self.serving = True
        self.world.after(TICK_S, self.tick)

    def kill(self) -> None:
        """kill -9: nothing more is sent, nothing is heard; frames on the way still land."""
        self.alive = False
        self.serving = False
        for link in self.links:
            if link is not None:
                link.drop()
        self.log("killed -9")

    def persist(self) -> None:
        record = self.m.take_record()
        if record is not None:
            self.keyring.put(record)
        while self.m.notes:
            level, text = self.m.notes.popleft()
            self.log(f"[{level}] {text}")

    def _maybe_rebuild(self) -> None:
        if not self.alive:
            return
        up = sum(self.m.stores[i].up for i in range(len(self.stores)))
        waited = self.world.now - self.started
        if up == len(self.stores) or (up and waited >= REBUILD_WAIT_S):
            self.log(f"rebuilds from {up} stores")
            self.drive(rebuild(self.m), self._rebuilt)
        else:
            self.world.after(0.1, self._maybe_rebuild)

    def _rebuilt(self) -> None:
        self.serving = True
        self.log(f"rebuilt: {self.m.unreadable()}")

    # -- stores ------------------------------------------------------------------------
    def connect(self, index: int) -> None:
        if not self.alive:
            return
        link = Link(self.net, self.stores[index], IO_TIMEOUT, self._link_failed)
        self.links[index] = link
        link.send(("hello",), lambda answer: self._welcomed(link, answer))

    def _welcomed(self, link: Link, answer: Any) -> None:
        if not self.alive or link is not self.links[link.store.index]:
            return
        if not isinstance(answer, tuple):
            return self._retry(link)
        _, store_id, boot, prev_boot, clean, area_id, _, _ = answer
        ours = self.m.record.area_id
        kept = area_id == ours

        def fenced(outcome: Any) -> None:
            if not self.alive or link is not self.links[link.store.index]:
                return
            if outcome == errno.ESTALE:
                self.m.fenced(link.store.index, f"store {link.store.name}: a newer agent "
                              "holds the area")  # fmt: skip
                self.persist()
                return
            if outcome != 0:
                return self._retry(link)
            self.m.now = self.world.now
            self.m.store_up(link.store.index, store_id, boot, kept, prev_boot, clean)
            self.backoff[link.store.index] = BACKOFF[0]
            self.log(f"store {link.store.name} up (boot {boot:x}, kept {kept})")
            self.persist()
            for slab in self.m.take_leftovers(link.store.index):
                span = self.m.table.slab_slots(slab)
                link.send(("discard", [(span.start, len(span))]), lambda _: None)
            self._reroute()

        def activated(outcome: Any) -> None:
            if outcome != 0:
                if outcome == errno.ESTALE:
                    return fenced(outcome)
                return self._retry(link)
            link.send(("fence", self.m.epoch), fenced)

        if kept:
            link.send(("fence", self.m.epoch), fenced)
        else:
            link.send(("swapfile", ours, self.cfg.slots, True), activated)

    def _retry(self, link: Link) -> None:
        link.close()
        index = link.store.index
        delay = self.backoff[index]
        self.backoff[index] = min(BACKOFF[1], delay * 2)
        self.world.after(delay, self._reconnect, link)

    def _reconnect(self, link: Link) -> None:
        if self.alive and self.links[link.store.index] is link:
            self.connect(link.store.index)

    def _link_failed(self, link: Link) -> None:
        """A deadline passed on a link: the store is down (the machine's rule)."""
        index = link.store.index
        if not self.alive or self.links[index] is not link:
            return
        if self.m.stores[index].up:
            self.log(f"store {link.store.name} down")
            self.m.now = self.world.now
            self.m.store_down(index)
            self.persist()
        self._retry(link)

    def _send(self, index: int, request: tuple[Any, ...], reply: Callable[[Any], None]) -> None:
        link = self.links[index]
        if link is None or not self.m.stores[index].up:
            self.world.after(0, reply, UNREACHABLE)
            return
        link.send(request, reply)

    # -- writes ------------------------------------------------------------------------
    def write(self, first: int, contents: list[int], done: Callable[[int], None]) -> None:
        m = self.m
        m.now = self.world.now
        job = WriteJob(first, len(contents), [])
        m.begin_write(job)
        rng = self.world.rng
        payloads = [page_of(c, rng.choice(LENGTHS)) for c in contents]
        self.pages[job] = [(job.generations[i], page_tag(p, SEED, first + i, job.generations[i]),
                            p, None) for i, p in enumerate(payloads)]  # fmt: skip
        for i, c in enumerate(contents):
            self.model.issued(first + i, c, job.generations[i])
        self.done[job] = done
        self.persist()
        self._route(job)

    def _route(self, job: WriteJob) -> None:
        m = self.m
        m.now = self.world.now
        sends = m.route_write(job)
        self.persist()
        pages = self.pages[job]
        for store, start, count in sends:
            slots = list(range(job.first + start, job.first + start + count))
            answered = partial(self._written, store, job, start, count)
            self._send(store, ("write", slots, pages[start : start + count]), answered)
        self._finish()

    def _written(self, store: int, job: WriteJob, start: int, count: int, outcome: int) -> None:
        if not self.alive:
            return
        self.m.now = self.world.now
        self.m.write_answered(store, job, start, count, outcome)
        self.persist()
        self._finish()

    def _finish(self) -> None:
        for job in self.m.take_finished():
            self.pages.pop(job, None)
            done = self.done.pop(job, None)
            if done is not None:
                done(job.error)
        for entry in self.m.take_failed_reads():
            self._read_done(entry, None)

    def trim(self, first: int, count: int) -> None:
        self.m.now = self.world.now
        for store, ranges in self.m.trim(first, count):
            self._send(store, ("discard", ranges), lambda _: None)

    def flush(self) -> None:
        for index in range(len(self.stores)):
            if self.m.stores[index].up:
                self._send(index, ("flush",), lambda _: None)

    # -- reads -------------------------------------------------------------------------
    def read(self, slot: int, done: Callable[[int | None], None]) -> None:
        m = self.m
        m.now = self.world.now
        ((state, gen),) = m.read_plan(slot, 1)
        if state == NEVER:
            return done(0)
        if state in (LOST, DOUBT):
            return done(None)
        entry = ReadEntry(ReadJob([slot], array("Q", [gen]), bytearray()), 0, self.world.now)
        self.reads[entry] = done
        self._route_read(entry)

    def _route_read(self, entry: ReadEntry) -> None:
        m = self.m
        m.now = self.world.now
        store = m.route_read(entry)
        if store == FAILED:
            self._read_done(entry, None)
        elif store != PARKED:
            self._send(store, ("read", [entry.slot]),
                       lambda answer: self._read_answered(store, entry, answer))  # fmt: skip

    def _read_answered(self, store: int, entry: ReadEntry, answer: Any) -> None:
        if not self.alive:
            return
        if isinstance(answer, int):
            if answer == UNREACHABLE:
                entry.tried &= ~(1 << store)  # it may answer when it is back
            return self._route_read(entry)
        page = answer[0]
        if page is None:
            return self._route_read(entry)
        gen, tag, data, _ = page
        slots = self.m.slots
        failure = prove_pages(SEED, data, array("I", [tag]), array("Q", [gen]), [entry.slot],
                              array("Q", [entry.gen]),
                              lambda: array("Q", [slots.gens[entry.slot]]),
                              [len(data)])  # fmt: skip
        if failure is not None:
            return self._route_read(entry)
        self._read_done(entry, content_of(data))

    def _read_done(self, entry: ReadEntry, got: int | None) -> None:
        done = self.reads.pop(entry, None)
        if done is not None:
            done(got)

    def _reroute(self) -> None:
        writes, reads = self.m.take_parked()
        for job in writes:
            self._route(job)
        for entry in reads:
            self._route_read(entry)
        self._finish()

    # -- the clock ---------------------------------------------------------------------
    def tick(self) -> None:
        if not self.alive:
            return
        m = self.m
        m.now = self.world.now
        m.expire()
        self._finish()
        if self.serving:
            for slab, position in m.repairs():
                self.drive(resync(m, slab, position, SEED, IO_TIMEOUT))
            for slab in m.proofs():
                self.drive(prove(m, slab))
            self.persist()
            if m.parked_reads or m.parked_writes:
                self._reroute()
        self.world.after(TICK_S, self.tick)

    # -- driving the machine's tasks --------------------------------------------------------
    def drive(self, task: Generator[Any, Any, None], then: Callable[[], None] | None = None,
              answer: Any = None) -> None:  # fmt: skip
        while self.alive:
            self.m.now = self.world.now
            try:
                step = task.send(answer)
            except StopIteration:
                self.persist()
                self._finish()
                if then is not None:
                    then()
                return
            self.persist()
            self.scratch[:] = b"\xee" * len(self.scratch)  # the views it had are gone
            answer = self._perform(task, then, step)
            if answer is _LATER:
                return

    def _perform(self, task: Generator[Any, Any, None], then: Callable[[], None] | None,
                 step: Any) -> Any:  # fmt: skip
        resume = lambda answer: self.drive(task, then, answer)  # noqa: E731
        if isinstance(step, Pause):
            self.world.after(step.seconds, resume, None)
        elif isinstance(step, Gather):
            answers: list[Any] = [None] * len(step.steps)
            left = [len(step.steps)]

            def one(i: int, answer: Any) -> None:
                answers[i] = answer
                left[0] -= 1
                if left[0] == 0:
                    resume(answers)

            if not step.steps:
                return []
            for i, sub in enumerate(step.steps):
                self._inventory(sub, lambda a, i=i: one(i, a))
        elif isinstance(step, Inventory):
            self._inventory(step, resume)
        elif isinstance(step, Read):
            self._send(step.store, ("read", step.slots),
                       lambda answer: resume(self._pages_read(step, answer)))  # fmt: skip
        elif isinstance(step, Write):
            ticket = Ticket()
            payloads = split(memoryview(step.data), step.lengths)
            pages = [(step.generations[i], step.tags[i], bytes(payloads[i]), None)
                     for i in range(len(step.slots))]  # fmt: skip
            self._send(step.store, ("write", step.slots, pages),
                       lambda outcome: self._ticket(ticket, outcome))  # fmt: skip
            return ticket
        elif isinstance(step, Discard):
            ticket = Ticket()
            self._send(step.store, ("discard", list(step.ranges)),
                       lambda outcome: self._ticket(ticket, outcome))  # fmt: skip
            return ticket
        elif isinstance(step, Wait):
            if all(t.outcome is not None for t in step.tickets):
                return [t.outcome for t in step.tickets]
            self.waiting.append((task, step))
            self._waiting_then[id(task)] = then
        else:
            raise TypeError(f"unknown step {step!r}")
        return _LATER

    def _ticket(self, ticket: Ticket, outcome: int) -> None:
        ticket.outcome = outcome if isinstance(outcome, int) else 0
        ready = [(t, w) for t, w in self.waiting if all(x.outcome is not None for x in w.tickets)]
        for task, wait in ready:
            self.waiting.remove((task, wait))
            then = self._waiting_then.pop(id(task), None)
            self.drive(task, then, [x.outcome for x in wait.tickets])

    def _inventory(self, step: Inventory, back: Callable[[Any], None]) -> None:
        def answered(answer: Any) -> None:
            if isinstance(answer, int):
                back(answer)
                return
            slots = sorted(answer)
            back(Held(array("Q", slots), array("Q", [answer[s] for s in slots])))

        self._send(step.store, ("inventory", step.first, step.count), answered)

    def _pages_read(self, step: Read, answer: Any) -> Any:
        """A Read's answer as views of the scratch buffer (valid until the next yield)."""
        if isinstance(answer, int):
            return answer
        scratch = memoryview(self.scratch)
        tags, gens, lengths = array("I"), array("Q"), array("H")
        at = 0
        for page in answer:
            payload = bytes(PAGE_SIZE) if page is None else page[2]
            scratch[at : at + len(payload)] = payload
            at += len(payload)
            lengths.append(len(payload))
            tags.append(0 if page is None else page[1])
            gens.append(0 if page is None else page[0])
        return PagesRead(scratch[:at], tags, gens, None, lengths)


_LATER = object()
