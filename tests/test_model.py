"""Unit tests of the pure entry model."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from replicator.model import (
    AF_INET,
    IPPROTO_ICMP,
    IPPROTO_TCP,
    CtTuple,
    Entry,
    TcpInfo,
    dnat_target,
    invert,
    merge,
    snat_target,
)

A = bytes([10, 0, 0, 1])
B = bytes([192, 0, 2, 7])
VIP = bytes([198, 51, 100, 1])


def tcp_entry(**kw: object) -> Entry:
    orig = CtTuple(A, B, IPPROTO_TCP, 40000, 80)
    return Entry(AF_INET, orig, invert(orig), **kw)  # type: ignore[arg-type]


def test_key_ignores_everything_but_family_zone_orig() -> None:
    a = tcp_entry(zone=3, mark=1, id=5)
    b = tcp_entry(zone=3, mark=2, id=9, timeout=100)
    assert a.key == b.key
    assert a.key != tcp_entry(zone=4).key


def test_merge_keeps_fields_the_event_omits() -> None:
    full = tcp_entry(status=14, timeout=300, mark=7, labels=b"\x01" * 16,
                     tcp=TcpInfo(3, 7, 7, 3, 3))
    update = tcp_entry(status=14, timeout=120, tcp=TcpInfo(4, 7, 7, 3, 3))
    merged = merge(full, update)
    assert merged.timeout == 120
    assert merged.tcp == TcpInfo(4, 7, 7, 3, 3)
    assert merged.mark == 7
    assert merged.labels == b"\x01" * 16


@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))
def test_merge_update_wins(old_mark: int, new_mark: int) -> None:
    assert merge(tcp_entry(mark=old_mark), tcp_entry(mark=new_mark)).mark == new_mark


def test_nat_targets_derive_from_tuples() -> None:
    orig = CtTuple(A, B, IPPROTO_TCP, 40000, 80)
    snat = Entry(AF_INET, orig, CtTuple(B, VIP, IPPROTO_TCP, 80, 1024))
    assert snat_target(snat) == (VIP, 1024)
    assert dnat_target(snat) is None
    plain = Entry(AF_INET, orig, invert(orig))
    assert snat_target(plain) is None
    assert dnat_target(plain) is None


def test_invert_icmp_echo() -> None:
    t = CtTuple(A, B, IPPROTO_ICMP, icmp_type=8, icmp_code=0, icmp_id=77)
    assert invert(t) == CtTuple(B, A, IPPROTO_ICMP, icmp_type=0, icmp_code=0, icmp_id=77)
    assert invert(invert(t)) == t
