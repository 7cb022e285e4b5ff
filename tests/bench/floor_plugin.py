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
  handoff=combine with model=parallel: no loop thread. After the copy a request
                  joins the batch forming; the first thread in leads: it makes one
                  raw 4 KiB round trip to an echo process (ECHO below) per batch
                  for every request that joined meanwhile, then wakes them -- the
                  combining design (#12) with no agent work and the cheapest RPC.
  handoff=rpc     with model=parallel: each request makes its own raw round trip
                  to the echo process on its thread's own connection: the direct
                  path's shape (client/agent/direct.py), no agent work.
"""

import collections
import mmap
import socket
import subprocess
import sys
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
# The round trip's peer: a process of its own (its own GIL) answering each 16-byte
# request with a 4 KiB page, as bench-store's raw floor does.
ECHO = """
import selectors, socket, sys
srv = socket.create_server(("127.0.0.1", 0))
print(srv.getsockname()[1], flush=True)
sel, page = selectors.DefaultSelector(), bytes(4096)
sel.register(srv, selectors.EVENT_READ)
sel.register(sys.stdin, selectors.EVENT_READ)  # EOF: nbdkit is gone, so is this
while True:
    for key, _ in sel.select():
        if key.fileobj is sys.stdin:
            sys.exit(0)
        if key.fileobj is srv:
            conn, _ = srv.accept()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sel.register(conn, selectors.EVENT_READ)
            continue
        if key.fileobj.recv(16, socket.MSG_WAITALL):
            key.fileobj.sendall(page)
        else:
            sel.unregister(key.fileobj)
"""
_echo_port = 0
_conns = {}  # thread id -> its connection (threading.local does not survive callbacks)
_combine_lock = threading.Lock()
_pending = []  # the [wake-up, lead] entries of requests waiting for the next batch
_leading = False


def config(key, value):
    if key not in _settings:
        raise RuntimeError(f"unknown key {key}")
    _settings[key] = value


def config_complete():
    if _settings["handoff"] != "0" and _settings["model"] != "parallel":
        raise RuntimeError("handoff needs model=parallel")


def thread_model():
    if _settings["model"] == "parallel":
        return nbdkit.THREAD_MODEL_PARALLEL
    return nbdkit.THREAD_MODEL_SERIALIZE_ALL_REQUESTS


def after_fork():
    global _loop, _echo_port
    if _settings["handoff"] in ("combine", "rpc"):
        echo = subprocess.Popen([sys.executable, "-c", ECHO], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE)  # fmt: skip
        _echo_port = int(echo.stdout.readline())
        return
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


def _round_trip():
    """One raw 16-byte request and 4 KiB answer on this thread's own connection."""
    conn = _conns.get(threading.get_ident())
    if conn is None:
        conn = socket.create_connection(("127.0.0.1", _echo_port))
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _conns[threading.get_ident()] = conn
    conn.sendall(bytes(16))
    got = 0
    while got < 4096:
        chunk = conn.recv(4096 - got)
        if not chunk:
            raise RuntimeError("the echo process closed its connection")
        got += len(chunk)


def _combine():
    """Join the forming batch. The first thread in leads: one round trip for every
    request that joined meanwhile (its own first among them), then it wakes them and
    hands the lead to the oldest request still waiting, which leads the next batch."""
    global _leading
    entry = [threading.Lock(), False]  # [its wake-up, "you lead now"]
    entry[0].acquire()
    with _combine_lock:
        _pending.append(entry)
        lead = not _leading
        _leading = True
    if not lead:
        entry[0].acquire()
        if not entry[1]:
            return  # a leader completed it
    with _combine_lock:
        batch = _pending[:]
        _pending.clear()
    _round_trip()
    for other in batch:
        if other is not entry:
            other[0].release()
    with _combine_lock:
        if _pending:
            _pending[0][1] = True
            _pending[0][0].release()
        else:
            _leading = False


def _handoff():
    """The agent's hand-off: queue, one loop wake-up per burst, wait on a bare lock."""
    global _drain_scheduled
    mode = _settings["handoff"]
    if mode == "combine":
        _combine()
        return
    if mode == "rpc":
        _round_trip()
        return
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
