"""A commit's echoes are dropped unread by the real event socket, and only those.

A promotion writes the whole external cache into the kernel and then re-reads the
kernel; the events of the write (echoes, carrying our injector's netlink port id) are
superseded by that dump, so the mirror drops them without decoding them
(:meth:`Mirror.echoes_ignored`). This checks, against the kernel, that the port id in
the header is what the kernel sends, that events caused by anyone else during the
block are still read and published, and that a dump makes the cache exact again.
"""

from __future__ import annotations

import socket

import trio
import trio.testing

from bench.kernel import nat_entries
from integration.netns.lab import Lab
from replicator import inject, record
from replicator.cache import Change
from replicator.kernel_linux import LinuxKernel, dump
from replicator.mirror import Mirror
from replicator.netns import entered

OURS = 3000
THEIRS = 40


def test_echoes_of_a_commit_are_dropped_and_other_events_are_kept(netlab: Lab) -> None:
    ns = netlab.netns("ce")
    entries = nat_entries(OURS + THEIRS)
    ours, theirs = entries[:OURS], entries[OURS:]
    published: set[bytes] = set()

    def consume(changes: list[Change]) -> None:
        published.update(key for key, _record, entry in changes if entry is not None)

    async def main() -> None:
        with entered(ns.name):
            other: socket.socket = inject.open_socket()  # stands in for traffic
        async with LinuxKernel(ns.name) as kernel, trio.open_nursery() as nursery:
            mirror = Mirror(kernel, consume)
            await nursery.start(mirror.run)
            with mirror.echoes_ignored():
                result = await kernel.upsert(ours)
                assert result.applied == OURS and not result.errors
                with other:
                    assert await inject.upsert(other, theirs) == (THEIRS, [])
                # Every event is queued by now (the kernel queues them inside sendto):
                # let the mirror read them all before the block ends.
                await trio.testing.wait_all_tasks_blocked()
            ignored = mirror.stats.echoes_ignored
            print(f"\nechoes dropped unread: {ignored} of {OURS}; "
                  f"decoded after the block: {mirror.stats.echoes}")
            assert ignored > 0 and ignored + mirror.stats.echoes == OURS
            assert mirror.stale and not mirror.synced
            # Events from another port id were decoded and published, ours were not.
            assert published == {record.key(e) for e in theirs}
            await mirror.resync()
            assert not mirror.stale and mirror.synced
            table = {e.key: e for e in await dump(ns.name)}
            assert len(table) == OURS + THEIRS
            assert mirror.cache.snapshot().keys() == table.keys()
            nursery.cancel_scope.cancel()

    trio.run(main)
