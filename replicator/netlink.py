"""Generic netlink framing for ``NETLINK_NETFILTER``: headers, attributes, errors.

Pure and allocation-light: everything works on ``bytes``/``memoryview`` offsets with
precompiled :class:`struct.Struct` objects, because the conntrack decoder built on top
of it runs once per kernel event. Layouts (all host byte order unless noted)::

    struct nlmsghdr { u32 len; u16 type; u16 flags; u32 seq; u32 pid; }   16 bytes
    struct nfgenmsg { u8 family; u8 version; be16 res_id; }                4 bytes
    struct nlattr   { u16 len; u16 type; }  payload, padded to 4 bytes
    struct nlmsgerr { s32 error; struct nlmsghdr request; ... }

Malformed input raises :class:`~replicator.errors.NetlinkDecodeError`, never anything else.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import NamedTuple

from .errors import NetlinkDecodeError

NETLINK_NETFILTER = 12

# Message types common to every netlink family.
NLMSG_NOOP = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLMSG_OVERRUN = 4

# Header flags.
NLM_F_REQUEST = 0x001
NLM_F_MULTI = 0x002
NLM_F_ACK = 0x004
NLM_F_ECHO = 0x008
NLM_F_DUMP_INTR = 0x010
NLM_F_ROOT = 0x100
NLM_F_MATCH = 0x200
NLM_F_DUMP = NLM_F_ROOT | NLM_F_MATCH
# Flags of "new" requests (same bits as ROOT/MATCH, meaning depends on the request).
NLM_F_REPLACE = 0x100
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400

# Attribute type flags, and the mask that strips them.
NLA_F_NESTED = 0x8000
NLA_F_NET_BYTEORDER = 0x4000
NLA_TYPE_MASK = 0x3FFF

# nfnetlink: message type = subsystem << 8 | subsystem's message.
NFNL_SUBSYS_CTNETLINK = 1
NFNETLINK_V0 = 0

NLMSG_HDR = struct.Struct("=IHHII")
NFGENMSG = struct.Struct("=BBH")
NLA_HDR = struct.Struct("=HH")
NLMSG_HDRLEN = NLMSG_HDR.size
#: Header plus nfgenmsg: where the attributes of an nfnetlink message start.
NFNL_HDRLEN = NLMSG_HDRLEN + NFGENMSG.size
NLA_HDRLEN = NLA_HDR.size
_ERRNO = struct.Struct("=i")


def align(n: int) -> int:
    """Round ``n`` up to the 4-byte netlink alignment."""
    return (n + 3) & ~3


class Message(NamedTuple):
    """One netlink message inside a datagram: header fields and payload bounds."""

    type: int
    flags: int
    seq: int
    pid: int
    #: Offset of the first payload byte (just after the 16-byte header).
    start: int
    #: Offset one past the last byte of this message (``start + len - 16``).
    end: int


def iter_messages(buf: bytes | memoryview) -> Iterator[Message]:
    """Walk the netlink messages of one datagram.

    Raises :class:`NetlinkDecodeError` if a header is truncated or a length points
    outside the datagram.
    """
    off = 0
    size = len(buf)
    while off < size:
        if size - off < NLMSG_HDRLEN:
            raise NetlinkDecodeError(f"truncated netlink header at offset {off}")
        length, mtype, flags, seq, pid = NLMSG_HDR.unpack_from(buf, off)
        end = off + length
        if length < NLMSG_HDRLEN or end > size:
            raise NetlinkDecodeError(f"bad netlink message length {length} at offset {off}")
        yield Message(mtype, flags, seq, pid, off + NLMSG_HDRLEN, end)
        off += align(length)


def iter_attrs(buf: bytes | memoryview, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """Walk the attributes in ``buf[start:end]``: yields ``(type, payload_start, payload_end)``.

    The type has the NESTED/NET_BYTEORDER flags stripped. Raises
    :class:`NetlinkDecodeError` on a truncated or overlong attribute.
    """
    off = start
    while off < end:
        if end - off < NLA_HDRLEN:
            raise NetlinkDecodeError(f"truncated attribute header at offset {off}")
        alen, atype = NLA_HDR.unpack_from(buf, off)
        if alen < NLA_HDRLEN or off + alen > end:
            raise NetlinkDecodeError(f"bad attribute length {alen} at offset {off}")
        yield atype & NLA_TYPE_MASK, off + NLA_HDRLEN, off + alen
        off += (alen + 3) & ~3


def error_code(buf: bytes | memoryview, msg: Message) -> int:
    """The positive errno of an ``NLMSG_ERROR`` message (0 for an ACK).

    The kernel sends ``-errno``; the sign is dropped rather than trusted.
    """
    if msg.end - msg.start < _ERRNO.size:
        raise NetlinkDecodeError("truncated NLMSG_ERROR")
    err: int = _ERRNO.unpack_from(buf, msg.start)[0]
    return abs(err)


def done_code(buf: bytes | memoryview, msg: Message) -> int:
    """The positive errno an ``NLMSG_DONE`` may carry (0 when the dump succeeded)."""
    if msg.end - msg.start < _ERRNO.size:
        return 0
    err: int = _ERRNO.unpack_from(buf, msg.start)[0]
    return -err if err < 0 else 0
