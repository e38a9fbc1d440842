"""Fast, pure ctnetlink codec: kernel conntrack messages <-> :mod:`replicator.model`.

Decoding runs once per kernel event and once per dumped entry, so each message layout
the kernel uses is walked once and then replayed with precompiled :class:`struct.Struct`
objects (see "decoding" below; pyroute2's generic decoder is ~100x slower and serves as
the test oracle instead). Encoding follows
the kernel rules measured in ``shared/notes/ctnetlink.md`` ("Writing the table"):

* create: ``NLM_F_REQUEST|CREATE|EXCL``, the original tuple, the *plain inverse* of it as
  reply tuple, and ``CTA_NAT_SRC``/``CTA_NAT_DST`` derived from the real reply tuple, so
  the kernel rebuilds the translated reply itself and sets the NAT bits (a translated
  reply tuple without them is accepted but traffic stalls);
* update: no CREATE/EXCL, no reply tuple (the kernel looks the entry up by the original
  tuple and ignores the reply), and no NAT or master (``EOPNOTSUPP`` on an existing entry);
* delete: original tuple and zone.

Encoders take well-formed entries as :mod:`replicator.model` describes them: addresses
of 4 bytes (AF_INET) or 16 (AF_INET6) matching the family, 16 label bytes. Entries from
this decoder and from :mod:`replicator.wire` are checked to be so.

Attribute numbers are literals checked against pyroute2's ``nfct_msg`` by the unit tests.
Every decoder raises only :class:`~replicator.errors.NetlinkDecodeError` (or
:class:`~replicator.errors.KernelError` for an error report in a dump) on any input.
"""

from __future__ import annotations

import collections
import functools
import itertools
import math
import operator
import struct
from array import array
from collections.abc import Callable, Sequence
from typing import Any, Final, NamedTuple, Protocol, cast

from . import bytecols
from . import record as R
from .errors import KernelError, NetlinkDecodeError
from .model import (
    AF_INET,
    AF_INET6,
    ICMP_PROTOCOLS,
    IPPROTO_ICMPV6,
    IPPROTO_SCTP,
    IPPROTO_TCP,
    IPPROTO_UDP,
    PORT_PROTOCOLS,
    CtEvent,
    CtTuple,
    Entry,
    EventKind,
    NewRecord,
    SctpInfo,
    Status,
    TcpFlag,
    TcpInfo,
    dnat_target,
    invert,
    snat_target,
)
from .netlink import (
    NFNL_HDRLEN,
    NFNL_SUBSYS_CTNETLINK,
    NLA_F_NESTED,
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_DUMP,
    NLM_F_EXCL,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    NLMSG_HDR,
    NLMSG_HDRLEN,
    Message,
    done_code,
    error_code,
    iter_attrs,
    iter_messages,
)

# --- message types (enum cntl_msg_types) --------------------------------------------
IPCTNL_MSG_CT_NEW: Final = 0
IPCTNL_MSG_CT_GET: Final = 1
IPCTNL_MSG_CT_DELETE: Final = 2
#: Full nlmsg_type values (subsystem in the high byte).
CT_NEW: Final = NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_NEW
CT_GET: Final = NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_GET
CT_DELETE: Final = NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_DELETE

# --- enum ctattr_type ---------------------------------------------------------------
CTA_TUPLE_ORIG: Final = 1
CTA_TUPLE_REPLY: Final = 2
CTA_STATUS: Final = 3
CTA_PROTOINFO: Final = 4
CTA_HELP: Final = 5
CTA_NAT_SRC: Final = 6
CTA_TIMEOUT: Final = 7
CTA_MARK: Final = 8
CTA_ID: Final = 12
CTA_NAT_DST: Final = 13
CTA_TUPLE_MASTER: Final = 14
CTA_ZONE: Final = 18
CTA_LABELS: Final = 22
CTA_LABELS_MASK: Final = 23

# enum ctattr_tuple / ctattr_ip / ctattr_l4proto
CTA_TUPLE_IP: Final = 1
CTA_TUPLE_PROTO: Final = 2
CTA_IP_V4_SRC: Final = 1
CTA_IP_V4_DST: Final = 2
CTA_IP_V6_SRC: Final = 3
CTA_IP_V6_DST: Final = 4
CTA_PROTO_NUM: Final = 1
CTA_PROTO_SRC_PORT: Final = 2
CTA_PROTO_DST_PORT: Final = 3
CTA_PROTO_ICMP_ID: Final = 4
CTA_PROTO_ICMP_TYPE: Final = 5
CTA_PROTO_ICMP_CODE: Final = 6
CTA_PROTO_ICMPV6_ID: Final = 7
CTA_PROTO_ICMPV6_TYPE: Final = 8
CTA_PROTO_ICMPV6_CODE: Final = 9

# enum ctattr_protoinfo / _tcp / _sctp
CTA_PROTOINFO_TCP: Final = 1
CTA_PROTOINFO_SCTP: Final = 3
CTA_PROTOINFO_TCP_STATE: Final = 1
CTA_PROTOINFO_TCP_WSCALE_ORIGINAL: Final = 2
CTA_PROTOINFO_TCP_WSCALE_REPLY: Final = 3
CTA_PROTOINFO_TCP_FLAGS_ORIGINAL: Final = 4
CTA_PROTOINFO_TCP_FLAGS_REPLY: Final = 5
CTA_PROTOINFO_SCTP_STATE: Final = 1
CTA_PROTOINFO_SCTP_VTAG_ORIGINAL: Final = 2
CTA_PROTOINFO_SCTP_VTAG_REPLY: Final = 3

# enum ctattr_help / ctattr_nat / ctattr_protonat
CTA_HELP_NAME: Final = 1
CTA_NAT_V4_MINIP: Final = 1
CTA_NAT_V4_MAXIP: Final = 2
CTA_NAT_PROTO: Final = 3
CTA_NAT_V6_MINIP: Final = 4
CTA_NAT_V6_MAXIP: Final = 5
CTA_PROTONAT_PORT_MIN: Final = 1
CTA_PROTONAT_PORT_MAX: Final = 2

#: Longest helper name: the kernel's NF_CT_HELPER_NAME_LEN (16) includes the NUL.
HELPER_NAME_MAX: Final = 15

#: Status bits a writer may set (see :func:`settable_status`).
SETTABLE_STATUS: Final = int(Status.SEEN_REPLY | Status.ASSURED | Status.FIXED_TIMEOUT)

#: TCP flags that describe transient sequence tracking, which cannot be transferred:
#: restoring them makes the copy expect ACKs/edges it never saw (see ctnetlink.md).
TRANSIENT_TCP_FLAGS: Final = int(
    TcpFlag.MAXACK_SET | TcpFlag.DATA_UNACKNOWLEDGED | TcpFlag.CHALLENGE_ACK
)
_KEPT_TCP_FLAGS: Final = 0xFF & ~TRANSIENT_TCP_FLAGS
# Plain ints: IntFlag arithmetic costs microseconds on the encode path.
_CONFIRMED: Final = int(Status.CONFIRMED)
#: Set in the status of every entry created (see :func:`encode_create`).
CONFIRMED: Final = _CONFIRMED
#: The TCP flags a request carries (the others are transient: see :func:`clean_tcp_flags`).
KEPT_TCP_FLAGS: Final = _KEPT_TCP_FLAGS
_EXPECTED: Final = int(Status.EXPECTED)
_FIXED_TIMEOUT: Final = int(Status.FIXED_TIMEOUT)

_NLA = struct.Struct("=HH")
_nla = _NLA.unpack_from
_new = tuple.__new__
_NEW, _UPDATE, _DESTROY = EventKind.NEW, EventKind.UPDATE, EventKind.DESTROY
_ADDR_SIZE = {AF_INET: 4, AF_INET6: 16}
#: Address size by family.
ADDR_SIZE: Final = _ADDR_SIZE


def _bad(what: str, off: int) -> NetlinkDecodeError:
    return NetlinkDecodeError(f"malformed ctnetlink message: {what} at offset {off}")


# --- decoding -----------------------------------------------------------------------
# Decoding runs once per kernel event and 100 k times per dump, so a message is not
# walked attribute by attribute every time. The kernel lays out messages of one kind
# identically (same attributes in the same order, same lengths, NLA_F_NESTED on
# nests); only the values differ. The first message of each layout is walked once
# (_learn): that validates it and notes where each value lies, which is compiled into
# a _Layout:
#
# * ``mask`` covers every attribute header the walk visited, the nfgenmsg family, each
#   tuple's protocol number and the helper name: all the bytes that the walk's path,
#   its validity checks and the shape of the result depend on. A message of the same
#   length whose bytes under the mask are the same (``expected``) would be walked
#   identically, so it is decoded by
# * ``data``, a precompiled Struct that reads every value in one call (network byte
#   order); itemgetters then pick the values and the layout's constants into the
#   model's tuples.
#
# The mask is applied to the whole message read as one integer: three C calls, about
# half the cost of unpacking the ~30 headers of a typical message.
#
# So a layout only replays a walk that would have gone the same way: the cache changes
# speed, never results (tests/test_ctnetlink.py checks both against pyroute2). Layouts
# are keyed by message length and bounded in number (adversarial input only costs the
# walk it would have cost anyway, plus compiling).


class _Field(NamedTuple):
    """A value read from the message: struct ``code`` at ``off`` bytes from its start."""

    off: int
    code: str


