"""The external cache: absolute deadlines from remaining timeouts, expiry, commit set."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st
from synclink import make_entry, pk
from test_wire import entries

from replicator import record
from replicator.daemon import DEFAULT_COMMIT_TIMEOUT
from replicator.external import ExternalCache
from replicator.model import Entry, TcpFlag


def put(cache: ExternalCache, entry: Entry, now: float) -> Entry | None:
    key = pk(entry)
    old = cache.upsert(cache.table.bucket_of(key), key,
                       record.pack(entry, record.deadline_of(entry.timeout, now)))
    return None if old is None else record.unpack(old)


def delete(cache: ExternalCache, entry: Entry) -> Entry | None:
    key = pk(entry)
    old = cache.delete(cache.table.bucket_of(key), key)
    return None if old is None else record.unpack(old)


def test_deadline_is_arrival_plus_remaining_timeout() -> None:
    c = ExternalCache(16)
    e = make_entry(1, timeout=30)
    assert put(c, e, 100.0) is None
    assert c.deadline(pk(e)) == 130.0
    assert c.get(pk(e)) == e
    assert c.expire(129.9) == []
    assert c.expire(130.0) == [e]
    assert c.get(pk(e)) is None and c.deadline(pk(e)) is None and len(c) == 0


def test_refresh_moves_the_deadline_and_the_old_one_is_ignored() -> None:
    c = ExternalCache(16)
    e = make_entry(1, timeout=30)
    put(c, e, 0.0)
    assert put(c, e._replace(timeout=30), 20.0) == e
    assert c.expire(40.0) == []
    assert c.next_expiry() == 50.0
    assert len(c.expire(50.0)) == 1


def test_deleted_and_timeless_entries_do_not_expire() -> None:
    c = ExternalCache(16)
    gone, forever = make_entry(1, timeout=5), make_entry(2, timeout=None)
    put(c, gone, 0.0)
    put(c, forever, 0.0)
    assert delete(c, gone) == gone
    assert delete(c, gone) is None
    assert c.expire(1e12) == []
    assert c.deadline(pk(forever)) == math.inf
    assert list(c.entries()) == [forever]


def test_commit_set_carries_the_time_left() -> None:
    c = ExternalCache(16)
    put(c, make_entry(1, timeout=100), 0.0)
    put(c, make_entry(2, timeout=10), 0.0)
    put(c, make_entry(3, timeout=None), 0.0)
    timeouts = {e.key: e.timeout for e in c.commit_set(9.5)}
    assert timeouts == {
        make_entry(1).key: 91,  # ceil(100 - 9.5): never shorter than the peer's
        make_entry(2).key: 1,  # ceil(0.5)
        make_entry(3).key: None,
    }
    c.clear()
    assert len(c) == 0 and c.commit_set(0.0) == [] and c.next_expiry() is None


@settings(max_examples=60)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["put", "delete", "tick"]),
            st.integers(0, 30),
            st.one_of(st.none(), st.integers(0, 40)),
        ),
        max_size=400,
    )
)
def test_matches_a_naive_model(ops: list[tuple[str, int, int | None]]) -> None:
    c = ExternalCache(4)
    model: dict[int, tuple[Entry, float]] = {}
    now = 0.0
    for op, i, timeout in ops:
        e = make_entry(i, timeout=timeout)
        if op == "put":
            put(c, e, now)
            model[i] = (e, math.inf if timeout is None else now + timeout)
        elif op == "delete":
            delete(c, e)
            model.pop(i, None)
        else:
            now += (timeout or 0) / 4
            expired = {x.key for x in c.expire(now)}
            due = {k for k, (_, d) in model.items() if d <= now}
            assert expired == {make_entry(k).key for k in due}
            for k in due:
                del model[k]
        assert {x.key: x for x in c.entries()} == {e.key: e for e, _ in model.values()}
        assert all(c.deadline(pk(e)) == d for e, d in model.values())


def test_many_refreshes_keep_expiry_exact() -> None:
    # Each refresh leaves a superseded heap item behind; the heap gets rebuilt.
    c = ExternalCache(4)
    entries = [make_entry(i) for i in range(3)]
    for step in range(3000):
        for e in entries:
            put(c, e._replace(timeout=10), float(step))
    assert c.expire(3008.0) == []
    assert c.next_expiry() == 3009.0
    assert len(c.expire(3009.0)) == 3


def test_polling_at_next_expiry_expires_within_a_second_of_the_deadline() -> None:
    c = ExternalCache(4)
    e = make_entry(1, timeout=3)
    put(c, e, 0.25)  # deadline 3.25
    assert c.next_expiry() == 3.0  # never later than the deadline
    assert c.expire(3.0) == []
    assert c.next_expiry() == 4.0  # put back into the next second, not polled in a loop
    assert c.expire(4.0) == [e]
    assert c.next_expiry() is None


@given(st.lists(entries(), max_size=6), st.sampled_from([False, True]))
def test_the_kernel_ready_commit_set_sets_the_copies_flags_and_default_timeout(
    found: list[Entry], tracking: bool
) -> None:
    # The commit sets the copies' TCP flags and default timeout while unpacking.
    c = ExternalCache(16)
    for e in found:
        put(c, e, 0.0)
    ready = c.commit_set(5.0, no_timeout=DEFAULT_COMMIT_TIMEOUT,
                         tcp_flags=0 if tracking else int(TcpFlag.BE_LIBERAL))
    flags = 0 if tracking else int(TcpFlag.BE_LIBERAL)
    assert ready == [
        e._replace(
            timeout=DEFAULT_COMMIT_TIMEOUT if e.timeout is None else e.timeout,
            tcp=None if e.tcp is None else e.tcp._replace(
                flags_orig=e.tcp.flags_orig | flags, flags_reply=e.tcp.flags_reply | flags),
        )
        for e in c.commit_set(5.0)
    ]



def test_an_entry_whose_deadline_moved_and_came_back_expires_once() -> None:
    """The wheel then holds its key twice at the same second: one expiry, not two (a
    hot standby would delete it twice, the counters count it twice)."""
    cache = ExternalCache(4)
    for timeout in (60, 61, 60):
        put(cache, make_entry(0, timeout=timeout), 100.0)
    assert [pk(e) for e in cache.expire(200.0)] == [pk(make_entry(0))]


@settings(max_examples=200)
@given(timeouts=st.lists(st.one_of(st.none(), st.integers(0, 7)), min_size=1, max_size=40),
       held=st.sets(st.integers(0, 39), max_size=2), since=st.floats(0, 100))
def test_a_burst_stored_together_expires_as_one_by_one(
        *, timeouts: list[int | None], held: set[int], since: float) -> None:
    """ExternalCache.add_new (a standby's burst, SyncSession._apply_changes) ends as
    upsert of each entry: same records, same expiry, second by second; and does
    nothing when a key is held already."""
    entries = [make_entry(i, timeout=t) for i, t in enumerate(timeouts)]
    bodies = [(record.body(record.pack(e, 0.0)), e.timeout) for e in entries]
    made = record.from_bodies(bodies, since)
    assert made == [record.from_body(b, t, since) for b, t in bodies]
    keys = record.keys_of(made)
    assert keys == [pk(e) for e in entries]
    one, burst = ExternalCache(16), ExternalCache(16)
    for cache in (one, burst):
        for i in sorted(held & set(range(len(entries)))):
            put(cache, entries[i]._replace(mark=9), 0.0)
    before = list(burst.table.items())
    deadlines = [math.inf if t is None else since + t for t in timeouts]
    stored = burst.add_new(keys, made, deadlines)
    assert stored == (not held & set(range(len(entries))))
    if not stored:
        assert list(burst.table.items()) == before
        return
    for key, rec in zip(keys, made, strict=True):
        one.upsert(one.table.bucket_of(key), key, rec)
    assert sorted(burst.table.items()) == sorted(one.table.items())
    for now in range(int(since), int(since) + 10):
        assert sorted(burst.expire(float(now))) == sorted(one.expire(float(now)))
    assert sorted(burst.table.items()) == sorted(one.table.items())
