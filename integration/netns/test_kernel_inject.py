"""The injector against the real kernel: a few thousand mixed entries into a fresh table.

Every entry written must be in the table and equal to its source as ``conntrack -L -o
extended,labels`` (conntrack-tools, the reference) prints it, except the conntrack id and
counters, with the timeout at most 2 s lower. Fields the text form cannot carry (TCP
window scales and flags, the master tuple) are checked on our own dump. Upserting
existing entries updates them; every refused entry is reported with its own errno;
deletes work (missing entries count as applied).

The namespace gets the lab firewall ruleset, which uses ``ct label``: without such a
ruleset the kernel silently drops labels (see the ctnetlink notes).
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import math
import socket
from collections.abc import Iterator, Sequence

import pytest
import trio

from integration.netns import firewall
from integration.netns.lab import Lab, Netns
from replicator import colpack, inject, record
from replicator.ctformat import parse_conntrack_output, text_projection
from replicator.ctnetlink import clean_tcp_flags
from replicator.external import commit_entry
from replicator.kernel import EntryError, InjectResult
from replicator.kernel_linux import LinuxKernel, dump
from replicator.model import (
    AF_INET,
    AF_INET6,
    IPPROTO_ICMP,
    IPPROTO_ICMPV6,
    IPPROTO_TCP,
    IPPROTO_UDP,
    CtTuple,
    Entry,
    EntryKey,
    Status,
    TcpFlag,
    TcpInfo,
    TcpState,
    invert,
)
from replicator.netns import entered

PER_KIND = 400  # 8 kinds: 3,200 entries, more than one batch
REPLIED = int(Status.SEEN_REPLY | Status.ASSURED)
ESTABLISHED = TcpInfo(TcpState.ESTABLISHED, 7, 7,
                      int(TcpFlag.WINDOW_SCALE | TcpFlag.SACK_PERM | TcpFlag.MAXACK_SET),
                      int(TcpFlag.WINDOW_SCALE | TcpFlag.SACK_PERM | TcpFlag.DATA_UNACKNOWLEDGED))


def ip(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


def labels(*bits: int) -> bytes:
    value = 0
    for bit in bits:
        value |= 1 << bit
    return value.to_bytes(16, "little")


CLIENT4, SERVER4, OTHER4, VIP4, VIP4B, FW4 = map(
    ip, ("10.1.0.0", "192.0.2.10", "192.0.2.20", "198.51.100.1", "198.51.100.2", "203.0.113.1"))
SERVER6, VIP6 = ip("fd00:2::10"), ip("fd00:2::1")


def client4(i: int) -> bytes:
    return bytes([10, 1, i >> 8, i & 255])


def client6(i: int) -> bytes:
    return ip(f"fd00:1::{i + 1:x}")


def mixed_entries(n: int = PER_KIND) -> list[Entry]:
    """``8 * n`` entries: TCP SNAT and DNAT, UDP with labels, UDP in a zone, ICMP, IPv6
    TCP with marks, IPv6 UDP with labels, ICMPv6. Reply tuples are all distinct."""
    out: list[Entry] = []
    for i in range(n):
        c4, c6 = client4(i), client6(i)
        o = CtTuple(c4, SERVER4, IPPROTO_TCP, 20000 + i, 80)
        out.append(Entry(AF_INET, o, CtTuple(SERVER4, VIP4, IPPROTO_TCP, 80, 30000 + i),
                         status=REPLIED, timeout=3000 + i, mark=i % 3, tcp=ESTABLISHED))
        o = CtTuple(c4, FW4, IPPROTO_TCP, 40000 + i, 8080)  # DNAT and SNAT
        out.append(Entry(AF_INET, o, CtTuple(OTHER4, VIP4B, IPPROTO_TCP, 80, 30000 + i),
                         status=REPLIED, timeout=7200, mark=0x2A, tcp=ESTABLISHED))
        o = CtTuple(c4, SERVER4, IPPROTO_UDP, 20000 + i, 53)
        out.append(Entry(AF_INET, o, CtTuple(SERVER4, VIP4, IPPROTO_UDP, 53, 30000 + i),
                         status=REPLIED if i % 2 else 0, timeout=120, mark=0,
                         labels=labels(7, i % 128)))
        o = CtTuple(c4, SERVER4, IPPROTO_UDP, 20000 + i, 5003)
        out.append(Entry(AF_INET, o, invert(o), zone=3, status=REPLIED, timeout=60, mark=0))
        o = CtTuple(c4, SERVER4, IPPROTO_ICMP, icmp_type=8, icmp_id=i)
        out.append(Entry(AF_INET, o, CtTuple(SERVER4, VIP4, IPPROTO_ICMP, icmp_type=0,
                                             icmp_id=i), status=int(Status.SEEN_REPLY),
                         timeout=30, mark=0))
        o = CtTuple(c6, SERVER6, IPPROTO_TCP, 20000 + i, 443)
        out.append(Entry(AF_INET6, o, CtTuple(SERVER6, VIP6, IPPROTO_TCP, 443, 30000 + i),
                         status=REPLIED, timeout=5000, mark=0x100 + i, tcp=ESTABLISHED))
        o = CtTuple(c6, SERVER6, IPPROTO_UDP, 20000 + i, 5002)
        out.append(Entry(AF_INET6, o, CtTuple(SERVER6, VIP6, IPPROTO_UDP, 5002, 30000 + i),
                         status=REPLIED, timeout=100, mark=0, labels=labels(i % 128, 127)))
        o = CtTuple(c6, SERVER6, IPPROTO_ICMPV6, icmp_type=128, icmp_id=i)
        out.append(Entry(AF_INET6, o, invert(o), status=int(Status.SEEN_REPLY), timeout=30,
                         mark=0))
    return out


@pytest.fixture
def standby(netlab: Lab) -> Netns:
    ns = netlab.netns("sb")
    firewall.load_ruleset(ns)
    return ns


@pytest.fixture
def sock(standby: Netns) -> Iterator[socket.socket]:
    with entered(standby.name):
        s = inject.open_socket()
    with s:
        yield s


def upsert(sock: socket.socket, entries: Sequence[Entry]) -> InjectResult:
    return trio.run(inject.upsert, sock, entries)


def delete(sock: socket.socket, entries: Sequence[Entry]) -> InjectResult:
    return trio.run(inject.delete, sock, entries)


def listed(ns: Netns) -> dict[EntryKey, Entry]:
    """The table as ``conntrack -L -o extended,labels`` prints it, by key."""
    text = firewall.conntrack(ns, ["-L", "-o", "extended,labels"])
    return {e.key: e for e in parse_conntrack_output(text)}


def assert_listed_as(ns: Netns, entries: Sequence[Entry]) -> None:
    """The table holds exactly ``entries`` as far as ``conntrack -L`` can tell."""
    table = listed(ns)
    assert set(table) == {e.key for e in entries}
    for source in entries:
        copy = table[source.key]
        want = text_projection(source)
        assert copy._replace(timeout=None) == want._replace(timeout=None), source
        assert copy.timeout is not None and want.timeout is not None
        assert want.timeout - 2 <= copy.timeout <= want.timeout, source


def test_every_entry_is_written_exactly(standby: Netns, sock: socket.socket) -> None:
    entries = mixed_entries()
    assert upsert(sock, entries) == (len(entries), [])
    assert_listed_as(standby, entries)
    # What the text form cannot show: window scales, and the TCP flags minus the
    # transient sequence-tracking bits (MAXACK_SET, DATA_UNACKNOWLEDGED).
    dumped = {e.key: e for e in trio.run(dump, standby.name)}
    for source in entries:
        if source.tcp is not None:
            tcp = dumped[source.key].tcp
            assert tcp == source.tcp._replace(flags_orig=clean_tcp_flags(source.tcp.flags_orig),
                                              flags_reply=clean_tcp_flags(source.tcp.flags_reply))
            assert tcp.flags_orig == tcp.flags_reply == TcpFlag.WINDOW_SCALE | TcpFlag.SACK_PERM


def test_upsert_of_existing_entries_updates_them(standby: Netns,
                                                 sock: socket.socket) -> None:
    entries = mixed_entries(100)
    assert upsert(sock, entries) == (len(entries), [])
    changed = [e._replace(timeout=(e.timeout or 0) + 500, mark=(e.mark or 0) + 1,
                          status=e.status | REPLIED,
                          labels=labels(3) if e.labels is not None else None)
               for e in entries[::2]]
    assert upsert(sock, changed) == (len(changed), [])
    assert_listed_as(standby, changed + entries[1::2])


def test_a_mix_of_new_and_existing_entries_in_either_order(standby: Netns,
                                                          sock: socket.socket) -> None:
    """Creates after ENOENT (update first) carry the NAT too; updates after EEXIST work."""
    entries = mixed_entries(200)
    old, new = entries[: len(entries) // 2], entries[len(entries) // 2 :]
    assert upsert(sock, old) == (len(old), [])
    changed = [e._replace(mark=(e.mark or 0) + 5) for e in old]
    assert trio.run(functools.partial(inject.upsert, update_first=True), sock,
                    new + changed) == (len(entries), [])
    assert_listed_as(standby, changed + new)


def test_refused_entries_are_reported_each_with_its_errno(standby: Netns,
                                                          sock: socket.socket) -> None:
    entries = mixed_entries(300)
    # Scattered through several batches: a TCP state the kernel rejects (ERANGE) ...
    bad_state = {i: entries[i]._replace(tcp=TcpInfo(99)) for i in range(5, len(entries), 499)
                 if entries[i].tcp is not None}
    # ... a related entry whose master exists nowhere (ENOENT), and one whose master
    # comes *after* it in the same upsert (installed first, so it works).
    master = entries[8]
    orphan_tuple = CtTuple(client4(999), SERVER4, IPPROTO_TCP, 1, 21)
    orphan = Entry(AF_INET, CtTuple(client4(999), SERVER4, IPPROTO_TCP, 2, 20),
                   invert(CtTuple(client4(999), SERVER4, IPPROTO_TCP, 2, 20)),
                   status=REPLIED, timeout=100, mark=0, tcp=ESTABLISHED, master=orphan_tuple)
    related = orphan._replace(orig=CtTuple(client4(998), SERVER4, IPPROTO_TCP, 2, 20),
                              reply=invert(CtTuple(client4(998), SERVER4, IPPROTO_TCP, 2, 20)),
                              master=master.orig)
    sent = [related, orphan] + [bad_state.get(i, e) for i, e in enumerate(entries)]
    result = upsert(sock, sent)
    expected = [EntryError(orphan, errno.ENOENT)] + [
        EntryError(e, errno.ERANGE) for e in bad_state.values()]
    assert len(bad_state) >= 3
    assert sorted(result.errors) == sorted(expected)
    assert result.applied == len(sent) - len(expected)
    good = [related] + [e for i, e in enumerate(entries) if i not in bad_state]
    assert_listed_as(standby, good)
    assert {e.key: e.master for e in trio.run(dump, standby.name)}[related.key] == master.orig

    # An update the kernel refuses: status bits cannot be cleared (EBUSY).
    unassured = entries[0]._replace(status=0)
    assert upsert(sock, [unassured, entries[1]]) == (1, [EntryError(unassured, errno.EBUSY)])


def test_delete_removes_entries_and_ignores_missing_ones(standby: Netns,
                                                         sock: socket.socket) -> None:
    entries = mixed_entries(200)
    assert upsert(sock, entries) == (len(entries), [])
    gone, kept = entries[::3], [e for i, e in enumerate(entries) if i % 3]
    missing = [e._replace(orig=e.orig._replace(src=ip("10.9.9.9" if e.family == AF_INET
                                                      else "fd00:9::9")))
               for e in entries[:10]]
    assert delete(sock, gone + missing) == (len(gone) + len(missing), [])
    assert_listed_as(standby, kept)
    assert delete(sock, gone) == (len(gone), [])


class CountingSocket:
    """The injector socket, counting the ENOBUFS errors the kernel reports on it."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.enobufs = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, data: bytes, /) -> int:
        return self.sock.send(data)

    def recv_into(self, buffer: bytearray, /) -> int:
        try:
            return self.sock.recv_into(buffer)
        except OSError as exc:
            self.enobufs += exc.errno == errno.ENOBUFS
            raise