class _Const(NamedTuple):
    """A value fixed by the layout."""

    value: object


_Slot = _Field | _Const
_ZERO: Final = _Const(0)
_NONE: Final = _Const(None)
_Getter = Callable[[tuple[object, ...]], tuple[Any, ...]]


class _Layout(NamedTuple):
    """A compiled message layout (see the comment above)."""

    #: The message (read as a little-endian integer) & mask == expected: a match.
    mask: int
    expected: int
    data: Callable[[bytes, int], tuple[object, ...]]
    #: Appended to what ``data`` reads; the getters index into the concatenation.
    consts: tuple[object, ...]
    orig: _Getter
    reply: _Getter
    master: _Getter | None
    tcp: _Getter | None
    sctp: _Getter | None
    #: (zone, status, timeout, mark, labels, id), absent mark as 0 / as None.
    full: _Getter
    partial: _Getter
    family: int
    helper: str | None
    #: The record of the full message (NEW event) of this layout at ``buf[start:]``
    #: read at a time ``now`` (see :func:`decode_events_records`); None where the
    #: layout's entries take the general path (ICMP).
    record: Callable[[bytes, int, float], bytes] | None
    #: How to build those records many at a time (:func:`decode_new_records`); None
    #: without ``record``.
    columns: _EventColumns | None


_LAYOUTS: dict[int, list[_Layout]] = {}
#: More distinct layouts than the kernel produces; beyond it the cache starts afresh.
_MAX_LAYOUTS: Final = 256


class _Walk:
    """Records what a walk over one message depended on (see the comment above)."""

    def __init__(self, start: int) -> None:
        self.start = start
        #: (offset from the message, size) of every byte range the walk depended on.
        self.checks: list[tuple[int, int]] = [(0, 1)]  # nfgenmsg family

    def attr(self, buf: bytes, off: int, end: int, what: str) -> tuple[int, int, int]:
        """The attribute header at ``off`` inside ``end``: (length, type, end)."""
        if end - off < 4:
            raise _bad(f"truncated {what}", off)
        alen, atype = _nla(buf, off)
        aend = off + alen
        if alen < 4 or aend > end:
            raise _bad(f"{what} length", off)
        self.checks.append((off - self.start, 4))
        return alen, atype & 0x3FFF, aend

    def fixed(self, off: int, size: int) -> None:
        """``size`` bytes at ``off`` that the layout depends on."""
        self.checks.append((off - self.start, size))

    def field(self, off: int, code: str) -> _Field:
        """A value at ``off``."""
        return _Field(off - self.start, code)


def _expect(length: int, wanted: int, what: str, off: int) -> None:
    if length != wanted:
        raise _bad(what, off)


def _learn_tuple(w: _Walk, buf: bytes, off: int, end: int, family: int) -> list[_Slot]:
    """Walk a CTA_TUPLE_* payload of a ``family`` message: the slots of its :class:`CtTuple`."""
    src = dst = None
    proto = -1
    sport: _Slot = _ZERO
    dport: _Slot = _ZERO
    itype: _Slot = _ZERO
    icode: _Slot = _ZERO
    iid: _Slot = _ZERO
    while off < end:
        alen, atype, aend = w.attr(buf, off, end, "tuple attribute")
        p = off + 4
        if atype == CTA_TUPLE_IP:
            while p < aend:
                blen, btype, _ = w.attr(buf, p, aend, "address attribute")
                if btype in (CTA_IP_V4_SRC, CTA_IP_V4_DST):
                    _expect(blen, 8, "IPv4 address length", p)
                elif btype in (CTA_IP_V6_SRC, CTA_IP_V6_DST):
                    _expect(blen, 20, "IPv6 address length", p)
                else:
                    p += (blen + 3) & ~3
                    continue
                if btype & 1:
                    src = w.field(p + 4, f"{blen - 4}s")
                else:
                    dst = w.field(p + 4, f"{blen - 4}s")
                p += (blen + 3) & ~3
        elif atype == CTA_TUPLE_PROTO:
            while p < aend:
                blen, btype, _ = w.attr(buf, p, aend, "protocol attribute")
                if btype == CTA_PROTO_NUM:
                    _expect(blen, 5, "protocol number length", p)
                    w.fixed(p + 4, 1)
                    proto = buf[p + 4]
                elif btype == CTA_PROTO_SRC_PORT:
                    _expect(blen, 6, "port length", p)
                    sport = w.field(p + 4, "H")
                elif btype == CTA_PROTO_DST_PORT:
                    _expect(blen, 6, "port length", p)
                    dport = w.field(p + 4, "H")
                elif btype in (CTA_PROTO_ICMP_ID, CTA_PROTO_ICMPV6_ID):
                    _expect(blen, 6, "ICMP id length", p)
                    iid = w.field(p + 4, "H")
                elif btype in (CTA_PROTO_ICMP_TYPE, CTA_PROTO_ICMPV6_TYPE):
                    _expect(blen, 5, "ICMP type length", p)
                    itype = w.field(p + 4, "B")
                elif btype in (CTA_PROTO_ICMP_CODE, CTA_PROTO_ICMPV6_CODE):
                    _expect(blen, 5, "ICMP code length", p)
                    icode = w.field(p + 4, "B")
                p += (blen + 3) & ~3
        off += (alen + 3) & ~3
    if src is None or dst is None or proto < 0:
        raise _bad("incomplete tuple", end)
    if src.code != dst.code:
        raise _bad("tuple mixes IPv4 and IPv6 addresses", end)
    # Every address must match the family: the encoder and the wire codec rely on it.
    if src.code != f"{_ADDR_SIZE.get(family)}s":
        raise _bad(f"addresses do not match family {family}", end)
    # Only ICMP tuples carry type/code/id, only port protocols carry ports: keep the
    # model canonical whatever extra attributes a message holds.
    if proto in ICMP_PROTOCOLS:
        return [src, dst, _Const(proto), _ZERO, _ZERO, itype, icode, iid]
    if proto in PORT_PROTOCOLS:
        return [src, dst, _Const(proto), sport, dport, _ZERO, _ZERO, _ZERO]
    return [src, dst, _Const(proto), _ZERO, _ZERO, _ZERO, _ZERO, _ZERO]


def _learn_protoinfo(w: _Walk, buf: bytes, off: int, end: int,
                     ) -> tuple[list[_Slot] | None, list[_Slot] | None]:
    """Walk a CTA_PROTOINFO payload: the slots of its TCP and SCTP info (DCCP ignored)."""
    tcp = sctp = None
    while off < end:
        alen, atype, aend = w.attr(buf, off, end, "protoinfo")
        p = off + 4
        if atype == CTA_PROTOINFO_TCP:
            state = None
            wscale: list[_Slot] = [_ZERO, _ZERO]
            flags: list[_Slot] = [_ZERO, _ZERO]
            while p < aend:
                blen, btype, _ = w.attr(buf, p, aend, "TCP protoinfo")
                if btype in (CTA_PROTOINFO_TCP_FLAGS_ORIGINAL, CTA_PROTOINFO_TCP_FLAGS_REPLY):
                    # struct nf_ct_tcp_flags {u8 flags; u8 mask;}: the kernel reports mask 0.
                    _expect(blen, 6, "TCP flags length", p)
                    flags[btype - CTA_PROTOINFO_TCP_FLAGS_ORIGINAL] = w.field(p + 4, "B")
                elif CTA_PROTOINFO_TCP_STATE <= btype <= CTA_PROTOINFO_TCP_WSCALE_REPLY:
                    _expect(blen, 5, "TCP protoinfo u8 length", p)
                    if btype == CTA_PROTOINFO_TCP_STATE:
                        state = w.field(p + 4, "B")
                    else:
                        wscale[btype - CTA_PROTOINFO_TCP_WSCALE_ORIGINAL] = w.field(p + 4, "B")
                p += (blen + 3) & ~3
            if state is None:
                raise _bad("TCP protoinfo without state", off)
            tcp = [state, *wscale, *flags]
        elif atype == CTA_PROTOINFO_SCTP:
            state = None
            vtags: list[_Slot] = [_ZERO, _ZERO]
            while p < aend:
                blen, btype, _ = w.attr(buf, p, aend, "SCTP protoinfo")
                if btype == CTA_PROTOINFO_SCTP_STATE:
                    _expect(blen, 5, "SCTP state length", p)
                    state = w.field(p + 4, "B")
                elif btype in (CTA_PROTOINFO_SCTP_VTAG_ORIGINAL, CTA_PROTOINFO_SCTP_VTAG_REPLY):
                    _expect(blen, 8, "SCTP vtag length", p)
                    vtags[btype - CTA_PROTOINFO_SCTP_VTAG_ORIGINAL] = w.field(p + 4, "I")
                p += (blen + 3) & ~3
            if state is None:
                raise _bad("SCTP protoinfo without state", off)
            sctp = [state, *vtags]
        off += (alen + 3) & ~3
    return tcp, sctp


def _decode_helper(buf: bytes, off: int, end: int) -> str | None:
    """Decode the payload of CTA_HELP: the NUL-terminated CTA_HELP_NAME."""
    name = None
    for atype, start, stop in iter_attrs(buf, off, end):
        if atype == CTA_HELP_NAME:
            raw = buf[start:stop]
            nul = raw.find(0)
            try:
                name = (raw if nul < 0 else raw[:nul]).decode("ascii")
            except UnicodeDecodeError:
                raise _bad("helper name is not ASCII", start) from None
    return name


