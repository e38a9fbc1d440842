"""The daemon: one trio nursery wiring the kernel mirror, the sync session, the peer
link, the keepalived role machine, the control socket, metrics and systemd.

Theory of operation
-------------------
Data flows one way per node, and the protocol is symmetric (see :mod:`replicator.sync`):

* **Local table → peer.** :class:`~replicator.mirror.Mirror` keeps the internal cache
  equal to this node's kernel table and publishes every change (echoes of our own
  injections excluded) to :meth:`Daemon._on_local_changes`, which hands it to the
  :class:`~replicator.sync.SyncSession` and wakes the *driver*. Every
  ``kernel.refresh_interval`` the mirror re-dumps the table and the session gets a
  snapshot: the kernel reports no event when a packet refreshes a timeout, so this is
  how refreshed timeouts reach the peer before its copy expires.
* **Peer → external cache (→ kernel).** Frames from the authenticated connection go to
  ``session.receive``; the session keeps the external cache. Its ``PeerUpserts`` /
  ``PeerDeletes`` events are applied to the kernel only in ``hot`` mode and only while
  this node is not MASTER (a master owns its table). Kernel writes are coalesced by key
  in :class:`KernelWriter` and run by their own task, so a slow kernel never stalls
  the protocol and memory stays bounded by the number of distinct entries. In hot
  mode the mirror does not read the events of those writes; the writer reports what
  it wrote (:meth:`~replicator.mirror.Mirror.note_written`), and on a hot standby
  changes of the peer's entries (keys in the external cache) are never handed to the
  session as this node's own, however a re-read finds them (:meth:`Daemon._own_changes`).
* **The driver** is the only task that talks to the session's output side: it runs
  timers, sends ``frames_to_send`` on the current connection in order, and dispatches
  events. Inputs (frames, local changes, role actions, control commands) only call
  the session's input methods and set the wake-up event, so everything the session
  does happens in one order.
* **Roles.** keepalived lines (``notify`` command or ``vrrp_notify_fifo``) feed the
  pure :class:`~replicator.role.RoleMachine`; :class:`~replicator.roletask.RoleRunner`
  calls :meth:`Daemon.perform` for each action. ``COMMIT`` writes the external cache
  into the kernel (cache mode: everything; hot mode: only what the kernel is missing,
  which is nothing in steady state, but covers a daemon restarted while keepalived
  kept running). ``BECOME_SENDER`` re-reads the kernel and makes the whole table the
  local table (entries this node wrote are echoes and were never published).
  ``SHORTEN_TIMERS`` caps the kernel timeout of the entries this node no longer owns
  (cache mode: all of them; hot mode: those the peer does not hold).

Readiness (``READY=1``) is sent once the event subscription and the first dump are
done (the mirror's start) and the peer listener is bound. Watchdog pings are sent by
the driver only while the mirror and the driver are alive, so a wedged loop stops
them and systemd restarts the daemon.
"""

from __future__ import annotations

import errno as errno_mod
import gc
import logging
import os
import secrets
import signal
from collections.abc import Callable, Iterable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import trio

from . import ctformat
from . import record as R
from .cache import Change
from .config import Config, diff_reloadable, load_config
from .control import (
    CacheName,
    CheckReport,
    CommitReport,
    CountReport,
    DumpReport,
    NotifyReport,
    ResyncReport,
    ResyncSource,
    StatsReport,
    StatusReport,
    VerifyReport,
    serve_control,
)
from .errors import ControlError, KernelError, ReplicatorError
from .filters import EntryFilter, build_filter
from .gcpause import COLLECTOR_PAUSE
from .kernel import KERNEL_RETRY, InjectResult, KernelPort
from .keys import NodeIdentity, load_identity
from .logs import fields, set_level, setup_logging
from .metrics import Metrics, MetricsServer, serve_metrics
from .mirror import Mirror
from .model import Entry, TcpFlag
from .notifyfifo import read_notify_fifo
from .role import Action, Role, RoleMachine, VrrpEvent, VrrpKind
from .roletask import RoleRunner
from .sdnotify import Notifier, watchdog_interval
from .sync import (
    ConnectionTerminated,
    InSync,
    PeerDeletes,
    PeerHello,
    PeerUpserts,
    ProtocolViolation,
    ResyncCompleted,
    ResyncStarted,
    SyncParams,
    SyncSession,
)
from .tlsctx import peer_credentials
from .transport import FramedConnection, LinkSettings, PeerLink
from .viprole import IPAddress, held_addresses, role_from_addresses

log = logging.getLogger(__name__)

#: Timeout given to an entry that has none when it is written to a kernel (flowtable
#: offloaded flows are dumped without a timeout, and a create without one is EINVAL).
#: conntrackd's fallback for an unknown remaining time is 60 s; a few minutes errs on
#: the side of keeping a flow that is alive on the peer.
DEFAULT_COMMIT_TIMEOUT = 180
#: Expiry hold when periodic re-reads of the kernel are off (``refresh_interval = 0``).
EXPIRY_HOLD_DEFAULT = 30.0
_LIBERAL = int(TcpFlag.BE_LIBERAL)
#: Entries per part of a snapshot of the local table handed to the session (the event
#: reader and the link run between parts): a few milliseconds of work.
SNAPSHOT_STEP = 4096
#: The driver comes round at least this often (seconds); see :meth:`Daemon._watch`.
DRIVER_BEAT = 1.0
#: Generation-0 threshold of the cyclic garbage collector (see :func:`run_daemon`).
GC_THRESHOLD = 20000


#: Turns of the event loop the event reader leaves the driver after each batch it
#: published (see Daemon._turns_for_the_driver): the driver's send needs three.
DRIVER_TURNS = 4

#: The session's events that only carry the peer's entries (see
#: Daemon._dispatch_entries).
_ENTRY_EVENTS = (PeerUpserts, PeerDeletes)


def build_entry_filter(config: Config) -> EntryFilter:
    """The ``[filters]`` table as a predicate (applied before anything is sent)."""
    f = config.filters
    return build_filter(
        ignore_protocols=f.ignore_protocols,
        ignore_prefixes=f.ignore_addresses,
        tcp_states=f.tcp_states or None,
        zones=f.zones or None,
        mark=(f.mark, f.mark_mask) if f.mark_mask else None,
    )


