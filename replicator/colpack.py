"""A commit's create requests built many at a time, one byte column at a time (pure).

A takeover writes the whole external cache into the kernel. Built one by one from
their records (:func:`replicator.bulkwrite.commit_encoder`: one unpack, one pack per
entry), the requests cost ≈ 2.5 µs of Python per entry, as much as the kernel's own work
on them, and the commit takes the larger of the two. But the records of one usual shape
all have one size, and the create requests of one shape and one kind of NAT all have
one layout, in which most bytes are constants (attribute headers) and the others copies
of the record's bytes: addresses, ports, the mark and TCP info are big endian in both.
So a batch of *k* requests is the template repeated *k* times, then, for each byte a
request takes from its record, one extended-slice copy over the *k* records at once
(``out[o::size] = joined[p::record_size]``): a loop in C per byte column instead of
Python per entry. The status and the TCP flags are masked through a byte translation
table on the way; the sequence numbers and the remaining timeouts are computed for the
whole batch and copied in the same way.

The requests are byte for byte those of the per-record encoder (a property test holds
them so); a record that is not of a usual shape, not TCP or UDP, in a zone, or without
a finite deadline is left to it (:func:`plan_creates`).
"""

from __future__ import annotations

import functools
import math
import struct
from array import array
from collections.abc import Callable, Sequence
from typing import NamedTuple

from . import bytecols, ctnetlink
from . import record as R
from .model import IPPROTO_TCP, IPPROTO_UDP
from .netlink import NFNL_HDRLEN, NLM_F_ACK

_SEQ_MASK = 0xFFFFFFFF
#: A remaining timeout must fit the request's 32 bits.
_MAX_TIMEOUT = 0xFFFFFFFF
#: Where the nlmsghdr's flags (native u16) and sequence number (native u32) are.
_FLAGS_AT, _SEQ_AT = 6, 8
#: Where a record's deadline is (big endian double, the header's first field).
_DEADLINE_AT = 0
#: By protocol number: 0 for TCP and UDP (the usual entries), 1 for any other.
_NOT_TCP_UDP = bytecols.table(lambda x: x not in (IPPROTO_TCP, IPPROTO_UDP))
#: By protocol number: 0 for TCP, 1 for any other.
_NOT_TCP = bytecols.table(IPPROTO_TCP.__ne__)
if array("I").itemsize != 4:  # pragma: no cover - every Linux ABI Python runs on
    raise ImportError("colpack needs a 4-byte array('I')")


class _Shape(NamedTuple):
    """What :func:`plan_creates` reads in every record of one usual shape."""

    family: int
    size: int
    #: (offset, size) of each field the record's unpack returns, by index.
    fields: tuple[tuple[int, int], ...]
    reply: int | None
    mark: int
    tcp: int | None


@functools.cache
def _shape(shape: int) -> _Shape | None:
    found = R.usual_format(shape)
    if found is None:
        return None
    fmt, reply, mark, tcp = found
    return _Shape(shape >> 8, struct.calcsize(fmt),
                  tuple((off, size) for off, size, _code in bytecols.struct_items(fmt)),
                  reply, mark, tcp)


