"""The instrument behind the benchmark's exact lag figures (``bench/ctstamps.py``),
checked against the kernel: the creation stamps it reads are the kernel's, taken when
each entry was created, only in a namespace where stamping is on, and the same entry
is recognised in two namespaces."""

from __future__ import annotations

import time

import trio

from bench import ctstamps
from integration.netns.lab import Lab
from integration.netns.pair import synthetic
from replicator.kernel_linux import LinuxKernel
from replicator.model import Entry


def _create(netns: str, entries: list[Entry]) -> tuple[int, int]:
    """Create ``entries`` in ``netns``; the wall clock (ns) just before and after."""

    async def write() -> None:
        async with LinuxKernel(netns) as kernel:
            result = await kernel.upsert(entries)
            assert result.errors == [] and result.applied == len(entries)

    before = time.time_ns()
    trio.run(write)
    return before, time.time_ns()


def test_stamps_are_the_kernels_creation_times(netlab: Lab) -> None:
    ns = netlab.netns("a")
    a = ns.name
    entries = synthetic(0, 5, timeout=600)
    ns.sysctl(ctstamps.SYSCTL, 1)
    before, after = _create(a, entries[:3])
    stamps = ctstamps.creation_times(a)
    assert len(stamps) == 3
    assert all(before <= s <= after for s in stamps.values())
    # Stamping off: entries created now carry none and are left out.
    ns.sysctl(ctstamps.SYSCTL, 0)
    _create(a, entries[3:])
    assert ctstamps.creation_times(a) == stamps


def test_lags_pair_the_same_entries_across_namespaces(netlab: Lab) -> None:
    na, nb = netlab.netns("a"), netlab.netns("b")
    a, b = na.name, nb.name
    entries = synthetic(0, 4, timeout=600)
    for ns in (na, nb):
        ns.sysctl(ctstamps.SYSCTL, 1)
    _create(a, entries)
    time.sleep(0.05)
    # The copy holds three of the four, and one entry of its own.
    _create(b, entries[1:] + synthetic(100, 1, timeout=600))
    source, copy = ctstamps.creation_times(a), ctstamps.creation_times(b)
    lags = ctstamps.lags(source, copy)
    assert len(source) == 4 and len(copy) == 4 and len(lags) == 3
    assert all(0.05 <= lag < 5.0 for lag in lags)
