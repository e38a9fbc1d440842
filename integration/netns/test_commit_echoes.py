"""A commit receives no events of creations and updates, against the real kernel.

A promotion writes the whole external cache into the kernel and then re-reads the
kernel; the events of the write (echoes) would only be decoded to be superseded by that
dump. So during the commit the mirror's event socket leaves the NEW and UPDATE groups
(:meth:`Mirror.echoes_ignored`): with no member in those groups ctnetlink builds no
events at all. This checks, against the kernel, that no echo of the commit reaches the
socket, that deletions still do, that events resume once the block ends, and that a dump
makes the cache exact again (including what others created during the block).
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Callable

import pytest
import trio
import trio.testing

from bench.kernel import nat_entries
from integration.netns.lab import Lab
from replicator import bpf, inject, record
from replicator.cache import Change
from replicator.kernel_linux import LinuxKernel, dump
from replicator.mirror import Mirror
from replicator.netns import entered

OURS = 3000
THEIRS = 40


def collector() -> tuple[set[bytes], Callable[[list[Change]], None]]:
    """The keys of the entries a mirror publishes, and the consumer that adds them."""
    published: set[bytes] = set()

    def consume(changes: list[Change]) -> None:
        published.update(key for key, rec, _entry in changes if rec is not None)

    return published, consume


def traffic(ns: str) -> socket.socket:
    """A netlink socket of ``ns`` whose writes stand in for traffic (not the mirror's
    own injector)."""
    with entered(ns):
        return inject.open_socket()


def test_a_commit_receives_no_echoes_and_a_dump_completes_the_cache(netlab: Lab) -> None:
    ns = netlab.netns("ce")
    entries = nat_entries(OURS + 2 * THEIRS + 1)
    ours, theirs = entries[:OURS], entries[OURS:OURS + THEIRS]
    after, doomed = entries[OURS + THEIRS:-1], entries[-1]
    published, consume = collector()

    async def main() -> None:
        other = traffic(ns.name)
        async with LinuxKernel(ns.name) as kernel, trio.open_nursery() as nursery:
            mirror = Mirror(kernel, consume)
            await nursery.start(mirror.run)
            with other:
                assert await inject.upsert(other, [doomed]) == (1, [])
                await trio.testing.wait_all_tasks_blocked()
                assert record.key(doomed) in mirror.cache
                events = mirror.stats.events
                with mirror.echoes_ignored():
                    result = await kernel.upsert(ours)
                    assert result.applied == OURS and not result.errors
                    assert await inject.upsert(other, theirs) == (THEIRS, [])
                    assert await inject.delete(other, [doomed]) == (1, [])
                    # Every event is queued by now (the kernel queues them inside
                    # sendto): let the mirror read whatever came.
                    await trio.testing.wait_all_tasks_blocked()
                # Only the deletion came through: no echo, no creation by others.
                assert mirror.stats.events == events + 1
                assert record.key(doomed) not in mirror.cache
                assert mirror.stale and not mirror.synced
                assert not published & {record.key(e) for e in ours + theirs}
                # Once the block ends, events come again.
                assert await inject.upsert(other, after) == (THEIRS, [])
                await trio.testing.wait_all_tasks_blocked()
            assert published >= {record.key(e) for e in after}
            print(f"\nevents received during the commit block: 1 (the deletion) of "
                  f"{OURS + THEIRS + 1} changes")
            await mirror.resync()
            assert not mirror.stale and mirror.synced
            table = {e.key: e for e in await dump(ns.name)}
            assert len(table) == OURS + 2 * THEIRS
            assert mirror.cache.snapshot().keys() == table.keys()
            assert published >= {record.key(e) for e in ours + theirs + after}
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_a_hot_standbys_mirror_gets_no_echo_from_the_kernel(netlab: Lab) -> None:
    """With ``ignore_echoes`` the event socket carries a filter dropping the events of
    the injector's writes in the kernel: none is queued (so none is even counted on
    reading), others' events still come, and events of writes made while the filter is
    off again (the end of a commit block restores it) are dropped too."""
    ns = netlab.netns("he")
    entries = nat_entries(OURS + 2 * THEIRS)
    ours, theirs, more = entries[:OURS], entries[OURS:OURS + THEIRS], entries[-THEIRS:]
    published, consume = collector()

    async def main() -> None:
        other = traffic(ns.name)
        async with LinuxKernel(ns.name) as kernel, trio.open_nursery() as nursery:
            mirror = Mirror(kernel, consume, ignore_echoes=True)
            await nursery.start(mirror.run)
            with other:
                result = await kernel.upsert(ours)
                assert result.applied == OURS and not result.errors
                assert await inject.upsert(other, theirs) == (THEIRS, [])
                await trio.testing.wait_all_tasks_blocked()
                assert mirror.stats.events == THEIRS
                assert mirror.stats.echoes == 0 and mirror.stats.echoes_ignored == 0
                with mirror.echoes_ignored():
                    pass
                result = await kernel.upsert(more)
                assert result.applied == THEIRS and not result.errors
                await kernel.delete(ours[:10])
                await trio.testing.wait_all_tasks_blocked()
                assert mirror.stats.events == THEIRS and mirror.stats.echoes == 0
            assert published == {record.key(e) for e in theirs}
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_without_the_kernels_filter_echoes_are_dropped_on_reading(
        netlab: Lab, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """Should the kernel refuse the socket filter, a hot standby still runs: the events
    of its writes are received and dropped unread (counted), and it says so once."""

    def refuse(sock: socket.socket, program: bytes) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(bpf, "attach", refuse)
    ns = netlab.netns("hf")
    entries = nat_entries(THEIRS)

    async def main() -> None:
        async with LinuxKernel(ns.name) as kernel, trio.open_nursery() as nursery:
            mirror = Mirror(kernel, ignore_echoes=True)
            await nursery.start(mirror.run)
            result = await kernel.upsert(entries)
            assert result.applied == THEIRS and not result.errors
            await trio.testing.wait_all_tasks_blocked()
            assert mirror.stats.events == 0 and mirror.stats.echoes_ignored == THEIRS
            nursery.cancel_scope.cancel()

    with caplog.at_level(logging.WARNING, logger="replicator.kernel_linux"):
        trio.run(main)
    assert [r.getMessage() for r in caplog.records] == [
        "event socket filter refused; dropping our own writes' events on reading"]