def test_lost_replies_are_recovered_by_verification(standby: Netns,
                                                    sock: socket.socket) -> None:
    entries = mixed_entries(100)
    assert upsert(sock, entries) == (len(entries), [])
    # A receive buffer of a few replies, while the batches are planned for a large one:
    # the EEXIST and ERANGE replies of a batch overflow it and the kernel drops them.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
    changed = [e._replace(mark=(e.mark or 0) + 9) for e in entries]
    bad = [i for i in range(3, len(changed), 97) if changed[i].tcp is not None]
    for i in bad:
        changed[i] = changed[i]._replace(tcp=TcpInfo(99))
    counting = CountingSocket(sock)
    job = inject.Injection.upsert(changed, reply_budget=100_000)
    result = trio.run(inject.run, counting, job)
    assert counting.enobufs > 0
    assert sorted(result.errors) == sorted(EntryError(changed[i], errno.ERANGE) for i in bad)
    assert result.applied == len(changed) - len(bad)
    assert_listed_as(standby, [entries[i] if i in bad else e for i, e in enumerate(changed)])


@pytest.mark.parametrize("believed", [False, True], ids=["creates", "believed_existing"])
def test_a_commit_of_records_writes_what_an_upsert_of_their_entries_would(
        standby: Netns, believed: bool) -> None:
    """``LinuxKernel.upsert_records`` (a takeover's commit): the usual entries go
    straight from their records, the others (labels, a zone, ICMP), those that exist
    already and those without a deadline through the injector; the table ends up as
    an upsert of ``commit_entry`` of every record would leave it. With ``believed``,
    every third record is passed as one the kernel holds (``existing``: updated
    first): a belief right for some (every fifth entry exists, in another state) and
    wrong for others, which must change nothing but the speed."""
    entries = mixed_entries(150)
    existing = [e._replace(mark=(e.mark or 0) + 9) for e in entries[::5]]
    liberal = int(TcpFlag.BE_LIBERAL)

    async def main() -> tuple[InjectResult, list[Entry]]:
        async with LinuxKernel(standby.name) as kernel:
            assert await kernel.upsert(existing) == (len(existing), [])
            now = trio.current_time()
            records = [record.pack(e, now + e.timeout if i % 7 else math.inf)
                       for i, e in enumerate(entries) if e.timeout is not None]
            expected = [commit_entry(r, now, no_timeout=180, tcp_flags=liberal)
                        for r in records]
            held = records[::3] if believed else []
            result = await kernel.upsert_records(
                [r for r in records if r not in held] if believed else records, now,
                no_timeout=180, tcp_flags=liberal, existing=held)
            return result, expected

    result, expected = trio.run(main)
    assert_committed(standby, result, expected)


