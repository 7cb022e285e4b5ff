"""Inside the host-in-guest lab: attach, prove the protections, swap, detach, check.

This runs *in the QEMU guest* (`lab vm --host-in-guest`), as root, from this
machine's root shared read-only over 9p: it is what an operator does on a
swapping host. It runs `netswap attach -- --backend remote ...` against stores
on the host (10.0.2.2), then checks on every thread of nbdkit the three
protections serve applies -- locked memory, oom_score_adj -1000, and IO_FLUSHER
(PF_MEMALLOC_NOIO | PF_LOCAL_THROTTLE in the task flags) -- and the same on
attach's supervisor, which must also stay small -- runs the seeded verifier
over several times the guest's RAM, checks the protections again (threads
started meanwhile too), runs `netswap detach` and checks that everything
attach changed is back. It prints only NETSWAP- and SWAPTEST lines, which the
host runner (`lab/vm.py`) parses, and powers the guest off.

The drill (--kills, --restarts): inside the storm, nbdkit is killed -9 while
swap-out dominates (the verifier writing its pattern) and again while swap-in
does (it reading it back), and `netswap restart` replaces it once: each time
the supervisor must bring a new agent back, the storm must verify every page,
and a NETSWAP-KILL line says how long swap stalled. Before the second kill the
supervisor itself is killed -9 and `netswap adopt` starts a new one, which must
adopt the nbdkit serving, start its own spare, hold the supervisor's checks, and
then be the one that brings the killed nbdkit back (NETSWAP-ADOPT).

Before each event the drill makes the pages of every file a takeover could touch
cold -- the logs in /var/log/netswap and the files in /run/netswap, tmpfs here as on
a diskless host -- paged out to the very device whose server it then kills, and
says how many left RAM (NETSWAP-COLD, lab/cold.py): a supervisor or spare that
writes its log or reads a file on its way to serving then waits on the dead device
(#29). The logs are files; a thread copies their new lines to the console between
events, never during one. A takeover not done after TAKEOVER_S gets sysrq-w from
the host (lab/hostguest.py: NETSWAP-EVENT without its NETSWAP-KILL), and from here,
if this process can still run (memory may be out for all but the real-time ones),
where the supervisor and nbdkit wait (NETSWAP-STUCK).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

from netswap.client.nbd import adopt
from netswap.client.nbd.attach import (
    AttachError,
    run_restart,
    serve_log,
    state_path,
    supervisor_log,
    supervisor_state,
)
from netswap.client.nbd.standby import CUSHION
from netswap.client.supervise.protect import MCL_CURRENT, MCL_FUTURE, MCL_ONFAULT, lock_all

from .cold import make_cold

PF_MEMALLOC_NOIO = 0x00080000
PF_LOCAL_THROTTLE = 0x00100000
IO_FLUSHER_FLAGS = PF_MEMALLOC_NOIO | PF_LOCAL_THROTTLE
# Resident pages that must be locked: all but a margin for pages the kernel will not
# lock (the vDSO, and pages shared through 9p's mapping of a file being read).
LOCKED_SHARE = 0.95
# What nbdkit + the agent may lock at attach's defaults (--reserve 16M): issue #11's
# aim, the reserve plus 32 MiB for Python, nbdkit and the agent's tables. Swapping
# adds the batch frames in flight: at most 4 per store (links.MAX_INFLIGHT) of at
# most 1 MiB, two stores here. (Measured: 41.9 MiB attached, 46.7 after a storm.)
FOOTPRINT_KIB = 48 * 1024
STORM_FOOTPRINT_KIB = FOOTPRINT_KIB + 4 * 1024 * 2
# An nbdkit that was the supervisor's spare also holds the heap cushion it grew and locked
# before it said ready (nbd/standby.py): after the drill, the one serving is such a spare
# (measured: 58.3-61.7 MiB locked, 6afe607 included, over the 56 MiB above).
SPARE_STORM_FOOTPRINT_KIB = STORM_FOOTPRINT_KIB + CUSHION // 1024
# The supervisor's own bound (#23): Python and the few modules it runs, locked.
SUPERVISOR_KIB = 16 * 1024
# Where in the storm the drill acts: (kind, the verifier's phase, at what percent).
# "adopt": the supervisor killed -9 and adopted (`netswap adopt`), then nbdkit killed.
DRILL = (("kill", "write", 40), ("adopt", "verify", 30), ("restart", "verify", 70))
KILLS = ("kill", "adopt")  # the events --kills counts
# How often the orchestrator says what the processes that serve swap are doing.
PULSE_S = 5.0
# How long the drill waits for swap to move again after an event before it says so.
RECOVERY_S = 300
# A takeover not done after this long is stuck, and said so with where it waits: the
# slowest seen took 17 s (an adoption under a busy machine's storm); the kernel fails the
# device's IO at attach's 120 s dead-connection timeout.
TAKEOVER_S = 60
# How long the drill waits for the cold pages to leave RAM (written to swap, then freed
# under the storm's pressure; seen: well under a second) before it kills anyway.
COLD_S = 15
# What the drill makes cold before each event: tmpfs here, as on a diskless host. The
# supervisor's state page stays resident (it maps and locks it: supervise/state.py).
COLD_DIRS = (Path("/var/log/netswap"), Path("/run/netswap"))
# Serialises the log tail and the drill: no tail read warms a page between the drill's
# page-out and the end of its event.
TAIL_LOCK = threading.Lock()
# The tail's pace, and the most it copies at a time (a storm's agent says a few lines a
# second; the serial console at 115200 baud takes ~11 KiB/s).
TAIL_S, TAIL_BYTES = 1.0, 64 * 1024
# What the kernel says of nbd0 that the drill's checks count; at most so many lines of it
# (3 events of ~4 lines each, and room for errors to be seen).
KERNEL_SAYS = ("reconnected socket", "Dead connection", "Receive control failed", "I/O error",
               "Killed process")  # fmt: skip
KERNEL_LINES = 200
# Set when the verifier has ended: a drill event still waiting for swap to move stops.
STORM_OVER = threading.Event()
MIN_FREE = Path("/proc/sys/vm/min_free_kbytes")
DEVICE = "/dev/nbd0"
# attach or detach taking longer than this is a hang of its own (attach waits at most
# 60 s for serve; detach's swapoff reads every swapped page back).
COMMAND_TIMEOUT_S = 600


def say(line: str) -> None:
    print(line, flush=True)


def stage(name: str) -> None:
    uptime = Path("/proc/uptime").read_text().split()[0]
    say(f"NETSWAP-STAGE {name} {uptime}")


def vmstat() -> dict[str, int]:
    pairs = (line.split() for line in Path("/proc/vmstat").read_text().splitlines())
    return {k: int(v) for k, v in pairs if k in ("pswpin", "pswpout")}


def cpu_ticks(pid: int) -> dict[str, int]:
    """Clock ticks so far: every vCPU's (/proc/stat) by kind, and nbdkit's own, all
    its threads (utime + stime of /proc/PID/stat): where a storm's time goes."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    user, nice, system, idle, iowait, irq, softirq = fields
    stat = Path(f"/proc/{pid}/stat").read_text()
    after = stat[stat.rindex(")") + 2 :].split()  # state is field 3; utime 14, stime 15
    return {"user": user + nice, "sys": system + irq + softirq, "idle": idle,
            "iowait": iowait, "nbdkit": int(after[11]) + int(after[12])}  # fmt: skip


