"""The lag figures of ``bench/sync.py``: one upper bound per entry from polled counts."""

from __future__ import annotations

from bench.sync import entry_bounds


def test_each_entry_is_bounded_by_the_first_sample_that_counts_it() -> None:
    # Two batches of three, written from t=0 and t=10.
    samples = [(5.0, 2), (7.0, 2), (12.0, 5), (20.0, 6)]
    assert entry_bounds(samples, [0.0, 10.0], 3) == [5.0, 5.0, 12.0, 2.0, 2.0, 10.0]


def test_entries_never_counted_and_counts_beyond_the_writes_are_left_out() -> None:
    # A count that drops back is not counted twice; one past the writes is ignored.
    samples = [(3.0, 1), (4.0, 0), (6.0, 2), (9.0, 4)]
    assert entry_bounds(samples, [0.0], 2) == [3.0, 6.0]
    assert entry_bounds([], [0.0], 2) == []
