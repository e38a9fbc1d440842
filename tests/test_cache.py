"""Unit tests of the pure internal cache: event folding and dump reconciliation."""

from __future__ import annotations

from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from replicator import record
from replicator.cache import Change, InternalCache
from replicator.model import (
    AF_INET,
    AF_INET6,
    IPPROTO_TCP,
    CtEvent,
    CtTuple,
    Entry,
    EntryKey,
    EventKind,
    NewRecord,
    TcpInfo,
    invert,
)

A = bytes([10, 0, 0, 1])
B = bytes([192, 0, 2, 7])


def entry(port: int, **fields: Any) -> Entry:
    """A full TCP entry whose key is determined by ``port``."""
    orig = CtTuple(A, B, IPPROTO_TCP, port, 80)
    base = Entry(AF_INET, orig, invert(orig), status=14, timeout=300, mark=0,
                 tcp=TcpInfo(3))
    return base._replace(**fields)


def pk(e: Entry) -> bytes:
    return record.key(e)


def view(change: Change) -> tuple[EntryKey, Entry | None]:
    """A change as (key, entry), after checking that its record holds its entry."""
    if change.record is None:
        assert change.entry is None
    else:
        assert record.unpack(change.record) == change.entry
    return record.unpack_key(change.key), change.entry


def new(e: Entry, portid: int = 0) -> CtEvent:
    return CtEvent(EventKind.NEW, e, portid)


def update(e: Entry) -> CtEvent:
    return CtEvent(EventKind.UPDATE, e)


def destroy(e: Entry) -> CtEvent:
    return CtEvent(EventKind.DESTROY, e._replace(timeout=None))


def test_new_update_destroy() -> None:
    cache = InternalCache()
    full = entry(1000, mark=7, labels=b"\x01" * 16)
    assert view(cache.apply(new(full), 0.0)) == (full.key, full)
    # An UPDATE without labels or mark keeps them; its timeout and state win.
    partial = entry(1000, mark=None, timeout=120, tcp=TcpInfo(4))
    change = cache.apply(update(partial), 0.0)
    assert change.entry == full._replace(timeout=120, tcp=TcpInfo(4))
    assert cache.get(pk(full)) == change.entry
    assert len(cache) == 1 and pk(full) in cache
    assert view(cache.apply(destroy(full), 0.0)) == (full.key, None)
    assert len(cache) == 0 and cache.get(pk(full)) is None


def test_destroy_of_unknown_entry_still_reports_deletion() -> None:
    cache = InternalCache()
    assert view(cache.apply(destroy(entry(1)), 0.0)) == (entry(1).key, None)
    assert len(cache) == 0


def test_resync_takes_the_dump_for_untouched_entries_and_drops_absent_ones() -> None:
    cache = InternalCache()
    cache.apply_all([new(entry(1)), new(entry(2)), new(entry(3, mark=5))], 0.0)
    cache.begin_resync()
    assert cache.resyncing
    dump = [entry(2), entry(3, mark=6), entry(4)]
    changes = cache.finish_resync(dump, 0.0)
    assert not cache.resyncing
    assert sorted(map(view, changes), key=lambda c: c[0][2].sport) == [
        (entry(1).key, None),
        (entry(3).key, entry(3, mark=6)),
        (entry(4).key, entry(4)),
    ]
    assert cache.snapshot() == {e.key: e for e in dump}


def test_resync_does_not_report_timeout_or_id_only_differences() -> None:
    cache = InternalCache()
    cache.apply(new(entry(1, timeout=300, id=1)), 0.0)
    cache.begin_resync()
    assert cache.finish_resync([entry(1, timeout=250, id=2)], 0.0) == []
    assert cache.get(pk(entry(1))) == entry(1, timeout=250, id=2)


