"""Replication filters: each criterion, and the parameters' validation."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from synclink import make_entry
from test_wire import entries

from replicator import record as R
from replicator.filters import EntryFilter, build_filter
from replicator.model import (
    AF_INET6,
    IPPROTO_TCP,
    IPPROTO_UDP,
    CtTuple,
    Entry,
    TcpInfo,
    TcpState,
    invert,
)

FW = bytes([192, 0, 2, 1])  # make_entry's destination: "the firewall" below
CLIENT = bytes([10, 0, 0, 5])
VIP = bytes([198, 51, 100, 1])


def entry(src: bytes, dst: bytes, proto: int = IPPROTO_TCP, reply: CtTuple | None = None,
          state: int = TcpState.ESTABLISHED, **kw: object) -> Entry:  # fmt: skip
    orig = CtTuple(src, dst, proto, 40000, 22)
    return Entry(2, orig, reply or invert(orig),
                 tcp=TcpInfo(state) if proto == IPPROTO_TCP else None, **kw)  # type: ignore[arg-type]  # fmt: skip


def test_an_empty_filter_accepts_everything() -> None:
    f = build_filter()
    assert f.accepts_everything
    assert f(make_entry(1))
    # Empty lists (a configuration's defaults) are no criterion either.
    assert build_filter(tcp_states=[], zones=[]).accepts_everything


def test_ignored_protocols() -> None:
    f = build_filter(ignore_protocols=[IPPROTO_UDP])
    assert not f.accepts_everything
    assert f(entry(CLIENT, FW))
    assert not f(entry(CLIENT, FW, IPPROTO_UDP))


def test_ignored_prefixes_match_the_owners_of_a_connection_not_its_nat() -> None:
    f = build_filter(ignore_prefixes=["192.0.2.1", "2001:db8::/32"])
    assert not f(entry(FW, CLIENT))  # opened by the firewall
    assert not f(entry(CLIENT, FW))  # answered by the firewall (reply source)
    # Masqueraded through the firewall: the reply comes back to FW, still replicated.
    through = entry(CLIENT, VIP, reply=CtTuple(VIP, FW, IPPROTO_TCP, 22, 61000))
    assert f(through)
    # DNAT to the firewall itself (REDIRECT): the reply source is FW.
    redirected = entry(CLIENT, VIP, reply=CtTuple(FW, CLIENT, IPPROTO_TCP, 2222, 40000))
    assert not f(redirected)
    v6 = CtTuple(bytes.fromhex("20010db8" + "00" * 11 + "01"), bytes(16), IPPROTO_TCP, 1, 2)
    assert not f(Entry(AF_INET6, v6, invert(v6)))
    other_v6 = v6._replace(src=bytes.fromhex("20010db9" + "00" * 12))
    assert f(Entry(AF_INET6, other_v6, invert(other_v6)))


def test_tcp_states_apply_to_tcp_only() -> None:
    f = build_filter(tcp_states=["established", TcpState.TIME_WAIT])
    assert f(entry(CLIENT, FW))
    assert f(entry(CLIENT, FW, state=TcpState.TIME_WAIT))
    assert not f(entry(CLIENT, FW, state=TcpState.SYN_SENT))
    assert f(entry(CLIENT, FW, IPPROTO_UDP))
    assert f(entry(CLIENT, FW)._replace(tcp=None))  # partial: state unknown


def test_zones_and_marks() -> None:
    f = build_filter(zones=[0, 7], mark=(0x10, 0xF0))
    assert f(entry(CLIENT, FW, mark=0x1F))
    assert f(entry(CLIENT, FW, zone=7, mark=0x10))
    assert not f(entry(CLIENT, FW, zone=3, mark=0x10))
    assert not f(entry(CLIENT, FW, mark=0x20))
    assert not f(entry(CLIENT, FW, mark=None))  # no mark counts as 0


def test_networks_can_be_given_as_objects() -> None:
    f = build_filter(ignore_prefixes=[ipaddress.ip_network("10.0.0.0/8")])
    assert not f(entry(CLIENT, FW))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ignore_protocols": [256]}, "ignore_protocols"),
        ({"ignore_prefixes": ["10.0.0.1/8"]}, "ignore_prefixes"),
        ({"ignore_prefixes": ["not-an-address"]}, "ignore_prefixes"),
        ({"tcp_states": ["OPEN"]}, "tcp_states"),
        ({"tcp_states": [42]}, "tcp_states"),
        ({"zones": [70000]}, "zones"),
        ({"mark": (1, 0)}, "mark"),
        ({"mark": (0, 1 << 32)}, "mark"),
    ],
)
def test_bad_parameters_name_themselves(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_filter(**kwargs)  # type: ignore[arg-type]


@st.composite
def filters(draw: st.DrawFn) -> EntryFilter:
    return build_filter(
        ignore_protocols=draw(st.lists(st.sampled_from([IPPROTO_TCP, IPPROTO_UDP, 1, 47]),
                                       max_size=2)),
        ignore_prefixes=draw(st.lists(st.sampled_from(
            ["10.0.0.0/8", "192.0.2.1", "0.0.0.0/1", "2001:db8::/32", "::/1"]), max_size=3)),
        tcp_states=draw(st.none() | st.lists(st.sampled_from(list(TcpState)), max_size=3)),
        zones=draw(st.none() | st.lists(st.integers(0, 3), max_size=2)),
        mark=draw(st.none() | st.integers(0, 3).flatmap(
            lambda mask: st.tuples(st.integers(0, 3).map(lambda v: v & mask), st.just(mask)))),
    )


@settings(max_examples=300)
@given(filters(), entries(), st.floats(0, 1e6))
def test_a_filter_reads_a_record_as_it_reads_its_entry(f: EntryFilter, e: Entry,
                                                       now: float) -> None:
    assert f.accepts_record(R.pack(e, now)) == f(e)


@st.composite
def one_shape_batches(draw: st.DrawFn) -> list[Entry]:
    """16-40 entries of one record shape (so mostly judged by column): a base entry
    and variants of its addresses, protocol, TCP state, zone and mark, in the ranges
    the filters above look at."""
    base = draw(entries())
    size = len(base.orig.src)
    prefixes = ([bytes([10, 0, 0, 0]), bytes([192, 0, 2, 1]), bytes([200, 0, 0, 1])]
                if size == 4 else [bytes.fromhex("20010db8") + bytes(12), bytes(15) + b"\1",
                                   b"\xfe" + bytes(15)])
    out = []
    for _ in range(draw(st.integers(16, 40))):
        src, rsrc = draw(st.sampled_from(prefixes)), draw(st.sampled_from(prefixes))
        orig = base.orig._replace(src=src, proto=draw(st.sampled_from([IPPROTO_TCP,
                                                                       IPPROTO_UDP, 1, 47])))
        reply = (invert(orig) if base.reply == invert(base.orig)
                 else base.reply._replace(src=rsrc, proto=orig.proto))
        tcp = (None if base.tcp is None
               else base.tcp._replace(state=draw(st.sampled_from(list(TcpState)))))
        out.append(base._replace(orig=orig, reply=reply, tcp=tcp,
                                 zone=draw(st.integers(0, 3)),
                                 mark=None if base.mark is None else draw(st.integers(0, 3))))
    return out


@settings(max_examples=300)
@given(filters(), one_shape_batches(), st.floats(0, 1e6))
def test_the_verdicts_on_a_batch_are_those_on_each_record(
        f: EntryFilter, batch: list[Entry], now: float) -> None:
    records = [R.pack(e, now) for e in batch]
    assert f.verdicts(records) == bytes(f.accepts_record(r) for r in records)


def test_a_batch_of_one_shape_is_judged_by_column() -> None:
    f = build_filter(ignore_prefixes=["10.0.0.0/29"], tcp_states=["ESTABLISHED"],
                     mark=(1, 1))
    batch = [make_entry(i)._replace(mark=i % 2) for i in range(40)]
    records = [R.pack(e, 5.0) for e in batch]
    got = f.verdicts(records)
    assert got == bytes(f(e) for e in batch)
    assert f._judges  # the column judge was made and used
    assert 0 < sum(got) < len(batch)
