"""Compact records: exact round trips, keys as prefixes, bodies as the replicated state."""

from __future__ import annotations

import math
import sys

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from synclink import make_entry
from test_wire import U32, entries

from replicator import record as R
from replicator.model import (
    AF_INET,
    AF_INET6,
    IPPROTO_ICMP,
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


def _first_error(bodies: list[bytes]) -> str | None:
    """check_body of each body in turn: the first error's message, or None."""
    for body in bodies:
        try:
            R.check_body(body)
        except ValueError as exc:
            return str(exc)
    return None


def _errors_of_check_bodies(bodies: list[bytes]) -> str | None:
    try:
        R.check_bodies(bodies)
    except ValueError as exc:
        return str(exc)
    return None


def _with_reply(body: bytes) -> tuple[R._BodyLayout, int] | None:
    """The layout of ``body`` and where its reply tuple's values are (None: no layout
    has this body, or it holds no reply tuple)."""
    try:
        family = body[0]
        layout = R._body_layout(family, body[R._BODY_FLAGS_AT[family]], len(body))
    except (IndexError, KeyError, ValueError):
        return None
    return None if layout.reply is None else (layout, layout.reply)


def _plain_inverse(body: bytes) -> bytes:
    """``body`` with its reply tuple (if it holds one) made the plain inverse of its
    original: invalid (the flags say the body holds a reply that is not)."""
    found = _with_reply(body)
    if found is None:
        return body
    layout, r = found
    out = bytearray(body)
    items = layout.items

    def copy(dst: int, src: int) -> None:
        (d, n), (s, _) = items[dst], items[src]
        out[d:d + n] = body[s:s + n]

    for dst, src in ((r, 3), (r + 1, 2), (r + 2, 4), (r + 3, 6), (r + 4, 5)):
        copy(dst, src)
    for z in (5, 6, 7):
        d, n = items[r + z]
        out[d:d + n] = bytes(n)
    return bytes(out)


def _icmp_inverse(body: bytes) -> bytes:
    """``body`` with its reply tuple (if it holds one) made :func:`invert` of its
    original, as ICMP inverts (invalid for a body that holds a reply)."""
    found = _with_reply(body)
    if found is None:
        return body
    layout, r = found
    orig = CtTuple(*layout.read(body)[2:10])
    at = layout.items[r][0]
    packed = R._TUPLE[body[0]].pack(*invert(orig))
    return body[:at] + packed + body[at + len(packed):]


_PING = CtTuple(bytes([10, 0, 0, 1]), bytes([192, 0, 2, 7]), IPPROTO_ICMP, 0, 0, 8, 0, 7)
_PINGED = make_entry(1)._replace(
    orig=_PING, reply=invert(_PING)._replace(src=bytes([198, 18, 0, 1])), tcp=None)
_NATTED = make_entry(1)._replace(reply=make_entry(1).reply._replace(src=bytes([198, 18, 0, 1])))
_MUTATIONS = st.lists(st.tuples(st.integers(0, 70), st.sampled_from(
    ["byte", "last byte", "inverse", "icmp inverse", "truncate", "longer"]),
    st.integers(0, 1 << 16)),
    max_size=3)


@settings(max_examples=300)
@given(base=entries(), n=st.integers(0, 70), others=st.lists(entries(), max_size=4),
       mutations=_MUTATIONS)
# A burst of NAT'd entries: all valid, one the plain inverse, one with the reply's
# protocol (body byte 33) not the original's, one with its ICMP id not zero.
@example(base=_NATTED, n=40, others=[], mutations=[])
@example(base=_NATTED, n=40, others=[], mutations=[(30, "inverse", 0)])
@example(base=_NATTED, n=40, others=[], mutations=[(30, "byte", 33 * 256 + 17)])
@example(base=_NATTED, n=40, others=[], mutations=[(30, "inverse", 0), (30, "byte", 43 * 256 + 1)])
# Pings, NAT'd: one made the inverse ICMP's way (the column check leaves ICMP alone).
@example(base=_PINGED, n=40, others=[], mutations=[(30, "icmp inverse", 0)])
# A helper's name (the body's last bytes) not ASCII.
@example(base=_NATTED._replace(helper="ftp"), n=40, others=[], mutations=[(30, "last byte", 255)])
def test_bodies_are_checked_together_as_one_by_one(
        *, base: Entry, n: int, others: list[Entry],
        mutations: list[tuple[int, str, int]]) -> None:
    """check_bodies (a standby's check of a message's bodies, by column for the bodies
    of one shape) raises the error check_body raises first, body by body, or none."""
    bodies = []
    for i in range(n):
        # One shape, many values: the ports of both tuples vary.
        o, r = base.orig, base.reply
        bodies.append(R.body(R.pack(base._replace(
            orig=o._replace(sport=(o.sport + i) % 65536),
            reply=r._replace(dport=(r.dport + i) % 65536) if r != invert(o) else
            invert(o._replace(sport=(o.sport + i) % 65536))), 0.0)))
    bodies += [R.body(R.pack(e, 0.0)) for e in others]
    for at, kind, value in mutations:
        if not bodies:
            break
        i = at % len(bodies)
        body = bodies[i]
        if kind == "byte" and body:
            pos = (value >> 8) % len(body)
            bodies[i] = body[:pos] + bytes([value & 0xFF]) + body[pos + 1:]
        elif kind == "last byte" and body:
            bodies[i] = body[:-1] + bytes([value & 0xFF])
        elif kind == "inverse":
            bodies[i] = _plain_inverse(body)
        elif kind == "icmp inverse":
            bodies[i] = _icmp_inverse(body)
        elif kind == "truncate":
            bodies[i] = body[:-1]
        else:
            bodies[i] = body + b"\0"
    assert _errors_of_check_bodies(bodies) == _first_error(bodies)
