"""Every decoder of untrusted bytes under hypothesis: only its own errors may escape.

The targets are the ones ``make fuzz`` runs under atheris (:mod:`fuzz.targets`): wire
frames before authentication, sync messages, a sync session receiving anything,
ctnetlink datagrams, control requests, keepalived notify lines, configuration files.
Each is fed random bytes and mutations of valid inputs (:mod:`fuzz.seeds`: bit flips,
byte overwrites, truncations, insertions, deletions, splices of two inputs). Then the
memory bounds: a declared length or container size far beyond the limits is refused
from its header, without allocating what it declares.
"""

from __future__ import annotations

import json
import struct
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz.seeds import SEEDS
from fuzz.targets import TARGETS, sync_receive
from replicator import config, control, ctnetlink, netlink, wire
from replicator.errors import (
    ConfigError,
    ControlDecodeError,
    NetlinkDecodeError,
    NotifyDecodeError,
    WireDecodeError,
)
from replicator.framing import DEFAULT_MAX_FRAME_SIZE, FRAME_HEADER_SIZE, FrameDecoder
from replicator.notifyfifo import LineBuffer
from replicator.role import MAX_NOTIFY_LINE, parse_notify
from replicator.sync import InSync, SyncSession

NAMES = sorted(TARGETS)
SEED_SETS = {name: SEEDS[name]() for name in NAMES}
FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Byte values that sit on boundaries: lengths, signs, and the msgpack type markers of
# nil, false/true, bin32, float64, uint64, int64, str32, array32 and map32.
INTERESTING = (0x00, 0x01, 0x7F, 0x80, 0xFF, 0xC0, 0xC2, 0xC3, 0xC6, 0xCB, 0xCF, 0xD3,
               0xDB, 0xDD, 0xDF)  # fmt: skip


