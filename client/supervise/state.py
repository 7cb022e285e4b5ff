"""The supervisor's state file: JSON in one page of /run that never leaves memory.

/run is tmpfs, and tmpfs pages swap out like any other: a state file rewritten
each time (a new file, renamed) could be swapped to the very device whose
server just died, and whoever read it then -- the agent's /metrics, attach,
`netswap restart` -- would wait on that device. So the file is one page,
mapped shared by the supervisor and locked with the rest of it (mlockall), and
rewritten in place: JSON padded with spaces. A reader may catch a write half
done (a JSON error): it reads again, or shows none.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os

SIZE = 4096  # one page: the state is a few hundred bytes of JSON


class StatePage:
    def __init__(self, path: str) -> None:
        self.path = path
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.ftruncate(fd, SIZE)
            self._page = mmap.mmap(fd, SIZE, mmap.MAP_SHARED)
        finally:
            os.close(fd)

    def write(self, state: dict[str, object]) -> None:
        data = json.dumps(state).encode()
        if len(data) >= SIZE:
            raise ValueError(f"supervisor state of {len(data)} bytes does not fit a page")
        self._page[:] = data + b" " * (SIZE - len(data))

    def close(self) -> None:
        self._page.close()

    def remove(self) -> None:
        self._page.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def read_state(path: str) -> dict[str, object]:
    """What a file holds now ({} if none or caught mid-write)."""
    try:
        with open(path) as f:
            text = f.read().strip()
        state = json.loads(text) if text else {}
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}
