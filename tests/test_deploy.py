"""deploy/: the compose files checked statically (tests/test_lab_compose.py runs
them on podman), the systemd units, and the process lab of the same topology."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from netswap.client.cli import build_parser

from .nbdserver import NETSWAP

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
COMPOSE = DEPLOY / "compose" / "compose.yaml"


def compose_config() -> dict[str, object]:
    import yaml  # Debian's python3-yaml, present with docker-compose

    out = subprocess.run(["docker-compose", "-f", str(COMPOSE), "config"], capture_output=True,
                         text=True, check=True)  # fmt: skip
    data: dict[str, object] = yaml.safe_load(out.stdout)
    return data


def test_compose_file_validates() -> None:
    result = subprocess.run(["docker-compose", "-f", str(COMPOSE), "config", "-q"],
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stderr


def test_compose_topology_matches_the_lab() -> None:
    services = compose_config()["services"]
    assert isinstance(services, dict)
    assert {"store1", "store2", "store3", "agent", "load", "prometheus", "grafana"} <= set(services)
    for name, svc in services.items():
        published = [p for p in svc.get("ports", [])]
        if name not in ("prometheus", "grafana"):
            assert not published, f"{name} publishes {published}: only dashboards may"
        if name not in ("load",):
            assert "healthcheck" in svc or name == "grafana", f"{name} has no healthcheck"
    assert services["agent"]["privileged"] is True
    assert "--replicas" in services["agent"]["command"]


def test_every_netswap_command_in_compose_is_accepted_by_the_cli() -> None:
    parser = build_parser()
    checked = 0
    for name, svc in compose_config()["services"].items():  # type: ignore[attr-defined]
        if svc.get("image") != "netswap:lab":
            continue
        argv = list(svc["command"])
        parser.parse_args(argv)  # argparse exits (SystemExit) on any unknown option
        if argv[0] == "serve":
            # The secrets compose mounts at /run/secrets/NAME are files next to it here.
            secrets = compose_config()["secrets"]  # type: ignore[index]
            local = [
                str(DEPLOY / "compose" / secrets[a.removeprefix("/run/secrets/")]["file"])
                if a.startswith("/run/secrets/")
                else a
                for a in argv
            ]
            dry = subprocess.run([NETSWAP, *local, "--dry-run"], capture_output=True, text=True)
            assert dry.returncode == 0, (name, dry.stderr)
            assert "backend=remote" in dry.stdout
        checked += 1
    assert checked == 5


def test_the_offline_profile_is_an_addition_that_drops_only_the_registry_images() -> None:
    import yaml

    files = ["-f", str(COMPOSE), "-f", str(DEPLOY / "compose" / "compose.offline.yaml")]
    out = subprocess.run(["docker-compose", *files, "config"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    services = yaml.safe_load(out.stdout)["services"]
    assert set(services) == set(compose_config()["services"])  # type: ignore[call-overload]
    assert "grafana" not in services or services["grafana"]["profiles"] == ["registry"]
    assert services["prometheus"]["build"]["dockerfile"] == "deploy/compose/Dockerfile.prometheus"
    text = (DEPLOY / "compose" / "Dockerfile.prometheus").read_text()
    assert re.findall(r"^FROM\s+(\S+)", text, re.M) == ["debian:12-slim"]
    assert "apt-get install" in text and " prometheus " in text


def test_dockerfile_builds_from_debian_packages_only() -> None:
    text = (DEPLOY / "compose" / "Dockerfile").read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert froms and all(f.startswith("debian:") for f in froms)
    assert not re.search(r"\b(curl|wget|git clone|npm|pip install (?!--no-deps --no-index))", text)
    packages = re.search(r"--no-install-recommends\s+(.*?)\s+&&", text, re.S)
    assert packages is not None
    names = [p for p in packages.group(1).replace("\\", " ").split() if p]
    show = subprocess.run(["apt-cache", "show", "--no-all-versions", *names],
                          capture_output=True, text=True)  # fmt: skip
    assert show.returncode == 0, show.stderr
    assert len(re.findall(r"^Package: ", show.stdout, re.M)) == len(names)


# pyproject's dependencies the compose image leaves out, and why; every other one must be
# its Debian package python3-NAME in the Dockerfile (the image's pip runs --no-deps).
NOT_IN_IMAGE = {
    "isal": "protocol/checksum.py falls back to zlib's crc32 (same values); Debian has none",
    "zstandard": "only tests/corpus/measure.py, which the image does not carry",
    "redis": "the cluster tier (cluster=), which the compose lab does not run",
}


def test_the_image_installs_every_dependency_the_containers_import() -> None:
    """lz4 joined pyproject's dependencies but not the image's packages: the agent's plugin
    failed to start, and the compose lab waited 180 s for a first page (CI, #31)."""
    import tomllib

    root = DEPLOY.parent
    deps = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[\[<>=!~;\s]", d, maxsplit=1)[0].lower() for d in deps}
    text = (DEPLOY / "compose" / "Dockerfile").read_text()
    packages = re.search(r"--no-install-recommends\s+(.*?)\s+&&", text, re.S)
    assert packages is not None
    installed = set(packages.group(1).replace("\\", " ").split())
    assert set(NOT_IN_IMAGE) <= names, "a dependency left out that pyproject no longer lists"
    missing = sorted(n for n in names - set(NOT_IN_IMAGE) if f"python3-{n}" not in installed)
    assert missing == [], f"the compose image lacks {missing}: add python3-NAME to its apt line"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd not installed")
def test_systemd_units_verify(tmp_path: Path) -> None:
    venv_bin = str(Path(sys.executable).parent)
    for unit in (DEPLOY / "systemd").glob("*.service"):
        text = unit.read_text().replace("/opt/netswap/.venv/bin", venv_bin)
        (tmp_path / unit.name).write_text(text)
    units = sorted(str(p) for p in tmp_path.glob("*.service"))
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", *units],
                            capture_output=True, text=True)  # fmt: skip
    problems = [line for line in result.stderr.splitlines() if "netswap" in line]
    assert result.returncode == 0 and not problems, result.stderr
    swap = (DEPLOY / "systemd" / "netswap-swap.service").read_text()
    assert "After=netswap-agent.service network-online.target" in swap
    assert "ExecStop=/opt/netswap/.venv/bin/netswap detach" in swap


def test_process_lab_up_runs_a_verified_workload_and_down_stops_exactly_it(
    tmp_path: Path,
) -> None:
    env = {**os.environ, "NETSWAP_LAB_STATE": str(tmp_path / "lab.json")}
    up = subprocess.run([NETSWAP, "lab", "up", "--duration", "6", "--size", "64M"],
                        capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    state_file = tmp_path / "lab.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else None
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert "every read verified" in up.stdout and "stores up 3/3" in up.stdout
        assert state is not None and len(state["processes"]) == 4
        again = subprocess.run([NETSWAP, "lab", "up"], capture_output=True, text=True, env=env)
        assert again.returncode == 2 and "already up" in again.stderr
    finally:
        down = subprocess.run([NETSWAP, "lab", "down"], capture_output=True, text=True, env=env,
                              timeout=60)  # fmt: skip
    assert down.returncode == 0 and "stopped 4 of 4" in down.stdout
    for proc in state["processes"]:
        assert (
            not Path(f"/proc/{proc['pid']}").exists()
            or "Z" in Path(f"/proc/{proc['pid']}/stat").read_text().split()[2]
        )
    gone = subprocess.run([NETSWAP, "lab", "down"], capture_output=True, text=True, env=env)
    assert gone.returncode == 2 and "no lab is up" in gone.stderr


def test_pyproject_lists_every_package_a_wheel_must_carry() -> None:
    """The editable install finds any folder; a built wheel (the compose image's) carries only
    the listed packages, so a folder missing here imports in the venv and fails in the image."""
    import tomllib

    root = DEPLOY.parent
    config = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = set()
    for name, folder in config["package-dir"].items():
        for init in (root / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(root / folder).parts
            found.add(".".join((name, *rel)))
    assert found - set(config["packages"]) == set()


def test_lab_load_against_an_endpoint_that_does_not_answer_is_one_line() -> None:
    """The compose lab's load container printed a traceback when the agent's ops endpoint
    refused its first read."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # a port nothing listens on: bound, never listened
        port = s.getsockname()[1]
        result = subprocess.run([NETSWAP, "lab", "load", "--server", f"127.0.0.1:{port}",
                                 "--http", f"http://127.0.0.1:{port}/", "--duration", "1"],
                                capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        f"netswap lab: error: cannot read http://127.0.0.1:{port}/api/stats: "
        "[Errno 111] Connection refused"
    ), result.stderr
