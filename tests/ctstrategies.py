"""Hypothesis building blocks for conntrack tuples, shared by the codec and text-form tests."""

from __future__ import annotations

from hypothesis import strategies as st

from replicator.model import (
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
    PORT_PROTOCOLS,
    CtTuple,
)

#: Protocols worth generating per family (50 = ESP: a protocol with no ports).
PROTOS = {
    AF_INET: [IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMP, IPPROTO_SCTP, IPPROTO_GRE,
              IPPROTO_UDPLITE, IPPROTO_DCCP, 50],
    AF_INET6: [IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMPV6, IPPROTO_SCTP, IPPROTO_GRE, 50],
}
u8 = st.integers(0, 255)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)


@st.composite
def tuples(draw: st.DrawFn, family: int, proto: int) -> CtTuple:
    """A tuple of ``family``/``proto`` with the fields that protocol carries."""
    size = 4 if family == AF_INET else 16
    src = draw(st.binary(min_size=size, max_size=size))
    dst = draw(st.binary(min_size=size, max_size=size))
    if proto in ICMP_PROTOCOLS:
        return CtTuple(src, dst, proto, 0, 0, draw(u8), draw(u8), draw(u16))
    if proto in PORT_PROTOCOLS:
        return CtTuple(src, dst, proto, draw(u16), draw(u16))
    return CtTuple(src, dst, proto)
