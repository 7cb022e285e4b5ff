"""In the host-in-guest guest, after a real attach: nobody reaches the swap device (#30).

As `nobody` with no groups and no capabilities (lab/unprivileged.py, through
setpriv), on the guest's own attach: connecting to the export and to its spare
(both sockets of the supervisor), reaching anything on the TCP ports they used
before (10809, 10810: refused, nothing listens), reading or listing anything under /run/netswap
and /var/log/netswap (state, the serve command, the ops token, the logs that name
the area), reading the device itself, and seeing the area's key in /proc/keys must
all be refused; and
while `netswap restart` replaces nbdkit (its code run here, as the drill runs
it) and the next spare starts on the path the old nbdkit freed, nobody binding
either path first must never get one, and the kernel must take the new
connection (its `reconnected socket`, counted by the caller's drill checks when
it has any). One NETSWAP-CHECK line per claim; False if any failed.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from netswap.client.nbd.attach import (
    LOG_DIR,
    STATE_DIR,
    AttachError,
    run_restart,
    serve_socket,
    supervisor_state,
)

from .unprivileged import as_nobody, run_as_nobody

# How long the restart and the next spare may take under TCG (measured: served again
# after 8.7 s, the next spare ready after 21.8 s; it starts supervisor.SPARE_DELAY_S
# after the takeover), below the lab's stall deadline (240 s without a progress line).
RESTART_S = 180
# Where attach's export and spare listened before #30 (nbdkit's default port and the
# next): nothing may answer there now.
OLD_PORTS = (10809, 10810)


def check(device: str, say: Callable[[str], None]) -> bool:
    """NETSWAP-CHECK attached nobody-*: the claims above, on the attached `device`."""
    sockets = [str(serve_socket(device, n)) for n in (1, 2)]
    files = sorted(str(p) for d in (STATE_DIR, LOG_DIR) for p in d.rglob("*") if p.is_file())
    argv = ["check", *(a for s in sockets for a in ("--connect", s))]
    argv += [a for f in files for a in ("--read", f)]
    argv += ["--read", device, "--list", str(STATE_DIR), "--list", str(LOG_DIR)]
    argv += [a for port in OLD_PORTS for a in ("--tcp", f"127.0.0.1:{port}")]
    try:
        report = run_as_nobody(*argv)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        say(f"NETSWAP-CHECK attached nobody-run FAIL {exc}".replace("\n", " "))
        return False
    who: dict[str, object] = report["who"]  # type: ignore[assignment]
    attempts: list[dict[str, str]] = report["attempts"]  # type: ignore[assignment]
    nobody = who["euid"] == 65534 and int(str(who["cap_eff"]), 16) == 0
    results = [
        ("nobody-who", nobody, f"uid={who['euid']} groups={who['groups']} "
                               f"CapEff={who['cap_eff']}"),
        *_refused("connect", attempts, "connect"),
        *_refused("tcp", attempts, "tcp", errno="ECONNREFUSED"),
        *_refused("read", attempts, "read", "list"),
        ("nobody-keys", report["keys"] == [] and nobody, f"visible={report['keys']}"),
    ]  # fmt: skip
    for name, ok, detail in results:  # said now: the lab counts them as progress
        say(f"NETSWAP-CHECK attached {name} {'ok' if ok else 'FAIL'} {detail}")
    name, squat_ok, detail = squat_through_restart(device, sockets)
    say(f"NETSWAP-CHECK attached {name} {'ok' if squat_ok else 'FAIL'} {detail}")
    return squat_ok and all(ok for _, ok, _ in results)


def _refused(name: str, attempts: list[dict[str, str]], *whats: str,
             errno: str = "EACCES") -> list[tuple[str, bool, str]]:  # fmt: skip
    mine = [a for a in attempts if a["what"] in whats]
    got = sorted({a["got"] for a in mine})
    return [(f"nobody-{name}", bool(mine) and got == [errno],
             f"attempts={len(mine)} got={','.join(got)}")]  # fmt: skip


def squat_through_restart(device: str, sockets: list[str]) -> tuple[str, bool, str]:
    """nobody binding either socket path, over and over, through `netswap restart` and
    the next spare's start: it must get none, and the restart must serve again."""
    before = _state(device)
    squatter = subprocess.Popen(as_nobody("squat", *(a for s in sockets for a in ("--path", s)),
                                          "--seconds", str(RESTART_S)),
                                stdout=subprocess.PIPE, text=True)  # fmt: skip
    began = time.monotonic()
    try:
        run_restart(argparse.Namespace(device=device, timeout=RESTART_S))
        restarted = f"served again after {time.monotonic() - began:.1f}s"
    except AttachError as exc:
        restarted = f"restart failed: {exc}"
    spare = "none"
    if before.get("standby") not in (None, "none"):  # the next spare, on the freed path
        while _state(device).get("standby") != "ready" and time.monotonic() - began < RESTART_S:
            time.sleep(0.5)
        spare = f"{_state(device).get('standby')} after {time.monotonic() - began:.1f}s"
    squatter.send_signal(signal.SIGTERM)
    out, _ = squatter.communicate(timeout=60)
    report = json.loads(out.splitlines()[-1]) if out.strip() else {}
    denied = report.get("denied", {})
    ok = (
        restarted.startswith("served")
        and report.get("bound") == []
        and report.get("served") == 0
        and report.get("tries", 0) > 0
        and set(denied) == {"EACCES"}
        and (spare == "none" or spare.startswith("ready"))
    )
    return ("nobody-squat", ok, f"{restarted}; spare {spare}; tries={report.get('tries')} "
            f"bound={report.get('bound')} denied={denied}")  # fmt: skip


def _state(device: str) -> dict[str, object]:
    try:
        state: dict[str, object] = json.loads(Path(supervisor_state(device)).read_text())
    except (OSError, ValueError):
        return {}
    return state
