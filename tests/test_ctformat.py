"""Tests of the ``conntrack -L -o extended`` text form against real conntrack output."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from ctstrategies import PROTOS, tuples, u8, u16, u32
from hypothesis import given
from hypothesis import strategies as st

from integration.netns.capture import DUMP, load
from replicator import ctnetlink
from replicator.ctformat import (
    format_entry,
    parse_conntrack_line,
    parse_conntrack_output,
    text_projection,
    visible_status,
)
from replicator.errors import DecodeError
from replicator.model import (
    AF_INET,
    AF_INET6,
    IPPROTO_ICMPV6,
    IPPROTO_TCP,
    CtTuple,
    Entry,
    EntryKey,
    SctpInfo,
    Status,
    TcpInfo,
)

DATA = Path(__file__).parent / "data"
LISTING = (DATA / "conntrack-L.txt").read_text()
DUMPED = [e for kind, d in load(DATA / "ctnetlink.bin") if kind == DUMP
          for e in ctnetlink.decode_dump(d)[0]]


def _by_key(entries: list[Entry]) -> dict[EntryKey, Entry]:
    return {e.key: e for e in entries}


def test_real_listing_equals_the_dump_field_by_field() -> None:
    """conntrack's text of the captured table == our decoding of the dump taken just
    before it, reduced to the fields the text carries; timeouts within 2 s."""
    parsed = _by_key(parse_conntrack_output(LISTING))
    dumped = _by_key([text_projection(e) for e in DUMPED])
    assert parsed.keys() == dumped.keys()
    assert len(parsed) == len(LISTING.splitlines())
    assert any(e.labels for e in parsed.values())  # the listing does carry labels
    for key, text_entry in parsed.items():
        kernel_entry = dumped[key]
        assert text_entry.timeout is not None and kernel_entry.timeout is not None
        assert abs(text_entry.timeout - kernel_entry.timeout) <= 2
        assert text_entry._replace(timeout=None) == kernel_entry._replace(timeout=None)


@pytest.mark.parametrize("line", LISTING.splitlines())
def test_format_reproduces_conntrack_lines(line: str) -> None:
    """Byte-exact against conntrack's own output, once the volatile fields are dropped."""
    volatile = ("use=", "packets=", "bytes=", "delta-time=")
    expected = " ".join(t for t in line.split(" ") if not t.startswith(volatile))
    assert format_entry(parse_conntrack_line(line)) == expected


def test_known_lines() -> None:
    orig = CtTuple(bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]), IPPROTO_TCP, 40000, 80)
    reply = CtTuple(orig.dst, bytes([192, 0, 2, 1]), IPPROTO_TCP, 80, 1024)
    e = Entry(AF_INET, orig, reply, zone=3, status=int(Status.SEEN_REPLY | Status.ASSURED),
              timeout=431999, mark=7, labels=bytes([0x08] + [0] * 11 + [0x10, 0, 0, 0]),
              tcp=TcpInfo(3, 7, 7, 0x23, 0x23), helper="ftp", id=12345)
    assert format_entry(e) == (
        "ipv4     2 tcp      6 431999 ESTABLISHED src=10.0.0.1 dst=10.0.0.2 sport=40000 "
        "dport=80 src=10.0.0.2 dst=192.0.2.1 sport=80 dport=1024 [ASSURED] mark=7 zone=3 "
        "helper=ftp labels=3,100")
    icmp = CtTuple(bytes(16), bytes(15) + b"\x01", IPPROTO_ICMPV6, 0, 0, 128, 0, 9)
    unreplied = Entry(AF_INET6, icmp, icmp._replace(src=icmp.dst, dst=icmp.src, icmp_type=129),
                      status=int(Status.CONFIRMED | Status.OFFLOAD))
    assert format_entry(unreplied) == (
        "ipv6     10 icmpv6   58 src=:: dst=::1 type=128 code=0 id=9 [UNREPLIED] "
        "src=::1 dst=:: type=129 code=0 id=9 [OFFLOAD]")


def test_parser_skips_volatile_fields_and_rejects_garbage() -> None:
    line = ("ipv4     2 udp      17 29 src=10.0.0.1 dst=10.0.0.2 sport=1 dport=2 "
            "packets=1 bytes=29 src=10.0.0.2 dst=10.0.0.1 sport=2 dport=1 packets=0 "
            "bytes=0 mark=0 secctx=x delta-time=3 use=1 id=2342 labels=")
    e = parse_conntrack_line(line)
    assert (e.timeout, e.status, e.mark, e.labels) == (29, 0 | Status.SEEN_REPLY, 0, None)
    with pytest.raises(DecodeError):
        parse_conntrack_line("ipv4 2 udp 17 src=10.0.0.1")
    with pytest.raises(DecodeError):
        parse_conntrack_line("ipv4 2 udp 17 src=10.0.0.1 dst=10.0.0.2 sport=x dport=2")
    with pytest.raises(DecodeError):
        parse_conntrack_line(line.replace("mark=0", "frob=1"))
    assert parse_conntrack_output(
        "\nconntrack v1.4.7 (conntrack-tools): 0 flow entries have been shown.\n") == []


# --- property: parse(format(e)) is e reduced to the text form ----------------------

@st.composite
def entries(draw: st.DrawFn) -> Entry:
    family = draw(st.sampled_from([AF_INET, AF_INET6]))
    proto = draw(st.sampled_from(PROTOS[family]))
    return Entry(
        family=family, orig=draw(tuples(family, proto)), reply=draw(tuples(family, proto)),
        zone=draw(u16), status=draw(u32), timeout=draw(st.none() | u32),
        mark=draw(st.none() | u32),
        labels=draw(st.none() | st.binary(min_size=16, max_size=16)),
        tcp=draw(st.none() | st.builds(TcpInfo, st.integers(0, 12), u8, u8, u8, u8)),
        sctp=draw(st.none() | st.builds(SctpInfo, st.integers(0, 12), u32, u32)),
        helper=draw(st.none() | st.from_regex(r"[a-z][a-z0-9-]{0,14}", fullmatch=True)),
        master=draw(st.none() | tuples(family, proto)),
        id=draw(st.none() | u32),
    )


@given(entries())
def test_parse_of_format_is_the_text_projection(e: Entry) -> None:
    assert parse_conntrack_line(format_entry(e)) == text_projection(e)


LINES = LISTING.splitlines()


@given(st.sampled_from(LINES), st.lists(st.tuples(st.integers(0, 400), st.characters()),
                                        max_size=5), st.integers(0, 400))
def test_mangled_lines_raise_only_decode_errors(line: str, edits: list[tuple[int, str]],
                                                cut: int) -> None:
    chars = list(line)
    for pos, char in edits:
        chars[pos % len(chars)] = char
    for text in ("".join(chars), line[:cut]):
        try:
            e = parse_conntrack_line(text)
        except DecodeError:
            continue
        # Whatever parses is well-formed enough to be formatted again.
        assert parse_conntrack_line(format_entry(e)) == text_projection(e)


@given(st.text(max_size=200))
def test_random_text_raises_only_decode_errors(text: str) -> None:
    with contextlib.suppress(DecodeError):
        parse_conntrack_output(text)


@given(u32)
def test_visible_status_keeps_one_flag(status: int) -> None:
    shown = visible_status(status)
    flags = shown & ~Status.SEEN_REPLY
    assert shown & Status.SEEN_REPLY == status & Status.SEEN_REPLY
    assert flags in (0, Status.ASSURED, Status.OFFLOAD, Status.HW_OFFLOAD)
    assert flags & status == flags
