"""Kernel creation times of conntrack entries, for exact per-entry replication lag.

With ``net.netfilter.nf_conntrack_timestamp`` = 1 in a namespace (the sysctl is per
namespace), the kernel stamps every entry it creates there, from a packet or from a
ctnetlink create alike, with the wall-clock time of the creation
(``ktime_get_real_ns()``), and a dump reports it (``CTA_TIMESTAMP``). Stamp the
active's namespace, where the benchmark's generator creates the entries, and a hot
standby's, where the sync daemon writes its copies: the difference between the two
stamps of one entry is that entry's replication lag, for every entry, to the
nanosecond, read after the run. Nothing polls meanwhile, so nothing competes with
the daemons for the CPU, and the figure does not depend on when a poller happened
to look (see ``lag<R>_hot_entry_*`` in ``bench/sync.py``).

Both sides read one clock (the host's; namespaces share it). The stamp costs the
kernel one clock read and 16 bytes per entry, the same for every system measured.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping

from replicator import ctnetlink
from replicator.netlink import (
    NETLINK_NETFILTER,
    NLMSG_DONE,
    NLMSG_ERROR,
    done_code,
    error_code,
    iter_attrs,
    iter_messages,
)
from replicator.netns import entered

#: ``enum ctattr_type``: CTA_TIMESTAMP; ``enum ctattr_tstamp``: its start (u64, ns, big
#: endian).
CTA_TIMESTAMP = 20
CTA_TIMESTAMP_START = 1
#: The ``nfgenmsg`` header at the start of every ctnetlink message.
NFGENMSG_LEN = 4
#: The per-namespace switch (``Netns.sysctl`` sets it); entries created while it is 1
#: are stamped.
SYSCTL = "net.netfilter.nf_conntrack_timestamp"


def creation_times(netns: str) -> dict[bytes, int]:
    """Every stamped entry of ``netns``'s table: its original tuple (the raw
    ``CTA_TUPLE_ORIG`` attribute, which names the same entry in any namespace) → its
    creation time in ns since the epoch. Entries created while stamps were off are
    left out."""
    with entered(netns):
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    with sock:
        sock.bind((0, 0))
        sock.send(ctnetlink.encode_dump_request(1))
        out: dict[bytes, int] = {}
        while True:
            data = sock.recv(1 << 20)
            for msg in iter_messages(data):
                if msg.type == NLMSG_DONE:
                    if err := done_code(data, msg):
                        raise OSError(err, f"conntrack dump in {netns} failed")
                    return out
                if msg.type == NLMSG_ERROR:
                    raise OSError(error_code(data, msg), f"conntrack dump in {netns} refused")
                key, start = _stamp(data, msg.start + NFGENMSG_LEN, msg.end)
                if key is not None and start is not None:
                    out[key] = start


def _stamp(data: bytes, start: int, end: int) -> tuple[bytes | None, int | None]:
    key: bytes | None = None
    stamp: int | None = None
    for kind, s, e in iter_attrs(data, start, end):
        if kind == ctnetlink.CTA_TUPLE_ORIG:
            key = data[s:e]
        elif kind == CTA_TIMESTAMP:
            for inner, s2, e2 in iter_attrs(data, s, e):
                if inner == CTA_TIMESTAMP_START:
                    stamp = int.from_bytes(data[s2:e2], "big")
    return key, stamp


def lags(source: Mapping[bytes, int], copy: Mapping[bytes, int]) -> list[float]:
    """Seconds from each entry's creation in ``source`` to its creation in ``copy``,
    for the entries both hold, in no particular order."""
    return [(stamp - source[key]) / 1e9 for key, stamp in copy.items() if key in source]

