"""Compact records: one immutable ``bytes`` per entry in every long-lived table (pure).

An :class:`~replicator.model.Entry` as Python objects costs about 750 bytes (a named
tuple, two tuple objects, four address ``bytes``, a ``TcpInfo``, ints). The tables
that hold the whole conntrack table (the internal cache, the sync session's local
table, the external cache) store instead one ``bytes`` *record* per entry, keyed by
one ``bytes`` *key*, about 100 + 50 bytes for an IPv4 TCP entry. ``Entry`` remains the
type at the boundaries (ctnetlink, the wire, the injector, the control socket):
records are unpacked on demand. ``bytes`` are not tracked by the cyclic garbage
collector, nor is a dict that holds only ``bytes``, so a large table no longer makes
the collector walk millions of objects (generation-1 collections of 170-190 ms were
measured with entries as tuples, ``docs/performance.md``).

Layout
------
A record is a fixed-size *header* followed by the *body*::

    header  >ddIIB   deadline, told, timeout, id, flags (bit 0: timeout, bit 1: id)
    body    >BH      family, zone
            tuple    the original tuple (the body starts with the key)
            >BI      flags (_MARK, _LABELS, _TCP, _SCTP, _HELPER, _MASTER, _REPLY), status
            tuple    the reply tuple, unless it is the plain inverse of the original
            >I       mark        (if _MARK)
            16s      labels      (if _LABELS)
            >5B      tcp info    (if _TCP)
            >BII     sctp info   (if _SCTP)
            B + str  helper      (if _HELPER: length, then ASCII)
            tuple    master      (if _MASTER)

where a *tuple* is ``src, dst`` (4 or 16 bytes, by family) then ``>BHHBBH`` (proto,
sport, dport, icmp type, icmp code, icmp id). The header holds what changes without
the entry's state changing (the timing and the kernel's id): ``deadline`` is the
absolute time on this node's monotonic clock at which the entry runs out
(observation time + timeout; ``inf`` without a timeout), ``told`` the deadline the
peer was last told (sync session bookkeeping, ``-inf``: never; a NEW event's record
starts with its own deadline there, see :func:`new_event_record`), ``timeout`` the
timeout as observed (or as received). The body is every field the digests cover and
nothing else, so two records describe the same state exactly when their bodies are
equal, and the fingerprint of an entry is a hash of its body
(:func:`fingerprint`). The body is the same on every host (explicit byte order), which
the digest comparison between nodes requires.

The *key* of a record is the first bytes of its body: family, zone and original tuple
(:func:`key_of`), i.e. :attr:`Entry.key` packed.
"""

from __future__ import annotations

import functools
import math
import operator
import struct
from collections.abc import Callable, Sequence
from hashlib import blake2b
from typing import Any, NamedTuple

from . import bytecols
from .model import (
    AF_INET,
    AF_INET6,
    ICMP_PROTOCOLS,
    CtTuple,
    Entry,
    EntryKey,
    SctpInfo,
    TcpInfo,
    invert,
)

#: Timing and id, in front of the body (never leaves this process; big endian like the
#: body, so that one struct reads the header and the fixed start of the body).
HEADER = struct.Struct(">ddIIB")
HEADER_SIZE = HEADER.size
_HAS_TIMEOUT = 1
_HAS_ID = 2
_DEADLINE = struct.Struct(">d")
_TWO = struct.Struct(">dd")
_TIMEOUT = struct.Struct(">I")
_HEADER_PACK = HEADER.pack

