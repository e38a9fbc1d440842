"""Batching, ordering and error mapping of the injector, against an in-memory kernel double.

No kernel claim is made here: the double (:class:`FakeKernel`) only follows the reply
rules the injector relies on (one reply per failed request, one for each request that
asked for an ACK, in order, synchronously) and the create/update/delete outcomes of
ctnetlink (EEXIST, ENOENT, a master must exist). What the real kernel does is pinned
down in ``integration/netns/test_kernel_inject.py``.

The double reads requests built by :func:`stub_codec`, whose payload is just the index
of the entry, so that these tests do not depend on the real encoder's layout.
"""

from __future__ import annotations

import errno
import socket
import struct
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from replicator import ctnetlink
from replicator.inject import (
    Batch,
    Codec,
    Injection,
    Op,
    install_levels,
    plan_batches,
    run,
)
from replicator.kernel import EntryError
from replicator.model import AF_INET, IPPROTO_TCP, CtTuple, Entry, EntryKey, invert
from replicator.netlink import NLM_F_ACK, NLM_F_REQUEST, NLMSG_ERROR, NLMSG_HDR

SERVER = bytes([192, 0, 2, 1])
_OPS = {0x7F00: Op.CREATE, 0x7F01: Op.UPDATE, 0x7F02: Op.DELETE}
_TYPES = {op: mtype for mtype, op in _OPS.items()}
_INDEX = struct.Struct("=I")


def tuple_of(i: int) -> CtTuple:
    return CtTuple(bytes([10, 1, (i >> 8) & 255, i & 255]), SERVER, IPPROTO_TCP, 1024 + i, 80)


def entry(i: int, *, master: int | None = None, mark: int = 0) -> Entry:
    orig = tuple_of(i)
    return Entry(AF_INET, orig, invert(orig), timeout=100, mark=mark,
                 master=None if master is None else tuple_of(master))


def stub_codec(entries: Sequence[Entry]) -> Codec:
    """Requests of ``12 + 4 * (index % 5)`` payload bytes carrying the entry's index."""
    index = {e.key: i for i, e in enumerate(entries)}

    def encoder(op: Op) -> Callable[..., bytes]:
        def encode(e: Entry, seq: int, *, ack: bool = False) -> bytes:
            i = index[e.key]
            payload = _INDEX.pack(i) + b"\0" * (8 + 4 * (i % 5))
            flags = NLM_F_REQUEST | (NLM_F_ACK if ack else 0)
            return NLMSG_HDR.pack(16 + len(payload), _TYPES[op], flags, seq, 0) + payload
        return encode

    return Codec(encoder(Op.CREATE), encoder(Op.UPDATE), encoder(Op.DELETE),
                 ctnetlink.parse_acks)


def requests(datagram: bytes) -> list[tuple[Op, int, int, int]]:
    """``(op, flags, seq, entry index)`` of every stub request in a datagram."""
    out = []
    off = 0
    while off < len(datagram):
        length, mtype, flags, seq, _ = NLMSG_HDR.unpack_from(datagram, off)
        out.append((_OPS[mtype], flags, seq, _INDEX.unpack_from(datagram, off + 16)[0]))
        off += length
    return out


def reply(seq: int, err: int) -> bytes:
    """An NLMSG_ERROR as the kernel sends it with NETLINK_CAP_ACK (header of the request)."""
    return NLMSG_HDR.pack(36, NLMSG_ERROR, 0, seq, 0) + struct.pack("=i", -err) + bytes(16)


