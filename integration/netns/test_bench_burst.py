"""The in-process burst benchmark (``bench/burst.py``) on real kernel events: every
captured entry reaches the standby's session whatever the size of a read, including
reads too small for the column decoder (fewer than 32 datagrams of one size), which
the daemon's event reader decodes one by one."""

from __future__ import annotations

import pytest

from bench import burst
from replicator import ctnetlink


@pytest.fixture(scope="module")
def datagrams() -> list[bytes]:
    return burst.capture(300)


@pytest.mark.parametrize("batch", [20, 45, 300])
def test_every_entry_reaches_the_standby(datagrams: list[bytes], batch: int) -> None:
    # run() raises unless the standby's session holds every captured entry.
    spent = burst.run(datagrams, batch)
    assert set(spent) == {"decode", "cache", "table", "send", "receive"}


@pytest.mark.parametrize("size", [20, 40])
def test_a_read_is_decoded_as_the_daemon_decodes_it(datagrams: list[bytes], size: int) -> None:
    # 20: one by one (under the column decoder's minimum); 40: by column.
    read = datagrams[:size]
    one_by_one = [e for d in read for e in ctnetlink.decode_events_records(d, burst.NOW)]
    assert burst.decode(read) == one_by_one
    assert len(one_by_one) == size
