"""The cluster tier (#25) against a real Redis cluster (3 masters, 3 replicas) started
here on 127.0.0.1 (netswap.lab.cluster), through the real plugin and libnbd; and the
lineage rules (client/cluster/lineage.py) as a unit."""

from __future__ import annotations

import asyncio
import errno
import os
import random
import re
import subprocess
import sys
import threading
import time
from array import array
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import nbd
import pytest
from netswap.client.agent.keys import drop_key
from netswap.client.cluster.client import ClusterClient
from netswap.client.cluster.layout import BUCKET_CHUNKS, CHUNK_PAGES, chunk_keys, parse_url
from netswap.client.cluster.lineage import NO_REPLID, Entry, Master, State, judge
from netswap.client.cluster.router import Cmd, refusal
from netswap.lab.cluster import DEFAULT_NODE_TIMEOUT_MS, Cluster, RedisNode, cluster
from netswap.protocol import StoreError, area_seed, tags_of_sized
from redis import exceptions as rx

from .conftest import free_port, wait_for_port
from .nbdserver import NETSWAP, connect, errno_of

PAGE = 4096
AREA = f"clu{os.getpid()}"
BUCKET = BUCKET_CHUNKS * CHUNK_PAGES  # slots a bucket (one hash tag) holds
pytestmark = pytest.mark.xdist_group("cluster")  # one cluster's worth of servers at a time


@pytest.fixture(autouse=True)
def _drop_the_key() -> Iterator[None]:
    yield
    drop_key(AREA)  # the key, the agent's record and the cluster's lineage record


@contextmanager
def agent(url: str, *extra: str, size: str = "64M", area: str = AREA,
          token: str = "") -> Iterator[tuple[str, Path]]:  # fmt: skip
    port = free_port()
    log = Path("/tmp") / f"netswap-cluster-{port}.log"
    cmd = [NETSWAP, "serve", "--listen", f"127.0.0.1:{port}", "--size", size, "--backend",
           "remote", "--cluster", url, "--area", area, "--no-mlock", *extra]  # fmt: skip
    if token:
        secret = Path("/tmp") / f"netswap-cluster-{port}.token"
        secret.write_text(token + "\n")
        secret.chmod(0o600)
        cmd += ["--token-file", str(secret)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=out)
    try:
        wait_for_port(port, proc, timeout=60)
        yield f"nbd://127.0.0.1:{port}/swap", log
    finally:
        proc.kill()
        proc.wait()
    assert "Traceback" not in log.read_text(), log.read_text()


def storm(uri: str, slots: Sequence[int], threads: int, seconds: float,
          seed: int) -> dict[int, bytes]:  # fmt: skip
    """Random pages written and read back from several libnbd connections; returns what
    each slot should hold. A thread owns its own slots (every threads-th)."""
    truth: dict[int, bytes] = {}
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker(k: int) -> None:
        rng = random.Random(seed + k)
        mine = list(slots[k::threads])
        h = connect(uri)
        end = time.monotonic() + seconds
        try:
            while time.monotonic() < end:
                slot = rng.choice(mine)
                data = rng.randbytes(PAGE)
                h.pwrite(data, slot * PAGE)
                with lock:
                    truth[slot] = data
                other = rng.choice(mine)
                with lock:
                    want = truth.get(other)
                if want is not None:
                    assert h.pread(PAGE, other * PAGE) == want, other
        except BaseException as exc:  # reported by the caller
            errors.append(exc)
        finally:
            h.shutdown()

    workers = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    if errors:
        raise errors[0]
    return truth


def verify(uri: str, truth: dict[int, bytes]) -> int:
    """Every page read back byte for byte; returns how many read EIO (any other
    difference fails)."""
    h = connect(uri)
    eio = 0
    for slot, data in truth.items():
        try:
            assert h.pread(PAGE, slot * PAGE) == data, slot
        except nbd.Error as exc:
            assert errno_of(exc) == errno.EIO, exc
            eio += 1
    h.shutdown()
    return eio


