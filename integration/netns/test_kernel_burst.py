"""A 100,000-entry burst overflows a small event buffer; the mirror repairs its copy.

The entries are written by a second kernel port (batched ctnetlink, as fast as the
kernel takes them): the writer is not what is under test, it stands in for traffic.
The mirror reads with a deliberately small receive buffer so that ENOBUFS must happen,
and after its repair (dump on a second socket, reconcile) its cache must equal the
kernel's table in every field, both after the creates and after the deletes.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

import pytest
import trio
import trio.testing

from integration.netns.lab import Lab
from replicator import bpf, ctnetlink, kernel_linux, record
from replicator.kernel import Overrun
from replicator.kernel_linux import LinuxKernel
from replicator.mirror import Mirror
from replicator.model import (
    AF_INET,
    IPPROTO_TCP,
    CtTuple,
    Entry,
    EntryKey,
    NewRecord,
    Status,
    TcpInfo,
    TcpState,
    invert,
)

COUNT = 100_000
#: ~200 queued events: a burst of this size cannot fit.
SMALL_RCVBUF = 128 * 1024
TIMEOUT = 3600
#: The cache holds the timeout an event or dump reported; the kernel's keeps ticking.
TIMEOUT_SLACK = 30
SETTLE_SECONDS = 120


def synthetic(count: int) -> list[Entry]:
    """``count`` distinct ESTABLISHED TCP entries, reply = plain inverse (no NAT).

    Sources walk 10.64.0.0/10 with 10 ports each, so no reply tuple is another entry's
    original or translated tuple (a clash would make the kernel answer EEXIST).
    """
    base = int(ipaddress.IPv4Address("10.64.0.0"))
    dst = ipaddress.IPv4Address("192.0.2.1").packed
    entries = []
    for i in range(count):
        src = (base + i // 10).to_bytes(4, "big")
        orig = CtTuple(src, dst, IPPROTO_TCP, 20000 + i % 10, 443)
        entries.append(Entry(
            AF_INET, orig, invert(orig), status=Status.SEEN_REPLY | Status.ASSURED,
            timeout=TIMEOUT, tcp=TcpInfo(TcpState.ESTABLISHED),
        ))
    return entries


def differences(cache: dict[EntryKey, Entry], table: list[Entry]) -> list[str]:
    """How the cache differs from a dump (empty if equal; timeouts within the slack)."""
    problems: list[str] = []
    kernel = {e.key: e for e in table}
    if len(kernel) != len(table):
        problems.append("duplicate keys in the dump")
    missing = kernel.keys() - cache.keys()
    extra = cache.keys() - kernel.keys()
    if missing or extra:
        problems.append(f"{len(missing)} entries missing, {len(extra)} extra")
    for key in kernel.keys() & cache.keys():
        ours, theirs = cache[key], kernel[key]
        if ours._replace(timeout=None) != theirs._replace(timeout=None):
            problems.append(f"differs: {ours} != {theirs}")
        elif abs((ours.timeout or 0) - (theirs.timeout or 0)) > TIMEOUT_SLACK:
            problems.append(f"timeout {ours.timeout} != {theirs.timeout}")
        if len(problems) > 5:
            break
    return problems


async def settled(mirror: Mirror, kernel: LinuxKernel) -> list[str]:
    """Wait until the mirror's cache matches a fresh dump; the last differences."""
    problems = ["not compared yet"]
    with trio.move_on_after(SETTLE_SECONDS):
        while problems:
            await mirror.wait_synced()
            await trio.sleep(0.2)  # let the event socket drain
            problems = differences(mirror.cache.snapshot(), await kernel.dump())
    return problems


async def test_burst_overflows_and_is_repaired(netlab: Lab) -> None:
    ns = netlab.netns("fw")
    entries = synthetic(COUNT)
    async with LinuxKernel(ns.name, event_rcvbuf=SMALL_RCVBUF) as port, \
            LinuxKernel(ns.name) as traffic:
        mirror = Mirror(port)
        async with trio.open_nursery() as nursery:
            await nursery.start(mirror.run)
            assert len(mirror.cache) == 0

            created = await traffic.upsert(entries)
            assert created.errors == [] and created.applied == COUNT
            assert await settled(mirror, port) == []
            assert len(mirror.cache) == COUNT
            overruns = mirror.stats.overruns
            assert overruns > 0
            assert mirror.stats.reconciliations >= 2
            # Nothing was injected through the mirror's own port: no echoes.
            assert mirror.stats.echoes == 0

            deleted = await traffic.delete(entries)
            assert deleted.errors == [] and deleted.applied == COUNT
            assert await settled(mirror, port) == []
            assert len(mirror.cache) == 0
            assert mirror.stats.overruns > overruns
            nursery.cancel_scope.cancel()


async def test_event_buffer_is_forced_beyond_rmem_max(netlab: Lab) -> None:
    ns = netlab.netns("fw")
    rmem_max = int(await trio.Path("/proc/sys/net/core/rmem_max").read_text())
    async with LinuxKernel(ns.name, event_rcvbuf=4 * rmem_max) as port:
        subscription = port.subscribe()
        # SO_RCVBUFFORCE ignores the cap (the kernel doubles the value for overhead).
        assert subscription.rcvbuf >= 4 * rmem_max
        await subscription.aclose()


