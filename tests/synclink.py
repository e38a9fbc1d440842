"""Test doubles for the sync layer: entries, a node with a model kernel table, and an
in-memory link between two sessions (the aioquic ``transfer()`` idea)."""

from __future__ import annotations

import math
from collections.abc import Iterable

from replicator import record
from replicator.external import ExternalCache
from replicator.model import AF_INET, IPPROTO_TCP, CtTuple, Entry, EntryKey, TcpInfo, invert
from replicator.sync import Event, SyncParams, SyncSession


def make_entry(i: int, *, variant: int = 0, timeout: int | None = 3600, zone: int = 0) -> Entry:
    """A distinct IPv4 TCP entry per ``i``; ``variant`` changes its replicated state."""
    orig = CtTuple(
        bytes([10, (i >> 16) & 0xFF, (i >> 8) & 0xFF, i & 0xFF]),
        bytes([192, 0, 2, 1]),
        IPPROTO_TCP,
        1024 + (i % 50000),
        80,
    )
    return Entry(
        AF_INET, orig, invert(orig), zone=zone, status=0x18E, timeout=timeout,
        mark=variant, tcp=TcpInfo(3, 7, 7, 0x23, 0x23),
    )  # fmt: skip


def pk(entry: Entry) -> bytes:
    """The packed key of ``entry`` (what the tables are keyed by)."""
    return record.key(entry)


def ext_put(ext: ExternalCache, entry: Entry, now: float, bucket: int | None = None) -> None:
    """Store ``entry`` in an external cache as if it arrived at ``now`` (in ``bucket``,
    by default its own)."""
    key = record.key(entry)
    b = ext.table.bucket_of(key) if bucket is None else bucket
    ext.upsert(b, key, record.pack(entry, record.deadline_of(entry.timeout, now)))


def ext_delete(ext: ExternalCache, entry: Entry) -> None:
    """Remove ``entry``'s key from an external cache."""
    key = record.key(entry)
    ext.delete(ext.table.bucket_of(key), key)


def strip(entry: Entry) -> Entry:
    """``entry`` without what legitimately differs between copies (timeout, id)."""
    return entry._replace(timeout=None, id=None)


class Node:
    """A session plus the kernel table it mirrors (which survives restarts)."""

    def __init__(self, name: str, params: SyncParams, epoch: int = 1) -> None:
        self.name = name
        self.params = params
        self.epoch = epoch
        self.session = SyncSession(name, epoch, params=params)
        #: key -> (entry, absolute deadline or inf): the model kernel.
        self.kernel: dict[EntryKey, tuple[Entry, float]] = {}
        self.events: list[Event] = []

    def put(self, entry: Entry, now: float) -> None:
        deadline = math.inf if entry.timeout is None else now + entry.timeout
        self.kernel[entry.key] = (entry, deadline)
        self.session.local_update(entry, now)

    def remove(self, key: EntryKey, now: float) -> None:
        if self.kernel.pop(key, None) is not None:
            self.session.local_delete(key, now)

    def kernel_expire(self, now: float) -> None:
        """Drop kernel entries past their deadline, as the kernel would (DESTROY)."""
        for key in [k for k, (_, d) in self.kernel.items() if d <= now]:
            self.remove(key, now)

    def kernel_entries(self, now: float) -> list[Entry]:
        """The kernel table as a dump at ``now`` reports it (remaining timeouts)."""
        return [
            e if d == math.inf else e._replace(timeout=math.ceil(d - now))
            for e, d in self.kernel.values()
        ]

    def restart(self, now: float) -> None:
        """New process: new epoch, empty caches, local table rebuilt from a dump."""
        self.epoch += 1
        self.session = SyncSession(self.name, self.epoch, params=self.params)
        self.session.local_snapshot(self.kernel_entries(now), now)

    def drain(self) -> list[Event]:
        new = list(self.session.events())
        self.events.extend(new)
        return new

    def table(self) -> dict[EntryKey, Entry]:
        return {k: strip(e) for k, (e, _) in self.kernel.items()}

    def external(self) -> dict[EntryKey, Entry]:
        return {e.key: strip(e) for e in self.session.external.entries()}


def connect(a: Node, b: Node, now: float) -> None:
    a.session.connection_made(now)
    b.session.connection_made(now)


def disconnect(a: Node, b: Node, now: float) -> None:
    a.session.connection_lost(now)
    b.session.connection_lost(now)


def transfer(a: Node, b: Node, now: float, rounds: int = 10_000) -> int:
    """Exchange frames over a perfect link until both sides are quiet; returns how
    many messages were delivered. Time does not advance."""
    delivered = 0
    for _ in range(rounds):
        moved = 0
        for src, dst in ((a, b), (b, a)):
            for payload in src.session.frames_to_send(now):
                dst.session.receive(payload, now)
                moved += 1
        a.drain()
        b.drain()
        delivered += moved
        if not moved:
            return delivered
    raise AssertionError("the link never went quiet")


def run(a: Node, b: Node, now: float, until: float, step: float = 0.25) -> float:
    """Advance time to ``until`` in steps, running timers, kernel expiry and a perfect
    link at every step; returns the final time."""
    while True:
        for n in (a, b):
            n.kernel_expire(now)
            n.session.handle_timer(now)
        transfer(a, b, now)
        if now >= until:
            return now
        now = min(until, now + step)


def fill(node: Node, entries: Iterable[Entry], now: float) -> None:
    for e in entries:
        node.put(e, now)