def assert_committed(standby: Netns, result: InjectResult, expected: Sequence[Entry], *,
                     replies: bool = False) -> None:
    """Every entry of a commit was applied and is in the table as ``expected`` (TCP
    entries with BE_LIBERAL in both directions, as the commit asked; with ``replies``,
    also the exact reply tuple and mark, which ``conntrack -L`` shows only in part)."""
    assert result == (len(expected), [])
    assert_listed_as(standby, expected)
    dumped = {e.key: e for e in trio.run(dump, standby.name)}
    for want in expected:
        got = dumped[want.key]
        if replies:
            assert got.mark == want.mark and got.reply == want.reply, want
        if want.tcp is not None:
            tcp = got.tcp
            assert tcp is not None and tcp.flags_orig & tcp.flags_reply & TcpFlag.BE_LIBERAL


def usual_kinds(n: int) -> list[Entry]:
    """``16 * n`` entries of the kinds a commit builds by column
    (:mod:`replicator.colpack`): IPv4 and IPv6, TCP and UDP, each not NAT'd, with
    source NAT, destination NAT and both. Original and reply tuples all distinct."""
    out: list[Entry] = []
    for i in range(n):
        for family, client, server, vip, other in (
                (AF_INET, client4(i), SERVER4, VIP4, OTHER4),
                (AF_INET6, client6(i), SERVER6, VIP6, ip("fd00:2::20"))):
            for proto in (IPPROTO_TCP, IPPROTO_UDP):
                for kind in range(4):
                    o = CtTuple(client, server, proto, 20000 + i, 1000 + kind)
                    r = invert(o)
                    if kind & 1:  # source NAT
                        r = r._replace(dst=vip, dport=30000 + 4 * i + kind)
                    if kind & 2:  # destination NAT
                        r = r._replace(src=other, sport=8000 + kind)
                    out.append(Entry(family, o, r, status=REPLIED, timeout=600 + i,
                                     mark=i % 3,
                                     tcp=ESTABLISHED if proto == IPPROTO_TCP else None))
    return out


def test_a_commit_of_the_usual_kinds_built_by_column_is_listed_exactly(
        standby: Netns) -> None:
    """The usual entries of a commit, their requests built many at a time by byte
    column (:mod:`replicator.colpack`, none left to the per-record encoder), are in the
    kernel as an upsert of their ``commit_entry`` would have left them."""
    entries = usual_kinds(40)
    liberal = int(TcpFlag.BE_LIBERAL)

    async def main() -> tuple[InjectResult, list[Entry]]:
        async with LinuxKernel(standby.name) as kernel:
            now = trio.current_time()
            records = [record.pack(e, now + e.timeout) for e in entries
                       if e.timeout is not None]
            runs, rest = colpack.plan_creates(records, now, liberal)
            assert (len(runs), rest) == (16, [])
            expected = [commit_entry(r, now, no_timeout=180, tcp_flags=liberal)
                        for r in records]
            result = await kernel.upsert_records(records, now, no_timeout=180,
                                                 tcp_flags=liberal)
            return result, expected

    result, expected = trio.run(main)
    assert_committed(standby, result, expected, replies=True)
