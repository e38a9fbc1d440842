"""The systemd notification client against real datagram sockets."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from replicator.sdnotify import Notifier, watchdog_interval


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(5)
        yield sock, str(path)


def lines(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode().split("\n")


def test_messages(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    notifier = Notifier({"NOTIFY_SOCKET": path})
    assert notifier.enabled
    assert notifier.ready("BACKUP, peer up, 12 entries")
    assert lines(sock) == ["READY=1", "STATUS=BACKUP, peer up, 12 entries"]
    assert notifier.ready()
    assert lines(sock) == ["READY=1"]
    assert notifier.status("two\nlines")
    assert lines(sock) == ["STATUS=two lines"]
    assert notifier.watchdog()
    assert lines(sock) == ["WATCHDOG=1"]
    assert notifier.reloading()
    reloading, monotonic = lines(sock)
    assert reloading == "RELOADING=1"
    assert monotonic.startswith("MONOTONIC_USEC=")
    assert int(monotonic.split("=")[1]) > 0
    assert notifier.stopping()
    assert lines(sock) == ["STOPPING=1"]


def test_abstract_socket_names() -> None:
    name = f"replicator-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).watchdog()
        assert lines(sock) == ["WATCHDOG=1"]


@pytest.mark.parametrize("value", ["", "relative/path", "notify.sock"])
def test_disabled_without_a_usable_socket(value: str) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": value} if value else {})
    assert not notifier.enabled
    assert notifier.ready() is False


def test_an_absent_listener_is_not_an_error(tmp_path: Path) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert notifier.enabled
    assert notifier.watchdog() is False


def test_nothing_to_send(listener: tuple[socket.socket, str]) -> None:
    assert Notifier({"NOTIFY_SOCKET": listener[1]}).send() is False


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "x"}, None),
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "me"}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    assert watchdog_interval(env) == expected
