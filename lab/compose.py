"""`netswap lab compose`: the compose lab, run for real on this host's podman.

Runs on the machine that hosts the lab; the containers sit on the compose
network's bridge and the driver reaches them by address. It makes the images
offline (engine.py), brings deploy/compose up with its offline profile -- three
stores (store3 file-backed on a volume), the agent export with 2 replicas, the
load generator, Prometheus -- and proves each claim with a figure: the load's
verified workload runs; Prometheus scrapes every netswap target and sees the
page counter rise; store1 killed -9 mid-load costs no client error and is
re-replicated onto the third store; store3 restarted after a flush keeps its
pages, and then serves every page alone (store2 killed too) while the load's
final check reads all it wrote. The same workload through `netswap lab up`
(processes) gives the throughput ratio. `down` then leaves no container, volume
or network (--keep keeps them).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from netswap.client.statscmd import StatsError, fetch
from netswap.server.units import read_secret

from .engine import Engine, require_tools
from .qemu import LabError

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "deploy" / "compose"
PROJECT = "netswap-lab"
NETWORK = "netswap-swapnet"  # compose.yaml names it, so it is the same for every project
PROMETHEUS = "http://127.0.0.1:9090"
# Each wait of the run: a re-replication of the agent's 1 GiB area at the ~1k pages/s
# seen while a store is down takes at most a few minutes; most steps take seconds.
STEP_S = 180.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seconds", type=float, default=120,
                        help="how long the load generator runs (default 120)")  # fmt: skip
    parser.add_argument("--keep", action="store_true", help="leave the lab up at the end")
    parser.add_argument("--peer-seconds", type=float, default=15,
                        help="seconds of the same workload through `lab up` (0: skip)")  # fmt: skip


def wait_for(what: str, check: Callable[[], bool], limit: float = STEP_S) -> float:
    began = time.monotonic()
    while not check():
        if time.monotonic() - began > limit:
            raise LabError(f"{what}: not within {limit:.0f}s")
        time.sleep(0.5)
    return time.monotonic() - began


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class ComposeLab:
    def __init__(self, engine: Engine, args: argparse.Namespace) -> None:
        self.engine, self.args = engine, args
        self.token = read_secret(str(COMPOSE / "secrets" / "ops-token"))
        self.env = dict(engine.env, NETSWAP_LOAD_SECONDS=str(args.seconds))
        self.rate = 0.0  # pages/s out through the containers, steady, all stores up

    def compose(self, *args: str, timeout: float = 900) -> str:
        cmd = ["docker-compose", "-p", PROJECT, "-f", "compose.yaml", "-f", "compose.offline.yaml"]
        result = subprocess.run([*cmd, *args], cwd=COMPOSE, env=self.env, capture_output=True,
                                text=True, timeout=timeout)  # fmt: skip
        if result.returncode != 0:
            raise LabError(f"docker-compose {args[0]} failed: "
                           f"{(result.stderr or result.stdout).strip()[-400:]}")  # fmt: skip
        return result.stdout

    def name(self, service: str) -> str:
        labels = [f"label=com.docker.compose.project={PROJECT}",
                  f"label=com.docker.compose.service={service}"]  # fmt: skip
        out = self.engine.podman("ps", "-a", "--filter", labels[0], "--filter", labels[1],
                                 "--format", "{{.Names}}")  # fmt: skip
        if not out.split():
            raise LabError(f"no {service} container")
        return out.split()[0]

    def ip(self, service: str) -> str:
        fmt = f'{{{{(index .NetworkSettings.Networks "{NETWORK}").IPAddress}}}}'
        return self.engine.podman("inspect", "-f", fmt, self.name(service)).strip()

    def agent(self) -> dict[str, int]:
        snap = fetch(f"http://{self.ip('agent')}:9178/", self.token)
        figures = {"in": snap.swap_in_pages_total, "out": snap.swap_out_pages_total,
                   "lag": snap.replication_lag_pages}  # fmt: skip
        return figures | {s.name.split(":")[0]: int(s.up) for s in snap.stores}

    def agent_ok(self, **want: int) -> bool:
        try:
            now = self.agent()
        except (StatsError, LabError):
            return False
        return all(now.get(k) == v for k, v in want.items())

    def logs(self, service: str, lines: int = 20) -> str:
        result = subprocess.run(["podman", "logs", "--tail", str(lines), self.name(service)],
                                env=self.engine.env, capture_output=True, text=True)  # fmt: skip
        return result.stdout + result.stderr

    def prometheus(self, path: str) -> Any:
        with urllib.request.urlopen(f"{PROMETHEUS}{path}", timeout=5) as r:
            return json.loads(r.read())


def run(args: argparse.Namespace) -> int:
    require_tools()
    if not port_free(9090):
        raise LabError("port 127.0.0.1:9090 (the lab's Prometheus) is in use: free it first")
    began = time.monotonic()
    engine = Engine(REPO / ".cache" / "compose", PROJECT)
    engine.start()
    lab = ComposeLab(engine, args)
    try:
        base_s = engine.base_image()
        print(f"base image debian:12-slim: {f'made in {base_s:.0f}s' if base_s else 'cached'}")
        t = time.monotonic()
        lab.compose("build")
        print(f"images built in {time.monotonic() - t:.0f}s")
        lab.compose("up", "-d")
        prove(lab, began)
        rate = lab.rate
        if args.keep:
            print(
                f"kept up; stop it with: cd {COMPOSE} && docker-compose -p {PROJECT} -f "
                "compose.yaml -f compose.offline.yaml down -v (DOCKER_HOST: podman's socket)"
            )
        else:
            down(lab)
        if args.peer_seconds and rate:
            peer = processes_rate(args.peer_seconds)
            print(f"throughput: {rate:.0f} pages/s out through the containers, {peer:.0f} "
                  f"through `lab up` processes: {rate / peer:.2f}x")  # fmt: skip
    except BaseException:
        for service in ("agent", "load", "store1", "store2", "store3", "prometheus"):
            with contextlib.suppress(LabError):
                print(f"--- {service}: last log lines\n{lab.logs(service, 15)}", file=sys.stderr)
        if not args.keep:
            down(lab, quiet=True)
        raise
    finally:
        engine.stop()
    return 0


def prove(lab: ComposeLab, began: float) -> None:
    wait_for("the load's first verified page", lambda: lab.agent_ok() and lab.agent()["in"] > 0)
    print(f"first verified page {time.monotonic() - began:.0f}s after start")

    def targets_up() -> bool:
        active = lab.prometheus("/api/v1/targets")["data"]["activeTargets"]
        return len(active) == 4 and all(t["health"] == "up" for t in active)

    wait_for("prometheus scraping all 4 netswap targets", targets_up)

    def pages_out() -> float:
        query = "/api/v1/query?query=sum(netswap_swap_out_pages_total)"
        return float(lab.prometheus(query)["data"]["result"][0]["value"][1])

    first = pages_out()
    wait_for("a rising netswap_swap_out_pages_total", lambda: pages_out() > first)
    last = pages_out()
    print(f"prometheus: 4 of 4 netswap targets up; sum(netswap_swap_out_pages_total) "
          f"{first:.0f} -> {last:.0f}, rising")  # fmt: skip

    a, t = lab.agent(), time.monotonic()
    time.sleep(10)
    b = lab.agent()
    lab.rate = (b["out"] - a["out"]) / (time.monotonic() - t)
    print(f"load through the containers: {lab.rate:.0f} pages/s out")

    lab.engine.podman("kill", "--signal", "KILL", lab.name("store1"))
    wait_for("the agent seeing store1 down", lambda: lab.agent_ok(store1=0))
    metrics = urllib.request.Request(f"http://{lab.ip('agent')}:9178/metrics",
                                     headers={"Authorization": f"Bearer {lab.token}"})  # fmt: skip
    with urllib.request.urlopen(metrics, timeout=5) as r:
        text = r.read().decode()
    if not re.search(r'^netswap_store_up\{store="store1:7177"\} 0', text, re.M):
        raise LabError("/metrics does not show store1 down")
    took = wait_for("re-replication onto the third store", lambda: lab.agent_ok(lag=0, store1=0))
    print(f"store1 killed -9: the agent's stats and /metrics show it down; re-replication "
          f"onto the other stores done in {took:.1f}s, store1 still down")  # fmt: skip

    import nbd

    flushed = store_used(lab, "store3")  # arena pages in use: mapped, or retired until a flush
    h = nbd.NBD()
    h.connect_uri(f"nbd://{lab.ip('agent')}:10809/swap")
    h.flush()
    h.shutdown()
    lab.engine.podman("restart", lab.name("store3"))
    wait_for("store3's ops endpoint", lambda: store_used(lab, "store3") >= 0)
    kept = store_used(lab, "store3")
    wait_for("store3 back in the agent, in sync", lambda: lab.agent_ok(store3=1, lag=0))
    if "store3:7177 is back (kept pages)" not in lab.logs("agent", 200):
        raise LabError("store3 came back without its pages")
    print(f"store3 (file) restarted after a flush: {flushed} arena pages in use before the "
          f"flush, {kept} as it came back from its index; the agent found its pages "
          "kept")  # fmt: skip
    lab.engine.podman("kill", "--signal", "KILL", lab.name("store2"))
    wait_for("the agent seeing store2 down", lambda: lab.agent_ok(store2=0))
    print("store2 killed -9 as well: store3 alone now serves every page")

    load = lab.name("load")
    code = lab.engine.podman("wait", load, timeout=lab.args.seconds + STEP_S).strip()
    tail = lab.logs("load", 5)
    if code != "0" or "every one verified" not in tail:
        raise LabError(f"the load generator failed (exit {code}): {tail.strip()[-300:]}")
    print(f"load: {tail.strip().splitlines()[-1].strip()}; 0 client errors")


def store_used(lab: ComposeLab, service: str) -> int:
    """Pages a store holds, from its ops endpoint; -1 while it does not answer."""
    try:
        return fetch(f"http://{lab.ip(service)}:9177/", lab.token).stores[0].used_bytes // 4096
    except (StatsError, LabError):
        return -1


def down(lab: ComposeLab, quiet: bool = False) -> None:
    try:
        lab.compose("down", "-v", "--remove-orphans")
    except LabError:
        if not quiet:
            raise
    left = lab.engine.containers(all_=True)
    label = f"label=com.docker.compose.project={PROJECT}"
    volumes = lab.engine.podman("volume", "ls", "-q", "--filter", label, check=False)
    exists = subprocess.run(["podman", "network", "exists", NETWORK], env=lab.engine.env)
    network = exists.returncode == 0
    if not quiet:
        print(f"down: {len(left)} containers, {len(volumes.split())} volumes, "
              f"{int(network)} networks left")  # fmt: skip


def processes_rate(seconds: float) -> float:
    """Pages/s out of the same workload through `netswap lab up` (processes)."""
    cmd = [sys.executable, "-m", "netswap.client.cli", "lab", "up", "--duration", str(seconds)]
    # A state file of its own: a process lab the user has up is not ours to stop.
    env = dict(os.environ, NETSWAP_LAB_STATE=str(REPO / ".cache" / "compose" / "peer-lab.json"))
    up = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 120, env=env)
    subprocess.run([*cmd[:4], "down"], capture_output=True, timeout=60, env=env)
    rates = sorted(float(m) for m in re.findall(r"out\s+(\d+)/s", up.stdout))
    if up.returncode != 0 or not rates:
        raise LabError(f"lab up (the peer) failed: {(up.stderr or up.stdout).strip()[-300:]}")
    return rates[len(rates) // 2]
