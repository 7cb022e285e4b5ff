"""`netswap lab vm --host-in-guest`: the whole swapping host inside a starved guest.

The kernel-only lab keeps nbdkit and the agent on the roomy host; here they
run where they matter, in the guest whose memory the kernel is swapping out.
The guest's root is this machine's root, read-only over virtio-9p under a
tmpfs overlay (deploy/lab/vm/init-host): no disk image to build, and the guest
runs exactly the python3, nbdkit, nbd-client and venv the tests use, paid for
by the guest's own RAM. Inside, `netswap.lab.guest` runs attach with
the stores on this host (10.0.2.2), checks the protections on every nbdkit
thread, swaps, detaches and checks that attach was undone. The agent's ops
endpoint is forwarded to 127.0.0.1 here, so `netswap stats` and the dashboard
watch the guest thrash; a screenshot is taken mid-storm when asked.

`--stall-stores S` stops the stores on this host (SIGSTOP) for S seconds
mid-storm, as a GC pause, a VM migration or a network blip would, and lets
them go on (SIGCONT): every page must still verify (#29's stall; today's agent
loses pages to it, so make test leaves it off).

`--runs N` over `--configs` is the hang campaign: one row per configuration,
PASS / FAIL (a wrong or lost page, or a check) / HANG (deadline passed, the
guest's blocked tasks dumped into its kept serial log), with the MiB/s as a
ratio to the kernel-only baseline (nbd-client straight to a host-side
`netswap serve --backend memory`) measured in the same campaign.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shlex
import signal
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from .cpio import newc_archive
from .guest import KILLS, TAKEOVER_S
from .kernel import child, run_lab
from .ports import free_port
from .qemu import CACHE, REPO, run_guest


@dataclass(frozen=True)
class Config:
    """One row of the campaign: attach's defaults with one thing taken away or changed."""

    what: str
    attach: tuple[str, ...] = ()
    serve: tuple[str, ...] = ()
    ram: int | None = None  # None: --ram
    reachable: bool = True  # False: the guest's stores are a port nobody listens on


CONFIGS = {
    "defaults": Config("attach's defaults"),
    "no-fifo": Config("the agent under SCHED_OTHER, not SCHED_FIFO", serve=("--sched=normal",)),
    "no-io-flusher": Config("without PR_SET_IO_FLUSHER", serve=("--no-io-flusher",)),
    "no-mlock": Config("without mlock (--no-mlock)", serve=("--no-mlock",)),
    "min-free-default": Config(
        "vm.min_free_kbytes left at the kernel's", attach=("--min-free-kbytes=0",)
    ),
    "ram-192": Config("guest RAM 192 MiB", ram=192),
    # attach fails halfway (mkswap cannot write: no store answers); all must be undone.
    "stores-unreachable": Config("no store reachable", reachable=False),
}
GUEST_HTTP = 9178  # the agent's ops endpoint inside the guest, forwarded to the host
# Seconds into the storm at which the dashboard screenshot is taken: long enough for
# the charts to hold a rising pressure curve, short enough to land inside the storm.
SCREENSHOT_AFTER_S = 20
# Serial lines that show the guest moving: its stages, its checks and the verifier's
# progress (every 10 % of the pattern). Anything else (the vitals loop) does not count.
PROGRESS = ("NETSWAP-STAGE ", "NETSWAP-CHECK ", "SWAPTEST ", "NETSWAP-KILL ", "NETSWAP-COLD ")
# Where in the storm --stall-stores stops the stores: half way through the reads (the
# verifier says 9 %, 19 %, ... 49 %), between the drill's adoption (30 %) and its
# restart (70 %), while every read needs a store.
STALL_PHASE, STALL_PERCENT = "verify", 45
# The guest's ops endpoint listens on its NIC (QEMU forwards it to this host's
# loopback only), so it needs a bearer token like any endpoint off loopback.
OPS_TOKEN = secrets.token_hex(16)
_KV = re.compile(r"(\w+)=(\S+)")


