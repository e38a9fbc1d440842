"""The kernel port: the one interface between replicator and the kernel's conntrack table.

Two implementations stand behind it: :mod:`replicator.kernel_linux` (raw ctnetlink
sockets driven by trio) and :mod:`replicator.kernel_fake` (an in-memory table, so the
daemon's logic can be tested end to end without root). Everything above this module
(the mirror, the sync layer, the daemon) talks only to :class:`KernelPort`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Protocol

from .linkpolicy import Backoff
from .model import CtEvent, Entry, NewRecord

#: How a kernel operation the daemon outlives (a re-read of the table, a hot standby's
#: write) is tried again after failing as a whole: after 1 s, doubling up to 30 s
#: (:meth:`~replicator.linkpolicy.Backoff.capped`: no jitter, one node's own kernel).
KERNEL_RETRY = Backoff(initial=1.0, maximum=30.0)


class EntryError(NamedTuple):
    """One entry the kernel refused, with the kernel's errno (e.g. ENOMEM, EEXIST)."""

    entry: Entry
    errno: int


class InjectResult(NamedTuple):
    """Outcome of a batched write: how many entries were applied, and every failure."""

    applied: int
    errors: list[EntryError]


class Overrun(NamedTuple):
    """Events were lost and a resync is needed: the event socket overflowed (ENOBUFS),
    or datagrams could not be decoded (skipped whole: a truncated or malformed event
    is never guessed at)."""

    #: How many ENOBUFS errors this marker stands for (named so as not to shadow
    #: ``tuple.count``).
    enobufs: int
    #: Datagrams skipped because they could not be decoded.
    undecodable: int = 0
    #: Why the last of them could not be (empty if none).
    reason: str = ""


#: One event of a subscription: NEW events may come as records (see
#: :attr:`Subscription.records`).
AnyEvent = CtEvent | NewRecord
#: What an event subscription yields: a batch of events drained from the socket in one
#: wake-up, or an :class:`Overrun` marker.
EventBatch = list[AnyEvent] | Overrun


class Subscription(Protocol):
    """A live event subscription: iterate it for batches, close it when done."""

    #: Events caused by this netlink port id are dropped unread (0: none). The mirror
    #: sets it to the injector's port id while a commit writes a whole table whose
    #: echoes would only be decoded to be superseded by the dump that follows, and for
    #: good on a hot standby (its writer reports what it wrote instead). The Linux port
    #: has the kernel drop them (a socket filter).
    ignore_portid: int
    #: How many events were dropped because of :attr:`ignore_portid` on reading (the
    #: Linux port: only those queued before it was set; the kernel drops the rest).
    ignored: int
    #: Deliver NEW events as :class:`~replicator.model.NewRecord` where the entry's
    #: record can be packed without building the entry (the mirror stores records:
    #: a burst of new connections then costs one unpack and one pack per entry).
    records: bool

    def mute_changes(self, muted: bool) -> None:
        """Stop (``True``) or resume receiving NEW and UPDATE events (DESTROY events
        keep coming). While muted the kernel sends none, and need not build any: a
        commit of a whole table is then about a quarter faster than with its echoes
        dropped on arrival. Events of others are lost meanwhile; the caller re-reads
        the kernel afterwards."""
        ...

    def __aiter__(self) -> Subscription: ...

    async def __anext__(self) -> EventBatch: ...

    async def aclose(self) -> None:
        """Stop listening (close the socket); iteration ends."""
        ...


class KernelPort(Protocol):
    """Read, watch and write one network namespace's conntrack table."""

    @property
    def injector_portid(self) -> int:
        """Netlink port id of the injecting socket: events carrying it are our echoes."""
        ...

    def subscribe(self) -> Subscription:
        """Subscribe to NEW/UPDATE/DESTROY events.

        The subscription is live when this returns (before the first ``__anext__``),
        so a dump taken afterwards misses nothing: subscribe first, then dump.
        """
        ...

    async def dump(self) -> list[Entry]:
        """Every entry of the table (full entries), on a socket of its own."""
        ...

    async def upsert(self, entries: Sequence[Entry]) -> InjectResult:
        """Create each entry (with its NAT), or update it if it exists. Batched.

        Masters are installed before the entries related to them.
        """
        ...

    async def upsert_records(self, records: Sequence[bytes], now: float, *,
                             no_timeout: int | None = None, tcp_flags: int = 0,
                             existing: Sequence[bytes] = (), takeover: bool = False
                             ) -> InjectResult:
        """:meth:`upsert` of the entries of external-cache records (a commit) as
        :func:`replicator.external.commit_entry` makes them at ``now``; the usual
        entries are written straight from their records (a takeover's whole table).

        ``existing`` are more records, of entries the kernel is believed to hold
        already (a node that was master not long ago keeps its entries, timers
        shortened): they are written as updates first, which saves a refused create
        each. The belief only makes it faster: a create that finds its entry is
        updated, an update that finds none creates it. ``records`` are written first.

        ``takeover``: the write has the node to itself (a promotion's commit), so the
        port may keep its threads on CPUs of their own meanwhile (see
        :mod:`replicator.cpus`; a hot standby's writes share the CPUs with its
        receiving and must not)."""
        ...

    async def delete(self, entries: Sequence[Entry]) -> InjectResult:
        """Delete each entry (by family, zone and original tuple). Batched.

        An entry that is already gone (ENOENT) counts as applied, not as an error.
        """
        ...

    async def aclose(self) -> None:
        """Close every socket."""
        ...
