"""Pure policies of the peer link: refusal reasons, log rate limiting, handshake slots, backoff.

No sockets, no trio, no clock reads (``now`` is a parameter): :mod:`replicator.transport`
applies these decisions to real connections.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from dataclasses import dataclass


class Refusal(enum.StrEnum):
    """Why a connection attempt did not become an authenticated link (a counter label)."""

    #: Too many handshakes in progress (globally or from this source address).
    OVERLOAD = "overload"
    #: The handshake (preamble, TLS, confirmation) did not finish in time.
    TIMEOUT = "timeout"
    #: The first bytes were not a replicator preamble: plain text, random bytes, a
    #: bare TLS client, or a malformed confirmation inside TLS.
    BAD_PREAMBLE = "bad_preamble"
    #: A replicator preamble with a protocol version this node does not speak.
    BAD_VERSION = "bad_version"
    #: The client presented no certificate.
    NO_CERTIFICATE = "no_certificate"
    #: The presented certificate is not one of the trusted peer certificates.
    UNTRUSTED_CERTIFICATE = "untrusted_certificate"
    #: The certificate verified against the trust store but its fingerprint is not pinned.
    FINGERPRINT_MISMATCH = "fingerprint_mismatch"
    #: Any other TLS failure (wrong TLS version, malformed handshake, ...).
    TLS_ERROR = "tls_error"
    #: The other side closed or reset the connection during the handshake.
    CLOSED = "closed_early"
    #: (dialer) The listener closed the connection after TLS: it refused our certificate.
    REFUSED_BY_PEER = "refused_by_peer"
    #: (dialer) The TCP connection could not be established.
    CONNECT_FAILED = "connect_failed"
    #: Authenticated, but closed because the preferred connection is already active
    #: (both nodes dialed at once; see replicator.transport). Not an attack.
    DUPLICATE = "duplicate"


class RefusalLog:
    """Decides which refusals get a log line: one per source host per ``interval``.

    A flood of refused connections must neither flood the log nor grow memory: at most
    ``max_hosts`` hosts are remembered (least recently logged forgotten first) and at
    most ``max_lines`` lines are allowed per ``interval`` over all hosts. Counters by
    reason (kept by the caller) still see every refusal.
    """

    def __init__(self, interval: float = 60.0, max_hosts: int = 1024, max_lines: int = 100) -> None:
        if interval <= 0 or max_hosts < 1 or max_lines < 1:
            raise ValueError("interval, max_hosts and max_lines must be positive")
        self._interval = interval
        self._max_hosts = max_hosts
        self._max_lines = max_lines
        # host -> [time of its last logged line, refusals suppressed since]
        self._hosts: OrderedDict[str, list[float]] = OrderedDict()
        self._window_start = float("-inf")
        self._window_lines = 0

    def record(self, host: str, now: float) -> int | None:
        """Account one refusal from ``host``.

        Returns ``None`` if it must not be logged, else how many refusals from this host
        were suppressed since its previous logged line (to mention in the new one).
        """
        entry = self._hosts.get(host)
        if entry is not None and now - entry[0] < self._interval:
            entry[1] += 1
            return None
        if now - self._window_start >= self._interval:
            self._window_start = now
            self._window_lines = 0
        if self._window_lines >= self._max_lines:
            if entry is None:
                # Never logged yet: remembered as due, with this refusal to report.
                self._remember(host, [float("-inf"), 1])
            else:
                entry[1] += 1
            return None
        self._window_lines += 1
        suppressed = 0 if entry is None else int(entry[1])
        self._remember(host, [now, 0])
        return suppressed

    def _remember(self, host: str, entry: list[float]) -> None:
        self._hosts[host] = entry
        self._hosts.move_to_end(host)
        while len(self._hosts) > self._max_hosts:
            self._hosts.popitem(last=False)

    def __len__(self) -> int:
        return len(self._hosts)


class HandshakeSlots:
    """Bounds handshakes in progress, in total and per source host.

    A connection that finds no free slot is closed at once, without reading a byte.
    The per-host bound is what keeps a flood from one address (or a few) from taking
    every slot and starving the real peer, whose address then still finds free slots.
    """

    def __init__(self, total: int, per_host: int) -> None:
        if total < 1 or per_host < 1:
            raise ValueError("handshake slot bounds must be positive")
        self._total = total
        self._per_host = per_host
        self._by_host: dict[str, int] = {}
        self._in_use = 0

    @property
    def in_use(self) -> int:
        """Handshakes currently holding a slot."""
        return self._in_use

    def try_acquire(self, host: str) -> bool:
        """Take a slot for a handshake from ``host``; False if a bound is reached."""
        held = self._by_host.get(host, 0)
        if self._in_use >= self._total or held >= self._per_host:
            return False
        self._by_host[host] = held + 1
        self._in_use += 1
        return True

    def release(self, host: str) -> None:
        """Give back a slot taken by :meth:`try_acquire` for ``host``."""
        held = self._by_host[host]
        if held == 1:
            del self._by_host[host]
        else:
            self._by_host[host] = held - 1
        self._in_use -= 1


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff between dial attempts, with jitter.

    Jitter keeps two restarted nodes (or many links) from retrying in lock step.
    """

    initial: float = 0.1
    maximum: float = 5.0

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.maximum:
            raise ValueError("backoff needs 0 < initial <= maximum")

    def delay(self, attempt: int, jitter: float) -> float:
        """Seconds to wait before retry number ``attempt`` (0-based).

        ``jitter`` in ``[0, 1)`` (a random draw) scales the capped exponential delay
        into ``[50 %, 100 %)`` of its value.
        """
        return self.capped(attempt) * (0.5 + 0.5 * jitter)

    def capped(self, attempt: int) -> float:
        """The delay before retry number ``attempt`` (0-based) without jitter: the
        initial one doubled each time, at most :attr:`maximum`."""
        return min(self.initial * 2.0 ** min(attempt, 64), self.maximum)
