"""Floors of nbdkit's Python plugin: what a plugin doing (almost) nothing reaches.

bench-nbd and bench-agent run these beside netswap and nbdkit-memory so the
reports separate the cost of nbdkit's Python glue -- which no Python plugin can
remove -- from the cost of netswap's own code. Keys:

  model=serial    SERIALIZE_ALL_REQUESTS, one memoryview copy per request: the
                  floor of the embedded backends (bench-nbd's py-floor).
  model=parallel  PARALLEL: the thread model any plugin that blocks on the
                  network needs (16 threads per connection share one GIL).
  handoff=1       with model=parallel: after the copy, each request is handed
                  to an event-loop thread started in after_fork, which completes
                  it at once -- the agent's exact shape with no agent work and no
                  network. Nothing built this way can beat it.
"""

import collections
import mmap
import threading

import nbdkit

API_VERSION = 2
SIZE = 256 << 20
_arena = mmap.mmap(-1, SIZE)
_view = memoryview(_arena)
_settings = {"model": "serial", "handoff": "0"}
_loop = None
_inbox = collections.deque()
_drain_scheduled = False


def config(key, value):
    if key not in _settings:
        raise RuntimeError(f"unknown key {key}")
    _settings[key] = value


def config_complete():
    if _settings["handoff"] == "1" and _settings["model"] != "parallel":
        raise RuntimeError("handoff=1 needs model=parallel")


def thread_model():
    if _settings["model"] == "parallel":
        return nbdkit.THREAD_MODEL_PARALLEL
    return nbdkit.THREAD_MODEL_SERIALIZE_ALL_REQUESTS


def after_fork():
    global _loop
    if _settings["handoff"] != "1":
        return
    import asyncio

    try:
        import uvloop

        _loop = uvloop.new_event_loop()
    except ImportError:
        _loop = asyncio.new_event_loop()
    threading.Thread(target=_loop.run_forever, daemon=True).start()


def _drain():
    global _drain_scheduled
    _drain_scheduled = False
    while _inbox:
        _inbox.popleft().release()


def _handoff():
    """The agent's hand-off: queue, one loop wake-up per burst, wait on a bare lock."""
    global _drain_scheduled
    if _loop is None:
        return
    done = threading.Lock()
    done.acquire()
    _inbox.append(done)
    if not _drain_scheduled:
        _drain_scheduled = True
        _loop.call_soon_threadsafe(_drain)
    done.acquire()


def open(readonly):
    return 1


def get_size(h):
    return SIZE


def can_multi_conn(h):
    return True


def pread(h, buf, offset, flags):
    _handoff()
    buf[:] = _view[offset : offset + len(buf)]


def pwrite(h, buf, offset, flags):
    _view[offset : offset + len(buf)] = buf
    _handoff()