def sync_params(config: Config) -> SyncParams:
    """The ``[sync]`` table as the session's tunables."""
    s, t = config.sync, config.sync.timers
    return SyncParams(
        buckets=s.buckets,
        batch=s.batch,
        window=s.window,
        max_pending=s.max_pending,
        ack_timeout=t.ack_timeout,
        ack_delay=t.ack_delay,
        keepalive_interval=t.keepalive_interval,
        dead_interval=t.dead_interval,
        anti_entropy_interval=t.anti_entropy_interval,
        peer_node_id=s.peer_name,
        # The peer link is TLS over TCP.
        ordered_link=True,
        expiry_hold=expiry_hold(config.kernel.refresh_interval),
    )


def expiry_hold(refresh_interval: float | None) -> float:
    """How long a connected standby keeps a copy past its deadline (see SyncParams).

    The peer learns a refreshed timeout at its next re-dump of the kernel (every
    ``kernel.refresh_interval``, assumed the same on both nodes) and sends it at once,
    so two intervals cover it with room for a slow dump; 30 s when refreshes are off
    (``None`` or 0).
    """
    return 2 * refresh_interval if refresh_interval else EXPIRY_HOLD_DEFAULT


def copy_tcp_flags(window_tracking: bool) -> int:
    """The TCP flags set in both directions of every TCP entry written into this node's
    kernel from the peer's table (a commit, a hot standby's writes).

    The kernel's TCP window tracking needs the sequence edges, which ctnetlink cannot
    transfer: on the new master the first packets of an idle connection can fall
    outside the edges it relearns, and are dropped as invalid (seen in the failover
    drill: a few idle connections in every thousand). Unless ``window_tracking`` is
    asked for, TCP entries are therefore written with BE_LIBERAL in both directions, as
    conntrackd does by default (TCPWindowTracking off); only out-of-window RSTs are
    still refused on them. (Entries without a timeout get
    :data:`DEFAULT_COMMIT_TIMEOUT`: a create needs one.)
    """
    return 0 if window_tracking else _LIBERAL


@dataclass
class ResyncRecord:
    """The last completed resync, for ``status``."""

    direction: str
    full: bool
    finished_at: float
    duration: float
    entries: int


#: Told what a write applied: the ``(packed key, record)`` pairs written and the keys
#: deleted (see :meth:`replicator.mirror.Mirror.note_written`).
Wrote = Callable[[list[tuple[bytes, bytes]], list[bytes]], None]


def _refused_keys(result: InjectResult) -> set[bytes]:
    """The packed keys of the entries a write's kernel refused."""
    return {R.key(failure.entry) for failure in result.errors}


class KernelWriter:
    """Hot mode: the peer's changes waiting to be written to this node's kernel.

    Changes are coalesced by key (the newest wins, ``None`` = delete), so a burst of
    updates to the same entries costs one write each and memory is bounded by the
    number of distinct entries. One task drains it in batches.

    Upserts are external-cache records (:mod:`replicator.record`): each is written
    with the time left until its deadline when it is written (a copy must not outlive
    the original, however long it waited here), as a commit writes them
    (:meth:`~replicator.kernel.KernelPort.upsert_records`, the usual entries straight
    from their records). Those whose key ``known`` holds (the kernel's table as this
    node's mirror sees it) are written as updates first, the rest as creates.
    """

    def __init__(self, kernel: KernelPort, metrics: Metrics, *,
                 window_tracking: bool = False, known: AbstractSet[bytes] = frozenset(),
                 wrote: Wrote | None = None) -> None:
        self._kernel = kernel
        self._metrics = metrics
        self._wrote = wrote
        self._tcp_flags = copy_tcp_flags(window_tracking)
        self._known = known
        #: packed key -> record, or None (delete).
        self._pending: dict[bytes, bytes | None] = {}
        self._wake = trio.Event()
        self._idle = trio.Event()
        self._idle.set()
        #: Entries the kernel refused, by errno (also exported as a metric).
        self.errors: dict[int, int] = {}
        self.written = 0
        #: Writes that failed as a whole and were tried again (see :meth:`run`).
        self.failures = 0

    def __len__(self) -> int:
        return len(self._pending)

    def put(self, records: Iterable[bytes], keys: Sequence[bytes] | None = None) -> None:
        """Queue upserts of external-cache ``records`` (``keys``: their packed keys, in
        the same order, if the caller has them)."""
        records = records if isinstance(records, (list, tuple)) else list(records)
        if keys is None:
            keys = R.keys_of(records)
        # Later records of a key win, as one assignment each would.
        self._pending.update(zip(keys, records, strict=True))
        self._woken()

    def put_deletes(self, entries: Iterable[Entry]) -> None:
        """Queue deletes of ``entries`` (by key)."""
        pending, key = self._pending, R.key
        for entry in entries:
            pending[key(entry)] = None
        self._woken()

    def _woken(self) -> None:
        if self._pending:
            self._idle = trio.Event() if self._idle.is_set() else self._idle
            self._wake.set()

    def discard(self) -> None:
        """Forget everything queued (this node became MASTER: it owns its table now)."""
        self._pending.clear()

    async def wait_idle(self) -> None:
        """Return once everything queued so far has been written."""
        while self._pending or not self._idle.is_set():
            await self._idle.wait()

    async def run(self) -> None:
        """Write queued changes forever.

        A write that fails as a whole (the netlink socket refusing a datagram, e.g.
        ``ENOMEM`` under memory pressure; not the kernel refusing entries, which
        :meth:`record` counts) leaves the changes it had not done queued under
        whatever came since (the newer state wins) and is tried again as
        :data:`~replicator.kernel.KERNEL_RETRY` says: a hot standby keeps running and
        loses none of the peer's changes.
        """
        failed = 0
        while True:
            if not self._pending:
                self._idle.set()
                await self._wake.wait()
                self._wake = trio.Event()
                continue
            batch, self._pending = self._pending, {}
            try:
                await self._write(batch)
            except (KernelError, OSError) as exc:
                for key, rec in batch.items():
                    self._pending.setdefault(key, rec)
                failed += 1
                self.failures += 1
                delay = KERNEL_RETRY.capped(failed - 1)
                log.warning("writing the peer's entries failed; retrying", extra=fields(
                    error=str(exc), entries=len(batch), retry_in=delay))
                await trio.sleep(delay)
                continue
            failed = 0

    async def _write(self, batch: dict[bytes, bytes | None]) -> None:
        """Write one batch of queued changes (upserts, then deletes); the upserts are
        taken out of ``batch`` once done, so it holds what is left if a part fails."""
        known = self._known
        # A step at a time over the whole batch (a burst's is thousands of upserts),
        # each list in the batch's order.
        upserts = [(key, rec) for key, rec in batch.items() if rec is not None]
        deleted = ([key for key, rec in batch.items() if rec is None]
                   if len(upserts) != len(batch) else [])
        deletes = [Entry(k[0], k[2], k[2], zone=k[1]) for k in map(R.unpack_key, deleted)]
        if known.isdisjoint(batch):
            # The usual case, new entries only: one test in C for the whole batch (a
            # test per key went through InternalCache.__contains__, 0.1 ms a batch of
            # 200 on a hot standby).
            new, existing = [rec for _, rec in upserts], []
        else:
            new = [rec for key, rec in upserts if key not in known]
            existing = [rec for key, rec in upserts if key in known]
        if upserts:
            result = await self._kernel.upsert_records(
                new, trio.current_time(), no_timeout=DEFAULT_COMMIT_TIMEOUT,
                tcp_flags=self._tcp_flags, existing=existing)
            self.record(result, "upsert")
            if self._wrote is not None:
                refused = _refused_keys(result)
                self._wrote([(k, r) for k, r in upserts if k not in refused]
                            if refused else upserts, [])
            # Done (written, or refused and counted): should the deletes fail as a
            # whole, only they are queued again.
            if deleted:
                for key, _ in upserts:
                    del batch[key]
            else:
                batch.clear()
        if deletes:
            result = await self._kernel.delete(deletes)
            self.record(result, "delete")
            if self._wrote is not None:
                refused = _refused_keys(result)
                self._wrote([], [k for k in deleted if k not in refused])

    def record(self, result: InjectResult, what: str) -> None:
        """Count a write's outcome; log its failures (one line per errno)."""
        self.written += result.applied
        by_errno: dict[int, int] = {}
        for failure in result.errors:
            by_errno[failure.errno] = by_errno.get(failure.errno, 0) + 1
        for number, count in by_errno.items():
            name = errno_mod.errorcode.get(number, str(number))
            self.errors[number] = self.errors.get(number, 0) + count
            self._metrics.injection_errors.labels(errno=name).inc(count)
            log.warning(
                "kernel refused entries",
                extra=fields(op=what, errno=name, count=count,
                             example=ctformat.format_entry(result.errors[0].entry)),
            )