_MARK, _LABELS, _TCP, _SCTP, _HELPER, _MASTER, _REPLY = (1 << i for i in range(7))
_FZ = struct.Struct(">BH")
_FLAGS_STATUS = struct.Struct(">BI")
_PORTS = "BHHBBH"
_TUPLE = {AF_INET: struct.Struct(">4s4s" + _PORTS), AF_INET6: struct.Struct(">16s16s" + _PORTS)}
_KEY = {f: struct.Struct(">BH" + t.format[1:]) for f, t in _TUPLE.items()}
#: Header, family, zone, original tuple, flags and status: the fixed start of a record.
_FIXED = {f: struct.Struct(HEADER.format + k.format[1:] + "BI") for f, k in _KEY.items()}
_ALEN = {AF_INET: 4, AF_INET6: 16}
_U32 = struct.Struct(">I")
_TCP_S = struct.Struct(">5B")
_SCTP_S = struct.Struct(">BII")
LABELS_SIZE = 16
#: Bytes of the digest fingerprint (the digests' width).
FINGERPRINT_SIZE = 8

_INF = math.inf
_new = tuple.__new__


def _tuple_struct(family: int) -> struct.Struct:
    t = _TUPLE.get(family)
    if t is None:
        raise ValueError(f"family {family} is neither AF_INET nor AF_INET6")
    return t


def pack_key(key: EntryKey) -> bytes:
    """The packed form of ``(family, zone, orig)``: what every table is keyed by."""
    family, zone, orig = key
    ks = _KEY.get(family)
    if ks is None:
        raise ValueError(f"family {family} is neither AF_INET nor AF_INET6")
    alen = _ALEN[family]
    if len(orig[0]) != alen or len(orig[1]) != alen:
        raise ValueError(f"tuple addresses are not {alen} bytes")
    try:
        return ks.pack(family, zone, *orig)
    except struct.error as exc:
        raise ValueError(f"key field out of range: {exc}") from None


def key(entry: Entry) -> bytes:
    """The packed key of ``entry`` (:func:`pack_key` of :attr:`Entry.key`)."""
    return pack_key((entry[0], entry[3], entry[1]))


def unpack_key(packed: bytes) -> EntryKey:
    """Inverse of :func:`pack_key`."""
    family, zone = _FZ.unpack_from(packed)
    return (family, zone, _new(CtTuple, _tuple_struct(family).unpack_from(packed, 3)))


def key_size(family: int) -> int:
    """Length of a packed key of ``family``."""
    return 3 + _tuple_struct(family).size


def pack(entry: Entry, deadline: float, told: float = -_INF, key: bytes | None = None
         ) -> bytes:
    """The record of ``entry`` with the given timing (see the module doc); ``key``: its
    packed key, if the caller has it already (without it, packing is about as fast:
    :func:`key_of` of the record then gives the key).

    Raises ValueError for an entry no kernel or peer could have produced (a field out
    of its range, an address of the wrong length, an unknown family): callers pass
    entries that were validated when they were decoded.
    """
    family, orig, reply, zone, status, timeout, mark, labels, tcp, sctp, helper, master, cid = (
        entry
    )
    alen = _ALEN.get(family)
    if alen is None:
        raise ValueError(f"family {family} is neither AF_INET nor AF_INET6")
    # One struct.pack of every field (the struct is chosen by the layout) costs a third
    # of packing the parts one by one; it also checks every integer's range.
    args: list[object] = [
        deadline, told, 0 if timeout is None else timeout, 0 if cid is None else cid,
        (timeout is not None) | (cid is not None) << 1,
    ]  # fmt: skip
    if key is None:
        if len(orig[0]) != alen or len(orig[1]) != alen:
            raise ValueError(f"tuple addresses are not {alen} bytes")
        args += (family, zone, *orig)
    else:
        args.append(key)
    flags_at = len(args)
    args += (0, status)
    if _is_inverse(orig, reply):
        flags = _REPLY
    else:
        flags = 0
        if len(reply[0]) != alen or len(reply[1]) != alen:
            raise ValueError(f"tuple addresses are not {alen} bytes")
        args += reply
    if mark is not None:
        flags |= _MARK
        args.append(mark)
    if labels is not None:
        if len(labels) != LABELS_SIZE:
            raise ValueError(f"labels are not {LABELS_SIZE} bytes")
        flags |= _LABELS
        args.append(labels)
    if tcp is not None:
        flags |= _TCP
        args += tcp
    if sctp is not None:
        flags |= _SCTP
        args += sctp
    hlen = 0
    if helper is not None:
        try:
            name = helper.encode("ascii")
        except UnicodeEncodeError:
            raise ValueError("helper name is not ASCII") from None
        hlen = len(name)
        if not 1 <= hlen <= 255:
            raise ValueError("helper name is not 1..255 characters")
        flags |= _HELPER
        args += (hlen, name)
    if master is not None:
        if len(master[0]) != alen or len(master[1]) != alen:
            raise ValueError(f"tuple addresses are not {alen} bytes")
        flags |= _MASTER
        args += master
    args[flags_at] = flags
    layout = (family, flags, hlen, key is None)
    st = _LAYOUTS.get(layout)
    if st is None:
        st = _LAYOUTS[layout] = _layout(family, flags, hlen, key is None)
    try:
        return st.pack(*args)
    except struct.error as exc:
        raise ValueError(f"entry field out of range: {exc}") from None