@st.composite
def mutations(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    """A valid input with one to four random edits."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "cut", "insert", "delete", "splice"]))
        pos = draw(st.integers(0, len(data)))
        if op == "flip" and pos < len(data):
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and pos < len(data):
            data[pos] = draw(st.sampled_from(INTERESTING) | st.integers(0, 255))
        elif op == "cut":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 16))]
        else:
            other = draw(st.sampled_from(seeds))
            data[pos:] = other[draw(st.integers(0, len(other))) :]
    return bytes(data)


# --- only allowed errors escape -------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@FUZZ
@given(data=st.data())
def test_random_bytes(name: str, data: st.DataObject) -> None:
    TARGETS[name](data.draw(st.binary(max_size=600), label="input"))


@pytest.mark.parametrize("name", NAMES)
@FUZZ
@given(data=st.data())
def test_mutated_valid_inputs(name: str, data: st.DataObject) -> None:
    TARGETS[name](data.draw(mutations(SEED_SETS[name]), label="input"))


@pytest.mark.parametrize("name", NAMES)
def test_every_seed_passes_its_target(name: str) -> None:
    target: Callable[[bytes], None] = TARGETS[name]
    for seed in SEED_SETS[name]:
        target(seed)


def test_seeds_are_valid_inputs() -> None:
    """The seeds get past the decoders (else mutating them would reach nothing deep)."""
    assert all(wire.decode(seed) for seed in SEED_SETS["wire"])
    for seed in SEED_SETS["ctnetlink"]:
        ctnetlink.parse_acks(seed)
        list(netlink.iter_messages(seed))
    requests = [s for s in SEED_SETS["control"] if b'"cmd"' in s]
    assert {control.decode_request(s).command for s in requests} == set(control.Command)
    for seed in SEED_SETS["config"]:
        config.parse_config(seed.decode())


def test_sync_seeds_reach_the_deep_states() -> None:
    """Replayed to a fresh session, the lossless transcripts complete a resync and the
    lossy one makes the session see gaps (NACKs, go-back)."""
    from fuzz.targets import SYNC_SEPARATOR, SYNC_STEP, new_sync_session, sync_step

    *lossless, lossy = SEED_SETS["sync_receive"]
    for seed in (*lossless, lossy):
        session = new_sync_session()
        seen_in_sync = False
        now = 0.0
        sync_step(session, b"", now)
        for payload in seed.split(SYNC_SEPARATOR):
            now += SYNC_STEP
            if payload:
                session.receive(payload, now)
            while (event := session.next_event()) is not None:
                seen_in_sync = seen_in_sync or event == InSync(True)
            sync_step(session, b"", now)
        assert session.stats.protocol_violations == 0
        if seed is lossy:
            assert session.stats.out_of_order > 0
        else:
            assert seen_in_sync


def test_receive_never_raises_on_messages_of_any_shape() -> None:
    """Well-formed msgpack that is no valid message, straight to a connected session."""
    session = SyncSession("fw-a", 1)
    session.connection_made(0.0)
    for value in ([], [None], [1], [4, 0, 0, [[1] * 12], []], [99, 0], {"a": 1}, "x", 2**63):
        session.receive(msgpack.packb(value), 1.0)
    assert session.stats.decode_errors >= 1


def test_non_utf8_config_file_is_a_config_error(tmp_path: Path) -> None:
    # The config target skips non-UTF-8 bytes because load_config refuses them first.
    path = tmp_path / "replicator.toml"
    path.write_bytes(b'[node]\nname = "\xff"\n')
    with pytest.raises(ConfigError, match="not UTF-8"):
        config.load_config(path, check=False)


def test_sync_target_survives_garbage_between_valid_messages() -> None:
    transcript = SEED_SETS["sync_receive"][1]
    sync_receive(transcript.replace(b"\xc1\xc1", b"\xc1\xc1\x93\xc1\xc1", 5))


# --- memory bounds ------------------------------------------------------------------

#: Peak Python allocation allowed while refusing an input whose header declares far
#: more: a few objects and an exception, never what the header announces.
SMALL = 256 * 1024


@contextmanager
def allocation_peak() -> Iterator[list[int]]:
    """Measure the peak of Python allocations inside the block (into ``peak[0]``)."""
    peak = [0]
    tracemalloc.start()
    try:
        yield peak
        peak[0] = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("declared", [DEFAULT_MAX_FRAME_SIZE + 1, (1 << 32) - 1])
def test_frame_header_beyond_the_bound_is_refused_from_the_header(declared: int) -> None:
    decoder = FrameDecoder()
    with allocation_peak() as peak, pytest.raises(WireDecodeError, match="exceeds the bound"):
        decoder.feed(struct.pack(">I", declared) + b"\0" * 1000)
    assert peak[0] < SMALL
    assert decoder.buffered == 0


def test_frame_decoder_never_holds_more_than_one_frame() -> None:
    decoder = FrameDecoder(4096)
    stream = struct.pack(">I", 4096) + b"x" * 4095  # one byte short of a whole frame
    for start in range(0, len(stream), 1000):
        assert decoder.feed(stream[start : start + 1000]) == []
        assert decoder.buffered <= FRAME_HEADER_SIZE + 4096
    assert decoder.feed(b"x") == [b"x" * 4096]
    assert decoder.buffered == 0


U32_MAX = b"\xff\xff\xff\xff"
HUGE_MSGPACK_HEADERS = {
    "array32": b"\xdd" + U32_MAX,
    "map32": b"\xdf" + U32_MAX,
    "bin32": b"\xc6" + U32_MAX,
    "str32": b"\xdb" + U32_MAX,
    "ext32": b"\xc9" + U32_MAX + b"\x01",
}


@pytest.mark.parametrize("header", HUGE_MSGPACK_HEADERS.values(), ids=HUGE_MSGPACK_HEADERS)
def test_msgpack_header_declaring_2_to_the_32_is_refused(header: bytes) -> None:
    # Alone, as the upserts of a CHANGES [4, 0, 0, <header>, []], and followed by data.
    changes = bytes([0x95, wire.CHANGES, 0, 0])
    for data in (header, changes + header + b"\x90", header + b"\0" * 65536):
        with allocation_peak() as peak, pytest.raises(WireDecodeError):
            wire.decode(data)
        assert peak[0] < SMALL + len(data)


def test_wire_limits_are_enforced_by_the_unpacker() -> None:
    """Containers just over each bound are refused, just under it accepted."""
    digests = wire.MAX_SUMMARY_DIGESTS * wire.DIGEST_SIZE
    assert wire.decode(msgpack.packb([wire.SUMMARY, 0, 0, 0, 0, b"\0" * digests]))
    with pytest.raises(WireDecodeError, match="msgpack"):
        wire.decode(msgpack.packb([wire.SUMMARY, 0, 0, 0, 0, b"\0" * (digests + 8)]))
    with pytest.raises(WireDecodeError, match="msgpack"):
        wire.decode(msgpack.packb([wire.CHANGES, 0, 0, [None] * (wire.MAX_ITEMS + 1), [], 0]))
    with pytest.raises(WireDecodeError, match="msgpack"):
        wire.decode(msgpack.packb([wire.CLOSE, "x" * (wire.MAX_REASON + 1)]))
    with pytest.raises(WireDecodeError, match="msgpack"):
        wire.decode(b"\x91" * 100_000 + b"\xc0")  # nesting deeper than the unpacker's stack


def test_netlink_lengths_beyond_the_datagram_are_refused() -> None:
    header = netlink.NLMSG_HDR.pack(0xFFFF_FFFF, ctnetlink.CT_NEW, 0, 0, 0)
    for decode in (ctnetlink.decode_events, ctnetlink.decode_dump, ctnetlink.parse_acks):
        with allocation_peak() as peak, pytest.raises(NetlinkDecodeError):
            decode(header + b"\0" * 64)
        assert peak[0] < SMALL
    attr = struct.pack("=HH", 0xFFFF, ctnetlink.CTA_TUPLE_ORIG)
    body = netlink.NFGENMSG.pack(2, 0, 0) + attr
    message = netlink.NLMSG_HDR.pack(16 + len(body), ctnetlink.CT_NEW, 0, 0, 0) + body
    with pytest.raises(NetlinkDecodeError):
        ctnetlink.decode_dump(message)


def test_control_request_is_bounded_before_parsing() -> None:
    line = json.dumps({"v": 1, "cmd": "status", "arg": " " * control.MAX_REQUEST}).encode()
    with allocation_peak() as peak, pytest.raises(ControlDecodeError, match="longer than"):
        control.decode_request(line)
    assert peak[0] < SMALL
    with pytest.raises(ControlDecodeError):
        control.decode_request(b"[" * (control.MAX_REQUEST - 1))  # too deep for json


def test_notify_line_buffer_holds_at_most_one_line() -> None:
    buffer = LineBuffer()
    chunk = b"G" * 65536
    with allocation_peak() as peak:
        for _ in range(64):  # 4 MiB without a newline
            assert buffer.feed(chunk) == []
        assert buffer.feed(b"\nGROUP VG_FW MASTER 100\n") == [None, b"GROUP VG_FW MASTER 100"]
    assert peak[0] < SMALL + 2 * len(chunk)
    with pytest.raises(NotifyDecodeError, match="longer than"):
        parse_notify("GROUP VG_FW MASTER 100" + " " * MAX_NOTIFY_LINE)
