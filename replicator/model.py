"""The conntrack entry model: immutable, hashable, cheap to build.

Everything is a ``NamedTuple``: construction is a ``tuple.__new__`` (the decoder builds
one per kernel event, on the hot path), equality and hashing come for free, and msgpack
can serialise the fields directly.

Partial entries
---------------
Kernel events are partial (see ``../shared/notes/ctnetlink.md``): UPDATE events omit
labels and the mark unless they changed, DESTROY events carry no timeout. Every field
that an event may omit is ``Optional``: ``None`` means *not present in this message*,
never "zero". :func:`merge` folds a partial entry into the cached full one. The codec
fills the defaults a *full* message implies (a dump or a NEW event without ``CTA_MARK``
means mark 0).
"""

from __future__ import annotations

import enum
from typing import NamedTuple

AF_INET = 2
AF_INET6 = 10

IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_DCCP = 33
IPPROTO_GRE = 47
IPPROTO_ICMPV6 = 58
IPPROTO_SCTP = 132
IPPROTO_UDPLITE = 136

#: Protocols whose tuples carry 16-bit source/destination ports (GRE: the call keys).
PORT_PROTOCOLS = frozenset(
    {IPPROTO_TCP, IPPROTO_UDP, IPPROTO_DCCP, IPPROTO_SCTP, IPPROTO_UDPLITE, IPPROTO_GRE}
)
ICMP_PROTOCOLS = frozenset({IPPROTO_ICMP, IPPROTO_ICMPV6})


class Status(enum.IntFlag):
    """``enum ip_conntrack_status`` bits (include/uapi/linux/netfilter/nf_conntrack_common.h)."""

    EXPECTED = 1 << 0
    SEEN_REPLY = 1 << 1
    ASSURED = 1 << 2
    CONFIRMED = 1 << 3
    SRC_NAT = 1 << 4
    DST_NAT = 1 << 5
    SEQ_ADJUST = 1 << 6
    SRC_NAT_DONE = 1 << 7
    DST_NAT_DONE = 1 << 8
    DYING = 1 << 9
    FIXED_TIMEOUT = 1 << 10
    TEMPLATE = 1 << 11
    UNTRACKED = 1 << 12
    HELPER = 1 << 13
    OFFLOAD = 1 << 14
    HW_OFFLOAD = 1 << 15


class TcpState(enum.IntEnum):
    """``enum tcp_conntrack``."""

    NONE = 0
    SYN_SENT = 1
    SYN_RECV = 2
    ESTABLISHED = 3
    FIN_WAIT = 4
    CLOSE_WAIT = 5
    LAST_ACK = 6
    TIME_WAIT = 7
    CLOSE = 8
    SYN_SENT2 = 9


class TcpFlag(enum.IntFlag):
    """``IP_CT_TCP_FLAG_*`` (per direction)."""

    WINDOW_SCALE = 0x01
    SACK_PERM = 0x02
    CLOSE_INIT = 0x04
    BE_LIBERAL = 0x08
    DATA_UNACKNOWLEDGED = 0x10
    MAXACK_SET = 0x20
    CHALLENGE_ACK = 0x40
    SIMULTANEOUS_OPEN = 0x80


class SctpState(enum.IntEnum):
    """``enum sctp_conntrack``."""

    NONE = 0
    CLOSED = 1
    COOKIE_WAIT = 2
    COOKIE_ECHOED = 3
    ESTABLISHED = 4
    SHUTDOWN_SENT = 5
    SHUTDOWN_RECD = 6
    SHUTDOWN_ACK_SENT = 7
    HEARTBEAT_SENT = 8
    HEARTBEAT_ACKED = 9  # obsolete in newer kernels, kept for decoding


class CtTuple(NamedTuple):
    """One direction of a connection.

    ``src``/``dst`` are raw network-order addresses (4 bytes for IPv4, 16 for IPv6).
    ``sport``/``dport`` are the ports for TCP, UDP, UDPLite, SCTP and DCCP, and the
    call keys for GRE. ``icmp_*`` are used for ICMP and ICMPv6 only.
    """

    src: bytes
    dst: bytes
    proto: int
    sport: int = 0
    dport: int = 0
    icmp_type: int = 0
    icmp_code: int = 0
    icmp_id: int = 0


class TcpInfo(NamedTuple):
    """``CTA_PROTOINFO_TCP``: state, window scale and flags for each direction."""

    state: int
    wscale_orig: int = 0
    wscale_reply: int = 0
    flags_orig: int = 0
    flags_reply: int = 0


class SctpInfo(NamedTuple):
    """``CTA_PROTOINFO_SCTP``: state and verification tags for each direction."""

    state: int
    vtag_orig: int = 0
    vtag_reply: int = 0


