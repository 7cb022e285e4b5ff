"""An area's slot map, sparse by cluster: memory follows what is written.

An area declares how many slots it has, but that number is only a bound on
slot numbers: a client may declare 2**40 slots. So the map is not one array of
the declared size but a dict of clusters of CLUSTER_SLOTS slots, created on a
cluster's first write and dropped when its last page goes -- activating or
releasing an area costs the same at any declared size, and a store's metadata
is bounded by the clusters it holds (`ClusterBudget`), never by what a client
declares. Each cluster is one array('i') of handles -- an arena page (a whole
page), UNMAPPED (never written, or discarded), or below it an object (a
shorter payload: objects.py) -- with its mapped count kept in one extra element.
"""

from __future__ import annotations

import errno
from array import array
from collections.abc import Iterable, Iterator

from netswap.protocol import PAGE_SIZE, StoreError, area_seed

UNMAPPED = -1
# The kernel hands out swap slots in clusters of SWAPFILE_CLUSTER = 256 (mm/swapfile.c),
# and the agent places whole slabs: written slots come in runs, so a 256-slot cluster is
# mostly full. One costs 1 KiB + ~120 B of object and dict overhead: 0.03 % of the
# 1 MiB of pages it maps when full.
CLUSTER_SLOTS = 256
_SHIFT = 8  # log2(CLUSTER_SLOTS)
_COUNT = CLUSTER_SLOTS  # index of the mapped-count element
# A store holds at most this many clusters per cluster's worth of capacity: 4x the dense
# layout, so a client scattering single pages can cost the store at most
# 4 * 1.1 KiB / 1 MiB = 0.4 % of its capacity in slot maps (plus MIN_CLUSTERS),
# and gets ENOSPC past that.
SPARSE_FACTOR = 4
# Room for small stores and many small areas: 1,024 clusters is 1.1 MiB of metadata.
MIN_CLUSTERS = 1024
# One area per swapping host (or per device of one); a store serving more hosts than
# this is past its NIC's budget long before. An Area with no cluster costs ~300 B.
MAX_AREAS = 4096


class ClusterBudget:
    """Every cluster of every area, counted against one store-wide bound."""

    def __init__(self, capacity_pages: int) -> None:
        self.limit = capacity_pages // CLUSTER_SLOTS * SPARSE_FACTOR + MIN_CLUSTERS
        self.held = 0

    def take(self, count: int) -> None:
        if self.held + count > self.limit:
            raise StoreError(
                errno.ENOSPC,
                f"slot maps full: {self.held} of {self.limit} clusters held "
                f"(writes scattered over more than {SPARSE_FACTOR}x the dense layout)",
            )
        self.held += count


class Area:
    """One swap area: slot -> arena page, by cluster."""

    __slots__ = ("area_id", "budget", "clusters", "discarded", "holder", "name", "pages", "read",
                 "seed", "small", "small_bytes", "small_held", "superseded", "used",
                 "written")  # fmt: skip

    def __init__(
        self, name: str, pages: int, budget: ClusterBudget, area_id: int = 0, holder: str = ""
    ) -> None:
        self.name = name
        self.pages = pages
        # Which life of the area this is, and which host holds it (records.py): what
        # the Welcome tells an agent, and what a Swapfile of another host is refused by.
        self.area_id = area_id
        self.holder = holder
        self.seed = area_seed(name)  # the tags' area identity (protocol/checksum.py)
        self.clusters: dict[int, array[int]] = {}
        self.used = 0
        self.written = self.read = self.discarded = 0  # pages, for this area's own Stats
        self.superseded = 0  # pages not written: no newer than what their slot held
        # Of the `used` slots, how many hold a payload shorter than a page (an object),
        # their bytes, and the bytes of capacity they take (classes.footprint): a whole
        # page's are PAGE_SIZE each.
        self.small = self.small_bytes = self.small_held = 0
        self.budget = budget

    @property
    def payload_bytes(self) -> int:
        """Bytes of the payloads this area's slots hold."""
        return (self.used - self.small) * PAGE_SIZE + self.small_bytes

    @property
    def held_bytes(self) -> int:
        """Bytes of the store's capacity they take (what --area-quota bounds)."""
        return (self.used - self.small) * PAGE_SIZE + self.small_held

    def page(self, slot: int) -> int:
        cluster = self.clusters.get(slot >> _SHIFT)
        return UNMAPPED if cluster is None else cluster[slot & (CLUSTER_SLOTS - 1)]

    def run(self, first: int, count: int) -> array[int]:
        """The arena pages of slots first..first+count-1."""
        out = array("i")
        for index, low, high in _spans(first, count):
            cluster = self.clusters.get(index)
            out.extend(cluster[low:high] if cluster is not None else _unmapped(high - low))
        return out

    def new_clusters(self, slots: Iterable[int]) -> int:
        """How many clusters writing `slots` would create."""
        clusters = self.clusters
        return len({s >> _SHIFT for s in slots} - clusters.keys())

    def map(self, slot: int, page: int) -> int:
        """Point `slot` at `page`; returns the page it pointed at (or UNMAPPED). The
        caller took budget for any cluster this creates (new_clusters)."""
        index, offset = slot >> _SHIFT, slot & (CLUSTER_SLOTS - 1)
        cluster = self.clusters.get(index)
        if cluster is None:
            cluster = self.clusters[index] = _unmapped(CLUSTER_SLOTS + 1)
            cluster[_COUNT] = 0
        old = cluster[offset]
        cluster[offset] = page
        if old == UNMAPPED:
            cluster[_COUNT] += 1
            self.used += 1
        return old

    def unmap_span(self, index: int, low: int, high: int) -> list[int]:
        """Unmap slots low..high-1 of cluster `index`; returns the pages they held."""
        cluster = self.clusters.get(index)
        if cluster is None:
            return []
        freed = [p for p in cluster[low:high] if p != UNMAPPED]
        if not freed:
            return freed
        cluster[low:high] = _unmapped(high - low)
        cluster[_COUNT] -= len(freed)
        self.used -= len(freed)
        if cluster[_COUNT] == 0:
            del self.clusters[index]
            self.budget.held -= 1
        return freed

    def spans(self, first: int, count: int) -> Iterator[tuple[int, int, int] | None]:
        """(cluster, low, high) for every cluster slots first..+count may hold, walking
        the range or the held clusters, whichever is shorter; None for a held cluster
        outside the range. Each item is one unit of work: callers budget by items."""
        head, last = first >> _SHIFT, (first + count - 1) >> _SHIFT
        if last - head < len(self.clusters):
            yield from _spans(first, count)
            return
        for index in list(self.clusters):  # a snapshot: the caller unmaps as it goes
            if not head <= index <= last:
                yield None
                continue
            base = index << _SHIFT
            yield index, max(first - base, 0), min(first + count - base, CLUSTER_SLOTS)


def _spans(first: int, count: int) -> Iterator[tuple[int, int, int]]:
    """(cluster, low, high) covering slots first..first+count-1."""
    slot, end = first, first + count
    while slot < end:
        index = slot >> _SHIFT
        low = slot - (index << _SHIFT)
        high = min(CLUSTER_SLOTS, end - (index << _SHIFT))
        yield index, low, high
        slot += high - low


def _unmapped(count: int) -> array[int]:
    return array("i", [UNMAPPED]) * count
