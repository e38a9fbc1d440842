"""The sync protocol's messages and their msgpack encoding, strictly validated.

Pure: bytes in, typed messages out (and back). One message is the payload of one frame
of :mod:`replicator.framing`. Everything decoded here comes from the network, so
:func:`decode` raises only :class:`~replicator.errors.WireDecodeError` (or its
subclass :class:`~replicator.errors.WireVersionError`) on *any* input, and it checks
every field's type and range before it builds a single object. The fuzz tests in
``tests/test_wire.py`` hold it to that.

Layout
------
Every message is a msgpack array whose first element is the message type. The
protocol version travels in HELLO, the first message on every connection, and is
checked hard: a peer speaking another version is refused (``WireVersionError``) and
nothing else it sends is interpreted. HELLO keeps ``[type, version, ...]`` as its
prefix in every version so that the check itself can never be misread.

Messages other than HELLO, CLOSE and ACK are *sequenced*: ``[type, stream, seq, ...]``
(see :mod:`replicator.sync` for what stream and seq mean).

``sent`` is the sender's monotonic clock in milliseconds when it built the message.
Clocks of two nodes are never compared directly: the receiver learns how late it reads
the peer's messages from how ``local clock - sent`` varies (:mod:`replicator.peerclock`),
and dates the remaining timeouts a message carries from when it was built rather than
from when a busy receiver got to read it. ACK carries it too, so that samples keep
coming while the link idles.

====================  ===============================================================
message               array
====================  ===============================================================
HELLO          1      ``[1, version, node_id, epoch, buckets, stream_base]``
CLOSE          2      ``[2, reason]``
ACK            3      ``[3, stream, next_seq, nack, sent]``
CHANGES        4      ``[4, stream, seq, [entry...], [key...], sent]`` (upserts, deletes)
BUCKETS        5      ``[5, stream, seq, [[bucket, flags, [entry...]]...], sent]``
RESYNC_BEGIN   6      ``[6, stream, seq, resync_id, full]``
SUMMARY        7      ``[7, stream, seq, resync_id, first_bucket, digests]``
RESYNC_DONE    8      ``[8, stream, seq, resync_id]``
RESYNC_REQUEST 9      ``[9, stream, seq, full]``
====================  ===============================================================

An *entry* is the compact tuple ``[family, orig, reply, zone, status, timeout, mark,
labels, tcp, sctp, helper, master]`` with trailing nils omitted (at least the first
five fields are present). ``timeout`` is the *remaining* lifetime in whole seconds at
the moment the sender encoded it (nil: the entry has none); the kernel's conntrack id
is never sent (it differs on every copy). A *tuple* is ``[src, dst, proto, sport,
dport, icmp_type, icmp_code, icmp_id]`` with addresses as raw bytes (4 for IPv4, 16
for IPv6, by the entry's family) and trailing zero ICMP fields omitted. ``tcp`` is
``[state, wscale_orig, wscale_reply, flags_orig, flags_reply]``, ``sctp`` is
``[state, vtag_orig, vtag_reply]``. A *key* (deletes) is ``[family, zone, orig]``.
``digests`` is a bin of 8-byte big-endian bucket digests (:mod:`replicator.digest`).

An IPv4 TCP entry without NAT encodes in about 60 bytes. A message carries at most
:data:`MAX_ITEMS` entries and keys together, so an encoded message stays below
:data:`MAX_MESSAGE_SIZE` bytes, well inside the framing layer's default 1 MiB bound.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Sequence
from typing import Any, NamedTuple

import msgpack

from . import record as R
from .errors import WireDecodeError, WireVersionError
from .model import AF_INET, AF_INET6, CtTuple, Entry, EntryKey, SctpInfo, TcpInfo

#: The sync protocol version this node speaks (checked in HELLO). 3: ACK, CHANGES and
#: BUCKETS carry the sender's clock (``sent``). 2: bucket placement and fingerprints
#: are computed over the packed key and record body of :mod:`replicator.record` (1:
#: over msgpack forms), so digests of version 1 nodes would never match.
PROTOCOL_VERSION = 3

HELLO = 1
CLOSE = 2
ACK = 3
CHANGES = 4
BUCKETS = 5
RESYNC_BEGIN = 6
SUMMARY = 7
RESYNC_DONE = 8
RESYNC_REQUEST = 9

#: Bounds checked on decode (and by the encoder, where a violation is a local bug).
MAX_NODE_ID = 64
MAX_REASON = 256
MAX_HELPER = 16
LABELS_SIZE = 16
#: Entries (upserts, bucket contents) plus keys (deletes) in one message.
MAX_ITEMS = 2048
#: Bucket-count bound (a power of two up to this).
MAX_BUCKETS = 1 << 16
DIGEST_SIZE = 8
#: Bucket digests in one SUMMARY message.
MAX_SUMMARY_DIGESTS = 4096
#: Upper bound of an encoded message: MAX_ITEMS worst-case entries (IPv6, every
#: optional field present, about 240 bytes) plus headers. Checked by a test.
MAX_MESSAGE_SIZE = 512 * 1024

FLAG_FIRST = 1
FLAG_LAST = 2

_U8 = 0xFF
_U16 = 0xFFFF
_U32 = 0xFFFF_FFFF
_U64 = 0xFFFF_FFFF_FFFF_FFFF
_ADDR_LEN = {AF_INET: 4, AF_INET6: 16}
_ENTRY_FIELDS = 12
_MIN_ENTRY_FIELDS = 5

_new = tuple.__new__


class Hello(NamedTuple):
    """First message on a connection: who is speaking, and how."""

    version: int
    node_id: str
    #: Changes on every start of the sender (a restarted peer lost its caches).
    epoch: int
    #: The sender's bucket count: both ends must agree for digests to compare.
    buckets: int
    #: The first stream id the sender uses on this connection.
    stream_base: int


class Close(NamedTuple):
    """The sender is closing the connection, and why (logged by the receiver)."""

    reason: str


class Ack(NamedTuple):
    """Cumulative acknowledgement: every message of ``stream`` below ``next_seq`` was
    received. ``nack``: a gap was seen, resend from ``next_seq``. Also the keepalive."""

    stream: int
    next_seq: int
    nack: bool
    #: The sender's clock (ms) when it built the message.
    sent: int = 0


class Changes(NamedTuple):
    """Upserts (full entries, ``timeout`` = remaining seconds) and deletes (keys)."""

    stream: int
    seq: int
    upserts: tuple[Entry, ...]
    deletes: tuple[EntryKey, ...]
    #: The sender's clock (ms) when it built the message: the timeouts count from then.
    sent: int = 0


class BucketRecord(NamedTuple):
    """Part of one bucket's content. The parts from ``first`` to ``last`` replace the
    receiver's copy of the bucket (see :mod:`replicator.sync`)."""

    bucket: int
    first: bool
    last: bool
    entries: tuple[Entry, ...]