class CreateColumns:
    """Builds the create requests of records of one usual shape and one kind of NAT,
    with the commit's ``tcp_flags``; each request :attr:`size` bytes."""

    def __init__(self, shape: _Shape, snat: bool, dnat: bool, tcp: bool,
                 tcp_flags: int) -> None:
        family, fields = shape.family, shape.fields
        fmt, items = ctnetlink.usual_create_format(family, snat, dnat, tcp)
        zero = bytes(ctnetlink.ADDR_SIZE[family])
        #: A request with every variable field zero (the status CONFIRMED).
        self.template = ctnetlink.usual_create_packer(family, snat, dnat, tcp)(
            0, False, zero, zero, 0, 0, 0, zero, 0, zero, 0, 0, 0, 0, 0, 0, 0, 0, 0)
        self.size = len(self.template)
        self.record_size = shape.size
        flags = struct.unpack_from("=H", self.template, _FLAGS_AT)[0]
        #: The flags of a batch's last request (it asks for the ACK).
        self._ack_flags = struct.pack("=H", flags | NLM_F_ACK)
        t, rp = shape.tcp, shape.reply
        source = {"src": R.U_SRC, "dst": R.U_DST, "proto": R.U_PROTO, "sport": R.U_SPORT,
                  "dport": R.U_DPORT, "status": R.U_STATUS, "mark": shape.mark}
        if rp is not None:
            source |= {"snat_addr": rp + 1, "snat_port": rp + 4, "dnat_addr": rp,
                       "dnat_port": rp + 3}
        if t is not None:
            source |= {"tcp_state": t, "wscale_orig": t + 1, "wscale_reply": t + 2,
                       "flags_orig": t + 3, "flags_reply": t + 4}
        flag_table = bytes(((x | tcp_flags) & ctnetlink.KEPT_TCP_FLAGS) & 0xFF
                           for x in range(256))
        settable, confirmed = ctnetlink.SETTABLE_STATUS, ctnetlink.CONFIRMED
        copies: list[tuple[int, int]] = []
        masked: list[tuple[int, int, bytes]] = []
        timeout_at = -1
        for name, (body_off, size, _code) in zip(items, bytecols.struct_items(fmt), strict=True):
            off = NFNL_HDRLEN + body_off
            if not name:
                continue
            if name == "timeout":
                timeout_at = off
                continue
            rec_off, rec_size = fields[source[name]]
            if rec_size != size:
                raise ValueError(f"{name}: {rec_size} bytes in the record, {size} in the request")
            for i in range(size):
                if name == "status":
                    shift = 8 * (size - 1 - i)
                    m, c = (settable >> shift) & 0xFF, (confirmed >> shift) & 0xFF
                    masked.append((off + i, rec_off + i, bytes((x & m) | c for x in range(256))))
                elif name.startswith("flags_"):
                    masked.append((off + i, rec_off + i, flag_table))
                else:
                    copies.append((off + i, rec_off + i))
        if timeout_at < 0:
            raise ValueError("a create request without a timeout")
        self._copies = bytecols.copies(copies)
        self._masked = tuple(masked)
        self._timeout_at = timeout_at

    def build(self, records: Sequence[bytes], seq: int, now: float) -> bytes:
        """The requests of ``records`` (each of this shape and kind, with a finite
        deadline less than 2³² s after ``now``), sequence numbers from ``seq``, the last
        asking for the ACK: the same bytes as the per-record encoder's."""
        k, size, rsize = len(records), self.size, self.record_size
        joined = b"".join(records)
        if len(joined) != k * rsize:
            raise ValueError("records of another size than their shape's")
        out = bytecols.fill(self.template, k, joined, rsize, self._copies)
        for dst, src, table in self._masked:
            out[dst::size] = joined[src::rsize].translate(table)
        seqs = array("I", range(seq, seq + k) if seq + k <= _SEQ_MASK + 1
                     else [(seq + i) & _SEQ_MASK for i in range(k)]).tobytes()
        bytecols.scatter(out, size, _SEQ_AT, 4, seqs)
        # max(1, ceil(deadline - now)) of each, in C loops (d + -now is d - now exactly).
        left = list(map(math.ceil, map((-now).__add__, deadlines(joined, k, rsize))))
        if min(left) < 1:
            left = [max(1, t) for t in left]
        timeouts = array("I", left)
        if bytecols.LITTLE:
            timeouts.byteswap()  # big endian, as the attribute
        bytecols.scatter(out, size, self._timeout_at, 4, timeouts.tobytes())
        last = (k - 1) * size + _FLAGS_AT
        out[last:last + 2] = self._ack_flags
        return bytes(out)


def deadlines(joined: bytes, k: int, rsize: int) -> array[float]:
    """The deadlines of ``k`` records of ``rsize`` bytes each, concatenated."""
    out = array("d")
    out.frombytes(bytecols.gather(joined, rsize, k, _DEADLINE_AT, 8, reverse=bytecols.LITTLE))
    return out


def _field_pairs(shape: _Shape, a: int, b: int) -> list[tuple[int, int]]:
    (ao, size), (bo, _) = shape.fields[a], shape.fields[b]
    return [(ao + i, bo + i) for i in range(size)]


class Run(NamedTuple):
    """Records whose create requests are built together (:meth:`CreateColumns.build`)."""

    #: Builds the requests of some of :attr:`records` (in order) from a sequence number.
    build: Callable[[Sequence[bytes], int], bytes]
    #: Bytes per request.
    size: int
    records: list[bytes]


#: Fewer records than this are all left to the per-record encoder: planning and
#: building runs costs about 40 µs whatever their size (measured, a hot standby's write
#: into a namespace, to the ``sendto``: 1 record 78 µs by run, 41 one by one; 16
#: records 88 and 86 µs; 64: 107 and 220 µs).
MIN_PLANNED = 16


