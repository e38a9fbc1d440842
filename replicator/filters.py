"""What is (not) replicated: a pure predicate over entries, built from plain parameters.

The sending side applies it before anything enters the sync layer
(:class:`replicator.sync.SyncSession` takes it as ``accept``). An entry is replicated
only if it passes every criterion:

- its protocol is not ignored;
- neither its *original source* nor its *reply source* lies in an ignored prefix. Those
  are the two addresses that own a connection: the one that opened it and the one that
  answers it. Ignoring the firewall's own addresses thus drops the connections it
  originates or terminates, while the connections it merely translates (whose reply
  destination is the firewall's NAT address) are kept. This is conntrackd's rule;
- if it is TCP and TCP states are given, its state is one of them (an entry whose TCP
  state is unknown, i.e. a partial entry, passes);
- if zones are given, its zone is one of them;
- if a mark mask is given, ``mark & mask == value`` (an entry without a mark counts as
  mark 0).

An entry that stops matching (e.g. its TCP state leaves the replicated set) is treated
as deleted from the local table: the peer receives a delete for it, so its copy never
lingers with a stale state. If it matches again later it is sent again in full.
"""

from __future__ import annotations

import ipaddress
import struct
from array import array
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from . import bytecols
from . import record as R
from .model import AF_INET, AF_INET6, IPPROTO_TCP, Entry, TcpState

_U32 = 0xFFFF_FFFF


