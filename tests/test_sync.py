"""Unit tests of the sync session: handshake, bounds, resync cost, expiry, violations."""

from __future__ import annotations

import dataclasses
import math
from typing import TypeVar

import msgpack
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from synclink import (
    Node,
    connect,
    disconnect,
    ext_delete,
    ext_put,
    fill,
    make_entry,
    pk,
    run,
    strip,
    transfer,
)

from replicator import record, wire
from replicator.digest import BucketTable
from replicator.filters import build_filter
from replicator.model import Entry, TcpInfo
from replicator.sync import (
    ConnectionTerminated,
    Event,
    InSync,
    PeerDeletes,
    PeerHello,
    PeerUpserts,
    ProtocolViolation,
    ResyncCompleted,
    ResyncStarted,
    SyncParams,
    SyncSession,
)

P = SyncParams(buckets=64, batch=32, window=128, anti_entropy_interval=None)


def pair(params: SyncParams = P) -> tuple[Node, Node]:
    return Node("a", params, epoch=1), Node("b", params, epoch=2)


T = TypeVar("T")


def of_type(events: list[Event], kind: type[T]) -> list[T]:
    return [e for e in events if isinstance(e, kind)]


def synced(n_a: int = 0, n_b: int = 0, params: SyncParams = P) -> tuple[Node, Node]:
    a, b = pair(params)
    fill(a, [make_entry(i) for i in range(n_a)], 0.0)
    fill(b, [make_entry(100_000 + i) for i in range(n_b)], 0.0)
    connect(a, b, 0.0)
    transfer(a, b, 0.0)
    assert a.external() == b.table() and b.external() == a.table()
    return a, b


def test_handshake_and_initial_sync() -> None:
    a, b = synced(300, 40)
    assert a.session.in_sync and b.session.in_sync
    assert a.session.send_idle and b.session.send_idle
    assert a.session.peer_node_id == "b" and a.session.peer_epoch == 2
    assert of_type(a.events, PeerHello) == [PeerHello("b", 2, restarted=False)]
    assert of_type(a.events, InSync) == [InSync(True)]
    started = of_type(b.events, ResyncStarted)
    assert {(e.direction, e.full) for e in started} == {("send", False), ("receive", False)}
    done = {e.direction: e for e in of_type(b.events, ResyncCompleted)}
    assert done["receive"].entries == 300 and done["send"].entries == 40
    # The initial catch-up sends each entry once, not once as a change and once more
    # in its bucket.
    assert a.session.stats.entries_sent == 300


def test_changes_stream_and_deletes_propagate() -> None:
    a, b = synced(50)
    seen = len(b.events)
    a.put(make_entry(1, variant=9), 1.0)
    a.put(make_entry(777), 1.0)
    a.remove(make_entry(2).key, 1.0)
    a.remove(make_entry(424242).key, 1.0)  # never existed: nothing to send
    transfer(a, b, 1.0)
    assert b.external() == a.table()
    ups = of_type(b.events[seen:], PeerUpserts)
    assert [(tuple(map(record.unpack, u.records)), u.since) for u in ups] == [
        ((make_entry(1, variant=9), make_entry(777)), 1.0)]
    # The records are the external cache's.
    assert ups[0].records == tuple(b.session.external.table.get(pk(e))
                                   for e in (make_entry(1, variant=9), make_entry(777)))
    # With their keys, for a hot standby's writer.
    assert ups[0].keys == tuple(map(record.key_of, ups[0].records))
    (dels,) = of_type(b.events[seen:], PeerDeletes)
    assert dels == PeerDeletes((make_entry(2),), expired=False)


def test_entry_events_are_drained_alone_or_not_at_all() -> None:
    """What a hot standby's writer may take at once (the daemon's _dispatch_entries):
    the queued events if all carry the peer's entries, else none, order kept."""
    a, b = synced(5)
    kinds = (PeerUpserts, PeerDeletes)
    list(b.session.events())
    a.put(make_entry(1, variant=9), 1.0)
    a.remove(make_entry(2).key, 1.0)
    for frame in a.session.frames_to_send(1.0):
        b.session.receive(frame, 1.0)
    got = b.session.events_if_only(kinds)
    assert [type(e) for e in got] == [PeerUpserts, PeerDeletes]
    assert list(b.session.events()) == []
    a.put(make_entry(3, variant=9), 2.0)
    for frame in a.session.frames_to_send(2.0):
        b.session.receive(frame, 2.0)
    b.session.connection_lost(2.0)  # another kind of event, after the entries
    assert b.session.events_if_only(kinds) == []
    assert [type(e) for e in b.session.events()] == [PeerUpserts, InSync]


def test_a_burst_is_coalesced_to_one_state_per_entry() -> None:
    # The peer does not acknowledge: everything beyond the window waits, coalesced.
    a, b = synced()
    for round_ in range(200):
        for i in range(50):
            a.put(make_entry(i, variant=round_), 1.0)
        assert a.session.pending_count <= 50
    held = a.session.frames_to_send(1.0)
    assert a.session.pending_count + a.session.inflight == 50
    for payload in held:
        b.session.receive(payload, 1.0)
    transfer(a, b, 1.0)
    assert b.external() == a.table()
    assert a.session.stats.entries_sent == 50
    assert a.session.stats.folds == 0


