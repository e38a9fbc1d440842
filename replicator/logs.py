"""Logging: one line per event, ``key=value`` fields, journald priorities.

Every record becomes one line::

    level=warning logger=replicator.control msg="control request refused" uid=65534 pid=812

Structured fields travel in ``extra``: ``log.info("peer up", extra=fields(peer=addr))``.
Values are quoted when they contain spaces, quotes, ``=`` or control characters, and
newlines are escaped, so a record (tracebacks included) is always one line.

When stderr is the journal (systemd sets ``JOURNAL_STREAM`` to the device and inode of
the stream it connected), each line starts with a syslog priority ``<N>`` so that
journald records the right level, and the timestamp is left to journald. Otherwise a
``ts=`` field leads the line.
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
from collections.abc import Mapping
from typing import Any, TextIO

#: The logger every replicator module logs under (``logging.getLogger(__name__)``).
ROOT_LOGGER = "replicator"

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

# syslog(3) priorities.
_PRIORITY = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}

_FIELDS = "fields"


def fields(**values: object) -> dict[str, Any]:
    """``extra=`` argument carrying structured fields for one record."""
    return {_FIELDS: values}


def priority(levelno: int) -> int:
    """The syslog priority of a logging level (custom levels round down to the next one)."""
    for level in sorted(_PRIORITY, reverse=True):
        if levelno >= level:
            return _PRIORITY[level]
    return 7


def quote(value: object) -> str:
    """A value as it appears after ``key=``."""
    text = str(value)
    if text and not any(c in text for c in ' "=\\') and text.isprintable():
        return text
    escaped = (
        text.replace("\\", "\\\\")
        .replace('"', '\\"')
        .replace("\n", "\\n")
        .replace("\r", "\\r")
        .replace("\t", "\\t")
    )
    # Any other control character: \xNN, so the line stays one printable line.
    escaped = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in escaped)
    return f'"{escaped}"'


class KeyValueFormatter(logging.Formatter):
    """Formats a record as one ``key=value`` line (see the module docstring)."""

    def __init__(self, *, journal: bool) -> None:
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        """One line for ``record``."""
        parts: list[str] = []
        if not self.journal:
            ts = datetime.datetime.fromtimestamp(record.created, tz=datetime.UTC)
            parts.append(f"ts={ts.isoformat(timespec='milliseconds')}")
        parts.append(f"level={record.levelname.lower()}")
        parts.append(f"logger={quote(record.name)}")
        parts.append(f"msg={quote(record.getMessage())}")
        extra: Mapping[str, object] = getattr(record, _FIELDS, {})
        parts.extend(f"{key}={quote(value)}" for key, value in extra.items())
        if record.exc_info and record.exc_info[0] is not None:
            parts.append(f"exc={quote(self.formatException(record.exc_info))}")
        line = " ".join(parts)
        return f"<{priority(record.levelno)}>{line}" if self.journal else line


def stream_is_journal(stream: TextIO, environ: Mapping[str, str]) -> bool:
    """True when ``stream`` is the journal stream systemd advertised in JOURNAL_STREAM."""
    value = environ.get("JOURNAL_STREAM", "")
    device, sep, inode = value.partition(":")
    if not sep or not device.isdigit() or not inode.isdigit():
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError):  # closed, or not a real file (io.StringIO)
        return False
    return (st.st_dev, st.st_ino) == (int(device), int(inode))


def setup_logging(
    level: str,
    *,
    stream: TextIO | None = None,
    environ: Mapping[str, str] | None = None,
) -> logging.Handler:
    """Send replicator's records to ``stream`` (stderr) in the key=value format.

    Replaces a handler installed by an earlier call, so it is safe to call again; the
    handler is returned for tests. Use :func:`set_level` for a reload.
    """
    out = sys.stderr if stream is None else stream
    env = os.environ if environ is None else environ
    handler = logging.StreamHandler(out)
    handler.setFormatter(KeyValueFormatter(journal=stream_is_journal(out, env)))
    logger = logging.getLogger(ROOT_LOGGER)
    for old in list(logger.handlers):
        if isinstance(old.formatter, KeyValueFormatter):
            logger.removeHandler(old)
    logger.addHandler(handler)
    logger.propagate = False
    set_level(level)
    return handler


def set_level(level: str) -> None:
    """Change the level of every replicator logger (``log.level`` is reloadable)."""
    logging.getLogger(ROOT_LOGGER).setLevel(LEVELS[level])
