"""Batched writes to the conntrack table: the standby's ``conntrack -I``/``-U``/``-D``.

Theory of operation
-------------------
conntrackd writes one entry per netlink round trip (≈ 27 k entries/s). The kernel is
much faster when it gets many requests per ``sendto`` and answers only the failures
(see ``/work/shared/notes/ctnetlink.md``: ≈ 200 k entries/s). So every write here is a
sequence of *batches*:

* a batch is one datagram of up to :data:`BATCH_BYTES` holding many requests with
  consecutive sequence numbers; only the **last** request asks for an ACK
  (``NLM_F_ACK``), the others are answered only if they fail;
* nfnetlink processes a datagram synchronously inside ``sendto``, in order, and queues
  at most one reply per request in the same order. So when the reply for the last
  sequence number arrives, every error of the batch has arrived before it, and each
  error maps back to its entry by ``seq - first_seq``.

An *upsert* creates every entry with its NAT (``NLM_F_CREATE|NLM_F_EXCL``: NAT can only
be given on create). Entries the kernel already has answer ``EEXIST``; they are sent
again in a second round as plain updates (without NAT). Related entries (``master``
set) go in batches after the one holding their master, since the kernel refuses a
related entry whose master does not exist yet (``ENOENT``). A *delete* counts
``ENOENT`` (already gone) as applied.

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

import enum
import errno
import itertools
import socket
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple, Protocol

import trio

from . import ctnetlink
from .errors import KernelError
from .kernel import EntryError, InjectResult
from .model import Entry, EntryKey
from .netlink import NETLINK_NETFILTER

#: Bytes of requests per ``sendto`` (the size measured to be fastest).
BATCH_BYTES = 256 * 1024
#: Receive buffer asked for (``SO_RCVBUFFORCE``): room for ≈ 30 k error replies, far
#: more than one batch can produce (≈ 2,000 requests), so a full batch of failures
#: (e.g. an upsert of entries that all exist) never overflows it.
RCVBUF_BYTES = 32 * 1024 * 1024
#: Send buffer asked for: netlink refuses a datagram larger than ``sndbuf - 32``.
SNDBUF_BYTES = 4 * 1024 * 1024
#: What one queued ACK/error reply costs in the receive buffer (the skb's truesize,
#: ≈ 768 bytes with ``NETLINK_CAP_ACK``), rounded up: used to size batches so that
#: even a batch that fails entirely fits in the buffer.
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


def plan_batches(op: Op, entries: Sequence[Entry], encode: Encoder, seqs: Iterator[int], *,
                 limit: int = BATCH_BYTES, max_messages: int | None = None,
                 ack_each: bool = False) -> Iterator[Batch]:
    """Pack the requests for ``entries`` (in order) into batches, lazily.

    Each batch holds at most ``limit`` bytes (a single larger request still gets a
    batch of its own) and at most ``max_messages`` requests. Sequence numbers come from
    ``seqs`` (taken modulo 2**32) and are consecutive within a batch. The last request
    of every batch asks for an ACK; with ``ack_each`` every request does.
    """
    cap = max_messages if max_messages is not None else len(entries) or 1
    parts: list[bytes] = []
    members: list[Entry] = []
    size = 0
    first = 0
    for entry in entries:
        seq = next(seqs) & _SEQ_MASK
        message = encode(entry, seq, ack=ack_each)
        if members and (size + len(message) > limit or len(members) >= cap):
            yield _close(op, parts, members, first, ack_each=ack_each, encode=encode)
            parts, members, size = [], [], 0
        if not members:
            first = seq
        parts.append(message)
        members.append(entry)
        size += len(message)
    if members:
        yield _close(op, parts, members, first, ack_each=ack_each, encode=encode)


def _close(op: Op, parts: list[bytes], members: list[Entry], first: int, *,
           ack_each: bool, encode: Encoder) -> Batch:
    if not ack_each:
        # The batch's end is known only now: rebuild its last request with the ACK flag.
        parts[-1] = encode(members[-1], (first + len(members) - 1) & _SEQ_MASK, ack=True)
    return Batch(op, b"".join(parts), tuple(members), first, ack_each)


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
    """A list of entries still to be sent with one request kind."""

    op: Op
    entries: Sequence[Entry]
    ack_each: bool
    max_messages: int | None


class Injection:
    """The sans-IO core of one upsert or delete (see the module doc).

    Drive it like this: ``while (d := job.next_datagram()) is not None``: send ``d``,
    then while :attr:`waiting`: feed every received datagram to :meth:`receive`; on
    ``ENOBUFS`` call :meth:`replies_lost`; if the socket is empty and :attr:`lost` is
    set, call :meth:`settle` (nothing more will come: the kernel answers synchronously).
    Finally :meth:`result`.
    """

    def __init__(self, units: Sequence[_Unit], *, codec: Codec, seq_start: int,
                 batch_bytes: int, reply_budget: int) -> None:
        self._codec = codec
        self._seqs = itertools.count(seq_start)
        self._batch_bytes = batch_bytes
        self._reply_budget = max(1, reply_budget)
        self._units: deque[_Unit] = deque(units)
        self._current: Iterator[Batch] | None = None
        self._to_update: list[Entry] = []
        self._applied = 0
        self._errors: list[EntryError] = []
        self._batch: Batch | None = None
        self._replies: dict[int, int] = {}
        self._lost = False

    @classmethod
    def upsert(cls, entries: Sequence[Entry], *, codec: Codec = CTNETLINK, seq_start: int = 1,
               batch_bytes: int = BATCH_BYTES,
               reply_budget: int = RCVBUF_BYTES // REPLY_COST) -> Injection:
        """Create each entry with its NAT, masters first; update the ones that exist."""
        cap = min(reply_budget, len(entries)) or None
        units = [_Unit(Op.CREATE, level, False, cap) for level in install_levels(entries)]
        return cls(units, codec=codec, seq_start=seq_start, batch_bytes=batch_bytes,
                   reply_budget=reply_budget)

    @classmethod
    def delete(cls, entries: Sequence[Entry], *, codec: Codec = CTNETLINK, seq_start: int = 1,
               batch_bytes: int = BATCH_BYTES,
               reply_budget: int = RCVBUF_BYTES // REPLY_COST) -> Injection:
        """Delete each entry; an entry already gone counts as applied."""
        cap = min(reply_budget, len(entries)) or None
        units = [_Unit(Op.DELETE, entries, False, cap)] if entries else []
        return cls(units, codec=codec, seq_start=seq_start, batch_bytes=batch_bytes,
                   reply_budget=reply_budget)

    # -- driving ---------------------------------------------------------------------

    def next_datagram(self) -> bytes | None:
        """The next datagram to send, or ``None`` when everything is settled."""
        if self._batch is not None:
            raise RuntimeError("the previous batch is still waiting for its replies")
        while True:
            if self._current is not None:
                batch = next(self._current, None)
                if batch is not None:
                    self._batch = batch
                    self._replies = {}
                    self._lost = False
                    return batch.datagram
                self._current = None
            if not self._units and self._to_update:
                cap = min(self._reply_budget, len(self._to_update))
                self._units.append(_Unit(Op.UPDATE, self._to_update, False, cap))
                self._to_update = []
            if not self._units:
                return None
            unit = self._units.popleft()
            self._current = plan_batches(
                unit.op, unit.entries, self._encoder(unit.op), self._seqs,
                limit=self._batch_bytes, max_messages=unit.max_messages,
                ack_each=unit.ack_each)

    @property
    def waiting(self) -> bool:
        """Whether the datagram last sent still expects replies."""
        return self._batch is not None

    @property
    def lost(self) -> bool:
        """Whether replies to the current batch were lost (``ENOBUFS`` was reported)."""
        return self._lost

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
            self._finish(batch)

    def replies_lost(self) -> None:
        """The socket reported ``ENOBUFS``: some replies to the current batch are gone."""
        self._lost = True

    def settle(self) -> None:
        """Close a batch whose last reply was lost (call once the socket is drained)."""
        if self._batch is not None:
            self._lost = True
            self._finish(self._batch)

    def result(self) -> InjectResult:
        """How many entries were applied, and every entry the kernel refused."""
        if self._batch is not None or self._units or self._current or self._to_update:
            raise RuntimeError("the injection is not finished")
        return InjectResult(self._applied, list(self._errors))

    # -- internals -------------------------------------------------------------------

    def _encoder(self, op: Op) -> Encoder:
        if op is Op.CREATE:
            return self._codec.create
        if op is Op.UPDATE:
            return self._codec.update
        return self._codec.delete

    def _finish(self, batch: Batch) -> None:
        self._batch = None
        replies = self._replies
        uncertain: list[Entry] = []
        for index, entry in enumerate(batch.entries):
            err = replies.get(index)
            if err is None:
                if self._lost or batch.ack_each:
                    # No reply, and replies were lost (or one was owed): the request may
                    # have failed silently.
                    uncertain.append(entry)
                    continue
                err = 0
            self._settle_entry(batch.op, entry, err)
        if uncertain:
            self._verify(batch, uncertain)

    def _settle_entry(self, op: Op, entry: Entry, err: int) -> None:
        if err == 0 or (op is Op.DELETE and err == errno.ENOENT):
            self._applied += 1
        elif op is Op.CREATE and err == errno.EEXIST:
            self._to_update.append(entry)
        else:
            self._errors.append(EntryError(entry, err))

    def _verify(self, batch: Batch, uncertain: list[Entry]) -> None:
        if batch.ack_each and len(batch.entries) == 1:
            # Even a lone request's reply was lost: report it, never assume success.
            self._errors.extend(EntryError(e, errno.ENOBUFS) for e in uncertain)
            return
        size = len(batch.entries) // 2 if batch.ack_each else self._reply_budget // 2
        # At the front: verification finishes before the next unit (e.g. the entries
        # related to this level's masters) starts.
        self._units.appendleft(_Unit(batch.op, uncertain, True, max(1, size)))


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


async def upsert(sock: socket.socket, entries: Sequence[Entry], *,
                 seq_start: int = 1) -> InjectResult:
    """Create or update ``entries`` through ``sock`` (see :func:`open_socket`).

    Every entry the kernel refused is in ``errors`` with its errno; ``applied`` counts
    the rest. Raises :class:`~replicator.errors.KernelError` if the socket itself fails.
    """
    job = Injection.upsert(entries, seq_start=seq_start, batch_bytes=batch_limit(sock),
                           reply_budget=reply_budget(sock))
    return await run(sock, job)


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


async def run(sock: ReplySocket, job: Injection) -> InjectResult:
    """Drive ``job`` over the non-blocking ``sock`` until every entry is settled."""
    buf = bytearray(65536)
    view = memoryview(buf)
    _discard_pending(sock, buf)
    while (datagram := job.next_datagram()) is not None:
        # One checkpoint per datagram keeps a 100 k-entry write cancellable and fair:
        # the kernel answers synchronously, so the loop below rarely has to wait.
        await trio.lowlevel.checkpoint()
        try:
            sock.send(datagram)
        except OSError as exc:
            raise KernelError(f"sending a batch to the kernel failed: {exc}",
                              exc.errno or 0) from exc
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
