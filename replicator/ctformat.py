"""The ``conntrack -L -o extended`` text form of an entry: format and parse.

Used to show entries to operators the way they know them, and to compare the kernel's
table as ``conntrack`` (conntrack-tools 1.4.7, libnetfilter_conntrack 1.0.9) prints it
with what replicator decoded. A line looks like::

    ipv4     2 tcp      6 119 TIME_WAIT src=10.0.1.2 dst=10.0.2.2 sport=60600 dport=80 \
src=10.0.2.2 dst=10.0.2.1 sport=80 dport=60600 [ASSURED] mark=42 zone=7 helper=ftp \
labels=3,100

Field order follows libnetfilter_conntrack's ``__snprintf_conntrack_default``: family
name and number, protocol name and number, timeout, TCP/SCTP state, original tuple
(``src= dst=`` then ``sport= dport=``, ``type= code= id=`` for ICMP/ICMPv6 or
``srckey= dstkey=`` for GRE), ``[UNREPLIED]`` when SEEN_REPLY is not set, reply tuple,
one of ``[HW_OFFLOAD]``/``[OFFLOAD]``/``[ASSURED]`` (in that priority), ``mark=``,
``zone=`` (only when non-zero), ``helper=``, ``labels=``.

Dropped, because they are volatile or differ on every copy of an entry: ``use=``,
``id=``, counters (``packets= bytes=``), timestamps (``delta-time=``, ``[start=...]``,
``[stop=...]``), ``secmark=``/``secctx=`` and the per-direction ``zone-orig=``/
``zone-reply=``. The parser skips them when present.

What the text form cannot carry (see :func:`text_projection`): status bits other than
SEEN_REPLY/ASSURED/OFFLOAD/HW_OFFLOAD, TCP window scales and flags, SCTP vtags, DCCP
state, the master tuple and the conntrack id.

Labels: ``conntrack`` prints label *names* from ``/etc/xtables/connlabel.conf`` and only
with ``-o extended,labels``. replicator writes each set bit as its decimal number
(``labels=3,100``), which is exactly what ``conntrack`` prints with a connlabel.conf that
names every bit by its number. Bit ``i`` is bit ``i % 8`` of byte ``i // 8`` of the 16
label bytes (the kernel's layout on little-endian hosts).
"""

from __future__ import annotations

import socket

from .errors import DecodeError
from .model import (
    AF_INET,
    AF_INET6,
    ICMP_PROTOCOLS,
    IPPROTO_DCCP,
    IPPROTO_GRE,
    IPPROTO_ICMP,
    IPPROTO_ICMPV6,
    IPPROTO_SCTP,
    IPPROTO_TCP,
    IPPROTO_UDP,
    IPPROTO_UDPLITE,
    CtTuple,
    Entry,
    SctpInfo,
    SctpState,
    Status,
    TcpInfo,
    TcpState,
)

_FAMILY_NAMES = {AF_INET: "ipv4", AF_INET6: "ipv6"}
_FAMILIES = {v: k for k, v in _FAMILY_NAMES.items()}
_PROTO_NAMES = {
    IPPROTO_ICMP: "icmp", IPPROTO_TCP: "tcp", IPPROTO_UDP: "udp", IPPROTO_DCCP: "dccp",
    IPPROTO_GRE: "gre", IPPROTO_ICMPV6: "icmpv6", IPPROTO_SCTP: "sctp",
    IPPROTO_UDPLITE: "udplite",
}
#: Protocols printed with ``sport=``/``dport=`` (GRE has keys, ICMP type/code/id).
_PORT_PRINTED = frozenset({IPPROTO_TCP, IPPROTO_UDP, IPPROTO_UDPLITE, IPPROTO_SCTP,
                           IPPROTO_DCCP})
_TCP_STATES = {s.name: s.value for s in TcpState}
_SCTP_STATES = {s.name: s.value for s in SctpState}
#: Tokens of the volatile or unsupported fields the parser skips.
_SKIPPED_KEYS = frozenset({"use", "id", "packets", "bytes", "delta-time", "secmark", "secctx",
                           "zone-orig", "zone-reply"})
_LABEL_BITS = 128


def visible_status(status: int) -> int:
    """The part of ``status`` the text form shows: SEEN_REPLY and one offload/assured flag."""
    shown = status & Status.SEEN_REPLY
    for flag in (Status.HW_OFFLOAD, Status.OFFLOAD, Status.ASSURED):
        if status & flag:
            return shown | flag
    return shown


