"""The external cache: the peer's conntrack table as this node last heard it.

Pure (``now`` is a parameter, in seconds of this node's monotonic clock). Entries
arrive with the *remaining* timeout the peer read when it sent them; the cache turns
that into an absolute deadline on this node's clock (``now + timeout``), so nothing
depends on the two nodes' clocks agreeing, only on both running at the same rate.
An entry disappears at its deadline unless a newer copy refreshed it first
(:meth:`ExternalCache.expire`); an entry without a timeout (e.g. an offloaded flow)
never expires here.

When this node takes over, :meth:`ExternalCache.commit_set` yields what to install in
the kernel: every entry with its timeout recomputed as the time left until its
deadline.

The cache is bucketed like the peer's table (:mod:`replicator.digest`) so the sync
layer can compare and replace it bucket by bucket.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterator

from .digest import BucketTable
from .model import Entry, EntryKey

_INF = math.inf
#: Rebuild the expiry heap when it holds this many more items than there are deadlines
#: (refreshes leave superseded items behind; they are skipped lazily until then).
_HEAP_SLACK = 1024


class ExternalCache:
    """The peer's entries with absolute expiry, grouped in digest buckets."""

    __slots__ = ("_deadlines", "_heap", "_table")

    def __init__(self, buckets: int) -> None:
        self._table = BucketTable(buckets)
        self._deadlines: dict[EntryKey, float] = {}
        self._heap: list[tuple[float, EntryKey]] = []

    def __len__(self) -> int:
        return len(self._table)

    @property
    def table(self) -> BucketTable:
        """The underlying bucketed table (read it; change it only through this class)."""
        return self._table

    def get(self, key: EntryKey) -> Entry | None:
        """The entry stored under ``key`` (with the timeout it arrived with), or None."""
        return self._table.get(key)

    def deadline(self, key: EntryKey) -> float | None:
        """When ``key`` expires (``math.inf``: never), or None if it is not cached."""
        return self._deadlines.get(key)

    def upsert(self, bucket: int, entry: Entry, now: float) -> Entry | None:
        """Store ``entry`` (in ``bucket``, its key's bucket); returns the entry it replaced.

        Its deadline becomes ``now + entry.timeout`` (never, if the timeout is None).
        """
        key = (entry[0], entry[3], entry[1])
        timeout = entry[5]
        deadline = _INF if timeout is None else now + timeout
        if self._deadlines.get(key) != deadline:
            self._deadlines[key] = deadline
            if deadline != _INF:
                heapq.heappush(self._heap, (deadline, key))
                if len(self._heap) > 2 * len(self._deadlines) + _HEAP_SLACK:
                    self._rebuild_heap()
        return self._table.put(bucket, key, entry)

    def delete(self, bucket: int, key: EntryKey) -> Entry | None:
        """Remove ``key`` (in ``bucket``); returns the removed entry or None."""
        self._deadlines.pop(key, None)
        return self._table.pop(bucket, key)

    def expire(self, now: float) -> list[Entry]:
        """Remove and return every entry whose deadline is at or before ``now``."""
        expired = []
        heap, deadlines = self._heap, self._deadlines
        while heap and heap[0][0] <= now:
            deadline, key = heapq.heappop(heap)
            if deadlines.get(key) == deadline:  # not refreshed or deleted since
                del deadlines[key]
                old = self._table.pop(self._table.bucket_of(key), key)
                if old is not None:
                    expired.append(old)
        return expired

    def next_expiry(self) -> float | None:
        """The earliest deadline still pending (may be a superseded one), or None."""
        return self._heap[0][0] if self._heap else None

    def entries(self) -> Iterator[Entry]:
        """Every entry, as received (timeout = remaining seconds when the peer sent it)."""
        return self._table.values()

    def commit_set(self, now: float) -> list[Entry]:
        """Every entry with ``timeout`` = whole seconds left until its deadline (>= 1).

        What to install in the kernel on takeover. Entries without a timeout keep None.
        """
        out = []
        deadlines = self._deadlines
        for entry in self._table.values():
            deadline = deadlines[(entry[0], entry[3], entry[1])]
            out.append(
                entry if deadline == _INF
                else entry._replace(timeout=max(1, math.ceil(deadline - now)))
            )  # fmt: skip
        return out

    def clear(self) -> None:
        """Forget everything (conntrackd ``-f external``)."""
        self._table.clear()
        self._deadlines.clear()
        self._heap.clear()

    def _rebuild_heap(self) -> None:
        self._heap = [(d, k) for k, d in self._deadlines.items() if d != _INF]
        heapq.heapify(self._heap)
