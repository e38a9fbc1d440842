"""The receive-lag estimate from the peer's clock readings (replicator.peerclock)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from replicator.peerclock import MAX_LAG, WINDOW, PeerClock


def sent_at(peer_time: float) -> int:
    return int(peer_time * 1000)


def test_the_fastest_message_has_no_lag_and_a_late_one_its_delay() -> None:
    clock = PeerClock()
    # The peer's clock reads 5000 s when ours reads 100 s: the offset is unknown and
    # irrelevant, only its variation counts.
    assert clock.lag(sent_at(5000.0), 100.0) == 0.0
    assert clock.lag(sent_at(5001.0), 101.0) == pytest.approx(0.0)
    # Built at 5002 s, read 4 s later than the others were.
    assert clock.lag(sent_at(5002.0), 106.0) == pytest.approx(4.0)
    # Built at 5007 s and read at 106.5 s: faster than any before, the new baseline.
    assert clock.lag(sent_at(5007.0), 106.5) == 0.0


def test_a_faster_message_lowers_the_estimate_for_the_next() -> None:
    clock = PeerClock()
    assert clock.lag(sent_at(10.0), 12.0) == 0.0  # the first one read 2 s late
    assert clock.lag(sent_at(11.0), 11.001) == 0.0  # this one promptly: new baseline
    assert clock.lag(sent_at(12.0), 14.001) == pytest.approx(2.0)


def test_a_step_of_the_offset_is_forgotten_within_two_windows() -> None:
    clock = PeerClock()
    now = 0.0
    for _ in range(30):  # keepalives every second, read promptly
        clock.lag(sent_at(now + 50.0), now)
        now += 1.0
    # This node's clock jumps 7 s ahead of the peer's (say its VM was paused): every
    # message now reads as 7 s late, until the windows holding the old offset are gone.
    lags = []
    for _ in range(int(3 * WINDOW)):
        lags.append(clock.lag(sent_at(now + 43.0), now))
        now += 1.0
    assert lags[0] == pytest.approx(7.0)
    assert lags[-1] == pytest.approx(0.0)
    assert all(lag == pytest.approx(0.0) for lag in lags[int(2 * WINDOW) + 1:])


def test_the_lag_is_bounded() -> None:
    clock = PeerClock()
    clock.lag(sent_at(0.0), 0.0)
    assert clock.lag(sent_at(0.0), WINDOW - 0.5) == WINDOW - 0.5
    clock = PeerClock()
    clock.lag(sent_at(1000.0), 0.0)
    assert clock.lag(sent_at(1000.0), 5.0) == 5.0
    # A peer whose clock stands still (a bug): the lag grows, but never past MAX_LAG.
    lags = [clock.lag(sent_at(1000.0), t) for t in range(6, 200)]
    assert max(lags) <= MAX_LAG


@given(
    offset=st.floats(-1e6, 1e6),
    delays=st.lists(st.floats(0.0, 8.0), min_size=1, max_size=60),
    base=st.floats(0.0, 0.01),
)
def test_lag_is_the_delay_beyond_the_smallest_recent_one(
    offset: float, delays: list[float], base: float
) -> None:
    # One message per second of the peer's clock, read in order (a stream), each
    # ``delay`` late or later if the one before was; a fast one first, as keepalives give.
    clock = PeerClock()
    start = 1000.0
    read = start + offset + base
    clock.lag(sent_at(start), read)
    for i, delay in enumerate(delays, start=1):
        peer = start + i
        read = max(read, peer + offset + base + delay)
        late = read - (peer + offset + base)
        lag = clock.lag(sent_at(peer), read)
        assert 0.0 <= lag <= MAX_LAG
        if read < start + offset + base + 2 * WINDOW:
            # The fast sample is still in the window: the lag is the extra delay
            # (within the clock's millisecond resolution and float rounding).
            assert lag == pytest.approx(late, abs=2e-3)
        else:
            # Never more than the delay beyond the fastest recent message.
            assert lag <= late + 2e-3