def test_nothing_is_dropped_under_a_tiny_window_and_pending_bound() -> None:
    params = dataclasses.replace(P, window=1, batch=2, max_pending=8, buckets=16)
    a, b = synced(params=params)
    # Churn with no acknowledgements: pending would grow past its bound.
    for i in range(400):
        a.put(make_entry(i), 1.0)
        if i % 3 == 0:
            a.remove(make_entry(i // 2).key, 1.0)
        assert a.session.pending_count <= 8
        assert a.session.dirty_buckets <= 16
    assert a.session.stats.folds > 0
    transfer(a, b, 1.0)
    assert b.external() == a.table()
    assert a.session.send_idle


def test_reconnect_resync_is_proportional_to_the_changes() -> None:
    params = dataclasses.replace(P, buckets=1024, batch=512, window=4096)
    n, k = 20_000, 10
    a, b = synced(n, params=params)
    disconnect(a, b, 1.0)
    for i in range(k):  # while apart: updates, creations and deletions
        if i % 3 == 0:
            a.remove(make_entry(i).key, 2.0)
        elif i % 3 == 1:
            a.put(make_entry(i, variant=5), 2.0)
        else:
            a.put(make_entry(n + i), 2.0)
    before = dataclasses.replace(a.session.stats)
    connect(a, b, 3.0)
    transfer(a, b, 3.0)
    assert b.external() == a.table()
    sent = a.session.stats.entries_sent - before.entries_sent
    buckets = BucketTable(1024)
    for e in a.kernel_entries(3.0):
        buckets.put(buckets.bucket_of(pk(e)), pk(e), record.pack(e, 0.0))
    biggest_bucket = max(len(buckets.bucket(x)) for x in range(1024))
    assert sent <= k * biggest_bucket + k
    assert sent < n // 50
    assert a.session.stats.buckets_sent - before.buckets_sent <= k


def test_a_restarted_peer_gets_everything_back() -> None:
    a, b = synced(500, 20)
    b.restart(5.0)  # empty external cache, new epoch; its kernel table survived
    disconnect(a, b, 5.0)
    connect(a, b, 5.0)
    transfer(a, b, 5.0)
    assert b.external() == a.table() and a.external() == b.table()
    assert PeerHello("b", 3, restarted=True) in a.drain() + a.events
    assert b.session.in_sync


def test_request_resync_and_bulk_send_are_full() -> None:
    a, b = synced(100, 100)
    before = a.session.stats.entries_sent
    b.session.request_resync(1.0)  # conntrackd -n on b: a sends everything
    transfer(a, b, 1.0)
    assert a.session.stats.entries_sent - before == 100
    full = [e for e in of_type(a.events, ResyncCompleted) if e.full]
    assert [(e.direction, e.buckets) for e in full] == [("send", 64)]
    before = b.session.stats.entries_sent
    b.session.bulk_send(1.0)  # conntrackd -B on b
    transfer(a, b, 1.0)
    assert b.session.stats.entries_sent - before == 100
    assert a.session.send_idle and b.session.send_idle


def test_a_full_resync_wish_survives_a_disconnection() -> None:
    a, b = synced(30)
    disconnect(a, b, 1.0)
    b.session.request_resync(1.0)
    a.session.bulk_send(1.0)
    before = a.session.stats.entries_sent
    connect(a, b, 2.0)
    transfer(a, b, 2.0)
    # Two full resyncs were asked for; at least one ran in full (all 30 entries).
    assert a.session.stats.entries_sent - before >= 30
    assert any(e.full for e in of_type(a.events, ResyncStarted))
    assert a.session.send_idle and b.session.send_idle


def test_stale_entries_of_the_peer_are_removed_by_a_resync() -> None:
    a, b = synced(10)
    ghost = make_entry(999)
    ext = b.session.external
    ext_put(ext, ghost, 0.0)  # e.g. a delete lost long ago
    disconnect(a, b, 1.0)
    connect(a, b, 1.0)
    transfer(a, b, 1.0)
    assert b.external() == a.table()
    assert PeerDeletes((ghost,), expired=False) in b.events


def test_a_bucket_larger_than_a_message_is_replaced_in_parts() -> None:
    params = dataclasses.replace(P, buckets=1, batch=8, window=16)
    a, b = synced(100, params=params)
    ext = b.session.external
    ghost = make_entry(999)
    ext_put(ext, ghost, 0.0, bucket=0)
    b.session.request_resync(1.0)
    # Deliver the first parts, then change entries while the replacement runs.
    for _ in range(4):
        for payload in b.session.frames_to_send(1.0):
            a.session.receive(payload, 1.0)
        for payload in a.session.frames_to_send(1.0):
            b.session.receive(payload, 1.0)
    a.put(make_entry(5, variant=1), 1.0)
    a.put(make_entry(500), 1.0)
    a.remove(make_entry(95).key, 1.0)
    transfer(a, b, 1.0)
    assert b.external() == a.table()
    assert ghost.key not in b.external()


def test_lost_messages_are_resent_after_a_nack() -> None:
    a, b = synced(10)
    for i in range(100):
        a.put(make_entry(i, variant=1), 1.0)
    frames = a.session.frames_to_send(1.0)
    assert len(frames) > 2
    for payload in frames[:1] + frames[2:]:  # the second message is lost
        b.session.receive(payload, 1.0)
    transfer(a, b, 1.0)
    assert b.external() == a.table()
    assert a.session.stats.retransmits == 1
    assert b.session.stats.out_of_order == len(frames) - 2


def test_unacknowledged_messages_are_resent_after_the_ack_timeout() -> None:
    a, b = synced(10)
    a.put(make_entry(3, variant=7), 1.0)
    a.session.frames_to_send(1.0)  # lost, and nothing follows to reveal the gap
    deadline = a.session.next_timer()
    assert deadline is not None and deadline <= 1.0 + P.ack_timeout
    run(a, b, 1.0, until=1.0 + P.ack_timeout)
    assert b.external() == a.table()
    assert a.session.stats.retransmits == 1


def test_expiry_in_the_external_cache() -> None:
    a, b = synced()
    a.put(make_entry(1, timeout=10), 100.0)
    transfer(a, b, 100.0)
    assert b.session.external.deadline(pk(make_entry(1))) == 110.0
    timer = b.session.next_timer()
    assert timer is not None and timer <= 110.0
    b.session.handle_timer(109.0)
    assert len(b.session.external) == 1
    b.session.handle_timer(110.0)
    assert PeerDeletes((make_entry(1, timeout=10),), expired=True) in b.drain()
    assert b.session.stats.expired == 1


def test_a_connected_standby_holds_entries_past_their_deadline() -> None:
    params = dataclasses.replace(P, expiry_hold=30.0)
    a, b = synced(params=params)
    a.put(make_entry(1, timeout=10), 100.0)
    a.put(make_entry(2, timeout=10), 100.0)
    transfer(a, b, 100.0)
    b.drain()
    # The active's kernel refreshed entry 1 with packets (no event), entry 2 died.
    a.remove(make_entry(2).key, 105.0)
    transfer(a, b, 105.0)
    b.session.handle_timer(110.0)
    events = b.drain()
    # Not expired: held for 30 s more, and reported as an upsert with that timeout
    # (a hot standby's kernel copy is extended with it).
    (held,) = of_type(events, PeerUpserts)
    assert held.since == 110.0
    (rec,) = held.records
    assert record.unpack(rec) == make_entry(1, timeout=10) and record.deadline(rec) == 140.0
    assert not of_type(events, PeerDeletes)
    assert b.session.external.deadline(pk(make_entry(1))) == 140.0
    assert pk(make_entry(2)) not in b.session.external  # deleted by the active
    assert b.session.stats.held == 1 and b.session.stats.expired == 0
    assert b.external() == a.table()
    # Without the peer, entries expire at their deadline again.
    disconnect(a, b, 120.0)
    b.session.handle_timer(140.0)
    assert PeerDeletes((make_entry(1, timeout=10),), expired=True) in b.drain()
    assert b.session.stats.expired == 1


def test_on_an_ordered_link_a_late_ack_resends_nothing() -> None:
    params = dataclasses.replace(P, ordered_link=True)
    a, b = synced(10, params=params)
    for i in range(10):
        a.put(make_entry(i, variant=7), 1.0)
    in_flight = a.session.frames_to_send(1.0)  # the peer is slow: no ACK for a while
    assert in_flight
    later = 1.0 + 3 * P.ack_timeout
    a.session.handle_timer(1.0 + P.ack_timeout)
    resent = [m for m in map(wire.decode, a.session.frames_to_send(later))
              if not isinstance(m, wire.Ack)]
    assert resent == []
    assert a.session.stats.retransmits == 0 and a.session.stats.slow_acks == 1
    for payload in in_flight:  # TCP delivers them after all
        b.session.receive(payload, later)
    transfer(a, b, later)
    assert b.external() == a.table()
    assert a.session.inflight == 0 and a.session.stats.retransmits == 0


def _acks(payloads: list[bytes]) -> list[wire.Ack]:
    return [m for m in map(wire.decode, payloads) if isinstance(m, wire.Ack)]


def test_an_ack_put_off_covers_several_messages_and_goes_when_due() -> None:
    params = dataclasses.replace(P, ordered_link=True, ack_delay=0.05)
    a, b = synced(10, params=params)
    transfer(a, b, 0.5)  # the sync's own put-off ACKs, due by now
    assert a.session.send_idle and b.session.send_idle
    sent = 0
    # Five messages of 2 entries, 10 ms apart: never a pause of a quarter of the
    # delay, so the ACK is due the delay after the first.
    for k in range(5):
        now = 1.0 + k / 100
        for i in range(2):
            a.put(make_entry(2 * k + i, variant=3), now)
        for payload in a.session.frames_to_send(now):
            b.session.receive(payload, now)
            sent += 1
        assert _acks(b.session.frames_to_send(now)) == []  # not yet
    assert sent == 5 and a.session.inflight == 10  # two entries each
    assert b.session.next_timer() == pytest.approx(1.05)
    assert _acks(b.session.frames_to_send(1.049)) == []
    (ack,) = _acks(b.session.frames_to_send(1.05))  # one ACK for the five
    a.session.receive(wire.encode(ack), 1.05)
    assert a.session.inflight == 0 and a.session.send_idle
    assert b.external() == a.table()


def test_a_put_off_ack_goes_once_the_peer_pauses() -> None:
    params = dataclasses.replace(P, ordered_link=True, ack_delay=0.05)
    a, b = synced(10, params=params)
    transfer(a, b, 0.5)
    for k, now in enumerate((1.0, 1.001)):  # a burst in two messages, then nothing
        a.put(make_entry(k, variant=3), now)
        for payload in a.session.frames_to_send(now):
            b.session.receive(payload, now)
    assert b.session.next_timer() == pytest.approx(1.001 + 0.05 / 4)
    assert _acks(b.session.frames_to_send(1.0134)) == []
    (ack,) = _acks(b.session.frames_to_send(1.0136))
    a.session.receive(wire.encode(ack), 1.0136)
    assert a.session.inflight == 0


def test_a_put_off_ack_goes_with_any_other_frame() -> None:
    params = dataclasses.replace(P, ordered_link=True, ack_delay=0.05)
    a, b = synced(10, params=params)
    transfer(a, b, 0.5)  # the sync's own put-off ACKs, due by now
    assert a.session.send_idle and b.session.send_idle
    a.put(make_entry(1, variant=3), 1.0)
    for payload in a.session.frames_to_send(1.0):
        b.session.receive(payload, 1.0)
    b.put(make_entry(500_000), 1.0)  # b has a change of its own to send
    out = [wire.decode(f) for f in b.session.frames_to_send(1.0)]
    assert any(isinstance(m, wire.Changes) for m in out)
    assert len([m for m in out if isinstance(m, wire.Ack)]) == 1


def test_a_put_off_ack_goes_at_once_when_it_covers_a_quarter_of_the_window() -> None:
    params = dataclasses.replace(P, ordered_link=True, ack_delay=0.5)  # window 128
    a, b = synced(10, params=params)
    transfer(a, b, 0.75)  # the sync's own put-off ACKs, due by now
    assert a.session.send_idle and b.session.send_idle
    for i in range(31):
        a.put(make_entry(i, variant=3), 1.0)
    for payload in a.session.frames_to_send(1.0):
        b.session.receive(payload, 1.0)
    assert _acks(b.session.frames_to_send(1.0)) == []  # 31 entries: under a quarter
    a.put(make_entry(31, variant=3), 1.0)
    for payload in a.session.frames_to_send(1.0):
        b.session.receive(payload, 1.0)
    (ack,) = _acks(b.session.frames_to_send(1.0))
    a.session.receive(wire.encode(ack), 1.0)
    assert a.session.inflight == 0


def test_a_nack_is_never_put_off() -> None:
    params = dataclasses.replace(P, ack_delay=0.5)
    a, b = synced(10, params=params)
    transfer(a, b, 0.75)  # the sync's own put-off ACKs, due by now
    for k in range(2):
        a.put(make_entry(k, variant=3), 1.0)
        frames = a.session.frames_to_send(1.0)
        if k == 1:  # the first message is lost: the second comes out of order
            for payload in frames:
                b.session.receive(payload, 1.0)
    (ack,) = _acks(b.session.frames_to_send(1.0))
    assert ack.nack


def test_a_deadline_overstated_to_the_peer_is_corrected() -> None:
    a, b = synced()
    # An event read 5 s late dated the entry's 100 s from the read: the peer was told
    # 105 s; the next re-dump shows 95 s left at t=5, i.e. the real deadline is 100.
    a.put(make_entry(1, timeout=100), 5.0)
    transfer(a, b, 5.0)
    assert b.session.external.deadline(pk(make_entry(1))) == 105.0
    a.put(make_entry(1, timeout=95), 5.0)
    transfer(a, b, 5.0)
    assert b.session.external.deadline(pk(make_entry(1))) == 100.0
    # Within the rounding tolerance nothing is sent.
    sent = a.session.stats.entries_sent
    a.put(make_entry(1, timeout=89), 10.0)  # deadline 99: 1 s earlier than told
    transfer(a, b, 10.0)
    assert a.session.stats.entries_sent == sent


def test_queued_time_is_taken_off_the_timeout() -> None:
    a, b = synced()
    a.put(make_entry(1, timeout=100), 0.0)
    transfer(a, b, 30.0)  # sent 30 s after the change was observed
    assert b.session.external.get(pk(make_entry(1))).timeout == 70  # type: ignore[union-attr]
    assert b.session.external.deadline(pk(make_entry(1))) == 100.0


def test_refreshes_are_sent_at_half_life_only() -> None:
    a, b = synced()
    a.put(make_entry(1, timeout=100), 0.0)
    transfer(a, b, 0.0)
    sent = a.session.stats.entries_sent
    run(a, b, 0.0, until=10.0, step=0.5)
    a.put(make_entry(1, timeout=100), 10.0)  # refreshed: deadline 110, peer has 100
    transfer(a, b, 10.0)
    assert a.session.stats.entries_sent == sent  # peer still has 90 s of 100
    run(a, b, 10.0, until=89.5, step=0.5)
    assert a.session.stats.entries_sent == sent
    run(a, b, 89.5, until=90.0, step=0.5)  # the peer is down to half: 20 s of 110 - 90
    assert a.session.stats.entries_sent == sent + 1
    assert b.session.external.deadline(pk(make_entry(1))) == 110.0
    run(a, b, 90.0, until=95.0, step=0.5)
    a.put(make_entry(1, timeout=100), 95.0)  # peer has 15 s left of 100: at once
    transfer(a, b, 95.0)
    assert a.session.stats.entries_sent == sent + 2


def test_filters_drop_and_delete_entries_that_stop_matching() -> None:
    accept = build_filter(tcp_states=["ESTABLISHED"])
    a = Node("a", P, epoch=1)
    a.session = SyncSession("a", 1, params=P, accept=accept)
    b = Node("b", P, epoch=2)
    connect(a, b, 0.0)
    a.put(make_entry(1), 0.0)
    a.put(make_entry(2)._replace(tcp=TcpInfo(1)), 0.0)  # SYN_SENT: not replicated
    transfer(a, b, 0.0)
    assert set(b.external()) == {make_entry(1).key}
    a.put(make_entry(1)._replace(tcp=TcpInfo(7)), 1.0)  # now TIME_WAIT
    transfer(a, b, 1.0)
    assert b.external() == {}
    a.session.local_snapshot([make_entry(1), make_entry(2)._replace(tcp=TcpInfo(1))], 2.0)
    transfer(a, b, 2.0)
    assert b.external() == {make_entry(1).key: strip(make_entry(1))}
    assert a.session.local_count == 1


def test_snapshot_deletes_what_it_lacks() -> None:
    a, b = synced(20)
    a.session.local_snapshot([make_entry(i) for i in range(5, 25)], 1.0)
    transfer(a, b, 1.0)
    assert set(b.external()) == {make_entry(i).key for i in range(5, 25)}


def test_lag_is_measured_on_the_sender() -> None:
    a, b = synced()
    a.put(make_entry(1), 10.0)
    assert a.session.replication_lag(10.5) == 0.5
    for payload in a.session.frames_to_send(10.5):
        b.session.receive(payload, 10.6)
    assert a.session.replication_lag(10.7) == pytest.approx(0.7)
    for payload in b.session.frames_to_send(10.6):
        a.session.receive(payload, 10.8)
    assert a.session.stats.ack_lag_last == pytest.approx(0.8)
    assert a.session.replication_lag(11.0) == 0.0


def test_keepalive_and_dead_peer() -> None:
    a, b = synced()
    assert a.session.next_timer() == P.keepalive_interval
    a.session.handle_timer(P.keepalive_interval)
    (ack,) = a.session.frames_to_send(P.keepalive_interval)
    assert isinstance(wire.decode(ack), wire.Ack)
    a.session.handle_timer(P.dead_interval)
    assert (
        ConnectionTerminated(
            f"nothing received from the peer for {P.dead_interval:g} s", by_peer=False
        )
        in a.drain()
    )
    (close,) = a.session.frames_to_send(P.dead_interval)
    b.session.receive(close, P.dead_interval)
    assert of_type(b.drain(), ConnectionTerminated)[0].by_peer
    a.session.connection_lost(P.dead_interval)
    assert InSync(False) in a.drain()
    assert not a.session.in_sync and not a.session.connected


def violation(b: Node, payload: bytes) -> str:
    connect(Node("a", P), b, 0.0)
    b.session.frames_to_send(0.0)
    b.session.receive(payload, 0.0)
    events = b.drain()
    (v,) = of_type(events, ProtocolViolation)
    assert of_type(events, ConnectionTerminated)
    (close,) = b.session.frames_to_send(0.0)
    assert isinstance(wire.decode(close), wire.Close)
    b.session.receive(payload, 0.0)  # ignored once terminated
    assert b.drain() == []
    return v.reason


def hello(version: int = wire.PROTOCOL_VERSION, node: str = "a", buckets: int = 64) -> bytes:
    return msgpack.packb([wire.HELLO, version, node, 1, buckets, 0])


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (hello(version=wire.PROTOCOL_VERSION + 1), "version"),
        (hello(buckets=128), "buckets"),
        (hello(node="b"), "own id"),
        (b"\xc1garbage", "msgpack"),
        (msgpack.packb([wire.ACK, 5, 0, False, 0]), "never sent"),
    ],
)
def test_violations_close_the_connection(payload: bytes, reason: str) -> None:
    b = Node("b", P, epoch=2)
    assert reason in violation(b, payload)
    assert b.session.stats.protocol_violations == 1


