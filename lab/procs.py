"""`netswap lab up` / `lab down`: the compose topology as local processes.

Three page stores and one agent export (`netswap serve --backend remote
--replicas 2`), each with its ops endpoint, all on 127.0.0.1 -- the same
topology as deploy/compose, runnable on a machine without a container engine.
`up` starts them detached, records exactly what it started (pid, command line,
ports) in a state file, then drives a random-page workload through the real NBD
plugin with a live summary. `down` stops exactly those processes -- checking
each pid still runs the command it recorded -- and nothing else.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from netswap.client.statscmd import fetch
from netswap.server.ops.snapshot import Quantiles
from netswap.server.units import read_secret

from .ports import ExitedEarly, free_port, wait_port

STATE = Path(os.environ.get("NETSWAP_LAB_STATE", "/tmp/netswap-lab.json"))


class LabStateError(Exception):
    """The process lab is not in the state the command needs."""


def add_up_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stores", type=int, default=3)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--size", default="256M", help="agent export size")
    parser.add_argument("--capacity", default="512M", help="capacity of each store")
    parser.add_argument("--duration", type=float, default=20,
                        help="seconds of workload with a live summary (0: none)")  # fmt: skip
    parser.add_argument("--base-port", type=int, default=0, help="first port (default: free ports)")


def spawn(argv: list[str], log: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "netswap.client.cli", *argv]
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=out, start_new_session=True)
    return {"pid": proc.pid, "argv": argv, "log": str(log)}


def wait_up(port: int, pid: int) -> None:
    try:
        wait_port(port, lambda: alive(pid))
    except ExitedEarly:
        raise LabStateError(f"process {pid} exited while starting (see its log)") from None
    except TimeoutError as exc:
        raise LabStateError(str(exc)) from None


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return Path(f"/proc/{pid}/stat").exists() and " Z " not in Path(f"/proc/{pid}/stat").read_text()


def ports(args: argparse.Namespace, count: int) -> list[int]:
    if args.base_port:
        return [args.base_port + i for i in range(count)]
    return [free_port() for _ in range(count)]


def run_up(args: argparse.Namespace) -> int:
    if STATE.exists():
        raise LabStateError(f"a lab is already up ({STATE}); run `netswap lab down` first")
    logs = STATE.with_suffix(".logs")
    logs.mkdir(exist_ok=True)
    p = ports(args, 2 * args.stores + 2)
    state: dict[str, Any] = {"processes": [], "nbd": p[-2], "http": p[-1], "store_http": []}
    try:
        stores = []
        for i in range(args.stores):
            port, http = p[2 * i], p[2 * i + 1]
            argv = ["store", "--listen", f"127.0.0.1:{port}", "--capacity", args.capacity,
                    "--http", f"127.0.0.1:{http}"]  # fmt: skip
            state["processes"].append(spawn(argv, logs / f"store{i + 1}.log"))
            state["store_http"].append(http)
            wait_up(port, state["processes"][-1]["pid"])
            stores += ["--store", f"127.0.0.1:{port}"]
        argv = ["serve", "--listen", f"127.0.0.1:{state['nbd']}", "--size", args.size,
                "--backend", "remote", *stores, "--replicas", str(args.replicas),
                "--area", "lab", "--http", f"127.0.0.1:{state['http']}", "--no-mlock",
                "--no-exit-with-parent"]  # fmt: skip
        state["processes"].append(spawn(argv, logs / "agent.log"))
        wait_up(state["nbd"], state["processes"][-1]["pid"])
        wait_up(state["http"], state["processes"][-1]["pid"])
    except BaseException:
        stop_all(state["processes"])
        raise
    STATE.write_text(json.dumps(state, indent=2))
    print(f"netswap lab up: {args.stores} stores, agent export nbd://127.0.0.1:{state['nbd']}/swap")
    print(f"  dashboard  http://127.0.0.1:{state['http']}/   (stores: "
          + ", ".join(f"http://127.0.0.1:{h}/" for h in state["store_http"]) + ")")  # fmt: skip
    if args.duration > 0:
        nbd_uri = f"nbd://127.0.0.1:{state['nbd']}/swap"
        workload(nbd_uri, f"http://127.0.0.1:{state['http']}/", args.duration)
    print("  stop it with: netswap lab down")
    return 0


def add_load_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", default="127.0.0.1:10809", metavar="HOST:PORT",
                        help="the netswap NBD export to load")  # fmt: skip
    parser.add_argument("--export", default="swap")
    parser.add_argument("--http", required=True, metavar="URL",
                        help="the export's ops endpoint, for the live summary")  # fmt: skip
    parser.add_argument("--http-token-file", metavar="FILE", help="that endpoint's token")
    parser.add_argument("--duration", type=float, default=30, help="seconds (0: until killed)")


def run_load(args: argparse.Namespace) -> int:
    """The compose lab's load generator: the lab's workload against any export."""
    token = read_secret(args.http_token_file) if args.http_token_file else ""
    uri = f"nbd://{args.server}/{args.export}"
    workload(uri, args.http, args.duration or float("inf"), token)
    return 0


def workload(uri: str, url: str, duration: float, token: str = "") -> None:
    """Random pages through the real plugin, verified, with a live summary."""
    import nbd

    stop = threading.Event()
    errors: list[str] = []
    verified = [0] * 4  # pages each worker read back in its final check

    def worker(n: int) -> None:
        rng = random.Random(n)
        h = nbd.NBD()
        try:
            h.connect_uri(uri)
            pages = h.get_size() // 4096 // 4
            base, truth = n * pages, {}
            while not stop.is_set():
                page = base + rng.randrange(pages // 8) * 8  # whole 8-page blocks: no overlaps
                data = rng.randbytes(8 * 4096)
                h.pwrite(data, page * 4096)
                truth[page] = data
                probe = rng.choice(list(truth))
                if h.pread(8 * 4096, probe * 4096) != truth[probe]:
                    errors.append(f"pages {probe}+8 read back wrong")
            # At the end every block written is read back once more.
            wrong = [p for p, data in truth.items() if h.pread(8 * 4096, p * 4096) != data]
            errors.extend(f"pages {p}+8 wrong in the final check" for p in wrong[:10])
            verified[n] = 8 * len(truth)
            h.shutdown()
        except nbd.Error as exc:  # a client error: the lab fails, with the reason
            errors.append(f"client error: {exc}")

    threads = [threading.Thread(target=worker, args=(n,), daemon=True) for n in range(4)]
    for t in threads:
        t.start()
    prev = fetch(url, token)
    end = time.monotonic() + duration
    while time.monotonic() < end:
        time.sleep(2)
        now = fetch(url, token)
        dt = max(1e-3, now.time - prev.time)
        up = sum(1 for s in now.stores if s.up)
        lat = now.latency_us.get("swap_out") or Quantiles(0, 0)
        print(f"  out {(now.swap_out_pages_total - prev.swap_out_pages_total) / dt:7.0f}/s"
              f"  in {(now.swap_in_pages_total - prev.swap_in_pages_total) / dt:7.0f}/s"
              f"  p50 {lat.p50:6.0f}us p99 {lat.p99:6.0f}us"
              f"  stores up {up}/{len(now.stores)}  lag {now.replication_lag_pages}"
              f"  errors {len(errors)}", flush=True)  # fmt: skip
        prev = now
    stop.set()
    for t in threads:
        t.join(30)
    if errors:
        raise LabStateError(f"workload saw {len(errors)} errors, first: {errors[0]}")
    print(f"  workload: {prev.swap_out_pages_total} pages out, "
          f"{prev.swap_in_pages_total} in, every read verified; final check: "
          f"{sum(verified)} pages written, every one verified")  # fmt: skip


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def stop_all(processes: list[dict[str, Any]]) -> list[int]:
    """SIGTERM each recorded process that still runs its recorded command."""
    stopped = []
    for proc in reversed(processes):
        pid, argv = proc["pid"], proc["argv"]
        running = cmdline(pid)
        # `netswap serve` exec()s nbdkit: its recorded pid now runs nbdkit.
        ours = running[-len(argv) :] == argv or (
            argv[0] == "serve" and "nbdkit" in " ".join(running[:2])
        )
        if alive(pid) and ours:
            os.kill(pid, signal.SIGTERM)
            stopped.append(pid)
    deadline = time.monotonic() + 10
    for pid in stopped:
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
    return stopped


def run_down(args: argparse.Namespace) -> int:
    if not STATE.exists():
        raise LabStateError(f"no lab is up ({STATE} is missing)")
    state = json.loads(STATE.read_text())
    stopped = stop_all(state["processes"])
    STATE.unlink()
    print(f"netswap lab down: stopped {len(stopped)} of {len(state['processes'])} processes")
    return 0