class Buckets(NamedTuple):
    """Whole-bucket replacements (resync and overflow repair)."""

    stream: int
    seq: int
    records: tuple[BucketRecord, ...]
    #: The sender's clock (ms) when it built the message: the timeouts count from then.
    sent: int = 0


class ResyncBegin(NamedTuple):
    """The sender starts resync ``resync_id``; unless ``full``, reply with SUMMARY."""

    stream: int
    seq: int
    resync_id: int
    full: bool


class Summary(NamedTuple):
    """Digests of the receiver's copy of buckets ``first_bucket ...`` (8 bytes each)."""

    stream: int
    seq: int
    resync_id: int
    first_bucket: int
    digests: bytes


class ResyncDone(NamedTuple):
    """Every bucket resync ``resync_id`` found different has been sent before this."""

    stream: int
    seq: int
    resync_id: int


class ResyncRequest(NamedTuple):
    """Ask the peer to resync its table to us (``full``: send every bucket)."""

    stream: int
    seq: int
    full: bool


Sequenced = Changes | Buckets | ResyncBegin | Summary | ResyncDone | ResyncRequest
Message = Hello | Close | Ack | Sequenced

#: An entry to encode with the remaining timeout to put on the wire (``None``: none).
TimedEntry = tuple[Entry, int | None]
#: The same with the entry as a record of :mod:`replicator.record` (its header aside).
TimedRecord = tuple[bytes, int | None]


# --- encoding -----------------------------------------------------------------------

_packb = msgpack.Packer(use_bin_type=True, autoreset=True).pack


def _wire_tuple(t: tuple[Any, ...]) -> tuple[Any, ...]:
    # Trailing zero ICMP fields are implied (decode pads them back).
    return t[:5] if not (t[5] or t[6] or t[7]) else t


