"""make bench-budget: µs of CPU per request, by stage, on the agent and on the store.

For each request shape (a 4 KiB write alone and at depth, a 32-page write, a
4 KiB read alone) fio drives one agent (`netswap serve --backend remote`) over
one store. Over the same window this reads each process's CPU from /proc
(user and system time, all threads) and samples it with py-spy in `--gil` mode:
a sample names the Python stack of the thread that holds the GIL, so the
samples split the process's Python CPU between stages. What remains of the
process's CPU -- nbdkit's C, the kernel's side of every syscall and wake-up --
is shown as its own lines ("kernel" from system time, "C outside Python" from
the rest of user time), so every line adds up to the CPU /proc measured.

A stage is named by the innermost frame that matches one of STAGES' rules
(function names of the agent, the store and the protocol, old and new, so a
baseline venv is measured with the same table). `--venv PATH` measures
another checkout's venv (its `netswap`), for a before/after in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from ..conftest import free_port, wait_for_port
from .fio import Workload

SIZE = "256M"
RATE = 200  # samples/s: py-spy --nonblocking at this rate costs the target little
WARMUP_S = 1.5
WINDOW_S = 4.0
TICK = os.sysconf("SC_CLK_TCK")

SHAPES = (
    Workload("4K write QD1", "randwrite", "4k", 1),
    Workload("4K write QD32", "randwrite", "4k", 32),
    Workload("32-page write QD8", "randwrite", "128k", 8),
    Workload("4K read QD1", "randread", "4k", 1),
)

# (stage, regex on a frame's function name), tried from the innermost frame outwards;
# the first frame that matches any rule names the sample's stage.
STAGES: tuple[tuple[str, str], ...] = (
    ("tag", r"^(page_tag|batch_tags|page_crc|slot_seed|tag_run|tags_of|crc32)$"),
    ("check", r"^(prove_pages|prove_reply|_verified|check_run|prove|_prove\w*)$"),
    ("copy", r"^(copy_in|copy_out|_copy_\w+)$"),
    ("reserve", r"^Reserve\.|^(acquire|release)$"),
    ("hand-off, wake", r"^(Completion\.|Agent\.submit$|Agent\._drain_inbox|Inbox\.|Hand\w*\.)"),
    (
        "frame",
        r"^(encode|encode_parts|swap_out_parts|_around_bulk|packb|Connection\.send\w*"
        r"|frame_\w+|pack_\w+|_head\w*)$|^Connection\.send",
    ),
    (
        "decode",
        r"^(decode|_build|unpackb|frame_length|Connection\.(next_event|_next_event"
        r"|receive_data|_track_received|commit|buffer)|\w+Protocol\.(data_received"
        r"|buffer_updated|get_buffer)|parse_\w+|unpack_\w+)$|__init__$|__post_init__$",
    ),
    ("syscalls", r"^(sendmsg|sendall|recv|recv_into|writelines|write|_send|_recv\w*)$"),
    (
        "backend",
        r"^(PageBackend|BackendCore|MemoryBackend|FileBackend|Area|Backend)\.|"
        r"^(first_of_run|is_run)$",
    ),
    ("session", r"^(Session|StoreProtocol|StoreService|Slices)\.|^_observe$"),
    ("routing", r"^(Agent|StoreLink|Routing|Repair|SlabTable|SlotMap|Store|Batches|Link\w*)\."),
    ("device", r"^(RemoteDevice|DirectReads|DirectWrites|Direct\w*|_Conn|_Pool|Pool)\."),
    ("callback", r"^(pread|pwrite|wrapper|_dev|flush)$"),
)
_RULES = [(stage, re.compile(rx)) for stage, rx in STAGES]
_FRAME = re.compile(r"^(?P<name>[^ ]+) \((?P<file>[^:)]*)")


@dataclass
class Sampled:
    cpu_s: float  # user + system over the window
    sys_s: float
    switches: float  # context switches of all its threads over the window
    stages: Counter[str]  # GIL samples by stage


def stage_of(stack: list[str]) -> str:
    names = []
    for frame in stack:
        m = _FRAME.match(frame.strip())
        if m:
            names.append(m.group("name"))
    for name in reversed(names):
        for stage, rx in _RULES:
            if rx.search(name):
                return stage
    return "loop, other Python"


def cpu_of(pid: int) -> tuple[float, float]:
    """(user + system seconds, system seconds) of all its threads, ended ones too."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK, int(fields[12]) / TICK


def switches_during(pid: int, seconds: float) -> subprocess.Popen[str]:
    """perf stat counting the process's context switches (threads that end included)."""
    cmd = ["perf", "stat", "-x,", "-e", "context-switches", "-p", str(pid), "--", "sleep",
           str(seconds)]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def switches_of(perf: subprocess.Popen[str]) -> float:
    _, err = perf.communicate(timeout=60)
    for line in err.splitlines():
        value = line.split(",")[0]
        if "context-switches" in line and value.strip().isdigit():
            return float(value)
    return float("nan")


def parse_raw(path: Path) -> Counter[str]:
    stages: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stages[stage_of(stack.split(";"))] += int(count)
    return stages


