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
layer can compare and replace it bucket by bucket. It stores one record per entry
(:mod:`replicator.record`: the deadline in its header, the timeout as received) under
its packed key, and schedules expiry in a :class:`~replicator.wheel.TimerWheel`, so an
entry costs two ``bytes`` objects, a dict slot and a list slot.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

from . import bytecols
from . import record as R
from .digest import BucketTable
from .model import Entry
from .wheel import TimerWheel

_INF = math.inf
_new = tuple.__new__


def commit_timeout(deadline: float, now: float, no_timeout: int | None) -> int | None:
    """The timeout to write for a copy whose deadline is ``deadline`` (on this node's
    clock) at ``now``: the whole seconds left, rounded up and at least 1 (a copy must
    not expire before the original, nor be written dead); ``no_timeout`` for one
    without a deadline."""
    return no_timeout if deadline == _INF else max(1, math.ceil(deadline - now))


def commit_entry(record: bytes, now: float, *, no_timeout: int | None = None,
                 tcp_flags: int = 0) -> Entry:
    """The entry to write for ``record`` at ``now`` (see :meth:`ExternalCache.commit_set`)."""
    return R.unpack(record, commit_timeout(R.deadline(record), now, no_timeout), tcp_flags)
#: Rebuild the expiry wheel when it holds this many more keys than the cache (refreshes
#: leave superseded keys behind; they are skipped lazily until then).
_WHEEL_SLACK = 1024


class ExternalCache:
    """The peer's entries with absolute expiry, grouped in digest buckets."""

    __slots__ = ("_table", "_wheel")

    def __init__(self, buckets: int) -> None:
        self._table = BucketTable(buckets)
        self._wheel = TimerWheel()

    def __len__(self) -> int:
        return len(self._table)

    @property
    def table(self) -> BucketTable:
        """The underlying bucketed table (read it; change it only through this class)."""
        return self._table

    def __contains__(self, key: bytes) -> bool:
        return self._table.get(key) is not None

    def get(self, key: bytes) -> Entry | None:
        """The entry stored under a packed key (with the timeout it arrived with), or None."""
        rec = self._table.get(key)
        return None if rec is None else R.unpack(rec)

    def deadline(self, key: bytes) -> float | None:
        """When ``key`` expires (``math.inf``: never), or None if it is not cached."""
        rec = self._table.get(key)
        return None if rec is None else R.deadline(rec)

    def upsert(self, bucket: int, key: bytes, record: bytes) -> bytes | None:
        """Store ``record`` under its packed ``key`` (in ``bucket``); returns the record it
        replaced. ``record``'s deadline is the arrival time plus the remaining timeout
        received (``inf``: none), the timeout in its header the one received."""
        deadline = R.deadline(record)
        old = self._table.put(bucket, key, record)
        if deadline != _INF and (old is None or R.deadline(old) != deadline):
            wheel = self._wheel
            wheel.add(key, deadline)
            if wheel.items > 2 * len(self._table) + _WHEEL_SLACK:
                self._rebuild_wheel()
        return old

    def add_new(self, keys: Sequence[bytes], records: Sequence[bytes],
                deadlines: Sequence[float]) -> bool:
        """:meth:`upsert` of each ``(key, record)`` (distinct keys; ``deadlines`` the
        records' own) if no key is held yet, as a burst's are: whether they were
        stored (nothing is if a key is held)."""
        if not self._table.add_new(keys, records):
            return False
        wheel = self._wheel
        by_deadline = bytecols.groups(deadlines, keys)
        by_deadline.pop(_INF, None)
        for deadline, group in by_deadline.items():
            wheel.add_all(group, deadline)
        if wheel.items > 2 * len(self._table) + _WHEEL_SLACK:
            self._rebuild_wheel()
        return True

    def delete(self, bucket: int, key: bytes) -> bytes | None:
        """Remove ``key`` (in ``bucket``); returns the removed record or None."""
        return self._table.pop(bucket, key)

    def expire(self, now: float) -> list[Entry]:
        """Remove and return every entry whose deadline is at or before ``now``."""
        table = self._table
        expired = []
        for key, rec in self._due(now):
            table.pop(table.bucket_of(key), key)
            expired.append(R.unpack(rec))
        return expired

    def hold(self, now: float, until: float) -> list[bytes]:
        """Move every deadline at or before ``now`` to ``until`` (instead of expiring);
        the records so extended (their deadline ``until``)."""
        table, wheel = self._table, self._wheel
        held = []
        for key, rec in self._due(now):
            new = R.with_deadline(rec, until)
            table.put(table.bucket_of(key), key, new)
            wheel.add(key, until)
            held.append(new)
        return held

    def _due(self, now: float) -> list[tuple[bytes, bytes]]:
        """``(key, record)`` of every entry whose deadline is at or before ``now``; keys
        the wheel held for a record refreshed or deleted since are skipped (or put back
        if still due later within this second)."""
        due = []
        seen: set[bytes] = set()
        get, wheel = self._table.get, self._wheel
        for key in wheel.pop_due(now):
            rec = get(key)
            if rec is None or key in seen:
                continue  # deleted since, or held twice (its deadline moved and back)
            deadline = R.deadline(rec)
            if deadline <= now:
                seen.add(key)
                due.append((key, rec))
            elif deadline < math.floor(now) + 1:
                wheel.add(key, now + 1)  # later within this second (refreshed otherwise)
        return due

    def next_expiry(self) -> float | None:
        """When to call :meth:`expire` next (None: nothing can expire).

        Never later than the earliest deadline; an entry expires at most a second
        after its deadline if ``expire`` is only called at these times.
        """
        return self._wheel.next_time()

    def records(self) -> Iterator[bytes]:
        """Every record, bucket by bucket."""
        return self._table.values()

    def entries(self) -> Iterator[Entry]:
        """Every entry, as received (timeout = remaining seconds when the peer sent it)."""
        return map(R.unpack, self._table.values())

    def commit_set(self, now: float, *, no_timeout: int | None = None, tcp_flags: int = 0
                   ) -> list[Entry]:
        """Every entry with ``timeout`` = whole seconds left until its deadline (>= 1).

        What to install in the kernel on takeover. Entries without a timeout get
        ``no_timeout``; ``tcp_flags`` are set in both directions of TCP entries (see
        :func:`replicator.daemon.copy_tcp_flags`: done here, a takeover builds each of
        its 100 k entries once instead of three times).
        """
        return [commit_entry(rec, now, no_timeout=no_timeout, tcp_flags=tcp_flags)
                for rec in self._table.values()]

    def clear(self) -> None:
        """Forget everything (conntrackd ``-f external``)."""
        self._table.clear()
        self._wheel.clear()

    def _rebuild_wheel(self) -> None:
        wheel = self._wheel
        wheel.clear()
        for key, rec in self._table.items():
            deadline = R.deadline(rec)
            if deadline != _INF:
                wheel.add(key, deadline)