def _learn(buf: bytes, start: int, end: int) -> _Layout:
    """Walk one conntrack message (nfgenmsg + attributes), validating it: its layout."""
    if end - start < 4:
        raise _bad("truncated nfgenmsg", start)
    w = _Walk(start)
    family = buf[start]
    orig = reply = master = tcp = sctp = None
    zone: _Slot = _ZERO
    status: _Slot = _ZERO
    timeout: _Slot = _NONE
    mark: _Slot | None = None
    labels: _Slot = _NONE
    conn_id: _Slot = _NONE
    helper = None
    off = start + 4
    while off < end:
        alen, atype, aend = w.attr(buf, off, end, "attribute")
        if atype == CTA_TUPLE_ORIG:
            orig = _learn_tuple(w, buf, off + 4, aend, family)
        elif atype == CTA_TUPLE_REPLY:
            reply = _learn_tuple(w, buf, off + 4, aend, family)
        elif atype == CTA_STATUS:
            _expect(alen, 8, "status length", off)
            status = w.field(off + 4, "I")
        elif atype == CTA_TIMEOUT:
            _expect(alen, 8, "timeout length", off)
            timeout = w.field(off + 4, "I")
        elif atype == CTA_PROTOINFO:
            tcp, sctp = _learn_protoinfo(w, buf, off + 4, aend)
        elif atype == CTA_ID:
            _expect(alen, 8, "id length", off)
            conn_id = w.field(off + 4, "I")
        elif atype == CTA_MARK:
            _expect(alen, 8, "mark length", off)
            mark = w.field(off + 4, "I")
        elif atype == CTA_ZONE:
            _expect(alen, 6, "zone length", off)
            zone = w.field(off + 4, "H")
        elif atype == CTA_LABELS:
            _expect(alen, 20, "labels length", off)
            labels = w.field(off + 4, "16s")
        elif atype == CTA_HELP:
            # The name is part of the layout: few distinct helpers exist.
            w.fixed(off + 4, alen - 4)
            helper = _decode_helper(buf, off + 4, aend)
            if helper is not None and not 0 < len(helper) <= HELPER_NAME_MAX:
                raise _bad("helper name length", off)
        elif atype == CTA_TUPLE_MASTER:
            master = _learn_tuple(w, buf, off + 4, aend, family)
        off += (alen + 3) & ~3
    if orig is None or reply is None:
        raise _bad("conntrack message without both tuples", start)
    # Never so from the kernel; the wire codec refuses it, so it must not get that far.
    if orig[2] != reply[2]:
        raise _bad("reply tuple protocol differs from the original's", start)
    full = [zone, status, timeout, _ZERO if mark is None else mark, labels, conn_id]
    partial = [zone, status, timeout, _NONE if mark is None else mark, labels, conn_id]
    return _compile(w, buf, end, family=family, helper=helper, orig=orig, reply=reply,
                    master=master, tcp=tcp, sctp=sctp, full=full, partial=partial)


def _struct(order: str, items: list[tuple[int, str]]) -> struct.Struct:
    """A Struct reading ``items`` (offset, code), skipping the bytes in between."""
    fmt = [order]
    pos = 0
    for off, code in sorted(items):
        fmt.append(f"{off - pos}x{code}")
        pos = off + struct.calcsize(order + code)
    return struct.Struct("".join(fmt))


def _compile(w: _Walk, buf: bytes, end: int, *, family: int, helper: str | None,
             orig: list[_Slot], reply: list[_Slot], master: list[_Slot] | None,
             tcp: list[_Slot] | None, sctp: list[_Slot] | None, full: list[_Slot],
             partial: list[_Slot]) -> _Layout:
    """The layout of the walked message ``buf[w.start:end]`` from the slots of each
    part of an entry (``full``/``partial``: the scalars, absent mark as 0 / as None)."""
    groups = (orig, reply, master, tcp, sctp, full, partial)
    fields = sorted({s for g in groups if g for s in g if isinstance(s, _Field)})
    index = {f: i for i, f in enumerate(fields)}
    consts: list[object] = []

    def getter(slots: list[_Slot]) -> _Getter:
        picks = []
        for s in slots:
            if isinstance(s, _Field):
                picks.append(index[s])
            else:
                picks.append(len(fields) + len(consts))
                consts.append(s.value)
        return operator.itemgetter(*picks)

    get_orig, get_reply, get_full, get_partial = map(getter, (orig, reply, full, partial))
    get_master, get_tcp, get_sctp = (None if g is None else getter(g) for g in (master, tcp, sctp))
    data = _struct("!", [(f.off, f.code) for f in fields]).unpack_from
    built = _record_builder(getter, data, consts, family=family, helper=helper,
                            orig=orig, reply=reply, master=master, tcp=tcp, sctp=sctp,
                            full=full)
    record, columns = (None, None) if built is None else built
    mask = bytearray(end - w.start)
    for off, size in w.checks:
        mask[off : off + size] = b"\xff" * size
    imask = int.from_bytes(mask, "little")
    if columns is not None:
        columns = columns._replace(fixed=tuple(sorted(
            {NLMSG_HDRLEN + off + i for off, size in w.checks for i in range(size)})))
    return _Layout(
        imask, int.from_bytes(buf[w.start : end], "little") & imask, data, tuple(consts),
        get_orig, get_reply, get_master, get_tcp, get_sctp, get_full, get_partial, family,
        helper, record, columns)


def takes_record_path(proto: int) -> bool:
    """Whether NEW events of protocol ``proto`` come as records from
    :func:`decode_events_records`: all but ICMP, whose plain inverse maps the ICMP type
    (the general path handles it)."""
    return proto not in ICMP_PROTOCOLS


def _record_builder(
    getter: Callable[[list[_Slot]], _Getter], data: Callable[[bytes, int], tuple[object, ...]],
    consts: list[object], *, family: int, helper: str | None,
    orig: list[_Slot], reply: list[_Slot], master: list[_Slot] | None,
    tcp: list[_Slot] | None, sctp: list[_Slot] | None, full: list[_Slot],
) -> tuple[Callable[[bytes, int, float], bytes], _EventColumns | None] | None:
    """How to pack the record (:func:`replicator.record.new_event_record`) of a full
    message of this layout straight from the values ``data`` reads (``consts``, once
    the getters made here have added theirs, appended), and how to build many of them
    at once (:func:`_event_columns`), or None unless :func:`takes_record_path`.

    Everything but one flag is fixed by the layout: which fields are present, their
    widths (those of the record's), the protocol and the helper. The exception is
    whether the reply tuple is the plain inverse of the original (then the record
    holds none): checked per message, with one struct for each case.
    """
    proto = orig[2].value if isinstance(orig[2], _Const) else None
    if not isinstance(proto, int) or not takes_record_path(proto):
        return None
    zone, status, timeout, mark, labels, conn_id = full
    hflags = (R.H_TIMEOUT if isinstance(timeout, _Field) else 0) | (
        R.H_ID if isinstance(conn_id, _Field) else 0)
    head: list[_Slot] = [
        timeout if isinstance(timeout, _Field) else _ZERO,
        conn_id if isinstance(conn_id, _Field) else _ZERO,
        _Const(hflags), _Const(family), zone, *orig,
    ]  # fmt: skip
    flags = R.F_MARK  # a full message's absent mark is 0, never None
    tail: list[_Slot] = [mark]
    if isinstance(labels, _Field):
        flags |= R.F_LABELS
        tail.append(labels)
    if tcp is not None:
        flags |= R.F_TCP
        tail += tcp
    if sctp is not None:
        flags |= R.F_SCTP
        tail += sctp
    hlen = 0
    if helper is not None:
        name = helper.encode("ascii")
        hlen = len(name)
        flags |= R.F_HELPER
        tail += (_Const(hlen), _Const(name))
    if master is not None:
        flags |= R.F_MASTER
        tail += master
    inverse = getter([*head, _Const(flags | R.F_REPLY), status, *tail])
    explicit = getter([*head, _Const(flags), status, *reply, *tail])
    pack_inverse = R.record_struct(family, flags | R.F_REPLY, hlen).pack
    pack_explicit = R.record_struct(family, flags, hlen).pack
    # The reply tuple is the plain inverse when its addresses and ports are the
    # original's swapped (their ICMP fields are constant zeros here).
    swapped = getter([orig[1], orig[0], orig[4], orig[3]])
    replied = getter([reply[0], reply[1], reply[3], reply[4]])
    seconds = getter([timeout, _ZERO]) if isinstance(timeout, _Field) else None
    fixed = tuple(consts)  # complete: every getter of the layout exists by now

    # Once per NEW event of a burst: one unpack, two picks, one pack.
    def build(buf: bytes, start: int, now: float) -> bytes:
        v = data(buf, start) + fixed
        deadline = math.inf if seconds is None else now + seconds(v)[0]
        if swapped(v) == replied(v):
            return pack_inverse(deadline, deadline, *inverse(v))
        return pack_explicit(deadline, deadline, *explicit(v))

    columns = _event_columns(
        [*head, _Const(flags | R.F_REPLY), status, *tail],
        [*head, _Const(flags), status, *reply, *tail],
        inverse_st=R.record_struct(family, flags | R.F_REPLY, hlen),
        explicit_st=R.record_struct(family, flags, hlen),
        timeout=timeout if isinstance(timeout, _Field) else None,
        swapped=list(zip([orig[1], orig[0], orig[4], orig[3]],
                         [reply[0], reply[1], reply[3], reply[4]], strict=True)))
    return build, columns


