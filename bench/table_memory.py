"""Where the bytes of a replicated table go: the tables alone, measured with tracemalloc.

``.venv/bin/python -m bench.table_memory [N]`` builds, in one process and without
sockets, what the daemons hold for ``N`` (250,000) synthetic IPv4 TCP entries (the
entries of ``bench/resources.py``):

- the active's internal cache (``InternalCache`` fed N NEW events);
- the active's local table (``SyncSession.local_record`` with the cache's records,
  then every entry stamped as sent, as after a full transfer);
- the standby's external cache (every entry upserted as received);

and prints, as ``name=value`` lines, the bytes per entry each step adds (the
pending keys of the first step are freed by the second; tracemalloc: the
sizes Python asked the allocator for, without its rounding or fragmentation), the
largest allocation sites, and whether the two active tables share their records.
"""

from __future__ import annotations

import gc
import sys
import tracemalloc
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from integration.netns.pair import synthetic
from replicator import record, wire
from replicator.cache import InternalCache
from replicator.external import ExternalCache
from replicator.model import CtEvent, EventKind
from replicator.sync import SyncParams, SyncSession


def _grown(before: tracemalloc.Snapshot, after: tracemalloc.Snapshot, n: int, name: str
           ) -> None:
    stats = after.compare_to(before, "lineno")
    print(f"{name}_bytes_per_entry={sum(s.size_diff for s in stats) / n:.0f}")
    for s in stats[:4]:
        if s.size_diff > 0:
            frame = s.traceback[0]
            where = f"{Path(frame.filename).name}:{frame.lineno}"
            print(f"{name}_site_{where}={s.size_diff / n:.0f}")


def main(argv: list[str]) -> None:
    n = int(argv[0]) if argv else 250_000
    events = [CtEvent(EventKind.NEW, e) for e in synthetic(0, n)]
    gc.collect()
    tracemalloc.start()
    s0 = tracemalloc.take_snapshot()
    cache = InternalCache()
    session = SyncSession("a", 1, params=SyncParams(), restamped=cache.restamp)
    for key, rec, entry in cache.apply_all(events, 0.0):
        if rec is not None and entry is not None:
            session.local_record(key, rec, entry, 0.0)
    gc.collect()
    s1 = tracemalloc.take_snapshot()
    # What a full transfer leaves behind: every entry told to the peer once.
    session.bulk_send(1.0)
    session.connection_made(1.0)
    session.receive(_hello(), 1.0)
    while frames := session.frames_to_send(1.0):
        # The peer acknowledges everything (the window would stop the sender).
        sequenced = [m for m in map(wire.decode, frames) if isinstance(m, wire.Sequenced)]
        if sequenced:
            last = sequenced[-1]
            session.receive(wire.encode(wire.Ack(last.stream, last.seq + 1, False)), 1.0)
    gc.collect()
    s2 = tracemalloc.take_snapshot()
    external = ExternalCache(SyncParams().buckets)
    for ev in events:
        key = record.key(ev.entry)
        external.upsert(external.table.bucket_of(key), key,
                        record.pack(ev.entry, record.deadline_of(ev.entry.timeout, 0.0)))
    gc.collect()
    s3 = tracemalloc.take_snapshot()
    _grown(s0, s1, n, "active_cache_and_local_table")
    _grown(s1, s2, n, "active_after_sending")
    _grown(s2, s3, n, "standby_external_cache")
    _grown(s0, s2, n, "active_tables_after_sending")
    shared = sum(1 for key, rec in cache.items() if session._table.get(key) is rec)
    print(f"active_records_shared={shared}/{len(cache)}")


def _hello() -> bytes:
    return wire.encode(wire.Hello(wire.PROTOCOL_VERSION, "b", 2, SyncParams().buckets, 0))


if __name__ == "__main__":
    main(sys.argv[1:])
