"""make bench-compiled: each compiled module's hot functions, compiled against pure Python.

Runs the same timings twice in fresh interpreters: once as installed (with
whatever deploy/compile.py built), once with every netswap module loaded from
its .py source (a finder placed before the extension loader). Prints µs per
call both ways and the ratio, per module: deploy/compile.py keeps a module
compiled only where this shows it pays. CPU time (time.process_time), best of
REPEATS, so the other core's load moves it little.
"""

from __future__ import annotations

import json
import subprocess
import sys

REPEATS = 5

# Runs in the child: `pure` decides whether netswap's modules load from source.
CHILD = r"""
import importlib.abc, importlib.machinery, importlib.util, json, os, sys, time
from pathlib import Path
PURE = sys.argv[1] == "pure"
ROOT = Path(sys.argv[2])
if PURE:
    class Source(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            parts = name.split(".")
            if len(parts) < 3 or parts[0] != "netswap":
                return None
            base = ROOT / parts[1] / Path(*parts[2:])
            for candidate in (base.with_suffix(".py"), base / "__init__.py"):
                if candidate.exists():
                    is_pkg = candidate.name == "__init__.py"
                    return importlib.util.spec_from_file_location(
                        name, candidate,
                        submodule_search_locations=[str(candidate.parent)] if is_pkg else None)
            return None
    sys.meta_path.insert(0, Source())

import asyncio
from array import array
from netswap import protocol as p
from netswap.protocol import codec, runs as prun
from netswap.protocol.connection import Connection, Role
from netswap.server.backends import MemoryBackend
from netswap.server.service import StoreService, Tokens
from netswap.client.agent.machine.slots import Slots
from netswap.client import rpc

REPEATS = int(sys.argv[3])
PAGE = 4096

def best(fn, n):
    times = []
    for _ in range(REPEATS):
        began = time.process_time()
        for _ in range(n):
            fn()
        times.append((time.process_time() - began) / n * 1e6)
    return min(times)

def frames():
    one = p.SwapOut(1, range(5, 6), bytes(PAGE), [7], [1 << 32 | 1])
    many = p.SwapOut(2, range(64, 96), bytes(32 * PAGE), list(range(32)), [1 << 32 | 1] * 32)
    return memoryview(p.encode(one))[4:], memoryview(p.encode(many))[4:]

out = {}
one, many = frames()
out["protocol/codec.py: decode a 1-page SwapOut"] = best(lambda: codec.decode(one), 20000)
out["protocol/codec.py: decode a 32-page SwapOut"] = best(lambda: codec.decode(many), 10000)
gens, tags = array("Q", [1 << 32 | 1] * 32), array("I", range(32))
views = [memoryview(bytes(PAGE))] * 32
run32 = (range(64, 96),)
out["protocol/codec.py: frame a 32-page SwapOut"] = best(
    lambda: codec.swap_out_parts(3, run32, gens, tags, None, views), 10000)
out["protocol/runs.py: runs of 64 scattered slots"] = best(
    lambda: prun.runs_of(list(range(0, 128, 2))), 5000)

client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
server.receive_data(client.send(p.Hello(0, p.PROTOCOL_VERSION, "a", "")))
server.next_event()
client.receive_data(server.send(p.Welcome(0, p.PROTOCOL_VERSION, 0, 1)))
client.next_event()
page = bytearray(PAGE)
rid = [10]
def exchange():
    rid[0] += 1
    server.receive_data(client.send(p.SwapIn(rid[0], (range(3, 4),))))
    request = server.next_event()
    for part in server.send_parts(p.Pages(rid[0], page, [1], [1])):
        client.receive_data(part)
    client.next_event()
out["protocol/connection.py: a 1-page SwapIn and its Pages, both ends"] = best(exchange, 10000)

backend = MemoryBackend(4096)
service = StoreService(backend, Tokens.open())
session = service.session()
session.handle(p.Hello(1, p.PROTOCOL_VERSION, "a", ""))
session.handle(p.Swapfile(2, True, 4096))
w1 = codec.decode(one)
w32 = codec.decode(many)
out["server/service.py + backends: a 1-page SwapOut"] = best(lambda: session.handle(w1), 20000)
out["server/service.py + backends: a 32-page SwapOut"] = best(lambda: session.handle(w32), 5000)
r1 = p.SwapIn(9, (range(5, 6),))
r32 = p.SwapIn(9, (range(64, 96),))
out["server/service.py + backends: a 1-page SwapIn"] = best(lambda: session.handle(r1), 20000)
out["server/service.py + backends: a 32-page SwapIn"] = best(lambda: session.handle(r32), 5000)

slots = Slots(1 << 16)
out["client/agent/machine/slots.py: write 1 slot"] = best(lambda: slots.write(100, 1), 20000)
out["client/agent/machine/slots.py: write 32 slots"] = best(lambda: slots.write(200, 32), 10000)
reply = p.Pages(1, bytes(32 * PAGE), [0] * 32, [1] * 32)
seed = p.area_seed("a")
from netswap.protocol import tags_of
reply = p.Pages(1, bytes(32 * PAGE), tags_of(bytes(32 * PAGE), seed, range(64, 96), [1] * 32),
                [1] * 32)
from netswap.protocol import prove_pages
gens = array("Q", [1] * 32)
out["client/agent/protocol/proof.py: prove 32 pages"] = best(
    lambda: prove_pages(seed, reply.data, reply.tags, reply.generations, range(64, 96), gens),
    5000)

# The agent's loop path for one 4 KiB write: routing, batching, framing, the answer.
from netswap.client.agent.core import Agent
from netswap.client.agent.jobs import WriteJob
from netswap.client.agent.reserve import Reserve

class Client:
    connected = True
    def start_swap_out(self, runs, pages, tags, gens, seals, done):
        codec.swap_out_parts(1, runs, gens, tags, seals, pages)
        done(None)

async def loop_path():
    agent = Agent([("x", 1)], "a", 1 << 16, Reserve(1 << 20), replicas=1, slab_slots=1 << 14)
    store = agent.stores[0]
    store.client = Client()
    agent.loop = asyncio.get_running_loop()
    machine = agent.machine
    machine.begin(None, 0, 1)
    machine.store_up(0, 1, 1, True)
    agent.settle()
    def one_write():
        job = WriteJob(7, 1, [0])
        with machine.lock:
            machine.begin_write(job)
        job.tags = array("I", [1])
        agent.route_write(job)
        assert job.done.is_set()
    return best(one_write, 20000)

out["client/agent (machine, batches, jobs): a 4 KiB write on the loop"] = asyncio.run(loop_path())
print(json.dumps(out))
"""


def measure(mode: str) -> dict[str, float]:
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent.parent
    done = subprocess.run([sys.executable, "-c", CHILD, mode, str(root), str(REPEATS)],
                          capture_output=True, text=True, check=False)  # fmt: skip
    if done.returncode:
        raise SystemExit(f"bench-compiled ({mode}) failed:\n{done.stderr[-3000:]}")
    figures: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return figures


def main() -> None:
    compiled, pure = measure("installed"), measure("pure")
    print(f"{'µs per call (CPU, best of ' + str(REPEATS) + ')':<70}{'compiled':>10}{'pure':>9}"
          f"{'pure/compiled':>15}")  # fmt: skip
    for name, fast in compiled.items():
        slow = pure[name]
        print(f"{name:<70}{fast:>10.2f}{slow:>9.2f}{slow / fast:>14.2f}x")


if __name__ == "__main__":
    main()