class _RecordColumns(NamedTuple):
    """How to build the records of NEW event datagrams of one layout, all at once."""

    #: A record with every value read from the message zero (the deadline infinite
    #: without a timeout), the layout's constants in place.
    template: bytes
    #: (datagram offset, record offsets its byte is copied to), byte by byte.
    copies: bytecols.Copies


class _EventColumns(NamedTuple):
    """:func:`decode_new_records` for one layout (see :func:`_event_columns`)."""

    #: The record of a message whose reply tuple is the plain inverse (not held).
    inverse: _RecordColumns
    #: The record of one whose reply is not (held).
    explicit: _RecordColumns
    #: Datagram offsets of the timeout (big endian u32), -1 without one.
    timeout_at: int
    #: Byte pairs (datagram offsets) equal in every message whose reply tuple is the
    #: plain inverse: the original's addresses and ports against the reply's, swapped.
    swapped: tuple[tuple[int, int], ...]
    #: Datagram offsets of every byte the layout depends on (see :class:`_Walk`).
    fixed: tuple[int, ...]


def _record_columns(slots: list[_Slot], st: struct.Struct, timed: bool
                    ) -> _RecordColumns | None:
    """:class:`_RecordColumns` of records packed by ``st`` (deadline, told, then one item
    per slot), or None if a value's size in the message is not its size in the record."""
    items = bytecols.struct_items(st.format)
    if len(items) != 2 + len(slots):
        return None
    values: list[object] = []
    pairs: list[tuple[int, int]] = []
    for slot, (off, size, code) in zip(slots, items[2:], strict=True):
        if isinstance(slot, _Const):
            values.append(slot.value)
            continue
        if struct.calcsize("!" + slot.code) != size:
            return None
        values.append(bytes(size) if code.endswith("s") else 0)
        pairs += [(off + i, NLMSG_HDRLEN + slot.off + i) for i in range(size)]
    deadline = 0.0 if timed else math.inf
    return _RecordColumns(st.pack(deadline, deadline, *values), bytecols.copies(pairs))


def _event_columns(inverse: list[_Slot], explicit: list[_Slot], *, inverse_st: struct.Struct,
                   explicit_st: struct.Struct, timeout: _Field | None,
                   swapped: list[tuple[_Slot, _Slot]]) -> _EventColumns | None:
    """:class:`_EventColumns` of a layout (its ``fixed`` bytes left empty: the caller's
    walk adds them), or None where its values cannot be copied byte for byte."""
    pairs: list[tuple[int, int]] = []
    for a, b in swapped:
        if isinstance(a, _Const) and isinstance(b, _Const):
            if a.value != b.value:
                return None  # never the plain inverse: not a layout worth columns
            continue
        if not (isinstance(a, _Field) and isinstance(b, _Field)):
            return None
        size = struct.calcsize("!" + a.code)
        if size != struct.calcsize("!" + b.code):
            return None
        pairs += [(NLMSG_HDRLEN + a.off + i, NLMSG_HDRLEN + b.off + i) for i in range(size)]
    if timeout is not None and timeout.code != "I":
        return None
    inv = _record_columns(inverse, inverse_st, timeout is not None)
    exp = _record_columns(explicit, explicit_st, timeout is not None)
    if inv is None or exp is None:
        return None
    return _EventColumns(inv, exp, -1 if timeout is None else NLMSG_HDRLEN + timeout.off,
                         tuple(pairs), ())


def _learn_layout(buf: bytes, start: int, end: int) -> _Layout:
    """Learn the layout of the message at ``buf[start:end]`` and cache it."""
    layout = _learn(buf, start, end)
    if sum(map(len, _LAYOUTS.values())) >= _MAX_LAYOUTS:
        _LAYOUTS.clear()
    _LAYOUTS.setdefault(end - start, []).append(layout)
    return layout


def _layout_of(buf: bytes, start: int, end: int) -> _Layout:
    """The layout of the message at ``buf[start:end]`` (learnt if new)."""
    candidates = _LAYOUTS.get(end - start)
    if candidates is not None:
        value = int.from_bytes(buf[start:end], "little")
        for cand in candidates:
            if value & cand.mask == cand.expected:
                return cand
    return _learn_layout(buf, start, end)


def _decode_entry(buf: bytes, start: int, end: int, full: bool) -> Entry:
    """Decode one conntrack message's nfgenmsg + attributes into an :class:`Entry`.

    ``full``: the message describes the whole entry (a dump reply or a NEW event),
    so an absent CTA_MARK means mark 0 rather than "unchanged".
    """
    return _entry_of(_layout_of(buf, start, end), buf, start, full)


def _entry_of(layout: _Layout, buf: bytes, start: int, full: bool) -> Entry:
    (_mask, _expected, data, consts, orig, reply, master, tcp, sctp, full_scalars,
     partial_scalars, family, helper, _record, _columns) = layout
    v = data(buf, start) + consts
    zone, status, timeout, mark, labels, conn_id = (
        full_scalars(v) if full else partial_scalars(v))
    return _new(Entry, (
        family, _new(CtTuple, orig(v)), _new(CtTuple, reply(v)), zone, status, timeout,
        mark, labels, None if tcp is None else _new(TcpInfo, tcp(v)),
        None if sctp is None else _new(SctpInfo, sctp(v)), helper,
        None if master is None else _new(CtTuple, master(v)), conn_id))


def _as_bytes(buf: bytes | bytearray | memoryview) -> bytes:
    return buf if type(buf) is bytes else bytes(buf)


def decode_events(buf: bytes | bytearray | memoryview) -> list[CtEvent]:
    """Decode one datagram from the conntrack event socket.

    ``IPCTNL_MSG_CT_NEW`` with ``NLM_F_CREATE`` is a NEW event (a full entry: absent
    mark means 0), without it an UPDATE; ``IPCTNL_MSG_CT_DELETE`` is a DESTROY. UPDATE
    and DESTROY entries are partial (absent fields are ``None``, see
    :mod:`replicator.model`). Other messages (``NLMSG_DONE``, expectations) are skipped.
    """
    # Without a time, no NEW event is turned into a record.
    return cast(list[CtEvent], _decode_events(buf, None))


def decode_events_records(buf: bytes | bytearray | memoryview, now: float
                          ) -> list[CtEvent | NewRecord]:
    """:func:`decode_events`, with each NEW event of a non-ICMP protocol (what a burst
    of new connections consists of) decoded straight into a
    :class:`~replicator.model.NewRecord`: the record :func:`replicator.record.pack`
    makes of the entry :func:`decode_events` would return, without building the entry:
    :func:`replicator.record.new_event_record` of it, read at ``now``."""
    return _decode_events(buf, now)


#: NewRecord((record, portid)) without a Python-level call.
_NEW_RECORD: Final = functools.partial(tuple.__new__, NewRecord)
#: Fewer datagrams of one size than this are decoded one by one: by column costs
#: about 80 µs per call whatever the count, plus 0.6 µs per datagram, one by one 3 µs
#: per datagram (measured on 232-byte NEW events: 16 took 49 µs one by one, 84 by
#: column; even at 32).
_MIN_COLUMNS: Final = 32
#: Layouts tried per datagram size (see _new_records_of_size).
_LAYOUTS_PER_SIZE: Final = 4
#: The nlmsghdr's length, type and flags: the same in every datagram read by column.
_HEADER_FIXED: Final = range(8)
_PID_AT: Final = 12


def decode_new_records(datagrams: Sequence[bytes], now: float) -> list[NewRecord | None]:
    """For each of ``datagrams`` (read from an event socket): the one
    :class:`~replicator.model.NewRecord` :func:`decode_events_records` returns for it
    at ``now``, if it holds exactly one NEW event of a layout whose records can be built
    by byte column, else None (the caller decodes it with :func:`decode_events_records`).

    A burst of new connections is thousands of datagrams of a few sizes, each one NEW
    event whose layout (see the comment at the top) is the same as the others' of its
    size. Per datagram, the general path costs ≈ 3 µs; here, the datagrams of one size
    are joined and checked against their layout's fixed bytes, and their records built
    from it (:mod:`replicator.bytecols`), one C loop per byte column: the same records,
    a fraction of the time. A datagram whose fixed bytes differ from the first of its
    size's (another layout, another kind of message) is left to the general path.
    """
    n = len(datagrams)
    out: list[NewRecord | None] = [None] * n
    if n < _MIN_COLUMNS:
        return out
    sizes = list(map(len, datagrams))
    counts = collections.Counter(sizes)
    for size, count in counts.items():
        if count < _MIN_COLUMNS:
            continue
        members = (range(n) if count == n
                   else list(itertools.compress(range(n), map(size.__eq__, sizes))))
        _new_records_of_size(datagrams, members, size, now, out)
    return out


def _new_records_of_size(datagrams: Sequence[bytes], members: Sequence[int], size: int,
                         now: float, out: list[NewRecord | None]) -> None:
    """:func:`decode_new_records` for the datagrams at ``members``, all ``size`` bytes:
    those of the first one's layout, then those of the first left's, and so on (one
    size rarely has more than one layout; a few are tried, the rest is left)."""
    for _ in range(_LAYOUTS_PER_SIZE):
        if len(members) < _MIN_COLUMNS:
            return
        members = _new_records_of_layout(datagrams, members, size, now, out)


