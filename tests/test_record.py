"""Compact records: exact round trips, keys as prefixes, bodies as the replicated state."""

from __future__ import annotations

import math
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st
from synclink import make_entry
from test_wire import U32, entries

from replicator import record as R
from replicator.model import (
    AF_INET,
    AF_INET6,
    IPPROTO_ICMPV6,
    IPPROTO_SCTP,
    CtTuple,
    Entry,
    SctpInfo,
    TcpInfo,
    invert,
)

times = st.one_of(st.floats(allow_nan=False), st.just(math.inf), st.just(-math.inf))


@given(entries(), st.one_of(st.none(), st.integers(0, U32)), times, times)
def test_unpack_inverts_pack(entry: Entry, cid: int | None, deadline: float, told: float) -> None:
    entry = entry._replace(id=cid)
    rec = R.pack(entry, deadline, told)
    assert R.pack(entry, deadline, told, R.key(entry)) == rec
    assert R.unpack(rec) == entry
    assert R.timing(rec) == (deadline, told)
    assert R.deadline(rec) == deadline
    assert R.timeout(rec) == entry.timeout
    assert R.key_of(rec) == R.key(entry)
    assert R.unpack_key(R.key(entry)) == entry.key
    assert R.pack_key(entry.key) == R.key(entry)
    assert len(R.key(entry)) == R.key_size(entry.family)


@given(entries(), times, times)
def test_timing_changes_keep_the_state(entry: Entry, deadline: float, told: float) -> None:
    rec = R.pack(entry, 0.0)
    moved = R.with_told(R.with_deadline(rec, deadline), told)
    assert R.timing(moved) == (deadline, told)
    assert R.unpack(moved) == entry
    assert R.same_state(rec, moved) and R.fingerprint(rec) == R.fingerprint(moved)


@given(entries(), entries())
def test_bodies_are_equal_exactly_when_the_replicated_fields_are(a: Entry, b: Entry) -> None:
    a_rec, b_rec = R.pack(a, 1.0), R.pack(b, 2.0, 3.0)
    same = a._replace(timeout=None, id=None) == b._replace(timeout=None, id=None)
    assert R.same_state(a_rec, b_rec) == same
    assert R.same_state(a_rec, R.pack(a._replace(timeout=7, id=9), 5.0))


def test_ipv6_icmp_sctp_labels_helper_master_and_missing_fields() -> None:
    src, dst = bytes(range(16)), bytes(range(16, 32))
    ping = CtTuple(src, dst, IPPROTO_ICMPV6, icmp_type=128, icmp_code=0, icmp_id=77)
    sctp = CtTuple(src, dst, IPPROTO_SCTP, 5000, 6000)
    nat = invert(sctp)._replace(dst=bytes(16), dport=1)
    cases = [
        Entry(AF_INET6, ping, invert(ping)),
        Entry(AF_INET6, sctp, nat, zone=3, status=1, timeout=0, mark=0, labels=b"\xff" * 16,
              sctp=SctpInfo(3, 1 << 31, 7), helper="ftp", master=ping, id=1),
        Entry(AF_INET, make_entry(1).orig, invert(make_entry(1).orig), tcp=TcpInfo(0)),
    ]  # fmt: skip
    for e in cases:
        assert R.unpack(R.pack(e, math.inf)) == e


def test_a_plain_ipv4_tcp_entry_is_small() -> None:
    # The memory budget of issue 6: what one table entry costs in objects.
    e = make_entry(1)
    assert sys.getsizeof(R.pack(e, 1.0)) <= 96
    assert sys.getsizeof(R.key(e)) <= 64


@pytest.mark.parametrize(
    "bad",
    [
        make_entry(1)._replace(family=7),
        make_entry(1)._replace(zone=1 << 16),
        make_entry(1)._replace(mark=-1),
        make_entry(1)._replace(labels=b"\0"),
        make_entry(1)._replace(helper="ftp\u00e9"),
        make_entry(1)._replace(orig=make_entry(1).orig._replace(src=bytes(16))),
        make_entry(1)._replace(reply=make_entry(1).reply._replace(sport=1 << 16)),
        make_entry(1)._replace(family=AF_INET6),
    ],
)
def test_entries_no_decoder_produces_are_refused(bad: Entry) -> None:
    with pytest.raises(ValueError):
        R.pack(bad, 0.0)


def test_fingerprint_is_fixed_across_hosts() -> None:
    # Both nodes must compute the same fingerprint: pinned so that a change of the
    # body layout cannot pass unnoticed (it needs a new wire.PROTOCOL_VERSION).
    assert R.key(make_entry(1)).hex() == "0200000a000001c0000201060401005000000000"
    assert R.fingerprint(R.pack(make_entry(1), 0.0)) == 14010507908334541488
