"""The container engine under `netswap lab compose`: podman, offline, on this host.

Runs on the machine that hosts the lab. Debian's docker-compose (1.29) drives
podman through podman's Docker API socket, which this module starts and stops:
docker-compose honours `depends_on: condition: service_healthy` and compose
profiles, which Debian's podman-compose (1.0.3) ignores. Three things this
machine needs, kept in a containers.conf of our own (CONTAINERS_CONF), not in
/etc: runc (crun refuses the hybrid cgroup layout), no default ulimits
(setrlimit fails without CAP_SYS_RESOURCE), and -- since podman schedules
healthchecks with systemd timers and no systemd runs here -- a thread that runs
each container's healthcheck itself. The base image debian:12-slim is made
from Debian packages (debootstrap), as no image registry is reachable.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import IO

from .qemu import LabError

BASE_IMAGE = "docker.io/library/debian:12-slim"  # what `FROM debian:12-slim` resolves to
TOOLS = ("podman", "runc", "debootstrap", "docker-compose")  # each is its Debian package too
CONTAINERS_CONF = """\
# netswap lab compose: podman on a host without systemd or CAP_SYS_RESOURCE
[containers]
default_ulimits = []
[engine]
runtime = "runc"
"""
# podman's healthcheck interval in compose.yaml is 5 s; running them every 2 s keeps
# a dependency's "healthy" at most that late.
HEALTH_TICK_S = 2.0


def require_tools() -> None:
    """One line naming what is missing, before anything starts."""
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        raise LabError(f"lab compose needs {', '.join(missing)} (apt-get install "
                       f"{' '.join(missing)})")  # fmt: skip


def debian_mirror() -> str:
    """The Debian mirror this host's apt uses (deb822 or one-line sources)."""
    for path in sorted(Path("/etc/apt").glob("sources.list.d/*.sources")):
        found = re.search(r"^URIs:\s*(\S+)", path.read_text(), re.M)
        if found and "security" not in found.group(1):
            return found.group(1)
    lists = [Path("/etc/apt/sources.list"), *Path("/etc/apt").glob("sources.list.d/*.list")]
    for path in lists:
        if path.exists():
            found = re.search(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+bookworm\s", path.read_text(), re.M)
            if found:
                return found.group(1)
    return "http://deb.debian.org/debian"


class Engine:
    """podman with its Docker API socket up, for one compose project."""

    def __init__(self, state: Path, project: str) -> None:
        self.state, self.project = state, project
        self.socket = state / "podman.sock"
        self.env = dict(os.environ, CONTAINERS_CONF=str(state / "containers.conf"),
                        DOCKER_HOST=f"unix://{self.socket}")  # fmt: skip
        self._service: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._health, name="healthchecks", daemon=True)

    def start(self) -> None:
        require_tools()
        self.state.mkdir(parents=True, exist_ok=True)
        (self.state / "containers.conf").write_text(CONTAINERS_CONF)
        self.socket.unlink(missing_ok=True)
        log = self.state / "podman-service.log"
        self._log = open(log, "wb")  # noqa: SIM115 -- open while the service runs
        cmd = ["podman", "system", "service", "--time=0", f"unix://{self.socket}"]
        self._service = subprocess.Popen(cmd, env=self.env, stdout=self._log, stderr=self._log)
        deadline = time.monotonic() + 15
        while not self.socket.exists():
            if self._service.poll() is not None or time.monotonic() > deadline:
                raise LabError(f"podman's API service did not start (see {log})")
            time.sleep(0.1)
        self._ticker.start()

    def stop(self) -> None:
        self._stop.set()
        if self._service is not None:
            self._service.terminate()
            try:
                self._service.wait(10)
            except subprocess.TimeoutExpired:
                self._service.kill()
                self._service.wait()
        if self._log is not None:
            self._log.close()

    def podman(self, *args: str, check: bool = True, timeout: float = 600) -> str:
        result = subprocess.run(["podman", *args], env=self.env, capture_output=True,
                                text=True, timeout=timeout)  # fmt: skip
        if check and result.returncode != 0:
            raise LabError(f"podman {args[0]} failed: {result.stderr.strip()[-300:]}")
        return result.stdout

    def containers(self, all_: bool = False) -> list[str]:
        label = f"label=com.docker.compose.project={self.project}"
        out = self.podman("ps", *(["-a"] if all_ else []), "--filter", label,
                          "--format", "{{.Names}}", check=False)  # fmt: skip
        return out.split()

    def _health(self) -> None:
        while not self._stop.wait(HEALTH_TICK_S):
            for name in self.containers():
                self.podman("healthcheck", "run", name, check=False, timeout=30)

    def base_image(self) -> float:
        """Make debian:12-slim from Debian packages unless it exists; seconds spent."""
        if not self.podman("images", "-q", BASE_IMAGE, check=False).strip():
            began = time.monotonic()
            mirror = debian_mirror()
            with tempfile.TemporaryDirectory(dir=self.state) as tmp:
                root = Path(tmp) / "root"
                boot = subprocess.run(["debootstrap", "--variant=minbase", "bookworm", str(root),
                                       mirror], capture_output=True, text=True)  # fmt: skip
                if boot.returncode != 0:
                    last = (boot.stderr or boot.stdout).strip().splitlines()[-1:]
                    raise LabError(f"debootstrap of bookworm from {mirror} failed: {last}")
                tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
                imported = subprocess.run(["podman", "import", "-", BASE_IMAGE], env=self.env,
                                          stdin=tar.stdout, capture_output=True)  # fmt: skip
                tar.wait()
                if imported.returncode != 0 or tar.returncode != 0:
                    raise LabError(f"podman import failed: {imported.stderr.decode()[-300:]}")
            return time.monotonic() - began
        return 0.0
