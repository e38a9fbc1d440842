"""An in-memory :class:`~replicator.kernel.KernelPort`: a conntrack table without a kernel.

It keeps the semantics the layers above rely on, as measured on the real kernel
(``shared/notes/ctnetlink.md``):

* every change produces an event to every subscriber: NEW with the full entry, UPDATE
  with a *partial* entry (labels only when they changed, mark only when non-zero or
  changed), DESTROY without timeout or labels;
* changes made through :meth:`FakeKernel.upsert` / :meth:`FakeKernel.delete` carry the
  injector's port id in their events (the echoes the daemon must not send back), changes
  made by the test's "packets" (:meth:`FakeKernel.add`, :meth:`FakeKernel.modify`,
  :meth:`FakeKernel.remove`) carry port id 0;
* a subscriber whose queue exceeds ``buffer_events`` loses the event and reads one
  :class:`~replicator.kernel.Overrun` next, before the events still queued, as a socket
  reports ENOBUFS; :meth:`FakeKernel.overrun` forces that at once;
* the status sent on upsert can only grow and always gets CONFIRMED; deleting a missing
  entry counts as applied; beyond ``max_entries`` a create fails with ENOMEM.

Dumps take their snapshot, then call the optional :attr:`FakeKernel.during_dump` hook
before returning, so tests can change the table *while* a dump is in flight.
"""

from __future__ import annotations

import errno
import itertools
from collections.abc import Awaitable, Callable, Iterable, Sequence
from types import TracebackType
from typing import Any

import trio

from . import record as R
from .ctnetlink import takes_record_path
from .errors import KernelError
from .external import commit_entry
from .kernel import AnyEvent, EntryError, EventBatch, InjectResult, Overrun
from .model import CtEvent, Entry, EntryKey, EventKind, NewRecord, Status

#: Status bits an upsert can add (everything else is the kernel's business).
SETTABLE_STATUS = Status.SEEN_REPLY | Status.ASSURED | Status.FIXED_TIMEOUT | Status.HELPER


class FakeSubscription:
    """One subscriber's event queue; iterate it for batches (see :class:`FakeKernel`)."""

    def __init__(self, kernel: FakeKernel, buffer_events: int | None) -> None:
        self._kernel = kernel
        self._buffer = buffer_events
        self._queue: list[CtEvent] = []
        self._lost = 0
        self._undecodable: list[str] = []
        self._closed = False
        self._wakeup = trio.Event()
        self.ignore_portid = 0
        self.ignored = 0
        self.records = False
        self._muted = False
        #: Raised by the next read (:meth:`FakeKernel.fail_event_sockets`).
        self._error: KernelError | None = None

    def mute_changes(self, muted: bool) -> None:
        """Stop or resume receiving NEW and UPDATE events (DESTROY keeps coming)."""
        self._muted = muted

    def _push(self, event: CtEvent) -> None:
        if self._muted and event.kind is not EventKind.DESTROY:
            return
        if self.ignore_portid and event.portid == self.ignore_portid:
            self.ignored += 1
            return
        if self._buffer is not None and len(self._queue) >= self._buffer:
            self._lost += 1
        else:
            self._queue.append(event)
        self._wakeup.set()

    def _force_overrun(self) -> None:
        self._lost += len(self._queue) + 1
        self._queue.clear()
        self._wakeup.set()

    def __aiter__(self) -> FakeSubscription:
        return self

    async def __anext__(self) -> EventBatch:
        while True:
            if self._closed:
                raise StopAsyncIteration
            if self._error is not None:
                # Like the Linux port: a socket error other than ENOBUFS; the events
                # queued are never read.
                await trio.lowlevel.checkpoint()
                raise self._error
            if self._lost or self._undecodable:
                # Like ENOBUFS: one error for the whole loss, then the queued events;
                # like the Linux port, undecodable datagrams are skipped and reported.
                lost = Overrun(min(self._lost, 1), len(self._undecodable),
                               self._undecodable[-1] if self._undecodable else "")
                self._lost = 0
                self._undecodable = []
                await trio.lowlevel.checkpoint()
                return lost
            if self._queue:
                batch: list[AnyEvent] = []
                batch += self._queue
                self._queue = []
                if self.records:
                    # As the Linux subscription delivers them (see Subscription.records).
                    now = trio.current_time()
                    batch = [
                        NewRecord(R.new_event_record(e.entry, now),
                                  e.portid)
                        if type(e) is CtEvent and e.kind is EventKind.NEW
                        and takes_record_path(e.entry.orig.proto) else e
                        for e in batch
                    ]  # fmt: skip
                await trio.lowlevel.checkpoint()
                return batch
            self._wakeup = trio.Event()
            await self._wakeup.wait()

    async def aclose(self) -> None:
        """Stop the subscription (iteration ends)."""
        self._closed = True
        self._wakeup.set()
        self._kernel._subscribers.discard(self)
        await trio.lowlevel.checkpoint()

    async def __aenter__(self) -> FakeSubscription:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()


