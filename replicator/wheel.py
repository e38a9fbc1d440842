"""A timer wheel of keys by whole second, without a per-timer object (pure).

Replaces heaps of ``(time, key)`` tuples (one tuple and one float per entry) for the
per-entry timers of large tables (expiry of the external cache, refreshes of the sync
session). A key scheduled at ``when`` is appended to the list of second
``floor(when)``; a heap holds each *distinct* second once, so the cost beyond the key
itself is one list slot per timer.

The wheel stores no time per key, and it never removes a key: the owner keeps the
authoritative time (in the entry's record) and checks it when the key comes out of
:meth:`TimerWheel.pop_due`. A key rescheduled or deleted since simply comes out as a
stale item and is ignored; one not due yet (scheduled later within the same second)
is put back into the next second (``add(key, now + 1)``): it fires less than a second
late, rather than making the owner poll in a loop until it is due. The owner rebuilds
the wheel when stale items pile up (:attr:`TimerWheel.items` against its own size).
"""

from __future__ import annotations

import heapq
import math


class TimerWheel:
    """Keys by the whole second they are due in (see the module doc)."""

    __slots__ = ("_seconds", "_slots", "items")

    def __init__(self) -> None:
        self._slots: dict[int, list[bytes]] = {}
        #: Heap of the seconds that have a slot.
        self._seconds: list[int] = []
        #: Keys held, stale ones included.
        self.items = 0

    def add(self, key: bytes, when: float) -> None:
        """Schedule ``key`` at ``when`` (finite)."""
        second = math.floor(when)
        slot = self._slots.get(second)
        if slot is None:
            self._slots[second] = [key]
            heapq.heappush(self._seconds, second)
        else:
            slot.append(key)
        self.items += 1

    def add_all(self, keys: list[bytes], when: float) -> None:
        """:meth:`add` of each key, all at ``when`` (finite)."""
        second = math.floor(when)
        slot = self._slots.get(second)
        if slot is None:
            self._slots[second] = list(keys)
            heapq.heappush(self._seconds, second)
        else:
            slot.extend(keys)
        self.items += len(keys)

    def next_time(self) -> float | None:
        """The start of the earliest second holding a key (None: empty).

        A lower bound of the earliest time scheduled: the owner polls then, and puts
        back what is not due yet, at most one second later.
        """
        return float(self._seconds[0]) if self._seconds else None

    def pop_due(self, now: float) -> list[bytes]:
        """Remove and return every key of the seconds starting at or before ``now``.

        They include every key scheduled at or before ``now``, and possibly keys
        scheduled later within the second of ``now``.
        """
        seconds, slots = self._seconds, self._slots
        due: list[bytes] = []
        while seconds and seconds[0] <= now:
            due.extend(slots.pop(heapq.heappop(seconds)))
        self.items -= len(due)
        return due

    def clear(self) -> None:
        """Remove every key."""
        self._slots.clear()
        self._seconds.clear()
        self.items = 0
