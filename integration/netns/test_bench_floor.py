"""The lag floor of the benchmark (``bench/lag_floor.py``), run against the kernel: its
standby's kernel ends up with every entry created in the active's, each created
there after it was on the active, and the system stops cleanly."""

from __future__ import annotations

import time
from pathlib import Path

from bench import ctstamps
from bench.lag_floor import Floor
from bench.sync import paced, sync_link
from integration.netns.lab import Lab
from integration.netns.pair import synthetic
from replicator.model import Entry


def test_the_floor_replicates_every_entry(netlab: Lab, tmp_path: Path) -> None:
    a, b = netlab.netns("a"), netlab.netns("b")
    sync_link(netlab, a, b)
    floor = Floor(netlab, a, b, tmp_path)
    entries: list[Entry] = synthetic(0, 2000, timeout=600)
    for ns in (a, b):
        ns.sysctl(ctstamps.SYSCTL, 1)
    floor.start()
    try:
        assert floor.zero() == 0
        # Batches of 200 every 10 ms, as the benchmark's lag run makes them.
        paced(a, entries, 200, 0.01)
        deadline = time.monotonic() + 20
        while floor.standby_count() < len(entries) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert floor.standby_count() == len(entries)
    finally:
        floor.stop()
    lags = ctstamps.lags(ctstamps.creation_times(a.name), ctstamps.creation_times(b.name))
    assert len(lags) == len(entries)
    assert all(0 < lag < 20 for lag in lags)