def text_projection(entry: Entry) -> Entry:
    """``entry`` reduced to what its text form carries (what :func:`parse_conntrack_line`
    of :func:`format_entry` gives back)."""
    proto = entry.orig.proto
    tcp = entry.tcp if proto == IPPROTO_TCP else None
    sctp = entry.sctp if proto == IPPROTO_SCTP else None
    return entry._replace(
        status=visible_status(entry.status),
        labels=entry.labels if entry.labels and any(entry.labels) else None,
        tcp=None if tcp is None else TcpInfo(tcp.state if tcp.state < len(TcpState) else 0),
        sctp=None if sctp is None else SctpInfo(
            sctp.state if sctp.state < len(SctpState) else 0),
        master=None,
        id=None,
    )


# --- formatting -----------------------------------------------------------------------


def _addr(family: int, raw: bytes) -> str:
    return socket.inet_ntop(socket.AF_INET6 if family == AF_INET6 else socket.AF_INET, raw)


def _tuple_text(family: int, t: CtTuple) -> str:
    text = f"src={_addr(family, t.src)} dst={_addr(family, t.dst)}"
    if t.proto in _PORT_PRINTED:
        return f"{text} sport={t.sport} dport={t.dport}"
    if t.proto == IPPROTO_GRE:
        return f"{text} srckey={t.sport:#x} dstkey={t.dport:#x}"
    if t.proto in ICMP_PROTOCOLS:
        return f"{text} type={t.icmp_type} code={t.icmp_code} id={t.icmp_id}"
    return text


def _labels_text(labels: bytes) -> str:
    value = int.from_bytes(labels, "little")
    return ",".join(str(bit) for bit in range(len(labels) * 8) if value >> bit & 1)


def format_entry(entry: Entry) -> str:
    """The normalised ``conntrack -L -o extended,labels`` line of ``entry`` (module doc)."""
    family, proto = entry.family, entry.orig.proto
    parts = [f"{_FAMILY_NAMES.get(family, 'unknown'):<8} {family}",
             f"{_PROTO_NAMES.get(proto, 'unknown'):<8} {proto}"]
    if entry.timeout is not None:
        parts.append(str(entry.timeout))
    if proto == IPPROTO_TCP and entry.tcp is not None:
        state = entry.tcp.state
        parts.append(TcpState(state).name if state < len(TcpState) else "NONE")
    elif proto == IPPROTO_SCTP and entry.sctp is not None:
        state = entry.sctp.state
        parts.append(SctpState(state).name if state < len(SctpState) else "NONE")
    parts.append(_tuple_text(family, entry.orig))
    if not entry.status & Status.SEEN_REPLY:
        parts.append("[UNREPLIED]")
    parts.append(_tuple_text(family, entry.reply))
    flag = visible_status(entry.status) & ~Status.SEEN_REPLY
    if flag:
        parts.append(f"[{Status(flag).name}]")
    if entry.mark is not None:
        parts.append(f"mark={entry.mark}")
    if entry.zone:
        parts.append(f"zone={entry.zone}")
    if entry.helper is not None:
        parts.append(f"helper={entry.helper}")
    if entry.labels and any(entry.labels):
        parts.append(f"labels={_labels_text(entry.labels)}")
    return " ".join(parts)


# --- parsing --------------------------------------------------------------------------


def _bad(line: str, why: str) -> DecodeError:
    return DecodeError(f"cannot parse conntrack line ({why}): {line!r}")


def _int(line: str, text: str, bits: int = 32) -> int:
    """An unsigned field of ``bits`` bits, decimal or 0x-hex as conntrack prints them."""
    try:
        value = int(text, 16) if text.startswith("0x") else int(text, 10)
    except ValueError:
        raise _bad(line, f"bad number {text!r}") from None
    if not 0 <= value < 1 << bits or not text.isascii():
        raise _bad(line, f"{text!r} is not a {bits}-bit unsigned number")
    return value


class _Tokens:
    """A cursor over the ``key=value`` and bare tokens of one line."""

    def __init__(self, line: str) -> None:
        self.line = line
        self.items = line.split()
        self.pos = 0

    def peek(self) -> str | None:
        return self.items[self.pos] if self.pos < len(self.items) else None

    def take(self) -> str:
        token = self.peek()
        if token is None:
            raise _bad(self.line, "truncated")
        self.pos += 1
        return token

    def value(self, key: str) -> str:
        token = self.take()
        name, sep, value = token.partition("=")
        if not sep or name != key:
            raise _bad(self.line, f"expected {key}=, got {token!r}")
        return value


