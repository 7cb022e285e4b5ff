"""The floor of nbdkit's Python plugin: one memoryview copy per request, nothing else.

bench-nbd runs it beside netswap and nbdkit-memory so the report separates the
cost of nbdkit's Python glue (GIL, argument boxing, thread hand-offs) -- which
no plugin can remove -- from the cost of netswap's own code.
"""

import mmap

import nbdkit

API_VERSION = 2
SIZE = 256 << 20
_arena = mmap.mmap(-1, SIZE)
_view = memoryview(_arena)


def thread_model():
    return nbdkit.THREAD_MODEL_SERIALIZE_ALL_REQUESTS


def open(readonly):
    return 1


def get_size(h):
    return SIZE


def can_multi_conn(h):
    return True


def pread(h, buf, offset, flags):
    buf[:] = _view[offset : offset + len(buf)]


def pwrite(h, buf, offset, flags):
    _view[offset : offset + len(buf)] = buf
