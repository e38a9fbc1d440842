"""A commit's first pass, creates straight from records (replicator.bulkwrite)."""

from __future__ import annotations

import errno
import functools
import math
import socket
import time
from collections.abc import Awaitable, Callable, Sequence

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st
from test_inject import FakeKernel, FakeSocket, entry
from test_wire import entries

from replicator import ctnetlink, inject
from replicator import record as R
from replicator.bulkwrite import RecordEncoder, RecordWrites, commit_encoder
from replicator.errors import KernelError
from replicator.external import commit_entry
from replicator.inject import Op, _ends_acked, run, run_overlapped
from replicator.model import Entry, TcpFlag
from replicator.netlink import NLM_F_ACK, NLM_F_REQUEST, NLMSG_ERROR, NLMSG_HDR

_CREATE = 0x7F00  # test_inject's stub type for creates


def stub_records(n: int, unusual: Sequence[int] = ()) -> tuple[list[bytes], RecordEncoder]:
    """``n`` stand-in records and an encoder of test_inject's stub requests for them
    (``None`` for the ``unusual`` ones)."""
    records = [b"record %d" % i for i in range(n)]
    index = {r: i for i, r in enumerate(records)}

    def encode(rec: bytes, seq: int, ack: bool) -> bytes | None:
        i = index[rec]
        if i in unusual:
            return None
        payload = i.to_bytes(4, "little") + bytes(8 + 4 * (i % 5))
        flags = NLM_F_REQUEST | (NLM_F_ACK if ack else 0)
        return NLMSG_HDR.pack(16 + len(payload), _CREATE, flags, seq, 0) + payload

    return records, encode


Runner = Callable[[FakeSocket, RecordWrites], Awaitable[tuple[int, list[bytes]]]]


@pytest.fixture(params=[run, run_overlapped, functools.partial(run_overlapped, apart=True)],
                ids=["run", "run_overlapped", "run_overlapped_apart"])
def runner(request: pytest.FixtureRequest) -> Runner:
    """The drivers: the plain one and the one a commit uses (kernel work in a thread),
    also with its two threads kept on different CPUs (a takeover's commit)."""
    return request.param  # type: ignore[no-any-return]


def drive(job: RecordWrites, kernel: FakeKernel, runner: Runner,
          sock: FakeSocket | None = None) -> tuple[int, list[bytes]]:
    sock = FakeSocket(kernel) if sock is None else sock
    try:
        return trio.run(runner, sock, job)
    finally:
        sock.close()


def test_new_entries_are_all_created_in_batches_acked_once(runner: Runner) -> None:
    records, encode = stub_records(300)
    kernel = FakeKernel([entry(i) for i in range(300)])
    job = RecordWrites(records, encode, seq_start=7, batch_bytes=1000,
                        reply_budget=10_000)
    assert drive(job, kernel, runner) == (300, [])
    assert len(kernel.table) == 300
    sent = [r for d in kernel.datagrams for r in d]
    assert [seq for _op, _f, seq, _i in sent] == list(range(7, 307))
    assert len(kernel.datagrams) > 1
    for datagram in kernel.datagrams:
        acks = [bool(flags & NLM_F_ACK) for _op, flags, _s, _i in datagram]
        assert acks == [False] * (len(datagram) - 1) + [True]
        assert all(op is Op.CREATE for op, _f, _s, _i in datagram)


def test_refused_and_unusual_records_are_handed_back(runner: Runner) -> None:
    records, encode = stub_records(50, unusual=(3, 40))
    kernel = FakeKernel([entry(i) for i in range(50)])
    kernel.table[entry(10).key] = entry(10)  # exists: EEXIST
    kernel.refuse[entry(20).key] = errno.ENOMEM
    kernel.refuse[entry(49).key] = errno.EINVAL  # the last of the batch: its ACK fails
    job = RecordWrites(records, encode, seq_start=1, batch_bytes=1 << 20,
                        reply_budget=10_000)
    applied, back = drive(job, kernel, runner)
    assert sorted(back) == sorted(records[i] for i in (3, 10, 20, 40, 49))
    assert applied == 45
    # Unusual records never reached the kernel.
    assert {i for d in kernel.datagrams for _o, _f, _s, i in d} == set(range(50)) - {3, 40}


def test_the_reply_budget_caps_the_requests_of_a_batch(runner: Runner) -> None:
    records, encode = stub_records(25)
    kernel = FakeKernel([entry(i) for i in range(25)])
    job = RecordWrites(records, encode, seq_start=1, batch_bytes=1 << 20,
                        reply_budget=10)
    assert drive(job, kernel, runner) == (25, [])
    assert [len(d) for d in kernel.datagrams] == [10, 10, 5]