@dataclass
class Run:
    config: str
    verdict: str = "FAIL"
    reason: str = ""
    checks: dict[str, str] = field(default_factory=dict)  # "when name" -> "ok ..." / "FAIL ..."
    swap_seconds: float = 0.0
    pswpin: int = 0
    pswpout: int = 0
    stages: dict[str, float] = field(default_factory=dict)
    cpu: str = ""  # the storm's NETSWAP-CPU line: where the guest's time went
    held: str = ""  # what the stores held after the storm (#31)
    log: Path = Path()
    screenshot: str = ""
    kills: list[dict[str, str]] = field(default_factory=list)  # the drill's NETSWAP-KILL lines
    adoptions: list[dict[str, str]] = field(default_factory=list)  # its NETSWAP-ADOPT lines
    colds: list[dict[str, str]] = field(default_factory=list)  # its NETSWAP-COLD lines
    stuck: list[str] = field(default_factory=list)  # its NETSWAP-STUCK lines
    stalls: list[str] = field(default_factory=list)  # what --stall-stores did
    events: dict[str, float] = field(default_factory=dict)  # drill events not yet done
    dmesg: list[str] = field(default_factory=list)
    oom_kills: int = -1

    def mib_s(self, mib: int) -> float:
        return 2 * mib / self.swap_seconds if self.swap_seconds else 0.0

    def locked_kib(self) -> int:
        found = re.search(r"Locked=(\d+)kB", self.checks.get("attached mlock", ""))
        return int(found.group(1)) if found else -1

    def rss_kib(self) -> int:
        found = re.search(r"Rss=(\d+)kB", self.checks.get("attached mlock", ""))
        return int(found.group(1)) if found else -1


def guest_script(args: argparse.Namespace, stores: list[int], attach: list[str],
                 serve: list[str], mib: int, seed: int) -> bytes:  # fmt: skip
    """/guest.sh: what init-host runs as root inside the shared root."""
    cmd = [sys.executable, "-m", "netswap.lab.guest", "--mib", str(mib),
           f"--export-mib={mib + 256}", "--seed", str(seed),
           "--http", f"0.0.0.0:{GUEST_HTTP}", f"--http-token={OPS_TOKEN}",
           f"--kills={args.kills}", f"--restarts={args.restarts}",
           f"--content={getattr(args, 'content', 'random')}"]  # fmt: skip
    cmd += [f"--store=10.0.2.2:{port}" for port in stores]
    cmd += [f"--attach-arg={a}" for a in [*attach, *args.attach_arg]]
    cmd += [f"--serve-arg={a}" for a in [*serve, *args.serve_arg]]
    lines = [
        "#!/bin/sh",
        "export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "export PYTHONDONTWRITEBYTECODE=1 HOME=/root",
        f"cd {shlex.quote(str(REPO))}",
        "exec " + shlex.join(cmd),
    ]
    return ("\n".join(lines) + "\n").encode()