def fio_job(uri: str, work: Workload, seconds: float) -> subprocess.Popen[str]:
    cmd = ["fio", "--name=budget", "--ioengine=nbd", f"--uri={uri}", f"--rw={work.rw}",
           f"--bs={work.bs}", f"--iodepth={work.iodepth}", f"--size={SIZE}", "--time_based",
           f"--runtime={seconds}", "--output-format=json", "--randrepeat=0"]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def sample(pids: dict[str, int], out: Path) -> dict[str, Sampled]:
    before = {name: cpu_of(pid) for name, pid in pids.items()}
    perfs = {name: switches_during(pid, WINDOW_S) for name, pid in pids.items()}
    spies = {
        name: subprocess.Popen(
            [
                str(Path(sys.executable).parent / "py-spy"),
                "record",
                "--pid",
                str(pid),
                "--duration",
                str(int(WINDOW_S)),
                "--rate",
                str(RATE),
                "--gil",
                "--nonblocking",
                "--format",
                "raw",
                "--output",
                str(out / f"{name}.txt"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for name, pid in pids.items()
    }
    began = time.monotonic()
    for spy in spies.values():
        spy.wait(WINDOW_S + 30)
    elapsed = time.monotonic() - began
    after = {name: cpu_of(pid) for name, pid in pids.items()}
    result = {}
    for name in pids:
        stages = parse_raw(out / f"{name}.txt")
        # py-spy's run is a little longer than its sampling window: scale CPU to it.
        scale = WINDOW_S / elapsed
        cpu = (after[name][0] - before[name][0]) * scale
        system = (after[name][1] - before[name][1]) * scale
        result[name] = Sampled(cpu, system, switches_of(perfs[name]), stages)
    return result


def measure(
    netswap: str, work: Workload, tmp: Path, extra: list[str]
) -> tuple[float, dict[str, Sampled]]:
    store_port, nbd_port = free_port(), free_port()
    with ExitStack() as stack:
        store = subprocess.Popen([netswap, "store", "--listen", f"127.0.0.1:{store_port}",
                                  "--capacity", "1G"], stderr=subprocess.DEVNULL)  # fmt: skip
        stack.callback(lambda: (store.kill(), store.wait()))
        wait_for_port(store_port, store)
        serve = subprocess.Popen(
            [
                netswap,
                "serve",
                "--listen",
                f"127.0.0.1:{nbd_port}",
                "--size",
                SIZE,
                "--no-mlock",
                "--backend",
                "remote",
                "--store",
                f"127.0.0.1:{store_port}",
                "--area",
                "budget",
                *extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        stack.callback(lambda: (serve.terminate(), serve.wait()))
        wait_for_port(nbd_port, serve, timeout=30)
        uri = f"nbd://127.0.0.1:{nbd_port}/swap"
        subprocess.run(["fio", "--name=fill", "--ioengine=nbd", f"--uri={uri}", "--rw=write",
                        "--bs=1m", "--iodepth=4", f"--size={SIZE}", "--output-format=json"],
                       capture_output=True, check=True, timeout=300)  # fmt: skip
        nbdkit = serve.pid  # serve execs nbdkit
        job = fio_job(uri, work, WARMUP_S + WINDOW_S + 2)
        time.sleep(WARMUP_S)
        sampled = sample({"agent": nbdkit, "store": store.pid}, tmp)
        out, _ = job.communicate(timeout=120)
        side = json.loads(out[out.index("{") :])["jobs"][0]
        iops = side["read" if work.rw.endswith("read") else "write"]["iops"]
        return iops, sampled


def table(name: str, iops: float, sampled: Sampled) -> list[tuple[str, float]]:
    """(line, µs of CPU per request), adding up to what /proc measured: system time is
    the kernel's line; user time is split between the stages in proportion to their
    GIL samples (at most the samples' own time), the rest is C outside Python.
    Compiled modules (deploy/compile.py) have no Python frames of their own: their
    time shows in the stage of the Python function that called them."""
    requests = iops * WINDOW_S
    per = 1e6 / requests
    samples = sum(sampled.stages.values())
    user_s = max(0.0, sampled.cpu_s - sampled.sys_s)
    python_s = min(samples / RATE, user_s)
    rows = [(stage, n / samples * python_s * per) for stage, n in sampled.stages.most_common()]
    rows.append(("kernel (system time)", sampled.sys_s * per))
    rows.append(("C outside Python (user time not in a GIL sample)", (user_s - python_s) * per))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--venv", default=str(Path(sys.executable).parent.parent))
    parser.add_argument("--only", default="", help="shapes whose name contains this")
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--serve-arg", action="append", default=[], help="for netswap serve")
    args = parser.parse_args()
    netswap = str(Path(args.venv) / "bin" / "netswap")
    report: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for work in (w for w in SHAPES if args.only in w.name):
            iops, sampled = measure(netswap, work, Path(tmp), args.serve_arg)
            pages = int(work.bs.rstrip("k")) // 4
            print(f"\n{work.name}: {iops:,.0f} requests/s ({iops * pages:,.0f} pages/s), "
                  f"{args.venv}")  # fmt: skip
            for side in ("agent", "store"):
                rows = table(side, iops, sampled[side])
                total = sum(us for _, us in rows)
                print(
                    f"  {side}: {total:.1f} µs of CPU per request "
                    f"({sampled[side].cpu_s / WINDOW_S:.2f} CPUs, "
                    f"{sampled[side].switches / (iops * WINDOW_S):.1f} context switches)"
                )
                for line, us in rows:
                    print(f"    {line:<52}{us:>8.1f}")
                report[f"{work.name}/{side}"] = dict(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
