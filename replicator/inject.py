"""Batched writes to the conntrack table: the standby's ``conntrack -I``/``-U``/``-D``.

Theory of operation
-------------------
conntrackd writes one entry per netlink round trip. The kernel is much faster when it
gets many requests per ``sendto`` and answers only the failures (2 to 4 µs per entry
instead of 7 to 9, see ``docs/performance.md``). So every write here is a sequence of
*batches*:

* a batch is one datagram of up to :data:`BATCH_BYTES` holding many requests with
  consecutive sequence numbers; only the **last** request asks for an ACK
  (``NLM_F_ACK``), the others are answered only if they fail;
* nfnetlink processes a datagram synchronously inside ``sendto``, in order, and queues
  at most one reply per request in the same order. So when the reply for the last
  sequence number arrives, every error of the batch has arrived before it, and each
  error maps back to its entry by ``seq - first_seq``.

An *upsert* creates every entry with its NAT (``NLM_F_CREATE|NLM_F_EXCL``: NAT can only
be given on create). Entries the kernel already has answer ``EEXIST``; they are sent
again as plain updates (without NAT). Since a refused create costs as much as an
update, an upsert that finds most of a batch existing leads with updates from then
on, and goes back to creates (with NAT) for the entries that answer ``ENOENT``.
Related entries (``master`` set) go in batches after the one holding their master,
since the kernel refuses a related entry whose master does not exist yet (``ENOENT``).
A *delete* counts ``ENOENT`` (already gone) as applied.

Lost replies
~~~~~~~~~~~~
If the receive buffer overflows, the kernel drops replies and the socket reports
``ENOBUFS`` once. An error reply may be among the dropped ones, so an entry without a
reply is then *uncertain*, never "applied". Uncertain entries are sent again with an ACK
on every request, in batches small enough for the receive buffer (halved again on
every further loss, down to one request per datagram; an entry whose reply is lost
even then is reported with ``ENOBUFS``). Sending again is safe: a create that had
succeeded answers ``EEXIST`` and becomes an update, a delete that had succeeded answers
``ENOENT``, an update is idempotent.

Structure
---------
:class:`Injection` is the sans-IO core (it produces datagrams and consumes replies; no
socket, no trio). :func:`run` is the thin trio shell that moves its bytes over a
non-blocking ``NETLINK_NETFILTER`` socket made by :func:`open_socket`; :func:`upsert`
and :func:`delete` are what the kernel port calls.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import queue
import socket
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple, Protocol, TypeVar

import outcome
import trio

from . import cpus, ctnetlink
from .batchjob import BatchJob
from .bulkwrite import Planner, RecordEncoder, RecordWrites
from .errors import KernelError
from .kernel import EntryError, InjectResult
from .model import Entry, EntryKey
from .netlink import NETLINK_NETFILTER, NLMSG_ERROR, NLMSG_HDR, NLMSG_HDRLEN

#: Bytes of requests per ``sendto`` (the size measured in the ctnetlink notes).
BATCH_BYTES = 256 * 1024
#: Receive buffer asked for (``SO_RCVBUFFORCE``): room for ≈ 30 k error replies, far
#: more than one batch can produce (≈ 2,000 requests), so a full batch of failures
#: (e.g. an upsert of entries that all exist) never overflows it.
RCVBUF_BYTES = 32 * 1024 * 1024
#: Send buffer asked for: netlink refuses a datagram larger than ``sndbuf - 32``.
SNDBUF_BYTES = 4 * 1024 * 1024
#: What one queued ACK/error reply costs in the receive buffer (the skb's truesize:
#: 2,520 replies filled a 2 MiB buffer, ≈ 830 bytes each, with ``NETLINK_CAP_ACK``),
#: rounded up: used to size batches so that even a batch that fails entirely fits.
REPLY_COST = 1024

# Socket options the stdlib ``socket`` module does not name (linux/socket.h, netlink.h).
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10

_SEQ_MASK = 0xFFFFFFFF


class Encoder(Protocol):
    """Builds one request for ``entry`` with sequence number ``seq``."""

    def __call__(self, entry: Entry, seq: int, *, ack: bool = False) -> bytes: ...


class Codec(NamedTuple):
    """The request builders an :class:`Injection` uses (default: :mod:`.ctnetlink`)."""

    create: Encoder
    update: Encoder
    delete: Encoder
    #: ``(seq, errno)`` of every ``NLMSG_ERROR`` in a datagram (errno 0 = ACK).
    parse_acks: Callable[[bytes | memoryview], list[tuple[int, int]]]


CTNETLINK = Codec(ctnetlink.encode_create, ctnetlink.encode_update, ctnetlink.encode_delete,
                  ctnetlink.parse_acks)


class Op(enum.Enum):
    """The request kind of a batch."""

    CREATE = "create"
    UPDATE = "update"
    DELETE = "delete"


class Batch(NamedTuple):
    """One datagram of requests for ``entries``, with seqs ``first_seq, first_seq+1, ...``."""

    op: Op
    datagram: bytes
    entries: tuple[Entry, ...]
    first_seq: int
    #: Whether every request asked for an ACK (verification) or only the last one.
    ack_each: bool

    @property
    def last_seq(self) -> int:
        """Sequence number of the last request (the one that always gets a reply)."""
        return (self.first_seq + len(self.entries) - 1) & _SEQ_MASK

    def position(self, seq: int) -> int | None:
        """Position of the entry whose request had ``seq``, or ``None`` if not ours."""
        i = (seq - self.first_seq) & _SEQ_MASK
        return i if i < len(self.entries) else None


def build_batch(op: Op, entries: Sequence[Entry], start: int, seq: int, encode: Encoder, *,
                limit: int = BATCH_BYTES, max_messages: int | None = None,
                ack_each: bool = False) -> Batch:
    """The next batch of requests for ``entries[start:]``, numbered from ``seq``.

    It holds as many entries as fit in ``limit`` bytes (at least one, however large)
    and at most ``max_messages``. Sequence numbers are consecutive (modulo 2**32). The
    last request asks for an ACK; with ``ack_each`` every request does.
    """
    end = len(entries) if max_messages is None else min(len(entries), start + max_messages)
    parts: list[bytes] = []
    size = 0
    for i in range(start, end):
        message = encode(entries[i], (seq + i - start) & _SEQ_MASK, ack=ack_each)
        if parts and size + len(message) > limit:
            break  # built for nothing: it opens the next batch, built again there
        parts.append(message)
        size += len(message)
    members = tuple(entries[start:start + len(parts)])
    first = seq & _SEQ_MASK
    if not ack_each:
        # The batch's end is known only now: rebuild its last request with the ACK flag.
        parts[-1] = encode(members[-1], (first + len(members) - 1) & _SEQ_MASK, ack=True)
    return Batch(op, b"".join(parts), members, first, ack_each)


def plan_batches(op: Op, entries: Sequence[Entry], encode: Encoder, seq_start: int, *,
                 limit: int = BATCH_BYTES, max_messages: int | None = None,
                 ack_each: bool = False) -> Iterator[Batch]:
    """All the batches :func:`build_batch` makes of ``entries``, lazily, in order."""
    start, seq = 0, seq_start
    while start < len(entries):
        batch = build_batch(op, entries, start, seq, encode, limit=limit,
                            max_messages=max_messages, ack_each=ack_each)
        yield batch
        start += len(batch.entries)
        seq = batch.last_seq + 1


def install_levels(entries: Sequence[Entry]) -> list[list[Entry]]:
    """Split ``entries`` so that every entry comes in a later level than its master.

    Level 0 holds the entries without a master, or whose master (same family and zone,
    matched by original tuple) is not among ``entries``. Order within a level is kept.
    A cycle of masters (impossible in a real table) is broken arbitrarily.
    """
    if all(e.master is None for e in entries):
        return [list(entries)] if entries else []
    by_key = {e.key: e for e in entries}
    depth: dict[EntryKey, int] = {}
    for entry in entries:
        path: list[EntryKey] = []
        on_path: set[EntryKey] = set()
        current: Entry | None = entry
        base = -1
        while current is not None:
            key = current.key
            if key in depth:
                base = depth[key]
                break
            if key in on_path:  # cycle
                break
            path.append(key)
            on_path.add(key)
            master = current.master
            current = None if master is None else by_key.get(
                (current.family, current.zone, master))
        for key in reversed(path):
            base += 1
            depth[key] = base
    levels: list[list[Entry]] = [[] for _ in range(max(depth.values()) + 1)]
    for entry in entries:
        levels[depth[entry.key]].append(entry)
    return levels


class _Unit(NamedTuple):
    """Entries to be sent with one request kind."""

    op: Op
    entries: Sequence[Entry]
    #: Verification (see "Lost replies"): every request asks for an ACK.
    ack_each: bool
    max_messages: int | None
    #: The second request for these entries (after EEXIST/ENOENT): no further fallback
    #: from an update, so an entry that keeps appearing and vanishing cannot loop.
    followup: bool = False


class Injection(BatchJob):
    """The sans-IO core of one upsert or delete (see the module doc).

    Drive it like this: ``while (d := job.next_datagram()) is not None``: send ``d``,
    then while :attr:`waiting`: feed every received datagram to :meth:`receive`; on
    ``ENOBUFS`` call :meth:`replies_lost`; if the socket is empty and :attr:`lost` is
    set, call :meth:`settle` (nothing more will come: the kernel answers synchronously).
    Finally :meth:`result`.

    Order of work: the units (one per install level, or the deletes) in turn; after
    each, first the verification of its uncertain entries, then the second requests
    (updates after EEXIST, creates after ENOENT), then the next unit.

    An upsert adapts to the table: it starts with creates (or with updates when told
    that most entries exist), and when more than half of a batch needed the other
    request, the rest of the upsert starts with that one instead. An upsert of entries
    that all exist thus costs one update each after the first batch, not a refused
    create plus an update.
    """

    def __init__(self, units: Sequence[_Unit], *, codec: Codec, seq_start: int,
                 batch_bytes: int, reply_budget: int, upsert_op: Op = Op.CREATE) -> None:
        self._codec = codec
        self._seq = seq_start & _SEQ_MASK
        self._batch_bytes = batch_bytes
        self._reply_budget = max(1, reply_budget)
        self._queue: deque[_Unit] = deque(units)
        self._unit: _Unit | None = None
        self._pos = 0
        self._upsert_op = upsert_op
        self._followups: dict[Op, list[Entry]] = {Op.CREATE: [], Op.UPDATE: []}
        self._applied = 0
        self._errors: list[EntryError] = []
        self._batch: Batch | None = None
        self._batch_unit: _Unit | None = None
        self._replies: dict[int, int] = {}
        self._lost = False

    @classmethod
    def upsert(cls, entries: Sequence[Entry], *, update_first: bool = False,
               codec: Codec = CTNETLINK, seq_start: int = 1, batch_bytes: int = BATCH_BYTES,
               reply_budget: int = RCVBUF_BYTES // REPLY_COST) -> Injection:
        """Create each entry with its NAT, masters first; update the ones that exist.

        ``update_first`` only chooses the first request to try (see the class doc).
        """
        units = [_Unit(Op.CREATE, level, False, _cap(reply_budget, level))
                 for level in install_levels(entries)]
        return cls(units, codec=codec, seq_start=seq_start, batch_bytes=batch_bytes,
                   reply_budget=reply_budget,
                   upsert_op=Op.UPDATE if update_first else Op.CREATE)

    @classmethod
    def delete(cls, entries: Sequence[Entry], *, codec: Codec = CTNETLINK, seq_start: int = 1,
               batch_bytes: int = BATCH_BYTES,
               reply_budget: int = RCVBUF_BYTES // REPLY_COST) -> Injection:
        """Delete each entry; an entry already gone counts as applied."""
        units = [_Unit(Op.DELETE, entries, False, _cap(reply_budget, entries))] if entries else []
        return cls(units, codec=codec, seq_start=seq_start, batch_bytes=batch_bytes,
                   reply_budget=reply_budget)

    # -- driving ---------------------------------------------------------------------

    def next_datagram(self) -> bytes | None:
        """The next datagram to send, or ``None`` when everything is settled."""
        if self._batch is not None:
            raise RuntimeError("the previous batch is still waiting for its replies")
        while True:
            unit = self._unit
            if unit is not None and self._pos < len(unit.entries):
                batch = build_batch(unit.op, unit.entries, self._pos, self._seq,
                                    self._encoder(unit.op), limit=self._batch_bytes,
                                    max_messages=unit.max_messages, ack_each=unit.ack_each)
                self._pos += len(batch.entries)
                self._seq = (batch.last_seq + 1) & _SEQ_MASK
                self._batch, self._batch_unit = batch, unit
                self._replies = {}
                self._lost = False
                return batch.datagram
            self._unit = self._next_unit()
            self._pos = 0
            if self._unit is None:
                return None

    def receive(self, data: bytes | memoryview) -> None:
        """Consume one received datagram of ACK/error replies.

        Replies whose sequence number is not in the current batch (left over from an
        abandoned earlier write) are ignored.
        """
        batch = self._batch
        if batch is None:
            return
        done = False
        for seq, err in self._codec.parse_acks(data):
            index = batch.position(seq)
            if index is None:
                continue
            self._replies[index] = err
            done = done or seq == batch.last_seq
        if done:
            self._finish()

    def result(self) -> InjectResult:
        """How many entries were applied, and every entry the kernel refused."""
        if (self._batch is not None or self._unit is not None or self._queue
                or any(self._followups.values())):
            raise RuntimeError("the injection is not finished")
        return InjectResult(self._applied, list(self._errors))

    # -- internals -------------------------------------------------------------------

    def _encoder(self, op: Op) -> Encoder:
        if op is Op.CREATE:
            return self._codec.create
        if op is Op.UPDATE:
            return self._codec.update
        return self._codec.delete

    def _next_unit(self) -> _Unit | None:
        queue = self._queue
        if queue and queue[0].ack_each:  # verification of what was just sent
            return queue.popleft()
        for op in (Op.CREATE, Op.UPDATE):
            entries = self._followups[op]
            if entries:
                self._followups[op] = []
                return _Unit(op, entries, False, _cap(self._reply_budget, entries), True)
        if not queue:
            return None
        unit = queue.popleft()
        return unit if unit.op is Op.DELETE else unit._replace(op=self._upsert_op)

    def _finish(self) -> None:
        batch, unit = self._batch, self._batch_unit
        assert batch is not None and unit is not None
        self._batch = self._batch_unit = None
        replies = self._replies
        uncertain: list[Entry] = []
        other = 0
        for index, entry in enumerate(batch.entries):
            err = replies.get(index)
            if err is None:
                if self._lost or batch.ack_each:
                    # No reply, and replies were lost (or one was owed): the request may
                    # have failed silently.
                    uncertain.append(entry)
                    continue
                err = 0
            other += self._settle_entry(unit, entry, err)
        if uncertain:
            self._verify(batch, unit, uncertain)
        if (2 * other > len(batch.entries) and not unit.followup and not unit.ack_each
                and unit.op is not Op.DELETE):
            # Most of this batch needed the other request: lead with it from now on.
            self._upsert_op = Op.UPDATE if unit.op is Op.CREATE else Op.CREATE
            if self._unit is unit:
                self._unit = unit._replace(op=self._upsert_op)

    def _settle_entry(self, unit: _Unit, entry: Entry, err: int) -> int:
        """Book one reply; 1 if the entry needs the other request (EEXIST/ENOENT)."""
        op = unit.op
        if err == 0 or (op is Op.DELETE and err == errno.ENOENT):
            self._applied += 1
        elif op is Op.CREATE and err == errno.EEXIST:
            self._followups[Op.UPDATE].append(entry)
            return 1
        elif op is Op.UPDATE and err == errno.ENOENT and not unit.followup:
            self._followups[Op.CREATE].append(entry)
            return 1
        else:
            self._errors.append(EntryError(entry, err))
        return 0

    def _verify(self, batch: Batch, unit: _Unit, uncertain: list[Entry]) -> None:
        if batch.ack_each and len(batch.entries) == 1:
            # Even a lone request's reply was lost: report it, never assume success.
            self._errors.extend(EntryError(e, errno.ENOBUFS) for e in uncertain)
            return
        size = len(batch.entries) // 2 if batch.ack_each else self._reply_budget // 2
        # At the front: verification runs right after the current unit, before its
        # second requests and before the next unit (e.g. entries related to this one's).
        self._queue.appendleft(_Unit(batch.op, uncertain, True, max(1, size), unit.followup))


def _cap(reply_budget: int, entries: Sequence[Entry]) -> int | None:
    """Requests per errors-only batch: even a batch that fails entirely must fit in the
    receive buffer."""
    return min(reply_budget, len(entries)) or None


# -- the trio shell ------------------------------------------------------------------


def open_socket() -> socket.socket:
    """A non-blocking ``NETLINK_NETFILTER`` socket for injection, in the current netns.

    Bound (the kernel assigns the port id: ``sock.getsockname()[0]``, the id that marks
    the events our own writes cause), with large buffers and ``NETLINK_CAP_ACK`` (error
    replies without a copy of the request).
    """
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                         NETLINK_NETFILTER)
    try:
        sock.bind((0, 0))
        configure_socket(sock)
    except BaseException:
        sock.close()
        raise
    return sock


def configure_socket(sock: socket.socket) -> None:
    """Make ``sock`` non-blocking with buffers large enough for batched injection.

    ``SO_*BUFFORCE`` needs ``CAP_NET_ADMIN`` (which writing conntrack needs anyway);
    without it the sizes fall back to the capped ``SO_*BUF`` and :func:`reply_budget`
    makes the batches smaller accordingly.
    """
    sock.setblocking(False)
    for force, plain, size in ((SO_RCVBUFFORCE, socket.SO_RCVBUF, RCVBUF_BYTES),
                               (SO_SNDBUFFORCE, socket.SO_SNDBUF, SNDBUF_BYTES)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, size)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, plain, size)
    sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)


def reply_budget(sock: socket.socket) -> int:
    """How many replies ``sock``'s receive buffer holds (at :data:`REPLY_COST` each)."""
    return max(1, sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // REPLY_COST)


def batch_limit(sock: socket.socket) -> int:
    """The batch size in bytes that ``sock``'s send buffer accepts."""
    sndbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    return max(4096, min(BATCH_BYTES, sndbuf - 64))


async def upsert(sock: socket.socket, entries: Sequence[Entry], *, seq_start: int = 1,
                 update_first: bool = False) -> InjectResult:
    """Create or update ``entries`` through ``sock`` (see :func:`open_socket`).

    Every entry the kernel refused is in ``errors`` with its errno; ``applied`` counts
    the rest. ``update_first`` is a hint that most entries exist already (it only
    changes the speed, see :class:`Injection`). Raises
    :class:`~replicator.errors.KernelError` if the socket itself fails.
    """
    job = Injection.upsert(entries, update_first=update_first, seq_start=seq_start,
                           batch_bytes=batch_limit(sock), reply_budget=reply_budget(sock))
    return await run(sock, job)


async def write_records(sock: socket.socket, records: Sequence[bytes],
                        encode: RecordEncoder, *, seq_start: int = 1,
                        plan: Planner | None = None, apart: bool = False
                        ) -> tuple[int, list[bytes]]:
    """A first pass of a commit through ``sock``
    (:class:`~replicator.bulkwrite.RecordWrites`, requests made by ``encode``, or
    together as ``plan`` groups them): how many records were written, and the records
    to write with :func:`upsert` instead. ``apart``: see :func:`run_overlapped`."""
    job = RecordWrites(records, encode, seq_start=seq_start, batch_bytes=batch_limit(sock),
                       reply_budget=reply_budget(sock), plan=plan)
    if len(records) <= DIRECT_WRITE_RECORDS:
        return await run(sock, job)
    return await run_overlapped(sock, job, apart=apart)


#: A write of at most this many records is sent from the calling thread
#: (:func:`run`) rather than through a sending thread (:func:`run_overlapped`). Such a
#: write is one datagram, so there is no next one to build while the kernel works,
#: and handing it to a thread and the replies back cost more than the kernel's own
#: time for it (a hot standby under a steady 20 k/s wrote 200 entries per write in
#: 1.4 ms, the kernel's part 0.5 ms). The event loop waits while the kernel works on
#: it: ≈ 0.7 ms at most.
DIRECT_WRITE_RECORDS = 256


async def delete(sock: socket.socket, entries: Sequence[Entry], *,
                 seq_start: int = 1) -> InjectResult:
    """Delete ``entries`` (by family, zone and original tuple) through ``sock``."""
    job = Injection.delete(entries, seq_start=seq_start, batch_bytes=batch_limit(sock),
                           reply_budget=reply_budget(sock))
    return await run(sock, job)


class ReplySocket(Protocol):
    """What :func:`run` needs of a socket (a non-blocking netlink socket has it)."""

    def fileno(self) -> int: ...

    def send(self, data: bytes, /) -> int: ...

    def recv_into(self, buffer: bytearray, /) -> int: ...


_R_co = TypeVar("_R_co", covariant=True)
_R = TypeVar("_R")


class Job(Protocol[_R_co]):
    """What :func:`run` drives: :class:`Injection` (and
    :class:`replicator.bulkwrite.RecordWrites`), see :class:`Injection`'s doc."""

    def next_datagram(self) -> bytes | None: ...

    @property
    def waiting(self) -> bool: ...

    @property
    def lost(self) -> bool: ...

    def receive(self, data: bytes | memoryview) -> None: ...

    def replies_lost(self) -> None: ...

    def settle(self) -> None: ...

    def result(self) -> _R_co: ...


async def run(sock: ReplySocket, job: Job[_R]) -> _R:
    """Drive ``job`` over the non-blocking ``sock`` until every entry is settled.

    Cancellation takes effect before a datagram is sent (or while a late reply is
    awaited). Entries of earlier datagrams were applied or refused without their
    outcome being reported, so after a cancelled write only a dump tells the table's
    state; leftover replies are discarded by the next :func:`run` on the same socket.
    """
    buf = bytearray(65536)
    view = memoryview(buf)
    _discard_pending(sock, buf)
    first = True
    while (datagram := job.next_datagram()) is not None:
        # One checkpoint per datagram keeps a 100 k-entry write cancellable and fair:
        # the kernel answers synchronously, so the loop below rarely has to wait. The
        # first goes out without giving the turn away (cancellation is still checked):
        # a hot standby's write of what it just received would otherwise wait while
        # the peer's next frame is read and decoded.
        if first:
            await trio.lowlevel.checkpoint_if_cancelled()
            first = False
        else:
            await trio.lowlevel.checkpoint()
        try:
            sock.send(datagram)
        except OSError as exc:
            raise KernelError(f"sending a batch to the kernel failed: {exc}",
                              exc.errno or 0) from exc
        await _read_replies(sock, job, buf, view)
    return job.result()


async def _read_replies(sock: ReplySocket, job: Job[object], buf: bytearray,
                        view: memoryview) -> None:
    """Read replies into ``job`` until it waits for none (see :func:`run`)."""
    while job.waiting:
        try:
            n = sock.recv_into(buf)
        except BlockingIOError:
            if job.lost:
                job.settle()
            else:
                await trio.lowlevel.wait_readable(sock)
            continue
        except OSError as exc:
            if exc.errno != errno.ENOBUFS:
                raise KernelError(f"reading the kernel's replies failed: {exc}",
                                  exc.errno or 0) from exc
            job.replies_lost()
            continue
        job.receive(view[:n])


class PrefetchJob(Job[_R_co], Protocol[_R_co]):
    """A :class:`Job` that can build its next datagram while the current one is in
    flight (:class:`replicator.bulkwrite.RecordWrites`): ``prefetch`` returns it
    (``None`` if nothing is left), and ``next_datagram`` then returns the same."""

    def prefetch(self) -> bytes | None: ...


#: What the sending thread hands back for one datagram: each reply datagram read, in
#: order, and ``None`` where the socket reported ``ENOBUFS`` (replies lost).
_Replies = list["bytes | None"]


def _send_and_read(sock: ReplySocket, datagram: bytes, buf: bytearray) -> _Replies:
    """In the sending thread: send ``datagram`` and read every reply queued by then.

    nfnetlink handles a datagram inside ``sendto``, so once it returns every reply to
    it is queued; the socket is non-blocking, so the read stops at the first empty read.
    """
    sock.send(datagram)
    out: _Replies = []
    while True:
        try:
            n = sock.recv_into(buf)
        except BlockingIOError:
            return out
        except OSError as exc:
            if exc.errno != errno.ENOBUFS:
                raise
            out.append(None)
            continue
        out.append(bytes(buf[:n]))


def _ends_acked(replies: _Replies) -> bool:
    """Whether the last reply read is an ACK (``NLMSG_ERROR`` 0), alone in its datagram.

    A batch asks for one ACK, on its last request, and the others are answered only if
    they fail: so an ACK read last means every reply to the batch has been read.
    """
    if not replies:
        return False
    last = replies[-1]
    if last is None or len(last) < NLMSG_HDRLEN + 4:
        return False
    length, kind, _f, _s, _p = NLMSG_HDR.unpack_from(last)
    return (kind == NLMSG_ERROR and length == len(last)
            and last[NLMSG_HDRLEN:NLMSG_HDRLEN + 4] == b"\0\0\0\0")


class _Sender:
    """The thread of :func:`run_overlapped` that sends: the datagrams handed over by
    :meth:`send` and :meth:`queue`, in order, each one's replies collected by
    :meth:`replies`.

    The kernel takes 2-4 ms per datagram. Handing each datagram over only once the
    previous one's replies were back cost 0.25-0.35 ms per datagram in wake-ups (the
    thread pool, the event loop, two threads waking each other), 10 % of a 100 k-entry
    commit (measured). So one thread sends for the whole write, and the next datagram
    is queued while the kernel works on the current one: once every reply to a
    datagram is read (:func:`_ends_acked`), the thread goes straight on to the next.
    When they are not (lost, late, or the send failed), it holds until the caller has
    dealt with that (:meth:`proceed`), so only one of them reads the socket at a time.
    The trio thread waits for replies through the event loop: blocking for them instead
    saved nothing measurable once the next datagram was queued ahead, and kept a hot
    standby from reading its peer's next messages while the kernel wrote (its 100 k
    sync took 1.18-1.36 s instead of 1.03-1.15).
    """

    def __init__(self, sock: ReplySocket, buf: bytearray, loop_cpu: int | None = None,
                 allowed: set[int] | None = None) -> None:
        self._sock, self._buf = sock, buf
        self._token = trio.lowlevel.current_trio_token()
        self._inbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._outbox: queue.SimpleQueue[outcome.Outcome[_Replies]] = queue.SimpleQueue()
        #: Set by the thread just before each send.
        self._sending = threading.Event()
        #: Set by the caller to let a holding thread go on.
        self._go = threading.Event()
        #: Set by :meth:`stop`: send nothing more.
        self._stopping = False
        #: While :meth:`replies` waits: set (in the trio thread) when replies were
        #: queued.
        self._arrived: trio.Event | None = None
        self._stopped = trio.Event()
        #: Datagrams handed over, and outcomes collected by replies().
        self._handed = self._collected = 0
        #: A CPU the thread stays off (the event loop's, see run_overlapped), or None,
        #: and the CPUs it may use otherwise (the event loop's thread's before it was
        #: kept on its own: a thread started meanwhile inherits that one alone).
        self._loop_cpu, self._allowed = loop_cpu, allowed

    def start(self) -> None:
        """Start the thread."""
        trio.lowlevel.start_thread_soon(self._run, self._exited)

    def _run(self) -> None:
        with cpus.kept_off(self._loop_cpu, self._allowed):
            self._send_all()

    def _send_all(self) -> None:
        while (datagram := self._inbox.get()) is not None and not self._stopping:
            self._sending.set()
            result = outcome.capture(_send_and_read, self._sock, datagram, self._buf)
            self._outbox.put(result)
            if self._arrived is not None:
                # Only while replies() waits (it looks at the outbox again after
                # setting this): a wake-up costs the event loop a turn.
                self._token.run_sync_soon(self._wake)
            if not (isinstance(result, outcome.Value) and _ends_acked(result.value)):
                self._go.wait()
                self._go.clear()

    def _exited(self, result: outcome.Outcome[None]) -> None:
        with contextlib.suppress(trio.RunFinishedError):  # nobody waits for it then
            self._token.run_sync_soon(self._stopped.set)

    def _wake(self) -> None:
        if self._arrived is not None:
            self._arrived.set()

    def send(self, datagram: bytes) -> None:
        """Have the idle thread send ``datagram``; return once it is about to.

        Waiting for that matters: the caller builds the next datagram right after,
        holding the GIL, and the thread needs it to get to its send (the send itself
        releases it); otherwise the two would take turns instead of overlapping.
        """
        self._sending.clear()
        self._handed += 1
        self._inbox.put(datagram)
        self._sending.wait()

    def queue(self, datagram: bytes) -> None:
        """Have the thread send ``datagram`` after the one it is busy with."""
        self._handed += 1
        self._inbox.put(datagram)

    def proceed(self) -> None:
        """Let the thread go on after a datagram whose replies it did not all read."""
        self._go.set()

    async def replies(self) -> outcome.Outcome[_Replies]:
        """The replies read after the oldest datagram not collected yet, or what
        sending it raised."""
        try:
            while True:
                self._arrived = trio.Event()
                try:
                    got = self._outbox.get_nowait()
                except queue.Empty:
                    await self._arrived.wait()
                    continue
                self._collected += 1
                return got
        finally:
            self._arrived = None

    def stop(self) -> bool:
        """Let the thread end once it is done with the datagram in hand; whether the
        caller must wait for that (:meth:`stopped`): only if a datagram handed over
        has not had its replies collected, for the thread may still be sending it.
        Otherwise it sends and reads nothing more (a trio turn saved per write, 1 ms
        of a 10 k-entry commit)."""
        self._stopping = True
        self._inbox.put(None)
        self._go.set()
        return self._handed > self._collected

    async def stopped(self) -> None:
        """Return once the thread has ended."""
        await self._stopped.wait()


async def run_overlapped(sock: ReplySocket, job: PrefetchJob[_R], *, apart: bool = False
                         ) -> _R:
    """:func:`run`, with the kernel's work on each datagram done in a second thread
    while this one builds the next datagram.

    The kernel handles a datagram inside ``sendto``, in the sending thread, and
    releases the GIL meanwhile: a whole-table write (a takeover's commit) otherwise
    alternates between building requests in Python and the kernel creating entries,
    each about half of the time, on one core. Only the sending thread (:class:`_Sender`)
    touches the socket (and the reply buffer) while it works, only this one touches
    ``job``; the datagram built ahead is queued for the sending thread at once and
    becomes the job's current one when the previous one is settled. A cancelled write
    stops before its next datagram; the ones in flight are awaited first (a system
    call cannot be interrupted).

    ``apart``: keep this thread on its CPU and the sending thread off it meanwhile
    (:mod:`replicator.cpus`), for a write that has the node to itself (a takeover's
    commit). Not for a hot standby's writes: they share the CPUs with its receiving,
    and pinned threads cannot go where a CPU is free (measured: a 10 k burst's writes
    took 15 µs per entry instead of 5).
    """
    if not apart:
        return await _run_overlapped(sock, job, None, None)
    allowed, cpu = cpus.affinity(), cpus.current_cpu()
    with cpus.kept_on(cpu):
        return await _run_overlapped(sock, job, cpu, allowed)


async def _run_overlapped(sock: ReplySocket, job: PrefetchJob[_R], loop_cpu: int | None,
                          allowed: set[int] | None) -> _R:
    buf = bytearray(65536)
    view = memoryview(buf)
    _discard_pending(sock, buf)
    sender = _Sender(sock, buf, loop_cpu, allowed)
    sender.start()
    try:
        datagram = job.next_datagram()
        if datagram is not None:
            await trio.lowlevel.checkpoint()
            sender.send(datagram)
        while datagram is not None:
            try:
                ahead = job.prefetch()
                if ahead is not None:
                    sender.queue(ahead)
            finally:
                # Even if building failed: the socket is the sender's until it is done.
                with trio.CancelScope(shield=True):
                    sent = await sender.replies()
            try:
                replies = sent.unwrap()
            except OSError as exc:
                raise KernelError(f"writing a batch to the kernel failed: {exc}",
                                  exc.errno or 0) from exc
            for data in replies:
                if data is None:
                    job.replies_lost()
                else:
                    job.receive(data)
            if not _ends_acked(replies):
                # The sender holds: read what is left (replies lost or late) as run()
                # does, then let it go on.
                await _read_replies(sock, job, buf, view)
                sender.proceed()
            datagram = job.next_datagram()
            # The one built ahead (queued already), or None.
            await trio.lowlevel.checkpoint()
    finally:
        if sender.stop():
            with trio.CancelScope(shield=True):
                await sender.stopped()
    return job.result()


def _discard_pending(sock: ReplySocket, buf: bytearray) -> None:
    """Drop replies left over from an earlier, cancelled write."""
    while True:
        try:
            sock.recv_into(buf)
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno != errno.ENOBUFS:
                raise KernelError(f"reading the kernel's replies failed: {exc}",
                                  exc.errno or 0) from exc
