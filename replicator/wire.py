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

An *entry* is ``[body, timeout]``: ``body`` is the entry's state exactly as
:mod:`replicator.record` lays out a record's body (binary, big endian, the same on
every host: family, zone, original tuple, flags, status, then the reply tuple unless
it is the plain inverse, mark, labels, TCP and SCTP info, helper and master as the
flags say), and ``timeout`` the *remaining* lifetime in whole seconds at the moment
the sender encoded it (nil: the entry has none). The kernel's conntrack id is never
sent (it differs on every copy). A *key* (deletes) is the packed key of
:func:`replicator.record.pack_key` (binary: family, zone, original tuple): the first
bytes of the body. The receiver checks each body with
:func:`replicator.record.check_body` (every field read at its width, known flags, the
exact size they give, a plain-ASCII helper name, a canonical reply tuple) and stores
it as it came: nothing is rebuilt, and the digests (computed over bodies) compare
byte for byte. ``digests`` is a bin of 8-byte big-endian bucket digests
(:mod:`replicator.digest`).

An IPv4 TCP entry with a mark and TCP info encodes in 40-42 bytes (57-59 with NAT).
A message carries at most :data:`MAX_ITEMS` entries and keys together, so an encoded
message stays below :data:`MAX_MESSAGE_SIZE` bytes, well inside the framing layer's
default 1 MiB bound.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any, NamedTuple

import msgpack

from . import record as R
from .errors import WireDecodeError, WireVersionError
from .model import AF_INET, AF_INET6, Entry, EntryKey

#: The sync protocol version this node speaks (checked in HELLO). 4: entries travel as
#: record bodies and keys as packed keys (3: as msgpack arrays of their fields). 3: ACK,
#: CHANGES and BUCKETS carry the sender's clock (``sent``). 2: bucket placement and fingerprints
#: are computed over the packed key and record body of :mod:`replicator.record` (1:
#: over msgpack forms), so digests of version 1 nodes would never match.
PROTOCOL_VERSION = 4

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
MAX_HELPER = R.MAX_HELPER
LABELS_SIZE = R.LABELS_SIZE
#: Entries (upserts, bucket contents) plus keys (deletes) in one message.
MAX_ITEMS = 2048
#: Bucket-count bound (a power of two up to this).
MAX_BUCKETS = 1 << 16
DIGEST_SIZE = 8
#: Bucket digests in one SUMMARY message.
MAX_SUMMARY_DIGESTS = 4096
#: Upper bound of an encoded message: MAX_ITEMS worst-case entries (IPv6, every
#: optional field present, about 190 bytes) plus headers. Checked by a test.
MAX_MESSAGE_SIZE = 512 * 1024

FLAG_FIRST = 1
FLAG_LAST = 2

_U32 = 0xFFFF_FFFF
_U64 = 0xFFFF_FFFF_FFFF_FFFF

_new = tuple.__new__

#: An entry as it travels: its record body (:mod:`replicator.record`) and its remaining
#: timeout in whole seconds (``None``: it has none).
WireEntry = tuple[bytes, int | None]


def upsert_of(entry: Entry, timeout: int | None) -> WireEntry:
    """``entry`` as it travels, with ``timeout`` (see :data:`WireEntry`)."""
    return (R.body(R.pack(entry, 0.0)), timeout)


def entry_of(upsert: WireEntry) -> Entry:
    """The entry a (checked) wire entry holds, its timeout the one it carries."""
    body, timeout = upsert
    return R.unpack(R.from_body(body, timeout, 0.0))


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
    """Upserts (``(body, timeout)``, ``timeout`` = remaining seconds) and deletes
    (packed keys)."""

    stream: int
    seq: int
    upserts: tuple[WireEntry, ...]
    deletes: tuple[bytes, ...]
    #: The sender's clock (ms) when it built the message: the timeouts count from then.
    sent: int = 0


class BucketRecord(NamedTuple):
    """Part of one bucket's content. The parts from ``first`` to ``last`` replace the
    receiver's copy of the bucket (see :mod:`replicator.sync`)."""

    bucket: int
    first: bool
    last: bool
    entries: tuple[WireEntry, ...]


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


def _check_items(n: int) -> None:
    if n > MAX_ITEMS:
        raise ValueError(f"{n} items in one message, the bound is {MAX_ITEMS}")


def encode_changes(
    stream: int, seq: int, upserts: Sequence[TimedEntry], deletes: Sequence[EntryKey], *,
    sent: int,
) -> bytes:
    """Encode a CHANGES message of entries (each with its remaining timeout) and keys."""
    return encode_changes_records(
        stream, seq, [(R.pack(e, 0.0), t) for e, t in upserts], [R.pack_key(k) for k in deletes],
        sent=sent,
    )


