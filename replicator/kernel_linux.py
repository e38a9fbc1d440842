"""The real :class:`~replicator.kernel.KernelPort`: raw ctnetlink sockets driven by trio.

Three kinds of ``AF_NETLINK``/``NETLINK_NETFILTER`` socket, each created inside the
port's network namespace (a netlink socket belongs to the namespace it was created in,
so the process itself can stay where it is):

* the **event** socket of each :class:`EventSubscription`: joined to the conntrack
  NEW/UPDATE/DESTROY groups, non-blocking, with a receive buffer forced to
  ``event_rcvbuf`` bytes (``SO_RCVBUFFORCE``; ``SO_RCVBUF`` is capped by ``rmem_max``).
  trio waits until it is readable, then it is drained with non-blocking ``recv_into``
  into one preallocated buffer until ``BlockingIOError`` (measured: 133 k events/s,
  against 73 k/s for one ``await recv`` per datagram), at most :data:`MAX_BATCH`
  events a read, the first after a wait included. An overflow shows up as one
  ``ENOBUFS`` from ``recv``; the socket stays usable, so the subscription yields an
  :class:`~replicator.kernel.Overrun` and carries on;
* a fresh **dump** socket per :meth:`LinuxKernel.dump`, so a dump never mixes with events;
* the **injector** socket, made by :func:`replicator.inject.open_socket` when the port
  is constructed: its netlink port id marks the events our own writes cause.
  :meth:`LinuxKernel.upsert` and :meth:`LinuxKernel.delete` delegate to
  :mod:`replicator.inject`, one write at a time.

``net.netfilter.nf_conntrack_events`` is left as it is: see :mod:`replicator.mirror`
for why subscribing before dumping makes the default (2) sufficient.

A dump and the garbage collector: a dump builds about four objects per entry that the
cyclic collector tracks (the entry, its two tuples, its protocol info). The collector
runs after every 700 new objects and rescans its older generations as they grow: that
took a third of the time of a 100 k-entry dump. None of those objects can form a
cycle, so :func:`dump` pauses the collector while it builds them and then freezes
them (``gc.freeze()``): they move to the permanent generation, which later collections
never scan. Without the freeze, the first collections after the pause would walk all of
them anyway, and a daemon holding a 250 k-entry table would rescan it on every full
collection. The trade-off: whatever cyclic garbage is pending at the moment of a freeze
is never collected; dumps happen at start-up and after overruns, so that stays small.
Frozen entries are still freed as soon as they are dropped (reference counting is
unaffected).
"""

from __future__ import annotations

import errno
import gc
import logging
import socket
from collections.abc import Sequence
from types import TracebackType

import trio

from . import bpf, ctnetlink, inject, locks
from .bulkwrite import commit_encoder, commit_plan
from .errors import KernelError, NetlinkDecodeError
from .external import commit_entry
from .gcpause import COLLECTOR_PAUSE
from .kernel import AnyEvent, EventBatch, InjectResult, Overrun
from .logs import fields
from .model import Entry
from .netlink import NETLINK_NETFILTER, NLMSG_HDR, NLMSG_HDRLEN
from .netns import entered

log = logging.getLogger(__name__)

SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NETLINK_DROP_MEMBERSHIP = 2
SO_RCVBUFFORCE = 33
NFNLGRP_CONNTRACK_NEW = 1
NFNLGRP_CONNTRACK_UPDATE = 2
NFNLGRP_CONNTRACK_DESTROY = 3

#: Default event receive buffer. A queued event costs about 1.3 KB, so this absorbs
#: bursts of ~50 k events between two wake-ups (128 MiB absorbed 40 k with no loss).
EVENT_RCVBUF = 64 * 1024 * 1024
#: Receive buffer of a dump socket (the kernel waits for the reader: no loss possible).
DUMP_RCVBUF = 4 * 1024 * 1024
#: Size of the preallocated receive buffer: more than any ctnetlink datagram (events
#: are one message each; dump datagrams are at most ~32 KiB).
RECV_BYTES = 256 * 1024
#: What one read of the event socket asks for: more than any event datagram (one
#: message of at most a few KiB). ``recv`` of this size returns the datagram as
#: ``bytes`` at once, 0.3 µs cheaper per event than ``recv_into`` a buffer and copying
#: out (measured on 232-byte datagrams); a size beyond glibc's mmap threshold (128 KiB)
#: would map memory on every read.
EVENT_RECV_BYTES = 64 * 1024
#: Most events returned in one batch, so that a flood still lets other tasks run.
MAX_BATCH = 8192