async def test_events_longer_than_a_read_are_skipped_counted_and_repaired(
        netlab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    # The event reader asks for EVENT_RECV_BYTES per datagram with MSG_TRUNC: a longer
    # one is skipped whole and reported (never decoded from its first part), and the
    # mirror re-reads the table. Shrunk here below the size of a real event (a few
    # hundred bytes), so that every event is lost this way.
    ns = netlab.netns("fw")
    monkeypatch.setattr(kernel_linux, "EVENT_RECV_BYTES", 64)
    entries = synthetic(300)
    async with LinuxKernel(ns.name) as port, LinuxKernel(ns.name) as traffic:
        subscription = port.subscribe()
        assert (await traffic.upsert(entries[:1])).applied == 1
        lost = await subscription.__anext__()
        assert isinstance(lost, Overrun)
        assert lost[:2] == (0, 1) and "truncated to 64" in lost.reason
        await subscription.aclose()

        mirror = Mirror(port)
        async with trio.open_nursery() as nursery:
            await nursery.start(mirror.run)
            assert (await traffic.upsert(entries[1:])).applied == len(entries) - 1
            assert await settled(mirror, port) == []
            assert len(mirror.cache) == len(entries)
            assert mirror.stats.undecodable > 0 and mirror.stats.overruns == 0
            assert mirror.stats.events == 0  # nothing was decoded from a cut datagram
            nursery.cancel_scope.cancel()


def nat_mix(count: int) -> list[Entry]:
    """``count`` entries, alternately plain and source-NAT'd (a reply tuple of its own
    towards 198.18.0.0/15), so that a burst's NEW events come in both record kinds."""
    out = []
    base = int(ipaddress.IPv4Address("198.18.0.0"))
    for i, plain in enumerate(synthetic(count)):
        nat = (base + i // 1000).to_bytes(4, "big")
        out.append(plain._replace(reply=plain.reply._replace(dst=nat, dport=1024 + i % 1000))
                   if i % 2 else plain)
    return out


async def test_a_bursts_new_events_are_read_by_column_as_the_kernel_holds_them(
        netlab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    """The event reader in records mode (the mirror's) decodes a burst's NEW events
    many at a time (ctnetlink.decode_new_records): every record read is the entry the
    kernel then dumps (timeouts within the slack), and nearly all of them were built
    by column."""
    ns = netlab.netns("fw")
    by_column = [0]
    decode_many = ctnetlink.decode_new_records

    def counted(datagrams: Sequence[bytes], now: float) -> list[NewRecord | None]:
        got = decode_many(datagrams, now)
        by_column[0] += sum(r is not None for r in got)
        return got

    monkeypatch.setattr(ctnetlink, "decode_new_records", counted)
    entries = nat_mix(4000)
    async with LinuxKernel(ns.name, event_rcvbuf=64 << 20) as port, \
            LinuxKernel(ns.name) as traffic:
        subscription = port.subscribe()
        subscription.records = True
        assert (await traffic.upsert(entries)) == (len(entries), [])
        read: dict[EntryKey, Entry] = {}
        with trio.fail_after(30):
            while len(read) < len(entries):
                batch = await subscription.__anext__()
                assert not isinstance(batch, Overrun)
                for event in batch:
                    assert isinstance(event, NewRecord)
                    entry = record.unpack(event.record)
                    read[entry.key] = entry._replace(id=None)
        dumped = {e.key: e._replace(id=None) for e in await port.dump()}
        await subscription.aclose()
    assert differences(read, list(dumped.values())) == []
    assert by_column[0] >= len(entries) * 0.9


@pytest.mark.parametrize("records", [False, True], ids=["entries", "records"])
async def test_events_that_find_the_reader_waiting_come_in_one_read(
        netlab: Lab, records: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Events queued while the reader waits come in one batch, as do events queued
    while nobody read: the first read after a wait is not cut short (see
    EventSubscription.__anext__). Our own writes' echoes do not count against a read's
    cap."""
    ns = netlab.netns("fw")
    entries = synthetic(600)

    def refused(*_: object) -> None:
        raise PermissionError(1, "refused")

    monkeypatch.setattr(bpf, "attach", refused)
    assert kernel_linux.MAX_BATCH > 200
    async with LinuxKernel(ns.name) as port, LinuxKernel(ns.name) as traffic:
        subscription = port.subscribe()
        subscription.records = records
        sizes: list[int] = []

        async def read(count: int) -> None:
            while sum(sizes) < count:
                batch = await subscription.__anext__()
                assert not isinstance(batch, Overrun)
                sizes.append(len(batch))

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read, 200)
                await trio.testing.wait_all_tasks_blocked()  # the reader waits
                # 200 events queued in one go (the kernel handles the datagram inside
                # sendto) before the reader runs again.
                assert (await traffic.upsert(entries[:200])).applied == 200
            assert sizes == [200]

            # Queued while nobody read: one read takes them all too.
            sizes.clear()
            assert (await traffic.upsert(entries[200:400])).applied == 200
            await read(200)
            assert sizes == [200]

            # Our own writes' echoes do not count against a read's cap. (Here they get
            # past the socket filter, as when the kernel refuses it: see below.)
            subscription.ignore_portid = port.injector_portid
            assert (await port.upsert(entries[400:500])).applied == 100
            assert (await traffic.upsert(entries[500:600])).applied == 100
            first = subscription._drain(16)
            assert isinstance(first, list) and len(first) == 16
            assert subscription.ignored == 100
        await subscription.aclose()
