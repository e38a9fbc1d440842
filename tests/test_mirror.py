"""The mirror keeps its cache equal to the (fake) kernel: start-up, events, echoes, overruns."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import trio
import trio.testing

from replicator import record
from replicator.cache import Change
from replicator.errors import KernelError
from replicator.kernel import KERNEL_RETRY
from replicator.kernel_fake import FakeKernel
from replicator.mirror import UNDECODABLE_LOG_INTERVAL, Mirror
from replicator.model import AF_INET, IPPROTO_UDP, CtTuple, Entry, EntryKey, invert

A = bytes([10, 0, 0, 1])
B = bytes([192, 0, 2, 7])


def entry(port: int, **fields: Any) -> Entry:
    orig = CtTuple(A, B, IPPROTO_UDP, port, 53)
    return Entry(AF_INET, orig, invert(orig), timeout=30)._replace(**fields)


class Consumer:
    """Collects published changes into a table, as the sync layer would."""

    def __init__(self) -> None:
        self.table: dict[EntryKey, Entry] = {}
        self.batches = 0

    def __call__(self, changes: list[Change]) -> None:
        self.batches += 1
        for key, rec, value in changes:
            k = record.unpack_key(key)
            if rec is None:
                assert value is None
                self.table.pop(k, None)
            else:
                # A NEW event may come as a record alone (NewRecord).
                assert value is None or record.unpack(rec) == value
                self.table[k] = record.unpack(rec)


async def settle(mirror: Mirror) -> None:
    """Let every task run until all wait for new input, and any resync has finished."""
    await trio.testing.wait_all_tasks_blocked()
    await mirror.wait_synced()
    await trio.testing.wait_all_tasks_blocked()


async def test_start_reconciles_entries_that_predate_the_subscription() -> None:
    kernel = FakeKernel()
    kernel.add_many(entry(p) for p in range(10))
    consumer = Consumer()
    mirror = Mirror(kernel, consumer)
    async with trio.open_nursery() as nursery:
        await nursery.start(mirror.run)
        assert mirror.synced
        assert mirror.cache.snapshot() == kernel.table == consumer.table
        assert mirror.stats.reconciliations == 1
        kernel.modify(entry(3).key, mark=9)
        kernel.remove(entry(4).key)
        kernel.add(entry(99))
        await settle(mirror)
        assert mirror.cache.snapshot() == kernel.table == consumer.table
        assert mirror.stats.events == 3
        nursery.cancel_scope.cancel()


async def test_the_reader_awaits_after_publish_after_each_batch_before_reading_on(
) -> None:
    """The daemon sends what was published there: each call sees its batch published,
    and the next batch is not read until the call returns."""
    kernel = FakeKernel()
    consumer = Consumer()
    seen: list[tuple[int, int]] = []
    hold = trio.Event()

    async def after_publish() -> None:
        seen.append((consumer.batches, len(consumer.table)))
        if len(seen) == 2:
            await hold.wait()

    mirror = Mirror(kernel, consumer, after_publish=after_publish)
    async with trio.open_nursery() as nursery:
        await nursery.start(mirror.run)
        start = consumer.batches
        kernel.add(entry(1))
        await settle(mirror)
        kernel.add(entry(2))
        await trio.testing.wait_all_tasks_blocked()
        kernel.add(entry(3))  # read only once the second call returned
        await trio.testing.wait_all_tasks_blocked()
        assert seen[-2:] == [(start + 1, 1), (start + 2, 2)]
        assert len(consumer.table) == 2
        hold.set()
        await settle(mirror)
        assert seen[-1] == (start + 3, 3)
        assert mirror.cache.snapshot() == kernel.table == consumer.table
        nursery.cancel_scope.cancel()


async def test_changes_between_subscribe_and_dump_are_not_lost() -> None:
    kernel = FakeKernel()
    kernel.add(entry(1))
    kernel.add(entry(2))

    async def meanwhile() -> None:
        # After the dump's snapshot, before the mirror sees it: only events tell.
        kernel.remove(entry(1).key)
        kernel.modify(entry(2).key, mark=4)
        kernel.add(entry(3))
        await trio.testing.wait_all_tasks_blocked()

    kernel.during_dump = meanwhile
    mirror = Mirror(kernel)
    async with trio.open_nursery() as nursery:
        await nursery.start(mirror.run)
        assert mirror.cache.snapshot() == kernel.table
        assert set(kernel.table) == {entry(2).key, entry(3).key}
        nursery.cancel_scope.cancel()


async def test_echoes_are_cached_but_not_published() -> None:
    kernel = FakeKernel()
    consumer = Consumer()
    mirror = Mirror(kernel, consumer)
    async with trio.open_nursery() as nursery:
        await nursery.start(mirror.run)
        await kernel.upsert([entry(1), entry(2)])
        kernel.add(entry(3))  # from traffic
        await settle(mirror)
        assert mirror.cache.snapshot() == kernel.table
        assert set(consumer.table) == {entry(3).key}
        assert mirror.stats.echoes == 2
        await kernel.delete([entry(1)])
        await settle(mirror)
        assert record.key(entry(1)) not in mirror.cache
        assert mirror.stats.echoes == 3 and mirror.stats.published == 1
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("commit_block", [False, True])
async def test_ignoring_echoes_reads_none_and_takes_the_writers_word(
        commit_block: bool) -> None:
    """A hot standby's mirror: the events of its own writes are dropped unread (also
    after a commit block, which ignores them its own way), what the writer reports is
    cached instead, unpublished; events from traffic still come."""
    kernel = FakeKernel()
    consumer = Consumer()
    mirror = Mirror(kernel, consumer, ignore_echoes=True)
    written = {record.key(e): record.pack(e, 100.0) for e in (entry(1), entry(2))}
    async with trio.open_nursery() as nursery:
        await nursery.start(mirror.run)
        assert mirror.ignores_echoes
        if commit_block:
            with mirror.echoes_ignored():
                pass
        await kernel.upsert([entry(1), entry(2), entry(3)])
        mirror.note_written(list(written.items()), [])
        kernel.add(entry(9))  # from traffic
        await settle(mirror)
        assert mirror.stats.echoes == 0 and mirror.stats.echoes_ignored == 3
        # Entry 3's write was not reported (e.g. refused): the mirror does not know it.
        assert dict(mirror.cache.items()) == {**written,
                                              record.key(entry(9)): mirror_record(mirror, 9)}
        assert set(consumer.table) == {entry(9).key}
        await kernel.delete([entry(1)])
        mirror.note_written([], [record.key(entry(1))])
        await settle(mirror)
        assert record.key(entry(1)) not in mirror.cache
        assert mirror.stats.echoes_ignored == 4 and mirror.stats.published == 1
        # A re-read brings the kernel's version of everything (and publishes what it
        # found changed or new, as always: telling copies apart is the consumer's job).
        await mirror.resync()
        assert mirror.cache.snapshot() == kernel.table
        nursery.cancel_scope.cancel()


def mirror_record(mirror: Mirror, port: int) -> bytes:
    found = dict(mirror.cache.items()).get(record.key(entry(port)))
    assert found is not None
    return found


async def test_a_mirror_reading_echoes_ignores_what_the_writer_says() -> None:
    kernel = FakeKernel()
    mirror = Mirror(kernel)
    async with trio.open_nursery() as nursery:
        await nursery.start(mirror.run)
        mirror.note_written([(record.key(entry(1)), record.pack(entry(1), 5.0))], [])
        assert record.key(entry(1)) not in mirror.cache  # its echo will tell
        nursery.cancel_scope.cancel()


async def running_with(kernel: FakeKernel, nursery: trio.Nursery, *entries: Entry
                       ) -> tuple[Mirror, Consumer]:
    """A mirror of ``kernel`` publishing to a consumer, started in ``nursery``, once it
    holds ``entries`` (added to the kernel after the start)."""
    consumer = Consumer()
    mirror = Mirror(kernel, consumer)
    await nursery.start(mirror.run)
    kernel.add_many(entries)
    await settle(mirror)
    return mirror, consumer


async def test_a_commit_block_receives_no_creations_and_leaves_the_mirror_stale() -> None:
    kernel = FakeKernel()
    async with trio.open_nursery() as nursery:
        mirror, consumer = await running_with(kernel, nursery, entry(7), entry(8))
        with mirror.echoes_ignored():
            await kernel.upsert([entry(p) for p in range(5)])
            kernel.add(entry(99))  # traffic during the commit: missed too
            kernel.remove(entry(7).key)  # deletions still come
        await settle(mirror)
        assert mirror.stats.echoes == 0
        assert mirror.stale and not mirror.synced
        assert set(mirror.cache.snapshot()) == {entry(8).key}
        # After the block, events are received again.
        await kernel.upsert([entry(50)])
        kernel.add(entry(51))
        await settle(mirror)
        assert mirror.stats.echoes == 1
        assert record.key(entry(50)) in mirror.cache and record.key(entry(51)) in mirror.cache
        await mirror.resync()
        assert not mirror.stale and mirror.synced
        assert mirror.cache.snapshot() == kernel.table
        # The dump found what the block missed and published it, as any reconciliation
        # does (the echo of entry 50 was read, cached and so not published).
        assert set(consumer.table) == {entry(p).key for p in (*range(5), 8, 51, 99)}
        nursery.cancel_scope.cancel()


async def test_overrun_is_repaired_by_a_dump() -> None:
    # A tiny buffer: a burst overflows it, as a small SO_RCVBUF does.
    kernel = FakeKernel(buffer_events=16)
    consumer = Consumer()
    mirror = Mirror(kernel, consumer)
    async with trio.open_nursery() as nursery:
        await nursery.start(mirror.run)
        kernel.add_many(entry(p) for p in range(1000))
        await settle(mirror)
        assert mirror.stats.overruns > 0
        assert mirror.stats.reconciliations >= 2
        assert mirror.cache.snapshot() == kernel.table == consumer.table
        assert len(kernel.table) == 1000
        for p in range(0, 1000, 2):
            kernel.remove(entry(p).key)
        for p in range(1, 1000, 2):
            kernel.modify(entry(p).key, mark=p)
        await settle(mirror)
        assert mirror.cache.snapshot() == kernel.table == consumer.table
        nursery.cancel_scope.cancel()


async def running_with_one_entry(kernel: FakeKernel, nursery: trio.Nursery) -> Mirror:
    """A mirror of ``kernel`` started in ``nursery``, once it holds ``entry(1)``."""
    mirror = Mirror(kernel)
    await nursery.start(mirror.run)
    kernel.add(entry(1))
    await settle(mirror)
    return mirror


async def test_overrun_during_a_dump_triggers_another_resync() -> None:
    kernel = FakeKernel()
    async with trio.open_nursery() as nursery:
        mirror = await running_with_one_entry(kernel, nursery)
        overran = False

        async def lose_events() -> None:
            nonlocal overran
            if not overran:
                overran = True
                # Changes after the snapshot whose events are lost: only a second dump
                # can see them.
                kernel.modify(entry(1).key, mark=7)
                kernel.add(entry(2))
                kernel.overrun()
                await trio.testing.wait_all_tasks_blocked()

        kernel.during_dump = lose_events
        kernel.overrun()
        await settle(mirror)
        assert kernel.dumps == 3  # initial, the repair, and the repair of the repair
        assert mirror.stats.overruns == 2
        assert mirror.cache.snapshot() == kernel.table
        assert kernel.table[entry(1).key].mark == 7
        nursery.cancel_scope.cancel()


async def test_run_returns_when_the_port_closes() -> None:
    kernel = FakeKernel()
    mirror = Mirror(kernel)
    async with trio.open_nursery() as nursery:
        await nursery.start(mirror.run)
        await kernel.aclose()
    assert mirror.synced


async def test_resync_waits_for_overruns_to_stop() -> None:
    kernel = FakeKernel()
    mirror = Mirror(kernel, resync_quiet=0.2)
    async with trio.open_nursery() as nursery:
        await nursery.start(mirror.run)
        for _ in range(3):  # a burst still losing events: no dump yet
            kernel.overrun()
            await trio.sleep(0.1)
        assert kernel.dumps == 1
        await settle(mirror)
        assert kernel.dumps == 2  # one repair once the losses stopped
        assert mirror.stats.overruns == 3
        nursery.cancel_scope.cancel()


async def test_an_undecodable_event_is_counted_logged_and_repaired_by_a_dump(
        caplog: pytest.LogCaptureFixture, autojump_clock: trio.testing.MockClock) -> None:
    # The kernel's event for a change could not be decoded (the port skips the whole
    # datagram): the change reaches the cache through the dump that follows.
    kernel = FakeKernel()
    async with trio.open_nursery() as nursery:
        mirror = await running_with_one_entry(kernel, nursery)
        kernel.table[entry(2).key] = entry(2)  # its event is the one lost
        with caplog.at_level(logging.WARNING, logger="replicator.mirror"):
            kernel.undecodable_event("malformed ctnetlink message: test")
            await settle(mirror)
            assert mirror.stats.undecodable == 1 and mirror.stats.overruns == 0
            assert mirror.stats.reconciliations == 2
            assert mirror.cache.snapshot() == kernel.table
            # Two more within the minute: counted and repaired, logged once more only
            # after the interval, with the count since.
            for _ in range(2):
                kernel.undecodable_event()
                await settle(mirror)
            assert mirror.stats.undecodable == 3
            await trio.sleep(UNDECODABLE_LOG_INTERVAL)
            kernel.undecodable_event("the reason of the last")
            await settle(mirror)
        logged = [r for r in caplog.records if "undecodable" in r.getMessage()]
        assert [(r.fields["count"], r.fields["reason"]) for r in logged] == [  # type: ignore[attr-defined]
            (1, "malformed ctnetlink message: test"), (3, "the reason of the last")]
        nursery.cancel_scope.cancel()


async def test_a_failed_re_read_is_retried_and_the_first_one_stops_the_start(
        caplog: pytest.LogCaptureFixture, autojump_clock: trio.testing.MockClock) -> None:
    kernel = FakeKernel()
    failing = 2

    async def fail() -> None:
        nonlocal failing
        if failing:
            failing -= 1
            raise KernelError("conntrack dump failed: errno 12", 12)

    # At start-up the daemon cannot work without the table: the error is the start's.
    kernel.during_dump = fail
    with pytest.raises(BaseExceptionGroup) as raised:
        async with trio.open_nursery() as nursery:
            await nursery.start(Mirror(kernel).run)
    assert raised.group_contains(KernelError)
    # Later, the mirror keeps its cache and tries again, backing off: nothing is lost.
    failing = 0
    async with trio.open_nursery() as nursery:
        mirror = await running_with_one_entry(kernel, nursery)
        failing = 2
        kernel.table[entry(2).key] = entry(2)  # a change whose event was lost
        with caplog.at_level(logging.WARNING, logger="replicator.mirror"):
            start = trio.current_time()
            kernel.overrun()
            await settle(mirror)
        assert mirror.stats.dump_failures == 2
        assert trio.current_time() - start >= 3  # 1 s, then 2 s
        assert mirror.cache.snapshot() == kernel.table and mirror.synced
        logged = [r for r in caplog.records if "failed; retrying" in r.getMessage()]
        assert [r.fields["retry_in"] for r in logged] == [  # type: ignore[attr-defined]
            1.0, 2.0]
        assert KERNEL_RETRY.capped(0) == 1.0 and KERNEL_RETRY.capped(9) == 30.0
        nursery.cancel_scope.cancel()


async def test_a_failed_event_socket_is_replaced_and_what_it_missed_re_read(
        caplog: pytest.LogCaptureFixture, autojump_clock: trio.testing.MockClock) -> None:
    kernel = FakeKernel()
    async with trio.open_nursery() as nursery:
        mirror, consumer = await running_with(kernel, nursery, entry(1), entry(2))
        dumps = kernel.dumps
        with caplog.at_level(logging.WARNING, logger="replicator.mirror"):
            kernel.fail_event_sockets()
            # Changes whose events the failed socket holds (never read) ...
            kernel.add(entry(3))
            kernel.remove(entry(1).key)
            # ... and two attempts to subscribe again that fail: retried, backing off.
            kernel.refuse_subscriptions = 2
            start = trio.current_time()
            await trio.testing.wait_all_tasks_blocked()
            # (Compared as a pair: an assert on the properties would narrow their types
            # for mypy, and the checks below would look unreachable to it.)
            assert (mirror.stale, mirror.synced) == (True, False)
            await trio.sleep(5)
            await settle(mirror)
        # Subscribed again before the dump (what changes meanwhile is in one or the
        # other), which brought what the failed socket held.
        assert kernel.subscriptions == 2 and kernel.dumps == dumps + 1
        assert mirror.stats.subscription_failures == 3
        assert mirror.cache.snapshot() == kernel.table and mirror.synced
        assert set(consumer.table) == {entry(2).key, entry(3).key}
        logged = [r for r in caplog.records if "event socket failed" in r.getMessage()]
        assert [r.fields["retry_in"] for r in logged] == [  # type: ignore[attr-defined]
            0.0, 1.0, 2.0]
        assert logged[0].fields["error"] == "event socket: EIO"  # type: ignore[attr-defined]
        assert trio.current_time() - start >= 3
        # The new socket's events are read.
        kernel.add(entry(4))
        await settle(mirror)
        assert entry(4).key in consumer.table
        # A failure after events were read again starts over with no delay.
        kernel.fail_event_sockets()
        kernel.add(entry(5))
        await settle(mirror)
        assert mirror.cache.snapshot() == kernel.table and entry(5).key in consumer.table
        assert [r.fields["retry_in"] for r in caplog.records  # type: ignore[attr-defined]
                if "event socket failed" in r.getMessage()][-1] == 0.0
        nursery.cancel_scope.cancel()


async def test_a_socket_replaced_during_a_commit_block_is_muted_like_the_old_one() -> None:
    kernel = FakeKernel()
    mirror = Mirror(kernel, ignore_echoes=True)
    async with trio.open_nursery() as nursery:
        await nursery.start(mirror.run)
        await kernel.upsert([entry(0)])  # an echo the first socket drops
        with mirror.echoes_ignored():
            kernel.fail_event_sockets()
            await settle(mirror)
            assert kernel.subscriptions == 2
            kernel.add(entry(1))  # traffic during the commit: not received
            await kernel.upsert([entry(2)])  # nor the echoes
            await trio.testing.wait_all_tasks_blocked()
            assert mirror.stats.events == 0
        # After the block the new socket gets creations again, but not the echoes of a
        # hot standby's writes (ignore_echoes).
        await kernel.upsert([entry(3)])
        kernel.add(entry(4))
        await trio.testing.wait_all_tasks_blocked()
        assert mirror.stats.events == 1 and record.key(entry(4)) in mirror.cache
        assert record.key(entry(3)) not in mirror.cache
        # Dropped echoes are counted across sockets: entry 0's by the first, entry 3's
        # by the new one (entry 2's was never sent: the block had left the group).
        assert mirror.stats.echoes_ignored == 2
        nursery.cancel_scope.cancel()