def test_after_lost_replies_every_unconfirmed_record_is_handed_back(runner: Runner) -> None:
    records, encode = stub_records(40)
    kernel = FakeKernel([entry(i) for i in range(40)])
    kernel.refuse[entry(5).key] = errno.ENOMEM

    def lose_second_batch(n: int, replies: list[bytes]) -> list[bytes]:
        return [] if n == 1 else replies

    job = RecordWrites(records, encode, seq_start=1, batch_bytes=300,
                        reply_budget=10_000)
    applied, back = drive(job, kernel, runner, FakeSocket(kernel, lose=lose_second_batch))
    second = {records[i] for _o, _f, _s, i in kernel.datagrams[1]}
    # The second batch is uncertain as a whole (its ACK was lost too); the first
    # batch's refusal is known.
    assert set(back) == second | {records[5]}
    assert applied == 40 - len(set(back))


def usual(e: Entry) -> Entry:
    """``e`` as most entries are (the first pass's kind, if TCP or UDP)."""
    return e._replace(labels=None, helper=None, master=None, sctp=None, zone=0,
                      mark=e.mark or 0)


@given(e=entries(), make_usual=st.booleans(), now=st.floats(0, 1e6),
       left=st.floats(0, 4000), forever=st.booleans(),
       tcp_flags=st.sampled_from([0, int(TcpFlag.BE_LIBERAL)]),
       seq=st.integers(0, 2**32 - 1), ack=st.booleans(), update=st.booleans())
def test_a_record_encodes_as_its_commit_entry(
    *, e: Entry, make_usual: bool, now: float, left: float, forever: bool, tcp_flags: int,
    seq: int, ack: bool, update: bool,
) -> None:
    """A create (or, with ``update``, an update) of the entry commit_entry makes."""
    if make_usual:
        e = usual(e)
    rec = R.pack(e, math.inf if forever else now + left)
    encode = commit_encoder(now, no_timeout=180, tcp_flags=tcp_flags, update=update)
    message = encode(rec, seq, ack)
    if not R.is_usual(rec):
        assert message is None
    else:
        want = commit_entry(rec, now, no_timeout=180, tcp_flags=tcp_flags)
        general = ctnetlink.encode_update if update else ctnetlink.encode_create
        assert message == general(want, seq, ack=ack)


@given(entries())
def test_usual_records_are_recognised(e: Entry) -> None:
    e = usual(e)
    assert R.is_usual(R.pack(e, 5.0)) == (e.orig.proto in ctnetlink.FAST_CREATE_PROTOCOLS)
    assert not R.is_usual(R.pack(e._replace(mark=None), 5.0))
    assert not R.is_usual(R.pack(e._replace(zone=1), 5.0))


async def write_while(sock: FakeSocket, job: RecordWrites, every: float,
                      meanwhile: Callable[[], None]) -> tuple[int, list[bytes]]:
    """``run_overlapped(sock, job)`` in a task of its own, calling ``meanwhile`` every
    ``every`` seconds in another until it is done; its result."""
    results: list[tuple[int, list[bytes]]] = []

    async def write() -> None:
        results.append(await run_overlapped(sock, job))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(write)
        while not results:
            await trio.sleep(every)
            meanwhile()
    return results[0]


async def test_an_overlapped_write_waits_for_replies_that_arrive_later() -> None:
    records, encode = stub_records(60)
    kernel = FakeKernel([entry(i) for i in range(60)])
    kernel.refuse[entry(33).key] = errno.ENOMEM
    sock = FakeSocket(kernel, delay=True)
    job = RecordWrites(records, encode, seq_start=1, batch_bytes=400, reply_budget=10_000)
    try:
        result = await write_while(sock, job, 0.01, sock.release)
    finally:
        sock.close()
    assert result == (59, [records[33]])
    assert len(kernel.datagrams) > 2


@pytest.mark.parametrize("failing", [1, 2])
async def test_an_overlapped_write_reports_a_failing_socket_and_sends_nothing_after(
        failing: int) -> None:
    """A send that fails is a KernelError; the datagram built and queued behind it
    while it was in flight is not sent."""
    records, encode = stub_records(300)
    kernel = FakeKernel([entry(i) for i in range(300)])

    class FailsOnce(FakeSocket):
        sends = 0

        def send(self, data: bytes, /) -> int:
            self.sends += 1
            if self.sends == failing:
                raise OSError(errno.EPERM, "Operation not permitted")
            return super().send(data)

    sock = FailsOnce(kernel)
    job = RecordWrites(records, encode, seq_start=1, batch_bytes=400, reply_budget=10_000)
    try:
        with pytest.raises(KernelError, match="Operation not permitted"):
            await run_overlapped(sock, job)
    finally:
        sock.close()
    assert sock.sends == failing
    assert len(kernel.datagrams) == failing - 1


async def test_a_cancelled_overlapped_write_stops_between_datagrams() -> None:
    records, encode = stub_records(200)
    kernel = FakeKernel([entry(i) for i in range(200)])
    sock = FakeSocket(kernel)
    job = RecordWrites(records, encode, seq_start=1, batch_bytes=300, reply_budget=10_000)
    try:
        with trio.CancelScope() as scope:
            scope.cancel()
            await run_overlapped(sock, job)
    finally:
        sock.close()
    assert scope.cancelled_caught
    assert kernel.datagrams == []


