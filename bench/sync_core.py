"""Sync core speed: local changes through two in-memory sessions, end to end.

``.venv/bin/python -m bench.sync_core [N [GC_THRESHOLD]]`` prints ``name=value`` lines
(``GC_THRESHOLD``: if given, ``gc.set_threshold(GC_THRESHOLD, 20, 20)`` first):

- ``wire_encode_per_s`` / ``wire_decode_per_s``: CHANGES messages of IPv4 TCP entries
  through :mod:`replicator.wire` alone;
- ``wire_bytes_per_entry``: encoded size per entry;
- ``sync_entries_per_s``: the hot path, N fresh entries: ``local_update`` on node A,
  ``frames_to_send``, ``receive`` on node B (decode, validate, apply to the external
  cache, events), B's acknowledgements back to A — all on one core;
- ``sync_updates_per_s``: the same for N updates of existing entries;
- ``resync_entries_per_s``: a full resync (``bulk_send``) of N entries.

Time is passed in as a constant: nothing here sleeps or waits.

The decoder and the caches allocate a few small tuples per entry, so with a large
table in memory CPython's cyclic garbage collector costs about half the throughput at
its default thresholds (700, 10, 10); a first threshold of 20000 restores it. The
daemon should raise it (or ``gc.freeze()`` after loading its tables).
"""

from __future__ import annotations

import gc
import sys
import time

from replicator import wire
from replicator.model import AF_INET, IPPROTO_TCP, CtTuple, Entry, TcpInfo, invert
from replicator.sync import SyncParams, SyncSession


def _entry(i: int, mark: int = 0) -> Entry:
    orig = CtTuple(bytes([10, (i >> 16) & 0xFF, (i >> 8) & 0xFF, i & 0xFF]),
                   bytes([192, 0, 2, 1]), IPPROTO_TCP, 1024 + i % 50000, 443)  # fmt: skip
    return Entry(AF_INET, orig, invert(orig), status=0x18E, timeout=431999, mark=mark,
                 tcp=TcpInfo(3, 7, 7, 0x23, 0x23))  # fmt: skip


def pump(a: SyncSession, b: SyncSession, now: float) -> None:
    """Carry frames both ways at ``now`` until both sessions are quiet (their events
    drained and dropped)."""
    while True:
        moved = 0
        for src, dst in ((a, b), (b, a)):
            for payload in src.frames_to_send(now):
                dst.receive(payload, now)
                moved += 1
        for _ in a.events():
            pass
        for _ in b.events():
            pass
        if not moved:
            return


def _stream(
    a: SyncSession, b: SyncSession, entries: list[Entry], now: float
) -> tuple[float, float]:
    """Feed ``entries`` to A in batches of 256 (as kernel event batches arrive) and
    carry the frames to B and B's acknowledgements back. Returns the seconds spent in
    A (local_update, frames_to_send, acks) and in B (receive, events)."""
    t_send = t_recv = 0.0
    clock = time.perf_counter
    for i in range(0, len(entries), 256):
        t0 = clock()
        for e in entries[i : i + 256]:
            a.local_update(e, now)
        frames = a.frames_to_send(now)
        t_send += clock() - t0
        while frames:
            t0 = clock()
            for payload in frames:
                b.receive(payload, now)
            for _ in b.events():
                pass
            acks = b.frames_to_send(now)
            t_recv += clock() - t0
            t0 = clock()
            for payload in acks:
                a.receive(payload, now)
            frames = a.frames_to_send(now)
            t_send += clock() - t0
    pump(a, b, now)
    return t_send, t_recv


def _report(name: str, n: int, t_send: float, t_recv: float) -> None:
    print(f"{name}_sender_entries_per_s={n / t_send:.0f}")
    print(f"{name}_receiver_entries_per_s={n / t_recv:.0f}")
    print(f"{name}_both_entries_per_s={n / (t_send + t_recv):.0f}")


def main(argv: list[str]) -> None:
    n = int(argv[0]) if argv else 100_000
    if len(argv) > 1:
        gc.set_threshold(int(argv[1]), 20, 20)
    print(f"gc_threshold={gc.get_threshold()[0]}")
    entries = [_entry(i) for i in range(n)]

    timed = [(e, e.timeout) for e in entries[:2048]]
    rounds = max(1, n // 2048)
    t0 = time.perf_counter()
    for _ in range(rounds):
        data = wire.encode_changes(0, 0, timed, [], sent=0)
    t1 = time.perf_counter()
    for _ in range(rounds):
        wire.decode(data)
    t2 = time.perf_counter()
    print(f"wire_encode_per_s={rounds * 2048 / (t1 - t0):.0f}")
    print(f"wire_decode_per_s={rounds * 2048 / (t2 - t1):.0f}")
    print(f"wire_bytes_per_entry={len(data) / 2048:.1f}")

    params = SyncParams(anti_entropy_interval=None)
    a = SyncSession("a", 1, params=params)
    b = SyncSession("b", 2, params=params)
    a.connection_made(0.0)
    b.connection_made(0.0)
    pump(a, b, 0.0)
    _report("new", n, *_stream(a, b, entries, 0.0))
    assert len(b.external) == n and a.send_idle

    updates = [e._replace(mark=1) for e in entries]
    _report("update", n, *_stream(a, b, updates, 0.0))
    assert a.send_idle

    start = time.perf_counter()
    a.bulk_send(0.0)
    pump(a, b, 0.0)
    elapsed = time.perf_counter() - start
    assert a.send_idle and len(b.external) == n
    print(f"resync_entries_per_s={n / elapsed:.0f}")


if __name__ == "__main__":
    main(sys.argv[1:])