def _wire_entry(e: Entry, timeout: int | None) -> list[Any]:
    master = e[11]
    fields = [
        e[0], _wire_tuple(e[1]), _wire_tuple(e[2]), e[3], e[4], timeout,
        e[6], e[7], e[8], e[9], e[10], None if master is None else _wire_tuple(master),
    ]  # fmt: skip
    while fields[-1] is None:
        fields.pop()
    return fields


def _record_entry(rec: bytes, timeout: int | None) -> list[Any]:
    # _wire_entry of unpack(rec), without building the named tuples (the sender's hot
    # path; a test checks that both encode to the same bytes).
    family, orig, reply, zone, status, mark, labels, tcp, sctp, helper, master = R.fields(rec)
    fields = [
        family, orig[:5] if not (orig[5] or orig[6] or orig[7]) else orig,
        reply[:5] if not (reply[5] or reply[6] or reply[7]) else reply, zone, status,
        timeout, mark, labels, tcp, sctp, helper,
        None if master is None else _wire_tuple(master),
    ]  # fmt: skip
    while fields[-1] is None:
        fields.pop()
    return fields


def _wire_key(key: EntryKey) -> tuple[Any, ...]:
    return (key[0], key[1], _wire_tuple(key[2]))


def _check_items(n: int) -> None:
    if n > MAX_ITEMS:
        raise ValueError(f"{n} items in one message, the bound is {MAX_ITEMS}")


def encode_changes(
    stream: int, seq: int, upserts: Sequence[TimedEntry], deletes: Sequence[EntryKey], *,
    sent: int,
) -> bytes:
    """Encode a CHANGES message (the hot path: each upsert with its remaining timeout)."""
    _check_items(len(upserts) + len(deletes))
    return _packb(
        (
            CHANGES,
            stream,
            seq,
            [_wire_entry(e, t) for e, t in upserts],
            [_wire_key(k) for k in deletes],
            sent,
        )
    )


def encode_buckets(
    stream: int, seq: int, records: Sequence[tuple[int, bool, bool, Sequence[TimedEntry]]],
    *, sent: int,
) -> bytes:
    """Encode a BUCKETS message: ``(bucket, first, last, [(entry, timeout)...])``."""
    _check_items(sum(len(r[3]) for r in records) + len(records))
    return _packb(
        (
            BUCKETS,
            stream,
            seq,
            [
                (b, (FLAG_FIRST if first else 0) | (FLAG_LAST if last else 0),
                 [_wire_entry(e, t) for e, t in entries])
                for b, first, last, entries in records
            ],
            sent,
        )
    )  # fmt: skip


def encode_changes_records(
    stream: int, seq: int, upserts: Sequence[TimedRecord], deletes: Sequence[bytes], *,
    sent: int,
) -> bytes:
    """:func:`encode_changes` of records and packed keys (:mod:`replicator.record`):
    the same bytes, without unpacking them to entries first."""
    _check_items(len(upserts) + len(deletes))
    return _packb(
        (
            CHANGES,
            stream,
            seq,
            [_record_entry(r, t) for r, t in upserts],
            [_wire_key(R.unpack_key(k)) for k in deletes],
            sent,
        )
    )


def encode_buckets_records(
    stream: int, seq: int, records: Sequence[tuple[int, bool, bool, Sequence[TimedRecord]]],
    *, sent: int,
) -> bytes:
    """:func:`encode_buckets` of records: ``(bucket, first, last, [(record, timeout)...])``."""
    _check_items(sum(len(r[3]) for r in records) + len(records))
    return _packb(
        (
            BUCKETS,
            stream,
            seq,
            [
                (b, (FLAG_FIRST if first else 0) | (FLAG_LAST if last else 0),
                 [_record_entry(r, t) for r, t in entries])
                for b, first, last, entries in records
            ],
            sent,
        )
    )  # fmt: skip


