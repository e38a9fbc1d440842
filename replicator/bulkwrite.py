"""A commit's first passes: create (or update) requests built straight from the external
cache's records, in batches (sans-IO).

A takeover writes the whole external cache into the kernel. Through
:class:`~replicator.inject.Injection` that means unpacking every record into an
:class:`~replicator.model.Entry` and building its request from it, about twice the
kernel's own work on the request. Nearly every entry of a firewall's table is a TCP or
UDP connection, maybe NAT'd, that the kernel does not have yet (this node was the
backup), or, on a node that was master not long ago, one it still holds with its timer
shortened. A pass handles exactly one of these cases and nothing else:

* each record's request, a create or an update (:func:`commit_encoder`), is built from
  its bytes (:func:`replicator.record.usual_layout`,
  :func:`replicator.ctnetlink.usual_create_packer`), and the creates of most records a
  batch at a time, one byte column at a time (:func:`commit_plan`,
  :mod:`replicator.colpack`: the same bytes); a record of another kind (labels, a
  helper, a master, SCTP, ICMP, a zone) is not sent but handed back;
* batches as in :mod:`replicator.inject` (many requests per datagram, only the last asks
  for an ACK, the kernel answers the failures in order before it);
* a request the kernel refused, for whatever reason (``EEXIST``: the entry is there
  already; ``ENOENT``: an update's entry is not; ``ENOMEM``: the table is full), and
  every request of a batch whose replies may have been lost, is not judged here: its
  record is handed back too.

The caller then writes the records handed back through the full injector (updates
after ``EEXIST``, creates after ``ENOENT``, masters before related entries,
verification after lost replies, the errors reported per entry), so the outcome is the
injector's, only faster. The driving protocol is :class:`~replicator.inject.Injection`'s,
so :func:`replicator.inject.run` drives it, and :func:`replicator.inject.run_overlapped`
(building the next batch while the kernel works on one).
"""

from __future__ import annotations

import collections
import functools
import math
from collections.abc import Callable, Sequence

from . import colpack, ctnetlink
from . import record as R
from .batchjob import BatchJob
from .model import IPPROTO_TCP, Status

_SEQ_MASK = 0xFFFFFFFF
_FIXED_TIMEOUT = int(Status.FIXED_TIMEOUT)

#: Builds the request of a record with a sequence number, asking for an ACK or not;
#: ``None`` if the record is not of the kind this pass writes.
RecordEncoder = Callable[[bytes, int, bool], "bytes | None"]
#: Builds the requests of records from a first sequence number (the last asks for the ACK).
_Build = Callable[[Sequence[bytes], int], bytes]


#: Plans the writes of some records: runs whose requests are built together
#: (:func:`replicator.colpack.plan_creates`), and the records left to the per-record
#: encoder.
Planner = Callable[[Sequence[bytes]], "tuple[list[colpack.Run], list[bytes]]"]

#: Records planned at a time: the planning of the next ones overlaps the kernel's work
#: on a batch (:meth:`RecordWrites.prefetch`) instead of delaying the first. Small
#: enough (1.2 ms) that planning and building the next batch take less than the
#: kernel's 2-4 ms on the current one: with 16 k (5 ms) the sending thread waited for
#: the next datagram after each chunk, 0.02-0.03 s per 100 k entries (measured). A
#: chunk's last batch of each kind is a short one: 97 datagrams for 100 k, not 91.
PLAN_CHUNK = 4096
#: Records planned first: about two datagrams' worth, so the first goes out sooner.
FIRST_PLAN_CHUNK = 2048


