"""Inputs that broke a decoder's contract, kept as tests.

Found by the fuzz targets (``make fuzz``, ``fuzz/``) or while writing them; each test
names the target that covers it and the exception that escaped.
"""

from __future__ import annotations

import struct
import tracemalloc
from collections.abc import Iterable

import pytest

from fuzz.seeds import EXAMPLE_CONFIG
from fuzz.targets import SYNC_PARAMS
from replicator import config, wire
from replicator import ctnetlink as ct
from replicator.ctformat import parse_conntrack_line
from replicator.errors import ConfigError, NetlinkDecodeError, ReplicatorError, WireDecodeError
from replicator.model import AF_INET, IPPROTO_TCP, IPPROTO_UDP
from replicator.netlink import NFGENMSG, NLA_F_NESTED, NLMSG_HDR
from replicator.sync import SyncSession

# --- config (fuzz_config; found reading the parser for the target) -------------------

EXAMPLE = EXAMPLE_CONFIG.read_text()
METRICS_LINE = 'address = "127.0.0.1:9478"'


@pytest.mark.parametrize(
    "port",
    [
        "\u00b2",  # a superscript two: str.isdigit() is true, int() refuses it (ValueError)
        "1" * 5000,  # more digits than int() converts (ValueError: exceeds the limit)
        "\u0663\u0664",  # Arabic-Indic digits: int() reads 34 from them
    ],
)
def test_metrics_port_must_be_ascii_digits(port: str) -> None:
    assert METRICS_LINE in EXAMPLE
    text = EXAMPLE.replace(METRICS_LINE, f'address = "127.0.0.1:{port}"')
    with pytest.raises(ConfigError, match=r"metrics\.address"):
        config.parse_config(text)


@pytest.mark.parametrize("nested", ["[" * 5000 + "]" * 5000, "{a=" * 3000 + "1" + "}" * 3000])
def test_deeply_nested_toml_is_a_config_error(nested: str) -> None:
    # tomllib parses nesting by recursion: RecursionError escaped parse_config.
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.parse_config(EXAMPLE + f"\n[nested]\nx = {nested}\n")


# --- ctnetlink -> wire (fuzz_ctnetlink) ---------------------------------------------


def _nla(atype: int, payload: bytes) -> bytes:
    return struct.pack("=HH", 4 + len(payload), atype) + payload + bytes(-len(payload) & 3)


def _tuple(atype: int, src: bytes, dst: bytes, proto: int, ports: tuple[int, int]) -> bytes:
    ip = _nla(
        ct.CTA_TUPLE_IP | NLA_F_NESTED, _nla(ct.CTA_IP_V4_SRC, src) + _nla(ct.CTA_IP_V4_DST, dst)
    )
    l4 = _nla(ct.CTA_TUPLE_PROTO | NLA_F_NESTED,
              _nla(ct.CTA_PROTO_NUM, bytes([proto]))
              + _nla(ct.CTA_PROTO_SRC_PORT, struct.pack("!H", ports[0]))
              + _nla(ct.CTA_PROTO_DST_PORT, struct.pack("!H", ports[1])))  # fmt: skip
    return _nla(atype | NLA_F_NESTED, ip + l4)


def _dump_message(*, reply_proto: int = IPPROTO_TCP, helper: bytes | None = None) -> bytes:
    """A dump reply holding one IPv4 entry, TCP in its original direction."""
    a, b = bytes([10, 0, 0, 1]), bytes([192, 0, 2, 7])
    attrs = (_tuple(ct.CTA_TUPLE_ORIG, a, b, IPPROTO_TCP, (40000, 443))
             + _tuple(ct.CTA_TUPLE_REPLY, b, a, reply_proto, (443, 40000))
             + _nla(ct.CTA_STATUS, struct.pack("!I", 0x18E))
             + _nla(ct.CTA_TIMEOUT, struct.pack("!I", 100)))  # fmt: skip
    if helper is not None:
        attrs += _nla(ct.CTA_HELP | NLA_F_NESTED, _nla(ct.CTA_HELP_NAME, helper))
    payload = NFGENMSG.pack(AF_INET, 0, 0) + attrs
    return NLMSG_HDR.pack(NLMSG_HDR.size + len(payload), ct.CT_NEW, 0, 1, 0) + payload