class Daemon:
    """One replicator node. Use :meth:`run` inside a nursery (``nursery.start``)."""

    def __init__(
        self,
        config: Config,
        kernel: KernelPort,
        *,
        config_path: Path | None = None,
        environ: dict[str, str] | None = None,
        addresses: Callable[[str | None], set[IPAddress]] = held_addresses,
    ) -> None:
        self.config = config
        #: Reads the addresses of the node's interfaces (see :mod:`replicator.viprole`).
        self._addresses = addresses
        self.config_path = config_path
        self.kernel = kernel
        self.hot = config.sync.mode == "hot"
        self.epoch = secrets.randbits(64)
        self.metrics = Metrics()
        # Hot mode: the echoes of the peer's entries written into the kernel are not
        # read; the writer says what it wrote (see the mirror's module doc).
        self.mirror = Mirror(kernel, publish=self._on_local_changes, ignore_echoes=self.hot,
                             after_publish=self._turns_for_the_driver)
        # The session stores the mirror's records (one object per entry, not two).
        self.session = SyncSession(
            config.node.name, self.epoch, params=sync_params(config),
            accept=build_entry_filter(config), restamped=self.mirror.cache.restamp,
        )
        self.writer = KernelWriter(kernel, self.metrics,
                                   window_tracking=config.kernel.tcp_window_tracking,
                                   known=self.mirror.cache.keys(),
                                   wrote=self.mirror.note_written)
        self.machine = RoleMachine(hot=False, follow=config.keepalived.vrrp_name)
        self.runner = RoleRunner(self.machine, self.perform)
        self._environ: dict[str, str] = dict(os.environ if environ is None else environ)
        self.notifier = Notifier(self._environ)
        self.link: PeerLink | None = None
        self.last_resync: ResyncRecord | None = None
        self.started_at = 0.0
        self.protocol_violations = 0
        #: Why the last connection to the peer was closed by this side, if it broke the
        #: protocol (a peer of another protocol version, a corrupt message) and no
        #: connection has been established since: ``check`` and ``status`` say it.
        self._last_violation: str | None = None
        self._conn: FramedConnection | None = None
        self._conn_scope: trio.CancelScope | None = None
        self._wake = trio.Event()
        self._resync_done = trio.Event()
        self._snapshot_lock = trio.Lock()
        self._metrics_server: MetricsServer | None = None
        self._nursery: trio.Nursery | None = None
        #: Hot standby: keys of the copies this daemon had written into the kernel for
        #: the peer when the external cache was flushed. Until the peer's full resync
        #: completes they are neither ours nor known to be the peer's; then those the
        #: peer no longer has are deleted (a delete sent meanwhile found no copy).
        self._flushed_copies: set[bytes] = set()
        #: This node's key and certificate as loaded at start (a reload keeps them).
        self.identity: NodeIdentity | None = None
        self._driver_beat = 0.0
        #: The external cache was a complete copy of the peer's table at least once.
        self._held_copy = False

    # --- helpers ----------------------------------------------------------------------

    def now(self) -> float:
        """This node's monotonic clock (trio's, so tests can use a MockClock)."""
        return trio.current_time()

    def wake(self) -> None:
        """Make the driver flush the session's output."""
        self._wake.set()

    @property
    def role(self) -> Role:
        """The keepalived role as the role machine knows it."""
        return self.machine.role

    @property
    def applies_peer_to_kernel(self) -> bool:
        """Hot mode, and not MASTER (INIT included: until keepalived says otherwise a
        node must not write the peer's state over a table it might own)."""
        return self.hot and self.machine.role in (Role.BACKUP, Role.FAULT, Role.STOPPED)

    def _own_table(self) -> Iterable[tuple[bytes, bytes]]:
        """This node's own entries in its kernel table, for a re-read of the kernel, as
        the mirror's (packed key, record) pairs.

        Everything, except on a hot standby: there the entries the peer holds were
        written by this daemon on the peer's behalf (their events are echoes and never
        published), and a re-dump must not make them ours and stream them back.
        """
        items = self.mirror.cache.items()
        peers = self._peers_key()
        return items if peers is None else [(k, r) for k, r in items if not peers(k)]

    def _own_changes(self, changes: list[Change]) -> list[Change]:
        """The changes of this node's own entries (see :meth:`_own_table`): on a hot
        standby, a re-read of the kernel finds the copies it wrote as the kernel holds
        them, not as the mirror was told (:meth:`Mirror.note_written`): they are the
        peer's, not changes to send it."""
        peers = self._peers_key()
        return changes if peers is None else [c for c in changes if not peers(c.key)]

    def _peers_key(self) -> Callable[[bytes], bool] | None:
        """On a hot standby, whether a key in its kernel is the peer's (an entry of its
        external cache, or a copy flushed from it and not yet confirmed); ``None``
        elsewhere (every entry in the kernel is this node's own)."""
        if not self.applies_peer_to_kernel:
            return None
        external, flushed = self.session.external, self._flushed_copies
        return lambda key: key in external or key in flushed

    async def _reread_kernel(self) -> None:
        """Dump the kernel, reconcile the mirror, and make the result the local table.

        For the periodic refresh (timeouts), operator resyncs and promotion: the dump
        also catches entries whose events were echoes and so never published.
        """
        await self.mirror.resync()
        # In parts, reading events in between (a 250 k-entry table took 0.5 s in one
        # go); what events change meanwhile is newer and wins (see the session). One
        # snapshot at a time: re-reads overlap (the periodic refresh, a role change,
        # an operator's resync) and the session holds a single snapshot.
        async with self._snapshot_lock:
            items = list(self._own_table())
            session = self.session
            session.begin_local_snapshot()
            try:
                for start in range(0, len(items), SNAPSHOT_STEP):
                    session.local_snapshot_part(items[start:start + SNAPSHOT_STEP],
                                                self.now())
                    self.wake()
                    await trio.lowlevel.checkpoint()
                session.finish_local_snapshot(self.now())
            finally:
                if session.snapshot_running:
                    session.abort_local_snapshot()
        self.wake()

    # --- inputs -----------------------------------------------------------------------

    def _on_local_changes(self, changes: list[Change]) -> None:
        changes = self._own_changes(changes)
        if changes:
            self.session.local_changes(changes, self.now())
            self.wake()

    def _drop_stale_copies(self) -> None:
        """After the peer's full resync: delete the flushed copies it no longer has."""
        flushed, self._flushed_copies = self._flushed_copies, set()
        if not self.applies_peer_to_kernel:
            return
        external, cache = self.session.external, self.mirror.cache
        stale = [e for k in flushed if k not in external and (e := cache.get(k)) is not None]
        if stale:
            self.writer.put_deletes(stale)
            log.info("stale copies removed", extra=fields(entries=len(stale)))

    # --- the driver -------------------------------------------------------------------

    async def _drive(self) -> None:
        session = self.session
        while True:
            now = self.now()
            self._driver_beat = now
            deadline = session.next_timer()
            if deadline is not None and deadline <= now:
                session.handle_timer(now)
            await self._flush(now)
            deadline = session.next_timer()
            # Wake at least every DRIVER_BEAT seconds: the beat is what the watchdog
            # checks, so an idle but healthy driver must still show it is alive.
            beat = now + DRIVER_BEAT
            with trio.move_on_at(beat if deadline is None else min(deadline, beat)):
                await self._wake.wait()
            self._wake = trio.Event()

    async def _turns_for_the_driver(self) -> None:
        """Awaited by the event reader after each batch it published (see
        :class:`~replicator.mirror.Mirror`): a few turns of the event loop, in which the
        driver, woken by the batch, gets its frames out.

        trio runs tasks in turns, and the driver's send takes several (TLS's inner lock,
        the socket's own checkpoint): in a burst each of them was a whole read of
        thousands of events by the reader, so the frames left several reads late
        (measured: a 10 k burst's frames 10 ms behind its events). The reader does not
        send itself: a send waits when the peer is slow, and the reader must go on
        reading events meanwhile (the kernel drops what its socket cannot hold)."""
        for _ in range(DRIVER_TURNS):
            await trio.lowlevel.checkpoint()

    async def _flush(self, now: float) -> None:
        session = self.session
        conn = self._conn
        frames = session.frames_to_send(now)
        self._dispatch_entries()
        if conn is not None:
            try:
                await conn.send_frames(frames)
            except ReplicatorError as exc:
                # The connection broke mid-send: the handler's receive side sees it too
                # and calls connection_lost; the session resends what was lost.
                log.info("peer send failed", extra=fields(error=exc))
        for event in session.events():
            self._on_event(event)

    def _dispatch_entries(self) -> None:
        """Handle the session's events now if they only carry the peer's entries: a
        hot standby's writer gets them without waiting for a send or a turn of the
        driver. Any other event waits for the driver's frames to be sent, as it may end
        the connection (a CLOSE queued for the peer goes first), and the entries queued
        with it wait too, so that events are handled in order."""
        for event in self.session.events_if_only(_ENTRY_EVENTS):
            self._on_event(event)

    def _on_event(self, event: object) -> None:
        m = self.metrics
        if isinstance(event, PeerUpserts):
            if self.applies_peer_to_kernel:
                self.writer.put(event.records, event.keys)
        elif isinstance(event, PeerDeletes):
            if self.applies_peer_to_kernel:
                self.writer.put_deletes(event.entries)
        elif isinstance(event, PeerHello):
            self._last_violation = None
            log.info("peer hello", extra=fields(peer=event.node_id, epoch=event.epoch,
                                                restarted=event.restarted))
        elif isinstance(event, ResyncStarted):
            log.info("resync started", extra=fields(direction=event.direction,
                                                    full=event.full, id=event.resync_id))
        elif isinstance(event, ResyncCompleted):
            kind = "peer" if event.full else "digest"
            m.resyncs.labels(kind=kind).inc()
            self.last_resync = ResyncRecord(event.direction, event.full, self.now(),
                                            event.duration, event.entries)
            if event.direction == "send":
                self._resync_done.set()
                self._resync_done = trio.Event()
            elif event.full and self._flushed_copies:
                self._drop_stale_copies()
            log.info("resync completed", extra=fields(
                direction=event.direction, full=event.full, seconds=round(event.duration, 3),
                buckets=event.buckets, entries=event.entries))
        elif isinstance(event, InSync):
            if event.in_sync:
                self._held_copy = True
            log.info("in sync" if event.in_sync else "out of sync",
                     extra=fields(peer=self.session.peer_node_id))
        elif isinstance(event, ProtocolViolation):
            self.protocol_violations += 1
            self._last_violation = event.reason
            log.warning("peer protocol violation", extra=fields(reason=event.reason))
        elif isinstance(event, ConnectionTerminated):
            log.info("peer connection closed", extra=fields(reason=event.reason,
                                                            by_peer=event.by_peer))
            if self._conn_scope is not None:
                self._conn_scope.cancel()

    # --- the peer connection ----------------------------------------------------------

    async def _serve_peer(self, conn: FramedConnection) -> None:
        """PeerLink handler: one authenticated connection at a time."""
        session = self.session
        log.info("peer connected", extra=fields(peer=conn.peer_address,
                                                fingerprint=conn.peer_fingerprint))
        self.metrics.peer_up.set(1)
        with trio.CancelScope() as scope:
            self._conn, self._conn_scope = conn, scope
            session.connection_made(self.now())
            self.wake()
            try:
                while True:
                    payload = await conn.receive_frame()
                    session.receive(payload, self.now())
                    self._dispatch_entries()
                    self.wake()
            except ReplicatorError as exc:
                log.info("peer connection lost", extra=fields(error=exc))
            finally:
                self._conn = self._conn_scope = None
                session.connection_lost(self.now())
                self.metrics.peer_up.set(0)
                self.wake()

    # --- periodic work ----------------------------------------------------------------

    async def _refresh_loop(self) -> None:
        """Re-dump the kernel now and then so refreshed timeouts reach the peer."""
        interval = self.config.kernel.refresh_interval
        if interval is None:
            return
        while True:
            await trio.sleep(interval)
            await self._reread_kernel()

    async def _watch(self, period: float) -> None:
        """Metrics gauges, systemd STATUS and watchdog, every ``period`` seconds."""
        watchdog = watchdog_interval(self._environ)
        while True:
            now = self.now()
            self._update_gauges(now)
            # A driver that has not come round for several beats is wedged (a blocking
            # call on the event loop, or a bug): stop the pings and let systemd act.
            healthy = now - self._driver_beat < 5 * DRIVER_BEAT
            if watchdog is not None and healthy:
                self.notifier.watchdog()
            self.notifier.status(self._status_line())
            await trio.sleep(min(period, watchdog / 2) if watchdog else period)

    def _update_gauges(self, now: float) -> None:
        m, s = self.metrics, self.session
        m.entries.labels(cache="internal").set(s.local_count)
        m.entries.labels(cache="external").set(len(s.external))
        m.entries.labels(cache="kernel").set(len(self.mirror.cache))
        m.replication_lag.set(s.replication_lag(now))
        m.in_sync.set(1 if self._check()[0] else 0)
        m.role.state(self.machine.role.value)
        stats = s.stats
        _sync_counter(m.messages.labels(direction="sent"), stats.messages_sent)
        _sync_counter(m.messages.labels(direction="received"), stats.messages_received)
        _sync_counter(m.bytes.labels(direction="sent"), stats.bytes_sent)
        _sync_counter(m.bytes.labels(direction="received"), stats.bytes_received)
        _sync_counter(m.enobufs, self.mirror.stats.overruns)
        _sync_counter(m.undecodable_events, self.mirror.stats.undecodable)
        _sync_counter(m.event_socket_failures, self.mirror.stats.subscription_failures)
        _sync_counter(m.resyncs.labels(kind="kernel"),
                      max(0, self.mirror.stats.reconciliations - 1))
        if self.link is not None:
            for reason, count in self.link.stats.refused.items():
                _sync_counter(m.auth_failures.labels(reason=str(reason)), count)

    def _status_line(self) -> str:
        s = self.session
        peer = "up" if s.established else "down"
        return (f"role={self.machine.role.value} peer={peer} "
                f"internal={s.local_count} external={len(s.external)}")

    # --- role actions -----------------------------------------------------------------

    async def perform(self, action: Action) -> None:
        """Carry out one role action (called by the RoleRunner, one at a time)."""
        now = self.now()
        if action is Action.COMMIT:
            report = await self.commit_external()
            log.info("commit done", extra=fields(**report))
        elif action is Action.BECOME_SENDER:
            # A master owns its table: stop writing the peer's state into the kernel,
            # and make everything in the kernel ours to send. The entries we wrote
            # (hot-mode injections, the commit just done) came back as echoes, which
            # the mirror caches but never publishes, so re-read the table and hand the
            # whole of it to the session before the bulk send that follows (the role
            # is MASTER by now, so the whole table is ours).
            self.writer.discard()
            self._flushed_copies.clear()
            await self._reread_kernel()
        elif action is Action.BULK_SEND:
            self.session.bulk_send(now)
            self.wake()
        elif action is Action.BECOME_RECEIVER:
            if self.mirror.stale:
                # A commit ran (the role changed back during it): its echoes were not
                # read, so the mirror needs the re-read promotion would have done.
                await self._reread_kernel()
            if self.hot:
                # Load the kernel with the peer's table as it stands; later changes
                # follow as PeerUpserts/PeerDeletes.
                self.writer.put(self.session.external.records())
        elif action is Action.SHORTEN_TIMERS:
            count = await self.shorten()
            log.info("timers shortened", extra=fields(entries=count))
        elif action is Action.REQUEST_RESYNC:
            self.session.request_resync(now)
            self.wake()

    async def commit_external(self) -> CommitReport:
        """Write the external cache into the kernel (``conntrackd -c``)."""
        with COLLECTOR_PAUSE:
            return await self._commit_external()

    async def _commit_external(self) -> CommitReport:
        start = self.now()
        records = list(self.session.external.records())
        existing: list[bytes] = []
        have = self.mirror.cache
        if self.hot:
            # Hot mode: the kernel already holds the peer's entries; write what is
            # missing (normally nothing) after the queued writes have landed.
            await self.writer.wait_idle()
            records = [r for r in records if R.key_of(r) not in have]
        elif len(have) and not self.mirror.stale:
            # A node that was master not long ago still holds its entries (timers
            # shortened): update those instead of trying to create them (a refused
            # create costs as much as the update that follows it).
            key_of, new = R.key_of, list[bytes]()
            for r in records:
                (existing if key_of(r) in have else new).append(r)
            records = new
        # The echoes of a whole-table write are not decoded (see Mirror.echoes_ignored):
        # the caller re-reads the kernel afterwards (promotion does anyway). The entries
        # are written with the time left to their deadlines and copy_tcp_flags(), the
        # usual ones straight from their records (see LinuxKernel.upsert_records).
        with self.mirror.echoes_ignored():
            result = await self.kernel.upsert_records(
                records, start, no_timeout=DEFAULT_COMMIT_TIMEOUT,
                tcp_flags=copy_tcp_flags(self.config.kernel.tcp_window_tracking),
                existing=existing, takeover=True)
        self.writer.record(result, "commit")
        seconds = self.now() - start
        self.metrics.commit_duration.observe(seconds)
        return {"applied": result.applied, "failed": len(result.errors),
                "seconds": round(seconds, 6)}

    async def shorten(self) -> int:
        """Cap the kernel timeout of entries this node no longer owns (``conntrackd -t``)."""
        limit = self.config.keepalived.shorten_timeout
        external = self.session.external
        # Select from a fresh dump: cached timeouts are those of each entry's last event
        # (the kernel reports no event when a timeout runs down or a packet refreshes
        # it), and the echoes of earlier writes may not have been read yet.
        await self.mirror.resync()
        targets = [
            e._replace(timeout=limit)
            for e in self.mirror.cache
            if (e.timeout is None or e.timeout > limit)
            and not (self.hot and R.key(e) in external)
        ]
        if targets:
            self.writer.record(await self.kernel.upsert(targets), "shorten")
        return len(targets)

    # --- checks -----------------------------------------------------------------------

    def _check(self) -> tuple[bool, str]:
        """Could this node take over now without losing state? (``replicator check``)."""
        s = self.session
        if self.machine.role is Role.MASTER:
            return True, ""
        # Only the first dump counts: later re-dumps (every kernel.refresh_interval, or
        # after an overrun) concern this node's own table, not the peer's copy a
        # takeover needs, and must not make `check` fail while they run.
        if self.mirror.stats.reconciliations == 0:
            return False, "kernel table not mirrored yet"
        # Like pfsync's bulk update: a node refuses mastership until it has held a
        # complete copy of the peer's table once since it started. After that, losing
        # the peer (it may well be dead: that is when a takeover matters most) or a
        # reconnection's catch-up does not make the copy worthless; refusing then
        # would keep a dead master's VIPs where they are.
        if not self._held_copy:
            if not s.established:
                if self._last_violation is not None:
                    # Say why, e.g. the peer speaks another protocol version (an
                    # upgrade half done): the journal is not where an operator looks.
                    return False, f"peer not connected: {self._last_violation}"
                return False, "peer not connected"
            if not s.in_sync:
                return False, "first resync from the peer not complete"
        if self.hot and len(self.writer):
            return False, f"{len(self.writer)} peer entries not yet written to the kernel"
        return True, ""

    # --- the control handler ----------------------------------------------------------

    async def status(self) -> StatusReport:
        """``replicator status``."""
        now = self.now()
        s = self.session
        ok, reason = self._check()
        last: ResyncReport | None = None
        if self.last_resync is not None:
            r = self.last_resync
            last = {"direction": r.direction, "full": r.full,
                    "seconds_ago": round(now - r.finished_at, 3),
                    "duration_seconds": round(r.duration, 6), "entries": r.entries}
        sc = self.config.sync
        return {
            "node": self.config.node.name,
            "role": self.machine.role.value,
            "mode": sc.mode,
            "peer": f"{s.peer_node_id or '?'}@{_endpoint(sc.peer_address, sc.peer_port)}",
            "peer_up": s.established,
            "in_sync": ok,
            "reason": reason,
            "entries": {"internal": s.local_count, "external": len(s.external),
                        "kernel": len(self.mirror.cache)},
            "replication_lag_seconds": round(s.replication_lag(now), 6)
            if s.established else None,
            "uptime_seconds": round(now - self.started_at, 3),
            "epoch": self.epoch,
            "last_resync": last,
        }

    async def stats(self) -> StatsReport:
        """``replicator stats``: replication counters and the kernel's conntrack statistics."""
        out: dict[str, float] = {}
        for name, value in vars(self.session.stats).items():
            out[f"sync_{name}"] = float(value)
        for name, value in vars(self.mirror.stats).items():
            out[f"mirror_{name}"] = float(value)
        out["kernel_writes"] = float(self.writer.written)
        out["kernel_write_failures"] = float(self.writer.failures)
        for number, count in self.writer.errors.items():
            out[f"kernel_errors_{errno_mod.errorcode.get(number, str(number))}"] = float(count)
        out["protocol_violations"] = float(self.protocol_violations)
        # Queue sizes (coalesced by key, so bounded by distinct entries, not events).
        out["sync_pending"] = float(self.session.pending_count)
        out["kernel_writes_pending"] = float(len(self.writer))
        if self.link is not None:
            for reason, count in self.link.stats.refused.items():
                out[f"link_refused_{reason}"] = float(count)
            out["link_established"] = float(self.link.stats.established)
        out.update(await trio.to_thread.run_sync(kernel_conntrack_stats, self.config.kernel.netns))
        return out

    async def dump(self, cache: CacheName) -> DumpReport:
        """``replicator dump``: the cache as ``conntrack -L -o extended`` lines."""
        if cache is CacheName.INTERNAL:
            entries: Iterable[Entry] = self.session.local_entries()
        else:
            entries = self.session.external.commit_set(self.now())
        lines = sorted(ctformat.format_entry(e) for e in entries)
        return {"cache": cache.value, "entries": lines}

    async def commit(self) -> CommitReport:
        """``replicator commit``."""
        report = await self.commit_external()
        if self.mirror.stale and self._nursery is not None:
            # The mirror skipped the commit's echoes: re-read the kernel, but after
            # answering (conntrackd -c also returns once the kernel has the entries).
            self._nursery.start_soon(self._reread_kernel)
        return report

    async def flush(self, cache: CacheName) -> CountReport:
        """``replicator flush``: empty a cache and refill it from its source."""
        if cache is CacheName.INTERNAL:
            count = self.session.local_count
            await self._reread_kernel()
            return {"count": count, "detail": "internal cache re-read from the kernel"}
        count = len(self.session.external)
        if self.applies_peer_to_kernel:
            self._flushed_copies.update(k for k, _ in self.session.external.table.items())
        self.session.external.clear()
        self.session.request_resync(self.now())
        self.wake()
        return {"count": count, "detail": "external cache emptied; full resync requested"}

    async def resync(self, source: ResyncSource) -> CountReport:
        """``replicator resync --kernel|--peer``."""
        if source is ResyncSource.KERNEL:
            await self._reread_kernel()
            return {"count": len(self.mirror.cache), "detail": "kernel table re-read"}
        if not self.session.established:
            raise ControlError("peer not connected")
        self.session.request_resync(self.now())
        self.wake()
        return {"count": len(self.session.external),
                "detail": "full resync requested from the peer"}

    async def bulk_send(self) -> CountReport:
        """``replicator bulk-send``."""
        self.session.bulk_send(self.now())
        self.wake()
        return {"count": self.session.local_count, "detail": "full resync to the peer started"}

    async def shorten_timers(self) -> CountReport:
        """``replicator shorten-timers``."""
        count = await self.shorten()
        return {"count": count,
                "detail": f"timeouts capped at {self.config.keepalived.shorten_timeout} s"}

    async def notify(self, event: VrrpEvent) -> NotifyReport:
        """``replicator notify``: a keepalived line."""
        result = self.runner.feed(event)
        return {"verdict": result.verdict.value, "role": self.machine.role.value}

    async def check(self) -> CheckReport:
        """``replicator check`` (keepalived ``track_script``)."""
        ok, reason = self._check()
        return {"ok": ok, "reason": reason}

    async def verify(self) -> VerifyReport:
        """``replicator verify``: digest comparison of our table with the peer's copy.

        Runs a digest resync towards the peer and waits for it: the peer answers with
        the digest of every bucket of its copy of our table; buckets that differ are
        resent. Also compares, entry by entry, what this node can see locally: the
        session's view of the kernel, and (hot mode, as a standby) the kernel against
        the peer's entries.
        """
        problems: list[str] = []
        if not self.session.established:
            raise ControlError("peer not connected")
        done = self._resync_done
        self.session.last_differing_buckets = ()
        self.session.start_digest_resync(self.now())  # else: the running one answers
        self.wake()
        with trio.move_on_after(30) as scope:
            await done.wait()
        if scope.cancelled_caught:
            raise ControlError("the peer did not complete the digest comparison in 30 s")
        # Entries of every bucket whose digest differed on the peer: the differing
        # entries are among them (a bucket holds table size / sync.buckets entries).
        differing: tuple[int, ...] = self.session.last_differing_buckets
        for bucket in differing:
            entries_of = self.session.local_bucket(bucket)
            problems.append(f"bucket {bucket} differed on the peer ({len(entries_of)} "
                            "entries here; resent to repair it)")
            problems.extend("  " + ctformat.format_entry(e) for e in entries_of)
        checked = self.session.local_count
        if self.applies_peer_to_kernel:
            await self.writer.wait_idle()
            # The mirror must be complete and true: after a commit (which receives no
            # events of its writes) it is stale until re-read, and a hot standby's
            # holds the copies as written, not as the kernel reports them.
            if self.mirror.stale or self.mirror.ignores_echoes:
                await self.mirror.resync()
            else:
                await self.mirror.wait_synced()
            kernel = self.mirror.cache
            for entry in self.session.external.entries():
                checked += 1
                if R.key(entry) not in kernel:
                    problems.append("missing in kernel: " + ctformat.format_entry(entry))
        return {"ok": not problems, "checked": checked, "problems": problems[:1000]}

    # --- reload -----------------------------------------------------------------------

    def reload(self) -> None:
        """SIGHUP: apply what can change live, say what needs a restart."""
        if self.config_path is None:
            return
        self.notifier.reloading()
        try:
            new = load_config(self.config_path)
        except ReplicatorError as exc:
            log.error("reload refused, keeping the running configuration",
                      extra=fields(error=exc))
            self.notifier.ready(self._status_line())
            return
        diff = diff_reloadable(self.config, new)
        if any(k.startswith("log.") for k in diff.live):
            set_level(new.log.level)
        if any(k.startswith("filters.") for k in diff.live):
            self.session.set_filter(build_entry_filter(new), self._own_table(), self.now())
            self.wake()
        if (any(k.startswith("tls.") for k in diff.live) and self.link is not None
                and self.identity is not None):
            try:
                t = new.tls
                self.link.set_credentials(
                    peer_credentials(self.identity, t.peer_certs, t.peer_fingerprints))
            except ReplicatorError as exc:
                log.error("reload: keeping the old peer credentials", extra=fields(error=exc))
        # Tables that need a restart keep their running values.
        old = self.config
        self.config = replace(new, node=old.node, sync=old.sync, kernel=old.kernel,
                              control=old.control, metrics=old.metrics,
                              tls=replace(new.tls, key=old.tls.key, cert=old.tls.cert))
        if diff.restart:
            log.warning("reload: these keys need a restart to take effect",
                        extra=fields(keys=",".join(diff.restart)))
        log.info("reloaded", extra=fields(live=",".join(diff.live) or "-"))
        self.notifier.ready(self._status_line())

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGHUP) as signals:
            async for _ in signals:
                self.reload()

    # --- run --------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Run until cancelled. ``task_status.started()`` once ready (READY=1 too)."""
        cfg = self.config
        self.started_at = self.now()
        self.identity = load_identity(cfg.tls.key, cfg.tls.cert)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                # The mirror's first reconciliation publishes the whole table to the
                # session, so the session starts with a full local table.
                await nursery.start(self.mirror.run)
                nursery.start_soon(self._drive)
                nursery.start_soon(self.writer.run)
                nursery.start_soon(self._refresh_loop)
                await nursery.start(self.runner.run)
                self.link = PeerLink(
                    LinkSettings(
                        listen=(str(cfg.sync.listen_address), cfg.sync.listen_port),
                        dial=(str(cfg.sync.peer_address), cfg.sync.peer_port),
                        dial_source=str(cfg.sync.listen_address),
                        dead_peer_timeout=max(1.0, cfg.sync.timers.dead_interval),
                    ),
                    peer_credentials(self.identity, cfg.tls.peer_certs,
                                     cfg.tls.peer_fingerprints),
                    self._serve_peer,
                )
                await nursery.start(self.link.run)
                await nursery.start(self._serve_control)
                if cfg.keepalived.notify_fifo is not None:
                    await nursery.start(read_notify_fifo, cfg.keepalived.notify_fifo,
                                        self.runner.feed)
                if cfg.metrics.address is not None:
                    self._metrics_server = serve_metrics(self.metrics, cfg.metrics.address)
                nursery.start_soon(self._signals)
                nursery.start_soon(self._watch, 1.0)
                if cfg.keepalived.virtual_addresses:
                    await self._role_from_addresses()
                log.info("ready", extra=fields(node=cfg.node.name, mode=cfg.sync.mode,
                                               epoch=self.epoch,
                                               entries=len(self.mirror.cache)))
                self.notifier.ready(self._status_line())
                task_status.started()
        finally:
            self.notifier.stopping()
            if self._metrics_server is not None:
                self._metrics_server.close()

    async def _role_from_addresses(self) -> None:
        """Take the role the virtual addresses show, unless keepalived said one
        already (see :mod:`replicator.viprole`)."""
        k = self.config.keepalived
        try:
            held = await trio.to_thread.run_sync(self._addresses, self.config.kernel.netns)
        except (OSError, ReplicatorError) as exc:
            log.warning("could not read this node's addresses; the role waits for "
                        "keepalived's next transition", extra=fields(error=str(exc)))
            return
        state = role_from_addresses(k.virtual_addresses, held)
        if self.machine.role is not Role.INIT:
            return  # keepalived spoke meanwhile: its word stands
        if state is None:
            log.warning(
                "some virtual addresses held, not all; the role waits for keepalived's "
                "next transition",
                extra=fields(held=" ".join(str(a) for a in k.virtual_addresses if a in held),
                             missing=" ".join(str(a) for a in k.virtual_addresses
                                              if a not in held)))
            return
        log.info("role taken from the virtual addresses", extra=fields(state=state))
        self.runner.feed(VrrpEvent(VrrpKind.GROUP, k.vrrp_name or "addresses", state, 0))

    async def _serve_control(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                             ) -> None:
        c = self.config.control

        def denied(cred: Any) -> None:
            # serve_control logs the refusal itself; here it is only counted.
            self.metrics.auth_failures.labels(reason="control").inc()

        await serve_control(c.socket, self, group=c.group, mode=c.mode, on_denied=denied,
                            task_status=task_status)


