"""A lone write on nbdkit's own thread: its pages go to every replica without the loop.

Runs in nbdkit's worker threads, write-through only. At QD1 (a lone write: no
other pwrite under way) handing the op to the loop thread and back is a third
of its latency, as for reads (direct.py). So the thread sends the op's SwapOut
to every replica of its slab over the blocking connections of direct.py's pool,
straight from the reserve's page views (Connection.send_swap_out, sendmsg: no
copy), then collects the answers: the sends overlap, the waits do not add up.

It goes direct only when nothing about the slab is unusual: placed, every
replica IN_SYNC on an up store, no resync under way, the op within one slab.
That decision and the op's entry in `agent.slab_writes` are made under
`agent.routing`, the lock under which repair.py starts a resync: a resync
either sees this op and waits for it (as for the loop's writes), or began
first and this write goes through the loop, which sends it to the new replica
too. Anything else -- a connection busy or refused, a refusal, a deadline
passed -- hands the whole op to the loop: a write sent again is the same write
(same slots, generations and tags), and the loop owns failover and stale
replicas. A missed deadline also marks that store down, as the loop's own
links do. Acks are all-or-nothing here (every replica took every page), so the
quorum holds whatever it is.
"""

from __future__ import annotations

import time

from netswap.protocol import Ok
from netswap.server.ops.recorder import BATCH_BUCKETS, LATENCY_BUCKETS, Recorder

from .core import Agent
from .direct import DIRECT_ERRORS, DirectReads, _Conn
from .ops import WriteOp
from .placement import IN_SYNC


class DirectWrites:
    """Lone write-through ops done on the calling thread; False means: use the loop."""

    def __init__(self, agent: Agent, pool: DirectReads) -> None:
        self.agent = agent
        self.pool = pool  # its per-store connections, shared with the direct reads
        self.counters = {"direct_writes": 0, "direct_write_fallbacks": 0, "pages": 0}
        # Round trips and batch sizes of the swap-outs done here, merged into the stats
        # with the loop's; written under the pool's lock.
        self.latency = Recorder(LATENCY_BUCKETS)
        self.batches = Recorder(BATCH_BUCKETS)

    def write(self, op: WriteOp) -> bool:
        """True: every replica stored the op's pages and the op is complete."""
        agent, table = self.agent, self.agent.table
        slab = table.slab_of(op.first)
        if table.slab_of(op.first + op.count - 1) != slab:
            return self._count(False)
        with agent.routing:
            if not table.placed(slab) or slab in agent.repair.syncing:
                return self._count(False)
            stores = [s for _, s, st in table.replicas_of(slab)
                      if st == IN_SYNC and agent.links[s].up]  # fmt: skip
            if len(stores) != table.replicas:
                return self._count(False)
            agent.track_write(slab, op)
        began = time.perf_counter()
        ok = self._send(op, stores)
        agent.forget_write(op)
        if not ok:
            return self._count(False)
        for store in stores:  # acknowledged, not yet flushed (core.Agent.flush)
            agent.links[store].unflushed.add(slab)
        with self.pool.lock:
            self.latency.observe(time.perf_counter() - began)
            self.batches.observe(op.count)
            self.counters["pages"] += op.count
        op.complete()  # a resync waiting for this op may start
        return self._count(True)

    def _send(self, op: WriteOp, stores: list[int]) -> bool:
        """Send to every store, then read every answer; False on any trouble."""
        conns: list[tuple[int, _Conn]] = []
        try:
            for store in stores:
                conn = self.pool.take(store)
                if conn is None:
                    break
                conns.append((store, conn))
        except DIRECT_ERRORS:
            pass
        if len(conns) != len(stores):  # one store's connections are all busy or refused
            for store, conn in conns:
                self.pool.give(store, conn)
            return False
        views = self.agent.reserve.views
        pages = [views[b] for b in op.bufs]
        slots = range(op.first, op.first + op.count)
        timeout = self.agent.io_timeout
        end = time.monotonic() + timeout
        sent: list[tuple[int, _Conn]] = []
        for store, conn in conns:
            try:
                frame = conn.conn.send_swap_out(conn.next_id(), slots, pages, op.tags,
                                                op.generations)  # fmt: skip
                conn.send_parts(frame, timeout)
            except DIRECT_ERRORS:
                self.pool.lost(store, conn)
                continue
            sent.append((store, conn))
        ok = len(sent) == len(conns)
        for store, conn in sent:
            try:
                reply = conn.reply(end)
            except TimeoutError as exc:  # the loop's rule: a missed deadline is down
                self.pool.lost(store, conn)
                self.agent.submit(self.agent.links[store].mark_down, exc)
                ok = False
                continue
            except DIRECT_ERRORS:
                self.pool.lost(store, conn)
                ok = False
                continue
            self.pool.give(store, conn)
            ok = ok and isinstance(reply, Ok)  # a refusal: the loop's path reports it
        return ok

    def _count(self, direct: bool) -> bool:
        with self.pool.lock:
            self.counters["direct_writes" if direct else "direct_write_fallbacks"] += 1
        return direct