def test_expected_peer_id_is_enforced() -> None:
    b = Node("b", dataclasses.replace(P, peer_node_id="fw-2"), epoch=2)
    assert "expected 'fw-2'" in violation(b, hello())


def test_undecodable_frames_are_counted() -> None:
    b = Node("b", P, epoch=2)
    violation(b, b"\x93\x04")
    assert b.session.stats.decode_errors == 1


def test_a_changed_hello_is_a_violation_and_a_repeated_one_is_not() -> None:
    _, b = synced()
    b.session.receive(wire.encode(wire.Hello(wire.PROTOCOL_VERSION, "a", 1, 64, 0)), 1.0)
    assert b.drain() == []
    b.session.receive(wire.encode(wire.Hello(wire.PROTOCOL_VERSION, "a", 9, 64, 0)), 1.0)
    assert of_type(b.drain(), ProtocolViolation)


@pytest.mark.parametrize(
    "kwargs",
    [{"buckets": 100}, {"batch": 1}, {"window": 0}, {"keepalive_interval": 20.0},
     {"ack_timeout": 0.0}, {"anti_entropy_interval": -1.0}, {"peer_node_id": ""},
     {"ack_delay": -0.1}, {"ack_delay": 4.0}],
)  # fmt: skip
def test_params_are_validated(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=r"\w"):
        SyncParams(**kwargs)  # type: ignore[arg-type]


