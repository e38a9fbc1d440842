"""The timer wheel: keys by whole second, popped once their second has started."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from replicator.wheel import TimerWheel


def test_keys_come_out_once_their_second_has_started() -> None:
    w = TimerWheel()
    assert w.next_time() is None and w.pop_due(1e9) == []
    w.add(b"a", 10.5)
    w.add(b"b", 10.0)
    w.add(b"c", 12.25)
    assert w.items == 3 and w.next_time() == 10.0
    assert w.pop_due(9.99) == []
    assert sorted(w.pop_due(10.0)) == [b"a", b"b"]  # a: later within second 10
    assert w.next_time() == 12.0 and w.items == 1
    w.clear()
    assert w.next_time() is None and w.items == 0


@given(st.lists(st.tuples(st.binary(max_size=3), st.floats(-1e6, 1e6)), max_size=60),
       st.lists(st.floats(-1e6, 1e6), max_size=10))  # fmt: skip
def test_every_key_scheduled_by_now_is_popped_and_none_too_early(
    timers: list[tuple[bytes, float]], polls: list[float]
) -> None:
    w = TimerWheel()
    for key, when in timers:
        w.add(key, when)
    popped: list[bytes] = []
    for now in sorted(polls):
        out = w.pop_due(now)
        popped += out
        left = [(k, t) for k, t in timers if math.floor(t) > now]
        assert w.items == len(left)
        # Nothing scheduled at or before now is left; nothing popped is a second early.
        assert all(t > now for _, t in left)
    expected = sorted(k for k, t in timers if polls and math.floor(t) <= max(polls))
    assert sorted(popped) == expected
