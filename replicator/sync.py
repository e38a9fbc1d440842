"""The sync protocol as a pure state machine (sans-IO): one object per peer.

Theory of operation
===================

What is replicated
------------------
The protocol is symmetric, as in conntrackd: every node streams *its own* conntrack
table (its "local table", fed by the caller from kernel events and dumps) to the peer,
and keeps the peer's table in an :class:`~replicator.external.ExternalCache`. Roles
(MASTER/BACKUP) do not exist here; they only decide what the daemon does with the
external cache (commit it on takeover, or keep the kernel loaded all the time). So
each :class:`SyncSession` is a *sender* of one table and a *receiver* of the other,
and the two halves hardly interact.

The caller drives everything (aioquic style)::

    s = SyncSession(node_id, epoch, params=SyncParams(...), accept=entry_filter)
    s.connection_made(now)            # transport up (after TLS)
    s.receive(payload, now)           # one frame's payload from the peer
    s.local_update(entry, now)        # this node's table changed (full entry)
    s.local_delete(key_or_entry, now)
    s.local_snapshot(entries, now)    # the whole local table (after a dump/reconcile)
    s.handle_timer(now)               # when now >= s.next_timer()
    s.request_resync(now)             # conntrackd -n: ask the peer for everything
    s.bulk_send(now)                  # conntrackd -B: send everything to the peer
    s.connection_lost(now)            # transport down (also after ConnectionTerminated)
    for payload in s.frames_to_send(now): ...   # frame and write them, in order
    while (ev := s.next_event()) is not None: ...
    s.next_timer()                    # when to call handle_timer next (or None)

``now`` is seconds on this node's monotonic clock. Nothing here reads a clock, opens a
socket or raises on bad input from the peer: malformed or illegal input becomes a
:class:`ProtocolViolation` event, a CLOSE message in ``frames_to_send`` and a
:class:`ConnectionTerminated` event, after which the daemon closes the transport and
calls ``connection_lost``. After calling any input method, call ``frames_to_send``
and drain the events.

Connection and handshake
------------------------
On ``connection_made`` each side sends HELLO: protocol version (checked hard), node id,
epoch, bucket count, and the first *stream* id it will use. The epoch is chosen by the
caller at every start (random 64 bits): a peer whose epoch changed has restarted and
lost its external cache and its queues, while its local table (the kernel's) survived.
Nothing but HELLO is sent before the peer's HELLO has arrived. HELLO is repeated every
``ack_timeout`` until the peer acknowledges anything (so it survives a lossy link).

The reliable ordered stream
---------------------------
The transport is TCP: reliable while connected, but connections break and every
message in flight then is lost. The session does not rely on more than that, and is
also correct on a link that drops, duplicates, reorders and delays single messages
(the property tests use such a link).

Every message except HELLO, CLOSE and ACK carries ``(stream, seq)``. The receiver
applies a message only if it is the next one, ``seq == next`` of the current stream; a
duplicate or an older stream's message is ignored, a gap is ignored and answered by a
NACK. ACK ``(stream, next)`` is cumulative. When no acknowledgement arrives for
``ack_timeout`` (doubling on repetition), or on a NACK, the sender *goes back*: it
forgets the unacknowledged messages, starts a fresh stream id with seq 0 and re-queues
what they carried. The receiver switches to a higher stream as soon as it sees it and
ignores older streams from then on, so a late message of an abandoned stream can never
be applied after newer data. Stream ids grow monotonically over the session's life; a
HELLO announces the first one used on a connection.

What gets re-queued is never a copy of old bytes but *the key, the bucket or the
request* the message was about: when it is sent again it carries the table's state at
that moment. This is what makes go-back, coalescing and resync compose: the newest
state always wins, and nothing is lost, because a key stays owed to the peer until a
message carrying it has been acknowledged.

Coalescing and bounds (nothing is ever dropped)
-----------------------------------------------
A local change only marks its key *pending* (``dict key -> time of the first unsent
change``). The entry itself is read from the local table when a CHANGES message is
built, so a burst of updates to M entries leaves at most M pending keys, and a key
whose entry is gone at send time is sent as a delete. At most ``window`` entries are
unacknowledged at a time; beyond that changes simply wait, coalesced, in pending.

Pending can still grow with churn (keys created and deleted while the peer is slow or
away). When it would exceed ``max_pending`` keys, the keys are *folded* into their
buckets: the buckets are marked dirty and the keys forgotten. A dirty bucket is later
sent whole, as BUCKETS records that *replace* the receiver's copy of that bucket
(entries absent from it are deleted there). Memory is bounded by the table plus the
bucket count, and no change is lost: conntrackd silently drops its oldest queued
message in that situation; this protocol degrades to a resync of the affected part.

Buckets and digests
-------------------
Both tables are split into ``buckets`` buckets by a stable hash of the key
(:mod:`replicator.digest`); a bucket's digest covers every replicated field except
the timeout (which decays) and the conntrack id. A bucket larger than one message is
sent in parts: the first part starts a replacement (the receiver notes the keys it
holds in that bucket), every part and every individual upsert meanwhile confirms
keys, and the last part deletes the keys left unconfirmed. The parts are cut from the
list of keys the bucket held when its first part was sent; keys added later are
pending and travel as CHANGES, after the first part.

Resync
------
A resync is run by the *sender* of a table, identified by a resync id:

1. RESYNC_BEGIN(id, full). Unless ``full``, the receiver replies with SUMMARY messages
   holding the digest of every bucket of its external cache.
2. The sender compares each digest with its own and marks the differing buckets dirty
   (``full``: every bucket, empty ones included, without comparing).
3. Dirty buckets are sent as BUCKETS, interleaved with ordinary CHANGES (held back
   while the digests are awaited: most pending keys will travel inside the differing
   buckets, and a pending key whose bucket is dirty is left to the bucket).
4. When every summary has arrived and no bucket is dirty or half sent: RESYNC_DONE(id).

Why comparing against a summary of any age is safe: the receiver's cache only changes
by applying a prefix of the sender's stream (and by expiry). If a bucket's digest as
of some prefix equals the sender's bucket now, every key in it is either equal on both
sides or pending/in flight, in which case the stream will deliver its newest state.
If not equal, the bucket is resent whole. Expiry on the receiver only removes
entries, which shows up as a difference.

Every connection starts with a digest resync in each direction: after a short outage
only the buckets that changed travel, so catching up costs in proportion to what
changed, not to the table size; a restarted peer has an empty cache, so the digests
make the same mechanism a full transfer. The same resync runs every
``anti_entropy_interval`` as anti-entropy. A full resync runs on ``bulk_send``
(conntrackd ``-B``) or when the peer asks for it with RESYNC_REQUEST
(``request_resync``, conntrackd ``-n``); the wish survives a disconnection until the
full resync has completed (or the request has been acknowledged).

Repeated requests coalesce, so that neither an operator nor a peer repeating them can
grow the queues. A request (ours or the peer's) finds a resync of ours whose
RESYNC_BEGIN is still queued, and which does at least as much (full, or the request is
for a digest resync), already covering it: everything that resync sends will leave
after the request arrived. Any other request starts a new resync that supersedes the
running one (a resync whose BEGIN has left may already have sent buckets the peer has
since discarded, as ``replicator flush`` does), and the superseded BEGIN is dropped
from the queue. On the receiving side a RESYNC_BEGIN with the id of the running
resync is a resend (the summaries it asks for are queued, in flight or delivered, and
our own stream resends them if they are lost) and changes nothing; one with a new id
supersedes the previous resync, whose SUMMARY messages still queued are dropped (the
peer ignores them). A SUMMARY for a resync that is no longer running is not sent. Our
own RESYNC_REQUEST is queued at most once, and only the acknowledgement of a copy sent
after the latest ``request_resync`` ends the wish.

The receiver reports :class:`InSync` ``True`` at the first RESYNC_DONE of a connection
(its cache then equals the peer's table, modulo changes still streaming) and ``False``
when the connection is lost. This is what a node should wait for before it accepts
to become master (pfsync lowers its CARP priority until its bulk update is complete).

Timeouts and expiry
-------------------
Every entry travels with its *remaining* timeout, computed when the message is built
(``ceil(deadline - now)``, at least 1, where the deadline is the time of the last local
observation plus the timeout then observed), and the receiver stores an absolute deadline on its
own clock; clocks never need to agree. Entries expire in the external cache at their
deadline unless refreshed. Since kernels do not report timeout refreshes as events,
refreshed timeouts reach the session only through ``local_update``/``local_snapshot``
with a new timeout; such a change alone (the fingerprint is unchanged) is sent only
when the peer's copy has less than half of the entry's remaining lifetime left (a
refresh timer fires then), which keeps refresh traffic proportional to the half-life
of entries rather than to the dump rate.

Filters
-------
``accept`` (see :mod:`replicator.filters`) is applied to every local entry; an entry
that does not pass is treated as absent from the local table, so one that stops
matching is deleted on the peer.

Lag
---
Clocks differ between nodes, so lag is measured on the sender only: the time from a
local change to the acknowledgement of the message that carried it
(``stats.ack_lag_last``/``ack_lag_max``), and the age of the oldest change not yet
acknowledged (:meth:`SyncSession.replication_lag`), which grows without bound if
replication silently stops.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice, repeat
from operator import itemgetter
from typing import Literal, NamedTuple

from . import record as R
from . import wire
from .digest import BucketTable, check_bucket_count, pack_digests, unpack_digests
from .errors import WireDecodeError, WireVersionError
from .external import ExternalCache
from .model import Entry, EntryKey
from .peerclock import PeerClock
from .wheel import TimerWheel

_INF = math.inf
#: Below this many changes (local_changes) or entries (a CHANGES message received),
#: they are taken one by one, not as a batch (as fast).
_MIN_BATCH = 16
#: Seconds by which the deadline the peer was told may exceed the entry's before it is
#: corrected (whole-second rounding and the jitter between two reads of a timeout).
#: Measured against ``told``, which may be up to :data:`TOLD_SLACK` below what the peer
#: holds: a copy may outlive its original by that much more before the correction.
_OVERTOLD = 2.0
#: A ``told`` at most this far below the deadline being sent counts as current: the
#: record is not restamped. A NEW event's record comes with its own deadline as
#: ``told`` (:func:`replicator.record.new_event_record`), and its first send tells the
#: peer the same deadline rounded up to whole seconds from a later time, i.e. less than
#: a second later. So ``told`` is never above what the peer was told (which would delay
#: a refresh past the peer's expiry) and at most this much below it.
TOLD_SLACK = 1.0
_U64 = (1 << 64) - 1
#: Buckets whose digests travel in one SUMMARY message.
SUMMARY_CHUNK = wire.MAX_SUMMARY_DIGESTS
#: The go-back timeout doubles on every repetition, up to this multiple of ack_timeout.
_MAX_BACKOFF = 8
#: Rebuild the refresh wheel when it holds this many more keys than the local table.
_WHEEL_SLACK = 1024
#: Called with (key, old record, new record) when the session re-stamps a record's
#: ``told``: the owner of a store sharing the records replaces its copy.
Restamped = Callable[[bytes, bytes, bytes], None]


def _clock(now: float) -> int:
    """``now`` as the ``sent`` field of a message (whole ms; a clock never reads
    below 0 in the daemon, and the wire field is unsigned)."""
    return max(0, int(now * 1000.0))


@dataclass(frozen=True)
class SyncParams:
    """Tunables of a session. Both nodes must use the same ``buckets``."""

    #: Digest buckets (a power of two).
    buckets: int = 4096
    #: Entries plus keys (plus bucket records) per CHANGES/BUCKETS message.
    batch: int = 512
    #: Unacknowledged entries in flight before sending pauses.
    window: int = 16384
    #: Pending keys beyond which they are folded into dirty buckets.
    max_pending: int = 262144
    #: Seconds without acknowledgement progress before going back and resending.
    ack_timeout: float = 4.0
    #: Seconds the ACK of in-order CHANGES/BUCKETS/control messages may wait, so that
    #: one covers several (0: sent with the next frames, as every other ACK). It goes
    #: once the peer has sent nothing for a quarter of that, at once with any other
    #: frame this node sends, and once the entries it would cover reach a quarter of
    #: ``window`` (a sender in a burst is never held back by it for long). Why: at a
    #: steady rate each message got its own ACK, and sending, receiving and handling
    #: them was a fifth of each daemon's CPU (measured at 10 k new entries/s arriving
    #: 10 per ms). A NACK, the ACK of a duplicate or repeated HELLO and a keepalive
    #: are never delayed.
    ack_delay: float = 0.0
    #: Send an ACK (keepalive) when nothing was sent for this long.
    keepalive_interval: float = 1.0
    #: Close the connection when nothing was received for this long.
    dead_interval: float = 10.0
    #: Seconds between anti-entropy digest resyncs (None: never).
    anti_entropy_interval: float | None = 300.0
    #: The node id the peer must announce (None: any id but ours).
    peer_node_id: str | None = None
    #: The transport delivers every payload, in order, while a connection lives (TCP).
    #: A missing ACK then means a slow peer, not a lost message: the ack timeout only
    #: backs off and counts (``slow_acks``) instead of resending everything in flight,
    #: which on a busy peer multiplied the work exactly when it was behind. Resends
    #: still follow a NACK or a new connection. False for lossy links (the tests').
    ordered_link: bool = False
    #: While the peer is connected, an external entry whose deadline passes is kept
    #: this many seconds more instead of expiring (0: expire at the deadline). The
    #: peer reports every delete while connected, and the kernel reports no event
    #: when packets refresh a timeout, so a copy past its deadline is most likely of a
    #: connection the peer refreshed and has not re-read yet. Without the peer,
    #: entries expire at their deadline as always.
    expiry_hold: float = 0.0

    def __post_init__(self) -> None:
        check_bucket_count(self.buckets)
        if not 2 <= self.batch <= wire.MAX_ITEMS:
            raise ValueError(f"batch must be within 2..{wire.MAX_ITEMS}")
        if self.window < 1 or self.max_pending < 1:
            raise ValueError("window and max_pending must be positive")
        if not 0 < self.keepalive_interval < self.dead_interval:
            raise ValueError("need 0 < keepalive_interval < dead_interval")
        if self.ack_timeout <= 0:
            raise ValueError("ack_timeout must be positive")
        if not 0 <= self.ack_delay < self.ack_timeout:
            raise ValueError("need 0 <= ack_delay < ack_timeout")
        if self.expiry_hold < 0:
            raise ValueError("expiry_hold must not be negative")
        if self.anti_entropy_interval is not None and self.anti_entropy_interval <= 0:
            raise ValueError("anti_entropy_interval must be positive or None")
        if self.peer_node_id is not None:
            _check_node_id(self.peer_node_id)


def _check_node_id(node_id: str) -> None:
    if not 1 <= len(node_id) <= wire.MAX_NODE_ID:
        raise ValueError(f"node id must have 1..{wire.MAX_NODE_ID} characters")


# --- events -------------------------------------------------------------------------

Direction = Literal["send", "receive"]


class PeerHello(NamedTuple):
    """The peer identified itself. ``restarted``: its epoch differs from the last one
    seen (it lost its external cache; the resync will send it everything)."""

    node_id: str
    epoch: int
    restarted: bool


class PeerUpserts(NamedTuple):
    """Entries the peer created or changed (or copies held past their deadline), as
    the external cache now holds them: records of :mod:`replicator.record` whose
    deadline is when each copy runs out on this node's clock."""

    records: tuple[bytes, ...]
    #: This node's clock when the timeouts were current: the peer built the message
    #: then, as far as this node can tell (:mod:`replicator.peerclock`); a message read
    #: late does not make copies outlive the originals.
    since: float
    #: The records' packed keys in the same order, when the session had them at hand
    #: (a hot standby's writer then need not read them again); None otherwise.
    keys: tuple[bytes, ...] | None = None


