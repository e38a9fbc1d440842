"""Frames and preamble of the peer link: round trips, bounds, and fuzzing of the decoders."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from replicator.errors import FrameTooLargeError, WireDecodeError
from replicator.framing import (
    FRAME_HEADER_SIZE,
    PREAMBLE_MAGIC,
    PREAMBLE_SIZE,
    PROTOCOL_VERSION,
    FrameDecoder,
    check_preamble,
    encode_frame,
    encode_preamble,
)


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def test_frame_layout_is_a_big_endian_u32_length_then_the_payload() -> None:
    assert encode_frame(b"abc") == b"\x00\x00\x00\x03abc"
    assert encode_frame(b"") == b"\x00\x00\x00\x00"


@given(
    payloads=st.lists(st.binary(max_size=300), max_size=20),
    cuts=st.lists(st.integers(min_value=0), max_size=30),
)
def test_frames_survive_any_split_of_the_stream(payloads: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(encode_frame(p, max_frame_size=300) for p in payloads)
    decoder = FrameDecoder(max_frame_size=300)
    received: list[bytes] = []
    for chunk in _split(stream, cuts):
        received.extend(decoder.feed(chunk))
    assert received == payloads
    assert decoder.buffered == 0


def test_payload_exactly_at_the_bound_passes_and_one_more_byte_is_refused() -> None:
    assert FrameDecoder(max_frame_size=8).feed(encode_frame(b"x" * 8, 8)) == [b"x" * 8]
    with pytest.raises(FrameTooLargeError, match="9 bytes exceeds the bound of 8"):
        encode_frame(b"x" * 9, 8)


def test_oversized_length_is_refused_from_the_header_alone() -> None:
    decoder = FrameDecoder(max_frame_size=1024)
    with pytest.raises(WireDecodeError, match="exceeds the bound"):
        decoder.feed((1025).to_bytes(4, "big"))
    assert decoder.buffered == 0


def test_a_failed_decoder_keeps_refusing() -> None:
    decoder = FrameDecoder(max_frame_size=4)
    with pytest.raises(WireDecodeError):
        decoder.feed(b"\xff\xff\xff\xff")
    with pytest.raises(WireDecodeError, match="already failed"):
        decoder.feed(encode_frame(b"ok", 4))


def test_frames_before_a_bad_header_in_the_same_chunk_are_not_returned() -> None:
    # The whole chunk is refused: the connection is dropped, and the daemon must not
    # act on part of a stream that it is about to call broken.
    decoder = FrameDecoder(max_frame_size=4)
    with pytest.raises(WireDecodeError):
        decoder.feed(encode_frame(b"ok", 4) + b"\x00\x00\x01\x00")


def test_invalid_bounds_are_a_local_error() -> None:
    with pytest.raises(ValueError, match="max_frame_size"):
        FrameDecoder(max_frame_size=-1)
    with pytest.raises(ValueError, match="max_frame_size"):
        encode_frame(b"", max_frame_size=1 << 32)


@given(
    # Junk mixed with well-formed frames, so the fuzzer also gets past the first header.
    data=st.lists(
        st.one_of(st.binary(max_size=200), st.binary(max_size=64).map(encode_frame)),
        max_size=20,
    ),
    bound=st.integers(min_value=0, max_value=64),
)
def test_fuzz_only_wire_decode_error_escapes_and_memory_stays_bounded(
    data: list[bytes], bound: int
) -> None:
    decoder = FrameDecoder(max_frame_size=bound)
    for chunk in data:
        try:
            frames = decoder.feed(chunk)
        except WireDecodeError:
            return
        assert all(len(f) <= bound for f in frames)
        assert decoder.buffered < FRAME_HEADER_SIZE + bound


def test_preamble_layout() -> None:
    assert encode_preamble() == PREAMBLE_MAGIC + PROTOCOL_VERSION.to_bytes(2, "big") + b"\0\0"
    assert len(encode_preamble(7)) == PREAMBLE_SIZE


@given(version=st.integers(min_value=0, max_value=0xFFFF))
def test_every_proper_prefix_of_a_preamble_is_incomplete_and_the_whole_gives_the_version(
    version: int,
) -> None:
    preamble = encode_preamble(version)
    for n in range(PREAMBLE_SIZE):
        assert check_preamble(preamble[:n]) is None
    assert check_preamble(preamble) == version


@pytest.mark.parametrize(
    "data",
    [b"G", b"GET / HTTP/1.1", b"\x16\x03\x01", b"RPLX", b"\x00"],
    ids=["one-byte", "http", "tls-client-hello", "wrong-magic", "nul"],
)
def test_a_foreign_client_is_refused_at_its_first_wrong_byte(data: bytes) -> None:
    with pytest.raises(WireDecodeError, match="not a replicator peer"):
        check_preamble(data[:PREAMBLE_SIZE])


def test_reserved_field_and_length_are_checked() -> None:
    with pytest.raises(WireDecodeError, match="reserved"):
        check_preamble(PREAMBLE_MAGIC + b"\x00\x01\x00\x01")
    with pytest.raises(WireDecodeError, match="longer"):
        check_preamble(encode_preamble() + b"x")


@given(data=st.binary(max_size=PREAMBLE_SIZE + 4))
def test_fuzz_preamble_check_raises_only_wire_decode_error(data: bytes) -> None:
    try:
        result = check_preamble(data)
    except WireDecodeError:
        return
    assert result is None or 0 <= result <= 0xFFFF