def cpu_line(before: dict[str, int], after: dict[str, int], child_s: float) -> str:
    """NETSWAP-CPU: each kind's share of all vCPUs' time, and the CPU-seconds nbdkit
    and the verifier (the storm's workload) used."""
    spent = {k: after[k] - before[k] for k in before}
    total = sum(spent[k] for k in ("user", "sys", "idle", "iowait")) or 1
    hz = os.sysconf("SC_CLK_TCK")
    shares = " ".join(f"{k}={100 * spent[k] / total:.0f}%" for k in ("user", "sys", "iowait",
                                                                       "idle"))  # fmt: skip
    return f"NETSWAP-CPU {shares} nbdkit={spent['nbdkit'] / hz:.1f}s verifier={child_s:.1f}s"


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def kib(path: Path, field: str) -> int:
    """One 'Field:   123 kB' line of a /proc file."""
    for line in path.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def task_flags(pid: int) -> dict[int, int]:
    """tid -> the flags field (the 9th) of /proc/PID/task/TID/stat."""
    flags = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        stat = (task / "stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
        flags[int(task.name)] = int(fields[6])  # state ppid pgrp session tty tpgid flags
    return flags


def supervised() -> dict[str, object]:
    try:
        state: dict[str, object] = json.loads(supervisor_state(DEVICE).read_text())
    except (OSError, ValueError):
        return {}
    return state


def nbdkit_pid() -> int:
    """The nbdkit serving the attach: the supervisor's, or the child of the serve process
    attach recorded (--no-supervisor)."""
    pid = supervised().get("serve_pid")
    if isinstance(pid, int):
        return pid
    state = json.loads(state_path(DEVICE).read_text())
    serve = int(state["serve_pid"])
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                stat = (proc / "stat").read_text()
            except OSError:
                continue
            comm = stat[stat.index("(") + 1 : stat.rindex(")")]
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
            if comm == "nbdkit" and ppid == serve:
                return int(proc.name)
    raise LookupError(f"no nbdkit child of serve pid {serve}")


def check_protections(pid: int, when: str, spare: bool = False) -> bool:
    """One NETSWAP-CHECK line per protection, and the footprint; True when all hold.

    Locked memory: with mlockall(MCL_ONFAULT) VmLck counts whole locked areas
    (nbdkit's .bss included, touched or not), so the check is smaps_rollup's
    Locked (resident pages that are locked) against Rss: all of it, bar the
    pages that are not lockable at all.
    """
    rollup = Path(f"/proc/{pid}/smaps_rollup")
    # Locked is proportional (a shared libc page counts a share), so it is held
    # against Pss, which counts the same way.
    locked, pss, rss = kib(rollup, "Locked"), kib(rollup, "Pss"), kib(rollup, "Rss")
    vmlck = kib(Path(f"/proc/{pid}/status"), "VmLck")
    limit = FOOTPRINT_KIB if when == "attached" else STORM_FOOTPRINT_KIB
    if spare:  # a former spare: its cushion too
        limit = SPARE_STORM_FOOTPRINT_KIB
    oom = int(Path(f"/proc/{pid}/oom_score_adj").read_text())
    flags = task_flags(pid)
    missing = [tid for tid, f in flags.items() if f & IO_FLUSHER_FLAGS != IO_FLUSHER_FLAGS]
    results = [
        ("mlock", locked >= pss * LOCKED_SHARE,
         f"Locked={locked}kB Pss={pss}kB Rss={rss}kB VmLck={vmlck}kB"),
        ("footprint", locked <= limit, f"Locked={locked}kB limit={limit}kB"),
        ("oom_score_adj", oom == -1000, f"oom_score_adj={oom}"),
        ("io_flusher", not missing,
         f"threads={len(flags)} without={len(missing)} flags={sorted(set(flags.values()))}"),
    ]  # fmt: skip
    for name, ok, detail in results:
        say(f"NETSWAP-CHECK {when} {name} {'ok' if ok else 'FAIL'} {detail}")
    return all(ok for _, ok, _ in results)


def check_supervisor(when: str) -> bool:
    """The supervisor: all it holds locked, at most SUPERVISOR_KIB, OOM-exempt, IO_FLUSHER.
    Measured once it watches (it locks itself after connecting the device)."""
    deadline = time.monotonic() + 60
    while not supervised().get("watching") and time.monotonic() < deadline:
        time.sleep(0.2)
    pid = supervised().get("supervisor_pid")
    if not isinstance(pid, int):
        say(f"NETSWAP-CHECK {when} supervisor FAIL no supervisor state")
        return False
    rollup = Path(f"/proc/{pid}/smaps_rollup")
    locked, pss, rss = kib(rollup, "Locked"), kib(rollup, "Pss"), kib(rollup, "Rss")
    oom = int(Path(f"/proc/{pid}/oom_score_adj").read_text())
    flags = task_flags(pid)
    results = [
        ("supervisor-mlock", locked >= pss * LOCKED_SHARE, f"Locked={locked}kB Pss={pss}kB"),
        ("supervisor-resident", rss <= SUPERVISOR_KIB, f"Rss={rss}kB limit={SUPERVISOR_KIB}kB"),
        ("supervisor-oom", oom == -1000, f"oom_score_adj={oom}"),
        ("supervisor-io_flusher", all(f & IO_FLUSHER_FLAGS == IO_FLUSHER_FLAGS
                                      for f in flags.values()), f"threads={len(flags)}"),
    ]  # fmt: skip
    for name, ok, detail in results:
        say(f"NETSWAP-CHECK {when} {name} {'ok' if ok else 'FAIL'} {detail}")
    return all(ok for _, ok, _ in results)


def swap_io() -> int:
    counts = vmstat()
    return counts["pswpin"] + counts["pswpout"]


def drill_event(kind: str, phase: str, number: int) -> None:
    """Kill nbdkit -9 (or `netswap restart`), wait for the supervisor to serve again and
    for swap to move: NETSWAP-KILL kind=... outage (death to serving, the supervisor's)
    and stall (death to the first swap IO the kernel completes after it)."""
    if kind == "adopt":
        adopt_supervisor()
    with TAIL_LOCK:  # no tail read warms a page from here to the event's end
        cold(number)
        before = supervised()
        restarts = int(before.get("restarts", 0))  # type: ignore[call-overload]
        began = time.monotonic()
        say(f"NETSWAP-EVENT n={number} kind={kind}")  # the host dumps the blocked tasks if
        if kind in KILLS:  # no NETSWAP-KILL follows in time (this process may be starved)
            os.kill(nbdkit_pid(), 9)
        else:  # `netswap restart`'s own code, run in this process (locked, already loaded):
            # a new Python started mid-storm at 256 MiB waited 75 s to get going, its pages
            # taken as fast as it faulted them (seen: D in swap_readpage till the storm ended)
            threading.Thread(target=restart, daemon=True).start()
        served = 0.0
        moved = -1.0
        stuck = False
        last_io = swap_io()
        while time.monotonic() - began < RECOVERY_S:
            time.sleep(0.05)
            if served and STORM_OVER.is_set():
                break  # no swap will move: the stall stays unmeasured (-1), which fails the run
            now = supervised()
            if not served and int(now.get("restarts", 0)) > restarts:  # type: ignore[call-overload]
                served = time.monotonic() - began
                last_io = swap_io()
            elif served and swap_io() > last_io:
                moved = time.monotonic() - began
                break
            if not served and not stuck and time.monotonic() - began > TAKEOVER_S:
                stuck = True
                report_stuck(number)
    outage = supervised().get("last_outage_s", -1)
    say(f"NETSWAP-KILL n={number} kind={kind} phase={phase} outage={outage}s "
        f"served={served:.2f}s stall={moved:.2f}s pid={nbdkit_pid()}")  # fmt: skip


def cold(number: int) -> None:
    """Every file a takeover could touch, paged out to the device about to lose its
    server: NETSWAP-COLD says how many pages each has and how many are still in RAM."""
    paths = sorted(p for d in COLD_DIRS if d.is_dir() for p in d.iterdir()
                   if p.is_file() and p != supervisor_state(DEVICE))  # fmt: skip
    began = time.monotonic()
    try:
        counts = make_cold(paths, COLD_S)
    except OSError as exc:
        say(f"NETSWAP-COLD n={number} error={exc}".replace(" ", "_"))
        return
    pages = sum(total for total, _ in counts.values())
    warm = sum(left for _, left in counts.values())
    log = counts.get(supervisor_log(DEVICE), (0, 0))
    say(f"NETSWAP-COLD n={number} files={len(counts)} pages={pages} in_ram={warm} "
        f"supervisor_log={log[0]}/{log[0] - log[1]} took={time.monotonic() - began:.1f}s "
        + " ".join(f"{p.name}={t - w}/{t}" for p, (t, w) in counts.items()))  # fmt: skip


def report_stuck(number: int) -> None:
    """Where the supervisor and nbdkit wait, TAKEOVER_S into an event: each thread's
    wait channel and system call (number and first argument: a write's descriptor),
    what its descriptors 1 and 2 are, and the kernel's blocked tasks (sysrq-w)."""
    state = supervised()
    for role in ("supervisor_pid", "serve_pid"):
        pid = state.get(role)
        if not isinstance(pid, int):
            continue
        try:
            fds = {n: os.readlink(f"/proc/{pid}/fd/{n}") for n in (1, 2)}
            threads = []
            for task in Path(f"/proc/{pid}/task").iterdir():
                call = (task / "syscall").read_text().split()[:2]
                threads.append(f"{task.name}:{(task / 'wchan').read_text() or '-'}:"
                               f"{'/'.join(call)}")  # fmt: skip
        except OSError as exc:
            say(f"NETSWAP-STUCK n={number} {role}={pid} gone ({exc.strerror})")
            continue
        say(f"NETSWAP-STUCK n={number} {role}={pid} fd1={fds[1]} fd2={fds[2]} "
            f"threads={','.join(threads)}")  # fmt: skip
    Path("/proc/sysrq-trigger").write_text("w")


def adopt_supervisor() -> None:
    """kill -9 the supervisor; `netswap adopt` (its code, in this locked process, as
    restart's); wait for the new supervisor's spare, without which a kill under the
    storm would be a cold start. NETSWAP-ADOPT: how long each took, and whether the
    new supervisor adopted the nbdkit serving and holds the supervisor's checks."""
    before = supervised()
    old, serving = before.get("supervisor_pid"), before.get("serve_pid")
    began = time.monotonic()
    if isinstance(old, int):
        os.kill(old, 9)
        while Path(f"/proc/{old}").exists() and time.monotonic() - began < 10:
            time.sleep(0.05)  # init reaps it: attach, its parent, has exited
    try:
        adopt.run(argparse.Namespace(device=DEVICE))
        took = f"{time.monotonic() - began:.2f}s"
    except AttachError as exc:
        say(f"  adopt: {exc}")
        took = "-1s"
    new = supervised().get("supervisor_pid")
    if isinstance(new, int):  # adopt ran here, so this process is its parent: reap it
        threading.Thread(target=reap, args=(new,), daemon=True).start()  # as init would
    while supervised().get("standby") != "ready" and time.monotonic() - began < RECOVERY_S:
        time.sleep(0.1)
    spare = time.monotonic() - began
    now = supervised()
    checks = check_supervisor("adopted")
    ok = took != "-1s" and new != old and now.get("serve_pid") == serving and checks
    say(f"NETSWAP-ADOPT ok={'yes' if ok else 'no'} old={old} new={new} "
        f"serving={now.get('serve_pid')} adopted={took} spare={spare:.2f}s")  # fmt: skip


def reap(pid: int) -> None:
    """Wait for a child of this process (subprocess may reap it first: no matter)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def restart() -> None:
    try:
        run_restart(argparse.Namespace(device=DEVICE, timeout=COMMAND_TIMEOUT_S))
    except AttachError as exc:
        say(f"  restart: {exc}")


def storm(args: argparse.Namespace) -> int:
    """The verifier, with the drill's events at their points in its progress."""
    events = [e for e in DRILL if e[0] in KILLS][: args.kills]
    events += [e for e in DRILL if e[0] == "restart"][: args.restarts]
    env = {**os.environ, "SWAPTEST_CONTENT": args.content}
    proc = subprocess.Popen([args.swaptest, str(args.mib), str(args.seed)],
                            stdout=subprocess.PIPE, text=True, bufsize=1, env=env)  # fmt: skip
    assert proc.stdout is not None
    stop = threading.Event()
    if events:
        threading.Thread(target=pulse, args=(stop,), daemon=True).start()
    drills: list[threading.Thread] = []
    for line in proc.stdout:
        say(line.rstrip())
        parts = line.split()
        if len(parts) == 4 and parts[1] == "progress":
            phase, percent = parts[2], int(parts[3].rstrip("%"))
            due = [e for e in events if e[1] == phase and percent >= e[2]]
            for event in due[:1]:  # one at a time: the next waits for its own point
                events.remove(event)
                if drills:
                    drills[-1].join()
                drill = threading.Thread(target=drill_event, args=(event[0], phase,
                                                                    len(drills) + 1))  # fmt: skip
                drill.start()
                drills.append(drill)
    STORM_OVER.set()
    for drill in drills:
        drill.join()
    stop.set()
    return proc.wait()


def kernel_log() -> None:
    """What the kernel said of the device and of memory: NETSWAP-DMESG lines."""
    text = subprocess.run(["dmesg"], capture_output=True, text=True, check=False).stdout
    lines = [ln for ln in text.splitlines() if "nbd0" in ln or "Killed process" in ln]
    # Every line the checks read (hostguest.drill_failure: reconnects, IO errors, OOM
    # kills), then the last of the rest: a restart mid-storm logs hundreds of "Possible
    # stuck request" lines, which pushed the reconnects out of the last 40 (seen in CI).
    telling = [ln for ln in lines if any(k in ln for k in KERNEL_SAYS)][-KERNEL_LINES:]
    for line in telling + [ln for ln in lines if ln not in telling][-40:]:
        say(f"NETSWAP-DMESG {line}")
    say(f"NETSWAP-OOM kills={sum('Killed process' in ln for ln in text.splitlines())}")


def netswap(*args: str) -> subprocess.CompletedProcess[str]:
    """Run a netswap command as an operator would; its output goes to the serial log."""
    cmd = [sys.executable, "-m", "netswap.client.cli", *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    for line in (result.stdout + result.stderr).splitlines():
        say(f"  {args[0]}: {line}")
    return result


def attached_state() -> list[str]:
    """What attach leaves behind; empty once detach has undone all of it."""
    left = []
    if Path("/sys/block/nbd0/pid").exists():
        left.append("nbd0 still connected")
    if any(line.startswith(DEVICE) for line in Path("/proc/swaps").read_text().splitlines()):
        left.append("nbd0 still swap")
    if any(p.name.isdigit() and (p / "comm").read_text().strip() == "nbdkit"
           for p in Path("/proc").iterdir() if (p / "comm").exists()):  # fmt: skip
        left.append("nbdkit still running")
    if state_path(DEVICE).exists():
        left.append("attach state file still there")
    return left


def run(args: argparse.Namespace) -> str:
    """The guest's whole job; returns the failure reason, '' on success."""
    before_min_free = int(MIN_FREE.read_text())
    serve = [
        "--backend",
        "remote",
        "--replicas",
        str(args.replicas),
        "--http",
        args.http,
        "--size",
        f"{args.export_mib}M",
    ]
    if args.http_token:  # the endpoint listens off loopback (for QEMU's forward)
        token = Path("/run/netswap/ops-token")
        token.parent.mkdir(parents=True, exist_ok=True)
        token.write_text(args.http_token + "\n")
        token.chmod(0o600)
        serve += ["--http-token-file", str(token)]
    for store in args.store:
        serve += ["--store", store]
    serve += args.serve_arg
    # The logs are files on tmpfs, as on a diskless host (the drill pages them out); a
    # thread copies their lines to the console between the drill's events.
    for log in (serve_log(DEVICE), supervisor_log(DEVICE)):
        log.parent.mkdir(parents=True, exist_ok=True)
        log.unlink(missing_ok=True)
    threading.Thread(target=tail_logs, daemon=True).start()
    attach = netswap("attach", *args.attach_arg, "--", *serve)
    if attach.returncode != 0:
        say(f"NETSWAP-ATTACH rc={attach.returncode} {attach.stderr.strip()[-300:]!r}")
        left = attached_state()
        undone = "undone" if not left and int(MIN_FREE.read_text()) == before_min_free else left
        return f"attach-failed undo={'ok' if undone == 'undone' else undone}"
    stage("attached")
    say(f"NETSWAP-MINFREE before={before_min_free} attached={MIN_FREE.read_text().strip()}")
    pid = nbdkit_pid()
    protected = check_protections(pid, "attached")
    if supervised():
        protected = check_supervisor("attached") and protected
    swapped = ""
    if args.mib:
        stage("storm")
        base, ticks, children = vmstat(), cpu_ticks(pid), _children_cpu()
        began = time.monotonic()
        rc = storm(args)
        seconds = time.monotonic() - began
        now = vmstat()
        say(f"NETSWAP-SWAP rc={rc} seconds={seconds:.1f} "
            f"pswpin={now['pswpin'] - base['pswpin']} "
            f"pswpout={now['pswpout'] - base['pswpout']}")  # fmt: skip
        if nbdkit_pid() != pid:  # a drill replaced nbdkit: the dead ones' CPU died with
            ticks = {**ticks, "nbdkit": 0}  # them; the one serving now counts from its start
        say(cpu_line(ticks, cpu_ticks(nbdkit_pid()), _children_cpu() - children))
        swapped = "" if rc == 0 else f"swaptest-rc-{rc}"
        replaced = nbdkit_pid() != pid  # the drill's events: a spare serves now
        protected = check_protections(nbdkit_pid(), "stormed", replaced) and protected
        if supervised():
            protected = check_supervisor("stormed") and protected
        kernel_log()
    detach = netswap("detach")
    stage("detached")
    left = attached_state()
    min_free = int(MIN_FREE.read_text())
    if min_free != before_min_free:
        left.append(f"vm.min_free_kbytes {min_free} != {before_min_free}")
    say(f"NETSWAP-DETACH rc={detach.returncode} restored={left or 'yes'}")
    reasons = [r for r in (swapped, "" if protected else "protections") if r]
    if detach.returncode != 0 or left:
        reasons.append("detach")
    return ",".join(reasons)


def pulse(stop: threading.Event) -> None:
    """Every PULSE_S from this locked process (init-host's shell vitals stall when its
    forks need memory): free memory, pressure, and each nbdkit's and the supervisor's
    state, wait channel and resident size -- what a restart under the storm waits on."""
    while not stop.wait(PULSE_S):
        mem = {k: v for k, v in (line.split(":") for line in
                                 Path("/proc/meminfo").read_text().splitlines()[:8])}  # fmt: skip
        full = Path("/proc/pressure/memory").read_text().splitlines()[1].split()[1]
        procs = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                stat = (proc / "stat").read_text()
                comm = stat[stat.index("(") + 1 : stat.rindex(")")]
                if comm not in ("nbdkit", "python3") or proc.name == str(os.getpid()):
                    continue
                state = stat[stat.rindex(")") + 2]
                wchan = (proc / "wchan").read_text() or "-"
                rss = kib(proc / "status", "VmRSS")
            except (OSError, ValueError):
                continue
            procs.append(f"{comm}:{proc.name}:{state}:{wchan}:{rss}k")
        say(
            f"NETSWAP-PULSE up={Path('/proc/uptime').read_text().split()[0]} "
            f"free={mem['MemFree'].split()[0]}k avail={mem['MemAvailable'].split()[0]}k "
            f"min_free={MIN_FREE.read_text().strip()}k psi_full={full} {' '.join(procs)}"
        )


def tail_logs() -> None:
    """The supervisor's and nbdkit's logs, line by line to the console (`  [name] ...`),
    every TAIL_S; not while the drill holds TAIL_LOCK (its cold pages must stay cold)."""
    offsets: dict[Path, int] = {}
    while True:
        time.sleep(TAIL_S)
        with TAIL_LOCK:
            for log in (supervisor_log(DEVICE), serve_log(DEVICE)):
                try:
                    with open(log, "rb") as f:
                        f.seek(offsets.get(log, 0))
                        data = f.read(TAIL_BYTES)
                except OSError:
                    continue
                # Whole lines; a line longer than a read goes as it is.
                end = data.rfind(b"\n") + 1 or (len(data) if len(data) == TAIL_BYTES else 0)
                whole = data[:end]
                offsets[log] = offsets.get(log, 0) + len(whole)
                name = log.stem.split("-")[0]
                for line in whole.decode(errors="replace").splitlines():
                    say(f"  [{name}] {line}")


def pin_self() -> None:
    """This orchestrator, locked: under the storm its drill and timings must not wait for
    its own pages to come back from the swap it is timing."""
    outcome = lock_all(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT)
    say(f"NETSWAP-NOTE orchestrator {outcome}")


def main() -> None:
    parser = argparse.ArgumentParser(prog="netswap-lab-guest")
    parser.add_argument("--store", action="append", default=[])
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--http", default="0.0.0.0:9178")
    parser.add_argument("--http-token", default="", help="the ops endpoint's bearer token")
    parser.add_argument("--mib", type=int, default=0, help="verifier pattern (0: no storm)")
    parser.add_argument("--export-mib", type=int, default=1024, help="the swap device's size")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--swaptest", default="/run/swaptest")
    parser.add_argument("--content", choices=("random", "mixed"), default="random")
    parser.add_argument("--kills", type=int, default=0,
                        help="kill -9 nbdkit mid-storm (0-2; the second after the supervisor "
                        "was killed -9 and adopted)")  # fmt: skip
    parser.add_argument("--restarts", type=int, default=0, help="netswap restart mid-storm (0-1)")
    parser.add_argument("--attach-arg", action="append", default=[])
    parser.add_argument("--serve-arg", action="append", default=[])
    args = parser.parse_args()
    stage("guest")
    pin_self()
    try:
        reason = run(args)
    except Exception as exc:  # report, never leave the guest running
        reason = f"guest-error:{type(exc).__name__}:{exc}".replace(" ", "_")
    verdict = "FAIL" if reason else "PASS"
    say(f"NETSWAP-RESULT {verdict}" + (f" reason={reason}" if reason else ""))
    Path("/proc/sysrq-trigger").write_text("o")


if __name__ == "__main__":
    main()
