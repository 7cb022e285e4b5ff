"""netswap's nbdkit plugin: `nbdkit python .../nbdkit_plugin.py size=4G [backend=...]`.

A flat file of nbdkit callbacks, each handing off at once to the typed device
built from PluginConfig. nbdkit's `buf` is only valid during a callback: the
device copies out of it (pwrite) or into it (pread) before returning and never
keeps a reference. Every failure is raised after nbdkit.set_error(errno), so
the client sees ENOSPC, EIO, EINVAL ... rather than a blanket EIO.

Thread model, measured with fio (ioengine=nbd, 4K randread QD32, this 2-core
machine, a plugin that only copies the buffer): SERIALIZE_ALL_REQUESTS 44-46 k
IOPS at nbdkit's default 16 threads (43-44 k at -t 2); PARALLEL 19-20 k at 16
threads, 28-32 k at -t 2 -- every extra thread in Python is a GIL hand-off.
So the embedded backends, which never block, serialize all requests (and need
no locks); the remote backend waits on the network and runs PARALLEL.

nbdkit runs this file with Debian's /usr/bin/python3, whose sys.path knows
nothing of netswap's venv, and the script's folder is not on sys.path either:
`netswap serve` passes the venv's site-packages in NETSWAP_SITE.
"""

import os
import site
import sys

# The venv's packages first, as in the venv's own python (built --system-site-packages):
# the plugin then imports the versions the CLI and the tests do (cryptography >= 46,
# where Debian's dist-packages has 38).
_before = list(sys.path)
for _site in filter(None, os.environ.get("NETSWAP_SITE", "").split(os.pathsep)):
    site.addsitedir(_site)
sys.path[:] = [p for p in sys.path if p not in _before] + _before

import errno  # noqa: E402
import functools  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any, TypeVar  # noqa: E402

import nbdkit  # noqa: E402
from netswap.client.device import BlockDevice  # noqa: E402
from netswap.client.hardening import fault_in_swapped, lock_memory, trim_locked_text  # noqa: E402
from netswap.client.nbd import takeover  # noqa: E402
from netswap.client.nbd.config import ConfigError, PluginConfig, help_text  # noqa: E402
from netswap.client.nbd.standby import CUSHION, StandbyError, wait_for_go  # noqa: E402
from netswap.protocol import StoreError  # noqa: E402
from netswap.server.heap import grow_cushion, one_arena, tune_heap  # noqa: E402

# A supervisor's spare loads while the host may be swapping hard: what it touches from
# here on is locked at once, or a page of it swapped out before after_fork could need
# the very device whose server it is to replace (seen: a spare stuck in swap_readpage
# when the one serving died). serve's --print-command asks for it; after_fork locks
# again (locks do not cross a fork into the background).
if os.environ.get("NETSWAP_LOCK_AT_LOAD") == "1":
    print(f"netswap plugin: at load: {lock_memory()}", file=sys.stderr, flush=True)

# Logging through a ring that nothing waits for (takeover.py says why).
takeover.install()

API_VERSION = 2
T = TypeVar("T")

_config = PluginConfig()
_device: BlockDevice | None = None

# nbdkit logs a callback's exception through traceback.format_exception. Refusals
# we raise on purpose (a full store, a misaligned request, a bad key=value) are
# one log line, not a traceback per failed request; anything else keeps its
# traceback, because that is a bug.
_format_exception = traceback.format_exception


def _format_expected(exc: Any, value: Any = None, tb: Any = None, **kwargs: Any) -> list[str]:
    if isinstance(value, StoreError | ConfigError | StandbyError):
        return [f"{value}\n"]
    return _format_exception(exc, value, tb, **kwargs)


traceback.format_exception = _format_expected  # type: ignore[assignment]


def _fail(exc: BaseException) -> None:
    code = getattr(exc, "errno", None)
    if not isinstance(code, int) or code <= 0:
        code = errno.EINVAL if isinstance(exc, ValueError) else errno.EIO
    nbdkit.set_error(code)


def _dev() -> BlockDevice:
    assert _device is not None, "after_fork has not run"
    return _device


def dump_plugin() -> None:
    print("netswap_config_help=" + help_text().replace("\n", "\\n"))


def thread_model() -> int:
    if _config.parallel:
        return int(nbdkit.THREAD_MODEL_PARALLEL)
    return int(nbdkit.THREAD_MODEL_SERIALIZE_ALL_REQUESTS)


def config(key: str, value: str) -> None:
    _config.set(key, value)


def config_complete() -> None:
    _config.complete()
    _config.read_files()


