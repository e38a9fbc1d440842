"""Keeping the cyclic garbage collector off while a large table is built or written.

A dump of the kernel's table or a takeover's commit builds hundreds of thousands of
short-lived tuples (entries, tuples of addresses and ports) in one go. Each batch of
allocations triggers a collection that walks every young object and, every few
batches, the older generations too: measured here, about one microsecond more per
entry on top of the two it takes to build it. None of these objects forms a cycle, so
the collector has nothing to find; it is paused for the duration and resumes as it
was before.
"""

from __future__ import annotations

import gc
from types import TracebackType


class CollectorPause:
    """A reentrant pause (operations may overlap: a dump during a commit); the
    collector resumes when the last one ends, as it was before the first."""

    def __init__(self) -> None:
        self._depth = 0
        self._resume = False

    def __enter__(self) -> None:
        if self._depth == 0:
            self._resume = gc.isenabled()
            gc.disable()
        self._depth += 1

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._depth -= 1
        if self._depth == 0 and self._resume:
            gc.enable()


#: The process-wide pause used by the kernel dump and the daemon's commit.
COLLECTOR_PAUSE = CollectorPause()