def _new_records_of_layout(datagrams: Sequence[bytes], members: Sequence[int], size: int,
                           now: float, out: list[NewRecord | None]) -> Sequence[int]:
    """:func:`decode_new_records` for the datagrams at ``members`` (all ``size`` bytes)
    of the first one's layout; the members left (another layout, another message)."""
    first = datagrams[members[0]]
    if size < NLMSG_HDRLEN:
        return ()
    length, mtype, flags, _seq, _pid = NLMSG_HDR.unpack_from(first)
    if length != size or mtype != CT_NEW or not flags & NLM_F_CREATE:
        return members[1:]
    try:
        layout = _layout_of(first, NLMSG_HDRLEN, size)
    except NetlinkDecodeError:
        return members[1:]  # the general path reports it
    cols = layout.columns
    if cols is None:
        return members[1:]
    group = list(datagrams) if len(members) == len(datagrams) else [datagrams[i] for i in members]
    k = len(group)
    joined = b"".join(group)
    bad = bytecols.unlike(joined, size, k, [(p, first[p]) for p in (*_HEADER_FIXED, *cols.fixed)])
    explicit = bytecols.differ(joined, size, k, cols.swapped)
    # Per datagram: 0 the reply is the plain inverse, 1 not, 2 or 3 another layout.
    kinds = (explicit | 2 * bad).to_bytes(k)
    left: Sequence[int] = (
        list(itertools.compress(members, map(bool, (bad.to_bytes(k))))) if bad else ())
    for kind, recipe in ((0, cols.inverse), (1, cols.explicit)):
        n = kinds.count(kind)
        if not n:
            continue
        if n == k:
            picked, at = joined, members
        else:
            picks = list(itertools.compress(range(k), map(kind.__eq__, kinds)))
            picked, at = b"".join([group[j] for j in picks]), [members[j] for j in picks]
        records = _records_by_column(recipe, picked, size, n, timeout_at=cols.timeout_at,
                                     now=now)
        pids = array("I")
        pids.frombytes(bytecols.gather(picked, size, n, _PID_AT, 4))  # host order
        made = list(map(_NEW_RECORD, zip(records, pids, strict=True)))
        if len(made) == len(out):
            out[:] = made
        else:
            for i, rec in zip(at, made, strict=True):
                out[i] = rec
    return left


def _records_by_column(recipe: _RecordColumns, joined: bytes, size: int, k: int, *,
                       timeout_at: int, now: float) -> list[bytes]:
    """The records of ``k`` datagrams of ``size`` bytes joined (see :class:`_RecordColumns`)."""
    rsize = len(recipe.template)
    out = bytecols.fill(recipe.template, k, joined, size, recipe.copies)
    if timeout_at >= 0:
        # Deadline and told: now + timeout, as the general path (new_event_record).
        seconds = array("I")
        seconds.frombytes(bytecols.gather(joined, size, k, timeout_at, 4,
                                          reverse=bytecols.LITTLE))
        deadlines = array("d", map(now.__add__, seconds))
        if bytecols.LITTLE:
            deadlines.byteswap()  # big endian, as the record
        raw = deadlines.tobytes()
        bytecols.scatter(out, rsize, 0, 8, raw)
        bytecols.scatter(out, rsize, 8, 8, raw)
    return bytecols.split(out, rsize)


def _decode_events(buf: bytes | bytearray | memoryview, now: float | None
                   ) -> list[CtEvent | NewRecord]:
    data = _as_bytes(buf)
    events: list[CtEvent | NewRecord] = []
    off = 0
    size = len(data)
    unpack_hdr = NLMSG_HDR.unpack_from
    try:
        while off < size:
            if size - off < NLMSG_HDRLEN:
                raise _bad("truncated netlink header", off)
            length, mtype, flags, _seq, pid = unpack_hdr(data, off)
            end = off + length
            if length < NLMSG_HDRLEN or end > size:
                raise _bad("netlink message length", off)
            start = off + NLMSG_HDRLEN
            if mtype == CT_NEW:
                if flags & NLM_F_CREATE:
                    layout = _layout_of(data, start, end)
                    if now is not None and (build := layout.record) is not None:
                        events.append(_new(NewRecord, (build(data, start, now), pid)))
                    else:
                        events.append(_new(CtEvent, (
                            _NEW, _entry_of(layout, data, start, True), pid)))
                else:
                    events.append(_new(CtEvent, (
                        _UPDATE, _decode_entry(data, start, end, False), pid)))
            elif mtype == CT_DELETE:
                events.append(_new(CtEvent, (
                    _DESTROY, _decode_entry(data, start, end, False), pid)))
            off += (length + 3) & ~3
    except (struct.error, IndexError) as exc:  # defensive: every length is checked above
        raise NetlinkDecodeError(f"malformed ctnetlink message: {exc}") from None
    return events


def decode_dump(buf: bytes | bytearray | memoryview) -> tuple[list[Entry], bool]:
    """Decode one datagram of a dump reply: ``(entries, done)``.

    Entries are full (absent mark means 0). ``done`` is true once ``NLMSG_DONE`` was
    seen. An ``NLMSG_ERROR`` with a nonzero error (or a DONE carrying one) raises
    :class:`KernelError` with the positive errno; an ACK (error 0) is skipped.
    """
    data = _as_bytes(buf)
    entries: list[Entry] = []
    off = 0
    size = len(data)
    unpack_hdr = NLMSG_HDR.unpack_from
    try:
        while off < size:
            if size - off < NLMSG_HDRLEN:
                raise _bad("truncated netlink header", off)
            length, mtype, _flags, _seq, _pid = unpack_hdr(data, off)
            end = off + length
            if length < NLMSG_HDRLEN or end > size:
                raise _bad("netlink message length", off)
            if mtype == CT_NEW:
                entries.append(_decode_entry(data, off + NLMSG_HDRLEN, end, True))
            elif mtype == NLMSG_DONE:
                # netlink_dump_done() appends the dump's return code as an int.
                err = done_code(data, Message(mtype, 0, 0, 0, off + NLMSG_HDRLEN, end))
                if err:
                    raise KernelError(f"conntrack dump failed: errno {err}", err)
                return entries, True
            elif mtype == NLMSG_ERROR:
                err = error_code(data, Message(mtype, 0, 0, 0, off + NLMSG_HDRLEN, end))
                if err:
                    raise KernelError(f"conntrack dump refused: errno {err}", err)
            off += (length + 3) & ~3
    except (struct.error, IndexError) as exc:  # defensive: every length is checked above
        raise NetlinkDecodeError(f"malformed ctnetlink message: {exc}") from None
    return entries, False


def parse_acks(buf: bytes | bytearray | memoryview) -> list[tuple[int, int]]:
    """``(seq, errno)`` for every ``NLMSG_ERROR`` in a datagram (errno 0 = ACK, else > 0).

    The sequence number is the one of the request the kernel answers (the kernel copies
    it into the reply header). Other messages are skipped.
    """
    data = _as_bytes(buf)
    return [(msg.seq, error_code(data, msg)) for msg in iter_messages(data)
            if msg.type == NLMSG_ERROR]


# --- encoding -----------------------------------------------------------------------
# Every fixed-layout piece of a request is one precompiled Struct in network byte order.
# Attribute headers are host-order (len, type) pairs, so each is precomputed as the
# integer that packs to the right bytes under "!" (see _h): one pack call builds a whole
# tuple, NAT range or protoinfo with its headers and padding.


def _h(length: int, atype: int) -> int:
    """An attribute header as the big-endian integer that packs to its host-order bytes."""
    return int.from_bytes(_NLA.pack(length, atype), "big")


_N = NLA_F_NESTED
_MSG = struct.Struct("=IHHIIBBH").pack  # nlmsghdr + nfgenmsg (version 0, res_id 0)
_U32_ATTR = struct.Struct("!II").pack
_U16_ATTR = struct.Struct("!IH2x").pack
_FLAGS_CREATE: Final = NLM_F_REQUEST | NLM_F_CREATE | NLM_F_EXCL

# Tuples: outer header, IP nest (src, dst), PROTO nest (number, then ports, ICMP id/type/
# code, or nothing), per family. Layout = (Struct.pack, IP header values, PROTO values).
_IP4 = (_h(20, CTA_TUPLE_IP | _N), _h(8, CTA_IP_V4_SRC), _h(8, CTA_IP_V4_DST))
_IP6 = (_h(44, CTA_TUPLE_IP | _N), _h(20, CTA_IP_V6_SRC), _h(20, CTA_IP_V6_DST))
_PORTS = (_h(28, CTA_TUPLE_PROTO | _N), _h(5, CTA_PROTO_NUM), _h(6, CTA_PROTO_SRC_PORT),
          _h(6, CTA_PROTO_DST_PORT))
_ICMP4 = (_h(36, CTA_TUPLE_PROTO | _N), _h(5, CTA_PROTO_NUM), _h(6, CTA_PROTO_ICMP_ID),
          _h(5, CTA_PROTO_ICMP_TYPE), _h(5, CTA_PROTO_ICMP_CODE))