def _endpoint(host: object, port: int) -> str:
    text = str(host)
    return f"[{text}]:{port}" if ":" in text else f"{text}:{port}"


def _sync_counter(counter: Any, value: float) -> None:
    """Bring a prometheus counter up to ``value`` (our counters are the source)."""
    current = counter._value.get()
    if value > current:
        counter.inc(value - current)


def kernel_conntrack_stats(netns: str | None) -> dict[str, float]:
    """The kernel's per-CPU conntrack statistics summed, like ``conntrack -S``.

    Read from ``/proc/net/stat/nf_conntrack`` (hex columns, one row per CPU, the
    first column being the global entry count), inside ``netns`` if given.
    """
    from .netns import entered

    with entered(netns):
        try:
            with open("/proc/net/stat/nf_conntrack") as fh:
                lines = fh.read().split("\n")
        except OSError as exc:
            raise KernelError(f"cannot read conntrack statistics: {exc}") from exc
    header = lines[0].split()
    totals: dict[str, float] = {}
    for row in lines[1:]:
        values = row.split()
        if len(values) != len(header):
            continue
        for name, value in zip(header, values, strict=True):
            key = f"kernel_{name}"
            if name == "entries":
                totals[key] = float(int(value, 16))  # global: the same on every row
            else:
                totals[key] = totals.get(key, 0.0) + int(value, 16)
    return totals