#: Record structs by (family, flags, helper length, key as fields): at most
#: 2 * 128 * 256 * 2 of them.
_LAYOUTS: dict[tuple[int, int, int, bool], struct.Struct] = {}

#: Body flags and header flags (see the module doc), for decoders that pack records
#: themselves (:func:`replicator.ctnetlink.decode_events_records`).
F_MARK, F_LABELS, F_TCP, F_SCTP, F_HELPER, F_MASTER, F_REPLY = (
    _MARK, _LABELS, _TCP, _SCTP, _HELPER, _MASTER, _REPLY)
H_TIMEOUT, H_ID = _HAS_TIMEOUT, _HAS_ID


def record_struct(family: int, flags: int, hlen: int) -> struct.Struct:
    """The struct of a whole record of ``family``, body ``flags`` and helper name
    length: the header's five fields, then every field of the body in order (the key's
    as fields, the helper as its length and its bytes)."""
    layout = (family, flags, hlen, True)
    st = _LAYOUTS.get(layout)
    if st is None:
        st = _LAYOUTS[layout] = _layout(family, flags, hlen, True)
    return st


def _layout(family: int, flags: int, hlen: int, key_fields: bool) -> struct.Struct:
    """The struct of a whole record of this family, body flags and helper length, with
    the key as its fields (``key_fields``) or as one packed ``bytes``."""
    tup = _TUPLE[family].format[1:]
    key = _KEY[family].format[1:] if key_fields else f"{key_size(family)}s"
    fmt = [HEADER.format, key, _FLAGS_STATUS.format[1:]]
    if not flags & _REPLY:
        fmt.append(tup)
    for bit, part in ((_MARK, "I"), (_LABELS, f"{LABELS_SIZE}s"), (_TCP, "5B"),
                      (_SCTP, "BII")):  # fmt: skip
        if flags & bit:
            fmt.append(part)
    if flags & _HELPER:
        fmt.append(f"B{hlen}s")
    if flags & _MASTER:
        fmt.append(tup)
    return struct.Struct("".join(fmt))


def _is_inverse(orig: CtTuple, reply: CtTuple) -> bool:
    """``reply == invert(orig)``, without building the inverse for the usual case."""
    p = orig[2]
    if p in ICMP_PROTOCOLS:
        return reply == invert(orig)
    return (
        reply[0] == orig[1] and reply[1] == orig[0] and reply[2] == p
        and reply[3] == orig[4] and reply[4] == orig[3]
        and not (reply[5] or reply[6] or reply[7])
    )  # fmt: skip


#: Longest helper name a body from the network may hold (the kernel's
#: ``NF_CT_HELPER_NAME_LEN`` is 16 with the terminating NUL).
MAX_HELPER = 16
_BODY_FLAGS = _MARK | _LABELS | _TCP | _SCTP | _HELPER | _MASTER | _REPLY
#: Where a body's flags are, by family (:data:`FLAGS_AT` counts from the record's start).
_BODY_FLAGS_AT = {f: s.size - _FLAGS_STATUS.size - HEADER_SIZE for f, s in _FIXED.items()}
#: Indexes in a body's unpacked values: protocol and ports of the original tuple, and
#: the first field after the status.
_B_PROTO, _B_SPORT, _B_DPORT, _B_REST = 4, 5, 6, 12