_ICMP6 = (_h(36, CTA_TUPLE_PROTO | _N), _h(5, CTA_PROTO_NUM), _h(6, CTA_PROTO_ICMPV6_ID),
          _h(5, CTA_PROTO_ICMPV6_TYPE), _h(5, CTA_PROTO_ICMPV6_CODE))
_BARE = (_h(12, CTA_TUPLE_PROTO | _N), _h(5, CTA_PROTO_NUM))
_TUPLE_TYPES = (CTA_TUPLE_ORIG, CTA_TUPLE_REPLY, CTA_TUPLE_MASTER)
_IP_LEN = {4: 20, 16: 44}
# Outer tuple headers by (attribute type, address size), for each PROTO nest size.
_OUT_PORTS = {(a, n): _h(4 + ip + 28, a | _N) for a in _TUPLE_TYPES for n, ip in _IP_LEN.items()}
_OUT_ICMP = {(a, n): _h(4 + ip + 36, a | _N) for a in _TUPLE_TYPES for n, ip in _IP_LEN.items()}
_OUT_BARE = {(a, n): _h(4 + ip + 12, a | _N) for a in _TUPLE_TYPES for n, ip in _IP_LEN.items()}
_T_PORTS = {4: struct.Struct("!II I4s I4s II B3x IH2x IH2x").pack,
            16: struct.Struct("!II I16s I16s II B3x IH2x IH2x").pack}
_T_ICMP = {4: struct.Struct("!II I4s I4s II B3x IH2x IB3x IB3x").pack,
           16: struct.Struct("!II I16s I16s II B3x IH2x IB3x IB3x").pack}
_T_BARE = {4: struct.Struct("!II I4s I4s II B3x").pack,
           16: struct.Struct("!II I16s I16s II B3x").pack}
# A port protocol's original tuple followed by its plain inverse as the reply tuple.
_T2_PORTS = {n: struct.Struct("!" + 2 * f"II I{n}s I{n}s II B3x IH2x IH2x").pack
             for n in (4, 16)}

# NAT ranges: single address (min = max) and, for port protocols, single port.
_NAT_PORTS = {4: struct.Struct("!I I4s I4s I IH2x IH2x").pack,
              16: struct.Struct("!I I16s I16s I IH2x IH2x").pack}
_NAT_BARE = {4: struct.Struct("!I I4s I4s").pack, 16: struct.Struct("!I I16s I16s").pack}
_NAT_TYPES = (CTA_NAT_SRC, CTA_NAT_DST)
_OUT_NAT_PORTS = {(a, n): _h(4 + 2 * (4 + n) + 20, a | _N) for a in _NAT_TYPES for n in (4, 16)}
_OUT_NAT_BARE = {(a, n): _h(4 + 2 * (4 + n), a | _N) for a in _NAT_TYPES for n in (4, 16)}
_NAT_IP = {4: (_h(8, CTA_NAT_V4_MINIP), _h(8, CTA_NAT_V4_MAXIP)),
           16: (_h(20, CTA_NAT_V6_MINIP), _h(20, CTA_NAT_V6_MAXIP))}
_NAT_PROTO = (_h(20, CTA_NAT_PROTO | _N), _h(6, CTA_PROTONAT_PORT_MIN),
              _h(6, CTA_PROTONAT_PORT_MAX))

_TCP_PACK = struct.Struct("!I I IB3x IB3x IB3x IBB2x IBB2x").pack
_TCP_ENC = (_h(48, CTA_PROTOINFO | _N), _h(44, CTA_PROTOINFO_TCP | _N),
            _h(5, CTA_PROTOINFO_TCP_STATE), _h(5, CTA_PROTOINFO_TCP_WSCALE_ORIGINAL),
            _h(5, CTA_PROTOINFO_TCP_WSCALE_REPLY), _h(6, CTA_PROTOINFO_TCP_FLAGS_ORIGINAL),
            _h(6, CTA_PROTOINFO_TCP_FLAGS_REPLY))
_SCTP_PACK = struct.Struct("!I I IB3x II II").pack
_SCTP_ENC = (_h(32, CTA_PROTOINFO | _N), _h(28, CTA_PROTOINFO_SCTP | _N),
             _h(5, CTA_PROTOINFO_SCTP_STATE), _h(8, CTA_PROTOINFO_SCTP_VTAG_ORIGINAL),
             _h(8, CTA_PROTOINFO_SCTP_VTAG_REPLY))
_STATE3 = struct.Struct("!II II II").pack
_H_STATUS = _h(8, CTA_STATUS)
_H_TIMEOUT = _h(8, CTA_TIMEOUT)
_H_MARK = _h(8, CTA_MARK)
_H_ZONE = _h(6, CTA_ZONE)
_LABELS_HDR = _NLA.pack(20, CTA_LABELS)
# Mask all ones: the copy gets exactly the source's label bits.
_LABELS_MASK = _NLA.pack(20, CTA_LABELS_MASK) + b"\xff" * 16


def settable_status(status: int) -> int:
    """The status to send: the settable bits of ``status`` plus CONFIRMED.

    Only SEEN_REPLY, ASSURED and FIXED_TIMEOUT can be set from user space (NAT, offload
    and higher bits are ignored or refused), and a status without CONFIRMED is ``EBUSY``.
    """
    return (status & SETTABLE_STATUS) | _CONFIRMED


def clean_tcp_flags(flags: int) -> int:
    """TCP flags safe to restore on a copy: the transient sequence-tracking bits removed.

    Window scale, SACK permitted, close-init, be-liberal and simultaneous-open are kept.
    """
    return flags & _KEPT_TCP_FLAGS


def _encode_tuple(atype: int, t: CtTuple) -> bytes:
    """A CTA_TUPLE_* nested attribute (address size picks IPv4 or IPv6)."""
    size = len(t.src)
    ip = _IP4 if size == 4 else _IP6
    proto = t.proto
    if proto in PORT_PROTOCOLS:
        return _T_PORTS[size](
            _OUT_PORTS[atype, size], ip[0], ip[1], t.src, ip[2],
            t.dst, _PORTS[0], _PORTS[1], proto, _PORTS[2], t.sport, _PORTS[3], t.dport)
    if proto in ICMP_PROTOCOLS:
        icmp = _ICMP6 if proto == IPPROTO_ICMPV6 else _ICMP4
        return _T_ICMP[size](
            _OUT_ICMP[atype, size], ip[0], ip[1], t.src, ip[2],
            t.dst, icmp[0], icmp[1], proto, icmp[2], t.icmp_id, icmp[3], t.icmp_type,
            icmp[4], t.icmp_code)
    return _T_BARE[size](_OUT_BARE[atype, size], ip[0], ip[1],
                         t.src, ip[2], t.dst, _BARE[0], _BARE[1], proto)


def _encode_nat(atype: int, target: tuple[bytes, int], proto: int) -> bytes:
    """CTA_NAT_SRC/DST: a single-address (and, for port protocols, single-port) range."""
    addr, port = target
    size = len(addr)
    lo, hi = _NAT_IP[size]
    if proto in PORT_PROTOCOLS:
        return _NAT_PORTS[size](_OUT_NAT_PORTS[atype, size], lo, addr, hi, addr,
                                _NAT_PROTO[0], _NAT_PROTO[1], port, _NAT_PROTO[2], port)
    return _NAT_BARE[size](_OUT_NAT_BARE[atype, size], lo, addr, hi, addr)


def _encode_tuples(orig: CtTuple) -> bytes:
    """CTA_TUPLE_ORIG with ``orig``, then CTA_TUPLE_REPLY with its plain inverse."""
    if orig.proto in PORT_PROTOCOLS:  # one pack, no inverted CtTuple built
        src, dst, proto, sport, dport = orig[:5]
        size = len(src)
        ip = _IP4 if size == 4 else _IP6
        return _T2_PORTS[size](
            _OUT_PORTS[CTA_TUPLE_ORIG, size], ip[0], ip[1], src, ip[2], dst, _PORTS[0],
            _PORTS[1], proto, _PORTS[2], sport, _PORTS[3], dport,
            _OUT_PORTS[CTA_TUPLE_REPLY, size], ip[0], ip[1], dst, ip[2], src, _PORTS[0],
            _PORTS[1], proto, _PORTS[2], dport, _PORTS[3], sport)
    return _encode_tuple(CTA_TUPLE_ORIG, orig) + _encode_tuple(CTA_TUPLE_REPLY, invert(orig))


@functools.lru_cache(maxsize=1024)
def _encode_tcp(tcp: TcpInfo) -> bytes:
    # Mask 0xff: dumps and events report mask 0, but the kernel applies only masked bits.
    # Both window scales go in one message: the kernel applies them only together, and
    # only when both directions carry WINDOW_SCALE.
    h = _TCP_ENC
    return _TCP_PACK(h[0], h[1], h[2], tcp.state, h[3], tcp.wscale_orig, h[4],
                     tcp.wscale_reply, h[5], tcp.flags_orig & _KEPT_TCP_FLAGS, 0xFF,
                     h[6], tcp.flags_reply & _KEPT_TCP_FLAGS, 0xFF)


def _encode_sctp(sctp: SctpInfo) -> bytes:
    # The kernel refuses SCTP protoinfo unless state and both vtags are present.
    h = _SCTP_ENC
    return _SCTP_PACK(h[0], h[1], h[2], sctp.state, h[3], sctp.vtag_orig, h[4],
                      sctp.vtag_reply)