def _netlink_socket(netns: str | None) -> socket.socket:
    with entered(netns):
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                             NETLINK_NETFILTER)
    sock.setblocking(False)
    return sock


def _set_rcvbuf(sock: socket.socket, size: int) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size)
    except PermissionError:
        # Without CAP_NET_ADMIN: capped by net.core.rmem_max.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)


def _recv(sock: socket.socket, buf: bytearray) -> int:
    """One datagram into ``buf``; raises BlockingIOError when the socket is empty."""
    n = sock.recv_into(buf, 0, socket.MSG_TRUNC)
    if n > len(buf):
        raise NetlinkDecodeError(f"netlink datagram of {n} bytes truncated to {len(buf)}")
    return n


class EventSubscription:
    """A live conntrack event subscription (see the module doc); iterate for batches."""

    def __init__(self, netns: str | None, rcvbuf: int) -> None:
        self._sock = _netlink_socket(netns)
        try:
            _set_rcvbuf(self._sock, rcvbuf)
            self._sock.bind((0, 0))
            for group in (NFNLGRP_CONNTRACK_NEW, NFNLGRP_CONNTRACK_UPDATE,
                          NFNLGRP_CONNTRACK_DESTROY):
                self._sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group)
        except BaseException:
            self._sock.close()
            raise
        #: A loss to report right after the events read before it.
        self._lost: Overrun | None = None
        self._ignore_portid = 0
        self.ignored = 0
        self.records = False

    @property
    def ignore_portid(self) -> int:
        """Drop the events sent on behalf of this port (0: none; see
        :attr:`replicator.kernel.Subscription.ignore_portid`).

        Dropped by a socket filter in the kernel (:mod:`replicator.bpf`), uncounted;
        those queued before it was set are dropped on reading, counted in
        :attr:`ignored` (as all are, should the kernel refuse the filter: logged).
        """
        return self._ignore_portid

    @ignore_portid.setter
    def ignore_portid(self, portid: int) -> None:
        if portid == self._ignore_portid:
            return
        if portid:
            try:
                bpf.attach(self._sock, bpf.drop_portid(portid))
            except OSError as exc:
                # Only slower without it: the events are dropped on reading instead.
                log.warning("event socket filter refused; dropping our own writes' "
                            "events on reading", extra=fields(error=str(exc)))
        else:
            try:
                bpf.detach(self._sock)
            except OSError as exc:
                raise KernelError(f"event socket filter: {exc.strerror}",
                                  exc.errno or 0) from exc
        self._ignore_portid = portid

    def mute_changes(self, muted: bool) -> None:
        """Leave (``True``) or rejoin the NEW and UPDATE groups (see
        :meth:`replicator.kernel.Subscription.mute_changes`): with no member in a
        group, ctnetlink does not even build its events.

        The DESTROY group is kept on purpose, although a commit would be faster
        without any listener (one in-process run: 100 k creates took 0.28 s in the
        kernel without, 0.38 s with): with ``nf_conntrack_events`` = 2 (the default)
        an entry created while no ctnetlink group has a listener gets no event cache,
        so it would never report an UPDATE or DESTROY afterwards, and the node that
        just took over would stop replicating the very entries it committed."""
        option = NETLINK_DROP_MEMBERSHIP if muted else NETLINK_ADD_MEMBERSHIP
        for group in (NFNLGRP_CONNTRACK_NEW, NFNLGRP_CONNTRACK_UPDATE):
            try:
                self._sock.setsockopt(SOL_NETLINK, option, group)
            except OSError as exc:
                raise KernelError(f"event socket: {exc.strerror}", exc.errno or 0) from exc

    @property
    def rcvbuf(self) -> int:
        """The effective receive buffer size (the kernel doubles what was asked)."""
        return self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)

    def __aiter__(self) -> EventSubscription:
        return self

    async def __anext__(self) -> EventBatch:
        while True:
            if self.closed:
                raise StopAsyncIteration
            batch = self._drain()
            if batch is not None:
                await trio.lowlevel.checkpoint()
                return batch
            try:
                await trio.lowlevel.wait_readable(self._sock)
            except trio.ClosedResourceError:
                raise StopAsyncIteration from None
            # The read after a wait is not cut short: a small first read (16 events,
            # from 57e0bd9) sent the first entries of a batch ahead, but its extra pass
            # (a second frame, a second kernel write on the standby) cost the rest of
            # the batch more, in lag and CPU (docs/performance.md, a0bda8b).

    def _drain(self, limit: int = MAX_BATCH) -> EventBatch | None:
        """Whatever the socket holds now, at most ``limit`` events (our own writes'
        echoes not counted): events, an Overrun, or ``None`` if empty."""
        if self._lost is not None:
            lost, self._lost = self._lost, None
            return lost
        events: list[AnyEvent] = []
        records, decode = self.records, ctnetlink.decode_events
        # Records mode: the datagrams are decoded after the reads, many at a time
        # (decode_new_records), in the order read.
        raw: list[bytes] = []
        keep = raw.append
        # Deadlines count from when the events are read.
        now = trio.current_time()
        ignore = self._ignore_portid
        enobufs = undecodable = 0
        reason = ""
        # Once per event (the kernel sends one per datagram): a burst comes through this
        # loop once per event, so it does nothing more than it must for one.
        recv, size, trunc = self._sock.recv, EVENT_RECV_BYTES, socket.MSG_TRUNC
        try:
            # Bounded by datagrams read, not events kept: skipped echoes count too, so
            # a long commit still lets other tasks run between drains.
            for _ in range(MAX_BATCH):
                # With MSG_TRUNC the kernel returns a longer datagram's real length,
                # and the bytes come back that long (beyond ``size`` unread): refused.
                data = recv(size, trunc)
                if len(data) > size:
                    undecodable += 1
                    reason = f"netlink datagram of {len(data)} bytes truncated to {size}"
                    continue
                if ignore and len(data) >= NLMSG_HDRLEN:
                    # The kernel sends one event per datagram: an echo is recognised
                    # by the header's port id alone, without decoding it.
                    length, _t, _f, _s, pid = NLMSG_HDR.unpack_from(data)
                    if pid == ignore and length == len(data):
                        self.ignored += 1
                        continue
                if records:
                    keep(data)
                    if len(raw) >= limit:
                        break
                    continue
                try:
                    got = decode(data)
                except NetlinkDecodeError as exc:
                    # The whole datagram is skipped: the dump that follows the loss
                    # marker brings what it held (the mirror resyncs).
                    undecodable += 1
                    reason = str(exc)
                    continue
                events += self._kept(got) if ignore else got
                if len(events) >= limit:
                    break
        except BlockingIOError:
            pass
        except OSError as exc:
            if exc.errno != errno.ENOBUFS:
                raise KernelError(f"event socket: {exc.strerror}", exc.errno or 0) from exc
            enobufs = 1
        if raw:
            skipped, why = self._decode_records(raw, now, events)
            if skipped:
                undecodable += skipped
                reason = why
        if enobufs or undecodable:
            lost = Overrun(enobufs, undecodable, reason)
            if not events:
                return lost
            self._lost = lost  # reported right after the events read before it
        return events or None

    def _kept(self, got: Sequence[AnyEvent]) -> list[AnyEvent]:
        """``got`` without our own writes' echoes (counted)."""
        ignore = self._ignore_portid
        kept = [e for e in got if e.portid != ignore]
        self.ignored += len(got) - len(kept)
        return kept

    def _decode_records(self, raw: list[bytes], now: float, events: list[AnyEvent]
                        ) -> tuple[int, str]:
        """Decode the datagrams ``raw`` (records mode) onto ``events``, in order: how many
        were skipped as undecodable, and why (the last reason)."""
        decode_records = ctnetlink.decode_events_records
        skipped, reason = 0, ""
        for data, made in zip(raw, ctnetlink.decode_new_records(raw, now), strict=True):
            if made is not None:
                events.append(made)
                continue
            try:
                got = decode_records(data, now)
            except NetlinkDecodeError as exc:
                # The whole datagram is skipped: the dump that follows the loss
                # marker brings what it held (the mirror resyncs).
                skipped += 1
                reason = str(exc)
                continue
            events += self._kept(got) if self._ignore_portid else got
        return skipped, reason

    @property
    def closed(self) -> bool:
        """Whether :meth:`aclose` was called."""
        return self._sock.fileno() < 0

    async def aclose(self) -> None:
        """Close the socket; iteration ends (also for a task waiting on it). Idempotent."""
        if not self.closed:
            trio.lowlevel.notify_closing(self._sock)
            self._sock.close()
        await trio.lowlevel.checkpoint()