def parse(line: str, run: Run, start: float) -> None:
    if line.startswith("NETSWAP-STAGE "):
        _, stage, uptime = line.split()[:3]
        run.stages[stage] = float(uptime)
        print(f"    [{time.monotonic() - start:6.1f}s] guest: {stage}", flush=True)
    elif line.startswith("NETSWAP-CHECK "):
        _, when, name, rest = line.split(" ", 3)
        run.checks[f"{when} {name}"] = rest
        print(f"    check {when} {name}: {rest}", flush=True)
    elif line.startswith("NETSWAP-SWAP "):
        kv = dict(_KV.findall(line))
        run.swap_seconds = float(kv.get("seconds", 0))
        run.pswpin, run.pswpout = int(kv.get("pswpin", 0)), int(kv.get("pswpout", 0))
    elif line.startswith("NETSWAP-EVENT "):
        run.events[dict(_KV.findall(line)).get("n", "?")] = time.monotonic()
    elif line.startswith("NETSWAP-KILL "):
        run.kills.append(dict(_KV.findall(line)))
        run.events.pop(run.kills[-1].get("n", "?"), None)
        print(f"    drill: {line.partition(' ')[2]}", flush=True)
    elif line.startswith("NETSWAP-ADOPT "):
        run.adoptions.append(dict(_KV.findall(line)))
        print(f"    drill: {line.partition(' ')[2]}", flush=True)
    elif line.startswith("NETSWAP-COLD "):
        run.colds.append(dict(_KV.findall(line)))
        print(f"    drill: cold pages: {line.partition(' ')[2]}", flush=True)
    elif line.startswith("NETSWAP-STUCK "):
        run.stuck.append(line.partition(" ")[2])
        print(f"    drill: STUCK {line.partition(' ')[2]}", flush=True)
    elif line.startswith("NETSWAP-DMESG "):
        run.dmesg.append(line.partition(" ")[2])
    elif line.startswith("NETSWAP-OOM "):
        run.oom_kills = int(dict(_KV.findall(line)).get("kills", -1))
        print(f"    OOM kills in the guest: {run.oom_kills}", flush=True)
    elif line.startswith("NETSWAP-CPU "):
        run.cpu = line.partition(" ")[2]
        print(f"    guest CPU in the storm: {run.cpu}", flush=True)
    elif line.startswith(("NETSWAP-ATTACH ", "NETSWAP-DETACH ", "NETSWAP-MINFREE ")):
        what, _, rest = line.partition(" ")
        print(f"    {what[8:].lower()}: {rest}", flush=True)
    elif line.startswith("SWAPTEST progress") or line.startswith("SWAPTEST FAIL"):
        print(f"    {line[9:]}", flush=True)
    elif line.startswith("NETSWAP-RESULT "):
        run.verdict = line.split()[1]
        run.reason = line.partition("reason=")[2]  # the rest of the line: it may hold spaces


def stuck_now(run: Run) -> str:
    """sysrq keys for run_guest: "w" (the blocked tasks, into the serial log) once for a
    drill event the guest began TAKEOVER_S ago and has not reported done; the guest's
    own report may never come, its userspace starved while the device is held."""
    for n, began in list(run.events.items()):
        if time.monotonic() - began > TAKEOVER_S:
            del run.events[n]
            run.stuck.append(f"takeover {n} not done after {TAKEOVER_S}s: blocked tasks "
                             f"(sysrq-w) in {run.log}")  # fmt: skip
            print(f"    drill: STUCK {run.stuck[-1]}", flush=True)
            return "w"
    return ""


class StoreStall:
    """--stall-stores: when the guest's storm reaches STALL_AT, every store on this host
    is stopped (SIGSTOP) for `seconds` and let go on (SIGCONT)."""

    def __init__(self, stores: list[subprocess.Popen[bytes]], seconds: float, run: Run) -> None:
        self.stores, self.seconds, self.run = stores, seconds, run
        self.thread: threading.Thread | None = None
        self.stopped = False

    def seen(self, line: str) -> None:
        parts = line.split()
        if not (self.seconds and self.thread is None and parts[:3] == ["SWAPTEST", "progress",
                                                                       STALL_PHASE]):  # fmt: skip
            return
        percent = int(parts[3].rstrip("%"))
        if percent >= STALL_PERCENT:
            self.thread = threading.Thread(target=self.stall, args=(percent,), daemon=True)
            self.thread.start()

    def stall(self, percent: int) -> None:
        began = time.monotonic()
        self.signal(signal.SIGSTOP)
        self.stopped = True
        print(f"    stall: {len(self.stores)} stores stopped at {STALL_PHASE} {percent}%",
              flush=True)  # fmt: skip
        self.run.stalls.append(f"{len(self.stores)} stores stopped at {STALL_PHASE} {percent}%, "
                               "not let go on (the run ended first)")  # fmt: skip
        time.sleep(self.seconds)
        self.resume()
        took = time.monotonic() - began
        self.run.stalls[-1] = (f"{len(self.stores)} stores stopped for {took:.1f}s at "
                               f"{STALL_PHASE} {percent}%")  # fmt: skip
        print(f"    stall: {self.run.stalls[-1]}", flush=True)

    def resume(self) -> None:
        if self.stopped:
            self.signal(signal.SIGCONT)
            self.stopped = False

    def signal(self, sig: int) -> None:
        for proc in self.stores:
            if proc.poll() is None:
                os.kill(proc.pid, sig)