@pytest.mark.parametrize(
    "message",
    [
        pytest.param(_dump_message(reply_proto=IPPROTO_UDP), id="reply-protocol-differs"),
        pytest.param(_dump_message(helper=b"\0"), id="empty-helper-name"),
        pytest.param(_dump_message(helper=b"h" * 17 + b"\0"), id="17-character-helper-name"),
    ],
)
def test_an_entry_the_kernel_decoder_accepts_is_one_the_peer_accepts(message: bytes) -> None:
    """Found by fuzz_ctnetlink (WireDecodeError: "reply tuple protocol differs from the
    original's"): ctnetlink decodes entries the wire decoder refuses. The sender's
    encoder sends them, the peer refuses the whole message as a protocol violation and
    closes the connection, and the same entry is sent again on the next one: the link
    never gets through. Either decoder may change; they must agree."""
    try:
        entries, _done = ct.decode_dump(message)
    except NetlinkDecodeError:
        return
    (entry,) = entries
    try:
        wire.decode(wire.encode_changes(0, 0, [(entry, entry.timeout)], [], sent=0))
    except WireDecodeError as exc:
        pytest.fail(f"ctnetlink accepts what the peer refuses ({exc}): {entry}")


# --- sync session memory (found checking the memory bound of fuzz_sync_receive) -----


def _traced_after(messages: Iterable[bytes], session: SyncSession) -> int:
    # ``messages`` is a generator: a list of the payloads would be traced too and
    # count as the session's growth (48 bytes per payload).
    for i, payload in enumerate(messages):
        now = i * 1e-5  # a fast peer: no acknowledgement timeout expires meanwhile
        session.receive(payload, now)
        session.frames_to_send(now)
        while session.next_event() is not None:
            pass
    return tracemalloc.get_traced_memory()[0]


@pytest.mark.parametrize("kind", ["resync-begin", "resync-request"])
def test_a_peer_repeating_resync_messages_cannot_grow_our_memory(kind: str) -> None:
    """A peer that never acknowledges and keeps sending RESYNC_BEGIN (non-full) or
    RESYNC_REQUEST, each with the next seq (resync ids repeated and new), makes the
    session queue one control entry (a SUMMARY to send, or a RESYNC_BEGIN) per message
    while the window is full: some 100 bytes of memory per 6 received, without bound.
    With the default 4096 buckets, every RESYNC_BEGIN also costs a 32 KiB SUMMARY until
    the window is full."""
    session = SyncSession("fw-a", 1, params=SYNC_PARAMS)
    session.connection_made(0.0)
    session.receive(wire.encode(wire.Hello(wire.PROTOCOL_VERSION, "fw-b", 7, 16, 0)), 0.0)
    session.frames_to_send(0.0)

    def message(seq: int) -> bytes:
        if kind == "resync-begin":
            return wire.encode(wire.ResyncBegin(0, seq, seq // 2, False))
        return wire.encode(wire.ResyncRequest(0, seq, False))

    tracemalloc.start()
    try:
        settled = _traced_after((message(seq) for seq in range(2000)), session)
        later = _traced_after((message(seq) for seq in range(2000, 6000)), session)
    finally:
        tracemalloc.stop()
    assert session.stats.protocol_violations == 0
    assert later - settled < 64 * 1024, f"{later - settled} bytes more after 4000 messages"


def test_an_address_with_a_nul_character_is_a_decode_error() -> None:
    line = ("ipv4     2 tcp      6 118 TIME_WAIT src=10.0.1.2\x00 dst=10.0.2.2 sport=1 dport=80 "
            "src=10.0.2.2 dst=10.0.2.1 sport=80 dport=1 [ASSURED] mark=0 use=1")
    with pytest.raises(ReplicatorError):
        parse_conntrack_line(line)