@dataclass
class FakeKernel:
    """A conntrack table answering stub requests the way ctnetlink does."""

    entries: Sequence[Entry]
    table: dict[EntryKey, Entry] = field(default_factory=dict)
    #: errno the kernel answers for any create/update of these keys (e.g. ENOMEM).
    refuse: dict[EntryKey, int] = field(default_factory=dict)
    datagrams: list[list[tuple[Op, int, int, int]]] = field(default_factory=list)

    def handle(self, datagram: bytes) -> list[bytes]:
        parsed = requests(datagram)
        self.datagrams.append(parsed)
        replies = []
        for op, flags, seq, i in parsed:
            err = self._apply(op, self.entries[i])
            if err or flags & NLM_F_ACK:
                replies.append(reply(seq, err))
        return replies

    def _apply(self, op: Op, e: Entry) -> int:
        key = e.key
        if op is Op.DELETE:
            if key not in self.table:
                return errno.ENOENT
            del self.table[key]
            return 0
        if key in self.refuse:
            return self.refuse[key]
        if op is Op.CREATE:
            if key in self.table:
                return errno.EEXIST
            if e.master is not None and (e.family, e.zone, e.master) not in self.table:
                return errno.ENOENT
        elif key not in self.table:
            return errno.ENOENT
        self.table[key] = e
        return 0


class FakeSocket:
    """The non-blocking socket surface :func:`run` uses, in front of a :class:`FakeKernel`.

    ``lose(n, replies)`` decides which replies of the ``n``-th datagram are dropped (as if
    the receive buffer overflowed); a drop makes the next ``recv_into`` raise ENOBUFS.
    With ``delay``, replies only become readable after a trio task releases them, so
    the injector has to wait for readability. Readability is real: a socketpair byte.
    """

    def __init__(self, kernel: FakeKernel, *,
                 lose: Callable[[int, list[bytes]], list[bytes]] | None = None,
                 delay: bool = False) -> None:
        self.kernel = kernel
        self._lose = lose
        self._delay = delay
        self._queue: deque[bytes] = deque()
        self._held: list[bytes] = []
        self._enobufs = False
        self._sent = 0
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self.stale: list[bytes] = []

    def close(self) -> None:
        self._r.close()
        self._w.close()

    def fileno(self) -> int:
        return self._r.fileno()

    def send(self, data: bytes, /) -> int:
        replies = self.kernel.handle(bytes(data))
        if self._lose is not None:
            kept = self._lose(self._sent, replies)
            if len(kept) < len(replies):
                self._enobufs = True
            replies = kept
        self._sent += 1
        if self._delay:
            self._held.extend(replies)
        else:
            self._push(replies)
        return len(data)

    def release(self) -> None:
        """Make the held (delayed) replies readable."""
        self._push(self._held)
        self._held = []

    def _push(self, replies: list[bytes]) -> None:
        if replies:
            self._queue.extend(replies)
            self._w.send(b"x")

    def recv_into(self, buffer: bytearray, /) -> int:
        if self.stale:
            data = self.stale.pop(0)
        elif self._enobufs:
            self._enobufs = False
            raise OSError(errno.ENOBUFS, "No buffer space available")
        elif not self._queue:
            raise BlockingIOError(errno.EAGAIN, "would block")
        else:
            data = self._queue.popleft()
            if not self._queue:
                while True:
                    try:
                        self._r.recv(64)
                    except BlockingIOError:
                        break
        buffer[: len(data)] = data
        return len(data)


def inject(job: Injection, sock: FakeSocket) -> tuple[int, list[EntryError]]:
    try:
        applied, errors = trio.run(run, sock, job)
    finally:
        sock.close()
    return applied, errors


# -- planning ------------------------------------------------------------------------


@given(n=st.integers(0, 60), limit=st.integers(1, 400), cap=st.none() | st.integers(1, 9),
       ack_each=st.booleans(), seq_start=st.integers(0, 2**32 - 1))
def test_batches_cover_entries_in_order_within_limits(n: int, limit: int, cap: int | None,
                                                      ack_each: bool, seq_start: int) -> None:
    entries = [entry(i) for i in range(n)]
    codec = stub_codec(entries)
    batches = list(plan_batches(Op.CREATE, entries, codec.create, seq_start,
                                limit=limit, max_messages=cap, ack_each=ack_each))
    assert [e for b in batches for e in b.entries] == entries
    seqs = []
    for b in batches:
        parsed = requests(b.datagram)
        assert [i for _, _, _, i in parsed] == [entries.index(e) for e in b.entries]
        assert len(b.datagram) <= limit or len(parsed) == 1
        assert cap is None or len(parsed) <= cap
        acks = [bool(flags & NLM_F_ACK) for _, flags, _, _ in parsed]
        assert acks == ([True] * len(parsed) if ack_each else [False] * (len(parsed) - 1) + [True])
        assert parsed[-1][2] == b.last_seq
        seqs += [seq for _, _, seq, _ in parsed]
        assert [b.position(s) for _, _, s, _ in parsed] == list(range(len(parsed)))
    assert seqs == [(seq_start + k) % 2**32 for k in range(n)]