class RecordWrites(BatchJob):
    """One pass of requests (creates or updates, as ``encode`` makes them) over
    ``records`` (see the module doc); with ``plan``, the records it puts in runs have
    their requests built together instead (:mod:`replicator.colpack`), the others
    still by ``encode``.

    ``result()`` is ``(applied, handed_back)``: how many records the kernel accepted,
    and the records to write through the full injector.
    """

    def __init__(self, records: Sequence[bytes], encode: RecordEncoder, *, seq_start: int,
                 batch_bytes: int, reply_budget: int,
                 parse_acks: Callable[[bytes | memoryview], list[tuple[int, int]]]
                 = ctnetlink.parse_acks, plan: Planner | None = None) -> None:
        self._records = records
        self._encode = encode
        self._plan = plan
        self._seq = seq_start & _SEQ_MASK
        self._batch_bytes = batch_bytes
        # Every request of a batch may fail: its error replies must fit the buffer.
        self._max_requests = max(1, reply_budget)
        self._parse_acks = parse_acks
        #: Records taken from ``records`` into runs so far.
        self._pos = 0
        #: Runs planned, not written yet, each (build, size, records), with the
        #: position reached in the first: ``build`` None for the per-record encoder.
        self._runs: collections.deque[tuple[_Build | None, int, list[bytes]]] = (
            collections.deque())
        self._run_pos = 0
        self._applied = 0
        self._back: list[bytes] = []
        #: The batch in flight: its records, first sequence number, refused positions.
        self._batch: list[bytes] | None = None
        #: The batch built ahead by prefetch(), not sent yet.
        self._ready: tuple[list[bytes], int, bytes] | None = None
        self._first = 0
        self._refused: set[int] = set()
        self._last_ok = False
        self._lost = False

    # -- the driving protocol of inject.run ------------------------------------------

    def next_datagram(self) -> bytes | None:
        """The next batch of requests, or ``None`` when every record was sent."""
        if self._batch is not None:
            raise RuntimeError("the previous batch is still waiting for its replies")
        ready = self._ready if self._ready is not None else self._build()
        self._ready = None
        if ready is None:
            return None
        self._batch, self._first, datagram = ready
        self._refused = set()
        self._last_ok = False
        self._lost = False
        return datagram

    def prefetch(self) -> bytes | None:
        """Build the batch after the one in flight now, so that a caller can encode it
        while the kernel works on the current one (:func:`replicator.inject.run_overlapped`),
        and return its datagram (``None``: no record left); :meth:`next_datagram` then
        returns it."""
        if self._ready is None:
            self._ready = self._build()
        return None if self._ready is None else self._ready[2]

    def _build(self) -> tuple[list[bytes], int, bytes] | None:
        """The next batch's records, first sequence number and datagram (``None``: no
        record left)."""
        runs = self._runs
        while True:
            if not runs and not self._plan_more():
                return None
            build, size, records = runs[0]
            if build is None:
                built = self._build_each(records)
            else:
                built = self._build_run(build, size, records)
            if self._run_pos >= len(records):
                runs.popleft()
                self._run_pos = 0
            if built is not None:
                return built

    def _plan_more(self) -> bool:
        """Plan the next records into runs; False when none is left."""
        start, records = self._pos, self._records
        if start >= len(records):
            return False
        if self._plan is None:
            self._pos = len(records)
            self._runs.append((None, 0, list(records[start:])))
            return True
        chunk = records[start:start + (PLAN_CHUNK if start else FIRST_PLAN_CHUNK)]
        self._pos = start + len(chunk)
        runs, rest = self._plan(chunk)
        self._runs.extend((run.build, run.size, run.records) for run in runs)
        if rest:
            self._runs.append((None, 0, rest))
        return True

    def _build_run(self, build: _Build, size: int, records: list[bytes]
                   ) -> tuple[list[bytes], int, bytes]:
        """The next batch of a run whose requests are built together."""
        pos = self._run_pos
        count = min(len(records) - pos, self._max_requests,
                    max(1, self._batch_bytes // size))
        members = records[pos:pos + count]
        self._run_pos = pos + count
        first = self._seq
        self._seq = (first + count) & _SEQ_MASK
        return members, first, build(members, first)

    def _build_each(self, records: list[bytes]) -> tuple[list[bytes], int, bytes] | None:
        """The next batch of a run of records encoded one by one (``None`` if every
        record left in it was handed back)."""
        # Locals only in this loop: it runs once per entry of a whole table.
        encode, back = self._encode, self._back
        members: list[bytes] = []
        parts: list[bytes] = []
        size, limit, pos, end = 0, self._batch_bytes, self._run_pos, len(records)
        first = seq = self._seq
        room = self._max_requests
        while pos < end and room:
            rec = records[pos]
            message = encode(rec, seq, False)
            if message is None:
                back.append(rec)
                pos += 1
                continue
            size += len(message)
            if size > limit and parts:
                break
            members.append(rec)
            parts.append(message)
            pos += 1
            seq = (seq + 1) & _SEQ_MASK
            room -= 1
        self._run_pos = pos
        if not members:
            return None
        # The batch's end is known only now: its last request asks for the ACK.
        last = encode(members[-1], (first + len(members) - 1) & _SEQ_MASK, True)
        assert last is not None
        parts[-1] = last
        self._seq = (first + len(members)) & _SEQ_MASK
        return members, first, b"".join(parts)

    def receive(self, data: bytes | memoryview) -> None:
        """Consume one datagram of replies (others' sequence numbers are ignored)."""
        batch = self._batch
        if batch is None:
            return
        last = len(batch) - 1
        done = False
        for seq, err in self._parse_acks(data):
            index = (seq - self._first) & _SEQ_MASK
            if index > last:
                continue
            if err:
                self._refused.add(index)
            elif index == last:
                self._last_ok = True
            done = done or index == last
        if done:
            self._finish()

    def result(self) -> tuple[int, list[bytes]]:
        """``(applied, handed back)``, once :meth:`next_datagram` returned ``None``."""
        if (self._batch is not None or self._ready is not None or self._runs
                or self._pos < len(self._records)):
            raise RuntimeError("the pass is not finished")
        return self._applied, self._back

    def _finish(self) -> None:
        batch, refused = self._batch, self._refused
        assert batch is not None
        self._batch = None
        if self._lost:
            # Without every reply, a silent request may have failed: the injector
            # checks (a create that had succeeded answers EEXIST and is updated).
            acked = len(batch) - 1 if self._last_ok else -1
            for index, rec in enumerate(batch):
                if index == acked:
                    self._applied += 1
                else:
                    self._back.append(rec)
            return
        for index in refused:
            self._back.append(batch[index])
        self._applied += len(batch) - len(refused)


def commit_plan(now: float, *, tcp_flags: int = 0, update: bool = False) -> Planner | None:
    """The planner of a commit at ``now`` (see :func:`commit_encoder`): creates of the
    usual records built together (:func:`replicator.colpack.plan_creates`), byte for
    byte the requests :func:`commit_encoder` builds one by one; ``None`` for updates
    (still built one by one: a commit meets them only for a node demoted not long
    ago)."""
    if update:
        return None
    return functools.partial(colpack.plan_creates, now=now, tcp_flags=tcp_flags)


def commit_encoder(now: float, *, no_timeout: int | None = None,
                   tcp_flags: int = 0, update: bool = False) -> RecordEncoder:
    """The encoder of a commit at ``now``: each record's entry as
    :func:`replicator.external.commit_entry` makes it (the time left as its timeout,
    ``no_timeout`` without a deadline, ``tcp_flags`` set in both directions), in a
    create request, or with ``update`` in an update request (for entries the kernel
    has already: :func:`replicator.ctnetlink.encode_update`).

    Each record is read in one unpack (:func:`replicator.record.usual_layout`) and its
    request built in one pack (:func:`replicator.ctnetlink.usual_create_packer`,
    :func:`~replicator.ctnetlink.usual_update_packer`), with the fields passed from one
    to the other as they are: at 100 k entries per takeover, every intermediate tuple
    shows (3.5-4.0 µs per entry through an unpacked tuple of fields, 2.3-2.7 µs so).
    """
    flags_at, layout_of, header = R.FLAGS_AT, R.usual_layout, R.HEADER_SIZE
    by_shape: dict[int, RecordEncoder | None] = {}

    def encode_record(record: bytes, seq: int, ack: bool) -> bytes | None:
        family = record[header]  # R.usual_shape, inline
        shape = family << 8 | record[flags_at[family]]
        try:
            encode = by_shape[shape]
        except KeyError:
            layout = layout_of(shape)
            encode = by_shape[shape] = None if layout is None else _shape_encoder(
                family, layout, now, no_timeout=no_timeout, tcp_flags=tcp_flags, update=update)
        return None if encode is None else encode(record, seq, ack)

    return encode_record


_NO_TCP = (0, 0, 0, 0, 0)


def _shape_encoder(family: int, layout: R.UsualLayout, now: float, *,
                   no_timeout: int | None, tcp_flags: int, update: bool) -> RecordEncoder:
    """:func:`commit_encoder` for the records of one shape."""
    read, reply, mark_at, tcp_at = layout
    both = (False, True)
    # Creates by 2 * SNAT + DNAT, updates by 2 * (timeout carried: not FIXED_TIMEOUT);
    # each + 1 with TCP info (only for TCP, as encode_create and encode_update decide).
    creates = [ctnetlink.usual_create_packer(family, s, d, tcp)
               for s in both for d in both for tcp in both]
    updates = [ctnetlink.usual_update_packer(family, timed, tcp)
               for timed in both for tcp in both]
    protocols, tcp_proto, fixed = ctnetlink.FAST_CREATE_PROTOCOLS, IPPROTO_TCP, _FIXED_TIMEOUT
    inf, ceil, no_tcp = math.inf, math.ceil, _NO_TCP
    t = tcp_at or 0
    # Where the fields are, as locals (read once per entry).
    at_deadline, at_zone, at_status = R.U_DEADLINE, R.U_ZONE, R.U_STATUS
    at_src, at_dst, at_proto, at_sport, at_dport = R.U_SRC, R.U_DST, R.U_PROTO, R.U_SPORT, R.U_DPORT

    def encode(record: bytes, seq: int, ack: bool) -> bytes | None:
        v = read(record)
        proto = v[at_proto]
        if v[at_zone] or proto not in protocols:
            return None
        # external.commit_timeout, inline (one call per entry less).
        deadline = v[at_deadline]
        timeout = no_timeout if deadline == inf else max(1, ceil(deadline - now))
        if timeout is None:
            return None
        with_tcp = tcp_at is not None and proto == tcp_proto
        tcp = (v[t], v[t + 1], v[t + 2], v[t + 3] | tcp_flags,
               v[t + 4] | tcp_flags) if with_tcp else no_tcp
        src, dst, sport, dport = v[at_src], v[at_dst], v[at_sport], v[at_dport]
        status = v[at_status]
        if update:
            return updates[2 * (not status & fixed) + with_tcp](
                seq, ack, src, dst, proto, sport, dport, status, timeout, v[mark_at], *tcp)
        if reply is None:
            rsrc, rdst, rsport, rdport = dst, src, dport, sport
        else:
            rsrc, rdst, rsport, rdport = v[reply], v[reply + 1], v[reply + 3], v[reply + 4]
        nat: int = 4 * (rdst != src or rdport != sport) + 2 * (rsrc != dst or rsport != dport)
        return creates[nat + with_tcp](seq, ack, src, dst, proto, sport, dport, rdst, rdport,
                                       rsrc, rsport, status, timeout, v[mark_at], *tcp)

    return encode
