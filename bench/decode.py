"""Decode speed: replicator's ctnetlink decoder vs pyroute2's generic one, same messages.

``.venv/bin/python -m bench.decode [tests/data/ctnetlink.bin]`` prints messages per
second for both on the captured real kernel messages. :func:`measure_decode` is also used
by ``bench/kernel.py``.

The pyroute2 path here (:func:`pyroute2_events`, :func:`pyroute2_dump`) reads every
field the model holds out of pyroute2's ``nfct_msg`` so both sides do the same work; the
unit tests use it as the independent oracle for the fast decoder.
"""

from __future__ import annotations

import socket
import struct
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from replicator import ctnetlink
from replicator.model import (
    ICMP_PROTOCOLS,
    PORT_PROTOCOLS,
    CtEvent,
    CtTuple,
    Entry,
    EventKind,
    SctpInfo,
    TcpInfo,
)
from replicator.netlink import NLM_F_CREATE, NLMSG_DONE, NLMSG_HDR


def _addr(ip: Any, name: str) -> bytes | None:
    value = ip.get_attr(name)
    if value is None:
        return None
    return socket.inet_pton(socket.AF_INET6 if "V6" in name else socket.AF_INET, value)


def pyroute2_tuple(nla: Any) -> CtTuple:
    """A :class:`CtTuple` from a decoded pyroute2 ``cta_tuple`` attribute."""
    ip, l4 = nla.get_attr("CTA_TUPLE_IP"), nla.get_attr("CTA_TUPLE_PROTO")
    src = _addr(ip, "CTA_IP_V4_SRC") or _addr(ip, "CTA_IP_V6_SRC")
    dst = _addr(ip, "CTA_IP_V4_DST") or _addr(ip, "CTA_IP_V6_DST")
    assert src is not None and dst is not None
    proto = l4.get_attr("CTA_PROTO_NUM")
    if proto in ICMP_PROTOCOLS:
        v = "V6" if l4.get_attr("CTA_PROTO_ICMPV6_TYPE") is not None else ""
        return CtTuple(src, dst, proto, 0, 0, l4.get_attr(f"CTA_PROTO_ICMP{v}_TYPE") or 0,
                       l4.get_attr(f"CTA_PROTO_ICMP{v}_CODE") or 0,
                       l4.get_attr(f"CTA_PROTO_ICMP{v}_ID") or 0)
    if proto in PORT_PROTOCOLS:
        return CtTuple(src, dst, proto, l4.get_attr("CTA_PROTO_SRC_PORT") or 0,
                       l4.get_attr("CTA_PROTO_DST_PORT") or 0)
    return CtTuple(src, dst, proto)


def _helper(raw: str | None) -> str | None:
    # pyroute2 maps CTA_HELP as a flat string, but the kernel nests CTA_HELP_NAME in
    # it: strip the 4-byte inner attribute header and the terminating NUL.
    if raw is None:
        return None
    return raw[4:].split("\0", 1)[0]


def pyroute2_entry(msg: Any, full: bool) -> Entry:
    """An :class:`Entry` from a decoded pyroute2 ``nfct_msg`` (``full``: absent mark = 0)."""
    tcp = sctp = None
    info = msg.get_attr("CTA_PROTOINFO")
    if info is not None:
        t = info.get_attr("CTA_PROTOINFO_TCP")
        if t is not None:
            fo = t.get_attr("CTA_PROTOINFO_TCP_FLAGS_ORIGINAL")
            fr = t.get_attr("CTA_PROTOINFO_TCP_FLAGS_REPLY")
            tcp = TcpInfo(t.get_attr("CTA_PROTOINFO_TCP_STATE"),
                          t.get_attr("CTA_PROTOINFO_TCP_WSCALE_ORIGINAL") or 0,
                          t.get_attr("CTA_PROTOINFO_TCP_WSCALE_REPLY") or 0,
                          fo[0] if fo else 0, fr[0] if fr else 0)
        s = info.get_attr("CTA_PROTOINFO_SCTP")
        if s is not None:
            sctp = SctpInfo(s.get_attr("CTA_PROTOINFO_SCTP_STATE"),
                            s.get_attr("CTA_PROTOINFO_SCTP_VTAG_ORIGINAL") or 0,
                            s.get_attr("CTA_PROTOINFO_SCTP_VTAG_REPLY") or 0)
    labels = msg.get_attr("CTA_LABELS")
    master = msg.get_attr("CTA_TUPLE_MASTER")
    mark = msg.get_attr("CTA_MARK")
    return Entry(
        family=msg["nfgen_family"],
        orig=pyroute2_tuple(msg.get_attr("CTA_TUPLE_ORIG")),
        reply=pyroute2_tuple(msg.get_attr("CTA_TUPLE_REPLY")),
        zone=msg.get_attr("CTA_ZONE") or 0,
        status=msg.get_attr("CTA_STATUS") or 0,
        timeout=msg.get_attr("CTA_TIMEOUT"),
        mark=0 if mark is None and full else mark,
        # pyroute2 reads the 16 label bytes as two native u64 into one integer.
        labels=None if labels is None else labels.to_bytes(16, sys.byteorder),
        tcp=tcp,
        sctp=sctp,
        helper=_helper(msg.get_attr("CTA_HELP")),
        master=None if master is None else pyroute2_tuple(master),
        id=msg.get_attr("CTA_ID"),
    )


