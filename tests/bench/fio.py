"""fio (ioengine=nbd) runs against NBD servers, and what their JSON says."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass


@dataclass(frozen=True)
class Workload:
    name: str
    rw: str
    bs: str
    iodepth: int


@dataclass(frozen=True)
class Result:
    iops: float
    p50_us: float
    p99_us: float
    cpu_us: float = 0.0  # the client's CPU per request (user + system)
    server_cpu_us: float = 0.0  # the server's (its process tree's), when measured
    store_cpu_us: float = 0.0  # the store's behind it, when it has one of its own


RAMP_S = 0.5  # fio's --ramp_time: run, not counted

WORKLOADS = (
    Workload("4K randread QD1", "randread", "4k", 1),
    Workload("4K randread QD32", "randread", "4k", 32),
    Workload("4K randwrite QD1", "randwrite", "4k", 1),
    Workload("4K randwrite QD32", "randwrite", "4k", 32),
    Workload("64K randwrite QD8", "randwrite", "64k", 8),
)


def fio(uri: str, work: Workload, size: str, runtime: float, offset: str = "0") -> Result:
    """One run over [offset, offset + size) of the export."""
    cmd = [
        "fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}", f"--rw={work.rw}",
        f"--bs={work.bs}", f"--iodepth={work.iodepth}", f"--size={size}", "--time_based",
        f"--runtime={runtime}", f"--ramp_time={RAMP_S}", "--output-format=json", "--randrepeat=0",
        f"--offset={offset}",
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=runtime + 60)
    job = json.loads(out.stdout[out.stdout.index("{") :])["jobs"][0]
    side = job["read"] if work.rw.endswith("read") else job["write"]
    pct = side["clat_ns"]["percentile"]
    cpu = (job["usr_cpu"] + job["sys_cpu"]) / 100 / side["iops"] * 1e6 if side["iops"] else 0.0
    return Result(side["iops"], pct["50.000000"] / 1000, pct["99.000000"] / 1000, cpu)


def prefill(uri: str, size: str) -> None:
    """Write the whole export once so reads hit real pages, not holes."""
    cmd = [
        "fio", "--name=fill", "--ioengine=nbd", f"--uri={uri}", "--rw=write", "--bs=1m",
        "--iodepth=4", f"--size={size}", "--output-format=json",
    ]  # fmt: skip
    subprocess.run(cmd, capture_output=True, check=True, timeout=300)