@pytest.fixture(scope="module")
def six() -> Iterator[Cluster]:
    with cluster(3, 1) as made:
        yield made


def test_a_storm_from_several_connections_reads_back_byte_for_byte(six: Cluster) -> None:
    with agent(six.url) as (uri, log):
        truth = storm(uri, range(4096), threads=4, seconds=8, seed=1)
        assert len(truth) > 500
        assert verify(uri, truth) == 0
        assert "sealed with AES-256-GCM" in log.read_text()


def test_a_restarted_agent_rebuilds_from_the_cluster(six: Cluster) -> None:
    with agent(six.url) as (uri, _):
        truth = storm(uri, range(2000), threads=2, seconds=3, seed=2)
    with agent(six.url, "--start", "rebuild") as (uri, log):
        assert verify(uri, truth) == 0
        assert f"{len(truth)} pages proven" in log.read_text()


def test_discard_frees_cluster_memory(six: Cluster) -> None:
    with agent(six.url) as (uri, _):
        h = connect(uri)
        before = six.used_memory()
        h.pwrite(os.urandom(16 << 20), 0)  # 16 MiB: 16 whole chunks and a part
        written = six.used_memory()
        h.trim(16 << 20, 0)
        time.sleep(0.5)  # UNLINK frees in the background
        after = six.used_memory()
        h.shutdown()
    assert written - before > 15 << 20
    assert written - after > 14 << 20, (before, written, after)


def test_memory_per_stored_page_is_within_ten_percent_of_the_page(six: Cluster) -> None:
    with agent(six.url, size="128M") as (uri, _):
        h = connect(uri)
        before = six.used_memory()
        for at in range(0, 96 << 20, 8 << 20):  # 24,576 pages, dense: swap's own pattern
            h.pwrite(os.urandom(8 << 20), at)
        per_page = (six.used_memory() - before) / (96 << 20 >> 12)
        h.shutdown()
    assert per_page <= 1.10 * PAGE, per_page


def test_area_b_cannot_touch_area_a_on_any_node(six: Cluster) -> None:
    user_a, user_b = six.add_user(AREA, "pw-a"), six.add_user(AREA + "b", "pw-b")
    url = six.url.replace("redis://", f"redis://{user_a}@")
    with agent(url, token="pw-a") as (uri, _):
        h = connect(uri)
        h.pwrite(os.urandom(PAGE), 0)
        h.shutdown()
    key = chunk_keys(AREA, 0)[1]
    for node in six.masters():
        for command in (["GET", key], ["SET", key, "x"], ["DEL", key]):
            out = subprocess.run(["redis-cli", "-p", str(node.port), "--user", user_b,
                                  "--pass", "pw-b", "--no-auth-warning", *command],
                                 capture_output=True, text=True, check=False).stdout  # fmt: skip
            assert "NOPERM" in out, (node.port, command, out)


