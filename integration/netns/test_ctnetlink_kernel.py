"""The ctnetlink codec against a real kernel: what we encode is what the table holds.

Entries are injected with ``encode_create`` on a raw NETLINK_NETFILTER socket in a lab
namespace, then read back twice: with our ``decode_dump`` and with
``conntrack -L -o extended,labels`` (parsed by ``ctformat``); both must agree with each
other and with what was injected. The update and delete paths, the kernel's refusals
(EEXIST, ENOENT, status that would shrink) and the portid of our echoes are checked too.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Sequence
from pathlib import Path

import pytest

from bench.decode import pyroute2_dump, pyroute2_events
from integration.netns.capture import (
    DUMP,
    EVENT,
    FIXTURE,
    TEXT,
    capture,
    conntrack_listing,
    dump,
    load,
    open_socket,
    request,
)
from integration.netns.lab import Lab, Netns
from replicator import ctnetlink as ct
from replicator.ctformat import parse_conntrack_output, text_projection
from replicator.model import (
    AF_INET,
    AF_INET6,
    IPPROTO_GRE,
    IPPROTO_ICMP,
    IPPROTO_ICMPV6,
    IPPROTO_SCTP,
    IPPROTO_TCP,
    IPPROTO_UDP,
    CtTuple,
    Entry,
    EntryKey,
    EventKind,
    SctpInfo,
    SctpState,
    Status,
    TcpFlag,
    TcpInfo,
    TcpState,
    dnat_target,
    invert,
    snat_target,
)

# `ct label set` in a loaded rule is what makes the kernel keep labels at all; the nat
# chain registers NAT in the namespace. Neither rule matches anything we inject.
RULESET = """
table inet codec {
    chain pre {
        type filter hook prerouting priority 0;
        meta mark 0x7fffffff ct label set 127
    }
    chain post {
        type nat hook postrouting priority srcnat;
    }
}
"""


def v4(*octets: int) -> bytes:
    return bytes([10, 99, *octets])


def v6(last: int) -> bytes:
    return bytes.fromhex("fd99" + "00" * 13) + bytes([last])


SEEN = int(Status.SEEN_REPLY | Status.ASSURED)
WS = int(TcpFlag.WINDOW_SCALE | TcpFlag.SACK_PERM)
DIRTY = WS | int(TcpFlag.MAXACK_SET | TcpFlag.DATA_UNACKNOWLEDGED)
LABELS = bytes([0x08] + [0] * 11 + [0x10, 0, 0, 0])  # bits 3 and 100


def _tcp(src: bytes, dst: bytes, sport: int, dport: int) -> CtTuple:
    return CtTuple(src, dst, IPPROTO_TCP, sport, dport)


def _entries() -> list[Entry]:
    """One entry per case the brief names (NAT, mark, zone, labels, protocols, helper)."""
    t1 = _tcp(v4(1, 1), v4(2, 1), 40001, 80)
    t2 = _tcp(v4(1, 2), v4(9, 9), 40002, 8080)
    t3 = _tcp(v4(1, 3), v4(9, 9), 40003, 8080)
    t6 = _tcp(v6(1), v6(2), 40004, 443)
    udp = CtTuple(v4(1, 5), v4(2, 5), IPPROTO_UDP, 5353, 53)
    icmp = CtTuple(v4(1, 6), v4(2, 6), IPPROTO_ICMP, 0, 0, 8, 0, 4242)
    icmp6 = CtTuple(v6(6), v6(7), IPPROTO_ICMPV6, 0, 0, 128, 0, 4243)
    sctp = CtTuple(v4(1, 8), v4(2, 8), IPPROTO_SCTP, 5000, 38412)
    gre = CtTuple(v4(1, 9), v4(2, 9), IPPROTO_GRE, 0x1234, 0xABCD)
    ftp = _tcp(v4(1, 10), v4(2, 10), 40010, 21)
    data = _tcp(v4(1, 10), v4(2, 10), 40011, 10000)
    established = TcpInfo(TcpState.ESTABLISHED, 7, 9, DIRTY, DIRTY)
    return [
        # SNAT (masquerade to 10.99.3.1:1024), mark, window scaling with dirty flags.
        Entry(AF_INET, t1, invert(t1)._replace(dst=v4(3, 1), dport=1024), status=SEEN,
              timeout=300, mark=7, tcp=established),
        # DNAT 8080 -> 10.99.2.2:80, zone, labels.
        Entry(AF_INET, t2, invert(t2)._replace(src=v4(2, 2), sport=80), zone=5,
              status=SEEN, timeout=300, labels=LABELS, tcp=established),
        # SNAT and DNAT together.
        Entry(AF_INET, t3, invert(t3)._replace(src=v4(2, 3), sport=80, dst=v4(3, 1),
                                               dport=2000),
              status=SEEN, timeout=300, tcp=established),
        # IPv6 SNAT with labels.
        Entry(AF_INET6, t6, invert(t6)._replace(dst=v6(99), dport=3000), status=SEEN,
              timeout=300, labels=LABELS, tcp=established),
        Entry(AF_INET, udp, invert(udp), timeout=30, mark=0),            # unreplied UDP
        Entry(AF_INET, icmp, invert(icmp), status=int(Status.SEEN_REPLY), timeout=30),
        Entry(AF_INET6, icmp6, invert(icmp6), status=int(Status.SEEN_REPLY), timeout=30),
        Entry(AF_INET, sctp, invert(sctp), status=SEEN, timeout=300,
              sctp=SctpInfo(SctpState.ESTABLISHED, 0xDEADBEEF, 0x01020304)),
        Entry(AF_INET, gre, invert(gre), status=SEEN, timeout=600),
        # Helper on the control connection, then a related entry with its master.
        Entry(AF_INET, ftp, invert(ftp), status=SEEN, timeout=300, helper="ftp",
              tcp=established),
        # (EXPECTED as the kernel reports related entries: not sent on create.)
        Entry(AF_INET, data, invert(data), status=SEEN | Status.EXPECTED, timeout=120,
              master=ftp, tcp=established),
    ]


def _namespace(netlab: Lab) -> Netns:
    ns = netlab.netns("ct")
    ns.nft(RULESET)
    return ns


def _inject(sock: socket.socket, messages: Sequence[bytes]) -> list[int]:
    """Send ``messages`` (each asking for an ACK); the errno of each, in order."""
    return [err for _, err in sorted(request(sock, list(messages)))]


def _table(sock: socket.socket) -> dict[EntryKey, Entry]:
    return {e.key: e for d in dump(sock) for e in ct.decode_dump(d)[0]}


def _check_injected(kernel: Entry, sent: Entry) -> None:
    """``kernel`` (dumped) is what creating ``sent`` must give."""
    assert kernel.orig == sent.orig
    assert kernel.reply == sent.reply     # the kernel rebuilt the translated reply tuple
    assert (kernel.zone, kernel.labels, kernel.helper, kernel.master) == (
        sent.zone, sent.labels, sent.helper, sent.master)
    assert kernel.mark == (sent.mark or 0)
    assert sent.timeout is not None and kernel.timeout is not None
    assert sent.timeout - 2 <= kernel.timeout <= sent.timeout
    settable = int(Status.SEEN_REPLY | Status.ASSURED | Status.FIXED_TIMEOUT | Status.CONFIRMED)
    assert kernel.status & settable == ct.settable_status(sent.status)
    assert bool(kernel.status & Status.SRC_NAT) == (snat_target(sent) is not None)
    assert bool(kernel.status & Status.DST_NAT) == (dnat_target(sent) is not None)
    assert bool(kernel.status & Status.EXPECTED) == (sent.master is not None)
    if sent.tcp is not None:
        # Flags arrive cleaned; both carry WINDOW_SCALE, so both scales are applied.
        assert kernel.tcp == sent.tcp._replace(
            flags_orig=ct.clean_tcp_flags(sent.tcp.flags_orig),
            flags_reply=ct.clean_tcp_flags(sent.tcp.flags_reply))
    assert kernel.sctp == sent.sctp


def test_created_entries_read_back_identically(netlab: Lab) -> None:
    ns = _namespace(netlab)
    sock = open_socket(ns)
    try:
        sent = _entries()
        errors = _inject(sock, [ct.encode_create(e, seq, ack=True)
                                for seq, e in enumerate(sent, 1)])
        assert errors == [0] * len(sent), [os.strerror(e) for e in errors]
        table = _table(sock)
        assert table.keys() == {e.key for e in sent}
        for e in sent:
            _check_injected(table[e.key], e)
        # conntrack's own view of the same table agrees field by field.
        listed = {e.key: e for e in parse_conntrack_output(conntrack_listing(ns))}
        assert listed.keys() == table.keys()
        for key, text_entry in listed.items():
            kernel_entry = text_projection(table[key])
            assert text_entry.timeout is not None and kernel_entry.timeout is not None
            assert abs(text_entry.timeout - kernel_entry.timeout) <= 2
            assert text_entry._replace(timeout=None) == kernel_entry._replace(timeout=None)
    finally:
        sock.close()


def test_update_changes_state_and_delete_removes(netlab: Lab) -> None:
    ns = _namespace(netlab)
    sock = open_socket(ns)
    try:
        sent = _entries()
        assert _inject(sock, [ct.encode_create(e, s, ack=True)
                              for s, e in enumerate(sent, 1)]) == [0] * len(sent)
        # Updates: new timeout, mark, labels and TCP state; status only grows.
        snat, zoned, _, _, udp, *_, ftp, related = sent
        assert snat.tcp is not None
        changes = [
            snat._replace(timeout=1000, mark=99, tcp=snat.tcp._replace(state=TcpState.FIN_WAIT)),
            zoned._replace(timeout=50, labels=bytes(15) + b"\x80"),
            udp._replace(timeout=200, status=int(Status.SEEN_REPLY), mark=None),
            ftp._replace(timeout=100, mark=1),       # same helper again: accepted
            related._replace(timeout=60, mark=2),    # master not resent on update
        ]
        assert _inject(sock, [ct.encode_update(e, s, ack=True)
                              for s, e in enumerate(changes, 100)]) == [0] * len(changes)
        table = _table(sock)
        after = [table[e.key] for e in changes]
        for kernel, change in zip(after, changes, strict=True):
            assert change.timeout is not None and kernel.timeout is not None
            assert change.timeout - 2 <= kernel.timeout <= change.timeout
        assert after[0].mark == 99
        assert after[0].tcp is not None and after[0].tcp.state == TcpState.FIN_WAIT
        assert after[0].reply == snat.reply           # NAT untouched by the update
        assert after[0].status & Status.SRC_NAT
        assert after[1].labels == bytes(15) + b"\x80"
        assert after[1].zone == zoned.zone
        assert after[2].status & Status.SEEN_REPLY    # UNREPLIED -> replied
        assert after[2].mark == 0                     # mark=None: left as it was
        assert (after[3].helper, after[3].mark) == ("ftp", 1)
        assert (after[4].master, after[4].mark) == (ftp.orig, 2)
        # A status that would drop SEEN_REPLY/ASSURED is refused: bits only grow.
        shrink = ct.encode_update(zoned._replace(status=0), 200, ack=True)
        assert _inject(sock, [shrink]) == [errno.EBUSY]
        # FIXED_TIMEOUT: the kernel refuses any later timeout change (EPERM), so the
        # encoder leaves the timeout out and updates of such entries keep working.
        fixed = changes[0]._replace(status=SEEN | Status.FIXED_TIMEOUT, timeout=50)
        assert _inject(sock, [ct.encode_update(fixed, 201, ack=True),
                              ct.encode_update(fixed._replace(mark=5), 202, ack=True)]) == [0, 0]
        kernel = _table(sock)[fixed.key]
        assert kernel.status & Status.FIXED_TIMEOUT
        assert kernel.mark == 5
        assert kernel.timeout is not None and kernel.timeout > 900
        raw_timeout = ct.encode_update(fixed._replace(status=SEEN), 203, ack=True)
        assert _inject(sock, [raw_timeout]) == [errno.EPERM]
        # Delete (by orig tuple and zone): gone from the dump; a second time ENOENT.
        gone = [snat, zoned]
        assert _inject(sock, [ct.encode_delete(e, s, ack=True)
                              for s, e in enumerate(gone, 300)]) == [0, 0]
        assert not {e.key for e in gone} & _table(sock).keys()
        assert _inject(sock, [ct.encode_delete(zoned, 400, ack=True)]) == [errno.ENOENT]
    finally:
        sock.close()


def test_kernel_refusals_and_unacknowledged_batches(netlab: Lab) -> None:
    ns = _namespace(netlab)
    sock = open_socket(ns)
    try:
        first, second, *_ = _entries()
        # Without ack only errors come back, so one final ACK closes a batch.
        batch = [ct.encode_create(first, 1), ct.encode_create(first, 2),
                 ct.encode_create(second, 3, ack=True)]
        sock.send(b"".join(batch))
        acks: list[tuple[int, int]] = []
        while not any(seq == 3 for seq, _ in acks):
            acks += ct.parse_acks(sock.recv(1 << 16))
        assert acks == [(2, errno.EEXIST), (3, 0)]
        missing = first._replace(orig=first.orig._replace(sport=1))
        assert _inject(sock, [ct.encode_update(missing, 4, ack=True)]) == [errno.ENOENT]
        # No CTA_TIMEOUT: the kernel refuses a create.
        untimed = missing._replace(timeout=None)
        assert _inject(sock, [ct.encode_create(untimed, 5, ack=True)]) == [errno.EINVAL]
    finally:
        sock.close()


def test_events_of_our_injections_carry_our_portid(netlab: Lab) -> None:
    ns = _namespace(netlab)
    ns.sysctl("net.netfilter.nf_conntrack_events", 1)
    events_sock = open_socket(ns, (1, 2, 3))
    sock = open_socket(ns)
    try:
        entry = _entries()[0]
        assert _inject(sock, [ct.encode_create(entry, 1, ack=True)]) == [0]
        assert _inject(sock, [ct.encode_update(entry._replace(mark=5), 2, ack=True)]) == [0]
        assert _inject(sock, [ct.encode_delete(entry, 3, ack=True)]) == [0]
        events_sock.settimeout(5)
        seen: list[tuple[EventKind, int, int | None]] = []
        while len(seen) < 3:
            seen += [(ev.kind, ev.portid, ev.entry.mark)
                     for ev in ct.decode_events(events_sock.recv(1 << 16))]
        portid = sock.getsockname()[0]
        assert seen == [(EventKind.NEW, portid, 7), (EventKind.UPDATE, portid, 5),
                        (EventKind.DESTROY, portid, 5)]
    finally:
        sock.close()
        events_sock.close()


@pytest.mark.parametrize("family", [AF_INET, AF_INET6])
def test_dump_by_family(netlab: Lab, family: int) -> None:
    ns = _namespace(netlab)
    sock = open_socket(ns)
    try:
        sent = _entries()
        assert _inject(sock, [ct.encode_create(e, s, ack=True)
                              for s, e in enumerate(sent, 1)]) == [0] * len(sent)
        sock.send(ct.encode_dump_request(7, family))
        got: list[Entry] = []
        done = False
        while not done:
            entries, done = ct.decode_dump(sock.recv(1 << 20))
            got += entries
        assert sorted(e.key for e in got) == sorted(e.key for e in sent if e.family == family)
    finally:
        sock.close()


def test_fresh_capture_decodes_like_pyroute2(tmp_path: Path) -> None:
    """The capture scenario run now (not the stored fixture): every event and dump
    message decodes as pyroute2 decodes it, and conntrack's listing matches the dump."""
    capture(tmp_path)
    records = load(tmp_path / FIXTURE)
    events = [d for kind, d in records if kind == EVENT]
    dumped = [d for kind, d in records if kind == DUMP]
    assert len(events) > 20 and dumped
    for datagram in events:
        assert ct.decode_events(datagram) == pyroute2_events(datagram)
    table = {}
    for datagram in dumped:
        assert ct.decode_dump(datagram) == pyroute2_dump(datagram)
        table.update({e.key: text_projection(e) for e in ct.decode_dump(datagram)[0]})
    listed = {e.key: e for e in parse_conntrack_output((tmp_path / TEXT).read_text())}
    assert listed.keys() == table.keys()
    for key, text_entry in listed.items():
        kernel_entry = table[key]
        assert text_entry.timeout is not None and kernel_entry.timeout is not None
        assert abs(text_entry.timeout - kernel_entry.timeout) <= 2
        assert text_entry._replace(timeout=None) == kernel_entry._replace(timeout=None)