def test_position_rejects_foreign_sequence_numbers() -> None:
    batch = Batch(Op.CREATE, b"", (entry(1), entry(2)), 2**32 - 1, ack_each=False)
    assert batch.last_seq == 0
    assert [batch.position(s) for s in (2**32 - 1, 0, 1, 2**32 - 2)] == [0, 1, None, None]


@st.composite
def related_entries(draw: st.DrawFn) -> list[Entry]:
    """Distinct entries, some related to an earlier one or to a tuple nobody has, shuffled."""
    n = draw(st.integers(0, 40))
    made = []
    for i in range(n):
        master = draw(st.none() | st.integers(0, i - 1) if i else st.none() | st.just(999))
        if master is not None and draw(st.booleans()):
            master = 1000 + i  # a master that is not among the entries
        made.append(entry(i, master=master))
    return draw(st.permutations(made))


@given(related_entries())
def test_levels_put_every_master_before_its_related_entries(entries: list[Entry]) -> None:
    levels = install_levels(entries)
    assert sorted(e for level in levels for e in level) == sorted(entries)
    level_of = {e.orig: k for k, level in enumerate(levels) for e in level}
    for e in entries:
        if e.master in level_of:
            assert level_of[e.master] < level_of[e.orig]
        else:
            assert level_of[e.orig] == 0
    for level in levels:  # order within a level is the caller's
        assert level == [e for e in entries if e in level]


def test_levels_survive_a_cycle_of_masters() -> None:
    a, b = entry(1, master=2), entry(2, master=1)
    levels = install_levels([a, b, entry(3, master=1)])
    assert sorted(e for level in levels for e in level) == sorted([a, b, entry(3, master=1)])


# -- upsert and delete over the double -------------------------------------------------


@st.composite
def upsert_cases(draw: st.DrawFn) -> tuple[list[Entry], set[int], dict[int, int]]:
    entries = draw(related_entries())
    indexes = st.sampled_from(range(len(entries))) if entries else st.nothing()
    existing = draw(st.sets(indexes, max_size=len(entries)))
    refused = draw(st.dictionaries(indexes, st.sampled_from([errno.ENOMEM, errno.EINVAL])))
    return entries, existing, refused


def losing(datagrams: set[int], pattern: str) -> Callable[[int, list[bytes]], list[bytes]]:
    """Lose replies of the given datagrams: all of them, the last one, or every second."""
    def lose(n: int, replies: list[bytes]) -> list[bytes]:
        if n not in datagrams:
            return replies
        if pattern == "all":
            return []
        if pattern == "last":
            return replies[:-1]
        return replies[::2]
    return lose


def expected_errors(entries: list[Entry], existing: set[int], refused: dict[int, int],
                    unsettled: frozenset[int] = frozenset()) -> dict[Entry, int]:
    """What the double must refuse: the refused entries, and ENOENT for related entries
    that are new and whose master neither exists nor gets created.

    ``unsettled``: entries whose replies were all lost (reported ENOBUFS) and that the
    table does not hold. The injector could not learn that they were missing, so it
    never got to create them (e.g. an update tried first, its ENOENT lost twice): for
    their related entries they are masters that do not get created.
    """
    by_orig = {e.orig: i for i, e in enumerate(entries)}

    def ok(i: int) -> bool:
        master = entries[i].master
        if i in refused or i in unsettled:
            return False
        return i in existing or master is None or (
            master in by_orig and (by_orig[master] in existing or ok(by_orig[master])))

    return {e: refused.get(i, errno.ENOENT) for i, e in enumerate(entries) if not ok(i)}


LOSSES = st.none() | st.tuples(st.sets(st.integers(0, 6), min_size=1),
                               st.sampled_from(["all", "last", "alternate"]))