class Watcher(threading.Thread):
    """Takes the dashboard screenshot from the forwarded ops endpoint, mid-storm."""

    def __init__(self, http: int, run: Run, screenshot: Path) -> None:
        super().__init__(daemon=True)
        self.url = f"http://127.0.0.1:{http}/?token={OPS_TOKEN}"
        self.run_ = run
        self.screenshot = screenshot
        self.stop = threading.Event()

    def run(self) -> None:
        storm_began = 0.0
        while not self.stop.wait(1.0):
            if "storm" in self.run_.stages and not storm_began:
                storm_began = time.monotonic()
            late = storm_began and time.monotonic() - storm_began >= SCREENSHOT_AFTER_S
            if late:
                self.run_.screenshot = take_screenshot(self.url, self.screenshot)
                return


def take_screenshot(url: str, path: Path) -> str:
    """The dashboard as a person sees it, after a few samples; returns a note."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return "no screenshot: playwright is not installed (pip install playwright)"
    flags = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update"]  # fmt: skip
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=flags)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url)
            page.wait_for_function("window.netswap.samples >= 8", timeout=30_000)
            path.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(path), full_page=True)
            browser.close()
    except Exception as exc:  # a lab report, not a crash: say what went wrong
        return f"no screenshot: {type(exc).__name__}: {str(exc)[:200]}"
    return str(path)


def stores_held(ports: list[int]) -> str:
    """Each store's payloads, their bytes and the capacity they use (its Stats)."""
    import asyncio

    from netswap.client.rpc import StoreClient

    async def ask(port: int) -> dict[str, int]:
        client = await StoreClient.connect("127.0.0.1", port, "probe", deadline=10)
        try:
            return await client.stats()
        finally:
            await client.close()

    parts = []
    for port in ports:
        try:
            st = asyncio.run(ask(port))
        except Exception as exc:
            parts.append(f"{port}: unreadable ({exc})")
            continue
        pages, payload = st.get("used_pages", 0), st.get("payload_bytes", 0)
        per_page = payload / pages if pages else 0
        parts.append(f"{pages:,} pages in {payload / 2**20:.1f} MiB of payloads "
                     f"({per_page:,.0f} B each, {per_page / 4096:.2f} of a page), "
                     f"{st.get('used_bytes', 0) / 2**20:.1f} MiB used")  # fmt: skip
    return "; ".join(parts)


def run_once(args: argparse.Namespace, name: str, index: int) -> Run:
    config = CONFIGS[name]
    ram = config.ram or args.ram
    mib = 3 * ram if args.size is None else args.size  # 0: attach, check, detach; no storm
    run = Run(name, log=CACHE / f"serial-host-{name}-{index}.log")
    with ExitStack() as stack:
        ports, stores = [], []
        for _ in range(args.stores):
            port = free_port()
            store = ["store", "--listen", f"127.0.0.1:{port}", "--capacity", f"{mib + 256}M"]
            stores.append(stack.enter_context(child(store, port)))
            ports.append(port)
        stall = StoreStall(stores, args.stall_stores, run)
        stack.callback(stall.resume)  # never leave a store stopped
        http = args.http_port or free_port()
        if not config.reachable:
            ports = [free_port() for _ in ports]  # picked, never listened on
        script = guest_script(args, ports, list(config.attach), list(config.serve), mib,
                              args.seed + index)  # fmt: skip
        initrd = CACHE / f"initrd-host-{http}.img"
        stack.callback(initrd.unlink, missing_ok=True)
        base = (CACHE / "initrd-host.img").read_bytes()
        initrd.write_bytes(base + b"\0" * (-len(base) % 4)
                           + newc_archive({"guest.sh": script}, mode=0o100755))  # fmt: skip
        if args.screenshot is not None and index == 0 and name == "defaults":
            watcher = Watcher(http, run, args.screenshot)
            watcher.start()
            stack.callback(watcher.stop.set)
        start = time.monotonic()
        virtfs = "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap"
        nic = f"user,model=e1000,hostfwd=tcp:127.0.0.1:{http}-:{GUEST_HTTP}"

        def on_line(line: str) -> None:
            parse(line, run, start)
            stall.seen(line)

        # Two vCPUs on MTTCG: the workload and the agent each get one, as on a real host.
        qemu = ["-virtfs", virtfs, "-smp", str(args.cpus), "-accel", "tcg,thread=multi"]
        # loglevel=7: hung-task reports and sysrq-w/t print their stacks at KERN_INFO.
        boot = run_guest(ram, initrd, "loglevel=7", run.log, args.timeout, on_line, qemu, nic,
                         sysrq="wt", cpu=args.cpu_model, stall_s=args.stall,
                         progress=PROGRESS, sysrq_now=lambda: stuck_now(run))  # fmt: skip
        if mib and config.reachable:  # what the stores hold, against the pages swapped (#31)
            run.held = stores_held(ports)
            print(f"    stores hold: {run.held} (pswpout {run.pswpout:,} pages)", flush=True)
    if boot.timed_out:
        run.verdict, run.reason = "HANG", boot.hang_reason(args.timeout, run.log)
    elif run.stuck and run.verdict != "PASS":  # the guest may have died of it (SIGBUS, panic)
        run.reason = f"drill: a takeover stuck past {TAKEOVER_S}s: {run.stuck[0]}"
    elif run.verdict == "PASS" and mib and run.pswpout < (mib - ram) * 256:
        run.verdict, run.reason = "FAIL", f"pswpout {run.pswpout} < {(mib - ram) * 256}"
    elif run.verdict == "PASS" and drill_failure(args, run, mib):
        run.verdict, run.reason = "FAIL", drill_failure(args, run, mib)
    elif not run.reason and run.verdict != "PASS":
        run.reason = boot.qemu_error or "guest stopped without a result"
    return run