async def dump(netns: str | None = None, *, family: int = 0) -> list[Entry]:
    """Every entry of the table in ``netns`` (``family`` 0: IPv4 and IPv6), full entries.

    The garbage collector is paused meanwhile and the result is frozen out of its
    reach (``gc.freeze()``, see the module doc). Raises
    :class:`~replicator.errors.KernelError` if the kernel answers with an error.
    """
    with COLLECTOR_PAUSE:
        entries = await _read_dump(netns, family)
        gc.freeze()
    return entries


async def _read_dump(netns: str | None, family: int) -> list[Entry]:
    entries: list[Entry] = []
    buf = bytearray(RECV_BYTES)
    view = memoryview(buf)
    with _netlink_socket(netns) as sock:
        _set_rcvbuf(sock, DUMP_RCVBUF)
        sock.bind((0, 0))
        await trio.lowlevel.wait_writable(sock)
        sock.send(ctnetlink.encode_dump_request(1, family))
        done = False
        while not done:
            try:
                n = _recv(sock, buf)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)
                continue
            except OSError as exc:
                raise KernelError(f"dump: {exc.strerror}", exc.errno or 0) from exc
            part, done = ctnetlink.decode_dump(view[:n])
            entries += part
            # The kernel refills the socket as fast as this decodes: without a
            # checkpoint a large dump never yields to the rest of the daemon.
            await trio.lowlevel.checkpoint()
    return entries