def _pyroute2_messages(buf: bytes) -> list[tuple[int, int, int, Any]]:
    from pyroute2.netlink.nfnetlink.nfctsocket import nfct_msg

    out = []
    off = 0
    while off < len(buf):
        length, mtype, flags, _seq, pid = NLMSG_HDR.unpack_from(buf, off)
        msg = None
        if mtype in (ctnetlink.CT_NEW, ctnetlink.CT_DELETE):
            msg = nfct_msg(buf[off : off + length])
            msg.decode()
        out.append((mtype, flags, pid, msg))
        off += (length + 3) & ~3
    return out


def pyroute2_events(buf: bytes) -> list[CtEvent]:
    """pyroute2's reading of an event datagram, same semantics as ``decode_events``."""
    events = []
    for mtype, flags, pid, msg in _pyroute2_messages(buf):
        if msg is None:
            continue
        if mtype == ctnetlink.CT_DELETE:
            kind = EventKind.DESTROY
        else:
            kind = EventKind.NEW if flags & NLM_F_CREATE else EventKind.UPDATE
        events.append(CtEvent(kind, pyroute2_entry(msg, kind == EventKind.NEW), pid))
    return events


def pyroute2_dump(buf: bytes) -> tuple[list[Entry], bool]:
    """pyroute2's reading of a dump datagram, same semantics as ``decode_dump``."""
    entries: list[Entry] = []
    for mtype, _flags, _pid, msg in _pyroute2_messages(buf):
        if mtype == NLMSG_DONE:
            return entries, True
        if msg is not None and mtype == ctnetlink.CT_NEW:
            entries.append(pyroute2_entry(msg, True))
    return entries, False


def split_messages(datagrams: Sequence[bytes]) -> list[bytes]:
    """Every netlink message of ``datagrams`` as its own single-message datagram."""
    out = []
    for buf in datagrams:
        off = 0
        while off < len(buf):
            (length,) = struct.unpack_from("=I", buf, off)
            out.append(buf[off : off + length])
            off += (length + 3) & ~3
    return out


def _rate(decode: Callable[[bytes], object], messages: Sequence[bytes],
          min_seconds: float) -> float:
    # CPU time of this process, not wall time: the host is shared, and the question is
    # what one core can decode.
    rounds = 0
    start = time.process_time()
    elapsed = 0.0
    while elapsed < min_seconds:
        for m in messages:
            decode(m)
        rounds += 1
        elapsed = time.process_time() - start
    return rounds * len(messages) / elapsed


def measure_decode(messages: Sequence[bytes], min_seconds: float = 0.5) -> dict[str, float]:
    """Messages per second of CPU time (one message per datagram) for both decoders.

    Keys: ``own_msgs_per_s``, ``pyroute2_msgs_per_s``, ``speedup``. ``messages`` are
    single-message datagrams (see :func:`split_messages`), decoded as events.
    """
    own = _rate(ctnetlink.decode_events, messages, min_seconds)
    theirs = _rate(pyroute2_events, messages, min_seconds)
    return {"own_msgs_per_s": own, "pyroute2_msgs_per_s": theirs, "speedup": own / theirs}


def _event_messages(path: Path) -> list[bytes]:
    from integration.netns.capture import EVENT, load

    return split_messages([d for kind, d in load(path) if kind == EVENT])


def main(argv: Sequence[str]) -> None:
    path = Path(argv[0] if argv else "tests/data/ctnetlink.bin")
    messages = _event_messages(path)
    result = measure_decode(messages)
    print(f"{len(messages)} captured event messages")
    print(f"own decoder:      {result['own_msgs_per_s']:10,.0f} msg/s")
    print(f"pyroute2 decoder: {result['pyroute2_msgs_per_s']:10,.0f} msg/s")
    print(f"speedup:          {result['speedup']:10.1f}x")


if __name__ == "__main__":
    main(sys.argv[1:])