def test_session_arguments_are_validated() -> None:
    with pytest.raises(ValueError, match="node id"):
        SyncSession("", 1)
    with pytest.raises(ValueError, match="epoch"):
        SyncSession("a", 1 << 64)


def test_anti_entropy_repairs_silent_divergence() -> None:
    params = dataclasses.replace(P, anti_entropy_interval=30.0)
    a, b = synced(40, params=params)
    ext = b.session.external
    victim = make_entry(7)
    ext_delete(ext, victim)  # diverged somehow
    assert b.external() != a.table()
    run(a, b, 0.0, until=30.0, step=5.0)
    assert b.external() == a.table()
    assert b.session.in_sync


def test_a_resync_completes_under_a_continuous_stream_of_changes() -> None:
    # More changes arrive every round than the window lets out: pending never drains,
    # yet the resync's end is not held back behind them.
    params = dataclasses.replace(P, window=8, batch=4)
    a, b = pair(params)
    fill(a, [make_entry(i) for i in range(200)], 0.0)
    connect(a, b, 0.0)
    for round_ in range(300):
        for i in range(20):
            a.put(make_entry(i, variant=round_), 0.0)
        for src, dst in ((a, b), (b, a)):
            for payload in src.session.frames_to_send(0.0):
                dst.session.receive(payload, 0.0)
        if b.session.in_sync:
            break
    assert b.session.in_sync
    assert a.session.pending_count > 0


