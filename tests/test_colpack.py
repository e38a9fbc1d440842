"""A commit's create requests built by byte columns (replicator.colpack), and the first
pass of a commit that writes them (replicator.bulkwrite.RecordWrites with a plan)."""

from __future__ import annotations

import errno
import math
from collections import Counter
from dataclasses import dataclass, field

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st
from test_inject import FakeKernel, FakeSocket, reply
from test_wire import entries

from replicator import bulkwrite, colpack, ctnetlink
from replicator import record as R
from replicator.bulkwrite import RecordWrites, commit_encoder, commit_plan
from replicator.inject import run_overlapped
from replicator.model import (
    AF_INET,
    AF_INET6,
    IPPROTO_TCP,
    IPPROTO_UDP,
    CtTuple,
    Entry,
    EntryKey,
    TcpFlag,
    TcpInfo,
    invert,
)
from replicator.netlink import NLM_F_ACK, NLMSG_HDR

NOW = 5000.0
_MASK = 0xFFFFFFFF


@st.composite
def commit_entries(draw: st.DrawFn) -> Entry:
    """Entries as a commit meets them: mostly TCP or UDP with a mark and no extras,
    not NAT'd, with source NAT, destination NAT or both; now and then in a zone, of
    another protocol, or of any kind at all."""
    e = draw(entries())
    if draw(st.integers(0, 9)) == 0:
        return e
    proto = draw(st.sampled_from([IPPROTO_TCP, IPPROTO_UDP, IPPROTO_TCP, IPPROTO_UDP, 1]))
    orig = e.orig._replace(proto=proto)
    reply_tuple = invert(orig)
    size = len(orig.src)
    addr, port = st.binary(min_size=size, max_size=size), st.integers(0, 0xFFFF)
    if draw(st.booleans()):  # source NAT: the reply goes to another address or port
        reply_tuple = reply_tuple._replace(dst=draw(addr), dport=draw(port))
    if draw(st.booleans()):  # destination NAT: the reply comes from another one
        reply_tuple = reply_tuple._replace(src=draw(addr), sport=draw(port))
    with_tcp = proto == IPPROTO_TCP or draw(st.integers(0, 4)) == 0
    return e._replace(orig=orig, reply=reply_tuple, labels=None, helper=None, master=None,
                      sctp=None, zone=draw(st.sampled_from([0, 0, 0, 0, 7])),
                      mark=e.mark or 0,
                      tcp=(e.tcp or TcpInfo(3)) if with_tcp else None)


@st.composite
def commit_records(draw: st.DrawFn) -> bytes:
    """Records of :func:`commit_entries` with a deadline: mostly some time from
    :data:`NOW` (or past), now and then none, a nonsensical one, or one too far for a
    request's 32 bits."""
    deadline = draw(st.one_of(
        st.floats(NOW - 100, NOW + 1e6), st.floats(NOW - 100, NOW + 1e6),
        st.sampled_from([math.inf, -math.inf, math.nan, NOW + 2.0**32 + 10])))
    return R.pack(draw(commit_entries()), deadline)


@given(records=st.lists(commit_records(), max_size=40),
       tcp_flags=st.sampled_from([0, int(TcpFlag.BE_LIBERAL)]),
       seq=st.one_of(st.integers(0, _MASK), st.integers(_MASK - 40, _MASK)),
       now=st.sampled_from([NOW, NOW + 0.25]))
def test_planned_requests_are_byte_for_byte_those_of_the_per_record_encoder(
        records: list[bytes], tcp_flags: int, seq: int, now: float) -> None:
    runs, rest = colpack.plan_creates(records, now, tcp_flags)
    # Every record exactly once: in a run or left to the per-record encoder.
    assert Counter(r for run in runs for r in run.records) + Counter(rest) == Counter(records)
    encode = commit_encoder(now, tcp_flags=tcp_flags)
    for run in runs:
        assert run.records
        built = run.build(run.records, seq)
        assert len(built) == run.size * len(run.records)
        assert built == b"".join(
            encode(r, (seq + i) & _MASK, i == len(run.records) - 1) or b"!"
            for i, r in enumerate(run.records))
    if len(records) < colpack.MIN_PLANNED:
        # Too few for runs to pay: all left to the per-record encoder, in order.
        assert runs == [] and rest == records
        return
    # Only what the columns cannot build is left: no deadline a request can carry, or
    # not of the kind the per-record encoder builds either.
    for r in rest:
        d = R.deadline(r)
        if math.isfinite(d) and d - now < 2**32 - 2:
            assert encode(r, 0, False) is None