def test_events_during_the_dump_win() -> None:
    cache = InternalCache()
    cache.apply_all([new(entry(1)), new(entry(2)), new(entry(3))], 0.0)
    cache.begin_resync()
    # While the dump runs: 1 moves on (partial update), 2 is destroyed, 5 is created.
    cache.apply(update(entry(1, mark=None, labels=None, tcp=TcpInfo(4), timeout=60)), 0.0)
    cache.apply(destroy(entry(2)), 0.0)
    cache.apply(new(entry(5)), 0.0)
    # The dump saw 1 and 2 before the events; 5 after its creation; 3 is gone.
    dump = [entry(1, labels=b"\x02" * 16), entry(2), entry(5, mark=9)]
    cache.finish_resync(dump, 0.0)
    assert cache.snapshot() == {
        # event state, plus a field the dump knew and the cache did not
        entry(1).key: entry(1, tcp=TcpInfo(4), timeout=60, labels=b"\x02" * 16),
        entry(5).key: entry(5),
    }


def test_entry_first_seen_as_partial_update_is_completed_by_the_dump() -> None:
    cache = InternalCache()
    cache.begin_resync()
    cache.apply(update(entry(1, mark=None, tcp=TcpInfo(4))), 0.0)
    assert cache.get(pk(entry(1))) == entry(1, mark=None, tcp=TcpInfo(4))
    cache.finish_resync([entry(1, mark=3)], 0.0)
    assert cache.get(pk(entry(1))) == entry(1, mark=3, tcp=TcpInfo(4))


def test_finish_without_begin_replaces_the_cache() -> None:
    cache = InternalCache()
    cache.apply(new(entry(1)), 0.0)
    cache.finish_resync([entry(2)], 0.0)
    assert list(cache) == [entry(2)]


ports = st.integers(1, 30)
marks = st.integers(0, 3)


@given(st.dictionaries(ports, marks), st.dictionaries(ports, marks))
def test_untouched_resync_makes_the_cache_equal_the_dump(
    before: dict[int, int], after: dict[int, int]
) -> None:
    cache = InternalCache()
    cache.apply_all((new(entry(p, mark=m)) for p, m in before.items()), 0.0)
    cache.begin_resync()
    dump = [entry(p, mark=m) for p, m in after.items()]
    changes = cache.finish_resync(dump, 0.0)
    assert cache.snapshot() == {e.key: e for e in dump}
    # The changes replay the difference exactly.
    replay = {entry(p).key: entry(p, mark=m) for p, m in before.items()}
    for key, value in map(view, changes):
        if value is None:
            del replay[key]
        else:
            replay[key] = value
    assert replay == cache.snapshot()


@given(st.lists(st.tuples(st.sampled_from(["new", "mark", "del"]), ports, marks)))
def test_events_replay_a_table_history(ops: list[tuple[str, int, int]]) -> None:
    """Folding the events of any history of changes gives the final table."""
    table: dict[int, Entry] = {}
    cache = InternalCache()
    for op, port, mark in ops:
        if op == "new":
            table[port] = entry(port, mark=mark)
            cache.apply(new(table[port]), 0.0)
        elif op == "mark" and port in table:
            table[port] = table[port]._replace(mark=mark, timeout=100)
            cache.apply(update(table[port]._replace(labels=None)), 0.0)
        elif op == "del" and port in table:
            cache.apply(destroy(table.pop(port)), 0.0)
    assert cache.snapshot() == {e.key: e for e in table.values()}


def test_events_between_reconcile_steps_are_newer_than_the_dump() -> None:
    cache = InternalCache()
    cache.apply_all([new(entry(p)) for p in (1, 2, 3, 4)], 0.0)
    cache.begin_resync()
    dump = [entry(1, mark=7), entry(2), entry(3), entry(5)]
    steps = cache.reconcile(dump, 0.0, step=1)
    first = next(steps)  # entry 1 reconciled: it takes the dump's state
    assert [view(c) for c in first] == [(entry(1).key, entry(1, mark=7))]
    assert cache.resyncing
    # Between steps: 1 moves on after its step, 3 is destroyed before its step, 6 is
    # created (not in the dump), 2 is updated before its step.
    cache.apply(update(entry(1, mark=8)), 0.0)
    cache.apply(destroy(entry(3)), 0.0)
    cache.apply(new(entry(6)), 0.0)
    cache.apply(update(entry(2, mark=None, tcp=TcpInfo(5))), 0.0)
    rest = [c for step in steps for c in step]
    assert not cache.resyncing
    assert cache.snapshot() == {
        entry(1).key: entry(1, mark=8),
        entry(2).key: entry(2, tcp=TcpInfo(5)),
        entry(5).key: entry(5),
        entry(6).key: entry(6),
    }
    # 4 is gone (absent from the dump, untouched), reported once, last.
    assert view(rest[-1]) == (entry(4).key, None)
    assert [view(c) for c in rest].count((entry(4).key, None)) == 1


