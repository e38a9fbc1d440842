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


def test_header_layout() -> None:
    hdr = nl.pack_header(20, 0x100, nl.NLM_F_REQUEST, 7, 10)
    assert hdr == struct.pack("=IHHII", 20, 0x100, 1, 7, 0) + bytes([10, 0, 0, 0])
    assert len(hdr) == nl.NFNL_HDRLEN


def test_attributes_are_padded_and_walkable() -> None:
    body = nl.pack_attr(1, b"abc") + nl.pack_nested(2, nl.pack_attr(3, b"\x01\x02"))
    assert len(body) % 4 == 0
    walked = list(nl.iter_attrs(body, 0, len(body)))
    assert [(t, body[s:e]) for t, s, e in walked] == [
        (1, b"abc"),
        (2, nl.pack_attr(3, b"\x01\x02")),
    ]
    # NLA_F_NESTED was set on the wire and stripped by the walker.
    assert struct.unpack_from("=HH", body, 8)[1] == 2 | nl.NLA_F_NESTED


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