def encode(msg: Message) -> bytes:
    """Encode any message (upsert entries carry their own ``timeout`` field)."""
    if isinstance(msg, Changes):
        return encode_changes(msg.stream, msg.seq, [(e, e.timeout) for e in msg.upserts],
                              msg.deletes, sent=msg.sent)  # fmt: skip
    if isinstance(msg, Buckets):
        return encode_buckets(
            msg.stream,
            msg.seq,
            [(r.bucket, r.first, r.last, [(e, e.timeout) for e in r.entries])
             for r in msg.records],
            sent=msg.sent,
        )  # fmt: skip
    if isinstance(msg, Hello):
        return _packb((HELLO, *msg))
    if isinstance(msg, Close):
        return _packb((CLOSE, msg.reason))
    if isinstance(msg, Ack):
        return _packb((ACK, *msg))
    if isinstance(msg, ResyncBegin):
        return _packb((RESYNC_BEGIN, *msg))
    if isinstance(msg, Summary):
        if len(msg.digests) > MAX_SUMMARY_DIGESTS * DIGEST_SIZE:
            raise ValueError("too many digests in one SUMMARY")
        return _packb((SUMMARY, *msg))
    if isinstance(msg, ResyncDone):
        return _packb((RESYNC_DONE, *msg))
    return _packb((RESYNC_REQUEST, *msg))


# --- decoding -----------------------------------------------------------------------


def _bad(what: str) -> WireDecodeError:
    return WireDecodeError(f"invalid message: {what}")


def _uint(v: object, bound: int, what: str) -> int:
    if type(v) is not int or not 0 <= v <= bound:
        raise _bad(f"{what} is not an integer in 0..{bound}")
    return v


def _bool(v: object, what: str) -> bool:
    if type(v) is not bool:
        raise _bad(f"{what} is not a boolean")
    return v


def _str(v: object, low: int, high: int, what: str) -> str:
    if type(v) is not str or not low <= len(v) <= high:
        raise _bad(f"{what} is not a string of {low}..{high} characters")
    return v


def _array(v: object, high: int, what: str) -> tuple[Any, ...]:
    if type(v) is not tuple or len(v) > high:
        raise _bad(f"{what} is not an array of at most {high} elements")
    return v


# Validation works on type signatures: ``tuple(map(type, t))`` compared with (or looked
# up among) the valid ones is a single C-level pass, where a chain of isinstance()
# calls per field would dominate the decoder's cost. ``type(x) is int`` also rejects
# booleans, which msgpack keeps distinct. Integer ranges are then checked by packing
# the fields with a struct of the right widths (struct.error when out of range).
_TUPLE_SIG = (bytes, bytes, int, int, int, int, int, int)
_TUPLE_PAD = {n: (0,) * (8 - n) for n in range(3, 9)}
_TUPLE_RANGES = struct.Struct(">BHHBBH")  # proto, sport, dport, icmp type, code, id
_TCP_SIG = (int,) * 5
_TCP_RANGES = struct.Struct(">5B")
_SCTP_SIG = (int,) * 3
_SCTP_RANGES = struct.Struct(">BII")
_TWO_TUPLES_SIG = _TUPLE_SIG * 2
# Orig proto, ports and ICMP fields, reply ports and ICMP fields (its proto equals the
# original's), zone, status, timeout, mark.
_FIXED_RANGES = struct.Struct(">BHHBBH" "HHBBH" "HIII")
_NONE = type(None)
_ENTRY_PAD = {n: (None,) * (_ENTRY_FIELDS - n) for n in range(_MIN_ENTRY_FIELDS, _ENTRY_FIELDS + 1)}
# (family, orig, reply, zone, status) then the optional fields, each its type or None.
_ENTRY_SIGS = frozenset(
    (int, tuple, tuple, int, int, *opt)
    for opt in itertools.product(
        (int, _NONE), (int, _NONE), (bytes, _NONE), (tuple, _NONE), (tuple, _NONE),
        (str, _NONE), (tuple, _NONE),
    )
)  # fmt: skip


def _ct_tuple(t: Any, alen: int) -> CtTuple:
    pad = _TUPLE_PAD.get(len(t)) if type(t) is tuple else None
    if pad is None:
        raise _bad("tuple is not an array of 3..8 fields")
    if pad:
        t = t + pad
    if tuple(map(type, t)) != _TUPLE_SIG or len(t[0]) != alen or len(t[1]) != alen:
        raise _bad(f"tuple is not two {alen}-byte addresses and integers")
    try:
        _TUPLE_RANGES.pack(t[2], t[3], t[4], t[5], t[6], t[7])
    except struct.error:
        raise _bad("tuple protocol, ports or ICMP fields out of range") from None
    return _new(CtTuple, t)