@given(st.dictionaries(ports, marks), st.dictionaries(ports, marks), st.integers(1, 8))
def test_reconcile_in_steps_equals_one_go(
    before: dict[int, int], after: dict[int, int], step: int
) -> None:
    one, stepped = InternalCache(), InternalCache()
    for cache in (one, stepped):
        cache.apply_all((new(entry(p, mark=m)) for p, m in before.items()), 0.0)
        cache.begin_resync()
    dump = [entry(p, mark=m) for p, m in after.items()]
    changes = one.finish_resync(dump, 0.0)
    steps = list(stepped.reconcile(dump, 0.0, step=step))
    assert stepped.snapshot() == one.snapshot()
    assert [view(c) for s in steps for c in s] == [view(c) for c in changes]
    assert len(steps) == len(dump) // step + 1


def test_a_new_event_as_a_record_is_cached_as_the_entry_would_be() -> None:
    # NEW events come as records from the mirror's subscription (NewRecord); the cache
    # must end up as it would from the entries, also for a NEW over a known key (a
    # DESTROY was lost), which merges as a NEW event does.
    labelled = entry(2, labels=b"\x01" * 16, timeout=100)
    events = [new(entry(1)), new(labelled), update(entry(2, mark=None, status=14)),
              new(entry(2, timeout=50)), new(entry(3, id=7), portid=9)]
    by_entry, by_record = InternalCache(), InternalCache()
    for e in events:
        want = by_entry.apply(e, 10.0)
        ev: CtEvent | NewRecord = e
        if e.kind is EventKind.NEW:
            ev = NewRecord(record.new_event_record(e.entry, 10.0),
                           e.portid)
        got = by_record.apply(ev, 10.0)
        assert got.key == want.key and got.record == want.record
        assert got.entry in (None, want.entry)
    assert by_record.snapshot() == by_entry.snapshot()
    assert dict(by_record.items()) == dict(by_entry.items())


_EVENTS = st.lists(st.tuples(
    st.sampled_from(["new", "record", "update", "destroy"]), st.integers(1, 6),
    st.integers(0, 2), st.sampled_from([0, 9])), max_size=30)


@given(_EVENTS, st.booleans())
def test_a_batch_is_applied_as_its_events_one_by_one(
        spec: list[tuple[str, int, int, int]], resyncing: bool) -> None:
    # apply_batch (the mirror's path) takes a short cut for NEW records of unknown
    # keys; the result must be apply's, event by event, minus the echoes of port 9.
    events: list[CtEvent | NewRecord] = []
    for kind, port, mark, portid in spec:
        e = entry(port, mark=mark)
        if kind == "new":
            events.append(new(e, portid))
        elif kind == "record":
            events.append(NewRecord(record.new_event_record(e, 5.0), portid))
        elif kind == "update":
            events.append(CtEvent(EventKind.UPDATE, e._replace(timeout=None), portid))
        else:
            events.append(CtEvent(EventKind.DESTROY, e._replace(timeout=None), portid))
    one, batched = InternalCache(), InternalCache()
    for cache in (one, batched):
        cache.apply(new(entry(1, mark=2)), 1.0)
        if resyncing:
            cache.begin_resync()
    want = [(c, e.portid) for e in events if (c := one.apply(e, 5.0))]
    got, echoes = batched.apply_batch(events, 5.0, own=9)
    assert got == [c for c, portid in want if portid != 9]
    assert echoes == sum(portid == 9 for _, portid in want)
    assert dict(batched.items()) == dict(one.items())


