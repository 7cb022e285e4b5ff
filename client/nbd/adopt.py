"""`netswap adopt`: a new supervisor for a device whose supervisor died.

The supervisor attach leaves behind (client/supervise/) is what brings nbdkit
back when it dies. If the supervisor dies itself (kill -9, a bug), nbdkit
serves on -- it runs detached -- but its next death would fail the device's
IO. `netswap adopt` starts a supervisor with the dead one's options (attach
keeps them: supervise-nbdN.args.json) and --adopt: it watches the nbdkit
already serving, on the port it serves, kills the dead supervisor's spare and
starts its own (adopt returns once it is ready, as attach does), and goes into
attach's state so that detach stops it. Were nbdkit gone too, it starts one
that rebuilds the area and reconnects the device, within the dead-connection
timeout for which the kernel holds the IO.

It refuses while the supervisor lives: running it twice, or from a timer, is
harmless.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict

from ..supervise.state import read_state
from .attach import (
    SERVE_START_S,
    USER_ERRORS,
    AttachError,
    AttachState,
    last_line,
    require_root,
    running_supervisor,
    spawn_supervisor,
    state_path,
    stop_process,
    supervisor_log,
    supervisor_options_path,
    supervisor_state,
    wait_for_spare,
)

__all__ = ["USER_ERRORS", "add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="/dev/nbd0")


def run(args: argparse.Namespace) -> int:
    require_root()
    os.umask(0o077)  # as attach: what the new supervisor makes is root's alone
    device = args.device
    attached = state_path(device)
    try:
        state = AttachState(**json.loads(attached.read_text()))
    except (OSError, ValueError, TypeError):
        raise AttachError(f"{device} was not attached by netswap ({attached})") from None
    saved = read_state(str(supervisor_state(device)))
    if running_supervisor(saved.get("supervisor_pid")):
        raise AttachError(f"supervisor {saved['supervisor_pid']} still watches {device}")
    try:
        options = json.loads(supervisor_options_path(device).read_text())
    except (OSError, ValueError):
        raise AttachError(f"{device} has no supervisor to replace (attached with "
                          "--no-supervisor, or by a netswap before adopt)") from None  # fmt: skip
    proc = spawn_supervisor([*options, "--adopt"], device)
    deadline = time.monotonic() + SERVE_START_S
    while True:
        time.sleep(0.2)
        now = read_state(str(supervisor_state(device)))
        if now.get("supervisor_pid") == proc.pid and now.get("watching"):
            break
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_process(proc.pid)
            log = supervisor_log(device)
            raise AttachError(f"the new supervisor did not take over {device}{last_line(log)} "
                              f"(log {log})")  # fmt: skip
    state.supervisor_pid = proc.pid
    attached.write_text(json.dumps(asdict(state)))  # detach stops this one now
    if "--standby-socket" in options:  # as attach does: protected once the spare is ready
        wait_for_spare(device)
        now = read_state(str(supervisor_state(device)))
    print(f"netswap: supervisor {proc.pid} watches nbdkit {now.get('serve_pid')} serving "
          f"{device} (restarts {now.get('restarts', 0)}, epoch {now.get('epoch')})")  # fmt: skip
    return 0
