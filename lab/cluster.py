"""A Redis cluster of real redis-server processes on 127.0.0.1, for tests, benchmarks
and `netswap lab vm --backend cluster`.

Debian's redis-server 7.0 (cluster mode, BSD-licensed) on free ports, each in its
own directory with no persistence (a page store in memory, like netswap's memory
store), created with `redis-cli --cluster create` and waited on until every node
says cluster_state:ok. cluster-node-timeout is short (1 s) by default so that a master
killed -9 is replaced by its replica in a few seconds; a test of what a user sees
passes Redis's own default (DEFAULT_NODE_TIMEOUT_MS, 15 s). Each area can get an ACL user
limited to its own keys (`~netswap:{AREA:*`, `~netswap:{AREA}:*`), set on every node
(ACLs are per node in Redis Cluster).
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from netswap.protocol.messages import area_name_ok

# A failover takes node-timeout plus a vote: 1 s keeps a test's storm short.
NODE_TIMEOUT_MS = 1000
DEFAULT_NODE_TIMEOUT_MS = 15000  # redis.conf's cluster-node-timeout
START_S = 30.0


def free_port() -> int:
    """A port whose +10000 (the cluster bus) is free too."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port + 10000 < 65536:
            with socket.socket() as bus:
                try:
                    bus.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            return port