@settings(max_examples=150, deadline=None)
@given(case=upsert_cases(), limit=st.integers(30, 200), budget=st.integers(1, 8), loss=LOSSES,
       update_first=st.booleans())
def test_upsert_applies_or_reports_every_entry(
        case: tuple[list[Entry], set[int], dict[int, int]], limit: int, budget: int,
        loss: tuple[set[int], str] | None, update_first: bool) -> None:
    entries, existing, refused = case
    kernel = FakeKernel(entries)
    for i in existing:  # an older copy of the entry: upsert must update it
        kernel.table[entries[i].key] = entries[i]._replace(mark=7)
    kernel.refuse = {entries[i].key: err for i, err in refused.items()}
    job = Injection.upsert(entries, update_first=update_first, codec=stub_codec(entries),
                           batch_bytes=limit, reply_budget=budget)
    applied, errors = inject(job, FakeSocket(kernel, lose=loss and losing(*loss)))

    reported = dict(errors)
    unsettled = frozenset(i for i, e in enumerate(entries)
                          if reported.get(e) == errno.ENOBUFS and e.key not in kernel.table)
    expected = expected_errors(entries, existing, refused, unsettled)
    assert len(reported) == len(errors)  # each entry reported at most once
    assert applied + len(errors) == len(entries)
    for e in entries:
        if e in reported:
            # ENOBUFS: even a lone re-sent request lost its reply; never a success.
            assert reported[e] == expected.get(e) or (loss and reported[e] == errno.ENOBUFS)
        else:
            assert e not in expected
            assert kernel.table[e.key] == e
    assert set(expected) <= set(reported)
    if loss is None:
        # At most update (ENOENT), create (EEXIST: it appeared meanwhile), update.
        sent = [i for d in kernel.datagrams for _, _, _, i in d]
        assert all(sent.count(i) <= 3 for i in range(len(entries)))


def ops_sent(kernel: FakeKernel) -> list[Op]:
    return [op for d in kernel.datagrams for op, _, _, _ in d]


def test_related_entries_of_a_master_whose_replies_were_lost_are_refused() -> None:
    """Found by test_upsert_applies_or_reports_every_entry. Updates tried first; every
    reply to the master's update and to its verification is lost, so the injector never
    learns that the master is missing and reports it ENOBUFS (uncertain) without
    creating it. Its related entries still go after it (the master may exist), and the
    kernel refuses them with ENOENT: that is what gets reported, never a success."""
    entries = [entry(0), entry(1, master=0), entry(2), entry(3, master=0)]
    kernel = FakeKernel(entries)
    job = Injection.upsert(entries, update_first=True, codec=stub_codec(entries),
                           batch_bytes=30, reply_budget=1)
    applied, errors = inject(job, FakeSocket(kernel, lose=losing({0, 1, 2, 3}, "all")))
    assert applied == 0
    assert dict(errors) == {entries[0]: errno.ENOBUFS, entries[2]: errno.ENOBUFS,
                            entries[1]: errno.ENOENT, entries[3]: errno.ENOENT}
    # The master's level and its verification (one update each, then one more with
    # an ACK), then the related level.
    sent = [i for d in kernel.datagrams for _, _, _, i in d]
    assert sorted(sent[:4]) == [0, 0, 2, 2] and sorted(sent[4:]) == [1, 1, 3]
    assert kernel.table == {}


def test_an_upsert_of_existing_entries_switches_to_updates() -> None:
    entries = [entry(i) for i in range(100)]
    kernel = FakeKernel(entries, table={e.key: e._replace(mark=1) for e in entries})
    job = Injection.upsert(entries, codec=stub_codec(entries), batch_bytes=300)
    assert inject(job, FakeSocket(kernel)) == (100, [])
    first = len(kernel.datagrams[0])
    assert 1 < first < 50
    # One batch of creates (all EEXIST, then updated), then updates only.
    assert ops_sent(kernel) == [Op.CREATE] * first + [Op.UPDATE] * 100
    assert kernel.table == {e.key: e for e in entries}