class PeerDeletes(NamedTuple):
    """Entries removed from the external cache: deleted by the peer, or ``expired``."""

    entries: tuple[Entry, ...]
    expired: bool


class ResyncStarted(NamedTuple):
    """A resync began: of our table to the peer (``send``) or of the peer's to us."""

    direction: Direction
    resync_id: int
    full: bool


class ResyncCompleted(NamedTuple):
    """A resync finished (``send``: the peer acknowledged its end). ``buckets`` and
    ``entries``: what was replaced (sent or received) during it."""

    direction: Direction
    resync_id: int
    full: bool
    duration: float
    buckets: int
    entries: int


class InSync(NamedTuple):
    """The external cache became (True) or stopped being (False) a copy of the peer's
    table: True at the first completed resync of a connection, False when it drops."""

    in_sync: bool


class ProtocolViolation(NamedTuple):
    """The peer sent something undecodable or illegal (counted, logged, then closed)."""

    reason: str


class ConnectionTerminated(NamedTuple):
    """The connection must be closed (after sending ``frames_to_send``): we closed it
    because of a violation or a silent peer, or the peer closed it (``by_peer``)."""

    reason: str
    by_peer: bool


Event = (
    PeerHello | PeerUpserts | PeerDeletes | ResyncStarted | ResyncCompleted | InSync
    | ProtocolViolation | ConnectionTerminated
)  # fmt: skip


