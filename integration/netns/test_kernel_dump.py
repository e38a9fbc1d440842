"""``kernel_linux.dump`` against a real table: the collector pause and the freeze.

A dump pauses Python's cyclic garbage collector while it builds the entries and then
freezes them (see :mod:`replicator.kernel_linux`). The collector must come back exactly
as it was, also when dumps overlap or one fails, and the dumped entries must be out of
the collector's reach afterwards.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest
import trio

from integration.netns.lab import Lab, Netns
from replicator import inject
from replicator.errors import ReplicatorError
from replicator.kernel_linux import dump
from replicator.model import AF_INET, IPPROTO_UDP, CtTuple, Entry
from replicator.netns import entered

COUNT = 3000  # several dump datagrams


def udp_entries(n: int) -> list[Entry]:
    out = []
    for i in range(n):
        orig = CtTuple(bytes([10, 2, i >> 8, i & 255]), bytes([192, 0, 2, 1]), IPPROTO_UDP,
                       10000 + i, 53)
        reply = CtTuple(orig.dst, bytes([198, 51, 100, 1]), IPPROTO_UDP, 53, 20000 + i)
        out.append(Entry(AF_INET, orig, reply, timeout=600, mark=0))
    return out


@pytest.fixture
def table(netlab: Lab) -> Netns:
    ns = netlab.netns("dump")
    with entered(ns.name):
        sock = inject.open_socket()
    with sock:
        assert trio.run(inject.upsert, sock, udp_entries(COUNT)) == (COUNT, [])
    return ns


@pytest.fixture(autouse=True)
def _collector_restored() -> Iterator[None]:
    """Leave the test process's collector as the test found it."""
    enabled = gc.isenabled()
    yield
    gc.unfreeze()
    if enabled:
        gc.enable()
    else:
        gc.disable()


async def test_dump_freezes_its_entries_and_resumes_the_collector(table: Netns) -> None:
    gc.enable()
    gc.unfreeze()
    entries = await dump(table.name)
    assert {e.key for e in entries} == {e.key for e in udp_entries(COUNT)}
    assert gc.isenabled()
    # Every entry and its two tuples moved to the permanent generation.
    assert gc.get_freeze_count() >= 3 * COUNT
    assert gc.get_count()[0] < 3 * COUNT


async def test_a_disabled_collector_stays_disabled(table: Netns) -> None:
    gc.disable()
    assert len(await dump(table.name)) == COUNT
    assert not gc.isenabled()


async def test_overlapping_dumps_keep_the_collector_off_until_the_last_ends(
    table: Netns,
) -> None:
    gc.enable()
    seen: list[bool] = []

    async def one() -> None:
        assert len(await dump(table.name)) == COUNT
        seen.append(gc.isenabled())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(one)
        nursery.start_soon(one)
    assert seen == [False, True]
    assert gc.isenabled()


async def test_a_cancelled_dump_resumes_the_collector_and_freezes_nothing(
    table: Netns,
) -> None:
    gc.enable()
    gc.unfreeze()
    with trio.CancelScope() as scope:
        scope.cancel()  # delivered at the dump's first wait, inside the pause
        await dump(table.name)
    assert scope.cancelled_caught
    assert gc.isenabled()
    assert gc.get_freeze_count() == 0


async def test_a_failed_dump_resumes_the_collector() -> None:
    gc.enable()
    with pytest.raises(ReplicatorError):
        await dump("replicator-no-such-namespace")
    assert gc.isenabled()
