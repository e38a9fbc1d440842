"""The byte layout of the peer link: connection preamble and length-prefixed frames.

Pure: no sockets, no trio. Everything received here comes from the network, so every
decoder raises only :class:`~replicator.errors.WireDecodeError` on bad input and never
buffers more than one frame's worth of bytes.

Preamble
--------
Eight bytes, ``b"RPLC"`` + protocol version (u16, big endian) + two reserved zero
bytes. It is exchanged twice on every connection:

1. **In clear, dialer to listener, before TLS.** It lets the listener refuse a client
   that does not speak this protocol (plain text, HTTP, a port scanner, random bytes,
   a bare TLS client) after at most eight bytes, before spending any cryptography on
   it, and with a clear reason in the log. It is unauthenticated and only a filter.
2. **Inside TLS, both ways, after each side authenticated the other.** This copy is
   authenticated by TLS, so the version cannot be tampered with, and receiving it tells
   the dialer that the listener accepted its certificate: in TLS 1.3 the client
   finishes its handshake before the server has checked the client certificate, so
   without this confirmation a refused dialer would believe it was connected.

Frames
------
``u32 length (big endian) + payload``; the payload is opaque here (the sync messages
of :mod:`replicator.wire`). A length above the decoder's bound is refused before any
byte of the payload is buffered, so a peer cannot make this node allocate more than
``max_frame_size`` bytes. Empty payloads are valid framing; whether an empty message
means anything is the message layer's business.
"""

from __future__ import annotations

import struct

from .errors import FrameTooLargeError, WireDecodeError

PREAMBLE_MAGIC = b"RPLC"
#: The version this node speaks (in both preambles).
PROTOCOL_VERSION = 1
PREAMBLE_SIZE = 8
_PREAMBLE = struct.Struct(">4sHH")

FRAME_HEADER_SIZE = 4
_HEADER = struct.Struct(">I")
#: Default bound on a frame's payload: 1 MiB. The sync layer splits larger batches.
DEFAULT_MAX_FRAME_SIZE = 1 << 20
#: No bound may exceed what the u32 length prefix can express.
MAX_FRAME_SIZE_LIMIT = (1 << 32) - 1


def encode_preamble(version: int = PROTOCOL_VERSION) -> bytes:
    """The eight preamble bytes announcing ``version``."""
    return _PREAMBLE.pack(PREAMBLE_MAGIC, version, 0)


def check_preamble(data: bytes) -> int | None:
    """Check the first ``len(data)`` bytes received of a preamble.

    Returns ``None`` while the preamble is incomplete and every byte so far is valid,
    the announced version once all eight bytes are there. Raises WireDecodeError as
    soon as the bytes cannot start a preamble (wrong magic, non-zero reserved field,
    too long), so a foreign client is refused after its first wrong byte. The caller
    decides whether it supports the version.
    """
    if len(data) > PREAMBLE_SIZE:
        raise WireDecodeError(f"preamble longer than {PREAMBLE_SIZE} bytes")
    head = data[: len(PREAMBLE_MAGIC)]
    if not PREAMBLE_MAGIC.startswith(head):
        raise WireDecodeError(f"not a replicator peer: preamble starts with {head!r}")
    if len(data) < PREAMBLE_SIZE:
        return None
    _, version, reserved = _PREAMBLE.unpack(data)
    if reserved != 0:
        raise WireDecodeError(f"preamble reserved field is {reserved:#06x}, not zero")
    return int(version)


def _check_bound(max_frame_size: int) -> None:
    if not 0 <= max_frame_size <= MAX_FRAME_SIZE_LIMIT:
        raise ValueError(f"max_frame_size must be within 0..{MAX_FRAME_SIZE_LIMIT}")


def encode_frame(payload: bytes, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> bytes:
    """``payload`` with its length prefix. Raises FrameTooLargeError above the bound.

    Sending a frame the peer's decoder would refuse is a local bug (the sync layer
    must split its batches), hence a distinct error rather than a broken link later.
    """
    _check_bound(max_frame_size)
    if len(payload) > max_frame_size:
        raise FrameTooLargeError(
            f"frame payload of {len(payload)} bytes exceeds the bound of {max_frame_size}"
        )
    return _HEADER.pack(len(payload)) + payload


class FrameDecoder:
    """Splits a received byte stream into frame payloads.

    Holds at most one incomplete frame: never more than ``FRAME_HEADER_SIZE +
    max_frame_size`` bytes between calls. After it raised once, the stream is out of
    step and every later :meth:`feed` raises again.
    """

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        _check_bound(max_frame_size)
        self._max = max_frame_size
        self._buffer = bytearray()
        self._failed: WireDecodeError | None = None

    @property
    def buffered(self) -> int:
        """Bytes held back as the start of an incomplete frame."""
        return len(self._buffer)

    def feed(self, data: bytes | bytearray) -> list[bytes]:
        """Add received bytes; return the payloads of the frames they completed."""
        if self._failed is not None:
            raise WireDecodeError(f"frame stream already failed: {self._failed}")
        buffer = self._buffer
        buffer += data
        frames: list[bytes] = []
        start = 0
        end = len(buffer)
        while end - start >= FRAME_HEADER_SIZE:
            (length,) = _HEADER.unpack_from(buffer, start)
            if length > self._max:
                # Checked on the header alone: the payload is never waited for.
                self._failed = WireDecodeError(
                    f"frame length {length} exceeds the bound of {self._max}"
                )
                buffer.clear()
                raise self._failed
            if end - start - FRAME_HEADER_SIZE < length:
                break
            begin = start + FRAME_HEADER_SIZE
            frames.append(bytes(buffer[begin : begin + length]))
            start = begin + length
        # One deletion per call keeps feeding linear in the bytes received.
        del buffer[:start]
        return frames
