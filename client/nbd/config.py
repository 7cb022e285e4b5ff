"""The plugin's settings, declared once, and the device they build.

Each field of `PluginConfig` is one setting: its name (the nbdkit key, and
`netswap serve --KEY`), type, default and help text live on the field, and
everything else is derived from them -- the plugin's `config` parsing and
`--dump-plugin` help, `serve`'s options (`add_serve_options`), and the
README's settings table (`settings_table`, checked by a test). nbdkit hands
the plugin `key=value` strings one by one; `set` turns them into this one
validated object, rejecting unknown keys and bad values with a message that
names the key, and `build_device` makes the BlockDevice the plugin exports.
The agent is imported only for backend=remote, so the embedded backends never
load it.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import ssl
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from netswap.protocol import MAX_BATCH_PAGES, PAGE_SIZE
from netswap.protocol.messages import area_name_ok
from netswap.server.tls import client_context
from netswap.server.units import format_size, is_loopback, parse_hostport, parse_size, read_secret

from ..device import BlockDevice, PageDevice
from .affinity import Gatherer, parse_cpus_option, pin_process, set_policy

if TYPE_CHECKING:
    from ..agent.keys import AreaKey

# An encrypted area's slots fit a nonce's 4 bytes (agent/seal.py).
MAX_SEALED_SLOTS = 1 << 32

BACKENDS = ("memory", "file", "remote")
CACHE_MODES = ("writethrough", "writeback")
START_MODES = ("fresh", "rebuild", "auto")
# Where an agent marks, once serving, that it has run since boot (tmpfs: gone at reboot,
# as the swap it served is): start=auto rebuilds when the mark is there (systemd's
# Restart= of netswap-agent.service), starts fresh when not (the boot).
RUN_DIR = Path(os.environ.get("NETSWAP_STATE_DIR", "/run/netswap"))
MLOCK_MODES = ("onfault", "off")
ENCRYPT_MODES = ("on", "off")
READ_PATHS = ("direct", "loop")
# Kinds of value: how `set` parses one, and what `serve` shows as its metavar.
KINDS = {"size": "SIZE", "count": "N", "text": "", "address": "HOST:PORT", "choice": ""}


@dataclass(frozen=True)
class Setting:
    key: str
    kind: str
    help: str
    metavar: str
    choices: tuple[str, ...] = ()
    repeat: bool = False
    serve_default: str | None = None  # what `netswap serve` passes when the option is absent
    serve_flag: str = ""  # serve spells this one differently (it has its own flag)


def setting(default: Any, kind: str, help: str, **extra: Any) -> Any:
    """A PluginConfig field that is a setting; `key` defaults to the field name."""
    choices = extra.get("choices", ())
    meta = {"kind": kind, "help": help, **extra}
    meta.setdefault("metavar", "|".join(choices) if choices else KINDS[kind] or "VALUE")
    if isinstance(default, list):
        return field(default_factory=list, metadata=meta)
    return field(default=default, metadata=meta)


class ConfigError(ValueError):
    """A bad key or value; the message names it."""


@dataclass
class PluginConfig:
    backend: str = setting("memory", "choice", "where pages live (memory: embedded)",
                           choices=BACKENDS, serve_default="memory")  # fmt: skip
    size: int = setting(0, "size", "export size, a multiple of 4096 (plugin: required)",
                        serve_default="1G")  # fmt: skip
    capacity: int = setting(0, "size", "pages the embedded store may hold (default: size)")
    path: str = setting("", "text", "directory of the file backend", metavar="DIR")
    area: str = setting("nbd", "text", "area name on the page stores (serve: the host name)",
                        metavar="NAME")  # fmt: skip
    stores: list[str] = setting([], "address", "a page store for backend=remote (repeatable)",
                                key="store", repeat=True)  # fmt: skip
    cluster: str = setting("", "text", "remote: a Redis-protocol cluster as the store tier, "
                           "in place of store=: redis://[USER@]HOST:PORT[,HOST:PORT...] "
                           "(token-file holds the password)", metavar="URL")  # fmt: skip
    cluster_wait: int = setting(1, "count", "cluster: replicas a write waits for (WAIT) "
                                "before it is acknowledged; 0: the master's copy only")  # fmt: skip
    replicas: int = setting(0, "count", "copies of every page (remote; 2 with 2+ stores, else 1)")
    quorum: int = setting(1, "count", "copies a write needs before it is acknowledged (remote)")
    reserve: int = setting(16 << 20, "size", "swap-out reserve (remote)")
    slab: int = setting(64 << 20, "size", "placement unit (remote)")
    token_file: str = setting("", "text", "token for the page stores", metavar="FILE")
    batch_pages: int = setting(64, "count", f"largest batch per RPC, 1..{MAX_BATCH_PAGES} "
                               "(remote; 1 = no batching)")  # fmt: skip
    batch_linger_us: int = setting(200, "count", "longest a batch waits to fill (remote)")
    cache: str = setting("writethrough", "choice", "remote: acknowledge writes when on the "
                         "stores, or once in the reserve (flush/FUA still wait)",
                         choices=CACHE_MODES)  # fmt: skip
    reads: str = setting("direct", "choice", "remote: a swap-in goes from nbdkit's thread "
                         "straight to a store, or through the agent's loop",
                         choices=READ_PATHS)  # fmt: skip
    writes: str = setting("direct", "choice", "remote, write-through: a lone swap-out goes "
                          "from nbdkit's thread straight to its replicas, or through the "
                          "agent's loop", choices=READ_PATHS)  # fmt: skip
    store_tls_ca: str = setting("", "text", "speak TLS to the stores, verified against this CA "
                                "(remote)", metavar="FILE")  # fmt: skip
    tls_cert: str = setting("", "text", "client certificate for stores that require one "
                            "(remote, with store-tls-ca)", metavar="FILE")  # fmt: skip
    tls_key: str = setting("", "text", "that certificate's private key", metavar="FILE")
    http: str = setting("", "address", "ops endpoint: /metrics, /api/stats, / (default off)")
    http_token_file: str = setting("", "text", "bearer token the ops endpoint requires "
                                   "(needed off loopback)", metavar="FILE")  # fmt: skip
    start: str = setting("fresh", "choice", "remote: a new area (what the stores held for it "
                         "is released), rebuild the area from the stores (a restart under "
                         "a swapping kernel: netswap attach's supervisor), or auto: rebuild "
                         "when an agent has served this area since boot (systemd's Restart=)",
                         choices=START_MODES)  # fmt: skip
    epoch: int = setting(0, "count", "remote: the lowest epoch this agent's generations may "
                         "carry (the supervisor's, raised at every restart)")  # fmt: skip
    compress: str = setting("lz4", "choice", "remote: a page goes to the stores as its payload: "
                            "same-filled as its 8-byte word (read back without a store), "
                            "lz4-compressed in 256-B granules when it fits 3 KiB, else whole; "
                            "off: every page whole (the stores learn no page's size)",
                            choices=("lz4", "off"))  # fmt: skip
    force: str = setting("off", "choice", "remote, start=fresh: take the area on the stores "
                         "even when another host holds it (that host loses its swap)",
                         choices=("off", "on"), serve_flag="--force")  # fmt: skip
    encrypt: str = setting("on", "choice", "remote: seal every page with AES-256-GCM under "
                           "a key kept in the kernel's keyring, before it leaves this host; "
                           "off stores pages in plaintext", choices=ENCRYPT_MODES,
                           serve_flag="--no-encrypt")  # fmt: skip
    standby: int = setting(0, "count", "remote: a standby for the supervisor, on this "
                           "inherited socket: build and lock the device, say ready, and "
                           "only on 'go EPOCH' rebuild the area and serve")  # fmt: skip
    cpus: str = setting("auto", "text", "CPUs for nbdkit and the agent: auto (remote: every "
                        "thread gathered on the idlest CPU), all (the kernel's choice), or a "
                        "list such as 3 or 0,2 (pinned)", metavar="auto|all|LIST")  # fmt: skip
    mlock: str = setting("onfault", "choice", "lock the server's memory once touched "
                         "(mlockall MCL_ONFAULT), or not", choices=MLOCK_MODES,
                         serve_flag="--no-mlock")  # fmt: skip

    def set(self, key: str, value: str) -> None:
        try:
            self._set(key.replace("_", "-"), value)
        except ConfigError:
            raise
        except ValueError as exc:
            raise ConfigError(f"{key}={value}: {exc}") from None

    def _set(self, key: str, value: str) -> None:
        found = next(((f.name, s) for f, s in _FIELDS if s.key == key), None)
        if found is None:
            raise ConfigError(f"unknown parameter {key!r}; known: " + ", ".join(known_keys()))
        name, s = found
        if s.kind == "size":
            parsed: Any = _page_multiple(key, value)
        elif s.kind == "count":
            parsed = _natural(key, value)
        elif s.choices and value not in s.choices:
            raise ConfigError(f"{key}={value}: choose one of {', '.join(s.choices)}")
        else:
            if s.kind == "address":
                parse_hostport(value, 0)
            parsed = value
        if s.repeat:
            getattr(self, name).append(parsed)
        else:
            setattr(self, name, parsed)

    # Read from http_token_file by read_files (not a setting).
    http_token: str = field(default="", repr=False)

    def complete(self) -> None:
        if not self.size:
            raise ConfigError("size=SIZE is required (e.g. size=4G)")
        if self.backend == "file" and not self.path:
            raise ConfigError("backend=file needs path=DIR")
        if self.cluster:
            self._check_cluster()
        elif self.backend == "remote" and not self.stores:
            raise ConfigError("backend=remote needs at least one store=HOST:PORT "
                              "(or cluster=redis://HOST:PORT)")  # fmt: skip
        if self.backend == "remote":
            if not area_name_ok(self.area or ""):
                why = "a letter or digit, then letters, digits, '.', '_' or '-' (64 B at most)"
                raise ConfigError(f"area={self.area!r}: an area name is {why}")
            if self.replicas > len(self.stores):
                raise ConfigError(f"replicas={self.replicas} needs {self.replicas} store= entries")
            if not 1 <= self.quorum <= self.effective_replicas:
                raise ConfigError(f"quorum={self.quorum} must be 1..{self.effective_replicas}")
        if not 1 <= self.batch_pages <= MAX_BATCH_PAGES:
            raise ConfigError(f"batch-pages={self.batch_pages}: must be 1..{MAX_BATCH_PAGES}")
        if self.sealed and self.size // PAGE_SIZE > MAX_SEALED_SLOTS:
            raise ConfigError(f"size={format_size(self.size)}: an encrypted area holds at "
                              "most 16T (a nonce has 4 bytes for the slot)")  # fmt: skip
        if self.standby and self.backend != "remote":
            raise ConfigError("standby= is only for backend=remote")
        if self.backend != "remote" and self.stores:
            raise ConfigError(f"store= is only for backend=remote, not {self.backend}")
        if self.backend != "remote" and self.cache != "writethrough":
            raise ConfigError(f"cache={self.cache} is only for backend=remote")
        self._check_tls()
        parse_cpus_option(self.cpus)  # a bad list is a one-line error now
        if self.http_token_file:  # read now: nbdkit changes directory after forking
            self.http_token_file = str(Path(self.http_token_file).resolve())
            try:
                read_secret(self.http_token_file)
            except OSError as exc:
                raise ConfigError(f"http-token-file: {exc.strerror}: {exc.filename}") from None
        open_http = self.http and not is_loopback(parse_hostport(self.http, 0)[0])
        if open_http and not self.http_token_file:
            raise ConfigError(f"http={self.http} needs http-token-file=FILE (only loopback "
                              "may be open)")  # fmt: skip
        # capacity < size is allowed: a thin export whose writes fail with ENOSPC when full.

    def _check_tls(self) -> None:
        if (self.tls_cert or self.tls_key) and not self.store_tls_ca:
            raise ConfigError("tls-cert/tls-key need store-tls-ca (TLS to the stores)")
        if self.store_tls_ca and self.backend != "remote":
            raise ConfigError(f"store-tls-ca is only for backend=remote, not {self.backend}")
        for name in ("store_tls_ca", "tls_cert", "tls_key"):  # nbdkit changes directory
            if getattr(self, name):
                setattr(self, name, str(Path(getattr(self, name)).resolve()))
        if self.store_tls_ca:
            self.tls_context()  # a bad file is a one-line error now, not at connect

    def tls_context(self) -> ssl.SSLContext | None:
        if not self.store_tls_ca:
            return None
        try:
            return client_context(self.store_tls_ca, self.tls_cert, self.tls_key)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    @property
    def effective_replicas(self) -> int:
        """replicas=, or 2 when there are two or more stores, else 1 (and 1 on a cluster:
        it replicates itself)."""
        if self.cluster:
            return 1
        return self.replicas or (2 if len(self.stores) >= 2 else 1)

    def _check_cluster(self) -> None:
        from ..cluster.layout import check_area_name, parse_url

        if self.backend != "remote":
            raise ConfigError(f"cluster= is only for backend=remote, not {self.backend}")
        if self.stores:
            raise ConfigError("cluster= is the store tier: give it or store=, not both")
        if self.replicas > 1 or self.store_tls_ca:
            raise ConfigError("cluster=: the cluster replicates (replicas=), and TLS to it is "
                              "not supported yet (store-tls-ca=)")  # fmt: skip
        try:
            parse_url(self.cluster)
            check_area_name(self.area or "")
        except ValueError as exc:
            raise ConfigError(f"cluster={self.cluster}: {exc}") from None

    @property
    def parallel(self) -> bool:
        """The remote device waits on the network; the embedded ones never block."""
        return self.backend == "remote"

    def place_threads(self, device: BlockDevice) -> str:
        """Apply cpus= to every thread of nbdkit (after_fork, once the device runs)."""
        cpus = parse_cpus_option(self.cpus)
        if cpus == "all" or (cpus == "auto" and not device.parallel):
            return "CPU placement: the kernel's choice"
        if cpus == "auto":
            return Gatherer().start()
        assert isinstance(cpus, frozenset)
        return pin_process(cpus)

    def read_files(self) -> None:
        """What the plugin reads from files, read at load: a spare taking over must not
        read anything then, from a tmpfs page (/run) that swap may hold on the device it
        replaces the server of (seen: a spare stuck reading /run/netswap/ops-token)."""
        if self.http_token_file:
            try:
                self.http_token = read_secret(self.http_token_file)
            except (OSError, ValueError) as exc:
                raise ConfigError(f"http-token-file={self.http_token_file}: {exc}") from None

    def start_ops(self, device: BlockDevice) -> None:
        """Serve /metrics, /api/stats and the dashboard for this export, if asked."""
        if self.http:
            device.start_ops(*parse_hostport(self.http, 0), self.http_token)

    def started_mark(self) -> Path:
        return RUN_DIR / f"agent-{self.area}.started"

    def rebuilds(self) -> bool:
        """A standby always takes over an area that exists: its key, its pages."""
        if self.standby or self.start == "rebuild":
            return True
        return self.start == "auto" and self.started_mark().exists()

    def mark_started(self) -> None:
        """start=auto's mark, once serving; where /run is not ours, auto stays fresh."""
        if self.backend == "remote" and self.start == "auto":
            with contextlib.suppress(OSError):
                RUN_DIR.mkdir(parents=True, exist_ok=True)
                self.started_mark().touch()

    @property
    def sealed(self) -> bool:
        return self.backend == "remote" and self.encrypt == "on"

    def real_time(self) -> str:
        """A spare loads as an ordinary task (the supervisor's choice); ready, it runs
        real-time like the nbdkit it will replace."""
        try:
            return set_policy("fifo")
        except PermissionError:
            return "SCHED_FIFO: NOT applied (needs CAP_SYS_NICE)"

    def sealing_note(self) -> str:
        if self.sealed:
            return (f"pages sealed with AES-256-GCM before they leave this host (the key: "
                    f"netswap:{self.area} in root's kernel keyring)")  # fmt: skip
        return (
            "encrypt=off: pages go to the stores in PLAINTEXT; whoever reads a store "
            "(its operator, its disk, its process) reads this host's swapped memory"
        )

    def area_key(self) -> AreaKey | None:
        """A fresh area's new key, or the one a restarted agent's area was sealed with."""
        if not self.sealed:
            return None
        from ..agent.keys import AreaKey, KeyringError

        try:
            return AreaKey.existing(self.area) if self.rebuilds() else AreaKey.fresh(self.area)
        except KeyringError as exc:
            if exc.errno == errno.ENOKEY:
                raise ConfigError(f"the key of area {self.area} is not in the kernel keyring "
                                  "(a reboot or detach dropped it): its pages cannot be read; "
                                  "start=fresh begins the area again") from None  # fmt: skip
            raise ConfigError(f"encryption needs the kernel keyring: {exc}") from None

    def build_device(self) -> BlockDevice:
        if self.backend == "remote":
            from ..hostid import holder_id

            try:
                from ..agent.remote import RemoteDevice
            except ImportError as exc:  # an install without pyproject's dependencies
                raise ConfigError(f"backend=remote needs the Python package {exc.name}, "
                                  "which this install lacks (pip install netswap, or "
                                  "Debian's python3-cryptography)") from None  # fmt: skip

            return RemoteDevice.open(
                stores=self.stores, cluster=self.cluster, cluster_wait=self.cluster_wait,
                area=self.area, size=self.size,
                replicas=self.effective_replicas, quorum=self.quorum, reserve=self.reserve,
                slab=self.slab, token_file=self.token_file, batch_pages=self.batch_pages,
                batch_linger_us=self.batch_linger_us, write_back=self.cache == "writeback",
                tls=self.tls_context(), direct_reads=self.reads == "direct",
                direct_writes=self.writes == "direct", rebuild=self.rebuilds(),
                epoch=self.epoch, key=self.area_key(), holder=holder_id(self.area),
                force=self.force == "on",
                compress=self.compress == "lz4",
            )  # fmt: skip
        from netswap.server.backends import open_backend

        pages = (self.capacity or self.size) // PAGE_SIZE
        # Checksums guard pages that leave this process (a file, a network); pages in
        # the embedded memory arena never do, and a CRC per page is ~1 us per 4 KiB.
        verify = self.backend != "memory"
        backend = open_backend(self.backend, pages, self.path or None, verify=verify)
        return PageDevice(backend, self.size, self.area)