class _BodyLayout(NamedTuple):
    read: Callable[[bytes], tuple[Any, ...]]
    #: Index of the reply tuple (None: the body holds none, it is the inverse).
    reply: int | None
    #: Index of the helper's length byte (None: no helper), and the length it must be.
    helper: int | None
    hlen: int
    #: ``(offset, size)`` of each value ``read`` returns, in the body.
    items: tuple[tuple[int, int], ...]


#: Valid body layouts by (family, flags, size): at most 2 * 128 * (MAX_HELPER + 1).
_BODY_LAYOUTS: dict[tuple[int, int, int], _BodyLayout] = {}


def _body_layout(family: int, flags: int, size: int) -> _BodyLayout:
    """The layout of a body of this family, flags and size, or ValueError if no
    record has one."""
    if flags & ~_BODY_FLAGS:
        raise ValueError(f"unknown body flags {flags:#x}")
    full = _layout(family, flags, 0, True)
    base = full.size - HEADER_SIZE
    hlen, helper = 0, None
    if flags & _HELPER:
        hlen = size - base
        if not 1 <= hlen <= MAX_HELPER:
            raise ValueError(f"body of {size} bytes: no helper name of 1..{MAX_HELPER}")
        full = _layout(family, flags, hlen, True)
    elif size != base:
        raise ValueError(f"body of {size} bytes, not {base} for its flags")
    fmt = ">" + full.format[len(HEADER.format) :]
    n = len(struct.unpack(fmt, bytes(size)))
    reply = None if flags & _REPLY else _B_REST
    if flags & _HELPER:
        helper = n - 2 - (8 if flags & _MASTER else 0)
    items = tuple((off, width) for off, width, _code in bytecols.struct_items(fmt))
    return _BodyLayout(struct.Struct(fmt).unpack, reply, helper, hlen, items)


#: Fewest bodies of one shape that check_bodies checks by column.
_MIN_COLUMNS = 16
_ICMP_BYTES = bytecols.table(ICMP_PROTOCOLS.__contains__)


def check_bodies(bodies: Sequence[bytes]) -> None:
    """:func:`check_body` of each body in order: ValueError for the first that is not
    valid.

    A standby checks every body it receives, 0.8 µs each one by one. The bodies of one
    shape (family, flags, size), as most of a burst's are, are checked together here,
    a byte column at a time (0.1-0.2 µs per body); what a column check cannot tell
    (a few bodies of a shape, helpers, ICMP, any doubt) is checked body by body.
    """
    if len(bodies) < _MIN_COLUMNS:
        for body in bodies:
            check_body(body)
        return
    # Grouped in the loop that reads each shape (bytecols.groups after a function call
    # per body costs 0.1 µs per body more).
    groups: dict[tuple[int, int, int] | None, list[int]] = {}
    flags_at = _BODY_FLAGS_AT
    for i, body in enumerate(bodies):
        size = len(body)
        at = flags_at.get(body[0]) if size else None
        shape = (body[0], body[at], size) if at is not None and size > at else None
        group = groups.get(shape)
        if group is None:
            groups[shape] = [i]
        else:
            group.append(i)
    one_by_one: list[int] = []
    for shape, members in groups.items():
        if (shape is None or len(members) < _MIN_COLUMNS
                or not _valid_by_column(shape, [bodies[i] for i in members])):
            one_by_one += members
    for i in sorted(one_by_one):
        check_body(bodies[i])


