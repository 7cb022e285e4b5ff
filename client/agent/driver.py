"""Runs the machine's long tasks (a resync, a rebuild, a late proof) over the real stores.

A task is a generator over the machine (machine/steps.py): it yields a step,
the driver performs it on the agent's loop and sends the outcome back, the
task running under the machine's lock between two yields. A Read's pages are
handed over inside the callback that receives them, as views of the
connection's buffer, valid until the task yields again (the task copies what
it keeps). Writes and discards go out at once and answer through a Ticket the
task waits on. Whatever a step cannot reach -- a store not up, a transport that
fails -- answers UNREACHABLE, and a failed transport marks its store down (the
machine's rule: a store that does not answer is down, nothing more).
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Callable, Coroutine, Generator
from typing import TYPE_CHECKING, Any

from netswap.protocol import Pages, StoreError
from netswap.protocol.runs import runs_of

from .machine.steps import (
    UNREACHABLE,
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
from .payload import lengths_of, split
from .stores import TRANSPORT_ERRORS, Store

if TYPE_CHECKING:
    from .core import Agent

Task = Generator[Any, Any, None]
_LATER = object()


class Driver:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.waiting: list[tuple[Task, Wait, Callable[[], None] | None]] = []
        self.tasks = 0  # under way, for the figures

    def start(self, task: Task, then: Callable[[], None] | None = None) -> None:
        self.tasks += 1
        self.resume(task, None, then)

    def resume(self, task: Task, answer: Any, then: Callable[[], None] | None) -> None:
        agent = self.agent
        machine = agent.machine
        while True:
            with machine.lock:
                machine.now = agent.clock()
                try:
                    step = task.send(answer)
                except StopIteration:
                    step = None
                except Exception:  # a bug in a task must not stop the loop
                    agent.log_exception("a repair task failed")
                    step = None
            if step is None:
                self.tasks -= 1
                agent.settle()
                if then is not None:
                    then()
                return
            agent.settle()
            answer = self._perform(task, step, then)
            if answer is _LATER:
                return

    def _perform(self, task: Task, step: Any, then: Callable[[], None] | None) -> Any:
        def back(answer: Any) -> None:
            self.resume(task, answer, then)

        if isinstance(step, Pause):
            asyncio.get_running_loop().call_later(step.seconds, back, None)
        elif isinstance(step, Inventory):
            self._async(step.store, self._inventory(step), back)
        elif isinstance(step, Gather):
            self._async(-1, self._gather(step), back)
        elif isinstance(step, Read):
            self._read(step, back)
        elif isinstance(step, Write):
            return self._write(step)
        elif isinstance(step, Discard):
            ticket = Ticket()
            self._async(step.store, self._discard(step),
                        lambda outcome: self._answered(ticket, outcome))  # fmt: skip
            return ticket
        elif isinstance(step, Wait):
            if all(t.outcome is not None for t in step.tickets):
                return [t.outcome for t in step.tickets]
            self.waiting.append((task, step, then))
        else:
            raise TypeError(f"not a step: {step!r}")
        return _LATER

    # -- steps ------------------------------------------------------------------------
    def _client(self, index: int) -> Store | None:
        store = self.agent.stores[index]
        return store if store.client is not None and self.agent.machine.stores[index].up else None

    async def _inventory(self, step: Inventory) -> Held | int:
        store = self._client(step.store)
        if store is None or store.client is None:
            return UNREACHABLE
        try:
            slots, gens, _ = await store.client.inventory(step.first, step.count)
        except StoreError as exc:
            return exc.errno
        except TRANSPORT_ERRORS as exc:
            store.mark_down(exc)
            return UNREACHABLE
        return Held(slots, gens)

    async def _gather(self, step: Gather) -> list[Held | int]:
        return list(await asyncio.gather(*(self._inventory(s) for s in step.steps)))

    async def _discard(self, step: Discard) -> int:
        store = self._client(step.store)
        if store is None or store.client is None:
            return UNREACHABLE
        try:
            await store.client.discard(list(step.ranges))
        except StoreError as exc:
            return exc.errno
        except TRANSPORT_ERRORS as exc:
            store.mark_down(exc)
            return UNREACHABLE
        return 0

    def _async(
        self, index: int, coro: Coroutine[Any, Any, Any], back: Callable[[Any], None]
    ) -> None:
        def done(future: asyncio.Future[Any]) -> None:
            try:
                answer = future.result()
            except Exception:
                answer = UNREACHABLE
            back(answer)

        asyncio.ensure_future(coro).add_done_callback(done)

    def _read(self, step: Read, back: Callable[[Any], None]) -> None:
        store = self._client(step.store)
        loop = asyncio.get_running_loop()
        if store is None or store.client is None:
            loop.call_soon(back, UNREACHABLE)
            return
        client = store.client

        def done(reply: Pages | None, failure: Exception | None) -> None:
            if failure is not None or reply is None:
                back(self._outcome(store, client, failure))
                return
            seals = memoryview(reply.seals) if reply.seals is not None else None
            lengths = lengths_of(reply, len(step.slots))
            back(PagesRead(memoryview(reply.data), reply.tags, reply.generations, seals, lengths))

        client.start_swap_in(runs_of(step.slots), step.sealed, done)

    def _write(self, step: Write) -> Ticket:
        ticket = Ticket()
        store = self._client(step.store)
        if store is None or store.client is None:
            asyncio.get_running_loop().call_soon(self._answered, ticket, UNREACHABLE)
            return ticket
        client = store.client
        pages = split(memoryview(step.data), step.lengths)

        def done(failure: Exception | None) -> None:
            self._answered(ticket, self._outcome(store, client, failure))

        client.start_swap_out(runs_of(step.slots), pages, step.tags, step.generations,
                              step.seals, done)  # fmt: skip
        return ticket

    @staticmethod
    def _outcome(store: Store, client: object, failure: Exception | None) -> int:
        if failure is None:
            return 0
        if isinstance(failure, StoreError):
            return failure.errno or errno.EIO
        if store.client is client:
            store.mark_down(failure)
        return UNREACHABLE

    def _answered(self, ticket: Ticket, outcome: int) -> None:
        ticket.outcome = outcome
        ready = [w for w in self.waiting if all(t.outcome is not None for t in w[1].tickets)]
        for entry in ready:
            self.waiting.remove(entry)
        for task, wait, then in ready:
            self.resume(task, [t.outcome for t in wait.tickets], then)