@dataclass
class SyncStats:
    """Counters (monotonic) and lag measurements of a session."""

    messages_sent: int = 0
    bytes_sent: int = 0
    messages_received: int = 0
    bytes_received: int = 0
    #: Upserts and deletes sent/received (CHANGES and BUCKETS).
    entries_sent: int = 0
    deletes_sent: int = 0
    entries_received: int = 0
    deletes_received: int = 0
    expired: int = 0
    #: External entries past their deadline kept while the peer is connected
    #: (``SyncParams.expiry_hold``), counted each time.
    held: int = 0
    decode_errors: int = 0
    protocol_violations: int = 0
    #: Messages received out of order / twice / from an abandoned stream (ignored).
    out_of_order: int = 0
    duplicates: int = 0
    #: Go-backs: unacknowledged messages requeued and resent.
    retransmits: int = 0
    #: Ack timeouts on an ordered link (``SyncParams.ordered_link``): nothing resent.
    slow_acks: int = 0
    #: Times pending keys were folded into dirty buckets (max_pending reached).
    folds: int = 0
    resyncs_sent: int = 0
    resyncs_received: int = 0
    #: Buckets replaced on the peer by resyncs and folds.
    buckets_sent: int = 0
    connections: int = 0
    #: Seconds from a local change to the ack of the message carrying it.
    ack_lag_last: float = 0.0
    ack_lag_max: float = 0.0
    #: Seconds the latest (and the slowest since start) CHANGES or BUCKETS message
    #: from the peer waited before this node read it, as estimated from the peer's
    #: clock (:mod:`replicator.peerclock`): a busy receiver.
    receive_lag_last: float = 0.0
    receive_lag_max: float = 0.0


# --- internal records ---------------------------------------------------------------


_BEGIN, _SUMMARY, _DONE, _REQUEST = range(4)


class _Ctl(NamedTuple):
    """A control item to (re)send: BEGIN(id), SUMMARY(id, first), DONE(id), REQUEST."""

    kind: int
    resync_id: int = 0
    first: int = 0


class _Sent(NamedTuple):
    """An unacknowledged sequenced message and what to requeue if it is lost."""

    seq: int
    weight: int
    first_change: float | None
    keys: tuple[bytes, ...]
    buckets: tuple[int, ...]
    control: _Ctl | None


class _SendResync:
    __slots__ = (
        "awaiting", "begin_sent", "buckets", "differing", "done_sent", "entries", "full", "id",
        "started_at",
    )  # fmt: skip

    def __init__(self, rid: int, full: bool, now: float, awaiting: set[int]) -> None:
        self.id = rid
        self.full = full
        self.started_at = now
        #: First buckets of the SUMMARY chunks not received yet.
        self.awaiting = awaiting
        #: The RESYNC_BEGIN has left (False while it is queued, again after a go-back).
        self.begin_sent = False
        #: Buckets whose digest on the peer differed from ours (digest resyncs only).
        self.differing: list[int] = []
        self.done_sent = False
        self.buckets = 0
        self.entries = 0


class _RecvResync:
    __slots__ = ("buckets", "entries", "full", "id", "started_at")

    def __init__(self, rid: int, full: bool, now: float) -> None:
        self.id = rid
        self.full = full
        self.started_at = now
        self.buckets = 0
        self.entries = 0


class _Conn:
    """Everything that lives exactly as long as one connection."""

    def __init__(self, now: float, stream: int, rto: float) -> None:
        self.last_recv = now
        self.last_sent = now
        self.hello_sent_at: float | None = None
        self.hello_acked = False
        self.peer: wire.Hello | None = None
        self.terminated = False
        self.out: list[bytes] = []
        # sending half
        self.stream_base = stream
        self.stream = stream
        self.next_seq = 0
        self.inflight: deque[_Sent] = deque()
        self.inflight_weight = 0
        self.ack_deadline: float | None = None
        self.rto = rto
        self.control: deque[_Ctl] = deque()
        #: Bucket being sent in parts: (bucket, its keys when the first part left,
        #: how many of them are sent, when it became dirty).
        self.sending_bucket: tuple[int, list[bytes], int, float] | None = None
        self.send_resync: _SendResync | None = None
        self.buckets_turn = False
        self.next_anti_entropy: float | None = None
        # receiving half
        self.rstream = 0
        self.rnext = 0
        self.ack_owed = False
        self.nack_owed = False
        #: An ACK put off (SyncParams.ack_delay): when it is due at the latest, and the
        #: weight of the messages it covers so far.
        self.ack_due: float | None = None
        self.ack_first = 0.0
        self.unacked_weight = 0
        self.nacked: tuple[int, int] | None = None
        self.recv_resync: _RecvResync | None = None
        #: Buckets being replaced: keys not confirmed since the first part.
        self.replacing: dict[int, set[bytes]] = {}
        self.synced = False
        self.clock = PeerClock()


class _LocalSnapshot:
    """A snapshot of the local table given in parts (:meth:`SyncSession.begin_local_snapshot`)."""

    __slots__ = ("refilter", "seen", "touched")

    def __init__(self, refilter: bool) -> None:
        self.refilter = refilter
        #: Keys the parts held (and the filter accepted).
        self.seen: set[bytes] = set()
        #: Keys changed by other calls since the snapshot began.
        self.touched: set[bytes] = set()


class _Violation(Exception):
    pass


def _record_filter(accept: Callable[[Entry], bool] | None
                   ) -> Callable[[bytes], bool] | None:
    """``accept`` applied to records: read from the record itself where the filter can
    (:meth:`~replicator.filters.EntryFilter.accepts_record`), else from its entry."""
    if accept is None:
        return None
    by_record: Callable[[bytes], bool] | None = getattr(accept, "accepts_record", None)
    if by_record is not None:
        return by_record
    return lambda record: accept(R.unpack(record))


def _records_filter(accept: Callable[[Entry], bool] | None
                    ) -> Callable[[list[bytes]], bytes] | None:
    """``accept``'s verdicts on many records at once (one byte each, 1: accepted), if
    the filter offers them (:meth:`~replicator.filters.EntryFilter.verdicts`)."""
    return None if accept is None else getattr(accept, "verdicts", None)


