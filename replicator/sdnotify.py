"""A tiny client of systemd's notification socket (``sd_notify(3)``).

The protocol is one datagram of ``KEY=value`` lines sent to the unix socket named in
``NOTIFY_SOCKET`` (a path, or an abstract name written with a leading ``@``). Without
``NOTIFY_SOCKET`` (not started by systemd, or ``Type=simple``) every call does nothing.

The daemon sends ``READY=1`` once events are subscribed, the first dump is done and
the listeners are up; ``STATUS=`` with role, peer and entry count; ``WATCHDOG=1``
while the sync is healthy; ``RELOADING=1`` then ``READY=1`` around a SIGHUP reload;
``STOPPING=1`` on the way out.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping


def _address(value: str) -> str | None:
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


class Notifier:
    """Sends notifications to systemd; a no-op when there is no NOTIFY_SOCKET."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._address = _address(env.get("NOTIFY_SOCKET", ""))

    @property
    def enabled(self) -> bool:
        """True when systemd asked for notifications."""
        return self._address is not None

    def send(self, **fields: str) -> bool:
        """Send one datagram of ``KEY=value`` lines; True if it was delivered.

        A failure is not an error for the daemon (systemd may be restarting); the caller
        logs it if it wants to.
        """
        if self._address is None or not fields:
            return False
        payload = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            try:
                sock.sendto(payload, self._address)
            except OSError:
                return False
        return True

    def ready(self, status: str = "") -> bool:
        """``READY=1``, with an optional ``STATUS=``."""
        return self.send(READY="1", **({"STATUS": status} if status else {}))

    def status(self, text: str) -> bool:
        """``STATUS=text`` (one line: newlines become spaces)."""
        return self.send(STATUS=" ".join(text.splitlines()))

    def watchdog(self) -> bool:
        """``WATCHDOG=1``: the daemon is alive *and* healthy."""
        return self.send(WATCHDOG="1")

    def reloading(self) -> bool:
        """``RELOADING=1`` with ``MONOTONIC_USEC`` (systemd ≥ 253 wants both)."""
        return self.send(RELOADING="1", MONOTONIC_USEC=str(time.monotonic_ns() // 1000))

    def stopping(self) -> bool:
        """``STOPPING=1``."""
        return self.send(STOPPING="1")


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half of ``WatchdogSec``), or None if off.

    ``WATCHDOG_PID``, when set, must be this process (systemd sets it so a child does
    not inherit the duty).
    """
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    pid = env.get("WATCHDOG_PID", "")
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return None
    return int(usec) / 2_000_000