def kinds(frames: list[bytes]) -> list[str]:
    return [type(wire.decode(f)).__name__ for f in frames]


def test_a_lost_resync_end_is_sent_again() -> None:
    a, b = synced(20)
    a.session.bulk_send(1.0)
    frames = a.session.frames_to_send(1.0)
    assert kinds(frames)[-1] == "ResyncDone"
    for payload in frames[:-1]:  # the DONE is lost, and nothing follows it
        b.session.receive(payload, 1.0)
    transfer(a, b, 1.0)
    assert not a.session.send_idle
    run(a, b, 1.0, until=1.0 + P.ack_timeout)
    assert a.session.send_idle
    full = [e for e in of_type(b.events, ResyncCompleted) if e.full]
    assert [e.direction for e in full] == ["receive"]


def test_a_key_recreated_during_a_bucket_replacement_survives_it() -> None:
    params = dataclasses.replace(P, buckets=1, batch=4, window=4)
    a, b = synced(10, params=params)
    ghost = make_entry(0)
    a.remove(ghost.key, 1.0)
    transfer(a, b, 1.0)
    ext = b.session.external
    ext_put(ext, ghost, 1.0, bucket=0)  # b still holds the deleted entry (a lost delete)
    a.session.bulk_send(1.0)
    first = a.session.frames_to_send(1.0)
    assert kinds(first) == ["ResyncBegin", "Buckets"]  # the first part, then the window
    for payload in first:
        b.session.receive(payload, 1.0)
    a.put(ghost, 1.0)  # re-created while b replaces the bucket: sent as a change
    transfer(a, b, 1.0)
    assert b.external() == a.table()
    assert ghost.key in b.external()


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (wire.Buckets(0, 0, (wire.BucketRecord(3, False, True, ()),)), "without its first"),
        (wire.Buckets(0, 0, (wire.BucketRecord(64, True, True, ()),)), "beyond"),
        (wire.Summary(0, 0, 0, 0, b"\0" * 8), "exactly one chunk"),
        (wire.Ack(0, 99, False), "only"),
    ],
)
def test_illegal_sequenced_messages_close_the_connection(
    message: wire.Message, reason: str
) -> None:
    b = Node("b", P, epoch=2)
    b.session.connection_made(0.0)
    b.session.receive(hello(), 0.0)
    b.drain()
    b.session.frames_to_send(0.0)
    b.session.receive(wire.encode(message), 0.0)
    (v,) = of_type(b.drain(), ProtocolViolation)
    assert reason in v.reason


def test_an_entry_in_the_wrong_bucket_is_a_violation() -> None:
    b = Node("b", P, epoch=2)
    b.session.connection_made(0.0)
    b.session.receive(hello(), 0.0)
    e = make_entry(1)
    wrong = (b.session.external.table.bucket_of(pk(e)) + 1) % P.buckets
    b.session.receive(wire.encode_buckets(0, 0, [(wrong, True, True, [(e, 10)])], sent=0), 0.0)
    (v,) = of_type(b.drain(), ProtocolViolation)
    assert "not its own" in v.reason


def test_a_long_non_ascii_reason_still_makes_a_valid_close() -> None:
    b = Node("b", dataclasses.replace(P, peer_node_id="fw-2"), epoch=2)
    b.session.connection_made(0.0)
    b.session.receive(hello(node="\U0001d11e" * 64), 0.0)  # 4 bytes each in UTF-8
    (close,) = b.session.frames_to_send(0.0)
    msg = wire.decode(close)
    assert isinstance(msg, wire.Close) and msg.reason.startswith("peer announces node id")


def test_start_digest_resync_repairs_at_once_and_refuses_when_it_cannot() -> None:
    a, b = synced(40)
    ext = b.session.external
    victim = make_entry(7)
    ext_delete(ext, victim)
    assert a.session.start_digest_resync(1.0)
    assert not a.session.start_digest_resync(1.0)  # one is running already
    transfer(a, b, 1.0)
    assert b.external() == a.table()
    disconnect(a, b, 2.0)
    assert not a.session.start_digest_resync(2.0)


