"""Bucketed tables and digests: stable across processes, blind to timeouts only."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st
from synclink import make_entry, pk

from replicator.digest import BucketTable, check_bucket_count, pack_digests, unpack_digests
from replicator.model import Entry, TcpInfo
from replicator.record import fingerprint, pack, same_state

_PROBE = """
from synclink import make_entry, pk
from replicator.digest import BucketTable
from replicator.record import fingerprint, pack
t = BucketTable(4096)
print([(t.bucket_of(pk(make_entry(i))), fingerprint(pack(make_entry(i), 0.0)))
       for i in range(50)])
"""


def rec(e: Entry) -> bytes:
    return pack(e, 0.0)


def put(t: BucketTable, e: Entry) -> bytes | None:
    return t.put(t.bucket_of(pk(e)), pk(e), rec(e))


def test_placement_and_fingerprints_do_not_depend_on_the_process() -> None:
    # Python's hash() is salted per process; both nodes must agree on every bucket.
    runs = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True,
            check=True, cwd=os.path.dirname(__file__),
        )  # fmt: skip
        runs.add(out.stdout)
    assert len(runs) == 1


def test_fingerprint_ignores_timeout_and_id_only() -> None:
    e = make_entry(1)
    assert fingerprint(rec(e)) == fingerprint(pack(e._replace(timeout=5, id=99), 7.0, 3.0))
    assert same_state(rec(e), pack(e._replace(timeout=5, id=99), 7.0, 3.0))
    changed = [
        e._replace(zone=1), e._replace(status=0), e._replace(mark=7),
        e._replace(labels=b"\1" * 16), e._replace(tcp=TcpInfo(4, 7, 7, 0x23, 0x23)),
        e._replace(helper="ftp"), e._replace(master=e.orig), e._replace(reply=e.orig),
    ]  # fmt: skip
    for other in changed:
        assert fingerprint(rec(other)) != fingerprint(rec(e))
        assert not same_state(rec(other), rec(e))


@given(st.lists(st.integers(0, 500), unique=True, max_size=60), st.randoms())
def test_digest_is_order_independent_and_tracks_changes(ids: list[int], rnd: random.Random) -> None:
    a, b = BucketTable(8), BucketTable(8)
    shuffled = list(ids)
    rnd.shuffle(shuffled)
    for table, order in ((a, ids), (b, shuffled)):
        for i in order:
            put(table, make_entry(i))
    assert a.digests(0, 8) == b.digests(0, 8)
    assert len(a) == len(ids)
    if ids:
        e = make_entry(ids[0])
        bucket = a.bucket_of(pk(e))
        before = a.digest(bucket)
        put(a, e._replace(mark=1))
        assert a.digest(bucket) != before
        put(a, e._replace(timeout=1))
        assert a.digest(bucket) == before
        assert a.pop(bucket, pk(e)) is not None
        assert a.pop(bucket, pk(e)) is None
        assert len(a) == len(ids) - 1
        put(a, e)
        assert a.digests(0, 8) == b.digests(0, 8)


def test_empty_buckets_digest_to_zero_and_clear_empties() -> None:
    t = BucketTable(4)
    put(t, make_entry(3))
    assert sorted(t.digests(0, 4)).count(0) == 3
    t.clear()
    assert t.digests(0, 4) == [0, 0, 0, 0]
    assert len(t) == 0
    assert list(t.values()) == []


@given(st.lists(st.integers(0, 2**64 - 1), max_size=20))
def test_digests_pack_round_trip(digests: list[int]) -> None:
    blob = pack_digests(digests)
    assert len(blob) == 8 * len(digests)
    assert list(unpack_digests(blob)) == digests


@pytest.mark.parametrize("n", [0, 3, 1000, 1 << 17])
def test_bucket_count_must_be_a_power_of_two(n: int) -> None:
    with pytest.raises(ValueError, match="power of two"):
        check_bucket_count(n)


def test_add_stores_only_a_new_key_and_stales_its_bucket() -> None:
    t = BucketTable(16)
    e = make_entry(1)
    k, b = pk(e), t.bucket_of(pk(e))
    before = t.digest(b)
    assert t.add(k, pack(e, 10.0))
    assert len(t) == 1 and t.get(k) == pack(e, 10.0)
    assert t.digest(b) == (before + fingerprint(pack(e, 10.0))) % (1 << 64)
    # Present: left alone (the caller takes the general path).
    assert not t.add(k, pack(e._replace(mark=5), 10.0))
    assert len(t) == 1 and t.get(k) == pack(e, 10.0)
