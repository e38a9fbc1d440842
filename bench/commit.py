"""Commit benchmark: a takeover's write of the external cache into the kernel, in-process.

``.venv/bin/python bench/commit.py [--entries 100000] [--runs 3]`` (root; it creates its
own network namespaces and removes them) prints ``name=value`` lines. The records are
``--entries`` established, masqueraded TCP entries (:func:`integration.netns.pair.synthetic`)
packed as the external cache holds them; each run writes them with
:meth:`replicator.kernel_linux.LinuxKernel.upsert_records`, as the daemon's commit does,
into a fresh namespace with an event subscription whose NEW and UPDATE groups are left
during the write (also as the daemon does: the DESTROY group must stay, see
:meth:`~replicator.kernel_linux.EventSubscription.mute_changes`):

* ``encode_us_per_entry``: building the create requests alone one by one
  (:func:`replicator.bulkwrite.commit_encoder`, what the commit does for the records
  :mod:`replicator.colpack` leaves to it), µs per entry, best of ``--runs``;
  ``columns_us_per_entry``: the same requests planned and built a batch at a time by
  byte column (:func:`replicator.colpack.plan_creates`, what the commit does for the
  usual entries);
* ``commit_new_s``: the commit into an empty table (every entry created);
* ``commit_kernel_s``: of that, the seconds spent inside ``sendto`` by the worker thread
  (the kernel's work plus the wait for the GIL after it) and ``commit_build_s`` the
  seconds spent building the next batch meanwhile (:func:`replicator.inject.run_overlapped`);
* ``commit_existing_as_creates_s``: the same records again, every entry present, all
  passed as new (each create refused, then written through the injector: the commit
  before it knew which entries the kernel holds);
* ``commit_existing_as_updates_s``: the same, passed as ``existing`` (updates built
  straight from the records, what the daemon does for the keys its mirror holds).

No daemon, no control socket: the figures are the write itself. The host is shared:
repeat runs and compare ranges.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trio

from bench.kernel import emit
from integration.netns.lab import lab
from integration.netns.pair import synthetic
from replicator import colpack, inject
from replicator import record as R
from replicator.bulkwrite import RecordWrites, commit_encoder
from replicator.kernel_linux import LinuxKernel

#: The records' deadline and the commit's "now": every entry has 600 s left.
NOW = 1000.0
#: Requests per batch for ``columns_us_per_entry``: what fits a commit's datagram.
BATCH = inject.BATCH_BYTES // 236


class SplitTimer:
    """Sums the worker's ``sendto`` time and the building of the next batch during
    :func:`replicator.inject.run_overlapped` (wraps two functions for one run)."""

    def __init__(self) -> None:
        self.kernel = 0.0
        self.build = 0.0

    def __enter__(self) -> SplitTimer:
        send, prefetch = inject._send_and_read, RecordWrites.prefetch

        def timed_send(*args: object) -> object:
            t0 = time.perf_counter()
            try:
                return send(*args)  # type: ignore[arg-type]
            finally:
                self.kernel += time.perf_counter() - t0

        def timed_prefetch(job: RecordWrites) -> bytes | None:
            t0 = time.perf_counter()
            try:
                return prefetch(job)
            finally:
                self.build += time.perf_counter() - t0

        self._saved = send, prefetch
        inject._send_and_read = timed_send  # type: ignore[assignment]
        RecordWrites.prefetch = timed_prefetch  # type: ignore[method-assign,assignment]
        return self

    def __exit__(self, *exc: object) -> None:
        inject._send_and_read = self._saved[0]
        RecordWrites.prefetch = self._saved[1]  # type: ignore[method-assign]


async def commit(netns: str, records: list[bytes], existing: list[bytes],
                 timer: SplitTimer | None = None) -> float:
    """Seconds of one ``upsert_records`` into ``netns``; every entry must be applied."""
    async with LinuxKernel(netns) as kernel:
        sub = kernel.subscribe()
        sub.mute_changes(True)
        t0 = time.perf_counter()
        if timer is None:
            result = await kernel.upsert_records(records, NOW, existing=existing,
                                                   takeover=True)
        else:
            with timer:
                result = await kernel.upsert_records(records, NOW, existing=existing,
                                                   takeover=True)
        seconds = time.perf_counter() - t0
    if result != (len(records) + len(existing), []):
        raise RuntimeError(f"commit failed: {result.applied} applied, "
                           f"{len(result.errors)} refused")
    return seconds


def main(argv: Sequence[str] | None = None) -> None:
    """Run every measurement (see the module doc)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    records = [R.pack(e, NOW + 600) for e in synthetic(0, args.entries, timeout=600)]
    emit("entries", len(records))
    encode = commit_encoder(NOW)
    best = float("inf")
    for _ in range(args.runs):
        t0 = time.perf_counter()
        for seq, rec in enumerate(records):
            encode(rec, seq, False)
        best = min(best, time.perf_counter() - t0)
    emit("encode_us_per_entry", best / len(records) * 1e6)
    # What a commit does now for these records: plan them, then build each batch of
    # a run by byte column (replicator.colpack), batches of the size a commit sends.
    best = float("inf")
    for _ in range(args.runs):
        t0 = time.perf_counter()
        runs, _rest = colpack.plan_creates(records, NOW, 0)
        for planned in runs:
            for start in range(0, len(planned.records), BATCH):
                planned.build(planned.records[start:start + BATCH], start)
        best = min(best, time.perf_counter() - t0)
    emit("columns_us_per_entry", best / len(records) * 1e6)
    with lab("bc") as the_lab:
        for run in range(args.runs):
            ns = the_lab.netns(f"c{run}").name
            timer = SplitTimer()
            emit("commit_new_s", trio.run(commit, ns, records, [], timer))
            emit("commit_kernel_s", timer.kernel)
            emit("commit_build_s", timer.build)
            emit("commit_existing_as_creates_s", trio.run(commit, ns, records, []))
            emit("commit_existing_as_updates_s", trio.run(commit, ns, [], records))


if __name__ == "__main__":
    main()