def test_writes_noted_during_a_dump_count_as_events() -> None:
    """What the node's own writer reports (its echoes unread) is cached unpublished and,
    during a dump, is newer than the dump's view of the key, as an event would be."""
    cache = InternalCache()
    cache.apply_all([new(entry(1)), new(entry(2))], 0.0)
    cache.begin_resync()
    written = record.pack(entry(3, mark=7), 50.0)
    cache.note_written([(pk(entry(3)), written)], [pk(entry(2))])
    # The dump saw 2 before the delete and 3 before the write.
    changes = cache.finish_resync([entry(1), entry(2), entry(3)], 0.0)
    assert cache.snapshot() == {entry(1).key: entry(1), entry(3).key: entry(3, mark=7)}
    assert {record.unpack_key(c.key) for c in changes} <= {entry(3).key}
    cache.note_written([], [pk(entry(9))])  # an unknown key: nothing to drop
    assert len(cache) == 2


def entry6(port: int, **fields: Any) -> Entry:
    """An IPv6 entry keyed by ``port``."""
    orig = CtTuple(b"\x20\x01" + bytes(13) + b"\x01", b"\x20\x01" + bytes(13) + b"\x02",
                   IPPROTO_TCP, port, 443)
    return Entry(AF_INET6, orig, invert(orig), status=14, timeout=300, mark=0,
                 tcp=TcpInfo(3))._replace(**fields)


_BURST = 40


@settings(max_examples=300)
@given(ports=st.one_of(st.lists(st.integers(1, 300), unique=True, max_size=60),
                       st.lists(st.integers(1, 300), max_size=60)),
       cached=st.sets(st.integers(1, 300), max_size=4),
       echoes_at=st.sets(st.integers(0, 59), max_size=3),
       flags=st.tuples(st.booleans(), st.booleans(), st.booleans()))
# The cases that decide between the batch path and the one at a time: the batch path,
# during a resync, with two families, a key cached already, a key twice, an echo among
# them, another event among them.
@example(ports=list(range(1, _BURST)), cached=set(), echoes_at=set(), flags=(0, 0, 0))
@example(ports=list(range(1, _BURST)), cached=set(), echoes_at=set(), flags=(1, 0, 0))
@example(ports=list(range(1, _BURST)), cached=set(), echoes_at=set(), flags=(0, 1, 0))
@example(ports=list(range(1, _BURST)), cached={7}, echoes_at=set(), flags=(0, 0, 0))
@example(ports=[*range(1, _BURST), 5], cached=set(), echoes_at=set(), flags=(0, 0, 0))
@example(ports=list(range(1, _BURST)), cached=set(), echoes_at={5}, flags=(0, 0, 0))
@example(ports=list(range(1, _BURST)), cached=set(), echoes_at=set(), flags=(0, 0, 1))
def test_a_burst_of_new_records_is_applied_as_one_by_one(
        *, ports: list[int], cached: set[int], echoes_at: set[int],
        flags: tuple[bool, bool, bool]) -> None:
    """apply_batch takes a burst of NEW records together (InternalCache._new_records):
    the changes, the cache and the keys noted during a resync are apply's, event by
    event, whatever the burst holds (keys cached or twice, echoes, IPv6, other events)."""
    resyncing, mixed_families, an_event = flags
    events: list[CtEvent | NewRecord] = []
    for i, port in enumerate(ports):
        e = entry6(port) if mixed_families and port % 2 else entry(port)
        events.append(NewRecord(record.new_event_record(e, 5.0), 9 if i in echoes_at else 0))
    if an_event and events:
        events.insert(len(events) // 2, update(entry(1000, mark=3)))
    one, batched = InternalCache(), InternalCache()
    for cache in (one, batched):
        for port in sorted(cached):
            cache.apply(new(entry(port, mark=1)), 1.0)
        if resyncing:
            cache.begin_resync()
    want = [(one.apply(e, 5.0), e.portid) for e in events]
    got, echoes = batched.apply_batch(events, 5.0, own=9)
    assert got == [c for c, portid in want if portid != 9]
    assert all(type(c) is Change for c in got)
    assert echoes == sum(portid == 9 for _, portid in want)
    assert list(batched.items()) == list(one.items())
    assert batched._touched == one._touched
