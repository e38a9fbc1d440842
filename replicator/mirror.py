"""The mirror: the trio task that keeps the internal cache equal to the kernel table.

Theory of operation
-------------------
1. Subscribe to events *first*, then dump (on the port's second socket) and reconcile.
   With ``nf_conntrack_events=2`` (the kernel default) entries that existed before the
   subscription never produce events, and conntrackd's order (dump, then subscribe)
   loses whatever changes in between; this order loses nothing. The mirror therefore
   does not need ``nf_conntrack_events=1`` and leaves that sysctl alone: entries made
   before the daemon started are caught by the dump, and every connection created
   afterwards has a listener and produces events.
2. Fold every event batch into the :class:`~replicator.cache.InternalCache`.
3. On an :class:`~replicator.kernel.Overrun` (ENOBUFS, or datagrams that could not be
   decoded and were skipped: events were lost either way), keep reading
   events and run a resync in the background: dump on the second socket, reconcile with
   the rule in :mod:`replicator.cache`. An overrun during a resync makes that dump doubtful
   (the lost events may be newer than its view), so another resync follows it. The dump
   starts once overruns have stopped for a moment (:meth:`Mirror._quiet`): during a
   burst, every dump would be invalidated by the next overrun anyway.
4. Should the event socket fail with an error other than ENOBUFS (none has been seen:
   the kernel reports a full queue that way, and nothing else on a read), subscribe
   again, then dump and reconcile as after an overrun: the same order as at start-up,
   so the changes of the gap come with the dump. The first attempt is immediate, then
   backing off (:data:`~replicator.kernel.KERNEL_RETRY`); each failure is counted and
   logged. Stopping the daemon instead would stop replication, and a restart does the
   same thing with more lost.
5. Publish every change to the consumer (the sync layer) as
   :class:`~replicator.cache.Change` ``(key, record, entry)`` batches, except the echoes
   of our own injector (events carrying the port's ``injector_portid``): those are cached
   but not published, so the standby never sends the active's own state back. Changes
   found by a reconciliation are published whatever caused them.
6. With ``ignore_echoes`` (a hot standby, which writes the peer's whole table into its
   kernel), the echoes are not even read: the subscription drops them by port id, and
   the writer reports what it wrote instead (:meth:`Mirror.note_written`). Decoding
   them was a third of a hot standby's CPU during a burst; the Linux port has the
   kernel drop them before they are queued (:mod:`replicator.bpf`), which saves the
   ``recv`` of each too. The cache then holds those entries as written, not as the kernel reports
   them (it sets status bits and TCP flags of its own): the consumer must know them
   for the peer's copies (the daemon does: they are in its external cache), and the
   next re-read of the table brings the kernel's version.

The consumer is a plain callback called from the mirror's task: it must not block (the
sync layer coalesces changes in its own structure). A memory channel would let a slow
consumer stall the event socket and turn back-pressure into ENOBUFS.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import trio

from .cache import Change, InternalCache
from .errors import KernelError, NetlinkDecodeError
from .kernel import KERNEL_RETRY, AnyEvent, KernelPort, Overrun, Subscription
from .linkpolicy import RefusalLog
from .logs import fields

#: After an overrun, the resync waits until this long passed without another one...
RESYNC_QUIET = 0.2
#: ... but no longer than this (seconds).
RESYNC_MAX_DELAY = 5.0
#: Seconds between two log lines about undecodable events (each counts those since).
UNDECODABLE_LOG_INTERVAL = 60.0

log = logging.getLogger(__name__)

#: The consumer of cache changes: called with every non-empty batch, in order.
Publish = Callable[[list[Change]], None]
#: Awaited by the event reader after each batch it published (see :class:`Mirror`).
AfterPublish = Callable[[], Awaitable[None]]


@dataclass
class MirrorStats:
    """Counters of one mirror (exported as metrics by the daemon)."""

    #: Events folded into the cache (echoes included).
    events: int = 0
    #: Events caused by our own injector: cached, not published.
    echoes: int = 0
    #: ENOBUFS errors seen on the event socket.
    overruns: int = 0
    #: Dumps reconciled with the cache (the initial one included).
    reconciliations: int = 0
    #: Changes handed to the consumer.
    published: int = 0
    #: Echoes dropped unread on reading: inside :meth:`Mirror.echoes_ignored` (a dump
    #: replaced them) and with ``ignore_echoes`` (the Linux port has the kernel drop
    #: the rest, uncounted; see :attr:`writes_noted`).
    echoes_ignored: int = 0
    #: With ``ignore_echoes``: changes our writer reported instead of their echoes
    #: (:meth:`Mirror.note_written`: entries written plus entries deleted).
    writes_noted: int = 0
    #: Event datagrams skipped because they could not be decoded (each loss repaired
    #: by a resync, like an overrun).
    undecodable: int = 0
    #: Re-reads of the table (after start-up) that failed and were tried again.
    dump_failures: int = 0
    #: Errors of the event socket (other than an overrun) and failed attempts to
    #: subscribe again after one: each one is followed by a new subscription and a
    #: re-read of the table.
    subscription_failures: int = 0


class Mirror:
    """Keeps :attr:`cache` equal to one kernel's conntrack table (see the module doc).

    ``publish`` gets each batch of changes; ``after_publish``, if given, is awaited by
    the event reader after each batch of events it applied, before it reads more: the
    daemon leaves its driver a few turns there to send what was just published. trio
    runs tasks in turns, and in a burst the reader's turn (a read of thousands of
    events) was what the driver's send waited for, several turns per send.
    """

    def __init__(self, kernel: KernelPort, publish: Publish | None = None, *,
                 resync_quiet: float = RESYNC_QUIET, resync_max_delay: float = RESYNC_MAX_DELAY,
                 ignore_echoes: bool = False, after_publish: AfterPublish | None = None
                 ) -> None:
        self._kernel = kernel
        self._publish = publish
        self._after_publish = after_publish
        self._ignore_echoes = ignore_echoes
        self._resync_quiet = resync_quiet
        self._resync_max_delay = resync_max_delay
        #: The internal cache; read it freely, only the mirror writes it.
        self.cache = InternalCache()
        self._stats = MirrorStats()
        self._resync_running = False
        self._resync_again = False
        self._synced = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._subscription: Subscription | None = None
        #: Inside :meth:`echoes_ignored` (a new subscription is set up the same way).
        self._muted = False
        #: Echoes dropped on reading by event sockets since replaced.
        self._ignored_before = 0
        self._stale = False
        # Undecodable events: when a line is due, and how many since the last one.
        self._undecodable_log = RefusalLog(interval=UNDECODABLE_LOG_INTERVAL)
        self._unlogged = 0

    @property
    def stats(self) -> MirrorStats:
        """The counters (``echoes_ignored`` read from the subscription now)."""
        sub = self._subscription
        self._stats.echoes_ignored = self._ignored_before + (0 if sub is None else sub.ignored)
        return self._stats

    @property
    def synced(self) -> bool:
        """Whether the cache is believed complete: a resync finished and none is due."""
        return self._synced.is_set() and not self._stale

    @property
    def stale(self) -> bool:
        """Whether events were missed (echoes dropped unread in :meth:`echoes_ignored`,
        or the event socket failed) and no dump has started since: the cache lacks
        what changed meanwhile until a :meth:`resync`.
        """
        return self._stale

    @property
    def ignores_echoes(self) -> bool:
        """Whether the echoes of our own writes are dropped unread (see the module doc)."""
        return self._ignore_echoes

    def note_written(self, written: Sequence[tuple[bytes, bytes]], deleted: Sequence[bytes]
                     ) -> None:
        """Our injector wrote these ``(packed key, record)`` pairs into the kernel and
        deleted the entries of these keys: with ``ignore_echoes``, the cache takes them
        as written (their events are not read); otherwise their echoes will tell."""
        if self._ignore_echoes:
            self.cache.note_written(written, deleted)
            self._stats.writes_noted += len(written) + len(deleted)

    @contextmanager
    def echoes_ignored(self) -> Iterator[None]:
        """Within the block, receive no events of our own writes.

        For a commit that writes a whole table and is followed by a re-read of the
        kernel (promotion): decoding 100 k echoes only to have the dump supersede them
        costs as much CPU as the writes, on the same thread, and slows the commit
        (measured: about half of its time). So the subscription leaves the NEW and
        UPDATE groups meanwhile (:meth:`~replicator.kernel.Subscription.mute_changes`:
        the kernel then builds no events at all, a quarter of what was left of a
        100 k-entry commit), and echoes queued before that are dropped unread by
        their port id. Creations and updates by others are missed too, so afterwards
        :attr:`stale` is true until a dump starts; the caller owes a :meth:`resync`.
        """
        sub = self._subscription
        own = self._kernel.injector_portid
        if sub is None or not own:
            yield
            return
        sub.ignore_portid = own
        sub.mute_changes(True)
        self._muted = True
        # Set before the first write: whatever happens, the cache may miss events now.
        self._stale = True
        try:
            yield
        finally:
            self._muted = False
            # The current subscription: the event socket may have been replaced since.
            sub = self._subscription
            if sub is not None:
                sub.mute_changes(False)
                sub.ignore_portid = own if self._ignore_echoes else 0
            # Again: a dump that started during the block missed what came after it.
            self._stale = True

    async def wait_synced(self) -> None:
        """Return once no resync is running or pending (at once if none is)."""
        while not self._synced.is_set():
            await self._synced.wait()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Mirror until the subscription ends (the port was closed) or cancelled.

        With ``nursery.start``, returns to the starter once the first dump has been
        reconciled: from then on :attr:`cache` is a full copy of the table.
        """
        self._subscription = await self._subscribe()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._request_resync(nursery)
                nursery.start_soon(self._pump, nursery)
                await self.wait_synced()
                task_status.started()
        finally:
            if self._subscription is not None:
                with trio.CancelScope(shield=True):
                    await self._subscription.aclose()

    async def _subscribe(self) -> Subscription:
        """A new subscription, set up for this mirror's state."""
        subscription = self._kernel.subscribe()
        try:
            # The cache stores records: NEW events (most of a burst) need no Entry.
            subscription.records = True
            own = self._kernel.injector_portid
            if self._muted:
                subscription.ignore_portid = own
                subscription.mute_changes(True)
            elif self._ignore_echoes:
                subscription.ignore_portid = own
        except BaseException:
            with trio.CancelScope(shield=True):
                await subscription.aclose()
            raise
        return subscription

    async def resync(self) -> None:
        """Dump the table now, reconcile, and return when the cache is complete again.

        For operator requests (``resync --kernel``) and the daemon's periodic refresh:
        the dump also carries the current timeouts, which events never report.
        """
        # A caller cancelled with the daemon (the mirror's nursery closing) stops here.
        await trio.lowlevel.checkpoint()
        if self._nursery is None:
            raise RuntimeError("the mirror is not running")
        self._request_resync(self._nursery)
        await self.wait_synced()

    async def _pump(self, nursery: trio.Nursery) -> None:
        failures = 0
        subscription = self._subscription
        while subscription is not None:
            try:
                batch = await subscription.__anext__()
            except StopAsyncIteration:
                break
            except KernelError as exc:  # the socket's error, not the batch's handling
                failures += 1
                await self._replace_subscription(exc, failures)
                self._request_resync(nursery)
                subscription = self._subscription
                continue
            failures = 0
            if isinstance(batch, Overrun):
                self._stats.overruns += batch.enobufs
                if batch.undecodable:
                    self._undecodable(batch)
                self._request_resync(nursery)
            else:
                self._apply(batch)
                if self._after_publish is not None:
                    await self._after_publish()
        # The subscription ended: the port is closed, stop the resync too.
        nursery.cancel_scope.cancel()

    async def _replace_subscription(self, error: Exception, failures: int) -> None:
        """Close the failed event socket and subscribe again (see the module doc, 4);
        the caller then re-reads the table. Retries, backing off, until it works."""
        old = self._subscription
        assert old is not None
        self._ignored_before += old.ignored
        # Events are missed from now until the dump that follows the new subscription.
        self._stale = True
        # None until the new one works: a commit meanwhile writes without muting.
        self._subscription = None
        await old.aclose()
        while True:
            self._stats.subscription_failures += 1
            # Immediate the first time: the events missed meanwhile come with the dump,
            # but the changes of the gap wait for it.
            delay = 0.0 if failures == 1 else KERNEL_RETRY.capped(failures - 2)
            log.warning("conntrack event socket failed; subscribing again and "
                        "re-reading the table", extra=fields(error=str(error), retry_in=delay))
            await trio.sleep(delay)
            try:
                new = await self._subscribe()
            except (KernelError, OSError) as exc:
                error, failures = exc, failures + 1
                continue
            self._subscription = new
            return

    def _apply(self, batch: list[AnyEvent]) -> None:
        changes, echoes = self.cache.apply_batch(
            batch, trio.current_time(), self._kernel.injector_portid)
        self._stats.events += len(batch)
        self._stats.echoes += echoes
        self._emit(changes)

    def _undecodable(self, lost: Overrun) -> None:
        """Count undecodable events; log the first and then at most one line per
        :data:`UNDECODABLE_LOG_INTERVAL` (a kernel sending many would flood the log)."""
        self._stats.undecodable += lost.undecodable
        self._unlogged += lost.undecodable
        if self._undecodable_log.record("kernel", trio.current_time()) is not None:
            log.warning("undecodable conntrack events skipped; re-reading the table",
                        extra=fields(count=self._unlogged, reason=lost.reason))
            self._unlogged = 0

    def _request_resync(self, nursery: trio.Nursery) -> None:
        if self._resync_running:
            self._resync_again = True
            return
        self._resync_running = True
        if self._synced.is_set():
            self._synced = trio.Event()
        nursery.start_soon(self._resync)

    async def _resync(self) -> None:
        first = self._stats.reconciliations == 0
        failures = 0
        while True:
            if not first:
                await self._quiet()
            self._resync_again = False
            self.cache.begin_resync()
            # Whatever was dropped unread before this point is in this dump.
            was_stale, self._stale = self._stale, False
            try:
                dump = await self._kernel.dump()
            except (KernelError, NetlinkDecodeError) as exc:
                if first:
                    raise  # at start-up: this kernel cannot be mirrored, say so at once
                # Later (an overrun's repair, a refresh): the daemon keeps running on
                # the cache it has, events keep coming, and the dump is tried again.
                self._stale = was_stale
                failures += 1
                self._stats.dump_failures += 1
                delay = KERNEL_RETRY.capped(failures - 1)
                log.warning("re-reading the kernel table failed; retrying",
                            extra=fields(error=str(exc), retry_in=delay))
                await trio.sleep(delay)
                continue
            first = False
            # In steps, letting the event reader and the sync link run in between: a
            # large table reconciled in one go stalled the whole daemon for seconds
            # (events then overrun, the peer link misses its keepalives).
            for changes in self.cache.reconcile(dump, trio.current_time()):
                self._emit(changes)
                await trio.lowlevel.checkpoint()
            del dump
            self._stats.reconciliations += 1
            if not self._resync_again:
                break
        self._resync_running = False
        self._synced.set()

    async def _quiet(self) -> None:
        """Wait until no overrun came for ``resync_quiet`` s (at most ``resync_max_delay``).

        A dump taken while events are still being lost is wasted (another must follow),
        and during a burst back-to-back dumps of a large table starve everything else
        in the process (measured: a 100 k-entry burst took 38 s instead of 2 s).
        """
        deadline = trio.current_time() + self._resync_max_delay
        while (left := deadline - trio.current_time()) > 0:
            seen = self._stats.overruns, self._stats.undecodable
            await trio.sleep(min(self._resync_quiet, left))
            if (self._stats.overruns, self._stats.undecodable) == seen:
                return

    def _emit(self, changes: list[Change]) -> None:
        if changes and self._publish is not None:
            self._stats.published += len(changes)
            self._publish(changes)