def encode_buckets(
    stream: int, seq: int, records: Sequence[tuple[int, bool, bool, Sequence[TimedEntry]]],
    *, sent: int,
) -> bytes:
    """Encode a BUCKETS message: ``(bucket, first, last, [(entry, timeout)...])``."""
    return encode_buckets_records(
        stream, seq,
        [(b, first, last, [(R.pack(e, 0.0), t) for e, t in entries])
         for b, first, last, entries in records],
        sent=sent,
    )  # fmt: skip


def encode_changes_records(
    stream: int, seq: int, upserts: Sequence[TimedRecord], deletes: Sequence[bytes], *,
    sent: int,
) -> bytes:
    """Encode a CHANGES message of records of :mod:`replicator.record` (each with the
    remaining timeout to send) and packed keys: the sender's hot path (a slice per
    entry)."""
    _check_items(len(upserts) + len(deletes))
    h = R.HEADER_SIZE
    return _packb((CHANGES, stream, seq, [(r[h:], t) for r, t in upserts], deletes, sent))


def encode_buckets_records(
    stream: int, seq: int, records: Sequence[tuple[int, bool, bool, Sequence[TimedRecord]]],
    *, sent: int,
) -> bytes:
    """Encode a BUCKETS message: ``(bucket, first, last, [(record, timeout)...])``."""
    _check_items(sum(len(r[3]) for r in records) + len(records))
    h = R.HEADER_SIZE
    return _packb(
        (
            BUCKETS,
            stream,
            seq,
            [
                (b, (FLAG_FIRST if first else 0) | (FLAG_LAST if last else 0),
                 [(r[h:], t) for r, t in entries])
                for b, first, last, entries in records
            ],
            sent,
        )
    )  # fmt: skip


def encode(msg: Message) -> bytes:
    """Encode any message (upsert entries carry their own ``timeout`` field)."""
    if isinstance(msg, Changes):
        _check_items(len(msg.upserts) + len(msg.deletes))
        return _packb((CHANGES, *msg))
    if isinstance(msg, Buckets):
        _check_items(sum(len(r.entries) for r in msg.records) + len(msg.records))
        return _packb(
            (BUCKETS, msg.stream, msg.seq,
             [(r.bucket, (FLAG_FIRST if r.first else 0) | (FLAG_LAST if r.last else 0),
               r.entries) for r in msg.records],
             msg.sent)
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


_NOT_AN_ENTRY = "entry is not an array of a binary body and a timeout or nil"


def _entries(v: object, high: int, what: str) -> tuple[WireEntry, ...]:
    """Check a list of wire entries; return it as decoded (nothing is rebuilt)."""
    entries = _array(v, high, what)
    bodies: list[bytes] = []
    keep = bodies.append
    try:
        for e in entries:
            # Exact types (a bool is no timeout); once per entry a standby receives.
            if type(e) is not tuple or len(e) != 2:
                raise _bad(_NOT_AN_ENTRY)
            body, timeout = e
            if type(body) is not bytes or (timeout is not None and type(timeout) is not int):
                raise _bad(_NOT_AN_ENTRY)
            if timeout is not None and not 0 <= timeout <= _U32:
                raise _bad(f"entry timeout is not in 0..{_U32}")
            keep(body)
    except WireDecodeError:
        # The first bad entry is reported, as if each body had been checked in turn.
        _check_bodies(bodies)
        raise
    # The bodies all at once: those of one shape by byte column (R.check_bodies).
    _check_bodies(bodies)
    return entries


def _check_bodies(bodies: list[bytes]) -> None:
    try:
        R.check_bodies(bodies)
    except (ValueError, struct.error) as exc:
        raise _bad(f"entry body: {exc}") from None


def _keys(v: object, high: int, what: str) -> tuple[bytes, ...]:
    keys = _array(v, high, what)
    for k in keys:
        size = _KEY_SIZE.get(k[0]) if type(k) is bytes and k else None
        if size is None or len(k) != size:
            raise _bad("key is not a packed key of an AF_INET or AF_INET6 entry")
    return keys


_KEY_SIZE = {f: R.key_size(f) for f in (AF_INET, AF_INET6)}


def _arity(m: tuple[Any, ...], n: int, name: str) -> None:
    if len(m) != n:
        raise _bad(f"{name} has {len(m)} fields, not {n}")


def _head(m: tuple[Any, ...]) -> tuple[int, int]:
    return _uint(m[1], _U64, "stream"), _uint(m[2], _U64, "seq")


def _decode_changes(m: tuple[Any, ...]) -> Changes:
    _arity(m, 6, "CHANGES")
    stream, seq = _head(m)
    ups = _entries(m[3], MAX_ITEMS, "upserts")
    dels = _keys(m[4], MAX_ITEMS - len(ups), "deletes")
    return Changes(stream, seq, ups, dels, _uint(m[5], _U64, "sent"))


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
        entries = _entries(rec[2], budget, "bucket entries")
        budget -= len(entries)
        records.append(
            BucketRecord(bucket, bool(flags & FLAG_FIRST), bool(flags & FLAG_LAST), entries)
        )
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