def _entry(e: Any) -> Entry:
    pad = _ENTRY_PAD.get(len(e)) if type(e) is tuple else None
    if pad is None:
        raise _bad(f"entry is not an array of {_MIN_ENTRY_FIELDS}..{_ENTRY_FIELDS} fields")
    if pad:
        e = e + pad
    if tuple(map(type, e)) not in _ENTRY_SIGS:
        raise _bad("entry field of the wrong type")
    family, orig, reply, zone, status, timeout, mark, labels, tcp, sctp, helper, master = e
    alen = _ADDR_LEN.get(family)
    if alen is None:
        raise _bad("entry family is not AF_INET or AF_INET6")
    # The two tuples are checked together (one type signature, one struct for every
    # integer of the entry's fixed part): the decoder's hot path.
    po = _TUPLE_PAD.get(len(orig))
    pr = _TUPLE_PAD.get(len(reply))
    if po is None or pr is None:
        raise _bad("tuple is not an array of 3..8 fields")
    o = orig + po if po else orig
    r = reply + pr if pr else reply
    if (
        tuple(map(type, o + r)) != _TWO_TUPLES_SIG
        or len(o[0]) != alen or len(o[1]) != alen or len(r[0]) != alen or len(r[1]) != alen
    ):  # fmt: skip
        raise _bad(f"tuple is not two {alen}-byte addresses and integers")
    if r[2] != o[2]:
        raise _bad("reply tuple protocol differs from the original's")
    try:
        _FIXED_RANGES.pack(
            o[2], o[3], o[4], o[5], o[6], o[7], r[3], r[4], r[5], r[6], r[7], zone, status,
            0 if timeout is None else timeout, 0 if mark is None else mark,
        )  # fmt: skip
    except struct.error:
        raise _bad("entry tuple, zone, status, timeout or mark out of range") from None
    if labels is not None and len(labels) != LABELS_SIZE:
        raise _bad(f"entry labels are not {LABELS_SIZE} bytes")
    if tcp is not None:
        if tuple(map(type, tcp)) != _TCP_SIG:
            raise _bad("tcp info is not 5 integers")
        try:
            _TCP_RANGES.pack(*tcp)
        except struct.error:
            raise _bad("tcp info field out of range") from None
        tcp = _new(TcpInfo, tcp)
    if sctp is not None:
        if tuple(map(type, sctp)) != _SCTP_SIG:
            raise _bad("sctp info is not 3 integers")
        try:
            _SCTP_RANGES.pack(*sctp)
        except struct.error:
            raise _bad("sctp info field out of range") from None
        sctp = _new(SctpInfo, sctp)
    if helper is not None and not (1 <= len(helper) <= MAX_HELPER and helper.isascii()):
        raise _bad(f"entry helper is not an ASCII name of 1..{MAX_HELPER} characters")
    if master is not None:
        master = _ct_tuple(master, alen)
    return _new(Entry, (family, _new(CtTuple, o), _new(CtTuple, r), zone, status, timeout,
                        mark, labels, tcp, sctp, helper, master, None))  # fmt: skip


def _key(k: object) -> EntryKey:
    if type(k) is not tuple or len(k) != 3:
        raise _bad("key is not an array of 3 fields")
    family, zone, orig = k
    alen = _ADDR_LEN.get(family) if type(family) is int else None
    if alen is None:
        raise _bad("key family is not AF_INET or AF_INET6")
    return (family, _uint(zone, _U16, "key zone"), _ct_tuple(orig, alen))


def _arity(m: tuple[Any, ...], n: int, name: str) -> None:
    if len(m) != n:
        raise _bad(f"{name} has {len(m)} fields, not {n}")


def _head(m: tuple[Any, ...]) -> tuple[int, int]:
    return _uint(m[1], _U64, "stream"), _uint(m[2], _U64, "seq")


def _decode_changes(m: tuple[Any, ...]) -> Changes:
    _arity(m, 6, "CHANGES")
    stream, seq = _head(m)
    ups = _array(m[3], MAX_ITEMS, "upserts")
    dels = _array(m[4], MAX_ITEMS - len(ups), "deletes")
    return Changes(stream, seq, tuple(map(_entry, ups)), tuple(map(_key, dels)),
                   _uint(m[5], _U64, "sent"))


