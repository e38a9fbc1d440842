"""Bucketed tables with digests: how two nodes find what differs without sending it all.

A table (the sender's local copy or the receiver's external cache of it) is split into
``buckets`` buckets (a power of two) by a stable hash of each entry's key. The digest of
a bucket is the sum modulo 2**64 of a 64-bit fingerprint of each entry in it. Two
nodes compare bucket digests and exchange only the buckets that differ, so catching up
costs in proportion to what changed, not to the table's size.

What the fingerprint covers
---------------------------
Every field the receiver would install: family, both tuples, zone, status, mark,
labels, TCP and SCTP info, helper and master. Not the timeout: it decays every second
and the two copies read it at different moments, so it can never match; keeping the
copies' lifetimes close is the refresh logic's job (:mod:`replicator.sync`). Not the
conntrack id: it differs on every copy.

Hashes must agree between processes and hosts, so nothing here uses Python's
``hash()`` (randomised per process): bucket placement is CRC-32 of the msgpack form of
the key and the fingerprint an unkeyed 8-byte BLAKE2b of the msgpack form of the
covered fields. The sum makes a digest independent of insertion order.

Digests are recomputed lazily: a change only marks its bucket stale (one CRC on the
hot path); a stale bucket's digest is recomputed when someone asks for it.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from hashlib import blake2b
from zlib import crc32

import msgpack

from .model import Entry, EntryKey
from .wire import DIGEST_SIZE, MAX_BUCKETS

_MASK64 = (1 << 64) - 1
_packb = msgpack.Packer(use_bin_type=True, autoreset=True).pack


def check_bucket_count(buckets: int) -> int:
    """``buckets`` if it is a power of two within 1..MAX_BUCKETS, else ValueError."""
    if not 1 <= buckets <= MAX_BUCKETS or buckets & (buckets - 1):
        raise ValueError(f"bucket count must be a power of two in 1..{MAX_BUCKETS}")
    return buckets


def fingerprint(entry: Entry) -> int:
    """64-bit fingerprint of every field of ``entry`` except timeout and id."""
    covered = entry[:5] + entry[6:12]
    return int.from_bytes(blake2b(_packb(covered), digest_size=DIGEST_SIZE).digest(), "big")


def same_state(a: Entry, b: Entry) -> bool:
    """True if ``a`` and ``b`` agree on every fingerprinted field (timeout, id aside)."""
    return a[:5] == b[:5] and a[6:12] == b[6:12]


def pack_digests(digests: list[int]) -> bytes:
    """Digests as the SUMMARY message carries them (8 bytes each, big endian)."""
    return struct.pack(f">{len(digests)}Q", *digests)


def unpack_digests(blob: bytes) -> tuple[int, ...]:
    """Inverse of :func:`pack_digests` (``len(blob)`` must be a multiple of 8)."""
    return struct.unpack(f">{len(blob) // DIGEST_SIZE}Q", blob)


class BucketTable:
    """Entries by key, grouped by bucket, with lazily recomputed bucket digests."""

    __slots__ = ("_buckets", "_digests", "_mask", "_size")

    def __init__(self, buckets: int) -> None:
        check_bucket_count(buckets)
        self._mask = buckets - 1
        self._buckets: list[dict[EntryKey, Entry]] = [{} for _ in range(buckets)]
        #: Cached digest per bucket; None when stale.
        self._digests: list[int | None] = [0] * buckets
        self._size = 0

    @property
    def buckets(self) -> int:
        """The number of buckets."""
        return self._mask + 1

    def __len__(self) -> int:
        return self._size

    def bucket_of(self, key: EntryKey) -> int:
        """The bucket ``key`` belongs to."""
        return crc32(_packb(key)) & self._mask

    def get(self, key: EntryKey) -> Entry | None:
        """The entry stored under ``key``, or None."""
        return self._buckets[crc32(_packb(key)) & self._mask].get(key)

    def put(self, bucket: int, key: EntryKey, entry: Entry) -> Entry | None:
        """Store ``entry`` under ``key`` (in ``bucket``, its bucket); returns the old one."""
        b = self._buckets[bucket]
        old = b.get(key)
        b[key] = entry
        if old is None:
            self._size += 1
        self._digests[bucket] = None
        return old

    def pop(self, bucket: int, key: EntryKey) -> Entry | None:
        """Remove ``key`` (in ``bucket``); returns the removed entry or None."""
        old = self._buckets[bucket].pop(key, None)
        if old is not None:
            self._size -= 1
            self._digests[bucket] = None
        return old

    def bucket(self, bucket: int) -> dict[EntryKey, Entry]:
        """The entries of one bucket (a live view: do not modify it)."""
        return self._buckets[bucket]

    def digest(self, bucket: int) -> int:
        """The digest of one bucket (recomputed if stale)."""
        d = self._digests[bucket]
        if d is None:
            d = sum(map(fingerprint, self._buckets[bucket].values())) & _MASK64
            self._digests[bucket] = d
        return d

    def digests(self, first: int, count: int) -> list[int]:
        """Digests of buckets ``first .. first + count - 1``."""
        return [self.digest(b) for b in range(first, first + count)]

    def values(self) -> Iterator[Entry]:
        """Every entry, bucket by bucket."""
        for b in self._buckets:
            yield from b.values()

    def clear(self) -> None:
        """Remove everything."""
        for b in self._buckets:
            b.clear()
        self._digests = [0] * len(self._buckets)
        self._size = 0