def _int(address: bytes) -> int:
    return int.from_bytes(address, "big")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class EntryFilter:
    """A replication filter; call it with an entry: True means replicate."""

    ignore_protocols: frozenset[int] = frozenset()
    ignore_prefixes: tuple[Network, ...] = ()
    #: Replicated TCP states, or None for all.
    tcp_states: frozenset[int] | None = None
    #: Replicated zones, or None for all.
    zones: frozenset[int] | None = None
    mark_value: int = 0
    #: 0 disables the mark criterion.
    mark_mask: int = 0
    # Prefixes as (network, netmask) integers per family, for a fast membership test.
    _nets: dict[int, tuple[tuple[int, int], ...]] = field(init=False, repr=False, compare=False)
    # The record form's verdict by record shape (:meth:`accepts_record`), made on demand.
    _verdicts: dict[int, Callable[[bytes], bool]] = field(
        init=False, repr=False, compare=False)
    # The verdicts on many records of one shape, by shape (:meth:`verdicts`).
    _judges: dict[int, Callable[[bytes, int, int], int]] = field(
        init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        nets: dict[int, list[tuple[int, int]]] = {AF_INET: [], AF_INET6: []}
        for net in self.ignore_prefixes:
            family = AF_INET if net.version == 4 else AF_INET6
            nets[family].append((int(net.network_address), int(net.netmask)))
        object.__setattr__(self, "_nets", {f: tuple(v) for f, v in nets.items()})
        object.__setattr__(self, "_verdicts", {})
        object.__setattr__(self, "_judges", {})

    def __call__(self, entry: Entry) -> bool:
        orig, tcp = entry.orig, entry.tcp
        return self._accepts(entry.family, orig.proto, _int(orig.src), _int(entry.reply.src),
                             tcp_state=None if tcp is None else tcp.state, zone=entry.zone,
                             mark=entry.mark or 0)

    def accepts_record(self, record: bytes) -> bool:
        """``self(entry)`` for the entry in ``record`` (:mod:`replicator.record`),
        read from the record without unpacking it."""
        shape = R.usual_shape(record)
        verdict = self._verdicts.get(shape)
        if verdict is None:
            verdict = self._verdicts[shape] = self._record_verdict(shape)
        return verdict(record)

    def _record_verdict(self, shape: int) -> Callable[[bytes], bool]:
        """The verdict on records of ``shape``: one ``unpack_from`` reads every field
        the criteria need (this runs once per replicated entry on the active node, so
        it avoids slicing the record field by field)."""
        alen, proto_at, src_at, rsrc_at, mark_at, tcp_at = R.shape_filter_offsets(shape)
        family = shape >> 8
        addr = "I" if alen == 4 else f"{alen}s"
        wanted = [(proto_at, "B"), (src_at, addr), (rsrc_at, addr), (R.ZONE_AT, "H")]
        if mark_at is not None:
            wanted.append((mark_at, "I"))
        if tcp_at is not None:
            wanted.append((tcp_at, "B"))
        fmt, pos, order = ">", 0, sorted(range(len(wanted)), key=lambda i: wanted[i][0])
        for i in order:
            at, code = wanted[i]
            fmt += f"{at - pos}x{code}"
            pos = at + struct.calcsize(">" + code)
        unpack = struct.Struct(fmt).unpack_from
        # Where each value is in what ``unpack`` returns.
        ip, isrc, irsrc, izone, *more = (order.index(i) for i in range(len(wanted)))
        imark = more[0] if mark_at is not None else None
        itcp = more[-1] if tcp_at is not None else None
        accepts, wide = self._accepts, alen != 4

        def verdict(record: bytes) -> bool:
            v = unpack(record)
            src, rsrc = v[isrc], v[irsrc]
            return accepts(
                family, v[ip], _int(src) if wide else src, _int(rsrc) if wide else rsrc,
                tcp_state=None if itcp is None else v[itcp], zone=v[izone],
                mark=0 if imark is None else v[imark])

        return verdict

    def verdicts(self, records: Sequence[bytes]) -> bytes:
        """``accepts_record`` of each of ``records``, one byte each (1: accepted).

        The NEW records of a burst come in batches of one shape (one size, one
        layout): those are judged by byte column (:mod:`replicator.bytecols`), every
        criterion a translation table over one column, without Python code per
        record; any other batch one record at a time."""
        one = R.one_shape(records) if len(records) >= _MIN_COLUMNS else None
        if one is None:
            return bytes(map(self.accepts_record, records))
        shape, joined = one
        judge = self._judges.get(shape)
        if judge is None:
            judge = self._judges[shape] = self._column_judge(shape)
        k = len(records)
        return judge(joined, len(records[0]), k).to_bytes(k)

    def _column_judge(self, shape: int) -> Callable[[bytes, int, int], int]:
        """The verdicts on records of ``shape`` joined (``size`` bytes each, ``k`` of
        them), one byte per record (1: accepted) as a big integer (see :meth:`verdicts`)."""
        alen, proto_at, src_at, rsrc_at, mark_at, tcp_at = R.shape_filter_offsets(shape)
        # Each criterion: (offset, table) pairs whose translated columns are ORed into
        # one flag per record; the record is rejected when any criterion's flag is set.
        rejects: list[list[tuple[int, bytes]]] = []
        if self.ignore_protocols:
            rejects.append([(proto_at, bytecols.table(self.ignore_protocols.__contains__))])
        # An address inside a prefix: no byte the mask covers differs. ``inside`` holds,
        # per prefix and address, the (offset, "this byte differs") columns.
        inside: list[list[tuple[int, bytes]]] = []
        for net, mask in self._nets.get(shape >> 8, ()):
            nb, mb = net.to_bytes(alen, "big"), mask.to_bytes(alen, "big")
            for base in (src_at, rsrc_at):
                inside.append([(base + i, _differs(m, n))
                               for i, (m, n) in enumerate(zip(mb, nb, strict=True)) if m])
        states = self.tcp_states if tcp_at is not None else None
        mark_mask, mark_value = self.mark_mask, self.mark_value
        if mark_mask and mark_at is not None:
            mb, vb = mark_mask.to_bytes(4, "big"), mark_value.to_bytes(4, "big")
            rejects.append([(mark_at + i, _differs(m, v))
                            for i, (m, v) in enumerate(zip(mb, vb, strict=True)) if m])
        no_mark_rejects = bool(mark_mask) and mark_at is None and mark_value != 0
        zones = self.zones
        not_tcp_state = None if states is None else bytecols.table(lambda x: x not in states)
        is_tcp = bytecols.table(IPPROTO_TCP.__eq__)

        def judge(joined: bytes, size: int, k: int) -> int:
            if no_mark_rejects:  # no mark counts as 0, which the criterion refuses
                return 0
            ones = int.from_bytes(b"\1" * k)
            reject = 0
            for columns in rejects:
                for at, table in columns:
                    reject |= int.from_bytes(joined[at::size].translate(table))
            for columns in inside:
                differs = 0
                for at, table in columns:
                    differs |= int.from_bytes(joined[at::size].translate(table))
                reject |= ones ^ differs
            if not_tcp_state is not None:
                reject |= (int.from_bytes(joined[tcp_at::size].translate(not_tcp_state))
                           & int.from_bytes(joined[proto_at::size].translate(is_tcp)))
            if zones is not None:
                found = array("H")
                found.frombytes(bytecols.gather(joined, size, k, R.ZONE_AT, 2,
                                                reverse=bytecols.LITTLE))
                reject |= int.from_bytes(bytes(z not in zones for z in found))
            return ones ^ reject

        return judge

    def _accepts(self, family: int, proto: int, src: int, reply_src: int, *,
                 tcp_state: int | None, zone: int, mark: int) -> bool:
        """The verdict on what both forms of an entry hold (addresses as integers;
        ``tcp_state`` None: no TCP info, e.g. a partial entry; ``mark`` 0 also when it
        has none)."""
        if proto in self.ignore_protocols:
            return False
        nets = self._nets.get(family)
        if nets:
            for net, mask in nets:
                if src & mask == net or reply_src & mask == net:
                    return False
        if (
            self.tcp_states is not None
            and proto == IPPROTO_TCP
            and tcp_state is not None
            and tcp_state not in self.tcp_states
        ):
            return False
        if self.zones is not None and zone not in self.zones:
            return False
        return not self.mark_mask or (mark & self.mark_mask) == self.mark_value

    @property
    def accepts_everything(self) -> bool:
        """True if no criterion is set (the sync layer can skip calling the filter)."""
        return not (
            self.ignore_protocols
            or self.ignore_prefixes
            or self.tcp_states is not None
            or self.zones is not None
            or self.mark_mask
        )


#: Fewer records than this are judged one by one (as fast, for a few).
_MIN_COLUMNS = 16


def _differs(mask: int, value: int) -> bytes:
    """The translation table of the bytes whose bits under ``mask`` are not ``value``'s
    (1; 0 for the others)."""
    return bytecols.table(lambda x: x & mask != value)


def _tcp_state(state: int | str) -> int:
    try:
        return TcpState[state.upper()] if isinstance(state, str) else TcpState(state)
    except (KeyError, ValueError):
        raise ValueError(f"tcp_states: unknown TCP state {state!r}") from None


def build_filter(
    *,
    ignore_protocols: Iterable[int] = (),
    ignore_prefixes: Iterable[str | Network] = (),
    tcp_states: Iterable[int | str] | None = None,
    zones: Iterable[int] | None = None,
    mark: tuple[int, int] | None = None,
) -> EntryFilter:
    """Build an :class:`EntryFilter` from plain parameters, validating each.

    ``ignore_prefixes`` are CIDR strings (``"192.0.2.1/32"``, ``"2001:db8::/64"``; a bare
    address means a host) or ``ipaddress`` networks. ``tcp_states`` are
    :class:`~replicator.model.TcpState` values or names (``"ESTABLISHED"``). ``mark`` is
    ``(value, mask)``. An empty ``tcp_states`` or ``zones`` means no criterion, like
    None (a filter that replicates no TCP state at all is never what a configuration
    means). Raises ValueError naming the bad parameter.
    """
    protos = frozenset(ignore_protocols)
    for p in protos:
        if not 0 <= p <= 0xFF:
            raise ValueError(f"ignore_protocols: {p} is not a protocol number (0..255)")
    prefixes: list[Network] = []
    for prefix in ignore_prefixes:
        try:
            prefixes.append(ipaddress.ip_network(prefix) if isinstance(prefix, str) else prefix)
        except ValueError as exc:
            raise ValueError(f"ignore_prefixes: {exc}") from None
    states = frozenset(_tcp_state(s) for s in tcp_states or ()) or None
    zone_set = frozenset(zones or ()) or None
    for z in zone_set or ():
        if not 0 <= z <= 0xFFFF:
            raise ValueError(f"zones: {z} is not a zone id (0..65535)")
    value, mask = mark if mark is not None else (0, 0)
    if not (0 <= value <= _U32 and 0 <= mask <= _U32) or value & ~mask:
        raise ValueError("mark: value and mask must be 32-bit and value must lie within mask")
    return EntryFilter(protos, tuple(prefixes), states, zone_set, value, mask)