#: The canonical key of an entry: (family, zone, original tuple). The kernel's
#: conntrack id cannot be set on a copy, so it is never part of the key.
EntryKey = tuple[int, int, CtTuple]


class Entry(NamedTuple):
    """One conntrack entry, or a partial one decoded from an event (see module doc)."""

    family: int
    orig: CtTuple
    reply: CtTuple
    zone: int = 0
    status: int = 0
    #: Remaining lifetime in seconds as reported by the kernel; ``None`` if absent.
    timeout: int | None = None
    mark: int | None = None
    #: 16 bytes (128 label bits) or ``None`` when the entry has no labels.
    labels: bytes | None = None
    tcp: TcpInfo | None = None
    sctp: SctpInfo | None = None
    helper: str | None = None
    #: Original tuple of the master connection, for related (expected) entries.
    master: CtTuple | None = None
    #: The kernel's conntrack id: informational only, differs on every copy.
    id: int | None = None

    @property
    def key(self) -> EntryKey:
        """The canonical key: (family, zone, original tuple)."""
        return (self.family, self.zone, self.orig)


class EventKind(enum.IntEnum):
    """What a ctnetlink event reports."""

    NEW = 1
    UPDATE = 2
    DESTROY = 3


class CtEvent(NamedTuple):
    """A decoded conntrack event.

    ``portid`` is the netlink port id of the socket whose request caused the change
    (0 for changes caused by packets): the daemon uses it to recognise the echoes of
    its own injections.
    """

    kind: EventKind
    entry: Entry
    portid: int = 0


class NewRecord(NamedTuple):
    """A NEW event decoded straight into a record of :mod:`replicator.record` (a
    subscription's :attr:`~replicator.kernel.Subscription.records` mode): no
    :class:`Entry` is built: :func:`replicator.record.new_event_record` of the entry,
    read when the event was; its timeout and id are the event's."""

    record: bytes
    portid: int = 0


def entry_key(entry: Entry) -> EntryKey:
    """Function form of :attr:`Entry.key` (handy for ``sorted``/``map``)."""
    return (entry.family, entry.zone, entry.orig)


def merge(cached: Entry, update: Entry) -> Entry:
    """Fold a partial entry (from an event) into the cached full entry.

    Fields present in ``update`` win; fields it omits (``None``) keep the cached value.
    The two must describe the same connection (same key); this is not checked here
    because it is on the hot path and the cache looks entries up by key.
    """
    return Entry._make(
        old if new is None else new for new, old in zip(update, cached, strict=True)
    )


def snat_target(entry: Entry) -> tuple[bytes, int] | None:
    """The (address, port) the original source is translated to, or ``None``.

    Derived from the tuples, as the kernel does: the reply goes back to the
    translated source, so SNAT is in effect when the reply's destination differs
    from the original source.
    """
    o, r = entry.orig, entry.reply
    if r.dst != o.src or (o.proto in PORT_PROTOCOLS and r.dport != o.sport):
        return (r.dst, r.dport)
    return None


def dnat_target(entry: Entry) -> tuple[bytes, int] | None:
    """The (address, port) the original destination is translated to, or ``None``."""
    o, r = entry.orig, entry.reply
    if r.src != o.dst or (o.proto in PORT_PROTOCOLS and r.sport != o.dport):
        return (r.src, r.sport)
    return None


def invert(t: CtTuple) -> CtTuple:
    """The plain inverse of a tuple (what the reply tuple is without NAT).

    ICMP echo request/reply and the other query types map to their reply type the
    way ``nf_conntrack_proto_icmp`` does; other ICMP types keep theirs.
    """
    if t.proto in ICMP_PROTOCOLS:
        itype = _ICMP_INVERSE.get((t.proto, t.icmp_type), t.icmp_type)
        return CtTuple(t.dst, t.src, t.proto, 0, 0, itype, t.icmp_code, t.icmp_id)
    return CtTuple(t.dst, t.src, t.proto, t.dport, t.sport)


# ICMP echo/timestamp/info/address-mask requests and their replies (ICMPv4), and
# ICMPv6 echo/node-info requests and replies.
_ICMP_INVERSE: dict[tuple[int, int], int] = {
    (IPPROTO_ICMP, 8): 0,
    (IPPROTO_ICMP, 0): 8,
    (IPPROTO_ICMP, 13): 14,
    (IPPROTO_ICMP, 14): 13,
    (IPPROTO_ICMP, 15): 16,
    (IPPROTO_ICMP, 16): 15,
    (IPPROTO_ICMP, 17): 18,
    (IPPROTO_ICMP, 18): 17,
    (IPPROTO_ICMPV6, 128): 129,
    (IPPROTO_ICMPV6, 129): 128,
    (IPPROTO_ICMPV6, 139): 140,
    (IPPROTO_ICMPV6, 140): 139,
}
