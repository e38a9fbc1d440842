"""The sync protocol's wire format: round trips, sizes, strict validation, fuzzing."""

from __future__ import annotations

import contextlib
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replicator import record as R
from replicator import wire
from replicator.errors import WireDecodeError, WireVersionError
from replicator.model import (
    AF_INET,
    AF_INET6,
    IPPROTO_TCP,
    CtTuple,
    Entry,
    SctpInfo,
    TcpInfo,
    invert,
)

U8, U16, U32, U64 = 0xFF, 0xFFFF, 0xFFFF_FFFF, (1 << 64) - 1


@st.composite
def ct_tuples(draw: st.DrawFn, alen: int, proto: int | None = None) -> CtTuple:
    p = draw(st.integers(0, U8)) if proto is None else proto
    return CtTuple(
        draw(st.binary(min_size=alen, max_size=alen)),
        draw(st.binary(min_size=alen, max_size=alen)),
        p,
        draw(st.integers(0, U16)),
        draw(st.integers(0, U16)),
        draw(st.integers(0, U8)),
        draw(st.integers(0, U8)),
        draw(st.integers(0, U16)),
    )


@st.composite
def entries(draw: st.DrawFn) -> Entry:
    family = draw(st.sampled_from([AF_INET, AF_INET6]))
    alen = 4 if family == AF_INET else 16
    orig = draw(ct_tuples(alen))
    reply = draw(st.one_of(st.just(invert(orig)), ct_tuples(alen, orig.proto)))
    opt = st.none
    return Entry(
        family,
        orig,
        reply,
        zone=draw(st.integers(0, U16)),
        status=draw(st.integers(0, U32)),
        timeout=draw(opt() | st.integers(0, U32)),
        mark=draw(opt() | st.integers(0, U32)),
        labels=draw(opt() | st.binary(min_size=16, max_size=16)),
        tcp=draw(opt() | st.builds(TcpInfo, *[st.integers(0, U8)] * 5)),
        sctp=draw(
            opt()
            | st.builds(SctpInfo, st.integers(0, U8), st.integers(0, U32), st.integers(0, U32))
        ),
        helper=draw(opt() | st.text(st.characters(max_codepoint=127), min_size=1, max_size=16)),
        master=draw(opt() | ct_tuples(alen)),
    )


@st.composite
def keys(draw: st.DrawFn) -> tuple[int, int, CtTuple]:
    e = draw(entries())
    return e.key