def _valid_by_column(shape: tuple[int, int, int], bodies: list[bytes]) -> bool:
    """Whether every body of ``shape`` (as :func:`check_bodies` found them) is valid,
    as far as the columns tell (False: check them one by one)."""
    layout = _BODY_LAYOUTS.get(shape)
    if layout is None:
        try:
            layout = _BODY_LAYOUTS[shape] = _body_layout(*shape)
        except ValueError:
            return False
    if layout.helper is not None:
        return False
    r = layout.reply
    if r is None:
        # Every field is read with its width: a body of the layout's size is valid.
        return True
    joined, size, k = b"".join(bodies), shape[2], len(bodies)
    items = layout.items
    proto, reply_proto = items[_B_PROTO][0], items[r + 2][0]
    column = joined[proto::size]
    if column != joined[reply_proto::size] or column.translate(_ICMP_BYTES).count(1):
        return False
    # Not the plain inverse: something differs in each body (see check_body).
    pairs = [(items[r + a][0] + i, items[o][0] + i)
             for a, o in ((0, 3), (1, 2), (3, _B_DPORT), (4, _B_SPORT))
             for i in range(items[o][1])]
    zeros = [(items[r + z][0] + i, 0) for z in (5, 6, 7) for i in range(items[r + z][1])]
    differs = bytecols.differ(joined, size, k, pairs) | bytecols.unlike(joined, size, k, zeros)
    return differs == int.from_bytes(b"\x01" * k)


def check_body(body: bytes) -> None:
    """Raise ValueError unless ``body`` is the body of a record :func:`pack` could
    have made (the receiver of a peer's entries stores the bodies it accepts as they
    are, so this is the whole validation of an entry from the network).

    Every field is read with its width (so in its range); the flags are known, the
    size is exactly that of the layout they give, a helper name is ASCII of
    1..:data:`MAX_HELPER` characters, and a reply tuple, when there is one, has the
    original's protocol and is not its plain inverse (which the flags would say: two
    bodies of one state would fingerprint differently).
    """
    size = len(body)
    family = body[0] if size else 0
    at = _BODY_FLAGS_AT.get(family)
    if at is None:
        raise ValueError(f"body family {family} is neither AF_INET nor AF_INET6")
    if size <= at:
        raise ValueError(f"body of {size} bytes is shorter than its fixed part")
    shape = (family, body[at], size)
    layout = _BODY_LAYOUTS.get(shape)
    if layout is None:
        layout = _BODY_LAYOUTS[shape] = _body_layout(*shape)
    v = layout.read(body)
    r = layout.reply
    if r is not None:
        reply, p = v[r : r + 8], v[_B_PROTO]
        if reply[2] != p:
            raise ValueError("reply tuple protocol differs from the original's")
        if (
            reply == tuple(invert(_new(CtTuple, v[2:10]))) if p in ICMP_PROTOCOLS
            else reply == (v[3], v[2], p, v[_B_DPORT], v[_B_SPORT], 0, 0, 0)
        ):  # fmt: skip
            raise ValueError("reply tuple is the plain inverse, which the flags say")
    h = layout.helper
    if h is not None and (v[h] != layout.hlen or not v[h + 1].isascii()):
        raise ValueError("helper name is not ASCII of its stated length")


def from_body(body: bytes, timeout: int | None, since: float) -> bytes:
    """The record of a received (checked) ``body``: ``timeout`` as received, the time
    left at ``since`` on this node's clock (the deadline is ``since + timeout``); no
    id, never told."""
    return _received_header(timeout, since) + body


def _received_header(timeout: int | None, since: float) -> bytes:
    """The header :func:`from_body` gives a body received with ``timeout`` at ``since``."""
    if timeout is None:
        return _HEADER_PACK(_INF, -_INF, 0, 0, 0)
    return _HEADER_PACK(since + timeout, -_INF, timeout, 0, _HAS_TIMEOUT)


