"""Unit tests of the generic netlink framing helpers."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pyroute2 import netlink as pr

from replicator import netlink as nl
from replicator.errors import NetlinkDecodeError


def test_constants_match_pyroute2() -> None:
    for name in ("NETLINK_NETFILTER", "NLMSG_NOOP", "NLMSG_ERROR", "NLMSG_DONE",
                 "NLMSG_OVERRUN", "NLM_F_REQUEST", "NLM_F_MULTI", "NLM_F_ACK", "NLM_F_ECHO",
                 "NLM_F_DUMP_INTR", "NLM_F_ROOT", "NLM_F_MATCH", "NLM_F_DUMP",
                 "NLM_F_REPLACE", "NLM_F_EXCL", "NLM_F_CREATE", "NLA_F_NESTED",
                 "NLA_F_NET_BYTEORDER"):
        assert getattr(nl, name) == getattr(pr, name), name
    from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_CTNETLINK
    assert nl.NFNL_SUBSYS_CTNETLINK == NFNL_SUBSYS_CTNETLINK


def _attr(atype: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, atype) + payload + bytes(-length & 3)


def test_attributes_are_walkable() -> None:
    inner = _attr(3, b"\x01\x02")
    body = _attr(1, b"abc") + struct.pack("=HH", 4 + len(inner), 2 | nl.NLA_F_NESTED) + inner
    walked = list(nl.iter_attrs(body, 0, len(body)))
    # NLA_F_NESTED is stripped from the type; payload bounds exclude the padding.
    assert [(t, body[s:e]) for t, s, e in walked] == [(1, b"abc"), (2, inner)]


def test_truncated_attribute_raises() -> None:
    body = _attr(1, b"abcd")
    with pytest.raises(NetlinkDecodeError):
        list(nl.iter_attrs(body, 0, len(body) - 1))


def _error_message(seq: int, err: int) -> bytes:
    return struct.pack("=IHHIIi", 20, nl.NLMSG_ERROR, 0, seq, 0, err)


def test_messages_and_error_codes() -> None:
    buf = _error_message(5, -17) + _error_message(6, 0) + struct.pack(
        "=IHHIIi", 20, nl.NLMSG_DONE, nl.NLM_F_MULTI, 6, 0, -4)
    msgs = list(nl.iter_messages(buf))
    assert [(m.type, m.seq) for m in msgs] == [(2, 5), (2, 6), (3, 6)]
    assert nl.error_code(buf, msgs[0]) == 17
    assert nl.error_code(buf, msgs[1]) == 0
    assert nl.done_code(buf, msgs[2]) == 4


@pytest.mark.parametrize("buf", [
    b"\x00" * 8,                                     # truncated header
    struct.pack("=IHHII", 8, 3, 0, 0, 0),            # length below the header size
    struct.pack("=IHHII", 64, 3, 0, 0, 0),           # length beyond the datagram
])
def test_bad_framing_raises(buf: bytes) -> None:
    with pytest.raises(NetlinkDecodeError):
        list(nl.iter_messages(buf))


@given(st.binary(max_size=64))
def test_walkers_raise_only_decode_errors(buf: bytes) -> None:
    try:
        for msg in nl.iter_messages(buf):
            list(nl.iter_attrs(buf, msg.start, msg.end))
            if msg.type == nl.NLMSG_ERROR:
                nl.error_code(buf, msg)
    except NetlinkDecodeError:
        pass