def messages() -> st.SearchStrategy[wire.Message]:
    u64 = st.integers(0, U64)
    few_entries = st.lists(
        entries().map(lambda e: wire.upsert_of(e, e.timeout)), max_size=4).map(tuple)
    return st.one_of(
        st.builds(wire.Hello, st.just(wire.PROTOCOL_VERSION),
                  st.text(min_size=1, max_size=wire.MAX_NODE_ID),
                  u64, st.sampled_from([1, 2, 1024, wire.MAX_BUCKETS]), u64),
        # At most MAX_REASON bytes of UTF-8, as the session cuts its reasons (a longer
        # one is refused: msgpack's max_str_len counts bytes).
        st.builds(wire.Close, st.text(max_size=wire.MAX_REASON).map(
            lambda t: t.encode()[:wire.MAX_REASON].decode(errors="ignore"))),
        st.builds(wire.Ack, u64, u64, st.booleans(), u64),
        st.builds(wire.Changes, u64, u64, few_entries,
                  st.lists(keys().map(R.pack_key), max_size=4).map(tuple), u64),
        st.builds(wire.Buckets, u64, u64, st.lists(
            st.builds(wire.BucketRecord, st.integers(0, wire.MAX_BUCKETS - 1), st.booleans(),
                      st.booleans(), few_entries), max_size=3).map(tuple), u64),
        st.builds(wire.ResyncBegin, u64, u64, u64, st.booleans()),
        st.builds(wire.Summary, u64, u64, u64, st.integers(0, 1000),
                  st.binary(max_size=64).map(lambda b: b[: len(b) // 8 * 8])),
        st.builds(wire.ResyncDone, u64, u64, u64),
        st.builds(wire.ResyncRequest, u64, u64, st.booleans()),
    )  # fmt: skip


def tcp_entry(i: int = 0) -> Entry:
    orig = CtTuple(bytes([10, 0, 0, 1]), bytes([192, 0, 2, 7]), IPPROTO_TCP, 40000 + i, 443)
    return Entry(AF_INET, orig, invert(orig), status=0x18E, timeout=431999, mark=0,
                 tcp=TcpInfo(3, 7, 7, 0x23, 0x23), id=12345)  # fmt: skip


def raw_changes(entry: object, deletes: list[object] | None = None) -> bytes:
    """A CHANGES message whose single upsert is ``entry`` as a raw msgpack value."""
    return msgpack.packb([wire.CHANGES, 0, 0, [entry], deletes or [], 0])


def nat_entry(**changes: Any) -> Entry:
    orig = CtTuple(bytes([10, 0, 0, 1]), bytes([192, 0, 2, 7]), IPPROTO_TCP, 40000, 443)
    reply = CtTuple(bytes([192, 0, 2, 7]), bytes([198, 18, 0, 1]), IPPROTO_TCP, 443, 1024)
    return Entry(AF_INET, orig, reply, status=0x18E, mark=3, tcp=TcpInfo(3, 7, 7, 0x23, 0x23),
                 **changes)  # fmt: skip


GOOD_BODY = R.body(R.pack(nat_entry(), 0.0))
GOOD: list[Any] = [GOOD_BODY, 398]
KEY = R.key(nat_entry())
_FLAGS_AT = R.key_size(AF_INET)  # the body's flags follow the key
_REPLY_AT = _FLAGS_AT + 5  # the reply tuple follows the flags and the status


def _changed(body: bytes, at: int, value: int) -> bytes:
    b = bytearray(body)
    b[at] = value
    return bytes(b)


def _helper_body(name: bytes) -> bytes:
    """A body with helper ``name`` (any bytes, any length up to 255)."""
    good = R.body(R.pack(nat_entry(helper="ftp"), 0.0))
    at = len(good) - 4  # the helper is last: its length byte, then "ftp"
    return good[:at] + bytes([len(name)]) + name


def _inverse_sent_as_reply() -> bytes:
    """GOOD_BODY with its reply tuple replaced by the plain inverse of the original."""
    inverse = invert(nat_entry().orig)
    packed = R.key(Entry(AF_INET, inverse, inverse))[3:]
    return GOOD_BODY[:_REPLY_AT] + packed + GOOD_BODY[_REPLY_AT + len(packed) :]


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(messages())
def test_every_message_round_trips(msg: wire.Message) -> None:
    assert wire.decode(wire.encode(msg)) == msg


@given(entries(), st.one_of(st.none(), st.integers(0, U32)))
def test_an_entry_travels_whole_but_its_id(entry: Entry, timeout: int | None) -> None:
    # The conntrack id never travels (it differs on every copy); the timeout is the one
    # given (the time left when the message is built).
    data = wire.encode_changes(0, 0, [(entry, timeout)], [entry.key], sent=0)
    msg = wire.decode(data)
    assert isinstance(msg, wire.Changes)
    (upsert,) = msg.upserts
    assert wire.entry_of(upsert) == entry._replace(timeout=timeout, id=None)
    assert msg.deletes == (R.key(entry),)


timeouts = st.one_of(st.none(), st.integers(0, U32))


@given(st.lists(st.tuples(entries(), timeouts), max_size=4), st.lists(keys(), max_size=3),
       st.integers(0, U64), st.integers(0, U64), st.integers(0, U64))  # fmt: skip
def test_records_encode_to_the_same_bytes_as_their_entries(
    timed: list[tuple[Entry, int | None]], dels: list[Any], stream: int, seq: int, sent: int
) -> None:
    recs = [(R.pack(e, 0.0), t) for e, t in timed]
    assert wire.encode_changes_records(stream, seq, recs, [R.pack_key(k) for k in dels],
                                       sent=sent) == (
        wire.encode_changes(stream, seq, timed, dels, sent=sent)
    )
    parts = [(7, True, False, timed[:2]), (9, False, True, timed[2:])]
    rparts = [(b, f, la, [(R.pack(e, 1.0), t) for e, t in es]) for b, f, la, es in parts]
    assert wire.encode_buckets_records(stream, seq, rparts, sent=sent) == (
        wire.encode_buckets(stream, seq, parts, sent=sent)
    )


def test_record_encoders_refuse_oversized_batches() -> None:
    rec = R.pack(tcp_entry(), 0.0)
    with pytest.raises(ValueError):
        wire.encode_changes_records(0, 0, [(rec, 1)] * wire.MAX_ITEMS, [R.key_of(rec)], sent=0)
    with pytest.raises(ValueError):
        wire.encode_buckets_records(0, 0, [(1, True, True, [(rec, 1)] * wire.MAX_ITEMS)],
                                    sent=0)


def test_the_id_is_not_sent_and_the_timeout_is_the_one_given() -> None:
    data = wire.encode_changes(1, 2, [(tcp_entry(), 17)], [], sent=5)
    (got,) = wire.decode(data).upserts  # type: ignore[union-attr]
    assert wire.entry_of(got) == tcp_entry()._replace(timeout=17, id=None)


def test_an_ipv4_tcp_entry_is_compact() -> None:
    # The notes' budget: about 69 bytes per IPv4 TCP entry (conntrackd: 68).
    one = len(wire.encode_changes(0, 0, [(tcp_entry(), 431999)], [], sent=U64))
    empty = len(wire.encode_changes(0, 0, [], [], sent=U64))
    assert one - empty <= 64


def test_worst_case_message_fits_the_bound() -> None:
    alen = 16
    t = CtTuple(b"\xff" * alen, b"\xff" * alen, 255, U16, U16, U8, U8, U16)
    worst = Entry(AF_INET6, t, t, U16, U32, U32, U32, b"\xff" * 16, TcpInfo(*[U8] * 5),
                  SctpInfo(U8, U32, U32), "h" * wire.MAX_HELPER, t)  # fmt: skip
    data = wire.encode_changes(U64, U64, [(worst, U32)] * wire.MAX_ITEMS, [], sent=U64)
    assert len(data) <= wire.MAX_MESSAGE_SIZE
    records = [(wire.MAX_BUCKETS - 1, True, True, [(worst, U32)] * (wire.MAX_ITEMS // 2 - 1))]
    assert len(wire.encode_buckets(U64, U64, records * 2, sent=U64)) <= wire.MAX_MESSAGE_SIZE


def test_encoder_refuses_oversized_batches() -> None:
    with pytest.raises(ValueError, match="bound"):
        wire.encode_changes(0, 0, [(tcp_entry(), 1)] * wire.MAX_ITEMS, [tcp_entry().key],
                            sent=0)


def test_version_mismatch_is_a_typed_refusal() -> None:
    data = msgpack.packb([wire.HELLO, wire.PROTOCOL_VERSION + 1, "x", 1, 4096, 0, "future"])
    with pytest.raises(WireVersionError) as info:
        wire.decode(data)
    assert info.value.version == wire.PROTOCOL_VERSION + 1


@pytest.mark.parametrize(
    ("value", "what"),
    [
        ([GOOD_BODY[:-1], 398], "body one byte short"),
        ([GOOD_BODY + b"\0", 398], "body one byte long"),
        ([b"", 398], "empty body"),
        ([_changed(GOOD_BODY, 0, 3), 398], "unknown family"),
        ([_changed(GOOD_BODY, 0, AF_INET6), 398], "IPv4 body said to be IPv6"),
        ([_changed(GOOD_BODY, _FLAGS_AT, GOOD_BODY[_FLAGS_AT] | 0x80), 398], "unknown flag"),
        ([_changed(GOOD_BODY, _FLAGS_AT, GOOD_BODY[_FLAGS_AT] | 2), 398], "labels flag, no labels"),
        ([_changed(GOOD_BODY, _REPLY_AT + 8, 17), 398], "reply protocol differs"),
        ([_inverse_sent_as_reply(), 398], "plain inverse sent as a reply tuple"),
        ([_helper_body(b"h" * 17), 398], "helper too long"),
        ([_helper_body(b""), 398], "empty helper"),
        ([_helper_body("hé".encode()), 398], "non-ASCII helper"),
        ([_helper_body(b"ftp")[:-1] + b"pp", 398], "helper longer than its length byte"),
        ([GOOD_BODY, -5], "negative timeout"),
        ([GOOD_BODY, 1 << 32], "timeout above 32 bits"),
        ([GOOD_BODY, True], "boolean timeout"),
        ([GOOD_BODY, 1.0], "float timeout"),
        ([GOOD_BODY.hex(), 398], "body as a string"),
        ([GOOD_BODY], "1 field"),
        ([GOOD_BODY, 398, 0], "3 fields"),
        ("entry", "not an array"),
    ],
)
def test_invalid_entries_are_refused(value: object, what: str) -> None:
    assert wire.decode(raw_changes(GOOD)).upserts  # type: ignore[union-attr]
    assert wire.decode(raw_changes([_helper_body(b"ftp"), 1])).upserts  # type: ignore[union-attr]
    with pytest.raises(WireDecodeError):
        wire.decode(raw_changes(value))


@pytest.mark.parametrize(
    ("key", "what"),
    [
        (KEY[:-1], "one byte short"),
        (KEY + b"\0", "one byte long"),
        (b"", "empty"),
        (_changed(KEY, 0, 3), "unknown family"),
        (_changed(KEY, 0, AF_INET6), "IPv4 key said to be IPv6"),
        ([AF_INET, 0, [b"\x0a\0\0\1", b"\xc0\0\2\7", 6, 40000, 443]], "an array"),
    ],
)
def test_invalid_keys_are_refused(key: object, what: str) -> None:
    assert wire.decode(raw_changes(GOOD, [KEY])).deletes  # type: ignore[union-attr]
    with pytest.raises(WireDecodeError):
        wire.decode(raw_changes(GOOD, [key]))


@given(entries())
def test_every_entry_body_is_accepted_and_canonical(entry: Entry) -> None:
    body = R.body(R.pack(entry, 0.0))
    R.check_body(body)
    assert R.body(R.pack(R.unpack(R.from_body(body, None, 0.0)), 0.0)) == body


@pytest.mark.parametrize(
    "value",
    [
        [wire.HELLO, wire.PROTOCOL_VERSION, "", 1, 4096, 0],  # empty node id
        [wire.HELLO, wire.PROTOCOL_VERSION, "n" * 65, 1, 4096, 0],  # node id too long
        [wire.HELLO, wire.PROTOCOL_VERSION, "a", 1, 1000, 0],  # not a power of two
        [wire.HELLO, wire.PROTOCOL_VERSION, "a", 1, 1 << 17, 0],  # too many buckets
        [wire.HELLO, wire.PROTOCOL_VERSION, "a", -1, 4096, 0],  # negative epoch
        [wire.HELLO, wire.PROTOCOL_VERSION, "a", 1, 4096],  # missing field
        [wire.ACK, 0, 0, 1],  # nack not a boolean
        [wire.ACK, -1, 0, False],  # negative stream
        [wire.CLOSE, "r" * 300],  # reason too long
        [wire.SUMMARY, 0, 0, 0, 0, b"\0" * 7],  # not whole digests
        [wire.SUMMARY, 0, 0, 0, wire.MAX_BUCKETS - 1, b"\0" * 16],  # beyond the last bucket
        [wire.BUCKETS, 0, 0, [[wire.MAX_BUCKETS, 3, []]]],  # bucket out of range
        [wire.BUCKETS, 0, 0, [[0, 4, []]]],  # unknown flag
        [wire.RESYNC_BEGIN, 0, 0, 0],  # missing full
        [wire.RESYNC_DONE, 0, 0, 0, 0],  # extra field
        [wire.RESYNC_REQUEST, 0, 0, "yes"],
        [wire.CHANGES, 0, 0, [GOOD], [[2, 0]]],  # key not packed
        [wire.CHANGES, 0, 0, [GOOD] * 1025, [KEY] * 1024, 0],  # too many items
        [42, 0, 0],  # unknown type
        [True, 0, 0],  # boolean type
        [wire.ACK],  # too short
        {"type": 3},  # a map
        3,  # not an array
    ],
)
def test_invalid_messages_are_refused(value: object) -> None:
    with pytest.raises(WireDecodeError):
        wire.decode(msgpack.packb(value))


def test_unpack_limits_apply_before_objects_are_built() -> None:
    huge = msgpack.packb([wire.CHANGES, 0, 0, [], list(range(wire.MAX_ITEMS + 1)), 0])
    with pytest.raises(WireDecodeError, match="msgpack"):
        wire.decode(huge)
    with pytest.raises(WireDecodeError, match="msgpack"):
        wire.decode(msgpack.packb([wire.CLOSE, "x" * (wire.MAX_REASON + 1)]))
    with pytest.raises(WireDecodeError, match="msgpack"):
        wire.decode(msgpack.packb([wire.ACK, 0, 0, False, 0]) + b"\x00")  # trailing bytes


def _only_wire_errors(data: bytes) -> None:
    with contextlib.suppress(WireDecodeError):
        wire.decode(data)


@settings(max_examples=1500)
@given(st.binary(max_size=300))
def test_fuzz_random_bytes(data: bytes) -> None:
    _only_wire_errors(data)


VALID_FRAMES = [
    wire.encode(wire.Hello(wire.PROTOCOL_VERSION, "fw-a", 7, 4096, 3)),
    wire.encode_changes(1, 2, [(tcp_entry(i), 100) for i in range(3)], [tcp_entry(9).key],
                        sent=123456),
    wire.encode_buckets(1, 3, [(5, True, False, [(tcp_entry(), None)]), (6, False, True, [])],
                        sent=7),
    wire.encode(wire.Summary(1, 4, 9, 0, b"\x01" * 16)),
    wire.encode(wire.Ack(1, 4, True, 99)),
]


@settings(max_examples=800)
@given(
    st.sampled_from(VALID_FRAMES),
    st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), min_size=1, max_size=6),
    st.integers(0, 400),
)
def test_fuzz_mutated_valid_frames(frame: bytes, flips: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(frame)
    for pos, value in flips:
        data[pos % len(data)] = value
    _only_wire_errors(bytes(data))
    _only_wire_errors(bytes(data[: cut % (len(data) + 1)]))
    _only_wire_errors(frame[: cut % len(frame)] + bytes(data[cut % len(data) :]))


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 63), U64) | st.floats()
    | st.binary(max_size=20) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=6)
    | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=30,
)  # fmt: skip


@settings(max_examples=300)
@given(st.integers(0, 12), st.lists(msgpack_values, max_size=7))
def test_fuzz_well_formed_msgpack_of_any_shape(kind: int, fields: list[object]) -> None:
    _only_wire_errors(msgpack.packb([kind, *fields]))
    _only_wire_errors(msgpack.packb([wire.CHANGES, 0, 0, fields, [], 0]))
    _only_wire_errors(msgpack.packb([wire.CHANGES, 0, 0, [[*GOOD[:3], *fields]], [], 0]))


def _burst(n: int) -> list[Any]:
    """``n`` valid NAT'd entries of one shape, as raw msgpack values."""
    base = nat_entry()
    return [[R.body(R.pack(base._replace(orig=base.orig._replace(sport=1000 + i)), 0.0)),
             300] for i in range(n)]


@pytest.mark.parametrize(("bad_body_at", "bad_type_at", "said"), [
    (3, 10, "entry body"),  # the bad body comes first
    (10, 3, "is not an array of a binary body"),  # the ill-typed entry comes first
    (None, 3, "is not an array of a binary body"),
    (3, None, "entry body"),
])
def test_the_first_bad_entry_of_a_burst_is_the_one_reported(
        bad_body_at: int | None, bad_type_at: int | None, said: str) -> None:
    """The bodies of a message are checked together (those of one shape by column),
    after every entry's types: the error is still the first bad entry's."""
    upserts = _burst(40)
    assert len(wire.decode(msgpack.packb([wire.CHANGES, 0, 0, upserts, [], 0]))
               .upserts) == 40  # type: ignore[union-attr]
    if bad_body_at is not None:
        body = upserts[bad_body_at][0]
        upserts[bad_body_at][0] = _changed(body, _REPLY_AT + 8, 17)  # reply protocol
    if bad_type_at is not None:
        upserts[bad_type_at] = [upserts[bad_type_at][0], "398"]
    with pytest.raises(WireDecodeError, match=said):
        wire.decode(msgpack.packb([wire.CHANGES, 0, 0, upserts, [], 0]))