def _settings() -> list[tuple[Any, Setting]]:
    out = []
    for f in fields(PluginConfig):
        if not f.metadata:  # state, not a setting
            continue
        meta = dict(f.metadata)
        key = meta.pop("key", f.name.replace("_", "-"))
        out.append((f, Setting(key=key, **meta)))
    return out


# Built once: each PluginConfig field with its setting (what set, serve and the docs use).
_FIELDS = _settings()
SETTINGS = [s for _, s in _FIELDS]


def known_keys() -> list[str]:
    return [s.key for s in SETTINGS]


def _default_text(f: Any, s: Setting) -> str:
    """A field's default as a user writes it ('16M'); '' when it has none worth showing."""
    if f.default is MISSING or f.default in (0, ""):
        return ""
    return format_size(f.default) if s.kind == "size" else str(f.default)


def _describe(text: str, default: str | None) -> str:
    return f"{text} (default {default})" if default and "default" not in text else text


def help_text() -> str:
    """`--dump-plugin`'s netswap_config_help: one line per key."""
    return "\n".join(
        f"{s.key}={s.metavar}".ljust(30) + _describe(s.help, _default_text(f, s))
        for f, s in _FIELDS
    )


def settings_table() -> str:
    """The README's table of settings (a test checks the README holds exactly this)."""
    rows = ["| plugin key | `netswap serve` | default | what it sets |", "|---|---|---|---|"]
    for f, s in _FIELDS:
        default = _default_text(f, s) or "—"
        if s.serve_default and s.serve_default != default:
            default += f" (serve: {s.serve_default})"
        metavar = s.metavar.replace("|", "\\|")  # a pipe inside a table cell
        serve = s.serve_flag or f"--{s.key} {metavar}"
        rows.append(f"| `{s.key}=` | `{serve}` | {default} | {s.help} |")
    return "\n".join(rows)


