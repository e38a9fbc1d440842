"""The internal cache: this node's copy of its own kernel conntrack table (pure, no I/O).

It is fed two ways and both are needed (see ``shared/notes/ctnetlink.md``):

* **events** (:meth:`InternalCache.apply`): partial entries, folded into the cached
  full entry with :func:`~replicator.model.merge`;
* **dumps** (:meth:`InternalCache.begin_resync` ... :meth:`InternalCache.finish_resync`):
  the full table, read on a second socket while events keep arriving. Used at start
  (after subscribing, so nothing falls between the two) and after every overrun.

Reconciliation rule
-------------------
A dump is a snapshot taken over a period of time; events read during that period may be
newer *or* older than the dump's view of their entry, and nothing tells which. The
rule that proved itself (and is what the notes measured) is: an entry touched by an
event while the dump ran keeps the event's state (fields the events never carried are
filled from the dump); an entry deleted by an event during the dump stays deleted; every
other entry takes the dump's state; and a cached entry absent from the dump is gone.
An overrun *during* a dump makes the result doubtful, so the caller runs another one
(:class:`~replicator.mirror.Mirror` does).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import NamedTuple

from .model import CtEvent, Entry, EntryKey, EventKind, merge


class Change(NamedTuple):
    """One change of the cache, as published to its consumer (the sync layer).

    ``entry`` is the full cached entry after the change, or ``None`` when the entry is
    gone.
    """

    key: EntryKey
    entry: Entry | None


def _same_state(a: Entry, b: Entry) -> bool:
    """Equal in everything but the remaining timeout and the kernel's id.

    Timeouts tick down between any two reads and the id is local to the kernel, so a
    difference in those alone is not a change worth publishing after a resync.
    """
    return a._replace(timeout=None, id=None) == b._replace(timeout=None, id=None)


class InternalCache:
    """Full entries keyed by (family, zone, orig tuple); see the module doc."""

    def __init__(self) -> None:
        self._entries: dict[EntryKey, Entry] = {}
        # Keys touched by events since begin_resync(); None when no resync is running.
        self._touched: set[EntryKey] | None = None

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __iter__(self) -> Iterator[Entry]:
        return iter(self._entries.values())

    def get(self, key: EntryKey) -> Entry | None:
        """The cached entry for ``key``, or ``None``."""
        return self._entries.get(key)

    def snapshot(self) -> dict[EntryKey, Entry]:
        """A copy of the whole cache."""
        return dict(self._entries)

    @property
    def resyncing(self) -> bool:
        """Whether :meth:`begin_resync` was called and :meth:`finish_resync` not yet."""
        return self._touched is not None

    def apply(self, event: CtEvent) -> Change:
        """Fold one event into the cache; the resulting change."""
        entry = event.entry
        key = (entry.family, entry.zone, entry.orig)
        if self._touched is not None:
            self._touched.add(key)
        if event.kind is EventKind.DESTROY:
            self._entries.pop(key, None)
            return Change(key, None)
        cached = self._entries.get(key)
        # A NEW event for a known key happens after a DESTROY was lost: it is a new
        # connection, but merging is still right since a NEW event is complete.
        full = entry if cached is None else merge(cached, entry)
        self._entries[key] = full
        return Change(key, full)

    def apply_all(self, events: Iterable[CtEvent]) -> list[Change]:
        """:meth:`apply` for each event, in order."""
        return [self.apply(event) for event in events]

    def begin_resync(self) -> None:
        """Start recording which keys events touch; call just before requesting a dump."""
        self._touched = set()

    def finish_resync(self, dump: Iterable[Entry]) -> list[Change]:
        """Reconcile with a dump requested after :meth:`begin_resync`; the changes made.

        Changes that only move the timeout or the id are applied but not reported.
        Without :meth:`begin_resync` no key counts as touched: the dump replaces the cache.
        """
        touched = self._touched if self._touched is not None else set()
        self._touched = None
        old = self._entries
        dumped = {(e.family, e.zone, e.orig): e for e in dump}
        new: dict[EntryKey, Entry] = {}
        for key, entry in dumped.items():
            if key not in touched:
                new[key] = entry
            elif (cached := old.get(key)) is not None:
                # The event's state wins; fields no event carried come from the dump.
                new[key] = merge(entry, cached)
            # else: deleted by an event during the dump, so it stays deleted.
        for key in touched - dumped.keys():
            cached = old.get(key)
            if cached is not None:
                new[key] = cached  # created (or re-created) during the dump
        changes: list[Change] = []
        for key, entry in new.items():
            before = old.get(key)
            if before is None or not _same_state(before, entry):
                changes.append(Change(key, entry))
        changes.extend(Change(key, None) for key in old.keys() - new.keys())
        self._entries = new
        return changes