def test_update_first_turns_to_creates_when_entries_are_new() -> None:
    entries = [entry(i) for i in range(100)]
    kernel = FakeKernel(entries)
    job = Injection.upsert(entries, update_first=True, codec=stub_codec(entries),
                           batch_bytes=300)
    assert inject(job, FakeSocket(kernel)) == (100, [])
    first = len(kernel.datagrams[0])
    assert ops_sent(kernel) == [Op.UPDATE] * first + [Op.CREATE] * 100
    assert kernel.table == {e.key: e for e in entries}


def test_an_entry_that_vanishes_between_requests_is_reported() -> None:
    """update (ENOENT) -> create (EEXIST) -> update (ENOENT): reported, no endless loop."""
    entries = [entry(1)]

    class Flickering(FakeKernel):
        def _apply(self, op: Op, e: Entry) -> int:
            return errno.EEXIST if op is Op.CREATE else errno.ENOENT

    kernel = Flickering(entries)
    job = Injection.upsert(entries, update_first=True, codec=stub_codec(entries))
    assert inject(job, FakeSocket(kernel)) == (0, [EntryError(entries[0], errno.ENOENT)])
    assert ops_sent(kernel) == [Op.UPDATE, Op.CREATE, Op.UPDATE]


class RefusingDeletes(FakeKernel):
    """A double that refuses to delete some entries."""

    def __init__(self, entries: Sequence[Entry], table: dict[EntryKey, Entry],
                 refused: set[int]) -> None:
        super().__init__(entries, table)
        self.refused = {entries[i].key for i in refused}

    def _apply(self, op: Op, e: Entry) -> int:
        return errno.EPERM if e.key in self.refused else super()._apply(op, e)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 50), present=st.sets(st.integers(0, 49)),
       refused=st.sets(st.integers(0, 49)), loss=LOSSES)
def test_delete_counts_missing_entries_as_applied(n: int, present: set[int], refused: set[int],
                                                 loss: tuple[set[int], str] | None) -> None:
    entries = [entry(i) for i in range(n)]
    present = {i for i in present if i < n}
    refused = {i for i in refused if i < n}
    kernel = RefusingDeletes(entries, {entries[i].key: entries[i] for i in present}, refused)
    job = Injection.delete(entries, codec=stub_codec(entries), batch_bytes=64, reply_budget=3)
    applied, errors = inject(job, FakeSocket(kernel, lose=loss and losing(*loss)))
    assert applied + len(errors) == n
    for _, err in errors:
        assert err == errno.EPERM or (loss and err == errno.ENOBUFS)
    assert {e for e, _ in errors} >= {entries[i] for i in refused}
    assert set(kernel.table) == {entries[i].key for i in present & refused}


def test_only_the_last_request_of_a_batch_asks_for_an_ack() -> None:
    entries = [entry(i) for i in range(100)]
    kernel = FakeKernel(entries)
    job = Injection.upsert(entries, codec=stub_codec(entries), batch_bytes=500)
    assert inject(job, FakeSocket(kernel)) == (100, [])
    assert len(kernel.datagrams) > 3
    for datagram in kernel.datagrams:
        assert [bool(flags & NLM_F_ACK) for _, flags, _, _ in datagram] == [
            False] * (len(datagram) - 1) + [True]


def test_lost_replies_are_never_reported_as_success() -> None:
    """Every reply lost, always: every entry ends up reported with ENOBUFS."""
    entries = [entry(i) for i in range(20)]
    kernel = FakeKernel(entries, refuse={entries[3].key: errno.ENOMEM})
    job = Injection.upsert(entries, codec=stub_codec(entries), reply_budget=4)
    applied, errors = inject(job, FakeSocket(kernel, lose=lambda n, replies: []))
    assert applied == 0
    assert sorted(errors) == sorted(EntryError(e, errno.ENOBUFS) for e in entries)


