"""Logging: key=value lines, quoting, journald priorities, setup."""

from __future__ import annotations

import io
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from replicator.logs import (
    ROOT_LOGGER,
    KeyValueFormatter,
    fields,
    priority,
    quote,
    set_level,
    setup_logging,
    stream_is_journal,
)


def record(level: int = logging.INFO, msg: str = "peer up", **values: object) -> logging.LogRecord:
    rec = logging.LogRecord("replicator.transport", level, __file__, 1, msg, (), None)
    if values:
        rec.fields = values
    return rec


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("plain", "plain"),
        (42, "42"),
        ("192.0.2.2:3790", "192.0.2.2:3790"),
        ("two words", '"two words"'),
        ("", '""'),
        ('say "hi"', '"say \\"hi\\""'),
        ("a=b", '"a=b"'),
        ("back\\slash", '"back\\\\slash"'),
        ("line\nbreak", '"line\\nbreak"'),
        ("tab\there", '"tab\\there"'),
        ("bell\x07", '"bell\\x07"'),
        ("ünïcode", "ünïcode"),
    ],
)
def test_quote(value: object, expected: str) -> None:
    assert quote(value) == expected


@given(st.text())
def test_quoted_values_are_one_printable_token(value: str) -> None:
    text = quote(value)
    assert "\n" not in text
    assert text.isprintable()
    if " " in text or "=" in text:
        assert text.startswith('"')
        assert text.endswith('"')


def test_plain_line_has_a_timestamp_and_the_fields() -> None:
    line = KeyValueFormatter(journal=False).format(
        record(msg="peer up", peer="192.0.2.2:3790", rtt_ms=1.5)
    )
    ts, rest = line.split(" ", 1)
    assert ts.startswith("ts=20")
    assert ts.endswith("+00:00")
    assert (
        rest
        == 'level=info logger=replicator.transport msg="peer up" peer=192.0.2.2:3790 rtt_ms=1.5'
    )


@pytest.mark.parametrize(
    ("level", "prefix"),
    [
        (logging.DEBUG, "<7>level=debug"),
        (logging.INFO, "<6>level=info"),
        (logging.WARNING, "<4>level=warning"),
        (logging.ERROR, "<3>level=error"),
        (logging.CRITICAL, "<2>level=critical"),
    ],
)
def test_journal_lines_carry_the_syslog_priority(level: int, prefix: str) -> None:
    line = KeyValueFormatter(journal=True).format(record(level))
    assert line.startswith(prefix + " ")
    assert "ts=" not in line


def test_custom_levels_round_down() -> None:
    assert priority(25) == 6
    assert priority(5) == 7
    assert priority(100) == 2


def test_exceptions_stay_on_one_line() -> None:
    def fail() -> None:
        raise ValueError("boom\nsecond line")

    try:
        fail()
    except ValueError:
        rec = logging.LogRecord(
            "replicator", logging.ERROR, __file__, 1, "failed", (), sys.exc_info()
        )
    line = KeyValueFormatter(journal=True).format(rec)
    assert "\n" not in line
    assert line.startswith('<3>level=error logger=replicator msg=failed exc="Traceback')
    assert "ValueError: boom\\nsecond line" in line


def test_fields_helper_builds_extra() -> None:
    assert fields(a=1) == {"fields": {"a": 1}}


def test_journal_detection(tmp_path: Path) -> None:
    with (tmp_path / "stream").open("w") as stream:
        st_ = os.fstat(stream.fileno())
        right = f"{st_.st_dev}:{st_.st_ino}"
        assert stream_is_journal(stream, {"JOURNAL_STREAM": right})
        assert not stream_is_journal(stream, {"JOURNAL_STREAM": f"{st_.st_dev}:{st_.st_ino + 1}"})
        assert not stream_is_journal(stream, {"JOURNAL_STREAM": "garbage"})
        assert not stream_is_journal(stream, {})
    assert not stream_is_journal(io.StringIO(), {"JOURNAL_STREAM": right})


@pytest.fixture
def restore_logger() -> Iterator[logging.Logger]:
    logger = logging.getLogger(ROOT_LOGGER)
    saved = (list(logger.handlers), logger.propagate, logger.level)
    try:
        yield logger
    finally:
        logger.handlers[:] = saved[0]
        logger.propagate = saved[1]
        logger.setLevel(saved[2])


def test_setup_logging_to_the_journal(tmp_path: Path, restore_logger: logging.Logger) -> None:
    with (tmp_path / "journal").open("w") as stream:
        st_ = os.fstat(stream.fileno())
        env = {"JOURNAL_STREAM": f"{st_.st_dev}:{st_.st_ino}"}
        setup_logging("info", stream=stream, environ=env)
        setup_logging("info", stream=stream, environ=env)  # again: still one handler
        log = logging.getLogger("replicator.mirror")
        log.debug("hidden")
        log.warning("enobufs", extra=fields(lost=3))
        set_level("debug")
        log.debug("now visible")
    lines = (tmp_path / "journal").read_text().splitlines()
    assert lines == [
        "<4>level=warning logger=replicator.mirror msg=enobufs lost=3",
        '<7>level=debug logger=replicator.mirror msg="now visible"',
    ]
    assert len(restore_logger.handlers) == 1


def test_setup_logging_to_a_terminal(restore_logger: logging.Logger) -> None:
    stream = io.StringIO()
    handler = setup_logging("warning", stream=stream, environ={})
    assert handler in restore_logger.handlers
    logging.getLogger("replicator.x").info("not shown")
    logging.getLogger("replicator.x").error("shown")
    (line,) = stream.getvalue().splitlines()
    assert line.startswith("ts=")
    assert line.endswith("level=error logger=replicator.x msg=shown")