async def test_a_failing_encoder_stops_an_overlapped_write_after_the_batch_in_flight() -> None:
    records, encode = stub_records(200)
    kernel = FakeKernel([entry(i) for i in range(200)])

    def failing(rec: bytes, seq: int, ack: bool) -> bytes | None:
        if rec == records[150]:
            raise ValueError("an encoder bug")
        return encode(rec, seq, ack)

    sock = FakeSocket(kernel)
    job = RecordWrites(records, failing, seq_start=1, batch_bytes=1000, reply_budget=10_000)
    try:
        with pytest.raises(ValueError, match="an encoder bug"):
            await run_overlapped(sock, job)
    finally:
        sock.close()
    # Raised once the batch in flight was written and its replies read (the worker
    # owns the socket until then): nothing is left for the next write to misread.
    assert kernel.datagrams
    with pytest.raises(BlockingIOError):
        sock.recv_into(bytearray(100))


def test_a_refused_last_request_mid_write_holds_the_sender_and_loses_nothing(
        runner: Runner) -> None:
    """A batch whose last request is refused ends without an ACK: the overlapped
    writer's sender waits for the batch to be settled before the one queued after it."""
    records, encode = stub_records(120)
    kernel = FakeKernel([entry(i) for i in range(120)])
    job = RecordWrites(records, encode, seq_start=1, batch_bytes=400, reply_budget=10_000)
    # Learn the batches' ends from a dry run, then refuse the end of the second.
    dry = FakeKernel([entry(i) for i in range(120)])
    drive(RecordWrites(records, encode, seq_start=1, batch_bytes=400, reply_budget=10_000),
          dry, runner)
    ends = [d[-1][3] for d in dry.datagrams]
    assert len(ends) > 3
    kernel.refuse[entry(ends[1]).key] = errno.ENOMEM
    kernel.refuse[entry(ends[1] - 1).key] = errno.ENOMEM
    applied, back = drive(job, kernel, runner)
    assert sorted(back) == sorted([records[ends[1]], records[ends[1] - 1]])
    assert applied == 118
    assert [d[-1][3] for d in kernel.datagrams] == ends


def _reply(error: int, seq: int = 5) -> bytes:
    return NLMSG_HDR.pack(36, NLMSG_ERROR, 0, seq, 0) + (-error).to_bytes(
        4, "little", signed=True) + bytes(16)


def test_only_an_ack_read_last_settles_a_batch_for_the_sender() -> None:
    assert _ends_acked([_reply(errno.EEXIST), _reply(0)])
    assert not _ends_acked([])
    assert not _ends_acked([_reply(0), None])  # ENOBUFS after it: replies lost
    assert not _ends_acked([_reply(0), _reply(errno.EEXIST)])  # the last one refused
    assert not _ends_acked([_reply(0)[:18]])  # truncated
    assert not _ends_acked([_reply(0) + _reply(0)])  # not alone in its datagram
    other = NLMSG_HDR.pack(36, 0x100, 0, 5, 0) + bytes(20)
    assert not _ends_acked([other])


async def test_the_event_loop_runs_while_the_kernel_is_slow_with_a_datagram() -> None:
    """The trio thread waits for a datagram's replies through the event loop: other
    tasks run meanwhile (a hot standby reads its peer's next messages), and nothing is
    lost."""
    records, encode = stub_records(60)
    kernel = FakeKernel([entry(i) for i in range(60)])

    class Slow(FakeSocket):
        def send(self, data: bytes, /) -> int:
            time.sleep(0.04)  # in the sending thread
            return super().send(data)

    sock = Slow(kernel)
    job = RecordWrites(records, encode, seq_start=1, batch_bytes=400, reply_budget=10_000)
    ticks = 0

    def tick() -> None:
        nonlocal ticks
        ticks += 1

    try:
        result = await write_while(sock, job, 0.005, tick)
    finally:
        sock.close()
    assert result == (60, [])
    assert len(kernel.datagrams) > 2
    # Blocked for each whole send, this task would run about once per datagram.
    assert ticks > 2 * len(kernel.datagrams)


@pytest.mark.parametrize("extra, used", [(0, "run"), (1, "run_overlapped")])
def test_only_a_write_of_more_than_a_few_records_gets_a_sending_thread(
    monkeypatch: pytest.MonkeyPatch, extra: int, used: str,
) -> None:
    """A write of a handful of records is one datagram, nothing to build meanwhile:
    the calling thread sends it (a hot standby's steady writes)."""
    called: list[str] = []

    def recording(name: str) -> Callable[..., Awaitable[tuple[int, list[bytes]]]]:
        async def driver(sock: object, job: RecordWrites, **_: object
                         ) -> tuple[int, list[bytes]]:
            called.append(name)
            return 0, []
        return driver

    monkeypatch.setattr(inject, "run", recording("run"))
    monkeypatch.setattr(inject, "run_overlapped", recording("run_overlapped"))
    records, encode = stub_records(inject.DIRECT_WRITE_RECORDS + extra)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with a, b:
        trio.run(functools.partial(inject.write_records, a, records, encode))
    assert called == [used]
