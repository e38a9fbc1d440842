"""Pure policies of the peer link: refusal log rate limiting, handshake slots, backoff."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from replicator.linkpolicy import Backoff, HandshakeSlots, RefusalLog


def test_one_line_per_host_per_interval_with_the_suppressed_count() -> None:
    log = RefusalLog(interval=60.0)
    assert log.record("10.0.0.9", now=0.0) == 0
    assert log.record("10.0.0.9", now=1.0) is None
    assert log.record("10.0.0.9", now=59.9) is None
    assert log.record("10.0.0.7", now=2.0) == 0
    assert log.record("10.0.0.9", now=60.0) == 2
    assert log.record("10.0.0.9", now=61.0) is None


def test_remembered_hosts_are_bounded() -> None:
    log = RefusalLog(interval=60.0, max_hosts=3, max_lines=1000)
    for i in range(100):
        assert log.record(f"10.0.0.{i}", now=float(i) / 100) == 0
    assert len(log) == 3


def test_total_lines_per_interval_are_bounded() -> None:
    log = RefusalLog(interval=10.0, max_lines=2)
    assert log.record("a", 0.0) == 0
    assert log.record("b", 0.0) == 0
    assert log.record("c", 1.0) is None
    assert log.record("a", 1.0) is None
    # A new window: logging resumes, with what was suppressed for each host.
    assert log.record("a", 10.0) == 1
    assert log.record("c", 10.0) == 1


@given(
    events=st.lists(
        st.tuples(st.sampled_from(["a", "b", "c", "d"]), st.floats(0, 1000)), max_size=200
    )
)
def test_never_more_than_one_line_per_host_within_an_interval(
    events: list[tuple[str, float]],
) -> None:
    # Room for every host, so none is forgotten (forgetting is tested above).
    log = RefusalLog(interval=5.0, max_hosts=4, max_lines=3)
    logged: dict[str, float] = {}
    refused: dict[str, int] = {}
    for host, now in sorted(events, key=lambda e: e[1]):
        refused[host] = refused.get(host, 0) + 1
        suppressed = log.record(host, now)
        if suppressed is not None:
            assert host not in logged or now - logged[host] >= 5.0
            logged[host] = now
            refused[host] -= suppressed + 1
            # Every refusal is either logged or reported as suppressed by the next line.
            assert refused[host] == 0


def test_slots_bound_totals_and_per_host() -> None:
    slots = HandshakeSlots(total=3, per_host=2)
    assert slots.try_acquire("flood")
    assert slots.try_acquire("flood")
    assert not slots.try_acquire("flood")
    assert slots.try_acquire("peer")
    assert not slots.try_acquire("other")
    assert slots.in_use == 3
    slots.release("flood")
    assert slots.try_acquire("other")
    slots.release("flood")
    slots.release("peer")
    slots.release("other")
    assert slots.in_use == 0
    assert slots.try_acquire("flood")


@given(ops=st.lists(st.tuples(st.booleans(), st.sampled_from("abc")), max_size=100))
def test_slots_never_exceed_their_bounds(ops: list[tuple[bool, str]]) -> None:
    slots = HandshakeSlots(total=4, per_host=2)
    held: list[str] = []
    for acquire, host in ops:
        if acquire:
            if slots.try_acquire(host):
                held.append(host)
        elif host in held:
            held.remove(host)
            slots.release(host)
        assert slots.in_use == len(held) <= 4
        assert all(held.count(h) <= 2 for h in "abc")


def test_invalid_policy_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="positive"):
        RefusalLog(interval=0)
    with pytest.raises(ValueError, match="positive"):
        HandshakeSlots(total=0, per_host=1)
    with pytest.raises(ValueError, match="initial"):
        Backoff(initial=2.0, maximum=1.0)


def test_backoff_doubles_up_to_the_maximum() -> None:
    backoff = Backoff(initial=0.1, maximum=5.0)
    top = [backoff.delay(n, jitter=0.999999) for n in range(10)]
    assert top[0] == pytest.approx(0.1, rel=1e-5)
    assert top[1] == pytest.approx(0.2, rel=1e-5)
    assert top[9] == pytest.approx(5.0, rel=1e-5)


@given(attempt=st.integers(0, 10_000), jitter=st.floats(0, 1, exclude_max=True))
def test_backoff_stays_within_half_and_all_of_the_capped_delay(
    attempt: int, jitter: float
) -> None:
    backoff = Backoff(initial=0.1, maximum=5.0)
    delay = backoff.delay(attempt, jitter)
    capped = min(0.1 * 2.0 ** min(attempt, 64), 5.0)
    assert capped / 2 <= delay < capped + 1e-12
