"""Read keepalived's ``vrrp_notify_fifo`` and hand each transition to the role machine.

keepalived writes one line per event, ``INSTANCE "VI_1" MASTER 100``, in the order the
events happened and without forking a script per event, which is why this is preferred
over ``notify`` scripts (they run late and concurrently, see shared/notes/peers.md).

The FIFO is opened read-write: on Linux that keeps one writer (ourselves) attached, so
the reader never sees end-of-file when keepalived restarts and reopens it. A line that
does not parse is logged and skipped; an over-long line is dropped up to its newline.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import trio

from .errors import ConfigError, NotifyDecodeError
from .logs import fields
from .role import MAX_NOTIFY_LINE, VrrpEvent, parse_notify

log = logging.getLogger(__name__)


class LineBuffer:
    """Splits a byte stream into lines of at most ``limit`` bytes (newline excluded).

    :meth:`feed` returns the complete lines in order; ``None`` stands for a line that
    was longer than ``limit`` and was dropped (its bytes are never buffered beyond the
    limit, so garbage without newlines cannot grow memory).
    """

    def __init__(self, limit: int = MAX_NOTIFY_LINE) -> None:
        self._limit = limit
        self._partial = bytearray()
        self._overlong = False

    def feed(self, data: bytes) -> list[bytes | None]:
        """Add ``data``; return the lines it completed."""
        lines: list[bytes | None] = []
        pieces = data.split(b"\n")
        for index, piece in enumerate(pieces):
            last = index == len(pieces) - 1
            if not self._overlong:
                self._partial += piece
                if len(self._partial) > self._limit:
                    self._overlong = True
                    self._partial.clear()
            if last:
                break
            # `piece` ended with a newline: the current line is complete.
            lines.append(None if self._overlong else bytes(self._partial))
            self._partial.clear()
            self._overlong = False
        return lines


def decode_line(raw: bytes) -> VrrpEvent:
    """One FIFO line to an event; raises NotifyDecodeError only."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise NotifyDecodeError("notify line is not UTF-8") from None
    return parse_notify(text)


def open_fifo(path: Path) -> int:
    """Create the FIFO if needed (mode 0600) and open it read-write, non-blocking."""
    try:
        os.mkfifo(path, 0o600)
    except FileExistsError:
        if not stat.S_ISFIFO(os.lstat(path).st_mode):
            raise ConfigError(f"keepalived.notify_fifo: {path} exists and is not a FIFO") from None
    except OSError as exc:
        raise ConfigError(f"keepalived.notify_fifo: cannot create {path}: {exc.strerror}") from None
    return os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)


async def read_notify_fifo(
    path: Path,
    feed: Callable[[VrrpEvent], object],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Read ``path`` forever, calling ``feed`` with every well-formed line, in order.

    ``task_status.started()`` fires once the FIFO is open, so a writer started after it
    cannot lose lines. The FIFO file is left in place (keepalived may hold it open).
    """
    stream = trio.lowlevel.FdStream(open_fifo(path))
    buffer = LineBuffer()
    async with stream:
        task_status.started()
        while True:
            data = await stream.receive_some(65536)
            for raw in buffer.feed(data):
                if raw is None:
                    log.warning("notify line too long, dropped", extra=fields(fifo=path))
                    continue
                if not raw.strip():
                    continue
                try:
                    event = decode_line(raw)
                except NotifyDecodeError as exc:
                    log.warning("bad notify line", extra=fields(fifo=path, error=exc))
                    continue
                feed(event)