def after_fork() -> None:
    # Build the device here, not at load: threads and sockets must not cross
    # nbdkit's fork into the background.
    global _device
    one_arena()  # before any thread of ours mallocs: one arena for all (heap.py)
    takeover.start()  # from here the plugin's lines go through the ring
    frames = os.environ.get("NETSWAP_TRACEMALLOC", "")
    if frames.isdigit():  # the soak's leak hunt: /debug/allocations on the ops endpoint
        import tracemalloc

        tracemalloc.start(int(frames))
    tune_heap()  # before the first batch buffer: reused from the heap, never unmapped
    locked = lock_memory() if _config.mlock == "onfault" else None
    if locked is not None:
        takeover.say(str(locked))
    _device = _config.build_device()
    if locked is not None and locked.ok and "cryptography" in sys.modules:
        takeover.say(trim_seal_text())
    if _config.backend == "remote":
        takeover.say(_config.sealing_note())
    if _config.standby:  # the supervisor's spare: built and locked, serving only when told
        takeover.say(takeover.preload())  # before the cushion: its modules are not the go's
        cushion = grow_cushion(CUSHION)
        back = fault_in_swapped()  # what swap took while it loaded, back and locked
        takeover.say(_config.real_time())
        grown = "grown" if cushion else "NOT grown"
        takeover.say(f"standby, ready (a {CUSHION >> 20} MiB heap cushion: {grown}; "
                     f"{back} pages back from swap)")  # fmt: skip
        takeover.begin_audit()  # the go path: from ready to serving (NETSWAP_TAKEOVER_AUDIT)
        _device.take_over(wait_for_go(_config.standby))
    began = time.monotonic()
    _device.start()  # a restarted agent rebuilds here: the supervisor's outage includes it
    takeover.say(f"serving after {time.monotonic() - began:.2f}s")
    _config.mark_started()
    takeover.say(_config.place_threads(_device))
    _config.start_ops(_device)
    takeover.end_audit()


def trim_seal_text() -> str:
    """cryptography's code locked only where a page's seal runs (hardening.py says why)."""
    from netswap.client.agent import seal

    before, after = trim_locked_text(seal.LIBRARY, seal.warm_up)
    return (
        f"cryptography's code: {after} KiB locked, the seal's paths "
        f"({before} KiB before: what its import touched)"
    )


def cleanup() -> None:
    if _device is not None:
        _device.close()
    takeover.LOGS.flush()  # the last lines, for at most logs.FLUSH_S


def open(readonly: bool) -> Any:
    return {"readonly": readonly}


def get_size(h: Any) -> int:
    return _dev().size


def block_size(h: Any) -> tuple[int, int, int]:
    # min = preferred = one page; max = nbdkit's own 32 MiB request cap.
    return (4096, 4096, 32 * 1024 * 1024)


def is_rotational(h: Any) -> bool:
    return False


def can_write(h: Any) -> bool:
    return True


def can_flush(h: Any) -> bool:
    return True


def can_trim(h: Any) -> bool:
    return True


def can_zero(h: Any) -> bool:
    return True


def can_fast_zero(h: Any) -> bool:
    return bool(getattr(_dev(), "fast_zero", True))


def can_fua(h: Any) -> int:
    return int(nbdkit.FUA_NATIVE)


def can_multi_conn(h: Any) -> bool:
    return _dev().multi_conn


def can_extents(h: Any) -> bool:
    return True


def can_cache(h: Any) -> int:
    return int(nbdkit.CACHE_NONE)


def _reporting_errno(callback: Callable[..., T]) -> Callable[..., T]:
    """Wrap a data callback: any failure is raised after nbdkit.set_error(errno)."""

    @functools.wraps(callback)
    def wrapper(*args: Any) -> T:
        try:
            return callback(*args)
        except Exception as exc:
            _fail(exc)
            raise

    return wrapper


@_reporting_errno
def pread(h: Any, buf: memoryview, offset: int, flags: int) -> None:
    _dev().pread(buf, offset)


@_reporting_errno
def pwrite(h: Any, buf: memoryview, offset: int, flags: int) -> None:
    _dev().pwrite(buf, offset, bool(flags & nbdkit.FLAG_FUA))


@_reporting_errno
def flush(h: Any, flags: int) -> None:
    _dev().flush()


@_reporting_errno
def trim(h: Any, count: int, offset: int, flags: int) -> None:
    _dev().trim(count, offset, bool(flags & nbdkit.FLAG_FUA))


@_reporting_errno
def zero(h: Any, count: int, offset: int, flags: int) -> None:
    _dev().zero(count, offset, bool(flags & nbdkit.FLAG_FUA))


@_reporting_errno
def extents(h: Any, count: int, offset: int, flags: int) -> list[tuple[int, int, int]]:
    return _dev().extents(count, offset, bool(flags & nbdkit.FLAG_REQ_ONE))