def from_bodies(entries: Sequence[tuple[bytes, int | None]], since: float) -> list[bytes]:
    """:func:`from_body` of each ``(body, timeout)`` (one header packed per distinct
    timeout: a burst's entries share a few)."""
    headers: dict[int | None, bytes] = {}
    out: list[bytes] = []
    keep = out.append
    for body, timeout in entries:
        header = headers.get(timeout)
        if header is None:
            header = headers[timeout] = _received_header(timeout, since)
        keep(header + body)
    return out


#: :func:`unpack`'s default ``timeout``: the one in the record's header.
HEADER_TIMEOUT = -1


def unpack(record: bytes, timeout: int | None = HEADER_TIMEOUT, tcp_flags: int = 0) -> Entry:
    """The entry a record holds (``timeout`` and ``id`` from its header).

    ``timeout``: put this one instead (a commit writes the time left, not the timeout
    observed); ``tcp_flags``: set these flags in both directions' TCP flags. Both save
    building the entry twice where a whole table is unpacked at once (a takeover).
    """
    family = record[HEADER_SIZE]
    fixed = _FIXED[family]
    v = fixed.unpack_from(record)
    hflags, zone, flags, status = v[4], v[6], v[15], v[16]
    orig = _new(CtTuple, v[7:15])
    t = _TUPLE[family]
    tsize = t.size
    pos = fixed.size
    if flags & _REPLY:
        p = orig[2]
        reply = (
            invert(orig) if p in ICMP_PROTOCOLS
            else _new(CtTuple, (orig[1], orig[0], p, orig[4], orig[3], 0, 0, 0))
        )  # fmt: skip
    else:
        reply = _new(CtTuple, t.unpack_from(record, pos))
        pos += tsize
    mark = labels = tcp = sctp = helper = master = None
    if flags & _MARK:
        (mark,) = _U32.unpack_from(record, pos)
        pos += 4
    if flags & _LABELS:
        labels = record[pos : pos + LABELS_SIZE]
        pos += LABELS_SIZE
    if flags & _TCP:
        if tcp_flags:
            st, wo, wr, fo, fr = _TCP_S.unpack_from(record, pos)
            tcp = _new(TcpInfo, (st, wo, wr, fo | tcp_flags, fr | tcp_flags))
        else:
            tcp = _new(TcpInfo, _TCP_S.unpack_from(record, pos))
        pos += 5
    if flags & _SCTP:
        sctp = _new(SctpInfo, _SCTP_S.unpack_from(record, pos))
        pos += 9
    if flags & _HELPER:
        n = record[pos]
        helper = record[pos + 1 : pos + 1 + n].decode("ascii")
        pos += 1 + n
    if flags & _MASTER:
        master = _new(CtTuple, t.unpack_from(record, pos))
    if timeout == HEADER_TIMEOUT:
        timeout = v[2] if hflags & _HAS_TIMEOUT else None
    return _new(Entry, (
        family, orig, reply, zone, status, timeout, mark, labels, tcp, sctp, helper, master,
        v[3] if hflags & _HAS_ID else None,
    ))  # fmt: skip


_USUAL_FLAGS = _REPLY | _MARK | _TCP
_USUAL_PROTOCOLS = frozenset({6, 17})  # TCP, UDP: ctnetlink.FAST_CREATE_PROTOCOLS

#: Where a record's body flags are, by family (the last field but one of its fixed start).
FLAGS_AT = {f: s.size - _FLAGS_STATUS.size for f, s in _FIXED.items()}
#: Indexes in what a :class:`UsualLayout` reads: the deadline, zone, original tuple's
#: src, dst, proto, sport and dport, and the status (the record's fixed start).
U_DEADLINE, U_ZONE, U_SRC, U_DST, U_PROTO, U_SPORT, U_DPORT, U_STATUS = 0, 6, 7, 8, 9, 10, 11, 16