def test_a_wrong_password_is_one_clear_line(six: Cluster) -> None:
    user = six.add_user(AREA, "right")
    url = six.url.replace("redis://", f"redis://{user}@")
    port = free_port()
    secret = Path("/tmp") / f"netswap-cluster-{port}.token"
    secret.write_text("wrong\n")
    done = subprocess.run([NETSWAP, "serve", "--listen", f"127.0.0.1:{port}", "--size", "16M",
                           "--backend", "remote", "--cluster", url, "--area", AREA,
                           "--no-mlock", "--token-file", str(secret)],
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert done.returncode != 0
    assert "refused" in done.stderr and "Traceback" not in done.stderr, done.stderr[-1500:]


def test_an_unreachable_cluster_at_start_is_one_clear_line() -> None:
    port = free_port()
    dead = free_port()
    done = subprocess.run([NETSWAP, "serve", "--listen", f"127.0.0.1:{port}", "--size", "16M",
                           "--backend", "remote", "--cluster", f"redis://127.0.0.1:{dead}",
                           "--area", AREA, "--no-mlock"],
                          capture_output=True, text=True, timeout=90, check=False)  # fmt: skip
    assert done.returncode != 0
    assert "unreachable" in done.stderr and "Traceback" not in done.stderr, done.stderr[-1500:]


def test_a_full_cluster_is_enospc_like_a_full_store() -> None:
    with cluster(3, 0, maxmemory="24mb") as small, agent(small.url, size="256M") as (uri, _):
        h = connect(uri)
        with pytest.raises(nbd.Error) as info:
            for at in range(0, 256 << 20, 1 << 20):
                h.pwrite(os.urandom(1 << 20), at)
        assert errno_of(info.value) == errno.ENOSPC
        h.shutdown()


def test_a_master_killed_mid_storm_fails_over_with_nothing_stale() -> None:
    """kill -9 of a master while four connections write and read: its replica takes
    over; the storm sees no error, and every acknowledged page reads back identical or
    (none expected with WAIT 1) EIO, never stale."""
    with cluster(3, 1) as c, agent(c.url) as (uri, _):
        victim = c.masters()[0]
        timer = threading.Timer(3.0, victim.kill)
        timer.start()
        truth = storm(uri, range(8192), threads=4, seconds=12, seed=3)
        timer.join()
        c.wait_ok()
        eio = verify(uri, truth)
        print(f"failover: {len(truth)} pages, {eio} EIO")
        assert eio == 0


# 256 slots in each of 24 buckets: the buckets' hash tags spread over every master, so
# resharding moves some of them.
SPREAD = [b * BUCKET + k for b in range(24) for k in range(256)]


def test_a_master_added_and_resharded_during_a_storm_loses_nothing() -> None:
    with cluster(3, 0) as c, agent(c.url, size="2G") as (uri, _):
        first = storm(uri, SPREAD[::2], threads=2, seconds=3, seed=4)
        root = c.nodes[0].dir.parent
        c.add_master(root, "256mb")
        rebalance = c.rebalance()
        truth = storm(uri, SPREAD[1::2], threads=4, seconds=12, seed=5)
        assert rebalance.wait(120) == 0
        assert verify(uri, {**first, **truth}) == 0
        owners = [n for n in c.masters() if n.info("keyspace").get("db0")]
        assert len(owners) == 4  # the new master holds chunks now


async def store_client(c: Cluster, area: str) -> ClusterClient:
    user, seeds = parse_url(c.url)
    return await ClusterClient.connect(seeds, area, user, "", 5.0)


async def swap_out(client: ClusterClient, slot: int, page: bytes, gen: int) -> None:
    """One payload through the batch path, as the agent sends it; raises what it failed with."""
    await swap_out_run(client, slot, [page], [gen])


async def swap_out_run(client: ClusterClient, first: int, payloads: Sequence[bytes],
                       generations: Sequence[int], seals: bytes | None = None) -> None:  # fmt: skip
    """Payloads of consecutive slots from `first`, tagged over each payload (the agent's
    tags), through the batch path; raises what it failed with."""
    gens, lengths = array("Q", generations), array("H", [len(p) for p in payloads])
    slots = range(first, first + len(payloads))
    tags = tags_of_sized(b"".join(payloads), lengths, area_seed(client.area), slots, gens)
    done: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
    client.start_swap_out([slots], payloads, tags, gens, seals, done.set_result)
    failure = await done
    if failure is not None:
        raise failure


async def test_the_stores_rules_hold_on_the_cluster(six: Cluster) -> None:
    """What a netswap store refuses, the cluster's scripts refuse: a write, a discard, a
    claim or a fence below the floor (ESTALE, also from a client never fenced); a page
    no newer than its slot's (skipped: a late write never rolls a slot back); another
    host's area (EEXIST naming it) unless forced, and then the old life's pages go."""
    area = AREA + "rules"
    old, new = await store_client(six, area), await store_client(six, area)
    try:
        await old.fence(3)
        await old.swapfile(True, 4096, area_id=11, holder="host-a")
        await swap_out(old, 5, b"A" * PAGE, 3 << 32 | 2)
        await swap_out(old, 5, b"B" * PAGE, 3 << 32 | 1)  # older: skipped
        await swap_out(old, 5, b"C" * PAGE, 3 << 32 | 2)  # the same: skipped
        held = await old.read_pages([5])
        assert bytes(held.data) == b"A" * PAGE and list(held.generations) == [3 << 32 | 2]
        assert old.superseded == 2
        with pytest.raises(StoreError) as info:  # longer than a page: no payload
            await swap_out(old, 6, b"F" * (PAGE + 1), 3 << 32 | 3)
        assert info.value.errno == errno.EINVAL
        await new.fence(4)  # a newer agent of the same host
        for change in (
            swap_out(old, 6, b"D" * PAGE, 3 << 32 | 3),
            old.discard([(0, 8)]),
            old.fence(3),
            old.swapfile(True, 8192, area_id=11, holder="host-a"),
        ):
            with pytest.raises(StoreError) as info:
                await change
            assert info.value.errno == errno.ESTALE, info.value
        never = await store_client(six, area)  # epoch 0: changes nothing on a fenced area
        with pytest.raises(StoreError) as info:
            await swap_out(never, 7, b"E" * PAGE, 9 << 32 | 1)
        assert info.value.errno == errno.ESTALE
        await never.close()
        assert list((await new.inventory(0, 4096))[0]) == [5]
        other = await store_client(six, area)
        await other.fence(5)
        with pytest.raises(StoreError) as info:
            await other.swapfile(True, 4096, area_id=12, holder="host-b")
        assert info.value.errno == errno.EEXIST and "host-a" in info.value.reason
        await other.swapfile(True, 4096, area_id=12, holder="host-b", force=True)
        assert list((await other.inventory(0, 4096))[0]) == []  # the old life's pages went
        again = await store_client(six, area)
        assert again.welcome is not None and (again.welcome.area_id, again.welcome.holder,
                                              again.welcome.floor) == (12, "host-b", 5)  # fmt: skip
        await again.close()
        await other.swapfile(False, 0, holder="host-b")
        await other.close()
    finally:
        await old.close()
        await new.close()


def test_what_the_cluster_answers_reaches_the_agent_as_it_means() -> None:
    """The cluster moving (MOVED -- which redis-py makes an AskError --, TRYAGAIN,
    CLUSTERDOWN, READONLY, UNBLOCKED, a connection) is no refusal: the request is tried
    again, and at its deadline the store does not answer. A refusal is an errno."""
    cmd = Cmd("k", "EVALSHA", "x")
    for moving in (rx.MovedError("3 127.0.0.1:7000"), rx.TryAgainError("TRYAGAIN"),
                   rx.ClusterDownError("CLUSTERDOWN"), rx.ReadOnlyError("READONLY"),
                   rx.ResponseError("UNBLOCKED force unblock"), rx.ConnectionError("gone"),
                   rx.ResponseError("LOADING the dataset"), rx.TimeoutError()):  # fmt: skip
        assert refusal("n", cmd, moving) is None, moving
    for answer, code in ((rx.OutOfMemoryError("OOM"), errno.ENOSPC),
                         (rx.NoPermissionError("NOPERM"), errno.EACCES),
                         (rx.ResponseError("ESTALE held by a newer agent"), errno.ESTALE),
                         (rx.ResponseError("EEXIST area is held by h"), errno.EEXIST),
                         (rx.ResponseError("WRONGTYPE not a string"), errno.EIO)):  # fmt: skip
        failure = refusal("n", cmd, answer)
        assert failure is not None and failure.errno == code, (answer, failure)


def test_the_cluster_nodes_show_in_metrics_and_stats(six: Cluster) -> None:
    """Six nodes, three masters, each up with its used memory; `netswap stats` shows them."""
    from netswap.client.statscmd import fetch

    http = f"127.0.0.1:{free_port()}"
    with agent(six.url, "--http", http) as (uri, _):
        h = connect(uri)
        h.pwrite(os.urandom(1 << 20), 0)
        h.shutdown()
        deadline = time.monotonic() + 15
        while len(fetch(f"http://{http}/").cluster_nodes) < 6:
            assert time.monotonic() < deadline, "the nodes never showed"
            time.sleep(0.5)
        snap = fetch(f"http://{http}/")
        assert sorted(n.role for n in snap.cluster_nodes) == ["master"] * 3 + ["replica"] * 3
        assert all(n.up and n.used_bytes > 0 for n in snap.cluster_nodes), snap.cluster_nodes
        text = subprocess.run([NETSWAP, "stats", f"http://{http}/"], capture_output=True,
                              text=True, timeout=30, check=True).stdout  # fmt: skip
        assert "cluster nodes" in text and len(re.findall(r"│ replica +│", text)) == 3, text


def test_an_agent_of_netswap_stores_does_not_load_the_cluster_client() -> None:
    """redis-py costs ~10 MiB locked: only an agent on a cluster tier imports it."""
    code = ("import sys, netswap.client.nbd.config, netswap.client.agent.remote, "
            "netswap.client.agent.stats; print('redis' in sys.modules)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    assert out.strip() == "False"


# -- failover at Redis's default node timeout, and P3 (lineage.py) --------------------

BUCKET0 = chunk_keys(AREA, 0)[0]  # the first bucket's first chunk


def write(uri: str, slots: Sequence[int], seed: int) -> dict[int, bytes]:
    """A random page to every slot, consecutive slots in one request of up to 256."""
    rng = random.Random(seed)
    pages = {slot: rng.randbytes(PAGE) for slot in slots}
    h = connect(uri)
    run: list[int] = []
    for slot in [*sorted(pages), -2]:
        if run and (slot != run[-1] + 1 or len(run) == 256):
            h.pwrite(b"".join(pages[s] for s in run), run[0] * PAGE)
            run = []
        run.append(slot)
    h.shutdown()
    return pages


def judged(uri: str, newest: dict[int, bytes], older: dict[int, bytes]) -> dict[str, int]:
    """Each slot read once: the newest page, EIO, or an older page (anything else fails)."""
    h = connect(uri)
    seen = {"newest": 0, "eio": 0, "older": 0}
    for slot, page in newest.items():
        try:
            got = h.pread(PAGE, slot * PAGE)
        except nbd.Error as exc:
            assert errno_of(exc) == errno.EIO, exc
            seen["eio"] += 1
            continue
        if got == page:
            seen["newest"] += 1
        else:
            assert got == older.get(slot), f"slot {slot}: neither its newest nor an older page"
            seen["older"] += 1
    h.shutdown()
    return seen


def test_the_lineage_rules() -> None:
    """A takeover by a replica keeps the boot unless its master was in doubt; a master
    with a new history, or a history never seen, may have lost writes; a new master
    (no replid2) and a master that moved keep it."""
    a, b, c = "a" * 40, "b" * 40, "c" * 40
    known = {"m1": Entry(a), "m2": Entry(b, doubt=True)}
    assert judge(known, [Master("m1", a, NO_REPLID), Master("m2", b, NO_REPLID)])[1] == []
    took, why = judge(known, [Master("r1", c, a), Master("m2", b, NO_REPLID)])
    assert why == [] and took["r1"] == Entry(c) and took["m2"].doubt
    assert "not yet on every replica" in judge(known, [Master("r2", c, b)])[1][0]
    assert "restarted" in judge(known, [Master("m1", c, NO_REPLID)])[1][0]
    assert "never saw" in judge(known, [Master("x", c, "d" * 40)])[1][0]
    assert judge(known, [Master("new", c, NO_REPLID), Master("moved", a, NO_REPLID)])[1] == []
    state = State(7, 9, 11, 5, took)
    assert State.decode(state.encode()) == state
    with pytest.raises(ValueError, match="unreadable"):
        State.decode(b'{"area_id": 1}')


def test_a_failover_at_redis_default_node_timeout_costs_time_not_a_page() -> None:
    """Issue #29's failure #2: cluster-node-timeout at Redis's default (15 s), kill -9 of
    the master holding the area's first bucket while pages are written and read. Reads
    wait through the failover and read right; writes may fail meanwhile (the writer
    writes them again, as the kernel does); afterwards every acknowledged page reads
    back, and the boot is the same (every write was on the promoted replica).
    On 6afe607, a like workload (4,096 pages written before the kill, 2,048 of them in
    the first bucket, then four threads writing and reading): all 4,096 read EIO after
    it, 18,798 reads failed EIO during it, 12 writes failed; on main before this
    branch's client the agent did not start on a cluster at all."""
    with (
        cluster(3, 1, node_timeout_ms=DEFAULT_NODE_TIMEOUT_MS) as c,
        agent(c.url, size="512M") as (uri, log),
    ):
        others = [b * BUCKET + k for b in (1, 2, 3) for k in range(512)]
        kept = write(uri, [*range(2048), *others], seed=6)
        truth: dict[int, bytes] = {}
        lock, stop = threading.Lock(), threading.Event()
        seen = {"writes_failed": 0, "reads": 0, "slowest_read": 0.0}
        errors: list[BaseException] = []

        def writer(k: int) -> None:  # a kernel: writes, and writes a failed page again
            rng = random.Random(k)
            mine = [2048 + k * 997 + i for i in range(900)] + [5 * BUCKET + k * 900 + i
                                                               for i in range(900)]  # fmt: skip
            h = connect(uri)
            again: dict[int, bytes] = {}
            while not stop.is_set():
                slot = next(iter(again)) if again else rng.choice(mine)
                page = again.pop(slot, None) or rng.randbytes(PAGE)
                with lock:
                    truth.pop(slot, None)  # in flight: not read meanwhile
                try:
                    h.pwrite(page, slot * PAGE)
                except nbd.Error:
                    again[slot] = page
                    with lock:
                        seen["writes_failed"] += 1
                    time.sleep(0.5)
                    continue
                with lock:
                    truth[slot] = page
            h.shutdown()

        def reader(k: int) -> None:  # what was swapped out before the kill
            rng = random.Random(100 + k)
            pages = list(kept.items())
            h = connect(uri)
            try:
                while not stop.is_set():
                    slot, page = rng.choice(pages)
                    began = time.monotonic()
                    assert h.pread(PAGE, slot * PAGE) == page, slot
                    with lock:
                        seen["reads"] += 1
                        seen["slowest_read"] = max(seen["slowest_read"], time.monotonic() - began)
            except BaseException as exc:  # an EIO or a wrong page: the test's failure
                errors.append(exc)
            finally:
                h.shutdown()

        workers = [threading.Thread(target=writer, args=(k,)) for k in range(2)]
        workers += [threading.Thread(target=reader, args=(k,)) for k in range(2)]
        for w in workers:
            w.start()
        time.sleep(2)
        c.owner(BUCKET0).kill()
        killed = time.monotonic()
        c.wait_ok(60)
        ok_after = time.monotonic() - killed
        time.sleep(6)  # the agent back (it retries every 2 s at most) and working
        stop.set()
        for w in workers:
            w.join()
        assert not errors, errors[0]
        eio = verify(uri, {**kept, **truth})
        text = log.read_text()
        print(f"default node timeout: cluster ok {ok_after:.1f}s after the kill; slowest read "
              f"{seen['slowest_read']:.1f}s of {seen['reads']}; {seen['writes_failed']} writes "
              f"failed; {len(kept) + len(truth)} pages verified, {eio} EIO")  # fmt: skip
        assert eio == 0
        assert seen["slowest_read"] > 10  # a read did wait through the failover
        # A master whose WAIT came back short (a replica slower than 200 ms: seen under
        # load) was in doubt at its failover: the cluster then answers as a new boot and
        # every page is checked -- and here none was missing. Otherwise the boot stays.
        if "may have lost" in text:
            assert "restarted" in text and "on no replica" not in text, text[-3000:]
        else:
            assert "restarted" not in text, text[-3000:]
        assert "is back" in text


def cut_off(c: Cluster) -> tuple[RedisNode, RedisNode]:
    """The first bucket's master and its replica, the replica paused and its link cut
    (what the master sends from now on never reaches it: a paused replica would still
    find what was sent before the master died in its socket's buffer)."""
    master = c.owner(BUCKET0)
    (replica,) = c.replicas_of(master)
    replica.pause()
    master.cli("CLIENT", "KILL", "TYPE", "replica")
    return master, replica


def lossy_failover(c: Cluster, during: Callable[[], None]) -> None:
    """The first bucket's master fails over after acknowledging, without its replica,
    what `during` writes: the master killed, the replica resumed and promoted (Redis
    elects it: its data is recent enough)."""
    master, replica = cut_off(c)
    try:
        during()
    finally:
        master.kill()
        replica.resume()
    c.wait_ok(60)
    assert c.owner(BUCKET0) is replica


def test_a_failover_that_lost_acknowledged_writes_is_a_new_boot_and_no_page_is_older() -> None:
    """P3: writes acknowledged while the first bucket's replica was paused are lost when
    it is promoted. The agent learns that the cluster restarted (its master had writes
    in doubt): each slot reads its newest page or EIO, never the older one it held
    before -- and so does a restarted agent."""
    with cluster(3, 1) as c:
        with agent(c.url) as (uri, log):
            older = write(uri, range(1024), seed=7)
            newest = dict(older)
            lossy_failover(c, lambda: newest.update(write(uri, range(512), seed=8)))
            seen = judged(uri, newest, older)
            text = log.read_text()
            print(f"live agent through a lossy failover: {seen}")
            assert seen == {"newest": 512, "eio": 512, "older": 0}, seen
            assert "may have lost acknowledged writes" in text, text[-3000:]
            assert "restarted: its replicas are suspect" in text, text[-3000:]
            assert verify(uri, write(uri, range(1024, 1100), seed=9)) == 0  # it goes on
        with agent(c.url, "--start", "rebuild") as (uri, log):
            seen = judged(uri, newest, older)
            print(f"restarted after it: {seen}")
            assert seen == {"newest": 512, "eio": 512, "older": 0}, seen


def test_an_agent_dead_through_a_lossy_failover_serves_no_older_page() -> None:
    """P3 when the agent is dead while it happens: the restarted agent's client finds the
    old master's doubt in the keyring, the cluster answers as a new boot, and the
    rebuild proves nothing from it: every page EIO, none older."""
    with cluster(3, 1) as c:
        with agent(c.url) as (uri, _):
            older = write(uri, range(1024), seed=10)
            newest = dict(older)
            master, replica = cut_off(c)
            newest.update(write(uri, range(512), seed=11))
        master.kill()  # the agent was killed -9 as it left
        replica.resume()
        c.wait_ok(60)
        with agent(c.url, "--start", "rebuild") as (uri, log):
            seen = judged(uri, newest, older)
            print(f"an agent dead through a lossy failover: {seen}")
            assert seen["older"] == 0 and seen["eio"] > 0, seen
            assert "may have lost acknowledged writes" in log.read_text()


def test_an_agent_dead_through_a_failover_that_lost_nothing_rebuilds_every_page() -> None:
    """Every write was WAITed by the master's one replica: the failover keeps the boot,
    and an agent restarted after it proves every page from the promoted replica."""
    with cluster(3, 1) as c:
        with agent(c.url, size="128M") as (uri, _):
            pages = write(uri, [*range(1024), *range(BUCKET, BUCKET + 512)], seed=12)
        c.owner(BUCKET0).kill()
        c.wait_ok(60)
        with agent(c.url, "--start", "rebuild", size="128M") as (uri, log):
            assert verify(uri, pages) == 0
            text = log.read_text()
            assert f"{len(pages)} pages proven" in text and "may have lost" not in text, text