def drill_failure(args: argparse.Namespace, run: Run, mib: int) -> str:
    """Why the drill failed ('' if it did not): every event, each followed by swap
    moving again, and no process killed for memory."""
    if run.stuck:
        return f"drill: a takeover stuck past {TAKEOVER_S}s: {run.stuck[0]}"
    if args.stall_stores and not run.stalls:
        return "drill: the stores were never stopped (the storm ended first?)"
    if not mib or not (args.kills or args.restarts):
        return ""
    killed = [c for c, k in zip(run.colds, run.kills, strict=False) if k.get("kind") in KILLS]
    warm = [c for c in killed if not cold_log(c)]
    if len(run.colds) != len(run.kills) or warm:
        return f"drill: the supervisor's log was not cold before every kill: {run.colds}"
    if len(run.kills) != args.kills + args.restarts:
        return f"drill: {len(run.kills)} of {args.kills + args.restarts} events reported"
    adopting = sum(k.get("kind") == "adopt" for k in run.kills)
    if len(run.adoptions) != adopting or any(a.get("ok") != "yes" for a in run.adoptions):
        return f"drill: the supervisor killed -9 was not adopted: {run.adoptions}"
    stuck = [k for k in run.kills if float(k.get("stall", "-1").rstrip("s")) < 0]
    if stuck:
        return f"drill: swap never moved again after event {stuck[0].get('n')}"
    if run.oom_kills:
        return f"drill: {run.oom_kills} processes killed for memory"
    errors = [line for line in run.dmesg if "I/O error, dev nbd0" in line]
    if errors:
        return f"drill: the kernel saw EIO on swap: {errors[0]}"
    reconnected = sum("reconnected socket" in line for line in run.dmesg)
    if reconnected < len(run.kills):
        return f"drill: the kernel logged {reconnected} reconnects for {len(run.kills)} events"
    return ""


def cold_log(cold: dict[str, str]) -> bool:
    """Whether a NETSWAP-COLD line had every page of the supervisor's log out of RAM."""
    total, _, out = cold.get("supervisor_log", "0/0").partition("/")
    return int(total) > 0 and out == total


def baseline(args: argparse.Namespace, ram: int, mib: int) -> float:
    """MiB/s of the kernel-only path at the same RAM and pattern: the ratio's peer."""
    peer = argparse.Namespace(**{**vars(args), "backend": "memory", "ram": ram, "size": mib,
                                 "passes": 1, "cache": None, "log": None,
                                 "same_machine": True})  # fmt: skip
    outcome = run_lab(peer)
    seconds = outcome.write_s + outcome.verify_s
    print(f"  kernel-only baseline: {outcome.verdict}, {2 * mib / seconds if seconds else 0:.1f}"
          " MiB/s", flush=True)  # fmt: skip
    return 2 * mib / seconds if outcome.verdict == "PASS" and seconds else 0.0