class UsualLayout(NamedTuple):
    """How to read every field of a record of one usual shape in one unpack (see
    :func:`usual_layout`)."""

    #: ``struct.unpack_from`` of the whole record: its header, then the body's fields in
    #: order (indexes :data:`U_DEADLINE` ...).
    read: Callable[[bytes], tuple[Any, ...]]
    #: Index of the reply tuple's src (then dst, proto, sport, dport), ``None`` when the
    #: record holds none (the reply is the plain inverse of the original tuple).
    reply: int | None
    #: Index of the mark.
    mark: int
    #: Index of the TCP info's state (then both window scales and both flags), ``None``
    #: without TCP info.
    tcp: int | None


def usual_shape(record: bytes) -> int:
    """The shape of ``record`` for :func:`usual_layout`: family and body flags."""
    family = record[HEADER_SIZE]
    return family << 8 | record[FLAGS_AT[family]]


@functools.cache
def usual_layout(shape: int) -> UsualLayout | None:
    """How to read records of ``shape`` (:func:`usual_shape`), or ``None`` unless they
    hold the usual kind of entry: a mark, maybe TCP info, no labels, SCTP info, helper
    or master. (The caller still checks the values: zone 0, TCP or UDP.)

    A takeover's commit builds its requests from this, never building an
    :class:`Entry` (which costs about as much as building the request).
    """
    found = usual_format(shape)
    if found is None:
        return None
    fmt, reply, mark, tcp = found
    return UsualLayout(struct.Struct(fmt).unpack_from, reply, mark, tcp)


@functools.cache
def usual_format(shape: int) -> tuple[str, int | None, int, int | None] | None:
    """The ``struct`` format of every record of ``shape`` (:func:`usual_shape`; big
    endian, fixed size: header, then the body's fields), with the indexes of
    :class:`UsualLayout` (reply, mark, TCP info), or ``None`` unless the shape is a
    usual one (see :func:`usual_layout`)."""
    family, flags = shape >> 8, shape & 0xFF
    fixed = _FIXED.get(family)
    if fixed is None or flags & ~_USUAL_FLAGS or not flags & _MARK:
        return None
    fmt, n = fixed.format, len(fixed.unpack(bytes(fixed.size)))
    reply = None
    if not flags & _REPLY:
        t = _TUPLE[family]
        fmt += t.format[1:]
        reply, n = n, n + len(t.unpack(bytes(t.size)))
    mark, n, fmt = n, n + 1, fmt + _U32.format[1:]
    tcp = None
    if flags & _TCP:
        tcp, fmt = n, fmt + _TCP_S.format[1:]
    return fmt, reply, mark, tcp


def one_shape(records: Sequence[bytes]) -> tuple[int, bytes] | None:
    """The shape (:func:`usual_shape`) of every one of ``records`` and the records
    joined, if they all have one size and one shape (a burst of one kind of
    connection, read by byte column: :mod:`replicator.bytecols`), else None."""
    if not records:
        return None
    first, h = records[0], HEADER_SIZE
    size, k = len(first), len(records)
    if size <= h or first[h] not in FLAGS_AT or set(map(len, records)) != {size}:
        return None
    family, at = first[h], FLAGS_AT[first[h]]
    if at >= size:
        return None
    joined = b"".join(records)
    if joined[h::size].count(family) != k or joined[at::size].count(first[at]) != k:
        return None
    return family << 8 | first[at], joined


def is_usual(record: bytes) -> bool:
    """Whether ``record`` holds the usual kind of entry (see :func:`usual_layout`):
    also zone 0 and TCP or UDP."""
    layout = usual_layout(usual_shape(record))
    if layout is None:
        return False
    v = layout.read(record)
    return not v[U_ZONE] and v[U_PROTO] in _USUAL_PROTOCOLS