def plan_creates(records: Sequence[bytes], now: float, tcp_flags: int
                 ) -> tuple[list[Run], list[bytes]]:
    """Split ``records`` into runs of one shape and one kind of NAT each (each run's
    records in their order), and the records left to the per-record encoder (any other
    shape, protocol or zone, a deadline that is not finite or too far; all of them if
    they are fewer than :data:`MIN_PLANNED`). The order of the requests is not the
    records': a commit's creates do not depend on each other (those that do, of related
    entries, are not of a usual shape)."""
    if len(records) < MIN_PLANNED:
        return [], list(records)
    h, flags_at = R.HEADER_SIZE, R.FLAGS_AT
    by_shape: dict[int, list[bytes]] = {}
    rest: list[bytes] = []
    one = R.one_shape(records)
    if one is not None:
        by_shape[one[0]] = list(records)
    for rec in () if one is not None else records:
        try:
            family = rec[h]
            shape = family << 8 | rec[flags_at[family]]
        except (IndexError, KeyError):
            rest.append(rec)
            continue
        group = by_shape.get(shape)
        if group is None:
            by_shape[shape] = [rec]
        else:
            group.append(rec)
    runs: list[Run] = []
    for shape_id, group in by_shape.items():
        found = _shape(shape_id)
        if found is None:
            rest += group
            continue
        joined = one[1] if one is not None else None
        for columns, members in _runs(found, group, now, tcp_flags, rest, joined=joined):
            runs.append(Run(functools.partial(columns.build, now=now), columns.size, members))
    return runs, rest


def _runs(shape: _Shape, group: list[bytes], now: float, tcp_flags: int,
          rest: list[bytes], *, joined: bytes | None = None,
          ) -> list[tuple[CreateColumns, list[bytes]]]:
    """The runs of ``group``, records of ``shape`` (``joined``: if known, the records
    joined), adding to ``rest`` those left to the per-record encoder."""
    rsize, k = shape.size, len(group)
    if joined is None:
        if set(map(len, group)) != {rsize}:  # not the shape's size: the slow way for all
            rest += group
            return []
        joined = b"".join(group)
    elif len(joined) != k * rsize:  # one size (checked), but not the shape's
        rest += group
        return []
    # Zone 0, TCP or UDP, a deadline the request can carry.
    zone_at = shape.fields[R.U_ZONE][0]
    protocols = joined[shape.fields[R.U_PROTO][0]::rsize]
    bad = (int.from_bytes(joined[zone_at::rsize]) | int.from_bytes(joined[zone_at + 1::rsize])
           | int.from_bytes(protocols.translate(_NOT_TCP_UDP)))
    bad = int.from_bytes(bad.to_bytes(k).translate(bytecols.NONZERO))
    limit = now + (_MAX_TIMEOUT - 1)  # a margin for the subtraction's rounding
    ds = deadlines(joined, k, rsize)
    total = sum(ds)
    # Every deadline finite and near enough (the sum is NaN with a NaN or with both
    # infinities), as nearly always; else the comprehension says which are not.
    if not (not math.isnan(total) and max(ds) <= limit and min(ds) > -math.inf):
        bad |= int.from_bytes(bytes(not -math.inf < d <= limit for d in ds))
    if shape.reply is None:
        kinds = bytes(k)
    else:
        rp = shape.reply
        snat = bytecols.differ(joined, rsize, k, _field_pairs(shape, rp + 1, R.U_SRC)
                       + _field_pairs(shape, rp + 4, R.U_SPORT))
        dnat = bytecols.differ(joined, rsize, k, _field_pairs(shape, rp, R.U_DST)
                       + _field_pairs(shape, rp + 3, R.U_DPORT))
        kinds = (2 * snat + dnat).to_bytes(k)
    # 4 marks a record left to the per-record encoder; 8 one whose TCP info the request
    # does not carry (not TCP: the per-record encoder leaves it out too).
    no_tcp = (int.from_bytes(protocols.translate(_NOT_TCP)) if shape.tcp is not None
              else int.from_bytes(b"\1" * k))
    kinds = (int.from_bytes(kinds) | 4 * bad | 8 * no_tcp).to_bytes(k)
    first = kinds[0]
    split: dict[int, list[bytes]]
    split = {first: group} if kinds.count(first) == k else bytecols.groups(kinds, group)
    runs = []
    for kind, members in split.items():
        if kind & 4:
            rest += members
        else:
            runs.append((_columns(shape, bool(kind & 2), bool(kind & 1), not kind & 8,
                                  tcp_flags), members))
    return runs



_COLUMNS: dict[tuple[_Shape, bool, bool, bool, int], CreateColumns] = {}


def _columns(shape: _Shape, snat: bool, dnat: bool, tcp: bool, tcp_flags: int
             ) -> CreateColumns:
    key = (shape, snat, dnat, tcp, tcp_flags)
    found = _COLUMNS.get(key)
    if found is None:
        found = _COLUMNS[key] = CreateColumns(shape, snat, dnat, tcp, tcp_flags)
    return found