def test_set_filter_reevaluates_the_local_table() -> None:
    a, b = synced(10)
    table = [e for e, _ in a.kernel.values()]
    records = [(pk(e), record.pack(e, record.deadline_of(e.timeout, 1.0))) for e in table]
    a.session.set_filter(lambda e: e.orig.sport % 2 == 0, records, 1.0)
    transfer(a, b, 1.0)
    assert set(b.external()) == {e.key for e in table if e.orig.sport % 2 == 0}
    a.session.set_filter(None, records, 2.0)
    transfer(a, b, 2.0)
    assert b.external() == a.table()


def test_repeated_resync_messages_coalesce() -> None:
    """While our window is full, a peer repeating RESYNC_REQUEST gets one full resync,
    a repeated RESYNC_BEGIN its summaries once, and a new RESYNC_BEGIN none of the
    summaries still owed for the resync it supersedes; our own repeated requests
    leave as one RESYNC_REQUEST."""
    b = Node("b", dataclasses.replace(P, window=1), epoch=2)
    b.session.connection_made(0.0)
    b.session.receive(hello(), 0.0)
    # The BEGIN of b's own digest resync fills the window.
    assert kinds(b.session.frames_to_send(0.0)) == ["Hello", "ResyncBegin", "Ack"]
    seq = 0
    for _ in range(3):
        b.session.receive(wire.encode(wire.ResyncRequest(0, seq, True)), 0.0)
        seq += 1
    for rid in (7, 7, 8, 8):
        b.session.receive(wire.encode(wire.ResyncBegin(0, seq, rid, False)), 0.0)
        seq += 1
    b.session.request_resync(0.0)
    b.session.request_resync(0.0)
    assert kinds(b.session.frames_to_send(0.0)) == ["Ack"]
    started = [(e.direction, e.resync_id, e.full) for e in of_type(b.drain(), ResyncStarted)]
    # The first request supersedes the digest resync whose BEGIN had left; the others
    # find the full resync's BEGIN still queued.
    assert started == [("send", 0, False), ("send", 1, True),
                       ("receive", 7, False), ("receive", 8, False)]  # fmt: skip
    # Acknowledge everything, one message at a time, and see what leaves.
    sent: list[wire.Message] = []
    ack = wire.Ack(0, 1, False)
    while True:
        b.session.receive(wire.encode(ack), 0.0)
        frames = [wire.decode(f) for f in b.session.frames_to_send(0.0)]
        sequenced = [m for m in frames if not isinstance(m, wire.Ack)]
        if not sequenced:
            break
        sent += sequenced
        last = sequenced[-1]
        assert not isinstance(last, (wire.Hello, wire.Close))
        ack = wire.Ack(last.stream, last.seq + 1, False)
    begins = [m for m in sent if isinstance(m, wire.ResyncBegin)]
    assert [(m.resync_id, m.full) for m in begins] == [(1, True)]
    assert [m.resync_id for m in sent if isinstance(m, wire.Summary)] == [8]
    assert sum(isinstance(m, wire.ResyncRequest) for m in sent) == 1
    assert b.session.send_idle


def test_a_request_after_a_resync_began_starts_a_new_one() -> None:
    """A full resync whose BEGIN has left does not cover a later request: the peer may
    have dropped what it sent since (``replicator flush``)."""
    params = dataclasses.replace(P, buckets=16, batch=4, window=8)
    a, b = synced(60, params=params)
    a.session.bulk_send(1.0)
    first = a.session.frames_to_send(1.0)
    assert kinds(first)[:2] == ["ResyncBegin", "Buckets"]
    for payload in first:  # the BEGIN and the first buckets arrive
        b.session.receive(payload, 1.0)
    b.drain()
    b.session.external.clear()  # replicator flush on b
    b.session.request_resync(1.0)
    transfer(a, b, 1.0)
    assert b.external() == a.table()
    full = [e.resync_id for e in of_type(a.events, ResyncStarted) if e.full]
    assert len(full) == 2


def test_a_snapshot_filters_only_records_whose_state_changed() -> None:
    seen: list[Entry] = []

    def accept(e: Entry) -> bool:
        seen.append(e)
        return e.orig.sport % 2 == 0

    a, b = synced(10)
    table = [e for e, _ in a.kernel.values()]
    records = [(pk(e), record.pack(e, record.deadline_of(e.timeout, 1.0))) for e in table]
    a.session.set_filter(accept, records, 1.0)
    assert len(seen) == 10  # a new filter sees everything
    transfer(a, b, 1.0)
    seen.clear()
    changed = table[0]._replace(mark=42)
    later = [(k, record.with_deadline(r, 500.0)) for k, r in records[1:]]
    later.append((pk(changed), record.pack(changed, 500.0)))
    a.session.local_snapshot_records(later, 2.0)
    # Timeouts alone do not change what the filter decides: only the changed entry
    # and the entries the filter refused (not held) are unpacked and filtered again.
    assert changed in seen
    assert len(seen) == 1 + sum(1 for e in table[1:] if e.orig.sport % 2)
    transfer(a, b, 2.0)
    expected = {e.key for e in table if e.orig.sport % 2 == 0}
    assert set(b.external()) == expected


def test_a_message_read_late_counts_its_timeouts_from_when_it_was_built() -> None:
    # A busy standby (its own table filling, a starved CPU) reads a CHANGES message
    # 4 s after the active built it: the copy must not live 4 s longer than the
    # original, in the external cache or in a hot standby's kernel.
    a, b = Node("a", P, epoch=1), Node("b", P, epoch=2)
    connect(a, b, 0.0)
    run(a, b, 0.0, 3.0)  # HELLOs, resyncs and keepalives, all read at once
    a.put(make_entry(1, timeout=100), 3.0)
    a.put(make_entry(2, timeout=100), 3.0)
    frames = a.session.frames_to_send(3.0)
    for payload in frames:
        b.session.receive(payload, 7.0)
    (ups,) = of_type(b.drain(), PeerUpserts)
    assert ups.since == pytest.approx(3.0, abs=0.002)
    assert b.session.external.deadline(pk(make_entry(1))) == pytest.approx(103.0, abs=0.002)
    assert b.session.stats.receive_lag_last == pytest.approx(4.0, abs=0.002)
    assert b.session.stats.receive_lag_max == b.session.stats.receive_lag_last
    # Read promptly, the next one counts from now.
    a.put(make_entry(3, timeout=100), 8.0)
    for payload in a.session.frames_to_send(8.0):
        b.session.receive(payload, 8.0)
    (ups,) = of_type(b.drain(), PeerUpserts)
    assert ups.since == pytest.approx(8.0, abs=0.002)
    assert b.session.external.deadline(pk(make_entry(3))) == pytest.approx(108.0, abs=0.002)