class SyncSession:
    """The sync protocol with one peer (see the module docstring)."""

    def __init__(
        self,
        node_id: str,
        epoch: int,
        *,
        params: SyncParams | None = None,
        accept: Callable[[Entry], bool] | None = None,
        restamped: Restamped | None = None,
    ) -> None:
        _check_node_id(node_id)
        if not 0 <= epoch <= _U64:
            raise ValueError("epoch must be a 64-bit unsigned integer")
        self.node_id = node_id
        self.epoch = epoch
        self.params = params if params is not None else SyncParams()
        self._accept = accept
        self._accept_record = _record_filter(accept)
        self._accept_records = _records_filter(accept)
        self._restamped = restamped
        self._snapshot: _LocalSnapshot | None = None
        self._buckets = self.params.buckets
        #: The peer's table as last heard (read it; the session maintains it).
        self.external = ExternalCache(self._buckets)
        self.stats = SyncStats()
        #: The local table, bucketed like the peer's copy of it: one record per entry
        #: (:mod:`replicator.record`), whose header holds the local deadline
        #: (observation time + observed timeout) and ``told``, the deadline the peer
        #: was last told (-inf: never).
        self._table = BucketTable(self._buckets)
        #: Keys whose timeout-only refresh is due (checked against their record).
        self._refresh = TimerWheel()
        self._pending: dict[bytes, float] = {}
        self._dirty: dict[int, float] = {}
        self._events: deque[Event] = deque()
        self._conn: _Conn | None = None
        self._next_stream = 0
        self._next_resync = 0
        self._peer_epoch: int | None = None
        self.peer_node_id: str | None = None
        self._want_full_to_peer = False
        self._want_full_from_peer = False
        #: Buckets found different on the peer by the last completed digest resync of
        #: our table (``replicator verify`` lists their entries).
        self.last_differing_buckets: tuple[int, ...] = ()
        #: Counts request_resync calls: a RESYNC_REQUEST carries the count when it
        #: leaves, and only the acknowledgement of one sent after the latest call
        #: satisfies the wish.
        self._request_gen = 0

    # --- read-only state -----------------------------------------------------------

    @property
    def connected(self) -> bool:
        """A connection is up (``connection_made`` without ``connection_lost``)."""
        return self._conn is not None

    @property
    def established(self) -> bool:
        """Both HELLOs exchanged and the connection not terminated."""
        c = self._conn
        return c is not None and c.peer is not None and not c.terminated

    @property
    def in_sync(self) -> bool:
        """The external cache is a copy of the peer's table (see :class:`InSync`)."""
        c = self._conn
        return c is not None and c.synced and not c.terminated

    @property
    def peer_epoch(self) -> int | None:
        """The epoch the peer announced last (None: never heard from it)."""
        return self._peer_epoch

    @property
    def local_count(self) -> int:
        """Entries in the local table (after filtering)."""
        return len(self._table)

    @property
    def pending_count(self) -> int:
        """Keys waiting to be sent (coalesced)."""
        return len(self._pending)

    @property
    def dirty_buckets(self) -> int:
        """Buckets waiting to be sent whole."""
        return len(self._dirty)

    @property
    def inflight(self) -> int:
        """Entries (and control messages) sent and not yet acknowledged."""
        return self._conn.inflight_weight if self._conn is not None else 0

    @property
    def send_idle(self) -> bool:
        """Established, and nothing owed to the peer: no pending key or dirty bucket,
        nothing unacknowledged, no resync of ours running, HELLO acknowledged."""
        c = self._conn
        return (
            c is not None and c.peer is not None and not c.terminated and c.hello_acked
            and not self._pending and not self._dirty and not c.inflight
            and not c.control and c.sending_bucket is None and c.send_resync is None
            and not self._want_full_from_peer
        )  # fmt: skip

    def replication_lag(self, now: float) -> float:
        """Age of the oldest local change not yet acknowledged by the peer (0: none).

        O(pending keys): meant for metrics scrapes, not for the hot path.
        """
        oldest = min(self._pending.values(), default=_INF)
        oldest = min(oldest, min(self._dirty.values(), default=_INF))
        if self._conn is not None:
            for s in self._conn.inflight:
                if s.first_change is not None and s.first_change < oldest:
                    oldest = s.first_change
        return 0.0 if oldest == _INF else max(0.0, now - oldest)

    def local_bucket(self, bucket: int) -> list[Entry]:
        """The local entries of one digest bucket."""
        return list(map(R.unpack, self._table.bucket(bucket).values()))

    def local_entries(self) -> Iterator[Entry]:
        """The local table as the session holds it (after filtering)."""
        return map(R.unpack, self._table.values())

    # --- events -----------------------------------------------------------------------

    def next_event(self) -> Event | None:
        """The oldest event not yet returned, or None."""
        return self._events.popleft() if self._events else None

    def events(self) -> Iterator[Event]:
        """Drain the events (a generator over :meth:`next_event`)."""
        while self._events:
            yield self._events.popleft()

    def events_if_only(self, kinds: tuple[type, ...]) -> list[Event]:
        """Drain the events if every one is of one of ``kinds``; else drain none (and
        return none), so that they stay in order for :meth:`events`."""
        queued = self._events
        if not all(type(event) in kinds for event in queued):
            return []
        out = list(queued)
        queued.clear()
        return out

    # --- local table ----------------------------------------------------------------

    def local_update(self, entry: Entry, now: float) -> None:
        """This node's table holds ``entry`` (a full entry) as of ``now``."""
        key = R.key(entry)
        if self._snapshot is not None:
            self._snapshot.touched.add(key)
        self._local(key, None, entry, now)

    def local_changes(self, changes: Iterable[tuple[bytes, bytes | None, Entry | None]],
                      now: float) -> None:
        """For each ``(key, record, entry)`` in order: :meth:`local_delete` if
        ``record`` is None, else :meth:`local_record`.

        The internal cache's changes come this way, a batch per read of the event
        socket. A burst of new connections is mostly NEW events of keys this table
        does not hold: those take a short path here (filter, store, mark pending),
        which is most of what the active node does per entry.
        """
        accept_record, add, mark = self._accept_record, self._table.add, self._mark
        # While a snapshot is given in parts, local_record also notes the keys touched.
        snapshot = self._snapshot
        accept_many, verdict = self._accept_records, None
        if snapshot is None and (accept_record is None or accept_many is not None):
            changes = list(changes)
            verdicts = None
            if accept_record is not None and accept_many is not None:
                # The filter's verdicts on the records judged below, all at once (a
                # burst's records by byte column), taken in the same order.
                verdicts = accept_many(
                    [c[1] for c in changes if c[1] is not None and c[2] is None])
                verdict = iter(verdicts).__next__
            if ((verdicts is None or verdicts.count(1) == len(verdicts))
                    and self._new_records(changes, now)):
                return
        for key, record, entry in changes:
            if record is None:
                self.local_delete(key, now)
            elif entry is not None or snapshot is not None:
                self.local_record(key, record, entry, now)
            elif accept_record is not None and not (
                    verdict() if verdict is not None else accept_record(record)):
                self.local_delete(key, now)
            elif add(key, record):
                mark(key, now)
            else:
                self._local(key, record, None, now)

    def _new_records(self, changes: list[tuple[bytes, bytes | None, Entry | None]],
                     now: float) -> bool:
        """:meth:`local_changes` for a batch of only new records of keys not held, no
        key twice, all accepted by the filter (the caller checked that), which a
        burst of new connections is: a step at a time for the whole batch instead of
        a change at a time (0.3 µs per change instead of 0.9), with the same outcome
        (the pending keys in the same order). False, doing nothing, for any other
        batch, or one that would make the pending keys fold (see :meth:`_mark`)."""
        n = len(changes)
        pending = self._pending
        if n < _MIN_BATCH or len(pending) + n > self.params.max_pending:
            return False
        keys, records, entries = zip(*changes, strict=True)
        if (entries.count(None) != n or None in records or len(set(keys)) != n
                or not self._table.add_new(keys, records)):
            return False
        if pending.keys().isdisjoint(keys):
            pending.update(dict.fromkeys(keys, now))
        else:
            # A key pending still (deleted, then new again) keeps its place and time.
            for key in keys:
                pending.setdefault(key, now)
        return True

    def local_record(self, key: bytes, record: bytes, entry: Entry | None, now: float
                     ) -> None:
        """:meth:`local_update` with the packed forms at hand: ``record`` (whose
        deadline is the observation time plus the observed timeout) is stored as is,
        so a cache holding it shares the object (see ``restamped``). ``entry``: the
        same as an :class:`Entry` if the caller has it (the filter then reads it),
        else ``None`` (the filter reads the record)."""
        if self._snapshot is not None:
            self._snapshot.touched.add(key)
        accept_record = self._accept_record
        if entry is None and accept_record is not None and not accept_record(record):
            self.local_delete(key, now)
            return
        self._local(key, record, entry, now)

    def _local(self, key: bytes, record: bytes | None, entry: Entry | None, now: float
               ) -> None:
        """Store an entry given as ``record``, or as ``entry`` (packed here); ``entry``
        None: the caller knows that the filter accepts ``record``."""
        if entry is not None and self._accept is not None and not self._accept(entry):
            self.local_delete(key, now)
            return
        table = self._table
        b = table.bucket_of(key)
        old = table.bucket(b).get(key)
        if old is None:
            if record is None:
                assert entry is not None
                record = R.pack(entry, R.deadline_of(entry[5], now), key=key)
            table.put(b, key, record)
            self._mark(key, now)
            return
        old_deadline, told = R.timing(old)
        if record is None:
            assert entry is not None
            record = R.pack(entry, R.deadline_of(entry[5], now), told, key)
        deadline, carried = R.timing(record)
        if carried != told:
            new = R.with_told(record, told)
            if self._restamped is not None:
                self._restamped(key, record, new)
            record = new
        table.put(b, key, record)
        if not R.same_state(old, record):
            self._mark(key, now)
        elif deadline > told:
            # Only the timeout moved: refresh the peer's copy once it has less than
            # half of the remaining lifetime left, i.e. from 2 * told - deadline on.
            due = 2 * told - deadline
            if due <= now:
                self._mark(key, now)
            elif old_deadline <= told or math.floor(due) != math.floor(2 * told - old_deadline):
                self._schedule_refresh(key, due)
        elif deadline < told - _OVERTOLD:
            # The peer was told a later deadline than the entry has: an event read late
            # (a busy host) dates its timeout from the read, not from the kernel's
            # writing it; a re-dump shows the truth. A copy must not outlive the
            # original, so send the correction now.
            self._mark(key, now)

    def local_delete(self, key: bytes | EntryKey | Entry, now: float) -> None:
        """The entry with this key (packed or not, or this entry's key) left this
        node's table."""
        if not isinstance(key, bytes):
            key = R.key(key) if isinstance(key, Entry) else R.pack_key(key)
        if self._snapshot is not None:
            self._snapshot.touched.add(key)
        table = self._table
        if table.pop(table.bucket_of(key), key) is not None:
            self._mark(key, now)

    def local_snapshot(self, entries: Iterable[Entry], now: float) -> None:
        """This node's whole table as of ``now`` (after a dump or a reconciliation):
        entries not in it are deleted, the others updated."""
        seen = set()
        accept = self._accept
        for e in entries:
            if accept is None or accept(e):
                key = R.key(e)
                seen.add(key)
                self._local(key, None, e, now)
        self._delete_unseen(seen, now)

    def local_snapshot_records(
        self, records: Iterable[tuple[bytes, bytes]], now: float, *, refilter: bool = False
    ) -> None:
        """:meth:`local_snapshot` from ``(packed key, record)`` pairs (e.g. a cache's,
        shared as in :meth:`local_record`): :meth:`begin_local_snapshot`, one
        :meth:`local_snapshot_part` and :meth:`finish_local_snapshot`."""
        self.begin_local_snapshot(refilter=refilter)
        self.local_snapshot_part(records, now)
        self.finish_local_snapshot(now)

    def begin_local_snapshot(self, *, refilter: bool = False) -> None:
        """Start a snapshot of this node's whole table given in parts, so that a large
        table does not stall its owner (the daemon reads events between parts).

        Changes reported between the parts (:meth:`local_update`, :meth:`local_record`,
        :meth:`local_delete`) are newer than the snapshot: the parts skip their keys and
        :meth:`finish_local_snapshot` keeps them. ``refilter``: evaluate every record
        against the filter (a new filter), not only those whose state changed.
        """
        self._snapshot = _LocalSnapshot(refilter)

    def local_snapshot_part(self, records: Iterable[tuple[bytes, bytes]], now: float) -> None:
        """Part of the snapshot begun by :meth:`begin_local_snapshot`, as ``(packed key,
        record)`` pairs.

        The filter only sees the replicated state, so a record whose state equals the
        one held is known to pass it and is not unpacked (a periodic re-dump changes
        little but the timeouts).
        """
        snap = self._snapshot
        if snap is None:
            raise RuntimeError("local_snapshot_part without begin_local_snapshot")
        seen, touched, refilter = snap.seen, snap.touched, snap.refilter
        accept = self._accept
        unpack, same_state, get = R.unpack, R.same_state, self._table.get
        for key, rec in records:
            if key in touched:
                continue
            if accept is not None:
                old = None if refilter else get(key)
                if (old is None or not same_state(old, rec)) and not accept(unpack(rec)):
                    continue
            seen.add(key)
            self._local(key, rec, None, now)

    def finish_local_snapshot(self, now: float) -> None:
        """End the snapshot: local entries in none of its parts, and not reported since
        it began, are deleted."""
        snap, self._snapshot = self._snapshot, None
        if snap is None:
            raise RuntimeError("finish_local_snapshot without begin_local_snapshot")
        self._delete_unseen(snap.seen | snap.touched, now)

    @property
    def snapshot_running(self) -> bool:
        """Whether :meth:`begin_local_snapshot` was called and not yet finished."""
        return self._snapshot is not None

    def abort_local_snapshot(self) -> None:
        """Give up the snapshot begun (its parts stay applied; nothing is deleted)."""
        self._snapshot = None

    def _delete_unseen(self, seen: set[bytes], now: float) -> None:
        for key in [k for k, _ in self._table.items() if k not in seen]:
            self.local_delete(key, now)

    def _mark(self, key: bytes, now: float) -> None:
        pending = self._pending
        if key not in pending:
            pending[key] = now
            if len(pending) > self.params.max_pending:
                self._fold()

    def _fold(self) -> None:
        # Bounded memory without loss: the pending keys become dirty buckets.
        bucket_of, dirty = self._table.bucket_of, self._dirty
        for key, t in self._pending.items():
            b = bucket_of(key)
            if dirty.get(b, _INF) > t:
                dirty[b] = t
        self._pending.clear()
        self.stats.folds += 1

    def _schedule_refresh(self, key: bytes, due: float) -> None:
        wheel = self._refresh
        wheel.add(key, due)
        if wheel.items > 2 * len(self._table) + _WHEEL_SLACK:
            wheel.clear()
            for k, rec in self._table.items():
                deadline, told = R.timing(rec)
                if told != -_INF and deadline > told:
                    wheel.add(k, 2 * told - deadline)

    def _run_refresh(self, now: float) -> None:
        wheel, get = self._refresh, self._table.get
        for key in wheel.pop_due(now):
            rec = get(key)
            if rec is None:
                continue
            deadline, told = R.timing(rec)
            if deadline > told:
                due = 2 * told - deadline
                if due <= now:
                    self._mark(key, now)
                elif due < math.floor(now) + 1:
                    wheel.add(key, now + 1)  # later within this second

    # --- operator requests ----------------------------------------------------------

    def request_resync(self, now: float) -> None:
        """Ask the peer to send its whole table (conntrackd ``-n``); kept until the
        request is acknowledged, across disconnections."""
        self._want_full_from_peer = True
        self._request_gen += 1
        c = self._conn
        # One queued copy is enough: it takes the latest generation when it leaves. A
        # copy already in flight is not: the peer may have acted on it before this call
        # (what the caller did since, e.g. empty the cache, would not be covered).
        if (
            c is not None
            and c.peer is not None
            and not c.terminated
            and not any(ctl.kind == _REQUEST for ctl in c.control)
        ):
            c.control.append(_Ctl(_REQUEST))

    def bulk_send(self, now: float) -> None:
        """Send the whole local table to the peer (conntrackd ``-B``): a full resync,
        kept until it has completed, across disconnections."""
        self._want_full_to_peer = True
        c = self._conn
        if c is not None and c.peer is not None and not c.terminated:
            self._resync_wanted(c, now, full=True)

    def start_digest_resync(self, now: float) -> bool:
        """Compare the peer's copy of our table with our table now (``replicator verify``)
        and repair the buckets that differ: the anti-entropy resync, started at once.
        Returns False when not established or a resync of ours is already running (its
        completion answers the same question)."""
        c = self._conn
        if c is None or c.peer is None or c.terminated or c.send_resync is not None:
            return False
        self._start_resync(c, now, full=False)
        return True

    def set_filter(
        self, accept: Callable[[Entry], bool] | None, records: Iterable[tuple[bytes, bytes]],
        now: float,
    ) -> None:
        """Replace the filter (SIGHUP) and re-evaluate the local table against it:
        ``records`` is the whole unfiltered local table as (packed key, record) pairs.
        Entries that stop matching are deleted on the peer, entries that start matching
        are sent."""
        self._accept = accept
        self._accept_record = _record_filter(accept)
        self._accept_records = _records_filter(accept)
        self.local_snapshot_records(records, now, refilter=True)

    # --- connection -----------------------------------------------------------------

    def connection_made(self, now: float) -> None:
        """A transport to the peer is up (a previous one, if any, is considered lost)."""
        if self._conn is not None:
            self.connection_lost(now)
        self._conn = _Conn(now, self._new_stream(), self.params.ack_timeout)
        self.stats.connections += 1

    def connection_lost(self, now: float) -> None:
        """The transport is down: what was in flight is requeued for the next one."""
        c = self._conn
        if c is None:
            return
        self._requeue(c)
        self._conn = None
        if c.synced:
            self._events.append(InSync(False))

    def _new_stream(self) -> int:
        s = self._next_stream
        self._next_stream += 1
        return s

    def _requeue(self, c: _Conn) -> None:
        """Give back what unacknowledged messages carried: keys, buckets, controls."""
        pending, dirty = self._pending, self._dirty
        controls = []
        for s in c.inflight:
            t = s.first_change if s.first_change is not None else _INF
            for key in s.keys:
                if pending.get(key, _INF) >= t:
                    pending[key] = t
            for b in s.buckets:
                if dirty.get(b, _INF) >= t:
                    dirty[b] = t
            if s.control is not None:
                if s.control.kind == _DONE:
                    if c.send_resync is not None:
                        c.send_resync.done_sent = False
                else:
                    r = c.send_resync
                    if s.control.kind == _BEGIN and r is not None and r.id == s.control.resync_id:
                        r.begin_sent = False
                    controls.append(s.control)
        if c.sending_bucket is not None:
            b, _, _, t = c.sending_bucket
            if dirty.get(b, _INF) >= t:
                dirty[b] = t
            c.sending_bucket = None
        c.control.extendleft(reversed(controls))
        c.inflight.clear()
        c.inflight_weight = 0
        c.ack_deadline = None
        if len(pending) > self.params.max_pending:
            self._fold()

    # --- receiving ------------------------------------------------------------------

    def receive(self, payload: bytes, now: float) -> None:
        """One frame's payload from the peer. Never raises on bad input: see events."""
        c = self._conn
        if c is None or c.terminated:
            return
        st = self.stats
        st.messages_received += 1
        st.bytes_received += len(payload)
        c.last_recv = now
        try:
            msg = wire.decode(payload)
        except WireVersionError as exc:
            self._violation(c, str(exc))
            return
        except WireDecodeError as exc:
            st.decode_errors += 1
            self._violation(c, str(exc))
            return
        try:
            if isinstance(msg, wire.Ack):
                c.clock.lag(msg.sent, now)  # a sample while the link idles
                self._on_ack(c, msg, now)
            elif isinstance(msg, wire.Hello):
                self._on_hello(c, msg, now)
            elif isinstance(msg, wire.Close):
                c.terminated = True
                self._events.append(ConnectionTerminated(msg.reason, by_peer=True))
            else:
                self._on_sequenced(c, msg, now)
        except _Violation as exc:
            self._violation(c, str(exc))

    def _violation(self, c: _Conn, reason: str) -> None:
        self.stats.protocol_violations += 1
        self._events.append(ProtocolViolation(reason))
        self._terminate(c, reason)

    def _terminate(self, c: _Conn, reason: str) -> None:
        c.terminated = True
        # The bound is on UTF-8 bytes (msgpack's), and reasons may quote the peer.
        short = reason.encode()[: wire.MAX_REASON].decode(errors="ignore")
        c.out.append(wire.encode(wire.Close(short)))
        self._events.append(ConnectionTerminated(reason, by_peer=False))

    def _on_hello(self, c: _Conn, msg: wire.Hello, now: float) -> None:
        if c.peer is not None:
            if msg != c.peer:
                raise _Violation("HELLO changed during the connection")
            c.ack_owed = True  # a repeated HELLO: our ACK tells the peer to stop
            return
        if msg.buckets != self._buckets:
            raise _Violation(f"peer uses {msg.buckets} digest buckets, this node {self._buckets}")
        if msg.node_id == self.node_id:
            raise _Violation(f"peer announces this node's own id {msg.node_id!r}")
        expected = self.params.peer_node_id
        if expected is not None and msg.node_id != expected:
            raise _Violation(f"peer announces node id {msg.node_id!r}, expected {expected!r}")
        c.peer = msg
        c.rstream = msg.stream_base
        c.rnext = 0
        c.ack_owed = True
        restarted = self._peer_epoch is not None and self._peer_epoch != msg.epoch
        self._peer_epoch = msg.epoch
        self.peer_node_id = msg.node_id
        self._events.append(PeerHello(msg.node_id, msg.epoch, restarted))
        self._start_resync(c, now, full=self._want_full_to_peer)
        if self._want_full_from_peer:
            c.control.append(_Ctl(_REQUEST))
        interval = self.params.anti_entropy_interval
        c.next_anti_entropy = None if interval is None else now + interval

    def _on_ack(self, c: _Conn, msg: wire.Ack, now: float) -> None:
        if msg.stream > c.stream:
            raise _Violation(f"ACK for stream {msg.stream}, never sent")
        if msg.stream >= c.stream_base:
            c.hello_acked = True
        if msg.stream != c.stream:
            return  # an abandoned stream: what it carried is already requeued
        if msg.next_seq > c.next_seq:
            raise _Violation(f"ACK of seq {msg.next_seq}, only {c.next_seq} sent")
        inflight = c.inflight
        if inflight and inflight[0].seq < msg.next_seq:
            while inflight and inflight[0].seq < msg.next_seq:
                self._acked(c, inflight.popleft(), now)
            c.rto = self.params.ack_timeout
            c.ack_deadline = now + c.rto if inflight else None
        if msg.nack and inflight:
            self._go_back(c)

    def _acked(self, c: _Conn, s: _Sent, now: float) -> None:
        c.inflight_weight -= s.weight
        st = self.stats
        if s.first_change is not None:
            lag = now - s.first_change
            st.ack_lag_last = lag
            st.ack_lag_max = max(st.ack_lag_max, lag)
        ctl = s.control
        if ctl is None:
            return
        if ctl.kind == _REQUEST:
            if ctl.resync_id == self._request_gen:
                self._want_full_from_peer = False
        elif ctl.kind == _DONE:
            r = c.send_resync
            if r is not None and r.id == ctl.resync_id:
                c.send_resync = None
                if r.full:
                    self._want_full_to_peer = False
                else:
                    self.last_differing_buckets = tuple(r.differing)
                self._events.append(
                    ResyncCompleted("send", r.id, r.full, now - r.started_at, r.buckets, r.entries)
                )

    def _go_back(self, c: _Conn) -> None:
        self.stats.retransmits += 1
        self._requeue(c)
        c.stream = self._new_stream()
        c.next_seq = 0

    def _on_sequenced(self, c: _Conn, msg: wire.Sequenced, now: float) -> None:
        st = self.stats
        if c.peer is None:
            st.out_of_order += 1  # before HELLO (a lossy link): resent later
            return
        if msg.stream < c.rstream:
            st.duplicates += 1
            c.ack_owed = True
            return
        if msg.stream > c.rstream:
            c.rstream = msg.stream  # the sender went back: the old stream is dead
            c.rnext = 0
        if msg.seq != c.rnext:
            if msg.seq < c.rnext:
                st.duplicates += 1
            else:
                st.out_of_order += 1
                if c.nacked != (c.rstream, c.rnext):
                    c.nacked = (c.rstream, c.rnext)
                    c.nack_owed = True
            c.ack_owed = True
            return
        c.rnext += 1
        self._owe_ack(c, msg, now)
        if isinstance(msg, (wire.Changes, wire.Buckets)):
            # Remaining timeouts count from when the peer built the message.
            lag = c.clock.lag(msg.sent, now)
            st.receive_lag_last = lag
            st.receive_lag_max = max(st.receive_lag_max, lag)
            if isinstance(msg, wire.Changes):
                self._apply_changes(c, msg, now - lag)
            else:
                self._apply_buckets(c, msg, now - lag)
        elif isinstance(msg, wire.ResyncBegin):
            self._on_begin(c, msg, now)
        elif isinstance(msg, wire.Summary):
            self._on_summary(c, msg, now)
        elif isinstance(msg, wire.ResyncDone):
            self._on_done(c, msg, now)
        else:
            self._resync_wanted(c, now, full=msg.full)
            self._want_full_to_peer = self._want_full_to_peer or msg.full

    def _apply_changes(self, c: _Conn, msg: wire.Changes, since: float) -> None:
        ext = self.external
        bucket_of = ext.table.bucket_of
        upsert = ext.upsert
        from_body, key_of = R.from_body, R.key_of
        replacing = c.replacing
        records: list[bytes] = []
        keys: list[bytes] = []
        upserts = msg.upserts
        if len(upserts) >= _MIN_BATCH and not replacing:
            # A burst's entries, none held yet: stored together (0.5 µs per entry less).
            made = R.from_bodies(upserts, since)
            made_keys = R.keys_of(made)
            deadlines = list(map(R.deadline_of, map(itemgetter(1), upserts), repeat(since)))
            if (len(set(made_keys)) == len(made_keys)
                    and ext.add_new(made_keys, made, deadlines)):
                records, keys, upserts = made, made_keys, ()
        for body, timeout in upserts:
            # The body was checked by the decoder: it is stored as it came.
            rec = from_body(body, timeout, since)
            key = key_of(rec)
            b = bucket_of(key)
            upsert(b, key, rec)
            records.append(rec)
            keys.append(key)
            if replacing:
                unconfirmed = replacing.get(b)
                if unconfirmed is not None:
                    unconfirmed.discard(key)
        st = self.stats
        if records:
            st.entries_received += len(records)
            self._events.append(PeerUpserts(tuple(records), since, tuple(keys)))
        if msg.deletes:
            st.deletes_received += len(msg.deletes)
            deleted = []
            for key in msg.deletes:
                old = ext.delete(bucket_of(key), key)
                if old is not None:
                    deleted.append(R.unpack(old))
            if deleted:
                self._events.append(PeerDeletes(tuple(deleted), expired=False))

    def _apply_buckets(self, c: _Conn, msg: wire.Buckets, since: float) -> None:
        ext = self.external
        table = ext.table
        bucket_of = table.bucket_of
        changed: list[bytes] = []
        deleted: list[Entry] = []
        r = c.recv_resync
        try:
            for rec in msg.records:
                b = rec.bucket
                if b >= self._buckets:
                    raise _Violation(f"bucket {b} beyond the bucket count")
                if rec.first:
                    unconfirmed = set(table.bucket(b))
                    c.replacing[b] = unconfirmed
                else:
                    found = c.replacing.get(b)
                    if found is None:
                        raise _Violation(f"part of bucket {b} without its first part")
                    unconfirmed = found
                for body, timeout in rec.entries:
                    new = R.from_body(body, timeout, since)
                    key = R.key_of(new)
                    if bucket_of(key) != b:
                        raise _Violation(f"entry sent in bucket {b}, not its own")
                    old = ext.upsert(b, key, new)
                    unconfirmed.discard(key)
                    if old is None or not R.same_state(old, new):
                        changed.append(new)
                self.stats.entries_received += len(rec.entries)
                if r is not None:
                    r.entries += len(rec.entries)
                if rec.last:
                    del c.replacing[b]
                    for key in unconfirmed:
                        old = ext.delete(b, key)
                        if old is not None:
                            deleted.append(R.unpack(old))
                    if r is not None:
                        r.buckets += 1
        finally:
            # Report what was applied even if a later record was illegal.
            if changed:
                self._events.append(PeerUpserts(tuple(changed), since))
            if deleted:
                self.stats.deletes_received += len(deleted)
                self._events.append(PeerDeletes(tuple(deleted), expired=False))

    def _on_begin(self, c: _Conn, msg: wire.ResyncBegin, now: float) -> None:
        r = c.recv_resync
        if r is not None and r.id == msg.resync_id:
            # Resent after a go-back: the summaries it asks for are queued, in flight
            # or delivered already (our stream resends them if they are lost).
            return
        c.recv_resync = _RecvResync(msg.resync_id, msg.full, now)
        self.stats.resyncs_received += 1
        self._events.append(ResyncStarted("receive", msg.resync_id, msg.full))
        # Summaries still queued are for a superseded resync: the peer ignores them.
        if any(ctl.kind == _SUMMARY for ctl in c.control):
            c.control = deque(ctl for ctl in c.control if ctl.kind != _SUMMARY)
        if not msg.full:
            c.control.extend(
                _Ctl(_SUMMARY, msg.resync_id, first)
                for first in range(0, self._buckets, SUMMARY_CHUNK)
            )

    def _on_summary(self, c: _Conn, msg: wire.Summary, now: float) -> None:
        count = len(msg.digests) // wire.DIGEST_SIZE
        first = msg.first_bucket
        if first % SUMMARY_CHUNK or count != min(SUMMARY_CHUNK, self._buckets - first):
            raise _Violation("SUMMARY does not cover exactly one chunk of our buckets")
        r = c.send_resync
        if r is None or r.id != msg.resync_id:
            return  # for a superseded resync
        table, dirty = self._table, self._dirty
        for b, theirs in enumerate(unpack_digests(msg.digests), first):
            if table.digest(b) != theirs:
                r.differing.append(b)
                if b not in dirty:
                    dirty[b] = now
        r.awaiting.discard(first)

    def _on_done(self, c: _Conn, msg: wire.ResyncDone, now: float) -> None:
        r = c.recv_resync
        if r is None or r.id != msg.resync_id:
            return  # a repeated DONE
        c.recv_resync = None
        self._events.append(
            ResyncCompleted("receive", r.id, r.full, now - r.started_at, r.buckets, r.entries)
        )
        if not c.synced:
            c.synced = True
            self._events.append(InSync(True))

    def _resync_wanted(self, c: _Conn, now: float, full: bool) -> None:
        """A resync of our table is asked for: start one, unless the running one has
        not sent its BEGIN yet and does at least as much (it then covers the wish)."""
        r = c.send_resync
        if r is not None and not r.begin_sent and (r.full or not full):
            return
        self._start_resync(c, now, full)

    def _start_resync(self, c: _Conn, now: float, full: bool) -> None:
        # A queued BEGIN of a superseded resync would be skipped when its turn comes:
        # drop it now, so that superseding resyncs cannot pile BEGINs up.
        if any(ctl.kind == _BEGIN for ctl in c.control):
            c.control = deque(ctl for ctl in c.control if ctl.kind != _BEGIN)
        rid = self._next_resync
        self._next_resync += 1
        awaiting = set() if full else set(range(0, self._buckets, SUMMARY_CHUNK))
        c.send_resync = _SendResync(rid, full, now, awaiting)
        c.control.append(_Ctl(_BEGIN, rid))
        if full:
            dirty = self._dirty
            for b in range(self._buckets):
                dirty.setdefault(b, now)
        self.stats.resyncs_sent += 1
        self._events.append(ResyncStarted("send", rid, full))

    # --- timers -------------------------------------------------------------------------

    def next_timer(self) -> float | None:
        """When :meth:`handle_timer` must be called next (None: no timer pending)."""
        refresh = self._refresh.next_time()
        times = [] if refresh is None else [refresh]
        expiry = self.external.next_expiry()
        if expiry is not None:
            times.append(expiry)
        c = self._conn
        if c is not None and not c.terminated:
            p = self.params
            times.append(c.last_recv + p.dead_interval)
            if not c.hello_acked and c.hello_sent_at is not None:
                times.append(c.hello_sent_at + c.rto)
            if c.peer is not None:
                times.append(c.last_sent + p.keepalive_interval)
            if c.ack_deadline is not None:
                times.append(c.ack_deadline)
            if c.ack_due is not None:
                times.append(c.ack_due)
            if c.next_anti_entropy is not None:
                times.append(c.next_anti_entropy)
        return min(times, default=None)

    def handle_timer(self, now: float) -> None:
        """Run whatever is due at ``now``: expiry, refreshes, keepalive, resends,
        dead-peer detection, anti-entropy."""
        hold = self.params.expiry_hold
        if hold and self.established:
            held = self.external.hold(now, now + hold)
            if held:
                # Upserts with the extended timeout: a hot standby's kernel copy
                # (written with the old one) is extended too.
                self.stats.held += len(held)
                self._events.append(PeerUpserts(tuple(held), now))
        else:
            expired = self.external.expire(now)
            if expired:
                self.stats.expired += len(expired)
                self._events.append(PeerDeletes(tuple(expired), expired=True))
        self._run_refresh(now)
        c = self._conn
        if c is None or c.terminated:
            return
        p = self.params
        if now >= c.last_recv + p.dead_interval:
            self._terminate(c, f"nothing received from the peer for {p.dead_interval:g} s")
            return
        if c.ack_deadline is not None and now >= c.ack_deadline:
            if p.ordered_link:
                self.stats.slow_acks += 1
                c.ack_deadline = now + c.rto
            else:
                self._go_back(c)
            c.rto = min(2 * c.rto, _MAX_BACKOFF * p.ack_timeout)
        if c.peer is not None and now >= c.last_sent + p.keepalive_interval:
            c.ack_owed = True
        interval = p.anti_entropy_interval
        if interval is not None and c.next_anti_entropy is not None and now >= c.next_anti_entropy:
            c.next_anti_entropy = now + interval
            if c.send_resync is None:
                self._start_resync(c, now, full=False)

    def _owe_ack(self, c: _Conn, msg: wire.Sequenced, now: float) -> None:
        """Owe the peer the ACK of the in-order ``msg``: at once, or within
        ``ack_delay`` (see :class:`SyncParams`)."""
        delay = self.params.ack_delay
        if delay <= 0:
            c.ack_owed = True
            return
        weight = (len(msg.upserts) + len(msg.deletes) if isinstance(msg, wire.Changes)
                  else sum(len(r.entries) for r in msg.records)
                  if isinstance(msg, wire.Buckets) else 1)
        c.unacked_weight += max(1, weight)
        if c.unacked_weight * 4 >= self.params.window:
            c.ack_owed = True
            return
        # Due once the peer has paused for a quarter of the delay, at the latest the
        # delay after the first message it covers. Why the pause: traffic that comes
        # in bursts (a batch of connections every 10 ms, in the bench) had every ACK
        # due just as the next burst arrived, in the way of its first entries (hot lag
        # p50 +0.3-0.4 ms); a pause takes it out between the bursts.
        if c.ack_due is None:
            c.ack_first = now
        c.ack_due = min(c.ack_first + delay, now + delay / 4)

    # --- sending ------------------------------------------------------------------------

    def frames_to_send(self, now: float) -> list[bytes]:
        """Payloads to send now, in order (each one frame of :mod:`replicator.framing`)."""
        c = self._conn
        if c is None:
            return []
        out, c.out = c.out, []
        if not c.terminated:
            if not c.hello_acked and (c.hello_sent_at is None or now >= c.hello_sent_at + c.rto):
                c.hello_sent_at = now
                out.append(wire.encode(wire.Hello(
                    wire.PROTOCOL_VERSION, self.node_id, self.epoch, self._buckets,
                    c.stream_base)))  # fmt: skip
            if c.peer is not None:
                self._fill(c, now, out)
                # A put-off ACK goes with any other frame, or when due.
                if c.ack_due is not None and (out or now >= c.ack_due):
                    c.ack_owed = True
                if c.ack_owed:
                    out.append(wire.encode(wire.Ack(c.rstream, c.rnext, c.nack_owed,
                                                    _clock(now))))
                    c.ack_owed = c.nack_owed = False
                    c.ack_due, c.unacked_weight = None, 0
        if out:
            c.last_sent = now
            st = self.stats
            st.messages_sent += len(out)
            st.bytes_sent += sum(map(len, out))
        return out

    def _fill(self, c: _Conn, now: float, out: list[bytes]) -> None:
        """Send sequenced messages while the window allows."""
        window = self.params.window
        while c.inflight_weight < window:
            if c.control:
                self._send_control(c, c.control.popleft(), now, out)
                continue
            has_buckets = bool(self._dirty) or c.sending_bucket is not None
            r = c.send_resync
            if r is not None and not r.awaiting and not has_buckets and not r.done_sent:
                # Every differing bucket has been sent (changes may still follow).
                r.done_sent = True
                data = wire.encode(wire.ResyncDone(c.stream, c.next_seq, r.id))
                self._sent(c, out, data, now, control=_Ctl(_DONE, r.id))
                continue
            # While a resync waits for the peer's digests, changes wait too: most of
            # them will travel inside the differing buckets anyway.
            changes = bool(self._pending) and (r is None or not r.awaiting)
            if changes and not (c.buckets_turn and has_buckets):
                self._send_changes(c, now, out)
            elif has_buckets:
                self._send_buckets(c, now, out)
            else:
                return
            c.buckets_turn = not c.buckets_turn

    def _sent(
        self,
        c: _Conn,
        out: list[bytes],
        data: bytes,
        now: float,
        *,
        weight: int = 1,
        first_change: float | None = None,
        keys: tuple[bytes, ...] = (),
        buckets: tuple[int, ...] = (),
        control: _Ctl | None = None,
    ) -> None:
        c.inflight.append(_Sent(c.next_seq, weight, first_change, keys, buckets, control))
        c.next_seq += 1
        c.inflight_weight += weight
        if c.ack_deadline is None:
            c.ack_deadline = now + c.rto
        out.append(data)

    def _remaining(self, bucket: dict[bytes, bytes], key: bytes, rec: bytes, now: float
                   ) -> int | None:
        """The timeout to send for ``rec`` (in ``bucket``) now; notes in the record that
        the peer was told it (unless its ``told`` is already within :data:`TOLD_SLACK`
        below, see there)."""
        deadline, told = R.timing(rec)
        if deadline == _INF:
            remaining, new_told = None, _INF
        else:
            # At least 1 s: an entry still in the local table is alive (a kernel drops
            # it and reports DESTROY at 0), and a copy installed with timeout 0 would
            # die at once.
            remaining = max(1, math.ceil(deadline - now))
            new_told = now + remaining
        if not told <= new_told < told + TOLD_SLACK and new_told != told:
            new = R.with_told(rec, new_told)
            bucket[key] = new  # the same state: the bucket's digest stands
            if self._restamped is not None:
                self._restamped(key, rec, new)
        return remaining

    def _send_changes(self, c: _Conn, now: float, out: list[bytes]) -> None:
        pending, table, dirty = self._pending, self._table, self._dirty
        sb = c.sending_bucket
        if not dirty and sb is None:
            self._send_pending(c, now, out)
            return
        # Keys of the bucket being sent in parts that its next parts will carry.
        coming = frozenset(sb[1][sb[2] :]) if sb is not None else frozenset()
        keys: list[bytes] = []
        ups: list[wire.TimedRecord] = []
        dels: list[bytes] = []
        first = _INF
        lookup, remaining_of = table.lookup, self._remaining
        for key in tuple(islice(pending, self.params.batch)):
            t = pending.pop(key)
            b, bucket = lookup(key)
            rec = bucket.get(key)
            if rec is None:
                dels.append(key)
            elif dirty and b in dirty:
                # Its bucket will be sent whole, with this key's state at that time.
                dirty[b] = min(dirty[b], t)
                continue
            elif coming and key in coming:
                continue
            else:
                ups.append((rec, remaining_of(bucket, key, rec, now)))
            keys.append(key)
            first = min(first, t)
        self._changes_sent(c, now, out, keys=keys, ups=ups, dels=dels, first=first)

    def _changes_sent(self, c: _Conn, now: float, out: list[bytes], *, keys: list[bytes],
                      ups: list[wire.TimedRecord], dels: list[bytes], first: float) -> None:
        """Send the CHANGES of ``keys`` (popped from the pending ones, ``first`` the
        earliest time they were marked): ``ups`` and ``dels``."""
        if not self._pending:
            # A dict keeps the capacity of its largest size when emptied by pops: after
            # a burst of N keys that would be some 40 bytes per key for good.
            self._pending = {}
        if not keys:
            return
        data = wire.encode_changes_records(c.stream, c.next_seq, ups, dels, sent=_clock(now))
        self.stats.entries_sent += len(ups)
        self.stats.deletes_sent += len(dels)
        self._sent(c, out, data, now, weight=len(keys), first_change=first, keys=tuple(keys))

    def _send_pending(self, c: _Conn, now: float, out: list[bytes]) -> None:
        """:meth:`_send_changes` when no bucket waits to be sent whole (the usual case,
        a burst included): each step for the whole message at once, and
        :meth:`_remaining` inline for the records whose ``told`` stands (0.5 µs per
        entry less)."""
        pending, table = self._pending, self._table
        keys = list(islice(pending, self.params.batch))
        if not keys:
            return
        first = min(map(pending.pop, keys))
        ups: list[wire.TimedRecord] = []
        dels: list[bytes] = []
        timing, ceil, slow = R.timing, math.ceil, self._remaining
        for key, rec in zip(keys, table.get_many(keys), strict=True):
            if rec is None:
                dels.append(key)
                continue
            # _remaining's computation, without the call: the record is only remade
            # (by _remaining) when its told moves.
            deadline, told = timing(rec)
            if deadline == _INF:
                remaining: int | None = None
                new_told = _INF
            else:
                remaining = max(1, ceil(deadline - now))
                new_told = now + remaining
            if not told <= new_told < told + TOLD_SLACK and new_told != told:
                remaining = slow(table.lookup(key)[1], key, rec, now)
            ups.append((rec, remaining))
        self._changes_sent(c, now, out, keys=keys, ups=ups, dels=dels, first=first)

    def _send_buckets(self, c: _Conn, now: float, out: list[bytes]) -> None:
        budget = self.params.batch
        dirty, pending = self._dirty, self._pending
        parts: list[tuple[int, bool, bool, list[wire.TimedRecord]]] = []
        first_change = _INF
        n_entries = 0
        popped = 0
        while budget >= 2 and (dirty or c.sending_bucket is not None):
            if c.sending_bucket is None:
                b = next(iter(dirty))
                t = dirty.pop(b)
                popped += 1
                keys, done, first = list(self._table.bucket(b)), 0, True
            else:
                b, keys, done, t = c.sending_bucket
                first = False
            chunk = keys[done : done + budget - 1]
            done += len(chunk)
            last = done >= len(keys)
            entries: list[wire.TimedRecord] = []
            bucket = self._table.bucket(b)
            for key in chunk:
                rec = bucket.get(key)
                if rec is not None:
                    entries.append((rec, self._remaining(bucket, key, rec, now)))
                    # The bucket carries this key's current state: no need to send
                    # it again as a change.
                    first_change = min(first_change, pending.pop(key, _INF))
            parts.append((b, first, last, entries))
            c.sending_bucket = None if last else (b, keys, done, t)
            budget -= 1 + len(chunk)
            n_entries += len(entries)
            first_change = min(first_change, t)
            if last:
                self.stats.buckets_sent += 1
        if popped and dirty:
            # Taken from the front, the dict keeps a hole per bucket taken, and
            # next(iter()) walks them all each time: a full resync's buckets cost
            # O(buckets²) without this (4096: 7 ms; 65536: 1.5 s). A copy has none.
            self._dirty = dict(dirty)
        r = c.send_resync
        if r is not None:
            r.entries += n_entries
            r.buckets += sum(1 for p in parts if p[2])
        self.stats.entries_sent += n_entries
        data = wire.encode_buckets_records(c.stream, c.next_seq, parts, sent=_clock(now))
        self._sent(c, out, data, now, weight=max(1, n_entries),
                   first_change=None if first_change == _INF else first_change,
                   buckets=tuple(p[0] for p in parts))  # fmt: skip

    def _send_control(self, c: _Conn, ctl: _Ctl, now: float, out: list[bytes]) -> None:
        msg: wire.Message
        if ctl.kind == _BEGIN:
            r = c.send_resync
            if r is None or r.id != ctl.resync_id:
                return  # superseded
            msg = wire.ResyncBegin(c.stream, c.next_seq, r.id, r.full)
            r.begin_sent = True
        elif ctl.kind == _SUMMARY:
            rr = c.recv_resync
            if rr is None or rr.id != ctl.resync_id:
                return  # that resync completed or was superseded: the peer ignores it
            count = min(SUMMARY_CHUNK, self._buckets - ctl.first)
            digests = pack_digests(self.external.table.digests(ctl.first, count))
            msg = wire.Summary(c.stream, c.next_seq, ctl.resync_id, ctl.first, digests)
        else:
            msg = wire.ResyncRequest(c.stream, c.next_seq, True)
            # Acknowledged, this copy satisfies every request_resync made until now.
            ctl = _Ctl(_REQUEST, self._request_gen)
        self._sent(c, out, wire.encode(msg), now, control=ctl)