async def run_daemon(config_path: Path, *, netns: str | None = None) -> None:
    """``replicator run``: load the config, open the kernel, run until SIGTERM/SIGINT."""
    from .config import check_files
    from .kernel_linux import LinuxKernel

    config = load_config(config_path)
    check_files(config)
    setup_logging(config.log.level)
    # Decoding allocates several tuples per entry (the tables themselves hold only
    # bytes, which the collector does not track: record.py): with the default
    # thresholds the collector ran every few hundred allocations, which halved the sync
    # receive rate when the tables were tuples (bench/sync_core.py: ~60 k/s vs
    # 117-143 k/s). The dump path additionally freezes what it built (kernel_linux).
    gc.set_threshold(GC_THRESHOLD, 20, 20)
    kernel_netns = netns if netns is not None else config.kernel.netns
    apply_conntrack_events_policy(config.kernel.conntrack_events, kernel_netns)
    async with LinuxKernel(kernel_netns, event_rcvbuf=config.kernel.rcvbuf_bytes) as kernel:
        daemon = Daemon(config, kernel, config_path=config_path)
        async with trio.open_nursery() as nursery:
            await nursery.start(daemon.run)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    log.info("stopping", extra=fields(signal=signal.Signals(signum).name))
                    nursery.cancel_scope.cancel()
                    break


def apply_conntrack_events_policy(policy: str, netns: str | None) -> None:
    """``kernel.conntrack_events``: enable (set 1), require (refuse unless 1), leave."""
    from .netns import entered

    if policy == "leave":
        return
    path = "/proc/sys/net/netfilter/nf_conntrack_events"
    with entered(netns):
        try:
            with open(path) as fh:
                current = fh.read().strip()
            if current != "1":
                if policy == "require":
                    raise KernelError(
                        f"net.netfilter.nf_conntrack_events is {current}, "
                        "kernel.conntrack_events = \"require\" needs 1")
                with open(path, "w") as fh:
                    fh.write("1\n")
        except OSError as exc:
            raise KernelError(f"{path}: {exc}") from exc
