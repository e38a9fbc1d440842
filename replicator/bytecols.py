"""Many byte strings of one layout, read and written one byte column at a time (pure).

The hot paths that handle a whole burst of entries (a takeover's create requests,
:mod:`replicator.colpack`; a burst of NEW events, :func:`replicator.ctnetlink.decode_new_records`)
handle strings that all have one size and one layout: the same bytes at the same
offsets, only the values differ. Joined into one ``bytes``, the *k* strings' byte at
offset *p* is the extended slice ``joined[p::size]``: one C loop, whatever *k*. These
helpers read layouts and compare or gather such columns; values are compared as big
integers (one byte per string), so that no Python code runs per string.
"""

from __future__ import annotations

import re
import struct
import sys
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import TypeVar

#: 0 for a zero byte, 1 for any other (``bytes.translate`` table).
NONZERO = bytes([0]) + bytes([1]) * 255
LITTLE = sys.byteorder == "little"
#: Byte copies grouped by source: (source offset, destination offsets), see :func:`fill`.
Copies = tuple[tuple[int, tuple[int, ...]], ...]


def table(flag: Callable[[int], bool]) -> bytes:
    """A ``bytes.translate`` table: 1 for the byte values ``flag`` holds for, else 0."""
    return bytes(1 if flag(x) else 0 for x in range(256))


def copies(pairs: Iterable[tuple[int, int]]) -> Copies:
    """``(destination, source)`` byte offset pairs grouped by source (each source
    column is then extracted once, however many destination bytes it feeds)."""
    by_source: dict[int, list[int]] = {}
    for dst, src in pairs:
        by_source.setdefault(src, []).append(dst)
    return tuple((src, tuple(dsts)) for src, dsts in by_source.items())


def fill(template: bytes, k: int, joined: bytes, size: int, plan: Copies) -> bytearray:
    """``k`` copies of ``template`` one after the other, each with the bytes of ``plan``
    copied in from its own string of ``joined`` (``k`` strings of ``size`` bytes)."""
    width = len(template)
    out = bytearray(template * k)
    for src, dsts in plan:
        column = joined[src::size]
        for dst in dsts:
            out[dst::width] = column
    return out


def struct_items(fmt: str) -> list[tuple[int, int, str]]:
    """``(offset, size, code)`` of each item of the ``struct`` format ``fmt`` (a byte
    order character first, so no alignment; codes ``x B H I d s``), pads excluded."""
    out: list[tuple[int, int, str]] = []
    off = 0
    for count, code in re.findall(r"(\d*)([xBHIds])", fmt[1:]):
        n = int(count) if count else 1
        if code == "x":
            off += n
        elif code == "s":
            out.append((off, n, f"{n}s"))
            off += n
        else:
            size = struct.calcsize(">" + code)
            out.extend((off + i * size, size, code) for i in range(n))
            off += n * size
    if off != struct.calcsize(fmt):
        raise ValueError(f"unsupported struct format {fmt!r}")
    return out


def differ(joined: bytes, size: int, k: int, pairs: Iterable[tuple[int, int]]) -> int:
    """Of ``k`` strings of ``size`` bytes joined, one byte per string as a big integer
    (first string first): 1 where its bytes at any of ``pairs`` of offsets differ, else 0."""
    diff = 0
    for a, b in pairs:
        diff |= int.from_bytes(joined[a::size]) ^ int.from_bytes(joined[b::size])
    return int.from_bytes(diff.to_bytes(k).translate(NONZERO))


def unlike(joined: bytes, size: int, k: int, expected: Sequence[tuple[int, int]]) -> int:
    """As :func:`differ`: 1 where a string's byte at any offset of ``expected``
    (``(offset, value)`` pairs) is not that value."""
    # Nearly always every string matches: one comparison of all the columns says so.
    if (b"".join([joined[at::size] for at, _value in expected])
            == b"".join([bytes([value]) * k for _at, value in expected])):
        return 0
    diff = 0
    for at, value in expected:
        diff |= int.from_bytes(joined[at::size]) ^ int.from_bytes(bytes([value]) * k)
    return int.from_bytes(diff.to_bytes(k).translate(NONZERO))


def gather(joined: bytes, size: int, k: int, at: int, width: int, *,
           reverse: bool = False) -> bytearray:
    """The ``width`` bytes at ``at`` of each of ``k`` strings of ``size`` bytes joined,
    one after the other; with ``reverse``, each value's bytes in reverse order (big
    endian to the host's little endian, for an ``array``)."""
    out = bytearray(width * k)
    for i in range(width):
        out[(width - 1 - i if reverse else i)::width] = joined[at + i::size]
    return out


def scatter(out: bytearray, size: int, at: int, width: int, values: bytes) -> None:
    """Write the ``width``-byte values of ``values`` (one after the other) at ``at`` of
    each string of ``size`` bytes in ``out`` (as many strings as values)."""
    for i in range(width):
        out[at + i::size] = values[i::width]


def split(data: bytes | bytearray, size: int) -> list[bytes]:
    """``data`` cut into strings of ``size`` bytes (``len(data)`` a multiple of it).

    One ``struct`` unpack of ``k`` times ``{size}s`` makes the ``k`` strings in C: 20 ns
    each instead of 150 ns for a slice each in a comprehension (``struct`` keeps the
    compiled formats of the sizes seen last).
    """
    if size < 1 or len(data) % size:
        raise ValueError(f"{len(data)} bytes are not strings of {size}")
    k = len(data) // size
    return list(struct.unpack(f"{size}s" * k, data))


_K = TypeVar("_K", bound=Hashable)
_V = TypeVar("_V")


def groups(keys: Iterable[_K], values: Iterable[_V]) -> dict[_K, list[_V]]:
    """``values`` grouped by their ``keys`` (one each, in the same order): each
    group's values in their order, the groups in the order of their first value (the
    strings of one layout, before their columns are handled together)."""
    out: dict[_K, list[_V]] = {}
    for key, value in zip(keys, values, strict=True):
        group = out.get(key)
        if group is None:
            out[key] = [value]
        else:
            group.append(value)
    return out
