"""The in-memory kernel keeps the real kernel's event and write semantics."""

from __future__ import annotations

import errno
from typing import Any

import trio
import trio.testing

from replicator import record as R
from replicator.kernel import EntryError, EventBatch, InjectResult, KernelPort, Overrun
from replicator.kernel_fake import FakeKernel
from replicator.model import (
    AF_INET,
    IPPROTO_TCP,
    CtEvent,
    CtTuple,
    Entry,
    EventKind,
    NewRecord,
    Status,
    TcpInfo,
    invert,
)

A = bytes([10, 0, 0, 1])
B = bytes([192, 0, 2, 7])
PORTID = 777


def entry(port: int, **fields: Any) -> Entry:
    orig = CtTuple(A, B, IPPROTO_TCP, port, 80)
    return Entry(AF_INET, orig, invert(orig), timeout=300, tcp=TcpInfo(3))._replace(**fields)


def ct_events(batch: EventBatch) -> list[CtEvent]:
    """A batch of a subscription not in records mode: events only."""
    assert not isinstance(batch, Overrun)
    events = [e for e in batch if isinstance(e, CtEvent)]
    assert len(events) == len(batch)
    return events


def test_is_a_kernel_port() -> None:
    port: KernelPort = FakeKernel()
    assert port.injector_portid == 4242


async def test_packet_changes_produce_partial_events() -> None:
    kernel = FakeKernel()
    sub = kernel.subscribe()
    stored = kernel.add(entry(1, status=Status.SEEN_REPLY, labels=b"\x01" * 16))
    assert stored.status == Status.SEEN_REPLY | Status.CONFIRMED
    assert stored.mark == 0 and stored.id is not None
    kernel.modify(stored.key, tcp=TcpInfo(4), timeout=100)
    kernel.modify(stored.key, mark=5)
    kernel.remove(stored.key)
    batch = ct_events(await sub.__anext__())
    assert [e.kind for e in batch] == [EventKind.NEW, EventKind.UPDATE, EventKind.UPDATE,
                                       EventKind.DESTROY]
    assert batch[0] == CtEvent(EventKind.NEW, stored, 0)
    # UPDATE: no labels (unchanged), no mark (zero and unchanged)
    assert batch[1].entry == stored._replace(tcp=TcpInfo(4), timeout=100, labels=None,
                                             mark=None)
    assert batch[2].entry.mark == 5
    # DESTROY: no timeout, no labels
    assert batch[3].entry.timeout is None and batch[3].entry.labels is None
    assert kernel.table == {}
    await sub.aclose()


async def test_injections_carry_the_injector_portid() -> None:
    kernel = FakeKernel(injector_portid=PORTID)
    sub = kernel.subscribe()
    result = await kernel.upsert([entry(1, status=Status.ASSURED | Status.SRC_NAT)])
    assert result == InjectResult(1, [])
    # Status: only settable bits, plus CONFIRMED
    assert kernel.table[entry(1).key].status == Status.ASSURED | Status.CONFIRMED
    await kernel.upsert([entry(1, status=Status.SEEN_REPLY, mark=3)])
    # Status grows, never shrinks
    assert kernel.table[entry(1).key].status == (
        Status.ASSURED | Status.SEEN_REPLY | Status.CONFIRMED)
    assert await kernel.delete([entry(1), entry(2)]) == InjectResult(2, [])
    batch = ct_events(await sub.__anext__())
    assert [(e.kind, e.portid) for e in batch] == [
        (EventKind.NEW, PORTID), (EventKind.UPDATE, PORTID), (EventKind.DESTROY, PORTID)]


async def test_table_limit_gives_enomem() -> None:
    kernel = FakeKernel(max_entries=1)
    result = await kernel.upsert([entry(1), entry(2), entry(1, mark=1)])
    assert result == InjectResult(2, [EntryError(entry(2), errno.ENOMEM)])


async def test_full_buffer_loses_events_and_reports_one_overrun() -> None:
    kernel = FakeKernel(buffer_events=2)
    sub = kernel.subscribe()
    for port in range(5):
        kernel.add(entry(port))
    assert await sub.__anext__() == Overrun(1)
    batch = ct_events(await sub.__anext__())
    assert [e.entry.orig.sport for e in batch] == [0, 1]


async def test_forced_overrun_drops_queued_events() -> None:
    kernel = FakeKernel()
    sub = kernel.subscribe()
    kernel.add(entry(1))
    kernel.overrun()
    kernel.add(entry(2))
    assert await sub.__anext__() == Overrun(1)
    batch = ct_events(await sub.__anext__())
    assert [e.entry.orig.sport for e in batch] == [2]


async def test_subscription_waits_for_events_and_ends_on_close() -> None:
    kernel = FakeKernel()
    sub = kernel.subscribe()
    got: list[object] = []

    async def reader() -> None:
        async for batch in sub:
            got.append(batch)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        assert got == []
        kernel.add(entry(1))
        await trio.testing.wait_all_tasks_blocked()
        assert len(got) == 1
        await kernel.aclose()
    kernel.add(entry(2))
    assert len(got) == 1


async def test_dump_hook_runs_after_the_snapshot() -> None:
    kernel = FakeKernel()
    kernel.add(entry(1))

    async def change() -> None:
        kernel.add(entry(2))

    kernel.during_dump = change
    assert await kernel.dump() == [kernel.table[entry(1).key]]
    assert len(kernel.table) == 2 and kernel.dumps == 1


async def test_records_mode_delivers_new_events_as_records() -> None:
    kernel = FakeKernel()
    sub = kernel.subscribe()
    sub.records = True
    before = trio.current_time()
    stored = kernel.add(entry(1))
    kernel.modify(stored.key, mark=5)
    batch = await sub.__anext__()
    assert not isinstance(batch, Overrun)
    first, second = batch
    assert isinstance(first, NewRecord) and R.unpack(first.record) == stored
    # The deadline counts from when the batch was read.
    assert before + 300 <= R.deadline(first.record) <= trio.current_time() + 300
    assert isinstance(second, CtEvent) and second.kind is EventKind.UPDATE
