"""The vrrp_notify_fifo reader: line splitting, decoding, a real FIFO under trio."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from replicator.errors import ConfigError, NotifyDecodeError
from replicator.notifyfifo import LineBuffer, decode_line, open_fifo, read_notify_fifo
from replicator.role import VrrpEvent, VrrpKind, VrrpState

# --- LineBuffer -----------------------------------------------------------------------


def test_lines_split_across_chunks() -> None:
    buffer = LineBuffer(limit=10)
    assert buffer.feed(b"ab") == []
    assert buffer.feed(b"c\nde") == [b"abc"]
    assert buffer.feed(b"\n\nf") == [b"de", b""]
    assert buffer.feed(b"\n") == [b"f"]


def test_overlong_lines_are_dropped_without_buffering() -> None:
    buffer = LineBuffer(limit=4)
    assert buffer.feed(b"12345") == []
    assert buffer.feed(b"6" * 10_000) == []
    assert len(buffer._partial) == 0  # the garbage was not kept
    assert buffer.feed(b"7\nok\n") == [None, b"ok"]
    assert buffer.feed(b"1234\n") == [b"1234"]  # exactly the limit is fine


@given(
    st.lists(st.binary(max_size=12).map(lambda b: b.replace(b"\n", b"")), max_size=20),
    st.lists(st.integers(1, 30), min_size=1, max_size=20),
)
def test_any_chunking_gives_the_same_lines(lines: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(line + b"\n" for line in lines)
    buffer = LineBuffer(limit=8)
    out: list[bytes | None] = []
    position = 0
    for cut in [*cuts, len(stream)]:
        out += buffer.feed(stream[position : position + cut])
        position += cut
    out += buffer.feed(stream[position:])
    assert out == [line if len(line) <= 8 else None for line in lines]


def test_decode_line() -> None:
    assert decode_line(b'INSTANCE "VI_1" BACKUP 90') == VrrpEvent(
        VrrpKind.INSTANCE, "VI_1", VrrpState.BACKUP, 90
    )
    with pytest.raises(NotifyDecodeError, match="not UTF-8"):
        decode_line(b"GROUP \xff MASTER 1")


# --- a real FIFO ----------------------------------------------------------------------


def write_fifo(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


async def receive(channel: trio.MemoryReceiveChannel[VrrpEvent], count: int) -> list[VrrpEvent]:
    with trio.fail_after(10):
        return [await channel.receive() for _ in range(count)]


async def test_reads_lines_in_order_across_writers(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "notify.fifo"
    send, receive_channel = trio.open_memory_channel[VrrpEvent](100)
    await nursery.start(functools.partial(read_notify_fifo, path, send.send_nowait))
    assert path.is_fifo()
    assert (path.stat().st_mode & 0o777) == 0o600
    write_fifo(path, b'INSTANCE "VI_1" MASTER 100\nGROUP "VG_FW" MAS')
    write_fifo(path, b"TER 100\n\nbogus line\n" + b"x" * 1000 + b'\nGROUP "VG_FW" BACKUP 90\n')
    # keepalived restarted: a new writer; the reader saw no end-of-file in between.
    write_fifo(path, b'INSTANCE "VI_1" FAULT 0\n')
    events = await receive(receive_channel, 4)
    assert [(e.kind, e.name, e.state) for e in events] == [
        (VrrpKind.INSTANCE, "VI_1", VrrpState.MASTER),
        (VrrpKind.GROUP, "VG_FW", VrrpState.MASTER),
        (VrrpKind.GROUP, "VG_FW", VrrpState.BACKUP),
        (VrrpKind.INSTANCE, "VI_1", VrrpState.FAULT),
    ]
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["bad notify line", "notify line too long, dropped"]


async def test_an_existing_fifo_is_reused(nursery: trio.Nursery, tmp_path: Path) -> None:
    path = tmp_path / "notify.fifo"
    os.mkfifo(path, 0o620)
    send, receive_channel = trio.open_memory_channel[VrrpEvent](10)
    await nursery.start(functools.partial(read_notify_fifo, path, send.send_nowait))
    write_fifo(path, b"GROUP G STOP 0\n")
    assert (await receive(receive_channel, 1))[0].state is VrrpState.STOP


def test_a_regular_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "notify.fifo"
    path.write_text("")
    with pytest.raises(ConfigError, match="exists and is not a FIFO"):
        open_fifo(path)


def test_an_impossible_path_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot create .*No such file"):
        open_fifo(tmp_path / "missing-dir" / "notify.fifo")