@functools.cache
def shape_filter_offsets(shape: int) -> tuple[int, int, int, int, int | None, int | None]:
    """Where what a replication filter reads (:mod:`replicator.filters`) is in every
    record of ``shape`` (:func:`usual_shape`), so that it needs no unpacking: the
    address length, then the offsets of the protocol (one byte), the original source,
    the reply source, the mark (four bytes big endian, None: no mark) and the TCP state
    (one byte, None: no TCP info). The zone is at :data:`ZONE_AT`."""
    family, flags = shape >> 8, shape & 0xFF
    alen, tsize, h = _ALEN[family], _TUPLE[family].size, HEADER_SIZE
    pos = h + 3 + tsize + _FLAGS_STATUS.size
    if flags & _REPLY:
        rsrc = h + 3 + alen  # the reply's source is the original's destination
    else:
        rsrc, pos = pos, pos + tsize
    mark = None
    if flags & _MARK:
        mark, pos = pos, pos + 4
    if flags & _LABELS:
        pos += LABELS_SIZE
    return alen, h + 3 + 2 * alen, h + 3, rsrc, mark, pos if flags & _TCP else None


#: Where a record's zone is (two bytes, big endian).
ZONE_AT = HEADER_SIZE + 1


def key_of(record: bytes) -> bytes:
    """The packed key of the entry in ``record``."""
    start = HEADER_SIZE
    return record[start : start + 3 + _TUPLE[record[start]].size]


def keys_of(records: Sequence[bytes]) -> list[bytes]:
    """:func:`key_of` of each record (one slice each when they are of one family, as
    a burst's are)."""
    families = set(map(operator.itemgetter(HEADER_SIZE), records))
    if len(families) != 1:
        return list(map(key_of, records))
    start = HEADER_SIZE
    (family,) = families
    return list(map(operator.itemgetter(slice(start, start + 3 + _TUPLE[family].size)),
                    records))


def body(record: bytes) -> bytes:
    """The replicated state of ``record``: everything but its header."""
    return record[HEADER_SIZE:]


def fingerprint(record: bytes) -> int:
    """64-bit fingerprint of the replicated state (unkeyed BLAKE2b of the body)."""
    digest = blake2b(memoryview(record)[HEADER_SIZE:], digest_size=FINGERPRINT_SIZE).digest()
    return int.from_bytes(digest, "big")


def same_state(a: bytes, b: bytes) -> bool:
    """Whether two records hold the same replicated state (timing and id aside)."""
    return a[HEADER_SIZE:] == b[HEADER_SIZE:]


def deadline(record: bytes) -> float:
    """When the entry runs out on this node's clock (``inf``: it has no timeout)."""
    value: float = _DEADLINE.unpack_from(record)[0]
    return value


def timing(record: bytes) -> tuple[float, float]:
    """``(deadline, told)`` of a record."""
    return _TWO.unpack_from(record)


def timeout(record: bytes) -> int | None:
    """The timeout as observed or received (None: the entry has none)."""
    if record[HEADER_SIZE - 1] & _HAS_TIMEOUT:
        value: int = _TIMEOUT.unpack_from(record, 16)[0]
        return value
    return None


def with_told(record: bytes, told: float) -> bytes:
    """``record`` with its ``told`` replaced."""
    return record[:8] + _DEADLINE.pack(told) + record[16:]


def with_deadline(record: bytes, deadline: float) -> bytes:
    """``record`` with its ``deadline`` replaced."""
    return _DEADLINE.pack(deadline) + record[8:]


def deadline_of(timeout: int | None, now: float) -> float:
    """The deadline of an entry observed at ``now`` with ``timeout`` seconds left."""
    return _INF if timeout is None else now + timeout


def new_event_record(entry: Entry, now: float) -> bytes:
    """The record of the entry of a NEW event read at ``now``, as the event reader
    makes it (:func:`replicator.ctnetlink.decode_events_records`): deadline ``now``
    plus its timeout, and ``told`` the same.

    Why ``told`` is not ``-inf`` (never): the sync session sends a new entry with its
    whole timeout, so the peer will be told this deadline, to within the rounding up
    to whole seconds and the time the entry waits to be sent. The session takes a
    ``told`` within that margin as current and leaves the record alone, so the first
    send of each entry of a burst does not make a new record (one per entry, shared
    with the internal cache).
    """
    deadline = deadline_of(entry.timeout, now)
    return pack(entry, deadline, deadline)