def _decode_buckets(m: tuple[Any, ...]) -> Buckets:
    _arity(m, 5, "BUCKETS")
    stream, seq = _head(m)
    raw = _array(m[3], MAX_ITEMS, "bucket records")
    budget = MAX_ITEMS - len(raw)
    records = []
    for rec in raw:
        if type(rec) is not tuple or len(rec) != 3:
            raise _bad("bucket record is not an array of 3 fields")
        bucket = _uint(rec[0], MAX_BUCKETS - 1, "bucket")
        flags = _uint(rec[1], FLAG_FIRST | FLAG_LAST, "bucket flags")
        entries = _array(rec[2], budget, "bucket entries")
        budget -= len(entries)
        records.append(
            BucketRecord(bucket, bool(flags & FLAG_FIRST), bool(flags & FLAG_LAST),
                         tuple(map(_entry, entries)))
        )  # fmt: skip
    return Buckets(stream, seq, tuple(records), _uint(m[4], _U64, "sent"))


def _decode_hello(m: tuple[Any, ...]) -> Hello:
    version = _uint(m[1], _U32, "version")
    if version != PROTOCOL_VERSION:
        raise WireVersionError(
            f"peer speaks sync protocol version {version}, this node {PROTOCOL_VERSION}",
            version,
        )
    _arity(m, 6, "HELLO")
    node_id = _str(m[2], 1, MAX_NODE_ID, "node id")
    buckets = _uint(m[4], MAX_BUCKETS, "buckets")
    if buckets == 0 or buckets & (buckets - 1):
        raise _bad("bucket count is not a power of two")
    return Hello(version, node_id, _uint(m[3], _U64, "epoch"), buckets,
                 _uint(m[5], _U64, "stream base"))  # fmt: skip


def _decode_summary(m: tuple[Any, ...]) -> Summary:
    _arity(m, 6, "SUMMARY")
    stream, seq = _head(m)
    first = _uint(m[4], MAX_BUCKETS - 1, "first bucket")
    digests = m[5]
    if type(digests) is not bytes or len(digests) % DIGEST_SIZE:
        raise _bad("digests are not a binary of 8-byte digests")
    if first + len(digests) // DIGEST_SIZE > MAX_BUCKETS:
        raise _bad("digests beyond the last bucket")
    return Summary(stream, seq, _uint(m[3], _U64, "resync id"), first, digests)


def _decode_other(kind: int, m: tuple[Any, ...]) -> Message:
    if kind == ACK:
        _arity(m, 5, "ACK")
        stream, nxt = _head(m)
        return Ack(stream, nxt, _bool(m[3], "nack"), _uint(m[4], _U64, "sent"))
    if kind == CLOSE:
        _arity(m, 2, "CLOSE")
        return Close(_str(m[1], 0, MAX_REASON, "reason"))
    if kind == RESYNC_BEGIN:
        _arity(m, 5, "RESYNC_BEGIN")
        stream, seq = _head(m)
        return ResyncBegin(stream, seq, _uint(m[3], _U64, "resync id"), _bool(m[4], "full"))
    if kind == RESYNC_DONE:
        _arity(m, 4, "RESYNC_DONE")
        stream, seq = _head(m)
        return ResyncDone(stream, seq, _uint(m[3], _U64, "resync id"))
    if kind == RESYNC_REQUEST:
        _arity(m, 4, "RESYNC_REQUEST")
        stream, seq = _head(m)
        return ResyncRequest(stream, seq, _bool(m[3], "full"))
    raise _bad(f"unknown message type {kind}")


def decode(data: bytes) -> Message:
    """Decode one message. Raises :class:`WireDecodeError` and nothing else."""
    try:
        m = msgpack.unpackb(
            data,
            use_list=False,
            raw=False,
            strict_map_key=True,
            max_str_len=MAX_REASON,
            max_bin_len=MAX_SUMMARY_DIGESTS * DIGEST_SIZE,
            max_array_len=MAX_ITEMS,
            max_map_len=0,
            max_ext_len=0,
        )
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        # ValueError covers msgpack's ExtraData/FormatError/StackError, exceeded
        # limits and invalid UTF-8 (UnicodeDecodeError).
        raise WireDecodeError(f"not a msgpack message: {exc}") from None
    if type(m) is not tuple or len(m) < 2:
        raise _bad("not an array of at least 2 fields")
    kind = m[0]
    if type(kind) is not int:
        raise _bad("message type is not an integer")
    if kind == CHANGES:
        return _decode_changes(m)
    if kind == BUCKETS:
        return _decode_buckets(m)
    if kind == HELLO:
        return _decode_hello(m)
    if kind == SUMMARY:
        return _decode_summary(m)
    return _decode_other(kind, m)