@functools.lru_cache(maxsize=64)
def _encode_helper(name: str) -> bytes:
    """CTA_HELP with CTA_HELP_NAME (few distinct names: cached)."""
    raw = name.encode("ascii") + b"\0"
    inner = _NLA.pack(4 + len(raw), CTA_HELP_NAME) + raw + b"\0" * (-len(raw) & 3)
    return _NLA.pack(4 + len(inner), CTA_HELP | _N) + inner


def _encode_state(entry: Entry, status: int, timeout: bool) -> bytes:
    """The attributes create and update share: status, timeout (if ``timeout``), mark,
    zone, labels, protocol info and helper."""
    seconds = entry.timeout if timeout else None
    mark = entry.mark
    if seconds is not None and mark is not None:  # the usual case: one pack
        out = _STATE3(_H_STATUS, status, _H_TIMEOUT, seconds, _H_MARK, mark)
    else:
        out = _U32_ATTR(_H_STATUS, status)
        if seconds is not None:
            out += _U32_ATTR(_H_TIMEOUT, seconds)
        if mark is not None:
            out += _U32_ATTR(_H_MARK, mark)
    if entry.zone:
        out += _U16_ATTR(_H_ZONE, entry.zone)
    if entry.labels is not None:
        out += _LABELS_HDR + entry.labels + _LABELS_MASK
    proto = entry.orig.proto
    if entry.tcp is not None and proto == IPPROTO_TCP:
        out += _encode_tcp(entry.tcp)
    elif entry.sctp is not None and proto == IPPROTO_SCTP:
        out += _encode_sctp(entry.sctp)
    if entry.helper is not None:
        out += _encode_helper(entry.helper)
    return out


def encode_create(entry: Entry, seq: int, *, ack: bool = False) -> bytes:
    """``IPCTNL_MSG_CT_NEW`` creating ``entry`` with its NAT (CREATE|EXCL: EEXIST if present).

    The reply tuple is sent as the plain inverse of the original one, and the real
    reply tuple is expressed as CTA_NAT_SRC/CTA_NAT_DST, so the kernel sets up the
    translation itself. ``entry.timeout`` must be set (the kernel refuses a create
    without CTA_TIMEOUT with EINVAL). Without ``ack`` the kernel still reports errors.
    The usual entry (:func:`_usual`) is built in one pack (:func:`usual_create_packer`).
    """
    usual = _usual(entry)
    if usual is None:
        return _encode_create(entry, seq, ack=ack)
    family, orig, reply, status, timeout, mark, tcp = usual
    src, dst, proto, sport, dport = orig[:5]
    rsrc, rdst, rsport, rdport = reply[0], reply[1], reply[3], reply[4]
    with_tcp = tcp is not None and proto == IPPROTO_TCP
    pack = usual_create_packer(family, rdst != src or rdport != sport,
                               rsrc != dst or rsport != dport, with_tcp)
    if tcp is not None and with_tcp:
        return pack(seq, ack, src, dst, proto, sport, dport, rdst, rdport, rsrc, rsport,
                    status, timeout, mark, tcp[0], tcp[1], tcp[2], tcp[3], tcp[4])
    return pack(seq, ack, src, dst, proto, sport, dport, rdst, rdport, rsrc, rsport,
                status, timeout, mark, 0, 0, 0, 0, 0)


#: Protocols of the usual entry (ports, and no protocol info but TCP's).
FAST_CREATE_PROTOCOLS = frozenset({IPPROTO_TCP, IPPROTO_UDP})


#: What the one-pack builders need of a usual entry: family, orig, reply, status,
#: timeout, mark, TCP info.
_Usual = tuple[int, CtTuple, CtTuple, int, int, int, "TcpInfo | None"]


def _usual(entry: Entry) -> _Usual | None:
    """The fields of ``entry`` if it is of the usual kind the one-pack builders take
    (TCP or UDP, maybe NAT'd, zone 0, a timeout and a mark, no labels, helper, master
    or SCTP info), else ``None``."""
    family, orig, reply, zone, status, timeout, mark, labels, tcp, sctp, helper, master, _ = (
        entry
    )
    if (master is None and labels is None and helper is None and sctp is None
            and not zone and timeout is not None and mark is not None
            and orig[2] in FAST_CREATE_PROTOCOLS):
        return family, orig, reply, status, timeout, mark, tcp
    return None


class _UsualParts(NamedTuple):
    """What the one-pack builders of a family share: runs of attribute headers as
    byte constants, and the struct format of the original tuple and of TCP info."""

    orig: bytes
    reply: bytes
    dst: bytes
    proto: bytes
    sport: bytes
    dport: bytes
    tuple_fmt: str
    tcp: bytes
    wscale_orig: bytes
    wscale_reply: bytes
    flags_orig: bytes
    flags_reply: bytes
    tcp_fmt: str


def _words(*values: int) -> bytes:
    return b"".join(v.to_bytes(4, "big") for v in values)


@functools.cache
def _usual_parts(size: int) -> _UsualParts:
    """:class:`_UsualParts` for addresses of ``size`` bytes."""
    ip, h = (_IP4 if size == 4 else _IP6), _TCP_ENC
    return _UsualParts(
        _words(_OUT_PORTS[CTA_TUPLE_ORIG, size], ip[0], ip[1]),
        _words(_OUT_PORTS[CTA_TUPLE_REPLY, size], ip[0], ip[1]),
        _words(ip[2]), _words(_PORTS[0], _PORTS[1]), _words(_PORTS[2]), _words(_PORTS[3]),
        f"12s{size}s4s{size}s8sB3x4sH2x4sH2x",
        _words(h[0], h[1], h[2]), _words(h[3]), _words(h[4]), _words(h[5]), _words(h[6]),
        "12sB3x4sB3x4sB3x4sBB2x4sBB2x")


class UsualCreatePacker(Protocol):
    """Builds the create request of one usual entry from its fields (see
    :func:`usual_create_packer`)."""

    # Positional only, on purpose: a takeover calls it 100 k times.
    def __call__(self, seq: int, ack: bool, src: bytes,  # noqa: PLR0917
                 dst: bytes, proto: int, sport: int,
                 dport: int, snat_addr: bytes, snat_port: int, dnat_addr: bytes,
                 dnat_port: int, status: int, timeout: int, mark: int, tcp_state: int,
                 wscale_orig: int, wscale_reply: int, flags_orig: int, flags_reply: int,
                 /) -> bytes: ...


# What each item of a usual create request's body holds (see usual_create_format), in
# the order usual_create_packer's pack() passes them; "" is a constant.
_ITEMS_ORIG = ("", "src", "", "dst", "", "proto", "", "sport", "", "dport")
_ITEMS_REPLY = ("", "dst", "", "src", "", "proto", "", "dport", "", "sport")
_ITEMS_NAT = {n: ("", f"{n}_addr", "", f"{n}_addr", "", f"{n}_port", "", f"{n}_port")
              for n in ("snat", "dnat")}
_ITEMS_STATE = ("", "status", "", "timeout", "", "mark")
_ITEMS_TCP = ("", "tcp_state", "", "wscale_orig", "", "wscale_reply", "", "flags_orig", "",
              "", "flags_reply", "")


@functools.cache
def usual_create_format(family: int, snat: bool, dnat: bool, tcp: bool
                        ) -> tuple[str, tuple[str, ...]]:
    """The ``struct`` format (network order) of the body of a usual create request of
    this shape (see :func:`usual_create_packer`: the body follows the nlmsghdr and
    nfgenmsg, :data:`~replicator.netlink.NFNL_HDRLEN` bytes) and, item by item (pad
    bytes excluded), what each holds: the name of one of the packer's parameters
    (``status``: masked to the settable bits plus CONFIRMED; ``flags_*``: masked to the
    flags kept), or ``""`` for a constant (attribute headers, the flag masks).

    :mod:`replicator.colpack` builds many requests at once from this."""
    (_o, _r, _d, _p, _s, _dp, tuple_fmt, _t, _wo, _wr, _fo, _fr,
     tcp_fmt) = _usual_parts(_ADDR_SIZE[family])  # fmt: skip
    nat_fmt = f"8s{_ADDR_SIZE[family]}s4s{_ADDR_SIZE[family]}s8sH2x4sH2x"
    fmt = "!" + tuple_fmt * 2 + nat_fmt * (snat + dnat) + "IIIIII" + (tcp_fmt if tcp else "")
    items = (_ITEMS_ORIG + _ITEMS_REPLY + (_ITEMS_NAT["snat"] if snat else ())
             + (_ITEMS_NAT["dnat"] if dnat else ()) + _ITEMS_STATE + (_ITEMS_TCP if tcp else ()))
    return fmt, items