def run_campaign(args: argparse.Namespace) -> int:
    names = args.configs.split(",") if args.configs else ["defaults"]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise ValueError(f"unknown --configs {','.join(unknown)}; known: {','.join(CONFIGS)}")
    rows = []
    peers: dict[tuple[int, int], float] = {}
    for name in names:
        ram = CONFIGS[name].ram or args.ram
        mib = 3 * ram if args.size is None else args.size  # 0: attach, check, detach; no storm
        if args.baseline and mib and (ram, mib) not in peers:  # one per guest size
            peers[ram, mib] = baseline(args, ram, mib)
        peer = peers.get((ram, mib), 0.0)
        runs = []
        for index in range(args.runs):
            print(f"  {name} run {index + 1}/{args.runs}: {CONFIGS[name].what}, guest RAM "
                  f"{ram} MiB, pattern {mib} MiB", flush=True)  # fmt: skip
            run = run_once(args, name, index)
            print(f"  -> {run.verdict} {run.reason}".rstrip(), flush=True)
            runs.append(run)
        rows.append((name, ram, mib, peer, runs))
    print_table(rows)
    failed = any(r.verdict != "PASS" for *_, runs in rows for r in runs)
    return 1 if failed else 0


def print_table(rows: list[tuple[str, int, int, float, list[Run]]]) -> None:
    print("\nnetswap lab vm --host-in-guest")
    print(f"{'configuration':<18} {'RAM':>4} {'runs':>4} {'PASS':>4} {'FAIL':>4} {'HANG':>4} "
          f"{'MiB/s':>6} {'vs kernel-only':>14} {'pswpin':>8} {'pswpout':>8} {'locked':>8} "
          f"{'rss':>7}  protections")  # fmt: skip
    for name, ram, mib, peer, runs in rows:
        count = {v: sum(1 for r in runs if r.verdict == v) for v in ("PASS", "FAIL", "HANG")}
        passed = [r for r in runs if r.verdict == "PASS"] or runs
        speed = sorted(r.mib_s(mib) for r in passed)[len(passed) // 2]
        last = passed[-1]
        ratio = f"{speed / peer:.2f}x" if peer and speed else "-"
        checks = ",".join(
            f"{k.split()[1]}:{v.split()[0]}" for k, v in last.checks.items() if k.startswith("att")
        )
        print(f"{name:<18} {ram:>4} {len(runs):>4} {count['PASS']:>4} {count['FAIL']:>4} "
              f"{count['HANG']:>4} {speed:>6.1f} {ratio:>14} {last.pswpin:>8} {last.pswpout:>8} "
              f"{last.locked_kib() // 1024:>6}Mi {last.rss_kib() // 1024:>5}Mi  "
              f"{checks}")  # fmt: skip
    for *_, runs in rows:
        for i, r in enumerate(runs):
            why = f" {r.reason}" if r.reason else ""
            print(f"  {r.config} run {i + 1}: {r.verdict}{why} (serial log {r.log})")
            if r.cpu:
                print(f"    storm {r.swap_seconds:.0f} s; guest CPU {r.cpu}")
            for a in r.adoptions:
                print(f"    supervisor {a.get('old')} killed -9: `netswap adopt` started "
                      f"{a.get('new')} in {a.get('adopted')}, watching nbdkit "
                      f"{a.get('serving')}, its spare ready after {a.get('spare')}")  # fmt: skip
            for what in r.stalls:
                print(f"    {what}")
            for kill in r.kills:
                print(f"    {kill.get('kind')} #{kill.get('n')} while {kill.get('phase')} "
                      f"dominates: agent serving again after {kill.get('outage')}, swap moving "
                      f"after {kill.get('stall')}")  # fmt: skip
            if r.dmesg:
                print("    kernel: " + "\n    kernel: ".join(r.dmesg[-8:]))
            if r.screenshot:
                print(f"  dashboard mid-storm: {r.screenshot}")
