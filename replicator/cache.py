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

import functools
from collections.abc import Iterable, Iterator, KeysView
from itertools import repeat
from operator import itemgetter
from typing import NamedTuple

from . import record as R
from .model import CtEvent, Entry, EntryKey, EventKind, NewRecord, merge

_NEVER = -float("inf")


class Change(NamedTuple):
    """One change of the cache, as published to its consumer (the sync layer).

    ``key`` is the packed key (:mod:`replicator.record`); ``record`` the cached record
    after the change and ``entry`` the same as an :class:`Entry` (both ``None`` when
    the entry is gone). A consumer that stores ``record`` shares the cache's object.
    """

    key: bytes
    record: bytes | None
    #: ``None`` also when only the record was built (a NEW event that came as a
    #: :class:`~replicator.model.NewRecord`).
    entry: Entry | None


#: A Change of a NEW record, made from ``(key, record, None)`` (cheaper than the class).
_new_change = functools.partial(tuple.__new__, Change)
_ONLY_NEW_RECORDS = {NewRecord}
#: Below this many events, apply_batch takes them one by one (as fast).
_MIN_BATCH = 16


class InternalCache:
    """Full entries as records (:mod:`replicator.record`) by packed key; see the module doc.

    A record's deadline is the time the cache was told about the entry plus its
    timeout then; its ``told`` belongs to the sync session sharing the records
    (:meth:`restamp`) and is carried over unchanged when the entry changes.
    """

    def __init__(self) -> None:
        self._records: dict[bytes, bytes] = {}
        # Keys touched by events since begin_resync(); None when no resync is running.
        self._touched: set[bytes] | None = None

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, key: object) -> bool:
        return key in self._records

    def keys(self) -> KeysView[bytes]:
        """The packed keys cached, as a live view (a set: ``isdisjoint`` of a batch of
        keys runs in C)."""
        return self._records.keys()

    def __iter__(self) -> Iterator[Entry]:
        return map(R.unpack, self._records.values())

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        """Every (packed key, record)."""
        return iter(self._records.items())

    def get(self, key: bytes) -> Entry | None:
        """The cached entry under a packed key, or ``None``."""
        rec = self._records.get(key)
        return None if rec is None else R.unpack(rec)

    def snapshot(self) -> dict[EntryKey, Entry]:
        """A copy of the whole cache, as entries by :attr:`Entry.key`."""
        return {(e[0], e[3], e[1]): e for e in map(R.unpack, self._records.values())}

    def restamp(self, key: bytes, old: bytes, new: bytes) -> None:
        """Replace ``old`` by ``new`` under ``key`` if ``old`` is still the cached record.

        For the sync session, which changes the ``told`` of the records it shares with
        this cache: one object per entry, not two.
        """
        records = self._records
        if records.get(key) is old:
            records[key] = new

    @property
    def resyncing(self) -> bool:
        """Whether :meth:`begin_resync` was called and :meth:`finish_resync` not yet."""
        return self._touched is not None

    def apply(self, event: CtEvent | NewRecord, now: float) -> Change:
        """Fold one event, read at ``now``, into the cache; the resulting change."""
        if type(event) is NewRecord:
            rec = event.record
            key = R.key_of(rec)
            if self._touched is not None:
                self._touched.add(key)
            records = self._records
            if key not in records:
                # The usual NEW event: its record is stored as decoded.
                records[key] = rec
                return Change(key, rec, None)
            # A NEW event for a known key (a DESTROY was lost): merged below.
            event = CtEvent(EventKind.NEW, R.unpack(rec), event.portid)
        assert type(event) is CtEvent
        entry = event.entry
        key = R.key(entry)
        if self._touched is not None:
            self._touched.add(key)
        records = self._records
        if event.kind is EventKind.DESTROY:
            records.pop(key, None)
            return Change(key, None, None)
        cached = records.get(key)
        # A NEW event for a known key happens after a DESTROY was lost: it is a new
        # connection, but merging is still right since a NEW event is complete.
        if cached is None:
            if event.kind is EventKind.NEW:
                # As the event reader makes it (see record.new_event_record).
                rec = R.new_event_record(entry, now)
                records[key] = rec
                return Change(key, rec, entry)
            full, told = entry, _NEVER
        else:
            full, told = merge(R.unpack(cached), entry), R.timing(cached)[1]
        rec = R.pack(full, R.deadline_of(full[5], now), told, key)
        records[key] = rec
        return Change(key, rec, full)

    def apply_all(self, events: Iterable[CtEvent | NewRecord], now: float) -> list[Change]:
        """:meth:`apply` for each event, in order."""
        return [self.apply(event, now) for event in events]

    def apply_batch(self, events: Iterable[CtEvent | NewRecord], now: float, own: int = 0
                    ) -> tuple[list[Change], int]:
        """:meth:`apply` for each event, in order: the changes of the events not
        carrying port id ``own`` (0: none is ours) and how many did (the echoes of our
        own writes, applied but not returned)."""
        if not isinstance(events, list):
            events = list(events)
        if len(events) >= _MIN_BATCH:
            fast = self._new_records(events, own)
            if fast is not None:
                return fast, 0
        apply = self.apply
        changes = []
        echoes = 0
        for event in events:
            change = apply(event, now)
            if own and event.portid == own:
                echoes += 1
            else:
                changes.append(change)
        return changes, echoes

    def _new_records(self, events: list[CtEvent | NewRecord], own: int
                     ) -> list[Change] | None:
        """:meth:`apply_batch` of a batch of only NEW records of keys not cached, none
        ours (a burst of new connections), a step at a time for the whole batch (0.4 µs
        per event instead of 0.9); ``None``, doing nothing, for any other batch."""
        if set(map(type, events)) != _ONLY_NEW_RECORDS:
            return None
        recs, portids = zip(*events, strict=True)
        if own and own in portids:
            return None
        keys = R.keys_of(recs)
        records = self._records
        if len(set(keys)) != len(keys) or not records.keys().isdisjoint(keys):
            return None
        records.update(zip(keys, recs, strict=True))
        if self._touched is not None:
            self._touched.update(keys)
        return list(map(_new_change, zip(keys, recs, repeat(None))))

    def note_written(self, written: Iterable[tuple[bytes, bytes]], deleted: Iterable[bytes]
                     ) -> None:
        """Take ``(packed key, record)`` pairs this node wrote into the kernel, and the
        keys of entries it deleted, without their events (see
        :meth:`replicator.mirror.Mirror.note_written`); nothing is returned, as for
        echoes. Each counts as an event for a resync running (the dump's view of the
        key may be older)."""
        records, touched = self._records, self._touched
        # A hot standby notes every entry it writes: one update per write, not a
        # statement per entry (a sixth of its main thread in a burst, measured).
        written = written if isinstance(written, list) else list(written)
        records.update(written)
        if touched is not None:
            touched.update(map(itemgetter(0), written))
        for key in deleted:
            records.pop(key, None)
            if touched is not None:
                touched.add(key)

    def begin_resync(self) -> None:
        """Start recording which keys events touch; call just before requesting a dump."""
        self._touched = set()

    def finish_resync(self, dump: Iterable[Entry], now: float) -> list[Change]:
        """Reconcile with a dump requested after :meth:`begin_resync` and read by
        ``now``; the changes made (:meth:`reconcile` in one go).

        Changes that only move the timeout or the id are applied but not reported.
        Without :meth:`begin_resync` no key counts as touched: the dump replaces the cache.
        """
        return [c for step in self.reconcile(dump, now) for c in step]

    def reconcile(self, dump: Iterable[Entry], now: float, *, step: int = 4096
                  ) -> Iterator[list[Change]]:
        """:meth:`finish_resync` in steps of ``step`` dump entries: yields each step's
        changes (the last one: the entries absent from the dump, which are dropped).

        Events may be applied between steps; they count as touched like those applied
        while the dump was read (the event is newer than the dump either way), so a
        caller can hand control back to its event reader between steps instead of
        stalling it for the whole table (a 250 k-entry re-dump takes seconds of CPU).
        The cache is updated in place: until the last step it holds entries the dump
        did not reach yet as they were.
        """
        if self._touched is None:
            self._touched = set()
        touched = self._touched  # a live view: events keep adding to it
        records = self._records
        seen: set[bytes] = set()
        changes: list[Change] = []
        pack, unpack, deadline_of, key_of = R.pack, R.unpack, R.deadline_of, R.key
        for n, entry in enumerate(dump, 1):
            key = key_of(entry)
            before = records.get(key)
            if key not in touched:
                full = entry
            elif before is not None:
                # The event's state wins; fields no event carried come from the dump.
                full = merge(entry, unpack(before))
            else:
                continue  # deleted by an event during the dump: it stays deleted
            told = _NEVER if before is None else R.timing(before)[1]
            rec = pack(full, deadline_of(full[5], now), told, key)
            records[key] = rec
            seen.add(key)
            if before is None or not R.same_state(before, rec):
                changes.append(Change(key, rec, full))
            if n % step == 0:
                yield changes
                changes = []
        # Created (or re-created) by an event during the dump: kept; else gone.
        self._touched = None
        gone = [key for key in records if key not in seen and key not in touched]
        for key in gone:
            del records[key]
        changes.extend(Change(key, None, None) for key in gone)
        yield changes