def _parse_tuple(tokens: _Tokens, family: int, proto: int) -> CtTuple:
    af = socket.AF_INET6 if family == AF_INET6 else socket.AF_INET
    try:
        src = socket.inet_pton(af, tokens.value("src"))
        dst = socket.inet_pton(af, tokens.value("dst"))
    except (OSError, ValueError):  # ValueError: an embedded NUL character
        raise _bad(tokens.line, "bad address") from None
    line = tokens.line
    if proto in _PORT_PRINTED:
        return CtTuple(src, dst, proto, _int(line, tokens.value("sport"), 16),
                       _int(line, tokens.value("dport"), 16))
    if proto == IPPROTO_GRE:
        return CtTuple(src, dst, proto, _int(line, tokens.value("srckey"), 16),
                       _int(line, tokens.value("dstkey"), 16))
    if proto in ICMP_PROTOCOLS:
        itype = _int(line, tokens.value("type"), 8)
        icode = _int(line, tokens.value("code"), 8)
        return CtTuple(src, dst, proto, 0, 0, itype, icode, _int(line, tokens.value("id"), 16))
    return CtTuple(src, dst, proto)


def _skip_counters(tokens: _Tokens) -> None:
    while (token := tokens.peek()) is not None and token.partition("=")[0] in (
            "packets", "bytes", "zone-orig", "zone-reply"):
        tokens.take()


def _parse_labels(line: str, text: str) -> bytes | None:
    value = 0
    for name in filter(None, text.split(",")):
        bit = _int(line, name, 7)  # 0..127
        value |= 1 << bit
    return value.to_bytes(_LABEL_BITS // 8, "little") if value else None


def parse_conntrack_line(line: str) -> Entry:
    """Parse one line of ``conntrack -L -o extended[,labels]`` into an :class:`Entry`.

    The result holds only what the text carries (see :func:`text_projection`); labels
    must be printed as bit numbers (module doc). Raises :class:`DecodeError`.
    """
    tokens = _Tokens(line)
    family = _FAMILIES.get(tokens.take())
    if family is None or _int(line, tokens.take(), 8) != family:
        raise _bad(line, "unknown family")
    tokens.take()  # protocol name: the number that follows is authoritative
    proto = _int(line, tokens.take(), 8)
    timeout = None
    if (token := tokens.peek()) is not None and token.isdigit():
        timeout = _int(line, tokens.take())
    tcp = sctp = None
    if (token := tokens.peek()) is not None and "=" not in token and not token.startswith("["):
        state = tokens.take()
        if proto == IPPROTO_TCP:
            tcp = TcpInfo(_TCP_STATES.get(state, 0))
        elif proto == IPPROTO_SCTP:
            sctp = SctpInfo(_SCTP_STATES.get(state, 0))
    orig = _parse_tuple(tokens, family, proto)
    _skip_counters(tokens)
    status = int(Status.SEEN_REPLY)
    if tokens.peek() == "[UNREPLIED]":
        tokens.take()
        status = 0
    reply = _parse_tuple(tokens, family, proto)
    _skip_counters(tokens)
    mark = None
    zone = 0
    helper = labels = None
    while (token := tokens.peek()) is not None:
        tokens.take()
        if token.startswith("["):
            flag = token.strip("[]")
            if flag in ("ASSURED", "OFFLOAD", "HW_OFFLOAD"):
                status |= Status[flag]
            # Anything else in brackets is a timestamp ([start=...]/[stop=...]): skip
            # its words up to the closing bracket.
            elif not token.endswith("]"):
                while not tokens.take().endswith("]"):
                    pass
            continue
        key, sep, value = token.partition("=")
        if not sep:
            raise _bad(line, f"unexpected token {token!r}")
        if key == "mark":
            mark = _int(line, value)
        elif key == "zone":
            zone = _int(line, value, 16)
        elif key == "helper":
            helper = value
        elif key == "labels":
            labels = _parse_labels(line, value)
        elif key not in _SKIPPED_KEYS:
            raise _bad(line, f"unknown field {key!r}")
    return Entry(family, orig, reply, zone=zone, status=status, timeout=timeout, mark=mark,
                 labels=labels, tcp=tcp, sctp=sctp, helper=helper)


def parse_conntrack_output(text: str) -> list[Entry]:
    """Every entry of a ``conntrack -L -o extended[,labels]`` listing (blank lines and
    conntrack's trailing "flow entries have been shown" summary are ignored)."""
    return [parse_conntrack_line(line) for line in text.splitlines()
            if line.strip() and "flow entries have been shown" not in line]
