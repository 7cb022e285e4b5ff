"""Typed configuration of the nbdkit plugin, parsed from nbdkit's key=value pairs.

nbdkit hands the plugin `key=value` strings one by one; this turns them into
one validated object, rejecting unknown keys and bad values with a message
that names the key, and builds the BlockDevice the plugin exports. The remote
backend's device lives in netswap.client.agent and is imported only when asked
for, so the embedded backends never load the agent.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from netswap.protocol import MAX_BATCH_PAGES, PAGE_SIZE

from .device import BlockDevice, PageDevice
from .units import parse_size

BACKENDS = ("memory", "file", "remote")
CACHE_MODES = ("writethrough", "writeback")
HELP = """\
backend=memory|file|remote  where pages live (default memory: embedded)
size=SIZE                   export size, a multiple of 4096 (required)
capacity=SIZE               pages the embedded store may hold (default: size)
path=DIR                    directory of the file backend
area=NAME                   area name on the page store(s) (default nbd)
store=HOST:PORT             a page store for backend=remote (repeatable)
replicas=N                  copies of every page for backend=remote
quorum=N                    copies a write needs before it is acknowledged (default 1)
reserve=SIZE                swap-out reserve for backend=remote (default 16M)
slab=SIZE                   placement unit for backend=remote (default 64M)
token-file=FILE             token for the page stores
http=HOST:PORT              ops endpoint: /metrics, /api/stats, / dashboard (default off)
batch-linger-us=N           longest a batch waits to fill (default 200)
batch-pages=N               largest batch per RPC, 1..256 (default 64; 1 = no batching)
cache=writethrough|writeback  remote: acknowledge writes when on the stores (default), or
                            once copied into the reserve (flush/FUA still wait)"""


class ConfigError(ValueError):
    """A bad key or value; the message names it."""


@dataclass
class PluginConfig:
    backend: str = "memory"
    size: int = 0
    capacity: int = 0
    path: str = ""
    area: str = "nbd"
    stores: list[str] = field(default_factory=list)
    replicas: int = 0
    quorum: int = 1
    reserve: int = 16 << 20
    slab: int = 64 << 20
    token_file: str = ""
    batch_linger_us: int = 200
    batch_pages: int = 64
    http: str = ""
    cache: str = "writethrough"

    def set(self, key: str, value: str) -> None:
        try:
            self._set(key.replace("_", "-"), value)
        except ConfigError:
            raise
        except ValueError as exc:
            raise ConfigError(f"{key}={value}: {exc}") from None

    def _set(self, key: str, value: str) -> None:
        if key == "backend":
            if value not in BACKENDS:
                raise ConfigError(f"backend={value}: choose one of {', '.join(BACKENDS)}")
            self.backend = value
        elif key in ("size", "capacity", "reserve", "slab"):
            setattr(self, key, _page_multiple(key, value))
        elif key in ("path", "area", "token-file", "http"):
            setattr(self, key.replace("-", "_"), value)
        elif key == "store":
            self.stores.append(value)
        elif key == "cache":
            if value not in CACHE_MODES:
                raise ConfigError(f"cache={value}: choose one of {', '.join(CACHE_MODES)}")
            self.cache = value
        elif key in ("replicas", "quorum", "batch-linger-us", "batch-pages"):
            setattr(self, key.replace("-", "_"), _natural(key, value))
        else:
            raise ConfigError(f"unknown parameter {key!r}; known: " + _known())

    def complete(self) -> None:
        if not self.size:
            raise ConfigError("size=SIZE is required (e.g. size=4G)")
        if self.backend == "file" and not self.path:
            raise ConfigError("backend=file needs path=DIR")
        if self.backend == "remote" and not self.stores:
            raise ConfigError("backend=remote needs at least one store=HOST:PORT")
        if self.backend == "remote":
            if self.replicas > len(self.stores):
                raise ConfigError(f"replicas={self.replicas} needs {self.replicas} store= entries")
            if not 1 <= self.quorum <= self.effective_replicas:
                raise ConfigError(f"quorum={self.quorum} must be 1..{self.effective_replicas}")
        if not 1 <= self.batch_pages <= MAX_BATCH_PAGES:
            raise ConfigError(f"batch-pages={self.batch_pages}: must be 1..{MAX_BATCH_PAGES}")
        if self.backend != "remote" and self.stores:
            raise ConfigError(f"store= is only for backend=remote, not {self.backend}")
        if self.backend != "remote" and self.cache != "writethrough":
            raise ConfigError(f"cache={self.cache} is only for backend=remote")
        if self.http:
            from netswap.client.rpc import parse_hostport

            parse_hostport(self.http, 0)
        # capacity < size is allowed: a thin export whose writes fail with ENOSPC when full.

    @property
    def effective_replicas(self) -> int:
        """replicas=, or 2 when there are two or more stores, else 1."""
        return self.replicas or (2 if len(self.stores) >= 2 else 1)

    @property
    def parallel(self) -> bool:
        """The remote device waits on the network; the embedded ones never block."""
        return self.backend == "remote"

    def start_ops(self, device: BlockDevice) -> None:
        """Serve /metrics, /api/stats and the dashboard for this export, if asked."""
        if not self.http:
            return
        from netswap.client.rpc import parse_hostport

        host, port = parse_hostport(self.http, 0)
        device.start_ops(host, port)

    def build_device(self) -> BlockDevice:
        if self.backend == "remote":
            from netswap.client.remote import RemoteDevice

            return RemoteDevice.from_config(self)
        from .backends import open_backend

        pages = (self.capacity or self.size) // PAGE_SIZE
        # Checksums guard pages that leave this process (a file, a network); pages in
        # the embedded memory arena never do, and a CRC per page is ~1 us per 4 KiB.
        verify = self.backend != "memory"
        backend = open_backend(self.backend, pages, self.path or None, verify=verify)
        return PageDevice(backend, self.size, self.area)


def _page_multiple(key: str, value: str) -> int:
    size = parse_size(value)
    if size <= 0 or size % PAGE_SIZE:
        raise ConfigError(f"{key}={value}: must be a positive multiple of {PAGE_SIZE}")
    return size


def _natural(key: str, value: str) -> int:
    if not value.isdigit():
        raise ConfigError(f"{key}={value}: expected a whole number")
    return int(value)


def _known() -> str:
    return ", ".join(line.split("=")[0] for line in HELP.splitlines())