def test_a_lost_error_reply_is_found_by_verification() -> None:
    entries = [entry(i) for i in range(30)]
    kernel = FakeKernel(entries, refuse={entries[7].key: errno.ENOMEM})
    # First datagram: the one error reply is lost, the final ACK arrives.
    job = Injection.upsert(entries, codec=stub_codec(entries))
    lost = reply(7 + 1, errno.ENOMEM)  # seq 8: the 8th request (seqs start at 1)
    applied, errors = inject(job, FakeSocket(
        kernel, lose=lambda n, r: [x for x in r if x != lost] if n == 0 else r))
    assert (applied, errors) == (29, [EntryError(entries[7], errno.ENOMEM)])
    # Then every create without a reply again, each with an ACK (the last one's reply
    # did arrive); those that had worked answer EEXIST and are updated.
    _, verify, update = kernel.datagrams
    assert [(op, i) for op, _, _, i in verify] == [(Op.CREATE, i) for i in range(29)]
    assert all(flags & NLM_F_ACK for _, flags, _, _ in verify)
    assert [(op, i) for op, _, _, i in update] == [(Op.UPDATE, i) for i in range(29) if i != 7]


async def test_waits_for_replies_that_arrive_later() -> None:
    entries = [entry(i) for i in range(50)]
    kernel = FakeKernel(entries, refuse={entries[9].key: errno.EINVAL})
    sock = FakeSocket(kernel, delay=True)
    job = Injection.upsert(entries, codec=stub_codec(entries), batch_bytes=300)
    results: list[tuple[int, list[EntryError]]] = []

    async def injector() -> None:
        results.append(await run(sock, job))

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(injector)
            while not results:
                await trio.sleep(0.001)
                sock.release()
    finally:
        sock.close()
    assert results == [(49, [EntryError(entries[9], errno.EINVAL)])]
    assert len(kernel.datagrams) > 1


async def test_the_first_datagram_goes_out_without_giving_the_turn_away() -> None:
    # A hot standby's write of what it just received must not wait while another task
    # (the peer's next frame being read and decoded) takes its turn. trio runs the
    # tasks ready at a turn in either order, so one write that did give its turn away
    # would let the other task run first only half of the time: twenty are made.
    entries = [entry(i) for i in range(100)]
    kernel = FakeKernel(entries)
    sock = FakeSocket(kernel)
    codec = stub_codec(entries)
    ran: list[int] = []

    async def other() -> None:
        ran.append(len(kernel.datagrams))

    try:
        for i in range(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(other)  # ready to run at the next turn
                job = Injection.upsert(entries[5 * i:5 * i + 5], codec=codec)
                assert await run(sock, job) == (5, [])
                assert len(ran) == i  # the other task has not run yet
    finally:
        sock.close()
    assert ran == list(range(1, 21))  # each ran after its write's one datagram


async def test_a_cancelled_write_sends_nothing() -> None:
    entries = [entry(i) for i in range(5)]
    kernel = FakeKernel(entries)
    sock = FakeSocket(kernel)
    try:
        with trio.CancelScope() as scope:
            scope.cancel()
            await run(sock, Injection.upsert(entries, codec=stub_codec(entries)))
    finally:
        sock.close()
    assert scope.cancelled_caught and kernel.datagrams == []


async def test_replies_left_over_from_an_abandoned_write_are_discarded() -> None:
    entries = [entry(i) for i in range(5)]
    kernel = FakeKernel(entries)
    sock = FakeSocket(kernel)
    # Errors for the very sequence numbers this write is going to use.
    sock.stale = [reply(seq, errno.ENOMEM) for seq in range(1, 6)]
    try:
        result = await run(sock, Injection.upsert(entries, codec=stub_codec(entries)))
    finally:
        sock.close()
    assert result == (5, [])


def test_replies_to_other_sequence_numbers_are_ignored() -> None:
    entries = [entry(1), entry(2)]
    job = Injection.upsert(entries, codec=stub_codec(entries), seq_start=10)
    assert job.next_datagram() is not None
    job.receive(reply(9, errno.ENOMEM) + reply(12, errno.ENOMEM))
    assert job.waiting
    job.receive(reply(11, 0))
    assert not job.waiting
    assert job.next_datagram() is None
    assert job.result() == (2, [])


def test_result_before_the_end_is_a_bug() -> None:
    entries = [entry(1)]
    job = Injection.upsert(entries, codec=stub_codec(entries))
    assert job.next_datagram() is not None
    with pytest.raises(RuntimeError):
        job.result()
    with pytest.raises(RuntimeError):
        job.next_datagram()