class LinuxKernel:
    """The kernel port of one network namespace (``None``: the process's own).

    Close it with :meth:`aclose` (or ``async with``).
    """

    def __init__(self, netns: str | None = None, *, event_rcvbuf: int = EVENT_RCVBUF) -> None:
        self._netns = netns
        self._event_rcvbuf = event_rcvbuf
        with entered(netns):
            self._injector = inject.open_socket()
        self._portid: int = self._injector.getsockname()[0]
        self._write_lock = trio.Lock()
        self._seq = 1
        self._subscriptions: list[EventSubscription] = []

    @property
    def netns(self) -> str | None:
        """The namespace whose table this port reads and writes."""
        return self._netns

    @property
    def injector_portid(self) -> int:
        """Netlink port id of the injector socket: events carrying it are our echoes."""
        return self._portid

    def subscribe(self) -> EventSubscription:
        """A live subscription to NEW/UPDATE/DESTROY events (joined before returning)."""
        sub = EventSubscription(self._netns, self._event_rcvbuf)
        self._subscriptions = [s for s in self._subscriptions if not s.closed]
        self._subscriptions.append(sub)
        return sub

    async def dump(self) -> list[Entry]:
        """Every entry of the table, read on a socket of its own."""
        return await dump(self._netns)

    async def upsert(self, entries: Sequence[Entry]) -> InjectResult:
        """Create (with NAT) or update each entry: :func:`replicator.inject.upsert`."""
        async with locks.held(self._write_lock):
            return await inject.upsert(self._injector, entries,
                                       seq_start=self._next_seqs(len(entries)))

    async def upsert_records(self, records: Sequence[bytes], now: float, *,
                             no_timeout: int | None = None, tcp_flags: int = 0,
                             existing: Sequence[bytes] = (), takeover: bool = False
                             ) -> InjectResult:
        """A commit: the usual entries created straight from their records, those of
        ``existing`` updated the same way (:mod:`replicator.bulkwrite`), then whatever
        these passes handed back (other kinds, entries that exist or do not after all,
        refusals, lost replies) through :meth:`upsert`."""
        applied, back = 0, []
        for batch, update in ((records, False), (existing, True)):
            if not batch:
                continue
            encode = commit_encoder(now, no_timeout=no_timeout, tcp_flags=tcp_flags,
                                    update=update)
            plan = commit_plan(now, tcp_flags=tcp_flags, update=update)
            async with locks.held(self._write_lock):
                done, refused = await inject.write_records(
                    self._injector, batch, encode, seq_start=self._next_seqs(len(batch)),
                    plan=plan, apart=takeover)
            applied += done
            back += refused
        if not back:
            return InjectResult(applied, [])
        rest = await self.upsert([commit_entry(r, now, no_timeout=no_timeout,
                                               tcp_flags=tcp_flags) for r in back])
        return InjectResult(applied + rest.applied, rest.errors)

    async def delete(self, entries: Sequence[Entry]) -> InjectResult:
        """Delete each entry: :func:`replicator.inject.delete`."""
        async with locks.held(self._write_lock):
            return await inject.delete(self._injector, entries,
                                       seq_start=self._next_seqs(len(entries)))

    def _next_seqs(self, count: int) -> int:
        # Fresh sequence numbers for every write, so a late reply to an earlier
        # (cancelled) write can never be taken for one of this write's. Room is left
        # for the injector's retries.
        start = self._seq
        self._seq = (self._seq + 4 * count + 64) % (1 << 31) or 1
        return start

    async def aclose(self) -> None:
        """Close the injector and every subscription."""
        for sub in self._subscriptions:
            await sub.aclose()
        self._subscriptions.clear()
        trio.lowlevel.notify_closing(self._injector)
        self._injector.close()
        await trio.lowlevel.checkpoint()

    async def __aenter__(self) -> LinuxKernel:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()