def test_a_snapshot_in_parts_keeps_what_changed_between_the_parts() -> None:
    a, b = Node("a", P, epoch=1), Node("b", P, epoch=2)
    connect(a, b, 0.0)
    fill(a, [make_entry(i) for i in range(6)], 0.0)
    transfer(a, b, 0.0)
    s = a.session
    table = [(pk(e), record.pack(e, record.deadline_of(e.timeout, 1.0)))
             for e in [make_entry(i) for i in (0, 1, 2, 3)]]
    s.begin_local_snapshot()
    assert s.snapshot_running
    s.local_snapshot_part(table[:2], 1.0)
    # Between the parts (the daemon reads events): 3 is deleted, 7 created, 2 changed.
    a.remove(make_entry(3).key, 1.0)
    a.put(make_entry(7), 1.0)
    a.put(make_entry(2, variant=4), 1.0)
    s.local_snapshot_part(table[2:], 1.0)  # a stale view of 2 and 3
    s.finish_local_snapshot(1.0)
    assert not s.snapshot_running
    held = {strip(e) for e in s.local_entries()}
    # 4 and 5 were in no part and unchanged: deleted; the events' view of 2, 3, 7 wins.
    assert held == {strip(make_entry(i)) for i in (0, 1, 7)} | {strip(make_entry(2, variant=4))}
    transfer(a, b, 1.0)
    assert {strip(e) for e in b.session.external.entries()} == held


def test_snapshot_parts_need_a_beginning() -> None:
    s = Node("a", P).session
    with pytest.raises(RuntimeError):
        s.local_snapshot_part([], 0.0)
    with pytest.raises(RuntimeError):
        s.finish_local_snapshot(0.0)
    s.begin_local_snapshot()
    s.abort_local_snapshot()
    assert not s.snapshot_running


_CHANGES = st.lists(st.tuples(st.sampled_from(["record", "entry", "delete"]),
                              st.integers(0, 7), st.integers(0, 3)), max_size=60)


@given(_CHANGES, st.booleans(), st.booleans())
def test_local_changes_are_local_record_and_local_delete_in_order(
        spec: list[tuple[str, int, int]], filtered: bool, snapshot: bool) -> None:
    # The daemon hands the mirror's changes over in batches (local_changes), which take
    # a short path for new keys; the session must end as with one call per change.
    params = dataclasses.replace(P, max_pending=5)
    accept = build_filter(mark=(0, 1)) if filtered else None  # odd variants are not sent
    one, batched = (SyncSession(n, 1, params=params, accept=accept) for n in "ab")
    for s in (one, batched):
        s.local_update(make_entry(0), 1.0)
        if snapshot:
            s.begin_local_snapshot()
    changes: list[tuple[bytes, bytes | None, Entry | None]] = []
    for kind, i, variant in spec:
        e = make_entry(i, variant=variant)
        if kind == "record":
            changes.append((pk(e), record.new_event_record(e, 5.0), None))
        elif kind == "entry":
            changes.append((pk(e), record.pack(e, 5.0), e))
        else:
            changes.append((pk(e), None, None))
    for key, rec, given_entry in changes:
        if rec is None:
            one.local_delete(key, 5.0)
        else:
            one.local_record(key, rec, given_entry, 5.0)
    batched.local_changes(changes, 5.0)
    assert list(batched._table.items()) == list(one._table.items())
    assert batched._pending == one._pending and list(batched._pending) == list(one._pending)
    assert batched._dirty == one._dirty
    assert batched.stats == one.stats


def test_the_first_send_of_a_new_event_leaves_its_record_alone() -> None:
    # A NEW event's record comes with its deadline as told (record.new_event_record):
    # sending it within the slack makes no new record, so the internal cache and the
    # session keep sharing one object per entry; one told long ago is restamped.
    restamps: list[bytes] = []
    a = Node("a", P)
    a.session = SyncSession("a", 1, params=P,
                            restamped=lambda key, old, new: restamps.append(key))
    b = Node("b", P, epoch=2)
    connect(a, b, 0.0)
    transfer(a, b, 0.0)
    fresh, old = make_entry(1, timeout=100), make_entry(2, timeout=100)
    fresh_rec = record.new_event_record(fresh, 10.0)
    a.session.local_changes([(pk(fresh), fresh_rec, None),
                             (pk(old), record.pack(old, 110.0, told=50.0), None)], 10.0)
    transfer(a, b, 10.4)
    assert a.session._table.get(pk(fresh)) is fresh_rec
    assert restamps == [pk(old)]
    # The peer was told 100 s at 10.4: its deadline (110.4) is within the slack above
    # the recorded one, never below it.
    assert b.session.external.deadline(pk(fresh)) == 110.4
    assert record.timing(fresh_rec)[1] == 110.0


@settings(max_examples=300)
@given(st.one_of(st.lists(st.integers(0, 300), unique=True, max_size=80),
                 st.lists(st.integers(0, 300), max_size=80)),
       st.sets(st.integers(0, 300), max_size=8), st.sets(st.integers(0, 300), max_size=8),
       st.booleans(), st.integers(4, 200))