def _update_event(old: Entry, new: Entry) -> Entry:
    """The partial entry an UPDATE event carries for a change ``old`` -> ``new``."""
    labels = new.labels if new.labels != old.labels else None
    mark = new.mark if (new.mark or new.mark != old.mark) else None
    return new._replace(labels=labels, mark=mark)


class FakeKernel:
    """An in-memory conntrack table behind the kernel port (see the module doc)."""

    def __init__(self, *, injector_portid: int = 4242, buffer_events: int | None = None,
                 max_entries: int | None = None) -> None:
        self._portid = injector_portid
        self._buffer_events = buffer_events
        self._max_entries = max_entries
        self._table: dict[EntryKey, Entry] = {}
        self._subscribers: set[FakeSubscription] = set()
        self._ids = itertools.count(1)
        #: Awaited by :meth:`dump` after it took its snapshot (tests set it).
        self.during_dump: Callable[[], Awaitable[None]] | None = None
        #: Number of dumps served.
        self.dumps = 0
        #: Subscriptions served.
        self.subscriptions = 0
        #: How many of the next :meth:`subscribe` calls fail (tests set it).
        self.refuse_subscriptions = 0

    # -- the port -------------------------------------------------------------------

    @property
    def injector_portid(self) -> int:
        """Port id carried by the events of :meth:`upsert` and :meth:`delete`."""
        return self._portid

    def subscribe(self) -> FakeSubscription:
        """A live subscription (events from now on), iterated for batches; raises
        :class:`KernelError` (ENOMEM) while :attr:`refuse_subscriptions` counts down."""
        if self.refuse_subscriptions:
            self.refuse_subscriptions -= 1
            raise KernelError("event socket: Cannot allocate memory", errno.ENOMEM)
        self.subscriptions += 1
        sub = FakeSubscription(self, self._buffer_events)
        self._subscribers.add(sub)
        return sub

    async def dump(self) -> list[Entry]:
        """A snapshot of the table; :attr:`during_dump` runs before it is returned."""
        snapshot = list(self._table.values())
        self.dumps += 1
        await trio.lowlevel.checkpoint()
        if self.during_dump is not None:
            await self.during_dump()
        return snapshot

    async def upsert(self, entries: Sequence[Entry]) -> InjectResult:
        """Create or update each entry; events carry :attr:`injector_portid`."""
        errors: list[EntryError] = []
        applied = 0
        for entry in entries:
            if entry.key not in self._table and self._full():
                errors.append(EntryError(entry, errno.ENOMEM))
                continue
            self._upsert(entry)
            applied += 1
        await trio.lowlevel.checkpoint()
        return InjectResult(applied, errors)

    async def upsert_records(self, records: Sequence[bytes], now: float, *,
                             no_timeout: int | None = None, tcp_flags: int = 0,
                             existing: Sequence[bytes] = (), takeover: bool = False
                             ) -> InjectResult:
        """:meth:`upsert` of the records' entries (see the port's doc)."""
        return await self.upsert([commit_entry(r, now, no_timeout=no_timeout,
                                               tcp_flags=tcp_flags)
                                  for r in (*records, *existing)])

    async def delete(self, entries: Sequence[Entry]) -> InjectResult:
        """Delete each entry; a missing one counts as applied."""
        for entry in entries:
            self._remove(entry.key, self._portid)
        await trio.lowlevel.checkpoint()
        return InjectResult(len(entries), [])

    async def aclose(self) -> None:
        """End every subscription."""
        for sub in list(self._subscribers):
            await sub.aclose()

    # -- the test's side: what packets would do ---------------------------------------

    @property
    def table(self) -> dict[EntryKey, Entry]:
        """A copy of the table."""
        return dict(self._table)

    def add(self, entry: Entry) -> Entry:
        """Create (or replace) an entry as traffic would: a NEW event with port id 0."""
        stored = self._complete(entry)
        self._table[stored.key] = stored
        self._emit(EventKind.NEW, stored, 0)
        return stored

    def modify(self, key: EntryKey, **fields: Any) -> Entry:
        """Change fields of an existing entry as traffic would: a partial UPDATE event."""
        old = self._table[key]
        new = old._replace(**fields)
        self._table[key] = new
        self._emit(EventKind.UPDATE, _update_event(old, new), 0)
        return new

    def remove(self, key: EntryKey) -> None:
        """Delete an entry as its expiry would: a DESTROY event with port id 0."""
        self._remove(key, 0)

    def add_many(self, entries: Iterable[Entry]) -> None:
        """:meth:`add` for each entry."""
        for entry in entries:
            self.add(entry)

    def overrun(self) -> None:
        """Make every subscriber lose its queued events and read an Overrun next."""
        for sub in self._subscribers:
            sub._force_overrun()

    def fail_event_sockets(self, number: int = errno.EIO) -> None:
        """Make every subscriber's next read raise :class:`KernelError` (``number``), as a
        socket error other than ENOBUFS would; the subscription is no use afterwards."""
        for sub in self._subscribers:
            sub._error = KernelError(f"event socket: {errno.errorcode[number]}", number)
            sub._wakeup.set()

    def undecodable_event(self, reason: str = "malformed ctnetlink message") -> None:
        """Make every subscriber read an event it cannot decode (reported as an
        :class:`~replicator.kernel.Overrun` with ``undecodable``, ``reason``)."""
        for sub in self._subscribers:
            sub._undecodable.append(reason)
            sub._wakeup.set()

    # -- internals ----------------------------------------------------------------------

    def _full(self) -> bool:
        return self._max_entries is not None and len(self._table) >= self._max_entries

    def _complete(self, entry: Entry) -> Entry:
        """What the kernel stores for a new entry: confirmed, mark 0, an id."""
        return entry._replace(
            status=entry.status | Status.CONFIRMED,
            mark=entry.mark or 0,
            timeout=entry.timeout if entry.timeout is not None else 120,
            id=next(self._ids),
        )

    def _upsert(self, entry: Entry) -> None:
        old = self._table.get(entry.key)
        if old is None:
            stored = self._complete(entry._replace(status=entry.status & SETTABLE_STATUS))
            self._table[stored.key] = stored
            self._emit(EventKind.NEW, stored, self._portid)
            return
        new = old._replace(
            status=old.status | (entry.status & SETTABLE_STATUS),
            timeout=entry.timeout if entry.timeout is not None else old.timeout,
            mark=entry.mark if entry.mark is not None else old.mark,
            labels=entry.labels if entry.labels is not None else old.labels,
            tcp=entry.tcp if entry.tcp is not None else old.tcp,
        )
        self._table[new.key] = new
        self._emit(EventKind.UPDATE, _update_event(old, new), self._portid)

    def _remove(self, key: EntryKey, portid: int) -> None:
        old = self._table.pop(key, None)
        if old is not None:
            self._emit(EventKind.DESTROY, old._replace(timeout=None, labels=None), portid)

    def _emit(self, kind: EventKind, entry: Entry, portid: int) -> None:
        event = CtEvent(kind, entry, portid)
        for sub in self._subscribers:
            sub._push(event)