class RedisNode:
    def __init__(self, root: Path, maxmemory: str, node_timeout_ms: int = NODE_TIMEOUT_MS) -> None:
        self.port = free_port()
        self.dir = root / str(self.port)
        self.dir.mkdir(parents=True)
        self.maxmemory = maxmemory
        self.node_timeout_ms = node_timeout_ms
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> RedisNode:
        cmd = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
               "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
               "--cluster-node-timeout", str(self.node_timeout_ms), "--appendonly", "no",
               "--save", "", "--dir", str(self.dir), "--maxmemory", self.maxmemory,
               "--maxmemory-policy", "noeviction", "--protected-mode", "no",
               "--logfile", str(self.dir / "redis.log")]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_S
        while self.cli("PING").strip() != "PONG":
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"redis-server on {self.port} did not start")
            time.sleep(0.05)
        return self

    def cli(self, *args: str) -> str:
        done = subprocess.run(["redis-cli", "-p", str(self.port), *args], capture_output=True,
                              text=True, timeout=30, check=False)  # fmt: skip
        return done.stdout

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def pause(self) -> None:
        """SIGSTOP: a node that stops answering (a GC pause, a VM migration)."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGCONT)

    def info(self, section: str) -> dict[str, str]:
        return dict(line.split(":", 1) for line in self.cli("INFO", section).splitlines()
                    if ":" in line)  # fmt: skip


class Cluster:
    def __init__(self, nodes: list[RedisNode]) -> None:
        self.nodes = nodes

    @property
    def url(self) -> str:
        return "redis://" + ",".join(n.address for n in self.nodes)

    def masters(self) -> list[RedisNode]:
        return [n for n in self.nodes if n.proc is not None and n.proc.poll() is None
                and n.info("replication").get("role", "").strip() == "master"]  # fmt: skip

    def owner(self, key: str) -> RedisNode:
        """The master serving `key`'s hash slot, as the first live node sees it."""
        by_port = {n.port: n for n in self.nodes}
        slot = int(self._alive()[0].cli("CLUSTER", "KEYSLOT", key).strip())
        for line in self._nodes_lines():
            fields = line.split()
            if "master" in fields[2] and "fail" not in fields[2]:
                for span in fields[8:]:
                    lo, _, hi = span.partition("-")
                    if lo.isdigit() and int(lo) <= slot <= int(hi or lo):
                        return by_port[int(fields[1].split("@")[0].rsplit(":", 1)[1])]
        raise LookupError(f"no master serves {key}")

    def replicas_of(self, master: RedisNode) -> list[RedisNode]:
        by_port = {n.port: n for n in self.nodes}
        lines = [line.split() for line in self._nodes_lines()]
        ids = {int(f[1].split("@")[0].rsplit(":", 1)[1]): f[0] for f in lines}
        return [by_port[int(f[1].split("@")[0].rsplit(":", 1)[1])] for f in lines
                if f[3] == ids.get(master.port)]  # fmt: skip

    def _alive(self) -> list[RedisNode]:
        return [n for n in self.nodes if n.proc is not None and n.proc.poll() is None]

    def _nodes_lines(self) -> list[str]:
        return self._alive()[0].cli("CLUSTER", "NODES").splitlines()

    def wait_ok(self, timeout: float = START_S) -> None:
        """Every live node says cluster_state:ok and every replica is linked to its
        master (a WAIT before the first sync would count no replica)."""
        deadline = time.monotonic() + timeout
        alive = [n for n in self.nodes if n.proc is not None and n.proc.poll() is None]

        def ready(n: RedisNode) -> bool:
            if "cluster_state:ok" not in n.cli("CLUSTER", "INFO"):
                return False
            repl = n.info("replication")
            return (
                repl.get("role", "").strip() == "master"
                or repl.get("master_link_status", "").strip() == "up"
            )

        while not all(ready(n) for n in alive):
            if time.monotonic() > deadline:
                raise RuntimeError("the cluster did not reach cluster_state:ok")
            time.sleep(0.2)

    def add_user(self, area: str, password: str) -> str:
        """An ACL user for one area, on every node: its own keys, nothing else (exactly:
        an area name holds no ':' or glob character, protocol.messages.area_name_ok)."""
        if not area_name_ok(area):
            raise ValueError(f"{area!r} is no area name")
        user = f"netswap-{area}"
        for n in self.nodes:
            n.cli("ACL", "SETUSER", user, "reset", "on", f">{password}",
                  f"~netswap:{{{area}:*", f"~netswap:{{{area}}}:*", "+@all", "-@dangerous",
                  "+info", "+cluster|slots", "+cluster|nodes", "+cluster|shards")  # fmt: skip
        return user

    def used_memory(self) -> int:
        return sum(int(n.info("memory").get("used_memory", "0")) for n in self.masters())

    def add_master(self, root: Path, maxmemory: str) -> RedisNode:
        """A new empty master joined to the cluster (redis-cli --cluster add-node)."""
        node = RedisNode(root, maxmemory).start()
        subprocess.run(["redis-cli", "--cluster", "add-node", node.address,
                        self.nodes[0].address], check=True, capture_output=True,
                       timeout=60)  # fmt: skip
        self.nodes.append(node)
        deadline = time.monotonic() + START_S  # every node must know it before a rebalance
        while not all(node.address in n.cli("CLUSTER", "NODES") for n in self.nodes):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the cluster did not learn of {node.address}")
            time.sleep(0.1)
        self.wait_ok()
        return node

    def rebalance(self) -> subprocess.Popen[bytes]:
        """Slots moved onto the empty master, in the background (it takes a while)."""
        master = self.masters()[0]
        return subprocess.Popen(["redis-cli", "--cluster", "rebalance", master.address,
                                 "--cluster-use-empty-masters"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)  # fmt: skip


@contextlib.contextmanager
def cluster(masters: int = 3, replicas: int = 1, maxmemory: str = "256mb",
            node_timeout_ms: int = NODE_TIMEOUT_MS) -> Iterator[Cluster]:  # fmt: skip
    if shutil.which("redis-server") is None:
        raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
    root = Path(tempfile.mkdtemp(prefix="netswap-cluster-"))
    nodes = [RedisNode(root, maxmemory, node_timeout_ms) for _ in range(masters * (1 + replicas))]
    try:
        for n in nodes:
            n.start()
        create = ["redis-cli", "--cluster", "create", *(n.address for n in nodes),
                  "--cluster-replicas", str(replicas), "--cluster-yes"]  # fmt: skip
        subprocess.run(create, check=True, capture_output=True, timeout=60)
        made = Cluster(nodes)
        made.wait_ok()
        yield made
    finally:
        for n in nodes:
            n.kill()
        shutil.rmtree(root, ignore_errors=True)