def nat_kinds(i: int, family: int = AF_INET) -> list[Entry]:
    """One entry of every usual kind (TCP/UDP; no NAT, source NAT, destination NAT,
    both), numbered ``i``."""
    size = 4 if family == AF_INET else 16
    client, server = bytes(size - 2) + i.to_bytes(2), bytes([9]) * size
    nat, vip = bytes([7]) * size, bytes([8]) * size
    out = []
    for proto in (IPPROTO_TCP, IPPROTO_UDP):
        for kind in range(4):
            o = CtTuple(client, server, proto, 1000 + i, 80 + kind)
            reply_tuple = invert(o)
            if kind & 1:
                reply_tuple = reply_tuple._replace(dst=nat, dport=2000 + i)
            if kind & 2:
                reply_tuple = reply_tuple._replace(src=vip, sport=8080)
            out.append(Entry(family, o, reply_tuple, status=14, timeout=100, mark=i % 2,
                             tcp=TcpInfo(3) if proto == IPPROTO_TCP else None))
    return out


def test_a_mixed_table_is_planned_in_one_run_per_shape_and_kind() -> None:
    table = [e for i in range(50) for f in (AF_INET, AF_INET6) for e in nat_kinds(i, f)]
    records = [R.pack(e, NOW + 60) for e in table]
    runs, rest = colpack.plan_creates(records, NOW, 0)
    assert rest == []
    assert len(runs) == 16  # 2 families x 2 protocols x 4 kinds of NAT
    assert all(len(run.records) == 50 for run in runs)
    # Each run keeps its records in their order.
    for run in runs:
        assert run.records == [r for r in records if r in set(run.records)]


def test_a_table_of_one_kind_is_one_run() -> None:
    records = [R.pack(nat_kinds(i)[1], NOW + 60) for i in range(300)]
    runs, rest = colpack.plan_creates(records, NOW, 0)
    assert (len(runs), rest) == (1, [])
    assert runs[0].records == records


def test_records_not_of_their_shapes_size_are_left_to_the_per_record_encoder() -> None:
    good = [R.pack(nat_kinds(i)[0], NOW + 60) for i in range(3)]
    # Damaged records (cut short, or longer): never read by column.
    odd = [good[0][:-1], good[1] + b"\0", b"", b"\x02"]
    for records in (good + odd, odd + good, good[:1] + odd[:1]):
        runs, rest = colpack.plan_creates(records, NOW, 0)
        assert not runs
        assert Counter(rest) == Counter(records)


@dataclass
class RequestKernel(FakeKernel):
    """A conntrack table answering real create requests, by their original tuple."""

    entries: list[Entry] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)

    def handle(self, datagram: bytes) -> list[bytes]:
        replies, off, count = [], 0, 0
        while off < len(datagram):
            length, _type, flags, seq, _pid = NLMSG_HDR.unpack_from(datagram, off)
            (event,) = ctnetlink.decode_events(datagram[off:off + length])
            key: EntryKey = event.entry.key
            err = self.refuse.get(key, errno.EEXIST if key in self.table else 0)
            if not err:
                self.table[key] = event.entry
            if err or flags & NLM_F_ACK:
                replies.append(reply(seq, err))
            off += length
            count += 1
        self.sizes.append(count)
        return replies


def write(records: list[bytes], kernel: RequestKernel, *, batch_bytes: int = 1 << 20,
          reply_budget: int = 10_000) -> tuple[int, list[bytes]]:
    job = RecordWrites(records, commit_encoder(NOW, no_timeout=180), seq_start=_MASK - 5,
                       batch_bytes=batch_bytes, reply_budget=reply_budget,
                       plan=commit_plan(NOW))
    sock = FakeSocket(kernel)
    try:
        return trio.run(run_overlapped, sock, job)
    finally:
        sock.close()


def test_a_planned_pass_writes_every_record_in_chunks_and_hands_back_the_rest(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bulkwrite, "PLAN_CHUNK", 37)  # many chunks, runs cut short
    table = [e for i in range(40) for e in nat_kinds(i)]
    records = [R.pack(e, NOW + 60) for e in table]
    forever = R.pack(nat_kinds(99)[0], math.inf)  # no deadline: the per-record encoder
    zoned = R.pack(nat_kinds(98)[0]._replace(zone=3), NOW + 60)  # another kind: handed back
    records[10:10] = [forever, zoned]
    kernel = RequestKernel()
    kernel.table[table[5].key] = table[5]  # there already: EEXIST
    kernel.refuse[table[77].key] = errno.ENOMEM
    applied, back = write(records, kernel, batch_bytes=8000)
    assert Counter(back) == Counter([zoned, records[records.index(R.pack(table[5], NOW + 60))],
                                     R.pack(table[77], NOW + 60)])
    assert applied == len(records) - 3
    written = {R.key_of(r) for r in records} - {R.key_of(r) for r in back}
    assert {R.pack_key(k) for k in kernel.table} >= written
    # Datagrams are bounded by the batch size (usual requests: 236 bytes or fewer).
    assert max(kernel.sizes) <= 8000 // 160
    assert len(kernel.sizes) > len(records) // (8000 // 160)


def test_a_planned_pass_keeps_to_the_reply_budget() -> None:
    records = [R.pack(nat_kinds(i)[1], NOW + 60) for i in range(100)]
    kernel = RequestKernel()
    assert write(records, kernel, reply_budget=30) == (100, [])
    assert kernel.sizes == [30, 30, 30, 10]