@functools.cache
def usual_create_packer(family: int, snat: bool, dnat: bool, tcp: bool) -> UsualCreatePacker:
    """The request builder of one shape of usual entry: ``family``, whether it has a
    source NAT (``snat_addr``/``snat_port``: the reply tuple's destination), a
    destination NAT (``dnat_*``: the reply tuple's source) and TCP info (the last five
    fields, as :class:`TcpInfo`; ignored without ``tcp``). Fields a shape does not use
    are ignored.

    The same bytes as the general path, in one pack per request: a takeover writes
    100 k of these, and building requests part by part cost more than the kernel's work
    on them. Runs of attribute headers are packed as one constant each, and callers
    that read the fields straight from a record (:mod:`replicator.bulkwrite`) pass
    them without building a tuple.
    """
    size = _ADDR_SIZE[family]
    (c_orig, c_reply, c_dst, c_proto, c_sport, c_dport, _tuple_fmt, c_tcp, c_wso, c_wsr,
     c_fo, c_fr, _tcp_fmt) = _usual_parts(size)  # fmt: skip
    lo, hi = _NAT_IP[size]
    c_snat = _words(_OUT_NAT_PORTS[CTA_NAT_SRC, size], lo)
    c_dnat = _words(_OUT_NAT_PORTS[CTA_NAT_DST, size], lo)
    c_hi, c_max = _words(hi), _words(_NAT_PROTO[2])
    c_nat_proto = _words(_NAT_PROTO[0], _NAT_PROTO[1])
    fmt, _items = usual_create_format(family, snat, dnat, tcp)
    body = struct.Struct(fmt).pack
    length = NFNL_HDRLEN + struct.calcsize(fmt)
    flags_ack, flags_plain = _FLAGS_CREATE | NLM_F_ACK, _FLAGS_CREATE
    settable, confirmed, kept = SETTABLE_STATUS, _CONFIRMED, _KEPT_TCP_FLAGS
    h_status, h_timeout, h_mark = _H_STATUS, _H_TIMEOUT, _H_MARK
    head = _MSG

    def pack(seq: int, ack: bool, src: bytes,  # noqa: PLR0917
             dst: bytes, proto: int, sport: int,
             dport: int, snat_addr: bytes, snat_port: int, dnat_addr: bytes,
             dnat_port: int, status: int, timeout: int, mark: int, tcp_state: int,
             wscale_orig: int, wscale_reply: int, flags_orig: int, flags_reply: int,
             /) -> bytes:
        return head(length, CT_NEW, flags_ack if ack else flags_plain, seq, 0, family, 0,
                    0) + body(
            c_orig, src, c_dst, dst, c_proto, proto, c_sport, sport, c_dport, dport,
            c_reply, dst, c_dst, src, c_proto, proto, c_sport, dport, c_dport, sport,
            *((c_snat, snat_addr, c_hi, snat_addr, c_nat_proto, snat_port, c_max, snat_port)
              if snat else ()),
            *((c_dnat, dnat_addr, c_hi, dnat_addr, c_nat_proto, dnat_port, c_max, dnat_port)
              if dnat else ()),
            h_status, (status & settable) | confirmed, h_timeout, timeout, h_mark, mark,
            *((c_tcp, tcp_state, c_wso, wscale_orig, c_wsr, wscale_reply, c_fo,
               flags_orig & kept, 0xFF, c_fr, flags_reply & kept, 0xFF) if tcp else ()))

    return pack


def _encode_create(entry: Entry, seq: int, *, ack: bool = False) -> bytes:
    """:func:`encode_create` for every entry, one part at a time."""
    orig = entry.orig
    body = _encode_tuples(orig)
    snat = snat_target(entry)
    if snat is not None:
        body += _encode_nat(CTA_NAT_SRC, snat, orig.proto)
    dnat = dnat_target(entry)
    if dnat is not None:
        body += _encode_nat(CTA_NAT_DST, dnat, orig.proto)
    body += _encode_state(entry, (entry.status & SETTABLE_STATUS) | _CONFIRMED, True)
    if entry.master is not None:
        body += _encode_tuple(CTA_TUPLE_MASTER, entry.master)
    return _MSG(NFNL_HDRLEN + len(body), CT_NEW, _FLAGS_CREATE | NLM_F_ACK if ack else
                _FLAGS_CREATE, seq, 0, entry.family, 0, 0) + body


class UsualUpdatePacker(Protocol):
    """Builds the update request of one usual entry from its fields (see
    :func:`usual_update_packer`)."""

    # Positional only, on purpose: a takeover calls it once per entry the kernel has.
    def __call__(self, seq: int, ack: bool, src: bytes,  # noqa: PLR0917
                 dst: bytes, proto: int, sport: int, dport: int, status: int,
                 timeout: int, mark: int, tcp_state: int, wscale_orig: int,
                 wscale_reply: int, flags_orig: int, flags_reply: int, /) -> bytes: ...


@functools.cache
def usual_update_packer(family: int, timeout: bool, tcp: bool) -> UsualUpdatePacker:
    """:func:`encode_update` of one shape of usual entry (see
    :func:`usual_create_packer`): ``family``, whether the request carries the timeout
    (not with FIXED_TIMEOUT) and TCP info (the last five fields; ignored without
    ``tcp``). Fields a shape does not use are ignored."""
    (c_orig, _reply, c_dst, c_proto, c_sport, c_dport, tuple_fmt, c_tcp, c_wso, c_wsr,
     c_fo, c_fr, tcp_fmt) = _usual_parts(_ADDR_SIZE[family])  # fmt: skip
    fmt = tuple_fmt + ("IIIIII" if timeout else "IIII") + (tcp_fmt if tcp else "")
    body = struct.Struct("!" + fmt).pack
    length = NFNL_HDRLEN + struct.calcsize("!" + fmt)
    flags_ack, flags_plain = NLM_F_REQUEST | NLM_F_ACK, NLM_F_REQUEST
    settable, kept = SETTABLE_STATUS | _EXPECTED, _KEPT_TCP_FLAGS
    confirmed = _CONFIRMED
    h_status, h_timeout, h_mark = _H_STATUS, _H_TIMEOUT, _H_MARK
    head = _MSG

    def pack(seq: int, ack: bool, src: bytes,  # noqa: PLR0917
             dst: bytes, proto: int, sport: int, dport: int, status: int, seconds: int,
             mark: int, tcp_state: int, wscale_orig: int, wscale_reply: int,
             flags_orig: int, flags_reply: int, /) -> bytes:
        return head(length, CT_NEW, flags_ack if ack else flags_plain, seq, 0, family, 0,
                    0) + body(
            c_orig, src, c_dst, dst, c_proto, proto, c_sport, sport, c_dport, dport,
            h_status, (status & settable) | confirmed,
            *((h_timeout, seconds) if timeout else ()), h_mark, mark,
            *((c_tcp, tcp_state, c_wso, wscale_orig, c_wsr, wscale_reply, c_fo,
               flags_orig & kept, 0xFF, c_fr, flags_reply & kept, 0xFF) if tcp else ()))

    return pack


def encode_update(entry: Entry, seq: int, *, ack: bool = False) -> bytes:
    """``IPCTNL_MSG_CT_NEW`` changing an existing entry (ENOENT if it is missing).

    Carries the original tuple (the kernel's lookup key, with the zone), status (bits
    only grow), timeout, mark, labels, protocol info and helper; never NAT, master or
    reply tuple, which the kernel cannot change on an existing entry. The timeout is
    left out when ``entry`` has FIXED_TIMEOUT: the kernel refuses (EPERM) any timeout
    change on an entry whose timeout is fixed, and a fixed timeout does not move.
    The status keeps EXPECTED as it is: the kernel sets it on related entries (created
    with a master) and refuses (EBUSY) any update that would change it.
    """
    usual = _usual(entry)
    if usual is not None:
        family, orig, _reply, status, timeout, mark, tcp = usual
        with_tcp = tcp is not None and orig[2] == IPPROTO_TCP
        pack = usual_update_packer(family, not status & _FIXED_TIMEOUT, with_tcp)
        if tcp is not None and with_tcp:
            return pack(seq, ack, orig[0], orig[1], orig[2], orig[3], orig[4], status,
                        timeout, mark, tcp[0], tcp[1], tcp[2], tcp[3], tcp[4])
        return pack(seq, ack, orig[0], orig[1], orig[2], orig[3], orig[4], status, timeout,
                    mark, 0, 0, 0, 0, 0)
    return _encode_update(entry, seq, ack=ack)


def _encode_update(entry: Entry, seq: int, *, ack: bool = False) -> bytes:
    """:func:`encode_update`, attribute by attribute (any entry)."""
    status = entry.status
    body = _encode_tuple(CTA_TUPLE_ORIG, entry.orig) + _encode_state(
        entry, (status & SETTABLE_STATUS) | _CONFIRMED | (status & _EXPECTED),
        not status & _FIXED_TIMEOUT)
    return _MSG(NFNL_HDRLEN + len(body), CT_NEW, NLM_F_REQUEST | NLM_F_ACK if ack else
                NLM_F_REQUEST, seq, 0, entry.family, 0, 0) + body


def encode_delete(entry: Entry, seq: int, *, ack: bool = False) -> bytes:
    """``IPCTNL_MSG_CT_DELETE`` of the entry with ``entry``'s original tuple and zone."""
    body = _encode_tuple(CTA_TUPLE_ORIG, entry.orig)
    if entry.zone:
        body += _U16_ATTR(_H_ZONE, entry.zone)
    return _MSG(NFNL_HDRLEN + len(body), CT_DELETE, NLM_F_REQUEST | NLM_F_ACK if ack else
                NLM_F_REQUEST, seq, 0, entry.family, 0, 0) + body


def encode_dump_request(seq: int, family: int = 0) -> bytes:
    """``IPCTNL_MSG_CT_GET`` dump request for ``family`` (0: every family)."""
    return _MSG(NFNL_HDRLEN, CT_GET, NLM_F_REQUEST | NLM_F_DUMP, seq, 0, family, 0, 0)
