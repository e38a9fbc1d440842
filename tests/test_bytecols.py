"""Byte-column helpers (replicator.bytecols) not covered through their users."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from replicator import bytecols


@given(st.integers(1, 300), st.integers(0, 50), st.binary(min_size=1, max_size=1))
def test_split_cuts_into_strings_of_one_size(size: int, k: int, fill: bytes) -> None:
    data = bytes((i * 7 + fill[0]) % 256 for i in range(size * k))
    assert bytecols.split(data, size) == [data[i:i + size] for i in range(0, len(data), size)]
    assert bytecols.split(bytearray(data), size) == bytecols.split(data, size)


@pytest.mark.parametrize(("length", "size"), [(10, 3), (5, 0)])
def test_split_refuses_a_length_that_is_no_multiple(length: int, size: int) -> None:
    with pytest.raises(ValueError, match="not strings of"):
        bytecols.split(bytes(length), size)


@given(st.lists(st.tuples(st.integers(0, 5), st.integers())))
def test_groups_keep_the_order_of_values_and_of_first_appearance(
        pairs: list[tuple[int, int]]) -> None:
    got = bytecols.groups((k for k, _ in pairs), (v for _, v in pairs))
    assert list(got) == list(dict.fromkeys(k for k, _ in pairs))
    for key, values in got.items():
        assert values == [v for k, v in pairs if k == key]