def add_serve_options(parser: argparse.ArgumentParser) -> None:
    """One `netswap serve --KEY` per setting; the plugin validates the values."""
    for f, s in _FIELDS:
        flag, dest = f"--{s.key}", f.name
        text = _describe(s.help, s.serve_default or _default_text(f, s))
        if s.serve_flag:  # a switch that sets the last choice (--no-mlock: mlock=off)
            off = s.choices[-1]
            parser.add_argument(s.serve_flag, dest=dest, action="store_const", const=off,
                                help=f"{s.key}={off}: {s.help}")  # fmt: skip
        elif s.repeat:
            parser.add_argument(flag, dest=dest, action="append", default=[], metavar=s.metavar,
                                help=text)  # fmt: skip
        elif s.choices:
            parser.add_argument(flag, dest=dest, choices=s.choices, default=s.serve_default,
                                help=text)  # fmt: skip
        else:
            parser.add_argument(flag, dest=dest, default=s.serve_default, metavar=s.metavar,
                                help=text)  # fmt: skip


def plugin_params(args: argparse.Namespace) -> list[str]:
    """`key=value` for each setting given to `serve` (repeated keys repeat)."""
    params = []
    for f, s in _FIELDS:
        value = getattr(args, f.name)
        for item in value if s.repeat else [value]:
            if item is not None:
                params.append(f"{s.key}={item}")
    return params


def _page_multiple(key: str, value: str) -> int:
    size = parse_size(value)
    if size <= 0 or size % PAGE_SIZE:
        raise ConfigError(f"{key}={value}: must be a positive multiple of {PAGE_SIZE}")
    return size


def _natural(key: str, value: str) -> int:
    if not value.isdigit():
        raise ConfigError(f"{key}={value}: expected a whole number")
    return int(value)