# The cases that decide between the batch path and the one at a time:
@example(list(range(40)), set(), {3, 7}, False, 200)  # keys pending after a delete
@example(list(range(40)), set(), set(), False, 30)  # the batch would make them fold
@example(list(range(40)), set(), set(), True, 200)  # the filter refuses some
@example(list(range(40)), {5}, set(), False, 200)  # a key held already
def test_a_burst_of_new_records_ends_as_one_change_at_a_time(
        burst: list[int], held: set[int], deleted: set[int], filtered: bool,
        max_pending: int) -> None:
    """local_changes takes a batch of only new records together (_new_records): the
    table, the pending keys (in order, with their times) and the stats end as with one
    call per change, whatever the batch holds (keys already held, keys twice, keys
    pending after a delete, records the filter refuses, a fold due)."""
    params = dataclasses.replace(P, max_pending=max_pending)
    accept = build_filter(mark=(0, 1)) if filtered else None  # odd variants are not sent
    one, batched = (SyncSession(n, 1, params=params, accept=accept) for n in "ab")
    for s in (one, batched):
        for i in sorted(held | deleted):
            s.local_update(make_entry(i), 1.0)
        for i in sorted(deleted):
            s.local_delete(pk(make_entry(i)), 2.0)
    changes: list[tuple[bytes, bytes | None, Entry | None]] = []
    for i in burst:
        e = make_entry(i, variant=i % 3 if filtered else 0)
        changes.append((pk(e), record.new_event_record(e, 5.0), None))
    for key, rec, _ in changes:
        assert rec is not None
        one.local_record(key, rec, None, 5.0)
    batched.local_changes(changes, 5.0)
    assert list(batched._table.items()) == list(one._table.items())
    assert list(batched._pending.items()) == list(one._pending.items())
    assert batched._dirty == one._dirty
    assert batched.stats == one.stats


def test_a_burst_of_new_records_is_stored_together() -> None:
    """The batch path is the one taken for a burst (not only an equivalent)."""
    s = SyncSession("a", 1, params=P, accept=build_filter(mark=(0, 1)))
    batch = s._new_records
    taken: list[bool] = []

    def spy(changes: list[tuple[bytes, bytes | None, Entry | None]], now: float) -> bool:
        taken.append(batch(changes, now))
        return taken[-1]

    s._new_records = spy  # type: ignore[method-assign]
    entries = [make_entry(i) for i in range(40)]
    s.local_changes([(pk(e), record.new_event_record(e, 5.0), None) for e in entries], 5.0)
    assert taken == [True]
    assert list(s._pending) == [pk(e) for e in entries]
    assert {pk(e) for e in s.local_entries()} == {pk(e) for e in entries}


def test_new_records_are_sent_with_the_time_left_when_sent() -> None:
    """A NEW event's record is sent as it is (its told stands, see
    test_the_first_send_of_a_new_event_leaves_its_record_alone), with the whole
    seconds left at the moment of sending."""
    a, b = synced()
    entries = [make_entry(i, timeout=100) for i in range(40)]
    a.session.local_changes(
        [(pk(e), record.new_event_record(e, 10.0), None) for e in entries], 10.0)
    transfer(a, b, 12.5)  # sent 2.5 s after the events were read: 97.5 s left
    for e in entries:
        got = b.session.external.get(pk(e))
        assert got is not None and got.timeout == 98
        assert b.session.external.deadline(pk(e)) == 110.5


@pytest.mark.parametrize("held", [0, 5])
def test_a_burst_arrives_whole_with_its_deadlines(held: int) -> None:
    """A CHANGES message of a burst is stored together on the receiver (when it holds
    none of its keys yet) or entry by entry (when it does): the same copies either
    way, each with the deadline its timeout gives, all in one PeerUpserts."""
    a, b = synced()
    olds = [make_entry(i, variant=7, timeout=50) for i in range(held)]
    if olds:
        a.session.local_changes([(pk(e), record.new_event_record(e, 1.0), None) for e in olds],
                                1.0)
        transfer(a, b, 1.0)
    burst = [make_entry(i, timeout=None if i % 9 == 4 else 100 + i % 3) for i in range(40)]
    a.session.local_changes([(pk(e), record.pack(e, record.deadline_of(e.timeout, 10.0),
                                                 record.deadline_of(e.timeout, 10.0)), None)
                             for e in burst], 10.0)
    b.events.clear()
    transfer(a, b, 10.0)
    ext = b.session.external
    assert {strip(e) for e in ext.entries()} == {strip(e) for e in burst}
    for e in burst:
        assert ext.deadline(pk(e)) == (math.inf if e.timeout is None else 10.0 + e.timeout)
    upserts = of_type(b.events, PeerUpserts)
    assert sorted(r for u in upserts for r in u.records) == sorted(
        ext.table.get(pk(e)) or b"" for e in burst)
    # Stored together or one by one, the event carries each record's key.
    assert all(u.keys == tuple(map(record.key_of, u.records)) for u in upserts)
    # And they run out when their deadlines say.
    assert {e.key for e in ext.expire(10.0 + 101.0)} == {
        e.key for e in burst if e.timeout is not None and e.timeout <= 101}


def test_a_burst_during_a_bucket_replacement_confirms_its_keys() -> None:
    """A key deleted and sent again while its bucket is being replaced in parts is
    confirmed by the CHANGES that brings it back, burst or not: the bucket's last part
    must not delete it (so a burst is stored together only when no bucket is being
    replaced)."""
    _, b = synced()
    s = b.session
    c = s._conn
    assert c is not None
    kept = make_entry(7)
    ext_put(s.external, kept, 0.0)
    key = pk(kept)
    bucket = s.external.table.bucket_of(key)

    def body(e: Entry) -> tuple[bytes, int | None]:
        return record.body(record.pack(e, 0.0)), e.timeout

    s._apply_buckets(c, wire.Buckets(0, 0, (wire.BucketRecord(bucket, True, False, ()),)), 0.0)
    s._apply_changes(c, wire.Changes(0, 0, (), (key,)), 0.0)
    burst = [kept] + [make_entry(1000 + i) for i in range(30)]
    s._apply_changes(c, wire.Changes(0, 0, tuple(map(body, burst)), ()), 0.0)
    s._apply_buckets(c, wire.Buckets(0, 0, (wire.BucketRecord(bucket, False, True, ()),)), 0.0)
    assert {strip(e) for e in s.external.entries()} == {strip(e) for e in burst}


def test_a_burst_naming_a_key_twice_is_stored_as_one_by_one() -> None:
    """A peer's message naming a key twice (ours never does) is stored as one entry
    by one: the later state wins and the table counts the key once."""
    _, b = synced()
    s = b.session
    c = s._conn
    assert c is not None
    burst = [make_entry(i) for i in range(30)] + [make_entry(3, variant=5)]
    s._apply_changes(c, wire.Changes(0, 0, tuple(
        (record.body(record.pack(e, 0.0)), e.timeout) for e in burst), ()), 0.0)
    assert len(s.external) == 30
    assert s.external.get(pk(make_entry(3))) == make_entry(3, variant=5)
